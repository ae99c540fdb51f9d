"""The report's claims: the design's decisions on intervals that can be checked by hand, one statement in the
verdict table, the decisions section and verdicts.json, compute matching, and flagged trials named, never ranked."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from scipy import stats

from harness.config import SpecError, TrialConfig, load_spec, reference_variant, resolve_trial
from harness.metric_names import TRAIN_LOSS, VAL_SUBSET_PPL
from harness.report import write_report
from harness.report.blocks import Block
from harness.report.findings import verdict_section
from harness.report.gather import StudyData
from harness.report.overview import flag_note
from harness.report.statistics import analyse, matched_points, ppl_at, results_of, verdicts
from harness.study.rounds import StudyDesign, decision_tag
from harness.tags import DESIGN, HEALTH, HEALTH_EVIDENCE, PARENT, ROLE, ROLE_STUDY, ROLE_TRIAL
from tests.conftest import harness_environment
from tests.studies import tiny_spec
from tests.test_report import document, records, row, tables

BASE = {"0": 100.0, "1": 104.0, "2": 101.0}
CLOSE = {"0": 101.0, "1": 104.5, "2": 102.5}


def test_interpolation_is_linear_in_log_ppl_and_matches_at_the_smallest_total() -> None:
    x, ppl = np.array([0.0, 10.0, 20.0]), np.exp([5.0, 4.0, 3.0])
    assert ppl_at(x, ppl, 15.0) == pytest.approx(math.exp(3.5))
    assert math.isnan(ppl_at(x, ppl, 25.0)) and math.isnan(ppl_at(x, ppl, -1.0))
    curves = pd.DataFrame(
        {"run_id": ["a"] * 3 + ["b"] * 2, "t": [0.0, 10.0, 20.0, 0.0, 16.0], "val_ppl": [*ppl, 100.0, 50.0]}
    )
    budget, points = matched_points(curves, "t")
    assert budget == 16.0  # run b stopped there
    assert points["a"] == pytest.approx(math.exp(4.0 - 0.6)) and points["b"] == pytest.approx(50.0)


def _trial(client: MlflowClient, eid: str, parent: str, config: TrialConfig, test_ppl: float, health: str | None):
    """A finished trial run as the trainer records it: tags, summary, curves, gradient norms, config.yaml."""
    tags = {ROLE: ROLE_TRIAL, PARENT: parent, "variant": config.variant, "seed": str(config.seed), "backbone": "lstm"}
    if health is not None:
        tags |= {HEALTH: health, HEALTH_EVIDENCE: f"train loss {test_ppl:.0f} evidence"}
    run_id = client.create_run(eid, tags=tags).info.run_id
    speed = 1000.0 if config.variant == "baseline" else 500.0  # switch: half the speed
    metrics = [Metric("test_ppl", test_ppl, 0, 0), Metric("test_loss", math.log(test_ppl), 0, 0)]
    metrics += [Metric("final_val_ppl", test_ppl, 0, 0)]
    jitter = 1 + 0.01 * config.seed if config.variant == "switch" else 1.0  # switch: 2.00-2.04x baseline's time
    metrics += [Metric("time_per_mtok_s", 1e6 / speed * jitter, 0, 0)]
    metrics += [Metric("params_total", 1000.0 if config.variant == "baseline" else 900.0, 0, 0)]
    metrics += [Metric("health_unigram_loss", 7.0, 0, 0), Metric("health_clip_fraction", 0.5, 0, 0)]
    metrics += [Metric(f"health_train_loss_{p}pct", loss, 0, 0) for p, loss in ((25, 6.5), (50, 6.25), (100, 6.0))]
    for step in (10, 20, 30, 40):
        metrics += [Metric("tokens", step * 100.0, 0, step), Metric("tokens_per_s", speed, 0, step)]
        metrics += [Metric(VAL_SUBSET_PPL, test_ppl * 40 / step, 0, step), Metric(TRAIN_LOSS, 6.0, 0, step)]
        metrics += [Metric(f"grad_norm_{c}", 0.1 * step, 0, step) for c in ("backbone", "router", "head", "total")]
    client.log_batch(run_id, metrics=metrics)
    client.log_text(run_id, yaml.safe_dump(config.model_dump(mode="json")), "config.yaml")
    client.set_terminated(run_id, "FINISHED")


# A comparison whose seeds are still to come: nothing about its PPL or speed is decided, only its size.
OPEN_BUT_SMALLER = {
    "difference": "open",
    "non_inferiority": "open",
    "smaller": "yes",
    "no_loss": "undecided",
    "faster": "undecided",
    "answer": "undecided",
}
DESIGN_OF_CLAIMS = StudyDesign(
    initial=[0, 1, 2],
    max=3,
    sequential=False,
    alpha=0.05,
    spending="obrien_fleming",
    margin=0.1,
    questions=["difference", "non_inferiority"],
    min_param_reduction=0.05,
    min_speedup=0.05,
    reference="baseline",
    variants=["baseline", "switch", "lora", "hybrid"],
)


@pytest.fixture(scope="module")
def flagged_study(
    tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, shared_cache: Path
) -> tuple[Path, list[Block]]:
    """baseline and switch healthy over 3 seeds, hybrid stalled in both of its seeds, lora from an older store;
    the paired speed measurement has switch at twice baseline's time. Made once: its tests only read the report."""
    tmp_path = tmp_path_factory.mktemp("claims")
    tracking_uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    with harness_environment(tiny_data, shared_cache):
        spec = load_spec(tiny_spec(tmp_path, "claims", ["baseline"], [0]))
        client = MlflowClient(tracking_uri)
        eid = client.create_experiment("claims")
        parent = client.create_run(eid, tags={ROLE: ROLE_STUDY, DESIGN: DESIGN_OF_CLAIMS.tag()}).info.run_id
        speed = {"baseline": [1000.0, 1010.0, 990.0, 1005.0], "switch": [2000.0, 2030.0, 1990.0, 2000.0]}
        record = {"rounds": 4, "steps": 10, "warmup": 10, "threads": 1, "device": "cpu", "seconds_per_mtok": speed}
        client.log_dict(parent, record, "speed.json")
        client.set_terminated(parent, "FINISHED")
        values = {"baseline": BASE, "switch": CLOSE, "hybrid": {"0": 1030.0, "1": 1040.0}, "lora": {"0": 99.0}}
        health = {"baseline": "ok", "switch": "ok", "hybrid": "stalled", "lora": None}
        for variant, by_seed in values.items():
            for seed, ppl in by_seed.items():
                _trial(client, eid, parent, resolve_trial(spec, variant, int(seed)), ppl, health[variant])
        out = write_report("claims", tracking_uri, tmp_path / "out", log_artifacts=False)
        return out, document(tracking_uri, "claims")


def test_the_verdict_answers_each_healthy_variant_and_verdicts_json_holds_the_decisions(
    flagged_study: tuple[Path, list[Block]],
) -> None:
    out, doc = flagged_study
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert (
        verdicts["health"]["hybrid seed 0 (lstm)"] == "stalled" and verdicts["health"]["baseline seed 2 (lstm)"] == "ok"
    )
    answers = verdicts["answers"]["lstm"]
    assert answers["reference"] == "baseline" and "hybrid" not in answers["variants"]  # stalled: no verdict
    # switch: 0.9x the parameters, within the design's 10% margin (no difference shown at 3 seeds), twice as slow
    assert answers["variants"]["switch"] == {
        "difference": "undecided@3",
        "non_inferiority": "non-inferior@3",
        "smaller": "yes",
        "no_loss": "yes",
        "faster": "no",
        "answer": "no",
    }
    # lora: one seed of three (its others never ran), not in the speed measurement: only its size is decided
    assert answers["variants"]["lora"] == OPEN_BUT_SMALLER
    switch = row(tables(doc, "Verdict against the reference")[0], "switch")
    assert (
        switch["Params ratio"] == "0.900"
        and switch["Test PPL decisions"] == "no difference shown, within the 10% margin"
    )
    assert switch["Smaller / no loss / faster"] == "yes / yes / no" and switch["Answer"] == "**no**"
    assert switch["Time / token ratio (paired)"].startswith("2.00")
    # one interval, stated twice: the verdict's margin interval is the decisions table's at the deciding look
    look = [r for r in records(tables(doc, "Design and decisions")[0]) if r["variant"] == "switch"][-1]
    assert switch["Test PPL ratio (margin interval)"] == f"{look['PPL ratio']} ({look['margin interval']})"
    assert verdicts["commits"] == [] and verdicts["design"]["margin"] == 0.1
    assert (
        "**Incomplete study:**" in (out / "report.md").read_text()
        and "comparisons still open: lora" in (out / "report.md").read_text()
    )


def test_flagged_trials_are_named_and_left_out_of_rankings_and_tests(flagged_study: tuple[Path, list[Block]]) -> None:
    out, doc = flagged_study
    markdown = (out / "report.md").read_text()
    health = markdown.split("\n## Training health\n", 1)[1].split("\n## ", 1)[0]
    assert "Flagged: hybrid seed 0 (stalled), hybrid seed 1 (stalled)" in health
    assert "![Gradient norm per component](grad_norms.png)" in health
    (table,) = tables(doc, "Training health")
    assert row(table, "hybrid seed 0") == {
        "Trial": "hybrid seed 0",
        "Health": "stalled",
        "Train loss 25%": "6.500",
        "Train loss 50%": "6.250",
        "Train loss 100%": "6.000",
        "Unigram loss": "7.000",
        "Clip fraction": "0.50",
        "Grad norm": "4.000",
        "Evidence": "train loss 1030 evidence",
    }
    assert row(table, "lora seed 0")["Health"] == "unknown"
    ranked = [r[t.header[0]] for t in tables(doc) if t is not table for r in records(t)]
    assert "hybrid" not in ranked and "baseline" in ranked  # in no table but Training health
    rest = markdown.split("## Main comparison", 1)[1]
    # the main comparison's two tables and the compute-matched one each say so (the verdict says it above)
    assert rest.count("flagged in Training health:** hybrid seed 0 (stalled), hybrid seed 1 (stalled)") == 2
    decisions = markdown.split("## Design and decisions", 1)[1].split("\n## ", 1)[0]
    assert "| hybrid" not in decisions and "hybrid seed 0, hybrid seed 1" in decisions  # counted as no seed


def test_the_margin_interval_and_compute_matched_table_carry_their_figures(
    flagged_study: tuple[Path, list[Block]],
) -> None:
    out, doc = flagged_study
    x = np.log(list(CLOSE.values())) - np.log(list(BASE.values()))
    alpha = 0.05 / 3  # three comparisons with baseline: Bonferroni
    half = stats.t.isf(alpha, 2) * x.std(ddof=1) / math.sqrt(3)  # one look: the one-sided t quantile
    look = [r for r in records(tables(doc, "Design and decisions")[0]) if r["variant"] == "switch"][-1]
    assert look["margin interval"] == f"{math.exp(x.mean() - half):.3f}–{math.exp(x.mean() + half):.3f}"
    assert "margin 10%" in (out / "report.md").read_text()
    # baseline reached 4,000 tokens in 4 s, switch in 8 s: at 4 s switch has seen 2,000 tokens (step 20).
    switch = row(tables(doc, "Compute-matched comparison")[0], "switch")
    expected = np.array(list(CLOSE.values())) * 40 / 20
    assert switch["Val PPL at 0 min 04 s"] == f"{expected.mean():,.2f} ± {expected.std(ddof=1):,.2f}"
    assert (out / "grad_norms.png").stat().st_size > 5000


def test_design_keys_are_validated_and_the_old_report_section_is_named(tmp_path: Path) -> None:
    spec = yaml.safe_load(tiny_spec(tmp_path, "margin", ["baseline"], [0]).read_text())
    assert load_spec(tiny_spec(tmp_path, "margin", ["baseline"], [0])).design.margin == 0.05
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec | {"design": {"margin": 1.5}}))
    with pytest.raises(SpecError, match=r"design\.margin.*1\.5"):
        load_spec(path)
    path.write_text(yaml.safe_dump(spec | {"design": {"questions": ["difference", "superiority"]}}))
    with pytest.raises(SpecError, match=r"design\.questions"):
        load_spec(path)
    path.write_text(yaml.safe_dump(spec | {"report": {"equivalence_margin": 0.1}}))
    with pytest.raises(SpecError, match=r"design section"):
        load_spec(path)


def test_reference_is_a_validated_spec_key_and_chosen_over_baseline(tmp_path: Path) -> None:
    spec = yaml.safe_load(tiny_spec(tmp_path, "ref", ["baseline", "dense"], [0]).read_text())
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(spec | {"design": {"reference": "dense"}}))
    assert load_spec(path).design.reference == "dense"
    path.write_text(yaml.safe_dump(spec | {"design": {"reference": "switch"}}))
    with pytest.raises(SpecError, match=r"design\.reference = 'switch': not a variant of the matrix"):
        load_spec(path)
    assert reference_variant(["baseline", "dense"], "dense") == "dense"
    assert reference_variant(["baseline", "dense"], None) == "baseline"
    assert reference_variant(["switch", "dense"], None) == "switch"


def synthetic_runs(rng: np.random.Generator, variants: list[str], seeds: list[int]) -> pd.DataFrame:
    """Finished trial rows of a random study: per-variant offsets up to 6%, seed noise 1-3%, some untrained."""
    offsets, noise, rows = {v: rng.uniform(-0.06, 0.06) for v in variants}, rng.uniform(0.01, 0.03), []
    for variant in variants:
        for seed in seeds:
            loss = 5.0 + offsets[variant] + rng.normal(0, noise)
            health = "stalled" if rng.random() < 0.05 else "ok"
            rows.append(
                {
                    "run_id": f"{variant}-{seed}",
                    "status": "FINISHED",
                    "tags.backbone": "lstm",
                    "tags.variant": variant,
                    "tags.seed": str(seed),
                    f"tags.{HEALTH}": health,
                    "metrics.test_loss": loss,
                    "metrics.test_ppl": math.exp(loss),
                    "metrics.params_total": 1000.0,
                }
            )
    return pd.DataFrame(rows)


def test_property_the_runner_the_verdict_table_and_verdicts_json_state_the_same_decisions() -> None:
    rng = np.random.default_rng(11)
    variants = ["baseline", "switch", "lora", "hybrid"]
    for sequential in (False, True):
        for _ in range(25):
            study = dataclasses.replace(
                DESIGN_OF_CLAIMS,
                variants=variants,
                sequential=sequential,
                initial=[1, 2, 3],
                max=5 if sequential else 3,
                margin=0.03,
            )
            runs = synthetic_runs(rng, variants, study.seeds())
            data = StudyData("s", "0", None, runs)
            data.design = study
            runner = decision_tag(study.plan(results_of(runs)))  # what run-study tags on the study run
            tests = analyse(data)
            answers = verdicts(data, tests)["answers"]["lstm"]["variants"]
            stated = ",".join(f"{v}:{a['difference']}/{a['non_inferiority']}" for v, a in answers.items())
            assert stated == runner
            (table,) = tables(verdict_section(data, tests), "Verdict against the reference")
            for variant, a in answers.items():
                words = row(table, variant)["Test PPL decisions"]
                assert words.startswith(("worse", "better", "no difference shown", "too few"))
                assert ("worse by" in words) == a["difference"].startswith("worse")
                assert ("within the 3% margin" in words) == a["non_inferiority"].startswith("non-inferior")


def test_collapsed_trials_stay_ranked_with_a_note_untrained_ones_are_left_out() -> None:
    verdicts = ["ok", "collapsed", "stalled", "collapsed,unstable", None]
    runs = pd.DataFrame(
        {
            "status": "FINISHED",
            "tags.backbone": "lstm",
            "tags.variant": ["baseline", "switch", "hybrid", "lora", "dense"],
            "tags.seed": "1",
            f"tags.{HEALTH}": verdicts,
        }
    )
    data = StudyData("s", "0", None, runs)
    assert list(data.judged["tags.variant"]) == ["baseline", "switch", "dense"]
    notes = " ".join(block.text for block in flag_note(data, "lstm", "this table"))
    assert "Left out of this table, flagged in Training health:** hybrid seed 1 (stalled), lora seed 1" in notes
    assert "Included in this table with collapsed routing (Training health):** switch seed 1 (collapsed)" in notes


def test_an_unfinished_sequential_study_says_so_decides_nothing_open_and_is_not_logged(
    tmp_path: Path, tracking_uri: str
) -> None:
    """Issue 34: a driver killed between rounds left the study run RUNNING after two of up to five seeds."""
    spec = load_spec(tiny_spec(tmp_path, "seqt", ["baseline"], [0]))
    client = MlflowClient(tracking_uri)
    eid = client.create_experiment("seqt")
    design = dataclasses.replace(
        DESIGN_OF_CLAIMS, initial=[1, 2], max=5, sequential=True, variants=["baseline", "switch"]
    )
    parent = client.create_run(eid, tags={ROLE: ROLE_STUDY, DESIGN: design.tag()}).info.run_id
    for variant, ppl in (("baseline", {1: 100.0, 2: 104.0}), ("switch", {1: 101.0, 2: 104.5})):
        for seed, value in ppl.items():
            _trial(client, eid, parent, resolve_trial(spec, variant, seed), value, "ok")
    out = write_report("seqt", tracking_uri, tmp_path / "out")
    markdown = (out / "report.md").read_text()
    assert "**Incomplete study:** the study run is RUNNING" in markdown and "comparisons still open: switch" in markdown
    assert json.loads((out / "verdicts.json").read_text())["answers"]["lstm"]["variants"]["switch"] == OPEN_BUT_SMALLER
    looks = records(tables(document(tracking_uri, "seqt"), "Design and decisions")[0])
    assert [(r["variant"], r["paired seeds"]) for r in looks] == [("switch", "2")]  # the look taken so far
    assert client.list_artifacts(parent) == []  # nothing written into a run its driver may still write
