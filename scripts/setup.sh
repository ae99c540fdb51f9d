#!/usr/bin/env bash
# Create the project's virtual environment with the right PyTorch build, then the harness.
# CPU machines get the CPU build (a bare `torch` requirement would pull several GB of CUDA
# wheels); machines with an NVIDIA driver get the default CUDA build. Override the index
# with TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) where needed.
set -euo pipefail
venv="${1:-.venv}"
torch_version="${TORCH_VERSION:-2.13.0}"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  index=()
  [ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
  # numpy first, from the default index: torch imported without it warns "Failed to initialize NumPy" (the CUDA
  # check below runs before the harness's own dependencies bring numpy).
  "${pip[@]}" numpy 2> >(grep -v "^WARNING: Location" >&2)
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "${index[@]}" "torch==$torch_version"
  else
    # On this project's machines pip finds the CPU wheel of this version on local disk.
    "${pip[@]}" "${index[@]}" "torch==$torch_version"
    "$venv/bin/python" -c "import torch,sys; sys.exit(0 if not torch.version.cuda else 1)" \
      || echo "note: a CUDA build of torch was installed on a machine without a GPU; set TORCH_INDEX_URL to a CPU index" >&2
  fi
fi
"${pip[@]}" -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)
touch "$venv/.installed"
echo "ready: $venv (torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
