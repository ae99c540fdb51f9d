"""``harness report`` on real tiny studies: what the Markdown and the PDF say, checked against MLflow itself."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from pypdf import PdfReader
from scipy import stats

from harness.cli import main
from harness.config import load_spec
from harness.report.blocks import Block, Heading, Table
from harness.report.document import build_document
from harness.report.gather import load_study
from harness.report.render import table_markdown
from harness.report.statistics import analyse, summarise
from harness.study.rounds import StudyDesign
from harness.tags import DESIGN, HEALTH
from tests.conftest import harness_environment
from tests.studies import run_study, tiny_spec, trial_runs


def pdf_text(path: Path) -> list[str]:
    return [page.extract_text() for page in PdfReader(path).pages]


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, shared_cache: Path) -> tuple[str, Path]:
    """Two MoE variants x two seeds plus dense on one seed (too few to test), then ``harness report`` on it."""
    folder = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    with harness_environment(tiny_data, shared_cache):
        spec = tiny_spec(folder, "rep", ["baseline", "switch"], [0, 1])
        assert run_study(folder, spec, uri) == 0
        assert run_study(folder, tiny_spec(folder, "rep", ["dense"], [0]), uri) == 0
        # 1,500 tokens of tiny data never leave the unigram plateau, so every trial is judged stalled and the report
        # would rank none; these tests check the tables' arithmetic, so the runs pass as healthy here.
        client = MlflowClient(uri)
        for run in client.search_runs([client.get_experiment_by_name("rep").experiment_id]):
            client.set_tag(run.info.run_id, HEALTH, "ok")
            if run.data.tags.get("harness.role") == "study":  # the last spec recorded its design; one for all three
                whole = load_spec(tiny_spec(folder / "whole", "rep", ["baseline", "switch", "dense"], [0, 1]))
                client.set_tag(run.info.run_id, DESIGN, StudyDesign.of(whole).tag())
        assert main(["report", str(spec), "--tracking-uri", uri, "--out", str(folder / "out")]) == 0
    return uri, folder / "out"


@pytest.fixture(scope="module")
def failed_single_seed(
    tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, shared_cache: Path
) -> tuple[str, Path]:
    """One seed; switch diverges (absurd learning rate, no clipping) so the trainer raises NonFiniteLoss.

    Run with ``run-study --report`` from a scratch working directory: the report lands in reports/<study>/.
    """
    folder = tmp_path_factory.mktemp("failed")
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    with harness_environment(tiny_data, shared_cache) as patch:
        patch.chdir(folder)
        overrides = {"switch": {"optim": {"lr": 1.0e30, "grad_clip": None}}}
        spec = tiny_spec(folder, "onefail", ["baseline", "switch"], [0], overrides)
        assert run_study(folder, spec, uri, "--report") == 1  # a failed trial: exit 1, report still written
    return uri, folder / "reports" / "onefail"


def document(uri: str, study: str) -> list[Block]:
    """The blocks ``harness report`` lays out for ``study`` (without its figures)."""
    data = load_study(study, uri)
    return build_document(data, analyse(data), [], generated=datetime.now(UTC))


def tables(doc: list[Block], title: str | None = None) -> list[Table]:
    """The tables of the section headed ``## title`` (every table without a title), in order."""
    if title is not None:
        start = next(i for i, b in enumerate(doc) if isinstance(b, Heading) and b.level == 2 and b.text == title)
        later = (i for i, b in enumerate(doc) if i > start and isinstance(b, Heading) and b.level <= 2)
        doc = doc[start : next(later, len(doc))]
    return [block for block in doc if isinstance(block, Table)]


def records(table: Table) -> list[dict[str, str]]:
    """The table's rows as {header: cell}."""
    return [dict(zip(table.header, row, strict=True)) for row in table.rows]


def row(table: Table, first: str) -> dict[str, str]:
    """The row whose first cell is ``first`` as {header: cell}."""
    (found,) = [record for record in records(table) if record[table.header[0]] == first]
    return found


def is_bold(table: Table, first: str, column: str) -> bool:
    index = next(i for i, r in enumerate(table.rows) if r[0] == first)
    return (index, table.header.index(column)) in table.bold


@pytest.fixture(scope="module")
def study_document(study: tuple[str, Path]) -> list[Block]:
    return document(study[0], "rep")


@pytest.mark.slow
def test_markdown_references_only_figures_that_exist(study: tuple[str, Path]) -> None:
    _, out = study
    markdown = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(figures) >= 4
    for name in figures:
        assert (out / name).is_file() and (out / name).stat().st_size > 5000, name
    assert {p.name for p in out.glob("*.png")} == set(figures)  # no stale or unreferenced figure either


@pytest.mark.slow
def test_table_mean_sd_and_ci_match_values_computed_from_mlflow(
    study: tuple[str, Path], study_document: list[Block]
) -> None:
    uri, out = study
    runs = trial_runs(uri, "rep")
    pdf = squash("".join(pdf_text(out / "report.pdf")))
    quality = tables(study_document, "Main comparison")[0]
    assert table_markdown(quality) in (out / "report.md").read_text()  # the report shows these very blocks
    for variant, rows in runs[runs["tags.variant"] != "dense"].groupby("tags.variant"):
        cells = row(quality, variant)
        for metric, column in [("final_val_ppl", "Val PPL"), ("test_ppl", "Test PPL")]:
            values = rows[f"metrics.{metric}"]
            expected = f"{values.mean():,.2f} ± {values.std(ddof=1):,.2f}"
            assert cells[f"{column} (mean ± sd)"] == expected, (variant, metric)
            low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
            assert cells[f"{column} 95% CI"] == f"[{low:,.2f}, {high:,.2f}]"
            assert squash(expected) in pdf
        assert cells["n"] == str(len(rows)) == "2"


@pytest.mark.slow
def test_best_value_per_column_is_marked(study: tuple[str, Path], study_document: list[Block]) -> None:
    uri, out = study
    runs = trial_runs(uri, "rep")
    quality, cost = tables(study_document, "Main comparison")
    best = runs.groupby("tags.variant")["metrics.test_ppl"].mean().idxmin()
    assert is_bold(quality, best, "Test PPL (mean ± sd)")
    fastest = runs.groupby("tags.variant")["metrics.train_tokens_per_s"].mean().idxmax()
    assert is_bold(cost, fastest, "Tokens / s")
    assert f"| **{row(cost, fastest)['Tokens / s']}** |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_decisions_are_paired_by_seed_and_read_off_their_intervals(study: tuple[str, Path]) -> None:
    uri, _ = study
    runs = trial_runs(uri, "rep").sort_values("tags.seed")
    loss = {v: runs[runs["tags.variant"] == v]["metrics.test_loss"].to_numpy() for v in ("baseline", "switch")}
    x = loss["switch"] - loss["baseline"]
    alpha = 0.05 / 2  # switch and dense against baseline: Bonferroni
    doc = document(uri, "rep")
    (look,) = [r for r in records(tables(doc, "Design and decisions")[0]) if r["variant"] == "switch"]
    assert look["paired seeds"] == "2" and look["PPL ratio"] == f"{math.exp(x.mean()):.3f}"
    half = stats.t.isf(alpha / 2, 1) * x.std(ddof=1) / math.sqrt(2)  # a fixed design: one look, the t quantile
    assert look["difference interval"] == f"{math.exp(x.mean() - half):.3f}–{math.exp(x.mean() + half):.3f}"
    verdict = tables(doc, "Verdict against the reference")[0]
    assert row(verdict, "dense")["Test PPL decisions"] == "no look yet"  # its seed 1 never ran: open


@pytest.mark.slow
def test_header_records_study_data_matrix_counts_and_compute(
    study: tuple[str, Path], study_document: list[Block]
) -> None:
    uri, out = study
    markdown = (out / "report.md").read_text()
    runs = trial_runs(uri, "rep")
    assert "# Study report: rep" in markdown
    commit = runs["tags.git_commit"].iloc[0]
    one = f"**Made at commit** {commit} **by** `harness run-study"
    assert (one in markdown) if not commit.endswith("-dirty") else f"its trials ran at {commit}" in markdown
    assert "cpu:" in markdown
    first = runs.iloc[0]
    assert f"train {int(first['tags.data.train_tokens']):,}" in markdown
    assert f"vocabulary {int(first['tags.data.vocab_size']):,}" in markdown
    assert "variants baseline, switch, dense × seeds 0, 1" in markdown
    assert "finished 5, failed 0" in markdown
    assert "None: all 5 trials finished." in markdown
    quality, cost = (row(table, "dense") for table in tables(study_document, "Main comparison"))
    dense_val = runs[runs["tags.variant"] == "dense"]["metrics.final_val_ppl"].iloc[0]
    assert quality["n"] == "1" and quality["Val PPL (mean ± sd)"] == f"{dense_val:,.2f}"
    assert cost["Aux loss"] == cost["Load CV"] == "–"  # no router: no aux loss, no load CV


@pytest.mark.slow
def test_pdf_is_a4_with_numbered_pages_tables_and_images(study: tuple[str, Path]) -> None:
    _, out = study
    reader = PdfReader(out / "report.pdf")
    pages = reader.pages
    texts = pdf_text(out / "report.pdf")
    total = int(re.search(r"page 1 of (\d+)", texts[0]).group(1))
    assert len(pages) == total >= 2
    for number, (page, text) in enumerate(zip(pages, texts, strict=True), 1):
        assert f"page {number} of {total}" in text
        width, height = float(page.mediabox.width), float(page.mediabox.height)
        assert abs(width - 595.3) < 1 and abs(height - 841.9) < 1  # A4 portrait in points
    joined = "\n".join(texts)
    for text in ["Main comparison", "Val PPL (mean ± sd)", "Time / Mtok (s)", "Design and decisions", "Failed trials"]:
        assert squash(text) in squash(joined), text
    markdown = (out / "report.md").read_text()
    assert sum(len(page.images) for page in pages) == len(re.findall(r"!\[", markdown))


@pytest.mark.slow
def test_report_is_logged_to_the_study_parent_run(study: tuple[str, Path]) -> None:
    uri, _ = study
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("rep")
    parent = client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'study'")[0]
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report.md", "report.pdf", "val_ppl_vs_tokens.png", "verdict.png"} <= logged
    assert "verdict.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}  # the headline, at the root
    description = parent.data.tags["mlflow.note.content"]  # the run page shows its first lines: the answers
    assert description.startswith("- **switch: ") and "## Verdict against the reference" in description
    assert "`report/report.pdf`" in description


@pytest.mark.slow
def test_failed_trial_and_single_seed_render_with_the_right_statements(failed_single_seed: tuple[str, Path]) -> None:
    uri, out = failed_single_seed
    runs = trial_runs(uri, "onefail")
    assert set(runs["status"]) == {"FINISHED", "FAILED"}
    markdown = (out / "report.md").read_text()
    assert "Fewer than two variants to compare." in markdown
    assert "finished 1, failed 1" in markdown
    failed = markdown.split("## Failed trials", 1)[1]
    assert "switch/seed=0" in failed and "FAILED" in failed and "NonFiniteLoss" in failed
    doc = document(uri, "onefail")
    failed_rows = records(tables(doc, "Failed trials")[0])
    assert [(r["Trial"], r["Status"]) for r in failed_rows] == [("switch/seed=0", "FAILED")]
    assert not [r for table in tables(doc) for r in records(table) if r[table.header[0]] == "switch"]  # no numbers
    text = squash("".join(pdf_text(out / "report.pdf")))
    assert squash("Fewer than two variants to compare") in text and "NonFiniteLoss" in text
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (out / name).is_file()


@pytest.mark.slow
def test_tuning_study_adds_optuna_history_importances_and_pareto_front(tmp_path: Path, tiny_data: Path) -> None:
    import optuna

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert run_study(tmp_path, tiny_spec(tmp_path, "tuned", ["baseline"], [0]), uri) == 0
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tuned = optuna.create_study(
        study_name="tuned-optuna",
        storage=storage,
        directions=["minimize", "minimize"],
        sampler=optuna.samplers.RandomSampler(0),
    )
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        tuned.set_metric_names(["val_ppl", "time_per_mtok_s"])

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        lr, width = trial.suggest_float("lr", 1e-4, 1e-1, log=True), trial.suggest_int("d_hidden", 16, 128)
        return 100 + 10 * abs(math.log10(lr) + 2.5) - width / 10, width * 0.5 + lr

    tuned.optimize(objective, n_trials=12)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tuned")
    client.create_run(
        experiment.experiment_id,
        run_name="tune",
        tags={"harness.role": "tune", "optuna.storage": storage, "optuna.study_name": "tuned-optuna"},
    )
    out = tmp_path / "out"
    assert main(["report", "tuned", "--tracking-uri", uri, "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    for name in ["tuning_history.png", "tuning_importances.png", "tuning_pareto.png"]:
        assert f"]({name})" in markdown and (out / name).is_file(), name
    assert "## Hyperparameter tuning" in markdown and "tuned-optuna" in markdown
    assert "Pareto-optimal trials" in markdown
    assert squash("Hyperparameter tuning") in squash("".join(pdf_text(out / "report.pdf")))

    # As ``harness tune`` leaves it: only tuning trials (role tune-trial), one of them pruned; no study parent.
    trial = trial_runs(uri, "tuned").iloc[0]
    for key, value in {
        "harness.role": "tune-trial",
        "optuna.state": "PRUNED",
        "harness.pruned": "pruned at step 4",
    }.items():
        client.set_tag(trial["run_id"], key, value)
    client.set_terminated(trial["run_id"], "KILLED")
    client.delete_run(trial["tags.mlflow.parentRunId"])
    assert main(["report", "tuned", "--tracking-uri", uri, "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "holds only tuning trials (1)" in markdown and "## Main comparison" not in markdown
    assert "pruned 1" in markdown
    failed = records(tables(document(uri, "tuned"), "Failed trials")[0])
    assert [(r["Status"], r["Error"]) for r in failed] == [("PRUNED", "pruned at step 4")]
    assert {p.name for p in out.glob("*.png")} == set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown))


def test_descriptive_summaries_over_seeds() -> None:
    single = summarise([5.0])
    assert single.n == 1 and single.mean == 5.0 and math.isnan(single.sd) and math.isnan(single.ci_low)
    summary = summarise([10.0, 12.0, 11.5])
    expected = stats.t.interval(0.95, 2, loc=np.mean([10.0, 12.0, 11.5]), scale=stats.sem([10.0, 12.0, 11.5]))
    assert (summary.ci_low, summary.ci_high) == pytest.approx(expected, rel=1e-12)
    constant = summarise([5.0, 5.0])  # no spread: a point interval, not scipy's nan for a zero scale
    assert (constant.sd, constant.ci_low, constant.ci_high) == (0.0, 5.0, 5.0)
