"""Per-device memory estimate of a training (or scoring / sampling) setup on a mesh.

:func:`estimate_memory` answers "does this model, this batch and this mesh fit?" before
anything is allocated. The parameter, gradient and optimizer terms are exact: the model
is traced abstractly (``nnx.eval_shape``), every parameter's logical axes are resolved by
the same rules that :func:`~jaxrl_llm.parallel.sharding.create_sharded` uses, and each
array counts the bytes of ONE shard (its shape divided, dimension by dimension, by the
product of the mesh axes it is split over; replicated arrays count in full on every
device). The optimizer state is that of the real optax transformation
(``jax.eval_shape(tx.init, params)``), sharded like its parameters, as
:class:`~jaxrl_llm.parallel.train_step.TrainStep` places it. FSDP's gathered weights and
the undonated output state follow from the same shards; the activation, logits and
KV-cache terms are formulas calibrated against XLA's compiled memory analysis of the SFT
trainer's update step (see :func:`estimate_memory`, ``benchmarks/memory_estimate.py``).

The mesh may be abstract (a ``{'data': 2, 'fsdp': 64, 'tensor': 8}`` dict or a
``(data, fsdp, tensor)`` tuple), so a 1024-chip run can be planned on a laptop.

Command line::

    python -m jaxrl_llm.parallel.memory --config path/to/config.json --mesh 1,8,1 \\
        --batch 64 --seq-len 2048 --remat --kv-cache-len 4096

    # the SFT / RFT trainers' update (chunked log-probs, no donation)
    python -m jaxrl_llm.parallel.memory --config path/to/config.json --mesh 2,2,2 \\
        --batch 16 --seq-len 2048 --logits-chunk-size 1024 --no-donate
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from jaxrl_llm.parallel.mesh import MESH_AXES
from jaxrl_llm.parallel.rules import LOGICAL_AXIS_RULES, Rules, resolve_spec, validate_rules
from jaxrl_llm.parallel.sharding import _leaf_spec

__all__ = [
    "MeshLike",
    "MEMORY_TERMS",
    "OPTIMIZERS",
    "abstract_mesh",
    "per_device_bytes",
    "compiled_memory",
    "estimate_memory",
    "format_memory_estimate",
    "print_memory_estimate",
]

MEMORY_TERMS: tuple[str, ...] = (
    "params", "optimizer", "grads", "gathered_params", "activations", "logits", "kv_cache", "new_state"
)
"""The byte terms of :func:`estimate_memory` (their sum is ``total``)."""

OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "lion", "momentum", "sgd", "adafactor")
"""Optimizer names :func:`estimate_memory` understands (or pass an optax transformation)."""

GRAD_DTYPE = jnp.float32
"""The train step accumulates gradients in float32 (``accumulate_gradients``)."""
LOGITS_DTYPE = jnp.float32
SOFTMAX_DTYPE = jnp.float32
"""``jax.nn.dot_product_attention`` (the non-fused "xla" path) always runs the softmax in float32."""

# Activation elements one decoder layer keeps per token for the backward pass, by size
# class. Calibrated against XLA's compiled memory analysis of the SFT update
# (tests/parallel/test_memory_vs_compiled.py, benchmarks/memory_estimate.py): the saved
# residuals of the block as written in ``models/transformer.py``, after XLA's fusion.
ACT_PER_D = 6
"""Block input, two RMSNorms (x·rsqrt and the scaled output each), the mid-block residual."""
ACT_PER_MLP = 5
"""SwiGLU: gate and up projections, sigmoid(gate), silu(gate), silu(gate)·up."""
ACT_PER_SCORE = 3
"""Non-fused attention, per head and key: masked scores, their exp and the probabilities
(float32); a fused (flash / cuDNN) kernel keeps none of them."""

MeshLike = Union[Mesh, AbstractMesh, Mapping[str, int], Sequence[int]]
"""A mesh, or just its axis sizes: ``{'fsdp': 8}`` or ``(data, fsdp, tensor)``."""


def abstract_mesh(mesh: MeshLike) -> AbstractMesh:
    """A device-free ``('data', 'fsdp', 'tensor')`` mesh of the given sizes.

    Args:
      mesh: a ``Mesh`` / ``AbstractMesh`` (its axis sizes are used), a mapping
        ``{axis: size}`` (missing axes are 1) or a ``(data, fsdp, tensor)`` sequence.

    Raises:
      ValueError: an unknown axis name, a wrong number of sizes or a size < 1.
    """
    if isinstance(mesh, (Mesh, AbstractMesh)):
        sizes = dict(mesh.shape)
    elif isinstance(mesh, Mapping):
        sizes = dict(mesh)
    else:
        mesh = tuple(mesh)
        if len(mesh) != len(MESH_AXES):
            raise ValueError(f"mesh: expected {len(MESH_AXES)} sizes {MESH_AXES}, got {mesh}")
        sizes = dict(zip(MESH_AXES, mesh))
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis names {sorted(unknown)}; expected {MESH_AXES}")
    full = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    for name, size in full.items():
        if size < 1:
            raise ValueError(f"mesh: axis {name!r} must have size >= 1, got {size}")
    return AbstractMesh(tuple(full[a] for a in MESH_AXES), MESH_AXES)


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _shard_elems(shape: Sequence[int], spec: PartitionSpec, sizes: Mapping[str, int]) -> int:
    """Elements of the largest shard of an array of ``shape`` split by ``spec``."""
    n = 1
    for dim, size in enumerate(shape):
        entry = spec[dim] if dim < len(spec) else None
        n *= -(-size // math.prod(sizes[a] for a in _axes(entry)))
    return n


def per_device_bytes(tree: Any, mesh: MeshLike, rules: Rules = LOGICAL_AXIS_RULES) -> dict[str, int]:
    """``{path: bytes one device holds}`` for every array of a model / state / optimizer state.

    Each leaf is placed exactly as :func:`~jaxrl_llm.parallel.sharding.model_shardings`
    places it (Variables by their logical axes and ``rules``, with the same
    divisibility fallbacks; other leaves replicated). Works on abstract trees
    (``nnx.eval_shape``, ``jax.eval_shape``) as well as concrete ones.
    """
    rules = validate_rules(rules)
    amesh = abstract_mesh(mesh)
    sizes = dict(amesh.shape)
    if isinstance(tree, nnx.Pytree) and not isinstance(tree, nnx.State):
        tree = nnx.state(tree)
    out: dict[str, int] = {}

    def one(path, leaf):
        spec, _ = _leaf_spec(path, leaf, amesh, rules)
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        shape = tuple(getattr(value, "shape", np.shape(value)))
        dtype = np.dtype(getattr(value, "dtype", np.asarray(value).dtype))
        out[jax.tree_util.keystr(path)] = _shard_elems(shape, spec, sizes) * dtype.itemsize
        return None

    jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return out


def _gathered_bytes(
    tree: Any, mesh: AbstractMesh, rules: Rules, axes: Sequence[str], itemsize: int,
    per_layer: bool = False,
) -> dict[str, int]:
    """``{path: bytes}`` of the copy of each parameter that the compute all-gathers: the
    shard with the mesh ``axes`` (those that also split the batch, i.e. FSDP) removed from
    its spec, in ``itemsize`` bytes. Parameters not split over ``axes`` are used in place
    (nothing gathered) and are left out. ``per_layer``: a stacked decoder parameter
    (``scan_layers=True``, leading [n] layers axis) counts one layer's slice, the part
    one scan step gathers."""
    sizes = dict(mesh.shape)
    out: dict[str, int] = {}

    def one(path, leaf):
        spec, _ = _leaf_spec(path, leaf, mesh, rules)
        used = [set(_axes(entry)) for entry in spec]
        if not any(u & set(axes) and math.prod(sizes[a] for a in u & set(axes)) > 1 for u in used):
            return None
        kept = PartitionSpec(*(tuple(a for a in _axes(entry) if a not in axes) or None for entry in spec))
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        shape = tuple(getattr(value, "shape", np.shape(value)))
        key = jax.tree_util.keystr(path)
        layers = shape[0] if per_layer and _STACK_MARKER in key else 1
        out[key] = _shard_elems(shape, kept, sizes) * itemsize // layers
        return None

    jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return out


_STACK_MARKER = "['stacks']["


def _layer_of(path: str) -> str:
    """The decoder layer a parameter path belongs to (the path up to ``['layers'][i]``,
    or ``['stacks'][r]`` for a stacked run, whose per-layer slices `_gathered_bytes`
    counts), or the path itself for parameters outside the layers (embedding, norm)."""
    for marker in ("['layers'][", _STACK_MARKER):
        if marker in path:
            i = path.index(marker) + len(marker)
            return path[: path.index("]", i)]
    return path


def _make_tx(optimizer: str | optax.GradientTransformation | None) -> optax.GradientTransformation | None:
    if optimizer is None or isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    makers: dict[str, Callable[[], optax.GradientTransformation]] = {
        "adamw": lambda: optax.adamw(1e-4),
        "adam": lambda: optax.adam(1e-4),
        "lion": lambda: optax.lion(1e-4),
        "momentum": lambda: optax.sgd(1e-4, momentum=0.9),
        "sgd": lambda: optax.sgd(1e-4),
        "adafactor": lambda: optax.adafactor(1e-4),
    }
    if optimizer not in makers:
        raise ValueError(
            f"optimizer: expected one of {OPTIMIZERS}, None (frozen model) or an optax "
            f"GradientTransformation, got {optimizer!r}"
        )
    return makers[optimizer]()


def _dim_shards(name: str, size: int, rules: Rules, mesh: AbstractMesh) -> int:
    """How many ways the rules split a dimension of logical ``name`` and ``size``."""
    spec, _ = resolve_spec((name,), rules, shape=(size,), mesh=mesh)
    return math.prod(mesh.shape[a] for a in _axes(spec[0] if len(spec) else None))


def compiled_memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled (SPMD) program from XLA's memory analysis.

    ``compiled`` is ``jax.jit(f).lower(*args).compile()``. Its footprint is arguments +
    outputs − aliased (donated inputs reused as outputs) + temporaries: the number
    :func:`estimate_memory`'s ``total`` predicts.

    Returns:
      ``{"arguments", "outputs", "aliased", "temps", "total"}`` in bytes.
    """
    ma = compiled.memory_analysis()
    out = {
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
        "temps": int(ma.temp_size_in_bytes),
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temps"]
    return out


def estimate_memory(
    config: Any,
    mesh: MeshLike,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    batch: int,
    seq_len: int,
    param_dtype: Any = jnp.bfloat16,
    dtype: Any = None,
    optimizer: str | optax.GradientTransformation | None = "adamw",
    remat: bool = False,
    kv_cache_len: int | None = None,
    kv_cache_batch: int | None = None,
    num_microbatches: int = 1,
    logits_chunk_size: int | None = None,
    moe_impl: str = "dense",
    fused_attention: bool = False,
    donate: bool = True,
    model_factory: Callable[[], nnx.Module] | None = None,
) -> dict[str, int]:
    """Per-device memory, in bytes, of one model trained (or run) on ``mesh`` under ``rules``.

    The ``total`` is the peak footprint of one update step (arguments, outputs and XLA
    temporaries). Against XLA's compiled memory analysis of the SFT trainer's real update
    (float32, no remat, 8 simulated CPU devices) it is 0.90–1.01 × the compiled
    footprint on 1×1×1, 8×1×1, 2×1×4, 4×1×2, 2×2×2 and 1×4×2 meshes, and 0.95–0.97 ×
    that of the GRPO trainer's update on 2×2×2 and 1×4×2
    (``tests/parallel/test_memory_vs_compiled.py`` asserts within 25 %;
    ``python benchmarks/memory_estimate.py`` prints the comparison). Keep ~20 % headroom.

    Exact terms (from the abstract model and the rules, nothing allocated):

    * ``params``: Σ over parameters of the bytes of one shard, in ``param_dtype``.
    * ``grads``: the same shards in float32 (the train step's gradient accumulator);
      0 when ``optimizer is None`` (frozen model: reference, reward).
    * ``optimizer``: the state of the optax transformation
      (``jax.eval_shape(tx.init, params)``), each statistic sharded like its parameter
      (AdamW: 2 × params; lion / momentum: 1 ×; sgd: 0; adafactor: factored).
    * ``gathered_params``: FSDP. A parameter split over a mesh axis that also splits the
      batch (``fsdp`` under the default rules) is all-gathered for its matmuls, and XLA
      keeps the gathered copy (still split over ``tensor``) from the forward to the
      backward: Σ over such parameters of their shard without the batch axes, in
      ``dtype``. Frozen model or ``remat=True`` (the backward re-gathers what it
      recomputes): one layer's worth. 0 without FSDP.
    * ``new_state`` (``donate=False`` only): a step that does not donate its input state
      writes the new params and optimizer state to fresh buffers. They are written last,
      after the activations are freed, and XLA reuses their memory for activations before
      that, so only ``max(0, params + optimizer − activations − logits)`` adds to the peak.

    Rough terms, per device, with ``b = ceil(batch / (num_microbatches · n_batch))``
    micro-batch rows (``n_batch``: mesh size of the ``batch`` rule, default data·fsdp),
    ``L = seq_len``, ``a`` = bytes of the compute ``dtype``, and the head / kv-head /
    MLP / vocab / expert dimensions divided by their shards under the rules
    (``H_t = H / heads shards`` etc.):

    * ``activations``: what one forward keeps for the backward. Per layer and token
      ``e = (6·D + 2·H_t·Hd + 2·K_t·Hd + 5·F_t) · a + 3·H_t·L · 4`` bytes: block input,
      two RMSNorms (normalised and scaled output each), mid-block residual; q / k / v and
      the attention output; SwiGLU gate, up, sigmoid(gate), silu(gate), product (MoE
      layers: ``5·F·E_t`` for the "dense" expert implementation, ``5·F·k`` for "ragged",
      plus the router's ``E``); and, for the non-fused attention
      (``jax.nn.dot_product_attention`` "xla"), the masked scores, their exponentials and
      the probabilities, which it computes in float32 (``fused_attention=True``, i.e.
      cuDNN / flash: none). The coefficients (``ACT_PER_*``) are the residuals XLA keeps
      for ``models/transformer.py`` (calibrated in float32 on XLA:CPU by varying L, the
      batch and the depth: per layer they match the compiled temporaries within ~1 %).
      ``remat=False``: ``N · b · L · e``. ``remat=True`` (each block under
      ``jax.checkpoint``): ``N · b · L · D · a + b · L · e`` (saved block inputs
      plus one block recomputed; XLA:CPU's scheduler runs every layer's recomputation
      before the backward, so there remat saves almost nothing and this term is low).
      Frozen model (``optimizer=None``, forward only): ``b · L · e``.
    * ``logits``: float32 logits and log-softmax, ``2 · b · L · V_t · 4``. With
      ``logits_chunk_size=c`` (``ops.logprobs_from_hidden``, which the trainers use) the
      logits of ``c`` tokens of the whole (micro-)batch exist at a time, split over the
      batch shards like the rows: ``2 · ceil(min(c, batch/num_microbatches · L) /
      n_batch) · V_t · 4``.
    * ``kv_cache``: sampling with a cache of ``kv_cache_len`` slots for
      ``kv_cache_batch`` (default ``batch``) rows: ``2 · N · ceil(rows / n_batch) ·
      kv_cache_len · K_t · Hd · a`` — the layout ``[N, B, S, K, Hd]`` split over
      ``batch`` and ``kv_heads``. 0 when ``kv_cache_len`` is None.

    Not counted: XLA's fragmentation and small temporaries (the compiled footprint is
    typically 0–15 % above ``total``), the batch itself, and other models on the same
    mesh (sum their estimates: e.g. a frozen reference with ``optimizer=None``). The
    estimate assumes activations split over the batch axes; a model that lets XLA
    replicate them (no activation sharding constraint, with ``fsdp`` > 1) uses more.
    On XLA:CPU, ``bfloat16`` compute is partly carried out in float32 (more memory than
    estimated); accelerators compute in ``bfloat16``.

    Args:
      config: a ``ModelConfig`` (``jaxrl_llm.models``).
      mesh: a ``Mesh``, or the axis sizes (``{'fsdp': 8}``, ``(data, fsdp, tensor)``).
      rules: logical → mesh rules (e.g. ``rules_for_role('reference',
        replicate_over_fsdp=True)``).
      batch: global batch rows of one update (before micro-batching).
      seq_len: L, tokens per row (prompt + response).
      param_dtype: parameter storage dtype.
      dtype: activation / KV-cache dtype (default ``param_dtype``).
      optimizer: a name in ``OPTIMIZERS``, an optax transformation, or None (frozen).
      remat: decoder blocks rematerialised (``CausalLM(remat=True)``).
      kv_cache_len: S, KV-cache slots for sampling (prompt + max new tokens), or None.
      kv_cache_batch: rows of the KV cache (prompts × samples); default ``batch``.
      num_microbatches: gradient-accumulation steps (divides the activations).
      logits_chunk_size: chunk (tokens) of a chunked log-prob computation
        (``logprob_chunk_size`` of the trainer configs), or None (full logits).
      moe_impl: "dense" or "ragged" (MoE models only).
      fused_attention: attention by a fused kernel (``attention_impl="cudnn"``) that keeps
        no ``[L, L]`` scores.
      donate: the step donates its input params / optimizer state (``make_train_step``'s
        default). The trainers' ``make_sft_update`` does not: pass False for them.
      model_factory: zero-argument callable building the model (default
        ``CausalLM(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype)``).

    Returns:
      ``{term: bytes}`` for the terms in ``MEMORY_TERMS`` plus ``total`` (their sum),
      and two counts: ``num_params`` (unsharded parameter scalars) and
      ``microbatch_rows`` (``b`` above).

    Raises:
      ValueError: bad sizes, an unknown optimizer name, or a logical axis without a rule.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len), ("num_microbatches", num_microbatches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if kv_cache_len is not None and kv_cache_len < 1:
        raise ValueError(f"kv_cache_len: expected a positive int or None, got {kv_cache_len!r}")
    if moe_impl not in ("dense", "ragged"):
        raise ValueError(f"moe_impl: expected 'dense' or 'ragged', got {moe_impl!r}")
    rules = validate_rules(rules)
    amesh = abstract_mesh(mesh)
    dtype = param_dtype if dtype is None else dtype
    act_bytes = np.dtype(dtype).itemsize
    tx = _make_tx(optimizer)

    if model_factory is None:
        from jaxrl_llm.models.transformer import CausalLM  # models import parallel-free code

        def model_factory():
            return CausalLM(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype)

    abstract = nnx.eval_shape(model_factory)
    params = nnx.state(abstract, nnx.Param)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    param_bytes = per_device_bytes(params, amesh, rules)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    out = dict.fromkeys(MEMORY_TERMS, 0)
    out["params"] = sum(param_bytes.values())
    if tx is not None:
        grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, GRAD_DTYPE), params)
        out["grads"] = sum(per_device_bytes(grads, amesh, rules).values())
        out["optimizer"] = sum(per_device_bytes(jax.eval_shape(tx.init, params), amesh, rules).values())

    # rough terms
    c = config
    n_batch = _dim_shards("batch", batch, rules, amesh)
    rows = -(-batch // (num_microbatches * n_batch))
    heads = -(-c.num_heads // _dim_shards("heads", c.num_heads, rules, amesh))
    kv_heads = -(-c.num_kv_heads // _dim_shards("kv_heads", c.num_kv_heads, rules, amesh))
    vocab = -(-c.vocab_size // _dim_shards("vocab", c.vocab_size, rules, amesh))
    d, hd, L = c.hidden_size, c.head_dim, seq_len

    def layer_bytes(layer: int) -> int:
        """Bytes one token keeps in layer ``layer`` for the backward (see the docstring)."""
        linear = ACT_PER_D * d + 2 * heads * hd + 2 * kv_heads * hd
        if c.is_moe_layer(layer):
            f = c.moe_intermediate_size
            experts = -(-c.num_experts // _dim_shards("experts", c.num_experts, rules, amesh))
            linear += ACT_PER_MLP * f * (experts if moe_impl == "dense" else c.num_experts_per_tok)
            linear += c.num_experts
        else:
            f = c.intermediate_size
            linear += ACT_PER_MLP * -(-f // _dim_shards("mlp", f, rules, amesh))
        scores = 0 if fused_attention else ACT_PER_SCORE * heads * L
        return linear * act_bytes + scores * np.dtype(SOFTMAX_DTYPE).itemsize

    # FSDP: a weight split over a batch axis is all-gathered for the matmuls; XLA keeps the
    # gathered copy from the forward to the backward (the two gathers are one after CSE).
    batch_spec, _ = resolve_spec(("batch",), rules, shape=(batch,), mesh=amesh)
    batch_axes = _axes(batch_spec[0] if len(batch_spec) else None)
    if tx is None or remat:  # forward only / recomputed per block: one layer's weights at a time
        gathered = _gathered_bytes(params, amesh, rules, batch_axes, act_bytes, per_layer=True)
        groups: dict[str, int] = {}
        for path, size in gathered.items():
            groups[_layer_of(path)] = groups.get(_layer_of(path), 0) + size
        out["gathered_params"] = max(groups.values(), default=0)
    else:
        gathered = _gathered_bytes(params, amesh, rules, batch_axes, act_bytes)
        out["gathered_params"] = sum(gathered.values())

    tokens = rows * L
    per_layer = [layer_bytes(i) for i in range(c.num_layers)]
    if tx is None:
        act = tokens * max(per_layer)
    elif remat:
        act = c.num_layers * tokens * d * act_bytes + tokens * max(per_layer)
    else:
        act = tokens * sum(per_layer)
    out["activations"] = act
    logit_bytes = np.dtype(LOGITS_DTYPE).itemsize
    if logits_chunk_size is None:
        out["logits"] = 2 * tokens * vocab * logit_bytes
    else:
        # ops.logprobs_from_hidden: a [chunk, V] float32 block of the GLOBAL flattened
        # batch (of one micro-batch) at a time, its tokens split over the batch shards like
        # the rows; the backward recomputes the block and also holds its gradient.
        micro_tokens = -(-batch // num_microbatches) * L
        chunk = -(-min(logits_chunk_size, micro_tokens) // n_batch)
        out["logits"] = 2 * chunk * vocab * logit_bytes
    if kv_cache_len is not None:
        kv_rows_total = batch if kv_cache_batch is None else kv_cache_batch
        kv_rows = -(-kv_rows_total // _dim_shards("batch", kv_rows_total, rules, amesh))
        out["kv_cache"] = 2 * c.num_layers * kv_rows * kv_cache_len * kv_heads * hd * act_bytes
    if tx is not None and not donate:
        # Without donation the step writes the new params and optimizer state to fresh
        # buffers. They are written at the end (the optimizer update), when the
        # activations are dead, and XLA reuses their memory for activations before that:
        # only what exceeds activations + logits adds to the peak.
        out["new_state"] = max(0, out["params"] + out["optimizer"] - out["activations"] - out["logits"])
    out = {k: int(v) for k, v in out.items()}
    out["total"] = sum(out[k] for k in MEMORY_TERMS)
    out["num_params"] = num_params
    out["microbatch_rows"] = rows
    return out


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= 0.95 * size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


def format_memory_estimate(estimate: Mapping[str, int], title: str = "") -> str:
    """The estimate as a text table: one row per term, bytes and share of the total."""
    total = max(estimate["total"], 1)
    lines = [title] if title else []
    lines.append(f"{'term':<15} {'per device':>14} {'share':>7}")
    lines.append("-" * 38)
    for term in MEMORY_TERMS:
        value = estimate[term]
        lines.append(f"{term:<15} {_human(value):>14} {100 * value / total:>6.1f}%")
    lines.append("-" * 38)
    lines.append(f"{'total':<15} {_human(estimate['total']):>14} {100.0:>6.1f}%")
    return "\n".join(lines)


def print_memory_estimate(
    config: Any,
    mesh: MeshLike,
    rules: Rules = LOGICAL_AXIS_RULES,
    **kwargs: Any,
) -> dict[str, int]:
    """:func:`estimate_memory` printed as a table (see :func:`format_memory_estimate`).

    Returns:
      The estimate dict.
    """
    estimate = estimate_memory(config, mesh, rules, **kwargs)
    sizes = dict(abstract_mesh(mesh).shape)
    opt = kwargs.get("optimizer", "adamw")
    opt = opt if isinstance(opt, (str, type(None))) else type(opt).__name__
    title = (
        f"{getattr(config, 'model_type', 'model')}: {_count(estimate['num_params'])} params | "
        f"mesh {sizes} | batch {kwargs['batch']} x {kwargs['seq_len']} tokens "
        f"({estimate['microbatch_rows']} per device per micro-batch) | "
        f"params {np.dtype(kwargs.get('param_dtype', jnp.bfloat16)).name} | optimizer {opt} | "
        f"remat {bool(kwargs.get('remat', False))} | kv cache {kwargs.get('kv_cache_len')}"
    )
    print(format_memory_estimate(estimate, title))
    return estimate


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jaxrl_llm.parallel.memory",
        description="Per-device memory estimate of a model on a (data, fsdp, tensor) mesh.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="Hugging Face config.json of the model")
    src.add_argument("--tiny", metavar="FAMILY", help="a tiny_config preset (llama, qwen3, ...)")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor sizes (default 1,1,1)")
    p.add_argument("--batch", type=int, required=True, help="global batch rows per update")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    p.add_argument("--param-dtype", default="bfloat16")
    p.add_argument("--dtype", default=None, help="activation dtype (default: param dtype)")
    p.add_argument("--optimizer", default="adamw", help=f"one of {OPTIMIZERS} or 'none' (frozen)")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--kv-cache-len", type=int, default=None)
    p.add_argument("--kv-cache-batch", type=int, default=None)
    p.add_argument("--logits-chunk-size", type=int, default=None,
                   help="logprob_chunk_size of the trainer (chunked log-probs)")
    p.add_argument("--fused-attention", action="store_true", help="cuDNN / flash attention")
    p.add_argument("--no-donate", action="store_true",
                   help="the step does not donate its input state (make_sft_update)")
    p.add_argument("--replicate-over-fsdp", action="store_true",
                   help="rules of a frozen model replicated over data/fsdp (rules_for_role)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """Command-line entry point (see the module docstring)."""
    from jaxrl_llm.models.config import ModelConfig, tiny_config
    from jaxrl_llm.parallel.rules import rules_for_role

    args = _parse_args(argv)
    if args.config:
        with open(args.config) as f:
            config = ModelConfig.from_hf(json.load(f))
    else:
        config = tiny_config(args.tiny)
    mesh = tuple(int(s) for s in args.mesh.split(","))
    optimizer = None if args.optimizer.lower() == "none" else args.optimizer
    role = "policy" if optimizer is not None else "reference"
    return print_memory_estimate(
        config,
        mesh,
        rules_for_role(role, replicate_over_fsdp=args.replicate_over_fsdp),
        batch=args.batch,
        seq_len=args.seq_len,
        param_dtype=jnp.dtype(args.param_dtype),
        dtype=None if args.dtype is None else jnp.dtype(args.dtype),
        optimizer=optimizer,
        remat=args.remat,
        kv_cache_len=args.kv_cache_len,
        kv_cache_batch=args.kv_cache_batch,
        num_microbatches=args.microbatches,
        logits_chunk_size=args.logits_chunk_size,
        fused_attention=args.fused_attention,
        donate=not args.no_donate,
    )


if __name__ == "__main__":
    main()
