"""Distillation trainer (GKD): the objective equals the divergence of two plain forwards,
a student equal to its teacher has zero loss, λ picks the data source, the divergence to
the teacher falls over training (on- and off-policy), bad input is named."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.train.distill import DistillConfig, distill_objective, train
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
TOK = CharTokenizer()
RECORDS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(1, 9) for b in range(1, 5)]


def _model(seed, **kw):
    return CausalLM(tiny_config("llama", **{**TINY, **kw}), rngs=nnx.Rngs(seed))


def _config(tmp_path, **kw):
    fields = dict(run=RunConfig(output_dir=str(tmp_path), total_steps=2, progress=False),
                  optim=OptimConfig(learning_rate=3e-3), prompts_per_step=4, max_prompt_len=8, max_new_tokens=6)
    fields.update(kw)
    return DistillConfig(**fields)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_objective_equals_the_divergence_of_two_plain_forwards(kind):
    student, teacher = _model(0), _model(1, hidden_size=48, head_dim=12)  # a teacher of another size
    rng = np.random.default_rng(0)
    p, t = 5, 6
    tokens = jnp.asarray(rng.integers(0, 256, (3, p + t)), jnp.int32)
    full_mask = np.ones((3, p + t), np.int32)
    full_mask[0, :2] = 0  # left padding
    full_mask[1, -2:] = 0  # a short completion
    mask = jnp.asarray(full_mask[:, p:], jnp.float32)
    config = DistillConfig(divergence=kind, beta=0.3, logprob_chunk_size=4)
    loss, metrics = distill_objective(student, teacher, tokens, jnp.asarray(full_mask), mask, p, config)
    s_logits, _ = student(tokens, attention_mask=jnp.asarray(full_mask))
    t_logits, _ = teacher(tokens, attention_mask=jnp.asarray(full_mask))
    per_token = ops.divergence_from_logits(s_logits[:, p - 1:-1], t_logits[:, p - 1:-1], mask, kind=kind, beta=0.3)
    np.testing.assert_allclose(float(loss), float(ops.aggregate_loss(per_token, mask, "token_mean")), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["divergence"]), float(ops.masked_mean(per_token, mask)), rtol=1e-5)
    assert float(loss) > 0


def test_a_student_equal_to_its_teacher_has_zero_loss(tmp_path):
    teacher = _model(3)
    result = train(_config(tmp_path, optim=OptimConfig(learning_rate=0.0)), student=_model(3), teacher=teacher,
                   tokenizer=TOK, prompts=RECORDS)
    assert all(abs(row["divergence"]) < 1e-6 for row in result.history)


def test_lmbda_picks_the_data_source(tmp_path):
    on = train(_config(tmp_path / "on", lmbda=1.0, divergence="reverse_kl"), student=_model(0), teacher=_model(1),
               tokenizer=TOK, prompts=[{"prompt": r["prompt"]} for r in RECORDS])  # no completions needed
    assert [row["on_policy"] for row in on.history] == [1.0, 1.0]
    off = train(_config(tmp_path / "off", lmbda=0.0), student=_model(0), teacher=_model(1), tokenizer=TOK,
                prompts=RECORDS)
    assert [row["on_policy"] for row in off.history] == [0.0, 0.0]
    # dataset completions: the answer's digits + eos
    assert off.history[0]["response_length_mean"] == pytest.approx(
        np.mean([len(r["completion"]) + 1 for r in RECORDS]), abs=1.0)
    mixed = train(_config(tmp_path / "mix", lmbda=0.5, run=RunConfig(output_dir=str(tmp_path / "mix"),
                                                                      total_steps=8, progress=False)),
                  student=_model(0), teacher=_model(1), tokenizer=TOK, prompts=RECORDS)
    assert 0 < np.mean([row["on_policy"] for row in mixed.history]) < 1


@pytest.mark.parametrize("lmbda, kind", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_divergence_to_the_teacher_falls(tmp_path, lmbda, kind):
    """40 steps from a random student towards a random teacher of another size, 2 seeds:
    the mean divergence of the last 10 steps is below 0.6 × that of the first 5."""
    for seed in (0, 1):
        config = _config(tmp_path / f"{seed}", lmbda=lmbda, divergence=kind,
                         run=RunConfig(output_dir=str(tmp_path / f"{seed}"), total_steps=40, progress=False, seed=seed))
        result = train(config, student=_model(seed), teacher=_model(seed + 10, hidden_size=48, head_dim=12),
                       tokenizer=TOK, prompts=RECORDS)
        curve = [row["divergence"] for row in result.history]
        assert np.mean(curve[-10:]) < 0.6 * np.mean(curve[:5]), (seed, curve[:5], curve[-10:])


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="lmbda"):
        DistillConfig(lmbda=1.5)
    with pytest.raises(ValueError, match="divergence must be one of"):
        DistillConfig(divergence="kl")
    with pytest.raises(ValueError, match="teacher_top_k"):
        DistillConfig(teacher_top_k=0)
    with pytest.raises(ValueError, match="has no 'completion'"):
        train(_config(tmp_path / "a", lmbda=0.0), student=_model(0), teacher=_model(1), tokenizer=TOK,
              prompts=[{"prompt": r["prompt"]} for r in RECORDS])
    with pytest.raises(ValueError, match="teacher vocab_size=300 != student vocab_size=259"):
        train(_config(tmp_path / "b"), student=_model(0), teacher=_model(1, vocab_size=300), tokenizer=TOK,
              prompts=RECORDS)
    with pytest.raises(ValueError, match="teacher is required"):
        train(_config(tmp_path / "c"), student=_model(0), teacher=None, tokenizer=TOK, prompts=RECORDS)


def test_resume_continues_exactly(tmp_path):
    full = train(_config(tmp_path / "full", lmbda=0.5, run=RunConfig(output_dir=str(tmp_path / "full"),
                                                                      total_steps=4, progress=False)),
                 student=_model(0), teacher=_model(1), tokenizer=TOK, prompts=RECORDS)
    half = _config(tmp_path / "half", lmbda=0.5, run=RunConfig(output_dir=str(tmp_path / "half"), total_steps=2,
                                                                progress=False, checkpoint_every=1))
    train(half, student=_model(0), teacher=_model(1), tokenizer=TOK, prompts=RECORDS)
    resumed = train(dataclasses.replace(half, run=dataclasses.replace(half.run, total_steps=4, resume=True)),
                    student=_model(0), teacher=_model(1), tokenizer=TOK, prompts=RECORDS)
    for a, b in zip(full.history[2:], resumed.history[-2:]):
        assert a["on_policy"] == b["on_policy"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for x, y in zip(jax.tree.leaves(nnx.state(full.model, nnx.Param)),
                    jax.tree.leaves(nnx.state(resumed.model, nnx.Param))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
