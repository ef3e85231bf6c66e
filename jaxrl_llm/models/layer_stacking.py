"""Stacked ↔ per-layer decoder storage (`scan_layers=True` vs the unrolled default).

A scanned model stores each run of identical blocks as one `Block` with [n, ...]
parameters (`model.model.stacks.<r>`, logical axis 'layers' first), an unrolled one as
`model.model.layers.<i>`. Both compute the same function of the same weights; these
conversions move weights between the layouts (the HF loader and exporter, and anything
else keyed by per-layer paths — LoRA adapters trained on one layout, GGUF — go through
them). Each returns a new model object; the input is left as it was.

    model, _ = load_hf(path)                 # per layer
    scanned = stack_layers(model)            # train / sample this (flat compile time)
    save_hf(unstack_layers(scanned), out)    # save_hf also unstacks by itself
"""

from __future__ import annotations

from typing import TypeVar

from flax import nnx

from jaxrl_llm.models.transformer import Transformer

M = TypeVar("M", bound=nnx.Module)


def backbone(model: nnx.Module) -> Transformer:
    """The `Transformer` of a `CausalLM` / `ScalarHeadModel` (or `model` itself)."""
    if isinstance(model, Transformer):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, Transformer):
        return inner
    raise TypeError(
        f"model: expected a Transformer, CausalLM or ScalarHeadModel, got {type(model).__name__}"
    )


def is_stacked(model: nnx.Module) -> bool:
    """Whether the model's decoder is stored stacked (`scan_layers=True`)."""
    return bool(backbone(model).scan_layers)


def _shallow_copy(model: M) -> M:
    # new module objects over the same arrays: converting one must not mutate the other
    return nnx.merge(*nnx.split(model))


def stack_layers(model: M) -> M:
    """`model` with its decoder stored stacked (`scan_layers=True`); same weights. A
    stacked model is returned as a new object unchanged."""
    out = _shallow_copy(model)
    inner = backbone(out)
    if not inner.scan_layers:
        inner.set_stacks(list(inner.layers))
    return out


def unstack_layers(model: M) -> M:
    """`model` with its decoder stored per layer (the unrolled default); same weights."""
    out = _shallow_copy(model)
    inner = backbone(out)
    if inner.scan_layers:
        inner.set_layers(inner.blocks())
    return out


def per_layer_state(model: nnx.Module, filter=nnx.Param) -> nnx.State:
    """`nnx.state(model, filter)` in the per-layer layout whatever the model's storage:
    paths `model.layers.<i>...` (for comparing or exporting weights, gradients merged
    into a model, …)."""
    return nnx.state(unstack_layers(model) if is_stacked(model) else model, filter)
