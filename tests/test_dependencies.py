"""Cells that start from another cell (``init.source``): custom variant names, the matrix's dependency order, and
one-line errors for an unknown source or a cycle with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config import load_spec
from harness.matrix import expand
from tests.studies import runs_by_variant, tiny_config

UPCYCLE = {
    "name": "up",
    "base": {"budget": {"tokens": 1000}},
    "variants": {"switch_up": {"preset": "switch"}, "dense_long": {"preset": "dense"}},
    "overrides": {"switch_up": {"init": {"source": "dense"}}, "dense_long": {"init": {"source": "dense"}}},
    "matrix": {
        "variants": ["switch_up", "plain", "dense_long", "dense"],
        "seeds": [1, 2],
        "sweep": {"optim.lr": [0.1]},
    },
}


def write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sources_come_first_and_save_their_weights(tmp_path: Path) -> None:
    cells = expand(load_spec(write(tmp_path, UPCYCLE)))
    keys = [c.key for c in cells]
    by_key = {c.key: c for c in cells}
    assert keys[0] == "dense/seed=1/optim.lr=0.1"  # seed-major, each seed's source before its dependents
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)
    assert all(keys.index(c.depends_on) < keys.index(c.key) for c in cells if c.depends_on)
    assert by_key["switch_up/seed=2/optim.lr=0.1"].depends_on == "dense/seed=2/optim.lr=0.1"
    assert by_key["dense_long/seed=1/optim.lr=0.1"].depends_on == "dense/seed=1/optim.lr=0.1"
    assert by_key["plain/seed=1/optim.lr=0.1"].depends_on is None
    assert [c.config.train.save_checkpoint for c in cells] == [c.variant == "dense" for c in cells]
    switch_up = by_key["switch_up/seed=1/optim.lr=0.1"].config
    assert (switch_up.variant, switch_up.preset, switch_up.moe.router, switch_up.model.ffn) == (
        "switch_up",
        "switch",
        "switch",
        "moe",
    )
    assert by_key["plain/seed=1/optim.lr=0.1"].config.model.ffn == "none"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"overrides": {"switch_up": {"init": {"source": "lora"}}}},
            "switch_up: init.source = 'lora' is not a variant",
        ),
        (
            {
                "overrides": {
                    "switch_up": {"init": {"source": "dense_long"}},
                    "dense_long": {"init": {"source": "switch_up"}},
                }
            },
            "init.source forms a cycle: ",
        ),
        ({"overrides": {"dense": {"init": {"source": "dense"}}}}, "init.source forms a cycle: dense -> dense"),
        ({"overrides": {"switch_up": {"init": {"source": "plain"}}}}, "only a dense FFN can be upcycled"),
        (
            {"overrides": {"switch_up": {"init": {"source": "dense"}, "moe": {"d_hidden": 64}}}},
            "experts' width 64 differs from the source FFN's moe.d_hidden=400",
        ),
        ({"variants": {"dense": {"preset": "switch"}}}, "variants.dense: a custom variant needs a new name"),
        ({"overrides": {"mixtral": {}}}, "overrides.mixtral: unknown variant"),
    ],
)
def test_bad_dependencies_are_one_line_errors_with_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, message: str
) -> None:
    path = write(tmp_path, {**UPCYCLE, **change})
    store = tmp_path / "db"
    assert main(["run-study", str(path), "--tracking-uri", f"sqlite:///{store}/mlflow.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err and str(path) in err
    assert not store.exists()


def test_a_dependent_starts_from_its_source_run_or_fails_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tiny_config("up", ["switch_up", "hybrid_up", "dense", "bad"], budget={"tokens": 8 * 16 * 6})
    spec["variants"] = {
        "switch_up": {"preset": "switch"},
        "hybrid_up": {"preset": "hybrid"},
        "bad": {"preset": "dense"},
    }
    spec["overrides"] = {
        "switch_up": {"init": {"source": "dense"}},
        "hybrid_up": {"init": {"source": "bad"}},
        "bad": {"optim": {"name": "sgd", "lr": 1.0e6, "grad_clip": None}},  # diverges: NaN/inf loss
    }
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = ["run-study", str(write(tmp_path, spec)), "--tracking-uri", uri, "--no-progress"]
    assert main([*args, "--checkpoint-dir", str(tmp_path)]) == 1
    assert "2 finished, 0 already done, 2 failed" in capsys.readouterr().out

    client, runs = MlflowClient(uri), runs_by_variant(uri, "up")
    assert runs["switch_up"].info.status == "FINISHED"
    assert runs["switch_up"].data.tags["harness.init.source_run"] == runs["dense"].info.run_id
    # the weights any node fetches
    assert "model.pt" in [a.path for a in client.list_artifacts(runs["dense"].info.run_id)]
    assert runs["hybrid_up"].info.status == "FAILED"
    assert runs["hybrid_up"].data.tags["harness.error"] == "source cell bad/seed=0 failed"
