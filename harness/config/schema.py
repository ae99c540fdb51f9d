"""What a study spec may contain: the typed, validated trial config, the study spec around it, the variant presets.

A study spec (YAML) has a name, a ``base`` trial config, a ``matrix`` (variants x seeds x
optional sweeps) and per-variant ``overrides``. Every trial that runs is a fully resolved
:class:`TrialConfig`; nothing downstream reads raw dicts.
"""
# Over 350 lines: the whole spec schema, every section beside the others, so a reader sees what a spec may contain.

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, Discriminator, Field, Tag, model_validator

from harness.config.errors import shorten
from models.config import ModelConfig, MoEConfig, StrictConfig

Variant = Literal["baseline", "switch", "lora", "hybrid", "dense", "plain"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
DATA_ENV = "MOE_HARNESS_DATA"
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer; numpy gets it modulo 2**32
MAX_THREADS = 1024  # far above any CPU here; torch aborts the process trying to start a million
DEFAULT_DATA_PATH = "../shared/data/wikitext"


class DataConfig(StrictConfig):
    path: str = DEFAULT_DATA_PATH
    """Folder holding ``<name>/{train,validation,test}-00000-of-00001.parquet``; ``$MOE_HARNESS_DATA`` wins."""
    name: Literal["wikitext-2-v1", "wikitext-2-raw-v1"] = "wikitext-2-v1"
    min_freq: int = Field(1, ge=1)
    max_vocab: int | None = Field(None, ge=4)

    def root(self) -> Path:
        return Path(os.environ.get(DATA_ENV) or self.path).expanduser()


class OptimConfig(StrictConfig):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(0.25, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    block_lr_scale: float = Field(1.0, gt=0.0)
    """The residual block's parameters (router, experts, a dense FFN) train at ``lr`` x this: a block that is
    unstable at the backbone's learning rate (the classic LSTM recipe's SGD lr 20) trains at a smaller one
    (docs/references.md)."""
    fused: bool = True
    """AdamW: torch's fused kernel (one pass over all parameters instead of one per tensor). A speed lever only:
    it changes no result beyond rounding."""


class BudgetConfig(StrictConfig):
    epochs: float | None = Field(None, gt=0.0)
    tokens: int | None = Field(None, gt=0)
    eval_every_steps: int = Field(200, ge=1)
    eval_tokens: int | None = Field(None, gt=0)
    """Periodic evaluation reads the first ``eval_tokens`` validation tokens (all when unset);
    the final val/test figures always use the full splits."""
    log_every_steps: int = Field(20, ge=1)
    checkpoint_every_steps: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetConfig:
        if (self.epochs is None) == (self.tokens is None):
            raise ValueError("budget needs exactly one of budget.epochs or budget.tokens")
        return self


class TrainConfig(StrictConfig):
    batch_size: int = Field(20, ge=1)
    seq_len: int = Field(35, ge=2)
    """Truncated-BPTT length (LSTM) or context length (GPT)."""
    eval_batch_size: int = Field(20, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    compile: bool = False
    save_checkpoint: bool = False
    """Log the final model weights as an MLflow artifact."""


class InitConfig(StrictConfig):
    source: str | None = None
    """A variant of the same study, with a dense FFN: this cell starts from that variant's finished cell of the
    same seed and sweep point (sparse upcycling, ``models/upcycle.py``); unset starts from scratch."""


VARIANT_NAME = r"^[A-Za-z][A-Za-z0-9_]*$"
PRESET_FFN: dict[str, str] = {"dense": "dense", "plain": "none"}  # every other preset has the MoE layer


class TrialConfig(StrictConfig):
    """Everything one training run needs; the matrix expands a study into these."""

    variant: str = Field("baseline", pattern=VARIANT_NAME)
    preset: Variant | None = None
    """The preset the variant is built on; unset for a preset's own name (and then filled in)."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    init: InitConfig = InitConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    moe: MoEConfig = MoEConfig()
    optim: OptimConfig = OptimConfig()
    budget: BudgetConfig = BudgetConfig(tokens=100_000)
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check(self) -> TrialConfig:
        if self.model.tie_weights and self.model.output == "adaptive":
            raise ValueError("model.tie_weights=true cannot be combined with model.output=adaptive")
        if self.preset is None:
            if self.variant not in VARIANTS:
                raise ValueError(f"variant={self.variant!r} is no preset {list(VARIANTS)}; it needs a preset")
            self.preset = self.variant  # re-runs this validator once (validate_assignment), now with preset set
            return self
        if self.variant in VARIANTS and self.preset != self.variant:
            raise ValueError(f"preset={self.preset} contradicts variant={self.variant}")
        if self.model.ffn != PRESET_FFN.get(self.preset, "moe"):
            raise ValueError(f"model.ffn={self.model.ffn} contradicts variant={self.variant} (preset {self.preset})")
        if self.model.backbone == "gpt" and self.model.max_len is None:
            # Re-runs this validator once (validate_assignment), now with max_len set.
            self.model = self.model.model_copy(update={"max_len": self.train.seq_len})
        if self.model.max_len is not None and self.model.max_len < self.train.seq_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} exceeds model.max_len={self.model.max_len}")
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of every value, for MLflow params."""
        return _flatten(self.model_dump(mode="json"))


SECTIONS = tuple(
    name
    for name, f in TrialConfig.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
)  # data, model, moe, optim, budget, train: keys whose value must be a mapping


Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _unique(values: list[Any]) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate entries in {values}")
    return values


class SequentialSeeds(StrictConfig):
    """A group-sequential design: the ``initial`` seeds first, then one more seed per round for each comparison
    still undecided, up to ``max`` seeds (``design`` sets its questions and error rates)."""

    initial: Annotated[list[Seed], AfterValidator(_unique)] = Field(min_length=2)
    """The first round's seeds (at least 2: a paired t statistic needs two)."""
    max: int = Field(ge=2, le=1000)
    """The most seeds any variant runs; later rounds use the integers after the largest initial seed."""

    @model_validator(mode="after")
    def _max_covers_initial(self) -> SequentialSeeds:
        if self.max < len(self.initial):
            raise ValueError(f"max = {self.max} is fewer than the {len(self.initial)} initial seeds")
        return self

    def order(self) -> list[int]:
        """Every seed a round may use, in the order rounds use them."""
        extra = range(max(self.initial) + 1, max(self.initial) + 1 + self.max - len(self.initial))
        return [*self.initial, *extra]


class MatrixConfig(StrictConfig):
    variants: Annotated[list[str], AfterValidator(_unique)] = Field(min_length=1)
    """Preset names (``VARIANT_PRESETS``) or the spec's own ``variants``."""
    seeds: Annotated[
        Annotated[Annotated[list[Seed], AfterValidator(_unique), Field(min_length=1)], Tag("list")]
        | Annotated[SequentialSeeds, Tag("sequential")],
        Discriminator(lambda value: "sequential" if isinstance(value, dict | SequentialSeeds) else "list"),
    ]
    """A list (a fixed design: every variant runs every seed) or ``{initial: [...], max: N}`` (sequential)."""
    sweep: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    """Extra axes: dotted key (e.g. ``moe.n_experts``) -> values."""

    @property
    def sequential(self) -> SequentialSeeds | None:
        return self.seeds if isinstance(self.seeds, SequentialSeeds) else None

    def all_seeds(self) -> list[int]:
        """Every seed a cell of the matrix may have (a sequential design's: up to its ``max``)."""
        return self.seeds.order() if isinstance(self.seeds, SequentialSeeds) else list(self.seeds)


class TuneParam(StrictConfig):
    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> TuneParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs non-empty choices")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"a {self.type} parameter needs low <= high, got low={self.low} high={self.high}")
        elif self.log and self.low <= 0:
            raise ValueError(f"a log-scaled parameter needs low > 0, got low={self.low}")
        elif self.log and self.step is not None:
            raise ValueError("a log-scaled parameter cannot have a step")
        elif self.type == "int" and any(v is not None and v != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError(f"an int parameter needs integer bounds, got low={self.low} high={self.high}")
        if self.choices is not None and self.type != "categorical":
            raise ValueError(f"choices only apply to categorical parameters, not {self.type}")
        if self.choices and not all(c is None or isinstance(c, bool | int | float | str) for c in self.choices):
            raise ValueError(f"categorical choices must be numbers, strings, booleans or null, got {self.choices}")
        return self

    def extremes(self) -> list[Any]:
        """The values at the edges of the range (every choice for a categorical)."""
        if self.type == "categorical":
            return list(self.choices or [])
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


class TuneConfig(StrictConfig):
    variant: Variant = "hybrid"
    space: dict[str, TuneParam] = Field(min_length=1)
    """Dotted trial-config key -> search distribution."""
    n_trials: int | None = Field(None, ge=1)
    timeout_s: float | None = Field(None, gt=0)
    sampler: Literal["tpe", "random"] = "tpe"
    sampler_seed: int = 0
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_warmup_steps: int = Field(0, ge=0)
    """No pruning before this training step (Hyperband: its minimum resource)."""
    pruner_startup_trials: int = Field(2, ge=0)
    """Median pruner: no pruning until this many trials have finished."""
    objectives: list[Literal["val_ppl", "time_per_mtok"]] = ["val_ppl"]
    """``[val_ppl]``, or ``[val_ppl, time_per_mtok]`` for a Pareto front (Optuna cannot prune those)."""
    seeds: list[int] = Field([0], min_length=1)
    """Tuning trials train with the first seed; the exported best-config spec runs all of them."""
    heartbeat_interval_s: int = Field(30, ge=1)
    """Workers beat this often; a trial silent for ``grace_period_s`` is failed and retried."""
    grace_period_s: int | None = Field(None, ge=1)
    """Default: twice the heartbeat interval."""
    max_retry: int = Field(2, ge=0)
    """How often a trial whose worker died is re-queued with the same parameters."""

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        if self.n_trials is None and self.timeout_s is None:
            raise ValueError("tune needs tune.n_trials or tune.timeout_s")
        if not self.objectives or self.objectives[0] != "val_ppl" or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"tune.objectives must start with val_ppl, got {self.objectives}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"duplicate entries in tune.seeds {self.seeds}")
        if self.grace_period_s is not None and self.grace_period_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"tune.grace_period_s={self.grace_period_s} must exceed tune.heartbeat_interval_s="
                f"{self.heartbeat_interval_s}"
            )
        return self


Question = Literal["difference", "non_inferiority", "equivalence"]


class SpeedConfig(StrictConfig):
    """The paired speed measurement that decides "faster" (``harness/speed.py``): every variant's training steps
    timed in one process, blocks of ``steps`` interleaved across variants for ``rounds`` rounds."""

    rounds: int = Field(12, ge=3, le=1000)
    steps: int = Field(10, ge=1, le=10_000)
    warmup: int = Field(10, ge=0, le=10_000)


class DesignConfig(StrictConfig):
    """The study's questions and how each is decided (``harness/sequential.py``), fixed before its first cell."""

    reference: str | None = None
    """The variant every other is compared with; unset: ``baseline`` when the matrix has it, else its first
    variant. (An upcycling study compares against dense trained for the same total tokens.)"""
    questions: Annotated[list[Question], AfterValidator(_unique), Field(min_length=1)] = [
        "difference",
        "non_inferiority",
    ]
    """What each comparison decides on the test-PPL ratio: ``difference`` (better / worse, two-sided),
    ``non_inferiority`` (no worse than the margin, one-sided), ``equivalence`` (within the margin both ways)."""
    margin: float = Field(0.05, gt=0, lt=1)
    """Relative perplexity margin: 0.05 = a PPL ratio of 1.05 (non-inferiority; equivalence: 1/1.05 to 1.05)."""
    alpha: float = Field(0.05, gt=0, lt=0.5)
    """Family-wise error rate of each question, split equally (Bonferroni) across the comparisons."""
    spending: Literal["obrien_fleming", "pocock"] = "obrien_fleming"
    """Lan-DeMets alpha spending of a sequential design: O'Brien-Fleming type (most at the last look) or Pocock."""
    min_param_reduction: float = Field(0.05, ge=0, lt=1)
    """"Smaller" needs at most (1 - this) times the reference's parameters."""
    min_speedup: float = Field(0.05, ge=0, lt=1)
    """"Faster" needs the paired time ratio's interval below (1 - this)."""
    speed: SpeedConfig = SpeedConfig()


def reference_variant(variants: list[str], preferred: str | None = None) -> str | None:
    """The variant every other is tested against (``design.reference``): ``preferred`` when it is among
    ``variants``, else ``baseline``, else the first variant; the runner's rounds and the report use this one rule."""
    for name in (preferred, "baseline"):
        if name is not None and name in variants:
            return name
    return variants[0] if variants else None


class CustomVariant(StrictConfig):
    """A variant name of the spec's own, built on a preset (e.g. ``dense_long: {preset: dense}``): the same
    preset twice in one matrix, with different ``overrides``."""

    preset: Variant


class ResourcesConfig(StrictConfig):
    """What one trial asks of a Ray cluster (``run-study --ray``, ``tune --ray``); unused in-process."""

    gpus_per_trial: float | None = Field(None, ge=0)
    """Default: one GPU when the cluster has GPUs, else none."""
    cpus_per_trial: float = Field(1, ge=0)
    max_retries: int = Field(3, ge=0)
    """Retries after a worker or node loss (never after the trial's own failure)."""


class StudySpec(StrictConfig):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    base: dict[str, Any] = {}
    variants: dict[str, CustomVariant] = {}
    matrix: MatrixConfig
    overrides: dict[str, dict[str, Any]] = {}
    tune: TuneConfig | None = None
    design: DesignConfig = DesignConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _sections_are_mappings(self) -> StudySpec:
        # ``base.moe: 5`` would otherwise vanish under the variant preset's ``moe`` mapping.
        trees = {"base": self.base, **{f"overrides.{v}": tree for v, tree in self.overrides.items()}}
        for where, tree in trees.items():
            for key, value in tree.items():
                if key in SECTIONS and not isinstance(value, dict):
                    raise ValueError(f"{where}.{key} = {shorten(value)}: a section must be a mapping of keys")
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_report_section(cls, data: Any) -> Any:
        if isinstance(data, dict) and "report" in data:
            raise ValueError(
                "report: the study's questions and error rates are the design section (design.reference, "
                "design.margin, design.alpha, design.spending)"
            )
        return data

    @model_validator(mode="after")
    def _sequential_design(self) -> StudySpec:
        if self.matrix.sequential is not None and self.matrix.sweep:
            raise ValueError("matrix.sweep cannot be combined with a sequential design (matrix.seeds.initial/max)")
        return self

    @model_validator(mode="after")
    def _check_names(self) -> StudySpec:
        for name in self.variants:
            if name in VARIANTS or not re.match(VARIANT_NAME, name):
                raise ValueError(f"variants.{name}: a custom variant needs a new name of letters, digits and '_'")
        known = [*VARIANTS, *self.variants]
        for i, name in enumerate(self.matrix.variants):
            if name not in known:
                raise ValueError(f"matrix.variants.{i} = {name!r}: unknown variant; choose from {known}")
        for name in self.overrides:
            if name not in known:
                raise ValueError(f"overrides.{name}: unknown variant; choose from {known}")
        if self.design.reference is not None and self.design.reference not in self.matrix.variants:
            raise ValueError(
                f"design.reference = {shorten(self.design.reference)}: not a variant of the matrix "
                f"{self.matrix.variants}"
            )
        return self

    def preset(self, variant: str) -> Variant:
        """The preset a variant name stands for."""
        custom = self.variants.get(variant)
        return custom.preset if custom is not None else variant  # type: ignore[return-value]  # a preset's name


# What each variant name means, applied on top of ``base`` and below ``overrides``.
VARIANT_PRESETS: dict[Variant, dict[str, Any]] = {
    "baseline": {"moe": {"router": "noisy_topk", "top_k": 2, "expert": "mlp", "balance_losses": ["cv2"]}},
    "switch": {"moe": {"router": "switch", "top_k": 1, "expert": "mlp", "balance_losses": ["switch"]}},
    "lora": {"moe": {"router": "noisy_topk", "top_k": 2, "expert": "lora", "balance_losses": ["cv2"]}},
    "hybrid": {"moe": {"router": "switch", "top_k": 1, "expert": "lora", "balance_losses": ["switch"]}},
    "dense": {"model": {"ffn": "dense"}},
    "plain": {"model": {"ffn": "none"}},  # the backbone alone: no FFN or MoE block
}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
