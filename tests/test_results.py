"""The committed study results (docs/results/<study>/): each is a report of a shipped spec in which every trial
trained, and ``make results`` (scripts/check_results.py) names each decision a rerun changed."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = sorted(p for p in (REPO / "docs" / "results").glob("*/verdicts.json"))


def check_results():
    spec = importlib.util.spec_from_file_location("check_results", REPO / "scripts" / "check_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("verdicts", RESULTS, ids=[p.parent.name for p in RESULTS])
def test_a_committed_result_is_a_shipped_study_in_which_every_trial_trained(verdicts: Path) -> None:
    study = verdicts.parent.name
    assert (REPO / "studies" / f"{study}.yaml").is_file(), f"docs/results/{study} has no studies/{study}.yaml"
    assert (verdicts.parent / "report.md").is_file()
    health = json.loads(verdicts.read_text())["health"]
    untrained = {trial: label for trial, label in health.items() if label not in ("ok", "collapsed")}
    assert health and not untrained, f"{study}: a result is a result only if every trial trained: {untrained}"


def test_the_results_check_names_every_decision_that_changed() -> None:
    old = {"health": {"a seed 1": "ok"}, "answers": {"lstm": {"variants": {"hybrid": {"faster": "yes"}}}}}
    new = {"health": {"a seed 1": "stalled"}, "answers": {"lstm": {"variants": {"hybrid": {"faster": "undecided"}}}}}
    assert check_results().differences(old, new) == [
        "answers.lstm.variants.hybrid.faster: 'yes' -> 'undecided'",
        "health.a seed 1: 'ok' -> 'stalled'",
    ]
    assert check_results().differences(old, old) == []


def test_a_result_of_several_commits_or_uncommitted_changes_is_refused() -> None:
    provenance = check_results().provenance
    assert provenance({"commits": ["abc1234"]}) == []
    assert provenance({"commits": ["abc1234", "def5678"]}) == [
        "its trials ran at 2 commits (abc1234, def5678), not one"
    ]
    assert "uncommitted changes" in provenance({"commits": ["abc1234-dirty"]})[0]
    assert provenance({"commits": []}) == ["its trials ran at 0 commits (none recorded), not one"]


README_ANSWERS = {"claim": "## The answer, at CPU scale", "gpt": "## The transformer answer, at CPU scale"}


@pytest.mark.parametrize("study", sorted(README_ANSWERS))
def test_the_readme_s_answer_quotes_its_committed_result(study: str) -> None:
    """The README's answer names the commit that made the result, and every ratio and interval end it quotes
    (three decimals) is a figure of the committed report."""
    readme = (REPO / "README.md").read_text()
    section = readme.split(README_ANSWERS[study], 1)[1].split("\n## ", 1)[0]
    verdicts = json.loads((REPO / "docs" / "results" / study / "verdicts.json").read_text())
    (commit,) = verdicts["commits"]
    assert f"one commit ({commit})" in section and f"docs/results/{study}" in section
    report = (REPO / "docs" / "results" / study / "report.md").read_text()
    quoted = re.findall(r"\b\d\.\d{3}\b", section)
    assert len(quoted) >= 4 and [figure for figure in quoted if figure not in report] == []
