"""The reliability cases (marker ``reliability``, deselected by default): each drives a real ``python -m harness``
subprocess through bad input, ``kill -9``, SIGTERM/SIGINT, workers started together, or a fault of the machine.
``--reliability-seed`` draws the random moments; ``--reliability-slice N`` keeps N cases per part, drawn with the
same seed. The run ends with a table of each part's cases, outcomes and wall time, as measured."""

from __future__ import annotations

import random
import signal
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tabulate import tabulate

from tests.reliability.interruptions import Reference, make_reference
from tests.reliability.processes import stop_children, subprocess_env

PHASES = ("setup", "call", "teardown")


def part_of(nodeid: str) -> str:
    """A case's part: its module's name without ``test_``."""
    return Path(nodeid.split("::")[0]).stem.removeprefix("test_")


@pytest.fixture(scope="session")
def cli_env(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The harness's environment: this checkout, the tiny data, one tokenisation cache for every case. Passed to
    each subprocess explicitly, since session fixtures run before the per-test environment is set."""
    return subprocess_env(MOE_HARNESS_DATA=str(tiny_data), MOE_HARNESS_CACHE=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str]) -> Reference:
    """The uninterrupted run that the interrupted ones are timed and judged against."""
    return make_reference(tmp_path_factory.mktemp("reference"), cli_env)


@pytest.fixture(scope="session", autouse=True)
def signals_end_the_session() -> Iterator[None]:
    """SIGTERM ends the session as Ctrl-C does, through the finalizers that stop the harness processes (each runs
    in its own session, out of the signal's reach). A Python handler for SIGINT also keeps an inherited SIG_IGN
    (a run started in the background) from passing to the harness, where the SIGINT cases would fail."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, signal.default_int_handler)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def no_harness_left() -> Iterator[None]:
    """A case that ended early (it failed, or was stopped) leaves no harness process running."""
    yield
    stop_children()


@pytest.hookimpl(trylast=True)  # after -m and -k: the slice is drawn from what they selected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    per_part = config.getoption("reliability_slice")
    if not per_part:
        return
    rng = random.Random(f"{config.getoption('reliability_seed')}-slice")
    parts: dict[str, list[pytest.Item]] = defaultdict(list)
    for item in items:
        if item.get_closest_marker("reliability"):
            parts[part_of(item.nodeid)].append(item)
    kept = {item.nodeid for cases in parts.values() for item in rng.sample(cases, min(per_part, len(cases)))}
    dropped = [item for item in items if item.get_closest_marker("reliability") and item.nodeid not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


@dataclass
class Result:
    """One case as its reports tell it: the worst outcome of its phases, their summed wall time, what it recorded."""

    outcome: str = "passed"
    seconds: float = 0.0
    recorded: list[tuple[str, object]] = field(default_factory=list)


def cases_by_part(stats: dict[str, list]) -> dict[str, dict[str, Result]]:
    found: dict[str, dict[str, Result]] = defaultdict(dict)
    for reports in stats.values():
        for report in reports:
            if getattr(report, "when", None) not in PHASES or "reliability" not in report.keywords:
                continue
            case = found[part_of(report.nodeid)].setdefault(report.nodeid, Result())
            case.seconds += report.duration
            if report.outcome != "passed" and case.outcome != "failed":
                case.outcome = report.outcome
            if report.when == "call":
                case.recorded += report.user_properties
    return found


def rows(parts: dict[str, dict[str, Result]]) -> list[list[object]]:
    """Per part: its cases, how many passed, failed and were skipped, their wall time summed."""
    found = []
    for part, cases in parts.items():
        outcomes = Counter(case.outcome for case in cases.values())
        seconds = sum(case.seconds for case in cases.values())
        found.append([part, len(cases), outcomes["passed"], outcomes["failed"], outcomes["skipped"], f"{seconds:.0f}"])
    return found


def tallies(parts: dict[str, dict[str, Result]]) -> dict[str, Counter]:
    """What the cases recorded (``record_property``), counted per name and value."""
    found: dict[str, Counter] = defaultdict(Counter)
    for cases in parts.values():
        for case in cases.values():
            for name, value in case.recorded:
                found[name][value] += 1
    return found


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    parts = cases_by_part(terminalreporter.stats)
    if not parts:
        return
    per_part = config.getoption("reliability_slice")
    chosen = f"{per_part} case(s) per part" if per_part else "every selected case"
    terminalreporter.write_sep("=", f"reliability: seed {config.getoption('reliability_seed')}, {chosen}")
    headers = ["part", "cases", "passed", "failed", "skipped", "seconds"]
    terminalreporter.write_line(tabulate(rows(parts), headers=headers, tablefmt="github"))
    for name, counts in tallies(parts).items():
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{value} x{n}" for value, n in sorted(counts.items())))
