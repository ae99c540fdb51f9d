"""Bad input: each case must end with exit code 2, exactly one short non-empty line on stderr, and nothing written
(a fresh case's folder, or an existing store's bytes, exactly as before)."""

from __future__ import annotations

import copy
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    NOBODY,
    CaseResult,
    Probe,
    changes,
    chown_tree,
    digest,
    one_line,
    run_harness,
    sqlite_uri,
    tiny_spec,
    tune_spec,
    write_yaml,
)

STUDY = "bad"  # the existing store's study: the bad specs name it too
MAX_LINE = 500
CASE_TIMEOUT_S = 120.0
DEAD_SERVER = "http://127.0.0.1:1"


@dataclass
class Place:
    """A case's folder: its spec files, its output folder ``out/`` (store, checkpoints) and environment."""

    folder: Path
    data: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def database(self) -> Path:
        return self.folder / "out" / "mlruns" / "mlflow.db"

    @property
    def uri(self) -> str:
        return sqlite_uri(self.database)

    def spec(self, content: dict[str, Any] | str | bytes, name: str = "spec.yaml") -> Path:
        path = self.folder / name
        if isinstance(content, dict):
            return write_yaml(path, content)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def study(self, spec: Path | str, *extra: str, uri: str | None = None, ck: Path | str | None = None) -> list[str]:
        ck = ck or self.folder / "out" / "ck"
        return ["run-study", str(spec), "--tracking-uri", uri or self.uri, "--checkpoint-dir", str(ck), *extra]

    def tune(self, spec: Path | str, *extra: str) -> list[str]:
        return ["tune", str(spec), "--tracking-uri", self.uri, "--no-progress", *extra]

    def subfolder(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir(exist_ok=True)
        return path


def edited(base: dict[str, Any], changes_: dict[str, Any]) -> dict[str, Any]:
    """``base`` with each dotted key set (intermediate mappings created)."""
    spec = copy.deepcopy(base)
    for dotted, value in changes_.items():
        *parents, leaf = dotted.split(".")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spec


def bad(**changes_: Any) -> Callable[[Place], list[str]]:
    """A run-study case: the tiny spec with ``changes_`` (``__`` in a keyword stands for a dot)."""
    dotted = {k.replace("__", "."): v for k, v in changes_.items()}
    return lambda p: p.study(p.spec(edited(tiny_spec(STUDY, ["baseline"]), dotted)))


def bad_text(text: str | bytes) -> Callable[[Place], list[str]]:
    return lambda p: p.study(p.spec(text))


def bad_tune(*extra: str, **changes_: Any) -> Callable[[Place], list[str]]:
    dotted = {k.replace("__", "."): v for k, v in changes_.items()}
    return lambda p: p.tune(p.spec(edited(tune_spec(STUDY, 2), dotted)), *extra)


def changed(**changes_: Any) -> Callable[[Place], list[str]]:
    """A rerun of the existing store's study (one dense cell, finished) with ``changes_`` to its spec."""
    dotted = {k.replace("__", "."): v for k, v in changes_.items()}
    return lambda p: p.study(p.spec(edited(tiny_spec(STUDY, ["dense"]), dotted)))


def changed_data(p: Place) -> list[str]:
    """A rerun of the existing store's study, unchanged, over a validation split that lost its last line."""
    shutil.copytree(p.data, p.folder / "data")
    fewer_lines(p.folder / "data" / "wikitext-2-v1" / "validation-00000-of-00001.parquet")
    p.env["MOE_HARNESS_DATA"] = str(p.folder / "data")
    return p.study(p.spec(tiny_spec(STUDY, ["dense"])))


def fewer_lines(path: Path, keep: int | None = -1) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = pq.read_table(path).column("text").to_pylist()[:keep]
    pq.write_table(pa.table({"text": pa.array(lines, pa.string())}), path)


def empty_test_split(folder: Path) -> None:
    fewer_lines(folder / "test-00000-of-00001.parquet", keep=0)


MOUNTS: list[Path] = []  # tmpfs mounts of the cases, unmounted when the part ends


def no_room_for_a_checkpoint(p: Place) -> list[str]:
    """A 2 MB tmpfs as --checkpoint-dir for a cell whose checkpoints need more (refused before training)."""
    mount = p.subfolder("ck2m")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True, capture_output=True)
    MOUNTS.append(mount)
    return p.study(p.spec(edited(tiny_spec(STUDY, ["baseline"]), {"base.budget.checkpoint_every_steps": 2})), ck=mount)


def read_only_relocate(p: Place) -> list[str]:
    store = p.database.parent
    for path in store.rglob("*"):
        path.chmod(0o444 if path.is_file() else 0o555)
    store.chmod(0o555)
    return ["store", "relocate", str(store)]


def report_out_is_a_file(p: Place) -> list[str]:
    (p.folder / "report.md").write_text("an earlier report\n")
    return ["report", STUDY, "--tracking-uri", p.uri, "--out", str(p.folder / "report.md")]


def good_spec(p: Place) -> Path:
    return p.spec(tiny_spec(STUDY, ["baseline"]))


def custom_variants(variants: dict[str, Any], matrix: list[str], overrides: dict[str, Any]) -> Callable[[Place], Any]:
    def make(p: Place) -> list[str]:
        spec = tiny_spec(STUDY, matrix)
        spec.update(variants=variants, overrides=overrides)
        return p.study(p.spec(spec))

    return make


def data_copy(p: Place, damage: Callable[[Path], None]) -> list[str]:
    """A copy of the tiny data, damaged by ``damage(wikitext-2-v1 folder)``, as $MOE_HARNESS_DATA."""
    shutil.copytree(p.data, p.folder / "data")
    damage(p.folder / "data" / "wikitext-2-v1")
    p.env["MOE_HARNESS_DATA"] = str(p.folder / "data")
    return p.study(good_spec(p))


def no_text_column(folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"words": ["a b"] * 10}), folder / "test-00000-of-00001.parquet")


def truncated(folder: Path) -> None:
    train = folder / "train-00000-of-00001.parquet"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])


def read_only_store(p: Place) -> list[str]:
    store = p.database.parent
    for path in store.rglob("*"):
        path.chmod(0o444 if path.is_file() else 0o555)
    store.chmod(0o555)
    return p.study(good_spec(p))


def read_only_checkpoints(p: Place) -> list[str]:
    ck = p.subfolder("ro_ck")
    ck.chmod(0o555)
    return p.study(good_spec(p), ck=ck)


def read_only_storage(p: Place) -> list[str]:
    folder = p.subfolder("ro_storage")
    folder.chmod(0o555)
    spec = p.spec(tune_spec(STUDY, 2))
    return p.tune(spec, "--storage", sqlite_uri(folder / "tune.db"))


def unreadable_spec(p: Place) -> list[str]:
    spec = good_spec(p)
    spec.chmod(0)
    return p.study(spec)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    make: Callable[[Place], list[str]]
    existing: bool = False  # run against a copy of the existing store (else a fresh, empty out/)
    as_nobody: bool = False  # relies on permissions: as root, run as nobody (setpriv)
    max_s: float | None = None  # must fail within this many seconds
    needs_no_cuda: bool = False
    needs_mount: bool = False  # mounts a tmpfs (root)


SECTION_SPEC = "name: bad\nmatrix: {variants: [baseline], seeds: [0]}\n"
HUGE = "x" * 100_000
SPACE_LR = {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}

CASES: list[Case] = [
    # unknown or misspelled keys
    Case("key-typo-nested", "unknown key", bad(base__moe__n_expert=4)),
    Case("key-typo-top", "unknown key", bad(matrx={}), existing=True),
    Case("key-typo-budget", "unknown key", bad(base__budget__log_every_step=2)),
    Case("key-unknown-optim", "unknown key", bad(base__optim__learning_rate=0.1), existing=True),
    Case("key-typo-override", "unknown key", bad(overrides__baseline__moe__topk=1)),
    Case("key-unknown-section", "unknown key", bad(base__trian={"batch_size": 8}), existing=True),
    Case("key-custom-variant", "unknown key", custom_variants({"big": {"preset": "dense", "size": 3}}, ["big"], {})),
    # wrong types
    Case("type-lr-string", "wrong type", bad(base__optim__lr="fast"), existing=True),
    Case("type-batch-list", "wrong type", bad(base__train__batch_size=[8])),
    Case("type-seeds-string", "wrong type", bad(matrix__seeds="zero"), existing=True),
    Case("type-variants-string", "wrong type", bad(matrix__variants="baseline")),
    Case("type-tokens-float", "wrong type", bad(base__budget__tokens=1500.5), existing=True),
    Case("type-spec-is-a-list", "wrong type", bad_text("- name\n- bad\n"), existing=True),
    # out-of-range values
    Case("range-seed-1e20", "out of range", bad(matrix__seeds=[1e20])),
    Case("range-seed-negative", "out of range", bad(matrix__seeds=[-1]), existing=True),
    Case("range-betas", "out of range", bad(base__optim__betas=[2, -1])),
    Case("range-threads-1e6", "out of range", bad(base__train__threads=1e6), existing=True),
    Case("range-lr-negative", "out of range", bad(base__optim__lr=-0.1)),
    Case("range-lr-inf", "out of range", bad(base__optim__lr=float("inf")), existing=True),
    Case("range-aux-negative", "out of range", bad(base__moe__aux_loss_coef=-1.0)),
    Case("range-top-k-over-n", "out of range", bad(overrides__baseline__moe__top_k=9), existing=True),
    Case("range-tokens-zero", "out of range", bad(base__budget__tokens=0)),
    Case("range-dropout", "out of range", bad(base__model__dropout=1.5), existing=True),
    Case("range-two-budgets", "out of range", bad(base__budget__epochs=1)),
    # the spec file itself
    Case("file-binary", "spec file", bad_text(bytes(range(256)) * 4), existing=True),
    Case("file-directory", "spec file", lambda p: p.study(p.subfolder("a_directory"))),
    Case("file-missing", "spec file", lambda p: p.study(p.folder / "missing.yaml"), existing=True),
    Case("file-empty", "spec file", bad_text("")),
    Case(
        "file-yaml-syntax", "spec file", bad_text("name: t\nbase:\n  moe: {n_experts: 4\nmatrix: [x\n"), existing=True
    ),
    Case("file-duplicate-key", "spec file", bad_text(SECTION_SPEC + "name: again\n")),
    Case("file-duplicate-nested", "spec file", bad_text(SECTION_SPEC + "base:\n  moe: {top_k: 1, top_k: 2}\n")),
    Case("file-unreadable", "spec file", unreadable_spec, existing=True, as_nobody=True),
    # a scalar where a section belongs; huge values
    Case("section-base-moe-5", "scalar section", bad(base__moe=5), existing=True),
    Case("section-override-scalar", "scalar section", bad(overrides__baseline__optim="fast")),
    Case("huge-string-value", "huge value", bad(base__optim__lr=HUGE), existing=True),
    Case("huge-key", "huge value", bad(**{f"base__moe__{HUGE}": 1})),
    # sweeps
    Case("sweep-into-int", "sweep", bad(matrix__sweep={"moe.n_experts.width": [1]}), existing=True),
    Case("sweep-empty-list", "sweep", bad(matrix__sweep={"moe.n_experts": []})),
    Case("sweep-bad-value", "sweep", bad(matrix__sweep={"moe.n_experts": [0]}), existing=True),
    # variants and dependencies
    Case("variant-unknown", "variant", bad(matrix__variants=["baseline", "nosuch"])),
    Case("variant-unknown-override", "variant", bad(overrides__nosuch={"optim": {"lr": 0.1}}), existing=True),
    Case("variant-reuses-preset", "variant", custom_variants({"dense": {"preset": "dense"}}, ["dense"], {})),
    Case("source-not-in-matrix", "init.source", bad(overrides__baseline__init={"source": "dense"}), existing=True),
    Case(
        "source-cycle",
        "init.source",
        custom_variants(
            {"a": {"preset": "dense"}, "b": {"preset": "dense"}},
            ["a", "b"],
            {"a": {"init": {"source": "b"}}, "b": {"init": {"source": "a"}}},
        ),
    ),
    Case(
        "source-does-not-fit",
        "init.source",
        custom_variants({}, ["dense", "switch"], {"switch": {"init": {"source": "dense"}, "moe": {"d_hidden": 32}}}),
        existing=True,
    ),
    # where the output goes
    Case("uri-not-a-database", "tracking URI", lambda p: p.study(s := good_spec(p), uri=sqlite_uri(s)), existing=True),
    Case("uri-a-directory", "tracking URI", lambda p: p.study(good_spec(p), uri=sqlite_uri(p.subfolder("adir")))),
    Case("uri-unknown-scheme", "tracking URI", lambda p: p.study(good_spec(p), uri="ftp://example.org/store")),
    Case("uri-bare-path", "tracking URI", lambda p: p.study(good_spec(p), uri="mlruns"), existing=True),
    Case("uri-dead-server", "tracking URI", lambda p: p.study(good_spec(p), uri=DEAD_SERVER), max_s=30),
    Case("read-only-store", "read-only", read_only_store, existing=True, as_nobody=True),
    Case("read-only-checkpoint-dir", "read-only", read_only_checkpoints, as_nobody=True),
    Case("checkpoint-dir-is-a-file", "read-only", lambda p: p.study(s := good_spec(p), ck=s), existing=True),
    Case("read-only-tune-storage", "read-only", read_only_storage, as_nobody=True),
    # machine and data
    Case("cuda-without-cuda", "device/data", bad(base__train__device="cuda"), existing=True, needs_no_cuda=True),
    Case("parquet-no-text-column", "device/data", lambda p: data_copy(p, no_text_column)),
    Case("parquet-truncated", "device/data", lambda p: data_copy(p, truncated), existing=True),
    # command lines
    Case("run-study-cell-out-of-range", "CLI", lambda p: p.study(good_spec(p), "--cell", "99"), existing=True),
    Case("run-study-unknown-option", "CLI", lambda p: p.study(good_spec(p), "--bogus")),
    Case("tune-no-tune-section", "tune", lambda p: p.tune(good_spec(p)), existing=True),
    Case("tune-space-low-over-high", "tune", bad_tune(tune__space={"optim.lr": {**SPACE_LR, "low": 0.1}})),
    Case("tune-space-not-a-key", "tune", bad_tune(tune__space={"moe.n_experts.x": SPACE_LR}), existing=True),
    Case("tune-space-log-zero", "tune", bad_tune(tune__space={"optim.lr": {**SPACE_LR, "low": 0.0}})),
    Case("tune-space-top-k-edge", "tune", bad_tune(tune__space={"moe.top_k": {"type": "int", "low": 1, "high": 9}})),
    Case("tune-n-trials-zero", "tune", bad_tune("--n-trials", "0"), existing=True),
    Case("tune-unusable-storage", "tune", bad_tune("--storage", "nosuchdb://somewhere/x")),
    Case("tune-n-trials-not-a-number", "tune", bad_tune("--n-trials", "abc"), existing=True),
    Case("report-no-such-database", "report", lambda p: ["report", "nosuch", "--tracking-uri", p.uri]),
    Case("report-dead-server", "report", lambda p: ["report", "nosuch", "--tracking-uri", DEAD_SERVER], max_s=30),
    Case("report-no-such-study", "report", lambda p: ["report", "nosuch", "--tracking-uri", p.uri], existing=True),
    Case("report-out-is-a-file", "report", report_out_is_a_file, existing=True),
    Case("relocate-read-only-store", "store", read_only_relocate, existing=True, as_nobody=True),
    # an edited spec rerun over the existing study's finished cell: refused, never "already done"
    Case("changed-batch-size", "changed spec", changed(base__train__batch_size=4), existing=True),
    Case("changed-token-budget", "changed spec", changed(base__budget__tokens=2000), existing=True),
    Case("changed-cutoffs", "changed spec", changed(base__model__adaptive_cutoffs=[500, 1500]), existing=True),
    Case("changed-eval-interval", "changed spec", changed(base__budget__eval_every_steps=3), existing=True),
    Case("changed-data-file", "changed spec", changed_data, existing=True),
    # knowable before training: refused before anything is written
    Case("batch-beyond-the-split", "before training", bad(base__train__batch_size=10_000_000)),
    Case("eval-batch-beyond-the-split", "before training", bad(base__train__eval_batch_size=100_000), existing=True),
    Case("split-empty", "before training", lambda p: data_copy(p, empty_test_split), existing=True),
    Case("d-model-overflows", "before training", bad(base__model__d_model=10**9)),
    Case("d-model-beyond-memory", "before training", bad(base__model__d_model=60_000), existing=True),
    Case("budget-1e15-tokens", "before training", bad(base__budget__tokens=10**15), max_s=60),
    Case("description-beyond-mlflow", "before training", bad(description="x" * 25_000)),
    Case("param-beyond-mlflow", "before training", bad(base__model__adaptive_cutoffs=list(range(10, 20_000, 10)))),
    Case("checkpoint-dir-without-room", "before training", no_room_for_a_checkpoint, needs_mount=True),
]


def make_template(probe: Probe) -> Path:
    """The existing store: one tiny finished study ("bad", one dense cell), copied into each such case."""
    folder = probe.folder("bad", "_template")
    spec = write_yaml(folder / "template.yaml", tiny_spec(STUDY, ["dense"]))
    store = folder / "mlruns"
    args = ["run-study", str(spec), "--tracking-uri", sqlite_uri(store / "mlflow.db")]
    done = run_harness([*args, "--checkpoint-dir", str(folder / "ck"), "--no-progress"], folder, probe.env())
    if done.code != 0:
        raise RuntimeError(f"the template store did not build (exit {done.code}): {done.stderr[-2000:]}")
    return store


def judge(code: int | None, stderr: str, seconds: float, written: list[str], case: Case) -> list[str]:
    """Why the case failed (empty: it passed)."""
    reasons = []
    if code != 2:
        reasons.append("timed out" if code is None else f"exit code {code}")
    lines = stderr.strip().splitlines()
    if len(lines) != 1:
        shown = " | ".join(one_line(line, 90) for line in lines[:3])
        reasons.append(f"{len(lines)} lines on stderr: {shown}")
    elif len(lines[0]) >= MAX_LINE:
        reasons.append(f"the line has {len(lines[0]):,} characters")
    if written:
        reasons.append(f"wrote {len(written)} path(s): {', '.join(written[:4])}")
    if case.max_s is not None and seconds > case.max_s:
        reasons.append(f"took {seconds:.0f} s (limit {case.max_s:.0f} s)")
    return reasons


def prepare(probe: Probe, case: Case, template: Path) -> tuple[Place, list[str], int | None]:
    """The case's folder, its harness arguments and the user to run as (None: this process's)."""
    place = Place(probe.folder("bad", case.name), probe.data)
    if case.existing:
        shutil.copytree(template, place.database.parent, symlinks=True)
    as_user = None
    if case.as_nobody and os.geteuid() == 0:
        chown_tree(place.folder, NOBODY)  # the case's folder is nobody's; what the case makes read-only is not
        as_user = NOBODY
    args = case.make(place)
    place.env.setdefault("MOE_HARNESS_CACHE", str(place.folder / "cache"))
    return place, args, as_user


def run_case(probe: Probe, case: Case, template: Path) -> CaseResult:
    started = time.monotonic()
    if case.needs_no_cuda and Path("/dev/nvidiactl").exists():
        return CaseResult("bad", case.name, False, "skipped: this machine has an NVIDIA device", counted=False)
    if case.needs_mount and os.geteuid() != 0:
        return CaseResult("bad", case.name, False, "skipped: mounting a tmpfs needs root", counted=False)
    if case.as_nobody and os.geteuid() == 0 and shutil.which("setpriv") is None:
        return CaseResult("bad", case.name, False, "skipped (root): no setpriv to drop privileges", counted=False)
    place, args, as_user = prepare(probe, case, template)
    before = digest(place.folder)
    done = run_harness(args, place.folder, probe.env(**place.env), CASE_TIMEOUT_S, as_user)
    # The tokenised-data cache (keyed by the files' content, valid whatever the case) is no record of a study.
    written = [path for path in changes(before, digest(place.folder)) if not path[1:].startswith("cache")]
    reasons = judge(done.code, done.stderr, done.seconds, written, case)
    detail = f"[{case.kind}{', existing store' if case.existing else ''}{', as nobody' if as_user else ''}] "
    detail += f"exit {done.code}, {done.seconds:.1f} s: {one_line(done.stderr, 200)}"
    restore_permissions(place.folder)
    result = CaseResult("bad", case.name, not reasons, "; ".join(reasons), detail, folder=place.folder)
    result.seconds = time.monotonic() - started
    return result


def restore_permissions(folder: Path) -> None:
    """Give root's probe back full access to a case's folder (to copy it under --keep and remove it)."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(stat.S_IMODE(mode) | (0o700 if path.is_dir() else 0o600))


def run_bad_inputs(probe: Probe, report: Callable[[CaseResult], None]) -> list[CaseResult]:
    template = make_template(probe)
    results = []
    try:
        for case in (c for c in CASES if probe.wants(c.name)):
            result = run_case(probe, case, template)
            report(result)
            results.append(result)
    finally:
        for mount in MOUNTS:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    return results
