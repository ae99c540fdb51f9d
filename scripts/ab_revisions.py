"""Training throughput of two source trees of this harness, interleaved step by step in one process.

    python scripts/ab_revisions.py BEFORE_TREE AFTER_TREE studies/quick.yaml [--variants switch] [--steps 200]

Make the trees with ``git worktree add --detach /tmp/before <rev>``. For each variant, each tree's own
``harness bench train`` trainer run (``harness.trainer.train`` with its MLflow sink, in a throwaway store)
runs in a thread of its own; a baton handed over at every ``get_batch`` call lets one trainer loop run at a
time, alternating step by step, so a shared machine's noise (frequency, neighbours) hits both alike
(separate runs of ``harness bench train`` vary more from one to the next than the differences worth
measuring). Each tree's time is what it spends holding the baton: its step and the loop's bookkeeping and
logging, without evaluation. It prints after/before speed (the ratio of the summed step times, > 1 = after
is faster) with a paired bootstrap 95% interval of that same ratio over the step pairs
(``scipy.stats.bootstrap``, BCa). Both trees need ``harness.bench.train.bench_configs`` and
``trainer_tokens_per_s`` with today's signatures (every revision since ef5e6d8 has them).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
from scipy import stats
from tabulate import tabulate

OUR_PACKAGES = ("harness", "models")
WARMUP = 10  # untimed steps per trainer, and its logging interval (as in `harness bench train`)


class Baton:
    """Lets one of two threads run at a time; ``pass_at`` hands over, records the caller's slice, waits."""

    def __init__(self, timed_steps: int) -> None:
        self.timed_steps, self.turn = timed_steps, 0
        self.cond = threading.Condition()
        self.calls, self.resumed = [0, 0], [0.0, 0.0]
        self.finished = [False, False]
        self.slices: list[list[float]] = [[], []]

    def pass_at(self, side: int) -> None:
        now = time.perf_counter()
        with self.cond:
            if self.calls[side] > WARMUP:  # the slice since this side last got the baton: one timed step
                self.slices[side].append(now - self.resumed[side])
            self.calls[side] += 1
            self.finished[side] = self.calls[side] > WARMUP + self.timed_steps
            self.hand_over(side)
            self.cond.wait_for(lambda: self.turn == side or self.finished[1 - side])
        self.resumed[side] = time.perf_counter()

    def hand_over(self, side: int) -> None:
        self.turn = side if self.finished[1 - side] else 1 - side
        self.cond.notify_all()

    def timing(self, side: int) -> bool:
        return self.calls[side] <= WARMUP + self.timed_steps

    def wait_turn(self, side: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == side)

    def done(self, side: int) -> None:
        with self.cond:
            self.finished[side] = True
            self.hand_over(side)


def our_modules() -> dict[str, ModuleType]:
    return {name: m for name, m in sys.modules.items() if name.split(".")[0] in OUR_PACKAGES}


def load_tree(tree: Path, side: int, spec: str, variant: str, baton: Baton, store: Path) -> Callable[[], float]:
    """Import ``tree``'s harness afresh (its modules keep their own globals), make its trainer pass the baton
    at each batch, and return its bench's trainer run for ``variant``."""
    for name in our_modules():
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        import harness
        import harness.bench.train as bench
        import harness.tracking  # noqa: F401  (imported lazily by the bench; import it while this tree is on the path)
        import harness.trainer as trainer
        from harness.data import load_corpus
    finally:
        sys.path.remove(str(tree))
    if not harness.__file__.startswith(str(tree)):
        raise SystemExit(f"{tree}: imported harness from {harness.__file__}; is another copy installed in place?")
    try:
        config = bench.bench_configs(spec, [variant], [])[0]
    except Exception as error:  # noqa: BLE001  (the tree's own SpecError class: a one-line message either way)
        raise SystemExit(f"{tree}: {error}") from None
    corpus = load_corpus(config.data)
    short = bench.EVAL_TOKENS  # the final evaluation is not timed; keep it short
    corpus = dataclasses.replace(corpus, validation=corpus.validation[:short], test=corpus.test[:short])
    get_batch = trainer.get_batch

    def get_batch_passing_baton(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if baton.timing(side):
            baton.pass_at(side)
        return get_batch(*args, **kwargs)

    trainer.get_batch = get_batch_passing_baton
    uri = f"sqlite:///{store / f'side{side}.db'}"
    return lambda: bench.trainer_tokens_per_s(config, corpus, baton.timed_steps, WARMUP, uri)


def speed_ratio(before: np.ndarray, after: np.ndarray, axis: int = -1) -> np.ndarray:
    """after/before speed: the summed time of the before steps over that of the after steps."""
    return np.sum(before, axis=axis) / np.sum(after, axis=axis)


def compare(trees: list[Path], spec: str, variant: str, steps: int) -> dict[str, float]:
    baton = Baton(steps)
    with tempfile.TemporaryDirectory() as store:
        runs = [load_tree(tree, side, spec, variant, baton, Path(store)) for side, tree in enumerate(trees)]

        def run(side: int) -> None:
            baton.wait_turn(side)
            try:
                runs[side]()
            finally:
                baton.done(side)

        threads = [threading.Thread(target=run, args=(side,)) for side in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    before, after = baton.slices
    pairs = min(len(before), len(after))
    if pairs < steps:
        raise SystemExit(f"{variant}: only {pairs} of {steps} steps were timed on both sides (a trainer failed?)")
    ci = stats.bootstrap(
        (np.array(before[:pairs]), np.array(after[:pairs])),
        speed_ratio,
        paired=True,
        vectorized=True,
        n_resamples=2000,
        rng=np.random.default_rng(0),
    ).confidence_interval
    return {
        "variant": variant,
        "before ms/step": 1000 * statistics.median(before),
        "after ms/step": 1000 * statistics.median(after),
        "after/before speed": sum(before[:pairs]) / sum(after[:pairs]),
        "95% CI": f"{ci.low:.3f}–{ci.high:.3f}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="source tree of the earlier revision")
    parser.add_argument("after", type=Path, help="source tree of the later revision")
    parser.add_argument("spec", help="study spec; each variant's config is its first seed's, as in bench train")
    parser.add_argument("--variants", nargs="+", default=["baseline", "switch", "lora", "hybrid", "dense"])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per tree and variant")
    args = parser.parse_args(argv)
    for tree in (args.before, args.after):
        if not (tree / "harness" / "trainer.py").is_file():
            parser.error(f"{tree}: not a source tree of this harness (no harness/trainer.py)")
    rows = [compare([args.before.resolve(), args.after.resolve()], args.spec, v, args.steps) for v in args.variants]
    print(tabulate(rows, headers="keys", floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
