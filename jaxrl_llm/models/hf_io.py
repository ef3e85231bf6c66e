"""Hugging Face checkpoint interop from local directories (no downloads).

`load_hf(path)` reads `config.json` + `model.safetensors` (or a sharded
`model.safetensors.index.json`) into a `CausalLM` (or a reward / value
`ScalarHeadModel`), streaming one tensor at a time with `safetensors.safe_open`: the
model is built abstractly (`nnx.eval_shape`) and each tensor is converted on the host and
placed on device before the next is read, so a checkpoint never needs two host copies.
`save_hf(model, path, tokenizer=...)` writes the same format (optionally sharded),
loadable by `transformers.AutoModelForCausalLM.from_pretrained` (or
`AutoModelForSequenceClassification` for reward models), plus generation_config.json and,
given the tokenizer (HF or `CharTokenizer`), its files and chat template, so the folder is
all `from_pretrained` / vLLM need. `load_tokenizer(path)` wraps
`AutoTokenizer.from_pretrained` on a local path.

HF stores linear weights as [out, in]; ours are [in, ...out] with heads split:
q_proj [H·Hd, D] ↔ [D, H, Hd], o_proj [D, H·Hd] ↔ [H, Hd, D], MLP [F, D] ↔ [D, F],
lm_head / score [V, D] ↔ [D, V], router [E, D] ↔ [D, E], experts stacked on a leading
E axis (HF per-expert tensors, or transformers 5 fused `gate_up_proj`/`down_proj`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.heads import ScalarHeadModel
from jaxrl_llm.models.layer_stacking import backbone, stack_layers, unstack_layers
from jaxrl_llm.models.transformer import CausalLM
from jaxrl_llm.parallel.placement import host_array

logger = logging.getLogger(__name__)

KINDS = ("causal_lm", "reward", "value")
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_SEQ_CLS_ARCH = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "mixtral": "MixtralForSequenceClassification",
    "qwen3_moe": "Qwen3MoeForSequenceClassification",
}

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor ↔ (a slice of) one of our parameters."""

    hf_key: str
    path: Path  # our parameter path in nnx.state
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    expert: int | None = None  # slot on the leading E axis, or None (whole param)


def _linear(out_shape_ours):
    """HF [out, in] ↔ ours [in, *out_shape_ours]."""

    def to_ours(w):
        return np.ascontiguousarray(w.T).reshape(w.shape[1], *out_shape_ours)

    def to_hf(w):
        return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)

    return to_ours, to_hf


def _out_proj(in_shape_ours):
    """HF o_proj [D, H·Hd] ↔ ours [H, Hd, D]."""

    def to_ours(w):
        return np.ascontiguousarray(w.T).reshape(*in_shape_ours, w.shape[0])

    def to_hf(w):
        return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)

    return to_ours, to_hf


def _reshape(shape_ours):
    def to_ours(w):
        return w.reshape(shape_ours)

    def to_hf(w):
        return w.reshape(-1)

    return to_ours, to_hf


_IDENTITY = (lambda w: w, lambda w: w)


def _tensor_specs(config: ModelConfig, kind: str) -> list[_Tensor]:
    """All HF tensors of a checkpoint of `config` (kind: causal_lm / reward / value)."""
    d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    specs = [
        _Tensor(
            "model.embed_tokens.weight", ("model", "embed"), (config.vocab_size, d), *_IDENTITY
        ),
        _Tensor("model.norm.weight", ("model", "norm", "scale"), (d,), *_IDENTITY),
    ]
    for i in range(config.num_layers):
        hf = f"model.layers.{i}."
        ours = ("model", "layers", i)
        attn = ours + ("attn",)
        specs += [
            _Tensor(
                hf + "input_layernorm.weight", ours + ("input_norm", "scale"), (d,), *_IDENTITY
            ),
            _Tensor(
                hf + "post_attention_layernorm.weight",
                ours + ("post_attn_norm", "scale"),
                (d,),
                *_IDENTITY,
            ),
            _Tensor(
                hf + "self_attn.q_proj.weight", attn + ("q_proj",), (h * hd, d), *_linear((h, hd))
            ),
            _Tensor(
                hf + "self_attn.k_proj.weight", attn + ("k_proj",), (kv * hd, d), *_linear((kv, hd))
            ),
            _Tensor(
                hf + "self_attn.v_proj.weight", attn + ("v_proj",), (kv * hd, d), *_linear((kv, hd))
            ),
            _Tensor(
                hf + "self_attn.o_proj.weight", attn + ("o_proj",), (d, h * hd), *_out_proj((h, hd))
            ),
        ]
        if config.qkv_bias:
            specs += [
                _Tensor(
                    hf + "self_attn.q_proj.bias", attn + ("q_bias",), (h * hd,), *_reshape((h, hd))
                ),
                _Tensor(
                    hf + "self_attn.k_proj.bias",
                    attn + ("k_bias",),
                    (kv * hd,),
                    *_reshape((kv, hd)),
                ),
                _Tensor(
                    hf + "self_attn.v_proj.bias",
                    attn + ("v_bias",),
                    (kv * hd,),
                    *_reshape((kv, hd)),
                ),
            ]
        if config.qk_norm:
            specs += [
                _Tensor(
                    hf + "self_attn.q_norm.weight", attn + ("q_norm", "scale"), (hd,), *_IDENTITY
                ),
                _Tensor(
                    hf + "self_attn.k_norm.weight", attn + ("k_norm", "scale"), (hd,), *_IDENTITY
                ),
            ]
        mlp = ours + ("mlp",)
        if config.is_moe_layer(i):
            f, e = config.moe_intermediate_size, config.num_experts
            if config.model_type == "mixtral":
                moe_hf, names = hf + "block_sparse_moe.", ("w1", "w3", "w2")
            else:
                moe_hf, names = hf + "mlp.", ("gate_proj", "up_proj", "down_proj")
            specs.append(_Tensor(moe_hf + "gate.weight", mlp + ("router",), (e, d), *_linear((e,))))
            for j in range(e):
                ex = f"{moe_hf}experts.{j}."
                specs += [
                    _Tensor(
                        ex + names[0] + ".weight",
                        mlp + ("gate_proj",),
                        (f, d),
                        *_linear((f,)),
                        expert=j,
                    ),
                    _Tensor(
                        ex + names[1] + ".weight",
                        mlp + ("up_proj",),
                        (f, d),
                        *_linear((f,)),
                        expert=j,
                    ),
                    _Tensor(
                        ex + names[2] + ".weight",
                        mlp + ("down_proj",),
                        (d, f),
                        *_linear((d,)),
                        expert=j,
                    ),
                ]
        else:
            f = config.intermediate_size
            specs += [
                _Tensor(hf + "mlp.gate_proj.weight", mlp + ("gate_proj",), (f, d), *_linear((f,))),
                _Tensor(hf + "mlp.up_proj.weight", mlp + ("up_proj",), (f, d), *_linear((f,))),
                _Tensor(hf + "mlp.down_proj.weight", mlp + ("down_proj",), (d, f), *_linear((d,))),
            ]
    if kind == "causal_lm":
        if not config.tie_word_embeddings:
            specs.append(
                _Tensor(
                    "lm_head.weight",
                    ("lm_head",),
                    (config.vocab_size, d),
                    *_linear((config.vocab_size,)),
                )
            )
    else:
        specs.append(_Tensor("score.weight", ("score",), (1, d), *_linear((1,))))
    return specs


def _fused_expert_keys(config: ModelConfig) -> dict[str, tuple[int, str]]:
    """transformers 5 fused expert tensors: key → (layer, 'gate_up' | 'down')."""
    out = {}
    prefix = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
    for i in range(config.num_layers):
        if config.is_moe_layer(i):
            out[f"model.layers.{i}.{prefix}.experts.gate_up_proj"] = (i, "gate_up")
            out[f"model.layers.{i}.{prefix}.experts.down_proj"] = (i, "down")
    return out


@contextlib.contextmanager
def _named_corruption(file: str):
    """A safetensors error (truncated download, cut copy, garbage) re-raised naming the file."""
    try:
        yield
    except SafetensorError as err:
        size = os.path.getsize(file) if os.path.exists(file) else 0
        raise ValueError(
            f"{file} is truncated/corrupt: {err} ({size} bytes on disk). Expected a complete "
            "safetensors file; download or export the checkpoint again."
        ) from err


def _read_json_file(file: str, what: str) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} ({what}) is truncated/corrupt: not valid JSON ({err}).") from err


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        data = _read_json_file(index, "the index of the weight shards")
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            raise ValueError(f"{index} has no 'weight_map' mapping of tensor names to shard files.")
        weight_map = data["weight_map"]
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that are not in {path!r}: {missing[:4]}.")
        return files
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {path!r} "
        "(only safetensors checkpoints are supported)."
    )


def read_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, raw config dict) from `path/config.json`."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no config.json in {path!r}.")
    raw = _read_json_file(cfg_path, "the model config")
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object (the model config), got {type(raw).__name__}.")  # noqa: TRY004
    return ModelConfig.from_hf(raw), raw


def _get_variable(model: nnx.Module, path: Path) -> nnx.Variable:
    obj = model
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def _shape_error(key: str, got, expected, config: ModelConfig, source: str | None = None) -> ValueError:
    where = f" ({source})" if source else ""
    return ValueError(
        f"checkpoint tensor {key!r} has shape {tuple(got)} but the config expects "
        f"{tuple(expected)} (hidden_size={config.hidden_size}, vocab_size={config.vocab_size}, "
        f"num_heads={config.num_heads}, num_kv_heads={config.num_kv_heads}, "
        f"head_dim={config.head_dim}, intermediate_size={config.intermediate_size}, "
        f"moe_intermediate_size={config.moe_intermediate_size}, "
        f"num_experts={config.num_experts}). config.json and the weights do not match{where}."
    )


def load_hf(
    path: str,
    dtype: Any = jnp.float32,
    *,
    compute_dtype: Any = None,
    kind: str = "causal_lm",
    pool: str | None = None,
    remat: bool = False,
    attention_impl: str = "xla",
    moe_impl: str = "dense",
    scan_layers: bool = False,
    rngs: nnx.Rngs | None = None,
    sharding_fn: Callable[[tuple, tuple], Any] | None = None,
):
    """Loads a local HF checkpoint directory.

    Args:
      path: directory with config.json and model.safetensors[.index.json].
      dtype: parameter dtype.
      compute_dtype: activation dtype (default: `dtype`).
      kind: "causal_lm" → `CausalLM`; "reward" / "value" → `ScalarHeadModel` (pool
        "last" / "none" unless `pool` is given). A `*ForSequenceClassification`
        checkpoint (num_labels=1) provides `score.weight`; a causal-LM checkpoint gives
        the backbone and a freshly initialised score head (its lm_head is dropped).
      remat, attention_impl, moe_impl, scan_layers: as `CausalLM`.
      rngs: RNGs for freshly initialised parameters (default nnx.Rngs(0)).
      sharding_fn: optional (logical_axis_names, shape) → jax.sharding.Sharding; each
        tensor is placed with it directly (e.g. onto a mesh).

    Returns:
      (model, config).

    Raises:
      ValueError: unsupported config, a tensor whose shape does not match the config
        (naming the tensor and both shapes), missing or unexpected tensors.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}.")
    config, raw = read_config(path)
    compute_dtype = compute_dtype or dtype
    rngs = rngs or nnx.Rngs(0)
    options = dict(
        param_dtype=dtype,
        dtype=compute_dtype,
        remat=remat,
        attention_impl=attention_impl,
        moe_impl=moe_impl,
    )  # built per layer, the checkpoint's layout; stacked at the end (scan_layers)
    if kind == "causal_lm":
        model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0), **options))
    else:
        num_labels = raw.get("num_labels", len(raw.get("id2label") or {}) or 1)
        is_seq_cls = any("SequenceClassification" in a for a in raw.get("architectures") or [])
        if is_seq_cls and num_labels != 1:
            raise ValueError(
                f"num_labels={num_labels} in config.json; a reward/value head needs 1."
            )
        pool = pool or ("last" if kind == "reward" else "none")
        model = nnx.eval_shape(
            lambda: ScalarHeadModel(config, rngs=nnx.Rngs(0), pool=pool, **options)
        )

    specs = _tensor_specs(config, kind)
    by_key = {s.hf_key: s for s in specs}
    fused = _fused_expert_keys(config) if config.is_moe else {}
    np_dtype = np.dtype(jnp.dtype(dtype))
    expert_buffers: dict[Path, np.ndarray] = {}
    expert_fill: dict[Path, set[int]] = {}
    loaded: set[str] = set()
    unexpected: list[str] = []

    def place(path_: Path, value: np.ndarray):
        var = _get_variable(model, path_)
        if tuple(value.shape) != tuple(var.get_value().shape):
            raise ValueError(
                f"internal: {path_} got {value.shape}, expected {var.get_value().shape}"
            )
        names = var.get_metadata().get("out_sharding") or var.get_metadata().get("sharding_names")
        if sharding_fn is not None:
            var.set_value(jax.device_put(value, sharding_fn(tuple(names or ()), value.shape)))
        else:
            var.set_value(jnp.asarray(value))

    for file in _checkpoint_files(path):
        with _named_corruption(file), safe_open(file, framework="np") as f:
            for key in f.keys():
                if key in by_key:
                    spec = by_key[key]
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != spec.hf_shape:
                        raise _shape_error(key, shape, spec.hf_shape, config, source=file)
                    value = spec.to_ours(f.get_tensor(key)).astype(np_dtype)
                    if spec.expert is None:
                        place(spec.path, value)
                    else:
                        # stack experts on the host; place as soon as all E are read.
                        if spec.path not in expert_buffers:
                            expert_buffers[spec.path] = np.zeros(
                                _get_variable(model, spec.path).get_value().shape, np_dtype
                            )
                            expert_fill[spec.path] = set()
                        expert_buffers[spec.path][spec.expert] = value
                        expert_fill[spec.path].add(spec.expert)
                        if len(expert_fill[spec.path]) == config.num_experts:
                            place(spec.path, expert_buffers.pop(spec.path))
                    loaded.add(key)
                elif key in fused:
                    layer, which = fused[key]
                    parts = _split_fused(f.get_tensor(key), key, layer, which, config)
                    for path_, value in parts.items():
                        place(path_, value.astype(np_dtype))
                    loaded.update(
                        s.hf_key
                        for s in specs
                        if s.expert is not None
                        and s.path[2] == layer
                        and ((which == "down") == (s.path[-1] == "down_proj"))
                    )
                elif key.endswith(_IGNORED_SUFFIXES):
                    continue
                elif key == "lm_head.weight" and (
                    kind != "causal_lm" or config.tie_word_embeddings
                ):
                    continue
                else:
                    unexpected.append(key)
    del expert_buffers  # incomplete expert stacks are reported as missing below

    if unexpected:
        raise ValueError(
            f"checkpoint {path!r} has tensors the {config.model_type} {kind} model does not "
            f"use: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}."
        )
    missing = [s.hf_key for s in specs if s.hf_key not in loaded]
    if missing == ["score.weight"]:
        d = config.hidden_size
        place(
            ("score",),
            np.asarray(0.02 * jax.random.normal(rngs.params(), (d, 1), jnp.float32)).astype(
                np_dtype
            ),
        )
        missing = []
    if missing:
        raise ValueError(
            f"checkpoint {path!r} is missing {len(missing)} tensors for {config.model_type} "
            f"(kind={kind}): {missing[:8]}{' ...' if len(missing) > 8 else ''}."
        )
    unset = [
        jax.tree_util.keystr(p)
        for p, leaf in jax.tree.flatten_with_path(nnx.state(model))[0]
        if isinstance(leaf, jax.ShapeDtypeStruct)
    ]
    if unset:
        raise ValueError(f"checkpoint {path!r} left parameters unset: {unset[:8]}.")
    if scan_layers:
        model = _stacked(model, sharding_fn)
    return model, config


def _stacked(model, sharding_fn):
    """`stack_layers(model)`, each stacked parameter placed by `sharding_fn` (if given)
    under its logical names, 'layers' first, like the per-layer tensors were."""
    model = stack_layers(model)
    if sharding_fn is not None:
        for _, var in nnx.iter_graph(backbone(model).stacks):
            if isinstance(var, nnx.Variable):
                names = var.get_metadata().get("out_sharding") or ()
                value = var.get_value()
                var.set_value(jax.device_put(value, sharding_fn(tuple(names), value.shape)))
    return model


def _split_fused(
    w: np.ndarray, key: str, layer: int, which: str, config: ModelConfig
) -> dict[Path, np.ndarray]:
    """transformers 5 fused experts → our params: gate_up_proj [E, 2F, D] → gate_proj,
    up_proj [E, D, F]; down_proj [E, D, F] → down_proj [E, F, D]."""
    e, f, d = config.num_experts, config.moe_intermediate_size, config.hidden_size
    expected = (e, 2 * f, d) if which == "gate_up" else (e, d, f)
    if tuple(w.shape) != expected:
        raise _shape_error(key, w.shape, expected, config)
    base = ("model", "layers", layer, "mlp")
    if which == "gate_up":
        parts = {"gate_proj": w[:, :f, :], "up_proj": w[:, f:, :]}
    else:
        parts = {"down_proj": w}
    return {
        base + (name,): np.ascontiguousarray(np.swapaxes(part, 1, 2))
        for name, part in parts.items()
    }


def save_hf(
    model: CausalLM | ScalarHeadModel,
    path: str,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: Any = None,
    tokenizer: Any = None,
) -> None:
    """Writes `model` as a HF checkpoint directory (config.json + safetensors, and for a
    causal LM generation_config.json).

    Args:
      model: a CausalLM (→ *ForCausalLM) or ScalarHeadModel (→ *ForSequenceClassification,
        num_labels=1).
      path: output directory (created).
      max_shard_bytes: above this total size, tensors are split into
        model-0000i-of-0000n.safetensors files plus model.safetensors.index.json.
      dtype: dtype of saved tensors (default: the parameter dtype).
      tokenizer: the model's tokenizer (HF tokenizer or `CharTokenizer`), saved alongside
        (`save_tokenizer`); its bos/eos/pad ids fill those config.json leaves unset and go
        into generation_config.json (`generation_config`).

    Multi-process (``jax.distributed``): every process must call it (each tensor is
    all-gathered, one at a time); only process 0 writes files.
    """
    writer = jax.process_index() == 0
    model = unstack_layers(model)  # HF names tensors per layer (a copy if stacked)
    config: ModelConfig = model.config
    kind = "causal_lm" if isinstance(model, CausalLM) else "reward"
    if writer:
        os.makedirs(path, exist_ok=True)
    hf_config = config.to_hf()
    if kind != "causal_lm":
        hf_config["architectures"] = [_SEQ_CLS_ARCH[config.model_type]]
        hf_config["id2label"] = {"0": "LABEL_0"}
        hf_config["label2id"] = {"LABEL_0": 0}
        hf_config["num_labels"] = 1
    first_param = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    out_dtype = np.dtype(jnp.dtype(dtype or first_param.dtype))
    hf_config["dtype"] = str(jnp.dtype(out_dtype))
    if tokenizer is not None:
        for name, value in zip(_TOKEN_ID_FIELDS, _tokenizer_ids(tokenizer)):
            if hf_config.get(name) is None and value is not None:
                hf_config[name] = value
    if writer:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        if kind == "causal_lm":
            gen = generation_config(config, tokenizer)
            if gen is not None:
                with open(os.path.join(path, "generation_config.json"), "w") as f:
                    json.dump(gen, f, indent=2)
        if tokenizer is not None:
            save_tokenizer(tokenizer, path)

    # group tensors into shards of at most max_shard_bytes.
    specs = _tensor_specs(config, kind)
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec.hf_shape)) * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes

    weight_map = {}
    cache: dict[Path, np.ndarray] = {}
    for n, shard in enumerate(shards):
        name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {}
        for spec in shard:
            if spec.expert is None:
                value = host_array(_get_variable(model, spec.path)[...])
            else:
                if spec.path not in cache:
                    cache.clear()
                    cache[spec.path] = host_array(_get_variable(model, spec.path)[...])
                value = cache[spec.path][spec.expert]
            tensors[spec.hf_key] = np.ascontiguousarray(spec.to_hf(value).astype(out_dtype))
            weight_map[spec.hf_key] = name
        if writer:
            save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        del tensors
    if writer and len(shards) > 1:
        total = sum(int(np.prod(s.hf_shape)) * out_dtype.itemsize for s in specs)
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _tokenizer_ids(tokenizer: Any) -> tuple[Any, Any, Any]:
    """(bos, eos, pad) ids of a HF tokenizer or CharTokenizer (None where it has none)."""
    return tuple(getattr(tokenizer, name, None) for name in _TOKEN_ID_FIELDS)


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def generation_config(config: ModelConfig, tokenizer: Any = None) -> dict[str, Any] | None:
    """The generation_config.json of an export: bos / eos / pad ids (greedy decoding and
    the other transformers defaults otherwise), as `transformers.GenerationConfig` writes it.

    eos: the tokenizer's eos first, then the model config's (a chat model may end turns
    with one token and documents with another: generation stops at any). bos: the
    tokenizer's, else the config's. pad: the tokenizer's, else the config's, else the first
    eos (what transformers' generate falls back to anyway, without its warning).
    None when no id is known at all.
    """
    bos, eos, pad = _tokenizer_ids(tokenizer) if tokenizer is not None else (None, None, None)
    eos_ids = list(dict.fromkeys(_id_list(eos) + _id_list(config.eos_token_id)))
    bos = bos if bos is not None else config.bos_token_id
    pad = pad if pad is not None else config.pad_token_id
    if pad is None and eos_ids:
        pad = eos_ids[0]
    if bos is None and not eos_ids and pad is None:
        return None
    ids = {
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "pad_token_id": None if pad is None else int(pad),
    }
    try:
        from transformers import GenerationConfig

        return GenerationConfig(**ids).to_diff_dict()
    except ImportError:  # transformers is a dependency; stay writable without it
        return {k: v for k, v in ids.items() if v is not None}


def save_tokenizer(tokenizer: Any, path: str | os.PathLike) -> None:
    """Writes `tokenizer`'s files (tokenizer.json, tokenizer_config.json, chat template,
    ...) into `path` with its `save_pretrained` (HF tokenizers and `CharTokenizer` have
    one); a tokenizer without it is skipped with a warning, the weights being saved."""
    save = getattr(tokenizer, "save_pretrained", None)
    if save is None:
        logger.warning(
            "%s has no save_pretrained: %s holds no tokenizer files; save them there yourself",
            type(tokenizer).__name__, path,
        )
        return
    save(str(path))


# Files of which a tokenizer directory holds at least one (HF fast / slow tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")


def load_tokenizer(path: str):
    """`transformers.AutoTokenizer.from_pretrained(path)` for a local directory only.

    Raises:
      FileNotFoundError: ``path`` is not a directory, or holds none of ``TOKENIZER_FILES``
        (naming the directory, what it holds and what was expected).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer path {path!r} is not a local directory.")
    if not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        present = sorted(os.listdir(path))
        held = f"holds only {present[:10]}{' ...' if len(present) > 10 else ''}" if present else "is empty"
        raise FileNotFoundError(
            f"tokenizer directory {path!r} {held}; expected tokenizer files: tokenizer.json and/or "
            "tokenizer_config.json (a fast tokenizer), or a vocabulary such as tokenizer.model / "
            "vocab.json + merges.txt / vocab.txt. Save them with tokenizer.save_pretrained(path)."
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
