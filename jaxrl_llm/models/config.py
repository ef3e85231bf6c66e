"""ModelConfig: the architecture hyper-parameters of a decoder-only transformer.

One frozen (hashable) dataclass covers the families llama, mistral, qwen2 (q/k/v bias),
qwen3 (q/k RMSNorm, explicit head_dim), mixtral and qwen3_moe (mixture of experts).
`ModelConfig.from_hf(config_dict)` reads a Hugging Face `config.json` dict (transformers
4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`), `to_hf()` writes one back, and
`tiny_config(family, **overrides)` gives small presets for training from scratch offline.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
MOE_FAMILIES = ("mixtral", "qwen3_moe")
ROPE_TYPES = ("default", "linear", "llama3")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (hashable: usable as a jit static arg).

    Attributes:
        model_type: family, one of `FAMILIES`.
        vocab_size: V.
        hidden_size: D.
        intermediate_size: F, width of the dense SwiGLU MLP (mixtral: of each expert).
        num_layers: number of decoder blocks.
        num_heads: H, query heads.
        num_kv_heads: K, key/value heads (GQA; H must be a multiple of K).
        head_dim: Hd (qwen3 sets it explicitly; otherwise D // H).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_type: "default", "linear" (positions divided by rope_factor) or "llama3".
        rope_factor, rope_low_freq_factor, rope_high_freq_factor,
        rope_original_max_position_embeddings: rope scaling parameters.
        max_position_embeddings: context length the checkpoint advertises.
        tie_word_embeddings: output matrix = embedding transpose.
        qkv_bias: biases on q/k/v projections (qwen2).
        qk_norm: RMSNorm over head_dim on q and k before RoPE (qwen3, qwen3_moe).
        sliding_window: W, or None. A query at position p attends keys at positions > p - W.
        sliding_layers: indices of the layers that use the window; None means all layers.
        num_experts: E (0 for dense models).
        num_experts_per_tok: k, experts chosen per token.
        moe_intermediate_size: F of each expert.
        norm_topk_prob: renormalise the k chosen router probabilities to sum to 1.
        router_aux_loss_coef: coefficient of the load-balancing loss (used by trainers).
        mlp_only_layers: layers that use a dense MLP instead of the MoE block (qwen3_moe).
        decoder_sparse_step: qwen3_moe: layer i is MoE iff (i + 1) % step == 0.
        bos_token_id, eos_token_id, pad_token_id: special ids (kept for `to_hf`).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; expected one of {FAMILIES}."
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_type={self.rope_type!r} is not supported; expected one of {ROPE_TYPES}."
            )
        if self.rope_type != "default" and self.rope_factor <= 0:
            raise ValueError(f"rope_factor must be > 0, got {self.rope_factor}.")
        if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(
                "rope_high_freq_factor must be > rope_low_freq_factor for llama3 rope scaling, got "
                f"{self.rope_high_freq_factor} <= {self.rope_low_freq_factor}."
            )
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name}={value} is outside the vocabulary [0, vocab_size={self.vocab_size})."
                )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(
                f"sliding_window must be a positive int or None, got {self.sliding_window}."
            )
        if self.is_moe:
            if self.num_experts <= 0:
                raise ValueError(
                    f"num_experts must be > 0 for {self.model_type}, got {self.num_experts}."
                )
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got "
                    f"{self.num_experts_per_tok}."
                )
            if self.moe_intermediate_size <= 0:
                raise ValueError(
                    f"moe_intermediate_size must be > 0, got {self.moe_intermediate_size}."
                )
            if (
                self.model_type == "mixtral"
                and self.moe_intermediate_size != self.intermediate_size
            ):
                raise ValueError(
                    "mixtral experts use intermediate_size: moe_intermediate_size "
                    f"({self.moe_intermediate_size}) must equal intermediate_size "
                    f"({self.intermediate_size})."
                )
            if self.decoder_sparse_step <= 0:
                raise ValueError(
                    f"decoder_sparse_step must be > 0, got {self.decoder_sparse_step}."
                )

    # Derived sizes -------------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.model_type in MOE_FAMILIES

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder block `layer` uses the MoE block (qwen3_moe rule; mixtral: all)."""
        if not self.is_moe:
            return False
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of decoder block `layer` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers is None or layer in self.sliding_layers:
            return self.sliding_window
        return None

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # Hugging Face interop ------------------------------------------------------------------

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        """Builds a ModelConfig from a Hugging Face `config.json` dict.

        Raises:
            ValueError: unknown `model_type`, a missing required field, or a feature the
                model code does not implement (e.g. hidden_act other than silu), naming the field.
        """
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict (parsed config.json), got {type(config)}.")
        family = config.get("model_type")
        if family not in FAMILIES:
            raise ValueError(
                f"model_type={family!r} in config.json is not supported; "
                f"expected one of {FAMILIES}."
            )

        def req(name):
            if config.get(name) is None:
                raise ValueError(f"config.json for {family} is missing required field {name!r}.")
            return config[name]

        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only 'silu').")
        if config.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported.")
        if family != "qwen2" and config.get("attention_bias"):
            raise ValueError(f"attention_bias=True is not supported for {family}.")
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1.0 is not supported.")

        hidden = int(req("hidden_size"))
        heads = int(req("num_attention_heads"))
        num_layers = int(req("num_hidden_layers"))
        head_dim = config.get("head_dim") or hidden // heads
        kv_heads = config.get("num_key_value_heads") or heads

        rope = _read_rope(config)

        sliding_window, sliding_layers = None, None
        if family in ("mistral", "mixtral"):
            sliding_window = config.get("sliding_window")
        elif config.get("use_sliding_window") and config.get("sliding_window"):
            sliding_window = config["sliding_window"]
            layer_types = config.get("layer_types")
            if family == "qwen3_moe":
                sliding_layers = None
            elif layer_types is not None:
                sliding_layers = tuple(
                    i for i, t in enumerate(layer_types) if t == "sliding_attention"
                )
            else:
                start = config.get("max_window_layers", num_layers)
                sliding_layers = tuple(range(start, num_layers))

        moe = {}
        if family in MOE_FAMILIES:
            num_experts = config.get("num_local_experts") or config.get("num_experts")
            if num_experts is None:
                raise ValueError(
                    f"config.json for {family} is missing required field 'num_local_experts' "
                    "(or 'num_experts')."
                )
            moe = dict(
                num_experts=int(num_experts),
                num_experts_per_tok=int(req("num_experts_per_tok")),
                router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
            )
            if family == "mixtral":
                moe.update(moe_intermediate_size=int(req("intermediate_size")), norm_topk_prob=True)
            else:
                moe.update(
                    moe_intermediate_size=int(req("moe_intermediate_size")),
                    norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                    mlp_only_layers=tuple(config.get("mlp_only_layers") or ()),
                    decoder_sparse_step=int(config.get("decoder_sparse_step", 1)),
                )

        eos = config.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        default_tie = False
        return cls(
            model_type=family,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", default_tie)),
            qkv_bias=family == "qwen2",
            qk_norm=family in ("qwen3", "qwen3_moe"),
            sliding_window=None if sliding_window is None else int(sliding_window),
            sliding_layers=sliding_layers,
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=config.get("pad_token_id"),
            **rope,
            **moe,
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict (transformers 5 `rope_parameters` + legacy keys)."""
        rope_parameters: dict[str, Any] = {
            "rope_type": self.rope_type,
            "rope_theta": self.rope_theta,
        }
        if self.rope_type in ("linear", "llama3"):
            rope_parameters["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope_parameters.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": [_ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                list(self.eos_token_id)
                if isinstance(self.eos_token_id, tuple)
                else self.eos_token_id
            ),
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.rope_type != "default":
            out["rope_scaling"] = dict(rope_parameters)
        if self.model_type in ("llama", "qwen3", "qwen3_moe"):
            out["attention_bias"] = False
        if self.model_type in ("mistral", "mixtral"):
            out["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3", "qwen3_moe"):
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
            if self.model_type != "qwen3_moe":
                out["max_window_layers"] = self.num_layers
                out["layer_types"] = [
                    "sliding_attention" if self.layer_window(i) is not None else "full_attention"
                    for i in range(self.num_layers)
                ]
        if self.is_moe:
            out.update(
                num_local_experts=self.num_experts,
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                router_aux_loss_coef=self.router_aux_loss_coef,
                output_router_logits=False,
            )
        if self.model_type == "mixtral":
            out["router_jitter_noise"] = 0.0
        if self.model_type == "qwen3_moe":
            out.update(
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                mlp_only_layers=list(self.mlp_only_layers),
                decoder_sparse_step=self.decoder_sparse_step,
            )
        return out


def _read_rope(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE fields from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    if not params:
        params = dict(scaling)
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; expected one of {ROPE_TYPES}."
        )
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ValueError(f"rope_scaling of type {rope_type!r} is missing field 'factor'.")
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise ValueError(f"rope_scaling of type 'llama3' is missing field {key!r}.")
        out.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_position_embeddings=int(
                params.get(
                    "original_max_position_embeddings", config.get("max_position_embeddings", 8192)
                )
            ),
        )
    return out


_TINY_BASE = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    bos_token_id=257,
    eos_token_id=258,
    pad_token_id=256,
)

_TINY_FAMILY = {
    "llama": {},
    "mistral": dict(sliding_window=256),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    "mixtral": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, tie_word_embeddings=False
    ),
    "qwen3_moe": dict(
        qk_norm=True,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
    ),
}


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
    """A small preset (2 layers, D=64, vocab 259 = `CharTokenizer` size) for offline runs.

    Args:
        family: one of `FAMILIES`.
        **overrides: any `ModelConfig` field.
    """
    if family not in _TINY_FAMILY:
        raise ValueError(f"family={family!r} is not supported; expected one of {FAMILIES}.")
    fields = {**_TINY_BASE, **_TINY_FAMILY[family], **overrides}
    if (
        family == "mixtral"
        and "intermediate_size" in overrides
        and "moe_intermediate_size" not in overrides
    ):
        fields["moe_intermediate_size"] = overrides["intermediate_size"]
    return ModelConfig(model_type=family, **fields)
