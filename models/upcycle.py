"""Sparse upcycling (Komatsuzaki et al. 2022): start a model from a trained dense one.

Backbone, embedding, head and any dense FFN are copied; every MLP expert is a copy of the dense FFN it
replaces (the router stays fresh); LoRA experts take the dense FFN as their shared base (MoLoRA,
Zadouri et al. 2023), their deltas stay fresh. Shared experts stay fresh too. A pure mapping of weights:
it reads the target model's structure and its fresh weights, and changes neither.
"""

from __future__ import annotations

from torch import Tensor

from models.base import LanguageModel
from models.config import ModelError
from models.experts import LoRAExperts, MLPExperts
from models.moe import MoELayer

FFN_KEYS = ("w_in.weight", "w_in.bias", "w_out.weight", "w_out.bias")


def _expert_weights(prefix: str, layer: MoELayer, dense: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state of ``layer`` (named ``prefix``) taken from the dense FFN under the same name."""
    missing = [k for k in FFN_KEYS if f"{prefix}.{k}" not in dense]
    if missing:
        raise ModelError(f"upcycling: the dense model has no FFN '{prefix}.{missing[0]}' for the MoE layer '{prefix}'")
    w_in, b_in, w_out, b_out = (dense[f"{prefix}.{k}"] for k in FFN_KEYS)
    if isinstance(layer.experts, LoRAExperts):
        return {f"{prefix}.experts.base.{k}": dense[f"{prefix}.{k}"] for k in FFN_KEYS}
    assert isinstance(layer.experts, MLPExperts)
    n = layer.n_experts  # Linear weights are (out, in); the expert bank stores (E, in, out)
    return {
        f"{prefix}.experts.w_in": w_in.t().expand(n, -1, -1).clone(),
        f"{prefix}.experts.b_in": b_in.expand(n, -1).clone(),
        f"{prefix}.experts.w_out": w_out.t().expand(n, -1, -1).clone(),
        f"{prefix}.experts.b_out": b_out.expand(n, -1).clone(),
    }


def upcycle_state_dict(dense_state: dict[str, Tensor], model: LanguageModel) -> dict[str, Tensor]:
    """A full state dict for ``model`` from a dense model's ``dense_state`` (see the module docstring).

    Raises ``ModelError`` when a weight of the dense model has no place in ``model`` or its shape differs.
    """
    state = dict(model.state_dict())  # fresh weights: routers, LoRA deltas, shared experts
    mapped: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            mapped |= _expert_weights(name, module, dense_state)
            used |= {f"{name}.{k}" for k in FFN_KEYS}
    for key, value in dense_state.items():
        if key not in used:
            mapped[key] = value
    for key, value in mapped.items():
        if key not in state:
            raise ModelError(f"upcycling: the dense model's weight '{key}' has no place in this model")
        if state[key].shape != value.shape:
            raise ModelError(
                f"upcycling: '{key}' has shape {tuple(value.shape)} in the dense model, {tuple(state[key].shape)} here"
            )
        state[key] = value.to(state[key].dtype).clone()
    return state
