"""The report's claims: TOST / Holm / power equal statsmodels' own figures, compute matching interpolates, and
trials flagged in Training health (logged into a real MLflow store here) are named and left out of rankings."""

from __future__ import annotations

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
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

from harness.config import SpecError, TrialConfig, load_spec, reference_variant, resolve_trial
from harness.metric_names import TRAIN_LOSS, VAL_SUBSET_PPL
from harness.report import write_report
from harness.report.blocks import Block
from harness.report.gather import StudyData
from harness.report.overview import flag_note
from harness.report.statistics import (
    Comparison,
    compare,
    holm,
    matched_points,
    ppl_at,
    seeds_for_power,
    t_test_power,
    tost,
)
from harness.tags import EQUIVALENCE_MARGIN, HEALTH, HEALTH_EVIDENCE, PARENT, ROLE, ROLE_STUDY, ROLE_TRIAL
from tests.studies import tiny_spec
from tests.test_report import document, records, row, tables

BASE = {"0": 100.0, "1": 104.0, "2": 101.0}
CLOSE = {"0": 101.0, "1": 104.5, "2": 102.5}


def test_tost_paired_and_welch_equal_statsmodels_on_the_log_scale() -> None:
    bound = math.log(1.05)
    paired = tost(BASE, CLOSE, 0.05)
    x1, x2 = np.log(list(CLOSE.values())), np.log(list(BASE.values()))
    assert paired.test == "paired TOST" and paired.ratio.n == 3
    assert paired.p_value == pytest.approx(ttost_paired(x1, x2, -bound, bound)[0], rel=1e-12)
    assert paired.ratio.ratio == pytest.approx(math.exp((x1 - x2).mean()))
    half = stats.t.ppf(0.975, 2) * (x1 - x2).std(ddof=1) / math.sqrt(3)  # the t interval of the mean difference
    assert (paired.ratio.low, paired.ratio.high) == pytest.approx(
        (math.exp((x1 - x2).mean() - half), math.exp((x1 - x2).mean() + half))
    )
    other = {"3": 110.0, "4": 99.0, "5": 103.0}
    welch = tost(BASE, other, 0.05)
    expected = ttost_ind(np.log(list(other.values())), x2, -bound, bound, usevar="unequal")[0]
    assert welch.test == "Welch TOST" and welch.p_value == pytest.approx(expected, rel=1e-12)
    assert not welch.equivalent and paired.equivalent == (paired.p_value < 0.05)
    assert tost({"0": 1.0}, {"0": 1.0}, 0.05) is None


def test_holm_equals_multipletests_and_keeps_untested_out_of_the_family() -> None:
    p = {"switch": 0.01, "lora": 0.04, "hybrid": 0.03, "dense": math.nan}
    adjusted = holm(p)
    expected = multipletests([0.01, 0.04, 0.03], method="holm")[1]
    assert [adjusted[k] for k in ("switch", "lora", "hybrid")] == pytest.approx(list(expected))
    assert math.isnan(adjusted["dense"])


def test_seeds_for_power_equal_statsmodels_paired_and_independent() -> None:
    paired = compare(BASE, CLOSE)
    expected = TTestPower().solve_power(effect_size=abs(paired.effect), alpha=0.05, power=0.8)
    assert seeds_for_power(paired) == math.ceil(expected)
    welch = compare(BASE, {"3": 110.0, "4": 99.0, "5": 103.0})
    expected = TTestIndPower().solve_power(effect_size=abs(welch.effect), alpha=0.05, power=0.8)
    assert seeds_for_power(welch) == math.ceil(expected)
    assert math.isnan(seeds_for_power(compare(BASE, BASE)))  # no difference: no finite number of seeds


def test_seeds_for_power_where_statsmodels_root_finder_gives_up() -> None:
    """The upcycle study's baseline_up vs dense_long (d_z = 5.44): solve_power returns nan with a warning; the
    answer is the smallest n whose power (statsmodels' own) reaches 0.8."""
    upcycled = Comparison(
        test="paired t-test", n=2, difference=0.62, statistic=7.69, p_value=0.082, effect=5.44, effect_name="d_z"
    )
    with pytest.warns(Warning):
        assert math.isnan(TTestPower().solve_power(effect_size=5.44, alpha=0.05, power=0.8))
    assert seeds_for_power(upcycled) == 3
    assert TTestPower().power(5.44, 3, 0.05) >= 0.8 and math.isnan(TTestPower().power(5.44, 2, 0.05))
    for n in (2, 3, 4, 6, 9):  # where statsmodels has a figure, the same figure
        for paired, analysis in ((True, TTestPower()), (False, TTestIndPower())):
            expected = analysis.power(0.9 if n == 2 else 5.44, n, 0.05)
            if math.isfinite(expected):
                assert t_test_power(0.9 if n == 2 else 5.44, n, paired) == pytest.approx(expected, rel=1e-9)
    assert t_test_power(5.44, 2, paired=True) == pytest.approx(0.4539, abs=1e-4)  # statsmodels: nan


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
    metrics = [Metric("test_ppl", test_ppl, 0, 0), Metric("final_val_ppl", test_ppl, 0, 0)]
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


@pytest.fixture
def flagged_study(tmp_path: Path, tracking_uri: str) -> tuple[Path, list[Block]]:
    """baseline and switch healthy over 3 seeds, hybrid stalled in both of its seeds, lora from an older store."""
    spec = load_spec(tiny_spec(tmp_path, "claims", ["baseline"], [0]))
    client = MlflowClient(tracking_uri)
    eid = client.create_experiment("claims")
    parent = client.create_run(eid, tags={ROLE: ROLE_STUDY, EQUIVALENCE_MARGIN: "0.1"}).info.run_id
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
    # switch: 0.9x the parameters, equivalent within the parent's +-10%, but twice as slow
    assert answers["variants"]["switch"] == {
        "smaller": "yes",
        "no_loss": "yes",
        "worse": "no",
        "faster": "no",
        "answer": "no",
    }
    # lora: one seed, from an older store (no time figure): nothing but its size can be decided
    lora = answers["variants"]["lora"]
    assert lora == {
        "smaller": "yes",
        "no_loss": "undecided",
        "worse": "undecided",
        "faster": "undecided",
        "answer": "undecided",
    }
    switch = row(tables(doc, "Verdict against the reference")[0], "switch")
    assert switch["Params ratio"] == "0.900" and switch["Significantly worse"] == "no"
    assert switch["Smaller / no loss / faster"] == "yes / yes / no" and switch["Answer"] == "**no**"
    # one TOST, stated twice: the verdict reads the equivalence section's figure
    assert switch["TOST p (Holm)"] == row(tables(doc, "Equivalence to the reference")[0], "switch")["TOST p (Holm)"]


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
    assert rest.count("flagged in Training health:** hybrid seed 0 (stalled), hybrid seed 1 (stalled)") == 4
    assert "hybrid" not in rest.split("## Significance", 1)[1].split("**Left out", 1)[0]


def test_equivalence_and_compute_matched_tables_carry_the_library_figures(
    flagged_study: tuple[Path, list[Block]],
) -> None:
    out, doc = flagged_study
    bound = math.log(1.1)  # the parent run's report.equivalence_margin
    x1, x2 = np.log(list(CLOSE.values())), np.log(list(BASE.values()))
    p = ttost_paired(x1, x2, -bound, bound)[0]
    cells = row(tables(doc, "Equivalence to the reference")[0], "switch")
    assert cells["Test"] == "paired TOST" and cells["TOST p"] == ("< 0.001" if p < 0.001 else f"{p:.3f}")
    assert "±10%" in (out / "report.md").read_text()
    # baseline reached 4,000 tokens in 4 s, switch in 8 s: at 4 s switch has seen 2,000 tokens (step 20).
    switch = row(tables(doc, "Compute-matched comparison")[0], "switch")
    expected = np.array(list(CLOSE.values())) * 40 / 20
    assert switch["Val PPL at 0 min 04 s"] == f"{expected.mean():,.2f} ± {expected.std(ddof=1):,.2f}"
    assert (out / "grad_norms.png").stat().st_size > 5000


def test_equivalence_margin_is_a_validated_spec_key(tmp_path: Path) -> None:
    spec = yaml.safe_load(tiny_spec(tmp_path, "margin", ["baseline"], [0]).read_text())
    assert load_spec(tiny_spec(tmp_path, "margin", ["baseline"], [0])).report.equivalence_margin == 0.05
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec | {"report": {"equivalence_margin": 1.5}}))
    with pytest.raises(SpecError, match=r"report\.equivalence_margin.*1\.5"):
        load_spec(path)


def test_reference_is_a_validated_spec_key_and_chosen_over_baseline(tmp_path: Path) -> None:
    spec = yaml.safe_load(tiny_spec(tmp_path, "ref", ["baseline", "dense"], [0]).read_text())
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(spec | {"report": {"reference": "dense"}}))
    assert load_spec(path).report.reference == "dense"
    path.write_text(yaml.safe_dump(spec | {"report": {"reference": "switch"}}))
    with pytest.raises(SpecError, match=r"report\.reference = 'switch': not a variant of the matrix"):
        load_spec(path)
    assert reference_variant(["baseline", "dense"], "dense") == "dense"
    assert reference_variant(["baseline", "dense"], None) == "baseline"
    assert reference_variant(["switch", "dense"], None) == "switch"


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
