"""Typed, validated configuration: the one place that knows what a study spec may contain.

A study spec (YAML) has a name, a ``base`` trial config, a ``matrix`` (variants x seeds x
optional sweeps) and per-variant ``overrides``. Every trial that runs is a fully resolved
:class:`TrialConfig`; nothing downstream reads raw dicts.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import os
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from models.config import ModelConfig, MoEConfig, StrictConfig, upcycle_mismatch

__all__ = [
    "DATA_ENV",
    "DEFAULT_DATA_PATH",
    "VARIANTS",
    "VARIANT_PRESETS",
    "BudgetConfig",
    "CustomVariant",
    "DataConfig",
    "InitConfig",
    "MatrixConfig",
    "ModelConfig",  # re-exported: the models' own config, part of every trial config
    "MoEConfig",  # re-exported, as ModelConfig
    "OptimConfig",
    "ReportConfig",
    "ResolvedTrial",
    "SpecError",
    "StudySpec",
    "TrainConfig",
    "TrialConfig",
    "TuneConfig",
    "TuneParam",
    "Variant",
    "check_spec",
    "check_tune",
    "deep_merge",
    "describe_error",
    "load_spec",
    "resolve_matrix",
    "resolve_trial",
    "set_dotted",
    "source_order",
]
Variant = Literal["baseline", "switch", "lora", "hybrid", "dense", "plain"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
DATA_ENV = "MOE_HARNESS_DATA"
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer; numpy gets it modulo 2**32
MAX_THREADS = 1024  # far above any CPU here; torch aborts the process trying to start a million
VALUE_CHARS = 200  # an offending value is echoed up to this many characters
DEFAULT_DATA_PATH = "../shared/data/wikitext"


class SpecError(ValueError):
    """A study spec or CLI input that cannot be used; the message is one line for the user."""


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
    """The residual block's parameters (router, experts, a dense FFN) train at ``lr`` x this. A linear block
    between the LSTM and a tied softmax is unstable at the classic recipe's SGD lr 20 whatever its init
    (its loss oscillates to 15-33 while the plain LSTM's stays below ln V); 0.05 (lr 1 for the block) keeps
    every variant below ln V after step 10 (``tests/test_references.py``)."""
    fused: bool = True
    """AdamW: torch's fused kernel (one pass over all parameters; ~25% more tokens/s on the quick
    config's CPU path, where the unfused update was ~20% of a step). A speed lever only."""


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


class MatrixConfig(StrictConfig):
    variants: list[str] = Field(min_length=1)
    """Preset names (``VARIANT_PRESETS``) or the spec's own ``variants``."""
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(min_length=1)
    sweep: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    """Extra axes: dotted key (e.g. ``moe.n_experts``) -> values."""

    @field_validator("variants", "seeds")
    @classmethod
    def _unique(cls, values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):
            raise ValueError(f"duplicate entries in {values}")
        return values


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


class ReportConfig(StrictConfig):
    """How ``harness report`` judges the study's claims."""

    equivalence_margin: float = Field(0.05, gt=0, lt=1)
    """Relative perplexity margin of the equivalence test (TOST): 0.05 = within ±5% of the reference's PPL,
    i.e. ±log(1.05) on the loss."""
    reference: str | None = None
    """The variant every other is tested against; unset: ``baseline`` when the matrix has it, else its first
    variant. (An upcycling study compares against dense trained for the same total tokens.)"""


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
    report: ReportConfig = ReportConfig()
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
        if self.report.reference is not None and self.report.reference not in self.matrix.variants:
            raise ValueError(
                f"report.reference = {shorten(self.report.reference)}: not a variant of the matrix "
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


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Return a copy of ``tree`` with ``a.b.c`` set to ``value``."""
    head, *rest = dotted.split(".")
    out = dict(tree)
    out[head] = set_dotted(dict(out.get(head) or {}), ".".join(rest), value) if rest else value
    return out


def resolve_trial(spec: StudySpec, variant: str, seed: int, assignment: dict[str, Any] | None = None) -> TrialConfig:
    """base -> variant preset -> per-variant overrides -> sweep assignment -> variant/preset/seed."""
    preset = spec.preset(variant)
    tree = deep_merge(spec.base, VARIANT_PRESETS[preset])
    tree = deep_merge(tree, spec.overrides.get(variant, {}))
    for key, value in (assignment or {}).items():
        tree = set_dotted(tree, key, value)
    tree.update(variant=variant, preset=preset, seed=seed)
    return TrialConfig.model_validate(tree)


class ResolvedTrial(NamedTuple):
    variant: str
    seed: int
    assignment: dict[str, Any]
    config: TrialConfig


def resolve_matrix(spec: StudySpec, where: str = "spec") -> list[ResolvedTrial]:
    """Every trial of the matrix, in a deterministic order (variant, sweep point, seed)."""
    sweep_keys = sorted(spec.matrix.sweep)
    points = [
        dict(zip(sweep_keys, values, strict=True))
        for values in itertools.product(*(spec.matrix.sweep[k] for k in sweep_keys))
    ]
    trials = []
    for variant in spec.matrix.variants:
        for assignment in points:
            for seed in spec.matrix.seeds:
                try:
                    config = resolve_trial(spec, variant, seed, assignment)
                except ValidationError as error:
                    raise SpecError(f"{describe_error(error, TrialConfig, where)} (variant {variant})") from None
                except (TypeError, AttributeError):  # set_dotted into a value that is no mapping
                    raise SpecError(f"{where}: matrix.sweep key in {sweep_keys} is not a config value") from None
                trials.append(ResolvedTrial(variant, seed, assignment, config))
    return trials


def shorten(value: Any) -> str:
    """``repr(value)``, cut to :data:`VALUE_CHARS` characters (a 15 MB string is not one line)."""
    text = repr(value)
    return text if len(text) <= VALUE_CHARS else f"{text[:VALUE_CHARS]}... ({len(text):,} characters)"


def source_order(trials: list[ResolvedTrial], where: str) -> list[str]:
    """The trials' variants, each after the variant it starts from (``init.source``).

    A source that is not a variant of the matrix, a cycle, or a source whose model cannot be upcycled into the
    dependent's is a one-line ``SpecError``."""
    variants = list(dict.fromkeys(t.variant for t in trials))
    graph: dict[str, set[str]] = {v: set() for v in variants}
    for trial in trials:
        source = trial.config.init.source
        if source is not None and source not in variants:
            raise SpecError(f"{where}: {trial.variant}: init.source = {source!r} is not a variant of the matrix")
        graph[trial.variant] |= {source} if source is not None else set()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        raise SpecError(f"{where}: init.source forms a cycle: {' -> '.join(reversed(error.args[1]))}") from None
    by_cell = {(t.variant, t.seed, str(t.assignment)): t.config for t in trials}
    for trial in (t for t in trials if t.config.init.source is not None):
        source = by_cell[(trial.config.init.source, trial.seed, str(trial.assignment))]
        problem = upcycle_mismatch(source.model, source.moe, trial.config.model, trial.config.moe)
        if problem:
            raise SpecError(f"{where}: {trial.variant} cannot start from {trial.config.init.source}: {problem}")
    return sorted(variants, key=order.index)  # sources first, the matrix's order otherwise


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys at ``loc`` (for 'did you mean')."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = next((a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def describe_error(error: ValidationError, model: type[BaseModel], where: str) -> str:
    """One line for the user: where, which key, what is wrong (with a 'did you mean' for unknown keys)."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(str(loc[-1]), _field_names(model, loc), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{where}: unknown key '{key}'{suggestion}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"{where}: missing key '{key}'"
    if not loc:  # a check across keys: its message names them
        return f"{where}: {message}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" = {shorten(value)}"
    return f"{where}: {key}{shown}: {message}"


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not "the last wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shorten(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; SpecError (one line) for a missing, unreadable or malformed file."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise SpecError(f"{path}: no such study spec") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a study spec") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (a study spec is YAML)") from None
    except OSError as error:
        raise SpecError(f"{path}: unreadable ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{at}: {problem}") from None


def load_spec(path: str | Path) -> StudySpec:
    """Parse and fully validate a study spec, including every trial it expands to."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a study spec must be a YAML mapping, got {type(raw).__name__}")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(describe_error(error, StudySpec, str(path))) from None
    check_spec(spec, str(path))
    if spec.tune is not None:
        check_tune(spec, str(path))
    return spec


def check_tune(spec: StudySpec, where: str) -> None:
    """Every edge of the search space must give a valid trial config for the tuned variant."""
    tune = spec.tune
    assert tune is not None
    if tune.variant in PRESET_FFN:
        raise SpecError(f"{where}: tune.variant = {tune.variant!r} has no MoE layer to tune")
    edges = {key: param.extremes() for key, param in tune.space.items()}
    candidates = [{key: value} for key, values in edges.items() for value in values]
    candidates.append({key: values[0] for key, values in edges.items()})
    candidates.append({key: values[-1] for key, values in edges.items()})
    for assignment in candidates:
        try:
            resolve_trial(spec, tune.variant, tune.seeds[0], assignment)
        except ValidationError as error:
            shown = ", ".join(f"{k}={v!r}" for k, v in assignment.items())
            raise SpecError(f"{describe_error(error, TrialConfig, where)} (tune.space at {shown})") from None
        except (AttributeError, TypeError):
            raise SpecError(f"{where}: tune.space key in {sorted(assignment)} is not a config value") from None


def check_spec(spec: StudySpec, where: str) -> None:
    """Validate the trial configs a spec expands to and that its data exists."""
    trials = resolve_matrix(spec, where=where)
    source_order(trials, where)
    if any(t.config.train.device == "cuda" for t in trials):
        import torch  # here: the CLI's parser starts without torch

        if not torch.cuda.is_available():
            raise SpecError(f"{where}: train.device = 'cuda' but this machine has no CUDA device (use auto or cpu)")
    data = trials[0].config.data
    folder = data.root() / data.name
    if not folder.is_dir():
        source = f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "data.path"
        raise SpecError(
            f"{where}: data folder '{folder}' does not exist (set {source}, or run 'harness data download')"
        )
