"""ModelConfig: HF config parsing for every family, round trips, validation errors, tiny
presets (their parameter counts equal the transformers models')."""

import pytest
from flax import nnx

from jaxrl_llm.models import FAMILIES, CausalLM, ModelConfig, count_params, tiny_config
from tests.models.helpers import hf_config_dict


def _hf_dict(family, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **hf_config_dict(family, **kw)).to_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_reads_every_family(family):
    cfg = ModelConfig.from_hf(_hf_dict(family))
    assert cfg.model_type == family and cfg.num_layers == 2 and cfg.num_kv_heads == 2
    assert cfg.head_dim == (16 if family in ("qwen3", "qwen3_moe") else 8)
    assert cfg.qkv_bias == (family == "qwen2")
    assert cfg.qk_norm == (family in ("qwen3", "qwen3_moe"))
    assert cfg.is_moe == (family in ("mixtral", "qwen3_moe"))
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_rope_and_sliding_fields():
    legacy = _hf_dict("llama")
    del legacy["rope_parameters"]
    legacy.update(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = ModelConfig.from_hf(legacy)
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor) == ("linear", 5e5, 2.0)
    l3 = ModelConfig.from_hf(
        _hf_dict(
            "llama",
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=1e4,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        )
    )
    assert l3.rope_type == "llama3" and l3.rope_original_max_position_embeddings == 64
    assert ModelConfig.from_hf(l3.to_hf()) == l3
    mistral = ModelConfig.from_hf(_hf_dict("mistral", sliding_window=7))
    assert mistral.layer_window(0) == mistral.layer_window(1) == 7
    qwen2 = ModelConfig.from_hf(
        _hf_dict("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1)
    )
    assert (qwen2.layer_window(0), qwen2.layer_window(1)) == (None, 5)
    off = ModelConfig.from_hf(_hf_dict("qwen2", sliding_window=5))  # use_sliding_window False
    assert off.sliding_window is None
    moe = ModelConfig.from_hf(_hf_dict("qwen3_moe", mlp_only_layers=[0]))
    assert [moe.is_moe_layer(i) for i in range(2)] == [False, True] and moe.num_moe_layers == 1


@pytest.mark.parametrize(
    "change,field",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_kv_heads"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "factor"),
    ],
)
def test_from_hf_errors_name_the_field(change, field):
    raw = {**_hf_dict("llama"), **change}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf(raw)


def test_config_validation():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        tiny_config("mixtral", num_experts_per_tok=9)
    with pytest.raises(ValueError, match="head_dim"):
        tiny_config("llama", head_dim=7)
    with pytest.raises(ValueError, match="pad_token_id"):
        tiny_config("llama", vocab_size=100, bos_token_id=None)
    with pytest.raises(ValueError, match="family"):
        tiny_config("gpt2")


# parameter counts of the presets (reported in the module README / final report).
PRESET_PARAMS = {
    "llama": 90624,
    "mistral": 90624,
    "qwen2": 90880,
    "qwen3": 90688,
    "mixtral": 255168,
    "qwen3_moe": 140352,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_presets_match_transformers_param_count(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_config(family)
    model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    hf_model = AutoModelForCausalLM.from_config(hf_cfg)
    assert count_params(model) == sum(p.numel() for p in hf_model.parameters())
    assert count_params(model) == PRESET_PARAMS[family]
