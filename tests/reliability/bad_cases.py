"""The bad-input cases: each must end with exit code 2, exactly one short non-empty line on stderr, and nothing
written (a fresh case's folder, or an existing store's bytes, exactly as before). Each case builds its input in
its own folder (a ``Place``) and returns the harness's arguments."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tests.reliability.processes import sqlite_uri
from tests.studies import tiny_config, tune_config, with_keys, write_spec

STUDY = "bad"  # the existing store's study: the bad specs name it too
DEAD_SERVER = "http://127.0.0.1:1"


@dataclass
class Place:
    """A case's folder: its spec files, its output folder ``out/`` (store, checkpoints) and environment."""

    folder: Path
    data: Path
    env: dict[str, str] = field(default_factory=dict)  # what the case changes in the harness's environment
    mounts: list[Path] = field(default_factory=list)  # tmpfs mounts to undo when the case ends

    @property
    def database(self) -> Path:
        return self.folder / "out" / "mlruns" / "mlflow.db"

    @property
    def uri(self) -> str:
        return sqlite_uri(self.database)

    def spec(self, content: dict[str, Any] | str | bytes, name: str = "spec.yaml") -> Path:
        path = self.folder / name
        if isinstance(content, dict):
            return write_spec(path, content)
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


def bad(**changes_: Any) -> Callable[[Place], list[str]]:
    """A run-study case: the tiny spec with ``changes_`` (``__`` in a keyword stands for a dot)."""
    dotted = {k.replace("__", "."): v for k, v in changes_.items()}
    return lambda p: p.study(p.spec(with_keys(tiny_config(STUDY, ["baseline"]), dotted)))


def bad_text(text: str | bytes) -> Callable[[Place], list[str]]:
    return lambda p: p.study(p.spec(text))


def bad_tune(*extra: str, **changes_: Any) -> Callable[[Place], list[str]]:
    dotted = {k.replace("__", "."): v for k, v in changes_.items()}
    return lambda p: p.tune(p.spec(with_keys(tune_config(STUDY), dotted)), *extra)


def changed(**changes_: Any) -> Callable[[Place], list[str]]:
    """A rerun of the existing store's study (one dense cell, finished) with ``changes_`` to its spec."""
    dotted = {k.replace("__", "."): v for k, v in changes_.items()}
    return lambda p: p.study(p.spec(with_keys(tiny_config(STUDY, ["dense"]), dotted)))


def no_room_for_a_checkpoint(p: Place) -> list[str]:
    """A 2 MB tmpfs as --checkpoint-dir for a cell whose checkpoints need more (refused before training)."""
    mount = p.subfolder("ck2m")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True, capture_output=True)
    p.mounts.append(mount)
    return p.study(p.spec(tiny_config(STUDY, ["baseline"], budget={"checkpoint_every_steps": 2})), ck=mount)


def read_only(folder: Path) -> Path:
    for path in folder.rglob("*"):
        path.chmod(0o444 if path.is_file() else 0o555)
    folder.chmod(0o555)
    return folder


def read_only_relocate(p: Place) -> list[str]:
    return ["store", "relocate", str(read_only(p.database.parent))]


def report_out_is_a_file(p: Place) -> list[str]:
    (p.folder / "report.md").write_text("an earlier report\n")
    return ["report", STUDY, "--tracking-uri", p.uri, "--out", str(p.folder / "report.md")]


def good_spec(p: Place) -> Path:
    return p.spec(tiny_config(STUDY, ["baseline"]))


def damaged_data(damage: Callable[[Path], None], variant: str = "baseline") -> Callable[[Place], list[str]]:
    """The tiny spec over a copy of the tiny data damaged by ``damage(its wikitext-2-v1 folder)``."""

    def make(p: Place) -> list[str]:
        shutil.copytree(p.data, p.folder / "data")
        damage(p.folder / "data" / "wikitext-2-v1")
        p.env["MOE_HARNESS_DATA"] = str(p.folder / "data")
        return p.study(p.spec(tiny_config(STUDY, [variant])))

    return make


def fewer_lines(path: Path, keep: int | None = -1) -> None:
    lines = pq.read_table(path).column("text").to_pylist()[:keep]
    pq.write_table(pa.table({"text": pa.array(lines, pa.string())}), path)


def validation_one_line_short(folder: Path) -> None:
    fewer_lines(folder / "validation-00000-of-00001.parquet")


def empty_test_split(folder: Path) -> None:
    fewer_lines(folder / "test-00000-of-00001.parquet", keep=0)


def no_text_column(folder: Path) -> None:
    pq.write_table(pa.table({"words": ["a b"] * 10}), folder / "test-00000-of-00001.parquet")


def truncated(folder: Path) -> None:
    train = folder / "train-00000-of-00001.parquet"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])


def custom_variants(variants: dict[str, Any], matrix: list[str], overrides: dict[str, Any]) -> Callable[[Place], Any]:
    def make(p: Place) -> list[str]:
        spec = tiny_config(STUDY, matrix)
        spec.update(variants=variants, overrides=overrides)
        return p.study(p.spec(spec))

    return make


def read_only_store(p: Place) -> list[str]:
    read_only(p.database.parent)
    return p.study(good_spec(p))


def read_only_checkpoints(p: Place) -> list[str]:
    ck = p.subfolder("ro_ck")
    ck.chmod(0o555)
    return p.study(good_spec(p), ck=ck)


def read_only_storage(p: Place) -> list[str]:
    folder = p.subfolder("ro_storage")
    folder.chmod(0o555)
    spec = p.spec(tune_config(STUDY))
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
    Case("parquet-no-text-column", "device/data", damaged_data(no_text_column)),
    Case("parquet-truncated", "device/data", damaged_data(truncated), existing=True),
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
    Case("changed-data-file", "changed spec", damaged_data(validation_one_line_short, "dense"), existing=True),
    # knowable before training: refused before anything is written
    Case("batch-beyond-the-split", "before training", bad(base__train__batch_size=10_000_000)),
    Case("eval-batch-beyond-the-split", "before training", bad(base__train__eval_batch_size=100_000), existing=True),
    Case("split-empty", "before training", damaged_data(empty_test_split), existing=True),
    Case("d-model-overflows", "before training", bad(base__model__d_model=10**9)),
    Case("d-model-beyond-memory", "before training", bad(base__model__d_model=60_000), existing=True),
    Case("budget-1e15-tokens", "before training", bad(base__budget__tokens=10**15), max_s=60),
    Case("description-beyond-mlflow", "before training", bad(description="x" * 25_000)),
    Case("param-beyond-mlflow", "before training", bad(base__model__adaptive_cutoffs=list(range(10, 20_000, 10)))),
    Case("checkpoint-dir-without-room", "before training", no_room_for_a_checkpoint, needs_mount=True),
]
