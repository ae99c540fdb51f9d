#!/usr/bin/env python
"""Reliability probe: re-measures five figures of the ``harness`` command line, each case a real subprocess.

1. bad input (every case of ``bad_inputs.CASES``): exit code 2, one short line on stderr, nothing written
   (fresh folder or existing store);
2. ``kill -9`` (16 on run-study, 5 on tune), then a rerun that completes cleanly;
3. SIGTERM / SIGINT (36): the process exits, no run is left RUNNING, a rerun matches an uninterrupted run;
4. workers started together on a fresh store (3 rounds): the same study twice (the lock lets one run it, refuses
   the other in one line), and three ``--cell N`` array tasks (all run, one parent run);
5. faults of the machine: a disk filled while a checkpoint is written; a SIGKILLed ``--ray local`` driver.

Usage (from the repository root, with the harness's environment)::

    MOE_HARNESS_DATA=/path/to/wikitext python scripts/probe/reliability.py [--only bad|kill|signal|workers|faults]
        [--seed N] [--keep DIR]

The runs use the first lines of each WikiText-2 split ($MOE_HARNESS_DATA, as the test suite's tiny data) and
tiny specs (studies/tiny.yaml), in a temporary folder that is removed at the end (``--keep DIR`` keeps the
folders of failing cases). Random moments come from ``--seed``. Exit code 0 when every case passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import bad_inputs
import faults
import interrupts
import kills
import signals
import workers
from common import DATA_ENV, REPO, CaseResult, Probe, make_tiny_data, stop_children
from tabulate import tabulate

PARTS = ("bad", "kill", "signal", "workers", "faults")
GOALS = {
    "bad": (
        "bad input: one line on stderr, exit 2, nothing written",
        f"{len(bad_inputs.CASES)} of {len(bad_inputs.CASES)}",
    ),
    "kill": ("kill -9 (16 run-study, 5 tune), then a clean rerun", "21 of 21"),
    "signal": ("SIGTERM/SIGINT: exits, no run RUNNING, rerun completes", "36 of 36"),
    "workers": ("workers together on a fresh store (same study x2; 3 array tasks)", "3 of 3 clean"),
    "faults": ("a disk filled mid-save; a SIGKILLed --ray local driver's cluster gone in 10 s", "all clean"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moments (default 0)")
    parser.add_argument("--keep", type=Path, help="copy the folders of failing cases here")
    parser.add_argument("--match", help="only the cases whose name contains one of these, comma-separated (debugging)")
    return parser.parse_args(argv)


def setup(probe: Probe) -> None:
    """The work folder, readable by the unprivileged user of the read-only cases; the tiny data."""
    source = Path(os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data" / "wikitext")
    if not (source / "wikitext-2-v1").is_dir():
        raise SystemExit(f"WikiText-2 not found at {source}/wikitext-2-v1; set {DATA_ENV}")
    probe.work.chmod(0o755)
    make_tiny_data(source, probe.data)
    probe.home.mkdir()
    probe.home.chmod(0o1777)
    probe.cache.mkdir()


def reporter(probe: Probe, counts: dict[str, int]) -> Callable[[CaseResult], None]:
    def report(result: CaseResult) -> None:
        counts[result.part] = counts.get(result.part, 0) + 1
        line = f"[{result.part} {counts[result.part]:2d}] {result.verdict} {result.name} ({result.seconds:.0f} s)"
        print(f"{line}: {result.detail}", flush=True)
        if not result.passed:
            print(f"      reason: {result.reason}", flush=True)
        probe.keep_failure(result)

    return report


def run_parts(probe: Probe, parts: list[str]) -> tuple[dict[str, list[CaseResult]], dict[str, float]]:
    results: dict[str, list[CaseResult]] = {}
    seconds: dict[str, float] = {}
    report = reporter(probe, {})
    reference = None
    for part in parts:
        started = time.monotonic()
        if part in ("kill", "signal") and reference is None:
            reference = interrupts.make_reference(probe)
            print(f"reference run-study: {reference.seconds:.1f} s, {reference.steps} steps per cell", flush=True)
        if part == "bad":
            results[part] = bad_inputs.run_bad_inputs(probe, report)
        elif part == "kill":
            tune_s = kills.tune_reference(probe)
            print(f"reference tune: {tune_s:.1f} s", flush=True)
            results[part] = kills.run_kills(probe, reference, tune_s, report)
        elif part == "signal":
            results[part] = signals.run_signals(probe, reference, report)
        elif part == "workers":
            results[part] = workers.run_workers(probe, report)
        else:
            results[part] = faults.run_faults(probe, report)
        seconds[part] = time.monotonic() - started
    return results, seconds


def table(results: dict[str, list[CaseResult]], seconds: dict[str, float]) -> str:
    rows = []
    for part, found in results.items():
        what, goal = GOALS[part]
        passed = sum(r.passed and r.counted for r in found)
        failed = sum(not r.passed and r.counted for r in found)
        rows.append(
            [what, goal, f"{passed} / {len(found)}", failed, len(found) - passed - failed, f"{seconds[part]:.0f}"]
        )
    headers = ["check", "goal", "passed / total", "failed", "not counted", "seconds"]
    return tabulate(rows, headers=headers, tablefmt="github")


def exit_codes(results: dict[str, list[CaseResult]]) -> str:
    """How the signalled processes ended, per signal: exit code x cases."""
    by_signal: dict[str, Counter[int | None]] = {}
    for result in results.get("signal", []):
        by_signal.setdefault(result.name.split("-")[0].upper(), Counter())[result.exit_code] += 1
    return "; ".join(
        f"{sig}: " + ", ".join(f"{code} x{n}" for code, n in sorted(codes.items(), key=str))
        for sig, codes in by_signal.items()
    )


def failures(results: dict[str, list[CaseResult]]) -> list[str]:
    return [
        f"- {r.part}/{r.name} [{r.verdict}]: {r.reason} ({r.detail})"
        for found in results.values()
        for r in found
        if not r.passed
    ]


def stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # an inherited SIG_IGN would reach the harness too
    signal.signal(signal.SIGTERM, stop)  # the harness processes still running are stopped, the work folder removed
    parts = [p for p in PARTS if not args.only or p in args.only]
    started = time.monotonic()
    probe = Probe(Path(tempfile.mkdtemp(prefix="harness-probe-")), args.seed, args.keep, args.match)
    print(f"probe: seed {args.seed}, parts {', '.join(parts)}, work folder {probe.work}", flush=True)
    try:
        setup(probe)
        results, seconds = run_parts(probe, parts)
    finally:
        stop_children()
        shutil.rmtree(probe.work, ignore_errors=True)
    print()
    print(table(results, seconds))
    if "signal" in results:
        print(f"\nexit codes after the signal: {exit_codes(results)}")
    failing = failures(results)
    print(f"\n{len(failing)} case(s) did not pass" + (":" if failing else "."))
    print("\n".join(failing))
    print(f"\nwall time: {time.monotonic() - started:.0f} s")
    return 0 if not failing else 1


if __name__ == "__main__":
    sys.exit(main())
