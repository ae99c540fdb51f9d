"""The README stays true: its key table is the schema's, its minimal spec loads, its script runs, and the public
names of ``harness`` load lazily."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import harness
from harness.config import load_spec, resolve_matrix
from harness.spec_keys import README, key_table, with_table
from tests.studies import tiny_config, write_spec


def code_block(section: str, language: str) -> str:
    """The first ``language`` code block under the README's ``## section`` heading."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    found = re.compile(rf"```{language}\n(.*?)```", re.DOTALL).search(text, start)
    assert found is not None, f"no {language} block under '## {section}'"
    return found.group(1)


def test_the_key_table_is_the_schema_s() -> None:
    readme = README.read_text()
    stale = "the README's key table differs from the schema: python -m harness.spec_keys --write"
    assert readme == with_table(readme, key_table()), stale


def test_the_key_table_names_every_section_and_the_keys_it_once_missed() -> None:
    keys = set(re.findall(r"^\| `([^`]+)`", key_table(), re.MULTILINE))
    sections = {key.split(".")[0] for key in keys}
    assert sections == {"init", "data", "model", "moe", "optim", "budget", "train", "variants", "matrix", "tune"} | {
        "design",
        "resources",
    }
    assert {"model.ffn", "model.max_len", "moe.kernel", "tune.space.<key>.type", "design.reference"} <= keys


def test_the_minimal_spec_loads(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_HARNESS_DATA", str(shared_data))  # the real data, as a reader would have it
    path = tmp_path / "first.yaml"
    path.write_text(code_block("A complete minimal spec", "yaml"))
    spec = load_spec(path)
    trials = resolve_matrix(spec)
    assert spec.name == "first" and len(trials) == 6
    assert all((trial.config.data.root() / trial.config.data.name).is_dir() for trial in trials)


def test_the_scripting_example_runs_a_study_and_writes_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the example's relative paths: studies/, mlruns/, reports/
    write_spec(tmp_path / "studies" / "tiny.yaml", tiny_config("tiny", ["dense"]))
    namespace: dict[str, object] = {}
    exec(compile(code_block("Scripting a study", "python"), "README.md", "exec"), namespace)  # noqa: S102
    outcome = namespace["outcome"]
    assert outcome.finished == ["dense/seed=0"] and outcome.failed == {}, capsys.readouterr().out
    assert (tmp_path / "reports" / "tiny" / "report.md").is_file()


def test_the_public_names_load_on_first_use() -> None:
    probe = "import json, sys, harness; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in HEAVY)))"
    heavy = "HEAVY = ('harness', 'models', 'torch', 'mlflow', 'pydantic'); "
    loaded = subprocess.run([sys.executable, "-c", heavy + probe], capture_output=True, check=True).stdout
    assert json.loads(loaded) == ["harness"]
    assert [getattr(harness, name).__name__ for name in harness.__all__] == harness.__all__
    assert set(harness.__all__) <= set(dir(harness))
