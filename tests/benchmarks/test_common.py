"""benchmarks/common.py: model FLOPs per token, the roofline rate, the GEMM measurement."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import common  # noqa: E402
from jaxrl_llm.models.config import tiny_config  # noqa: E402
from jaxrl_llm.models.transformer import CausalLM  # noqa: E402


@pytest.mark.parametrize("tied", [True, False])
def test_decoder_flops_are_two_per_matmul_weight_plus_attention(tied):
    cfg = tiny_config("llama", hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, vocab_size=512, tie_word_embeddings=tied)
    params = nnx.state(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    leaves = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(params)]
    matmul = sum(int(np.prod(x.shape)) for name, x in leaves
                 if x.ndim >= 2 and "embed" not in name and "lm_head" not in name)
    flops = common.decoder_flops_per_token(cfg, context=0)
    assert flops == {"layers": 2.0 * matmul, "unembed": 2.0 * 64 * 512}  # the unembedding counts, tied or not
    with_attention = common.decoder_flops_per_token(cfg, context=10)
    assert with_attention["layers"] - flops["layers"] == 2 * cfg.num_layers * 2 * 4 * 16 * 10  # q·k and p·v


def test_roofline_rate_is_the_flop_weighted_harmonic_rate():
    # 2 FLOPs at 1 FLOP/s and 1 FLOP at 0.5 FLOP/s take 4 s: 3 FLOPs / 4 s
    assert common.roofline_rate({"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 0.5}) == pytest.approx(0.75)
    fields = common.roofline_fields({"a": {"xla": 1.0, "torch": 0.5}, "b": {"xla": 0.25, "torch": 0.5}},
                                    {"a": 2.0, "b": 1.0})
    assert fields["roofline_flops_per_s"] == pytest.approx(0.75)  # the faster library per shape
    assert fields["gemm_a_torch_flops_per_s"] == 0.5 and fields["gemm_b_xla_flops_per_s"] == 0.25


def test_gemm_flops_per_s_measures_both_libraries():
    rates = common.gemm_flops_per_s(4, 16, 32, stack=3, reps=2)
    assert set(rates) == {"xla", "torch"} and all(r > 0 for r in rates.values())
