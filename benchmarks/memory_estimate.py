"""Benchmark: `parallel.estimate_memory` vs XLA's compiled memory analysis of the SFT
trainer's real update step, per device, on several meshes.

The step is `train.sft.make_sft_update` as `train.sft.train` builds it: a model placed by
`Placement` (policy rules), AdamW from `make_optimizer`, a batch from `SFTLoader` split by
`Placement.rows`, traced under `placement.context()`. It is lowered and compiled (not run);
`compile().memory_analysis()` gives the per-device sizes of the SPMD program:

    compiled total = arguments + outputs − aliased + temporaries

and the estimate is `estimate_memory(..., logits_chunk_size=<trainer chunk>, donate=False)`
(`make_sft_update` does not donate its input state). Per mesh, one JSON line with both
breakdowns and the ratios estimate / compiled of

    * total                                  (the number to pick a mesh with),
    * state: params + optimizer vs the compiled arguments (exact up to the batch),
    * rest: grads + gathered_params + activations + logits + new_state vs outputs + temps
      (XLA places activations in the not-yet-written output buffers, so the compiled
      outputs and temps only make sense together).

`--model smollm2-135m-instruct` (or a local HF checkpoint folder) takes the model config
from that checkpoint instead of `--layers/--hidden/...` (only the config: the program is
the same, compiled from abstract state with `--abstract`).

On CPU the devices are simulated (`--xla_force_host_platform_device_count`, set here
before jax is imported). Output rows are appended to benchmarks/results/memory_estimate.jsonl
(`--no-save` to skip).

Usage:
    python benchmarks/memory_estimate.py --quick
    python benchmarks/memory_estimate.py                       # 6 meshes on 8 devices
    python benchmarks/memory_estimate.py --meshes 1,1,1 2,2,2 --remat --dtype bfloat16
    python benchmarks/memory_estimate.py --model smollm2-135m-instruct --abstract --batch 8 --seq-len 64 \
        --meshes 1,1,1 8,1,1 1,8,1 2,1,3
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, resolve_model, run_metadata  # noqa: E402
from jaxrl_llm.data.sft import SFTLoader  # noqa: E402
from jaxrl_llm.models.config import tiny_config  # noqa: E402
from jaxrl_llm.models.tokenizer import CharTokenizer  # noqa: E402
from jaxrl_llm.models.transformer import CausalLM  # noqa: E402
from jaxrl_llm.parallel.memory import MEMORY_TERMS, compiled_memory, estimate_memory  # noqa: E402
from jaxrl_llm.parallel.placement import MeshConfig, Placement  # noqa: E402
from jaxrl_llm.train.optim import OptimConfig, make_optimizer  # noqa: E402
from jaxrl_llm.train.policy import split_model  # noqa: E402
from jaxrl_llm.train.sft import batch_arrays, make_sft_update  # noqa: E402

DEFAULT_MESHES = ("1,1,1", "8,1,1", "2,1,4", "4,1,2", "2,2,2", "1,4,2")


def compiled_sft_update(cfg, sizes, args):
    """(memory_analysis dict, Placement, tx) of the SFT update compiled on a ``sizes`` mesh."""
    dtype = jnp.dtype(args.dtype)
    placement = Placement.create(MeshConfig(*sizes, num_devices=int(np.prod(sizes))),
                                 rows={"batch_size": args.batch}, model_config=cfg)
    build = lambda: CausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype, remat=args.remat)  # noqa: E731
    model = nnx.eval_shape(build) if args.abstract else placement.model(build())
    split = split_model(model)
    tx = make_optimizer(OptimConfig(learning_rate=1e-4), 100)
    update = make_sft_update(split, tx, "token_mean", args.chunk, False, None, placement)
    if args.abstract:  # same program, nothing allocated
        state = {"params": split.params, "opt_state": jax.eval_shape(tx.init, split.params)}
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             state, placement.shardings(state))
    else:
        state = placement.place({"params": split.params, "opt_state": tx.init(split.params)})
    records = [{"prompt": "x" * 40, "response": "y" * 2 * args.seq_len}] * args.batch
    batch = placement.rows(batch_arrays(next(iter(
        SFTLoader(records, CharTokenizer(), args.batch, max_len=args.seq_len, bucket="max")))))
    with placement.context():
        compiled = update.lower(state["params"], state["opt_state"], batch, None).compile()
    return compiled_memory(compiled), placement, tx


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--meshes", nargs="+", default=None, help="data,fsdp,tensor sizes (default: 6 meshes)")
    p.add_argument("--model", default=None,
                   help="a named model (smollm2-135m-instruct) or a local HF checkpoint folder: its config "
                        "replaces --layers/--hidden/--intermediate/--heads/--kv-heads/--head-dim/--vocab")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--chunk", type=int, default=1024, help="logprob_chunk_size (SFTConfig default)")
    p.add_argument("--dtype", default="float32", help="param and compute dtype")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--abstract", action="store_true", help="compile from abstract state (no allocation)")
    p.add_argument("--quick", action="store_true", help="2 layers, meshes 1,1,1 and 2,2,2")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.layers = 2
        args.meshes = args.meshes or ["1,1,1", "2,2,2"]
    meshes = [tuple(int(s) for s in m.split(",")) for m in (args.meshes or DEFAULT_MESHES)]

    if args.model is None:
        cfg = tiny_config("llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                          head_dim=args.head_dim, vocab_size=args.vocab,
                          max_position_embeddings=max(1024, args.seq_len))
    else:
        from jaxrl_llm.models.hf_io import read_config

        cfg = read_config(resolve_model(args.model))[0]
        args.layers, args.hidden, args.intermediate = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        args.heads, args.kv_heads, args.head_dim, args.vocab = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                                                cfg.vocab_size)
    meta = run_metadata(args.quick)
    for sizes in meshes:
        t0 = time.perf_counter()
        compiled, placement, tx = compiled_sft_update(cfg, sizes, args)
        compile_s = time.perf_counter() - t0
        est = estimate_memory(cfg, placement.mesh, placement.rules, batch=args.batch, seq_len=args.seq_len,
                              param_dtype=jnp.dtype(args.dtype), optimizer=tx, remat=args.remat,
                              logits_chunk_size=args.chunk, donate=False)
        state = est["params"] + est["optimizer"]
        rest = est["total"] - state
        row = {
            "mesh": dict(zip(("data", "fsdp", "tensor"), sizes)),
            "model": {"name": args.model, "layers": args.layers, "D": args.hidden, "F": args.intermediate,
                      "H": args.heads, "K": args.kv_heads, "Hd": args.head_dim, "V": args.vocab,
                      "num_params": est["num_params"]},
            "batch": args.batch, "seq_len": args.seq_len, "chunk": args.chunk, "dtype": args.dtype,
            "remat": args.remat,
            "compiled": compiled,
            "estimate": {k: est[k] for k in MEMORY_TERMS + ("total",)},
            "ratio_total": round(est["total"] / compiled["total"], 3),
            "ratio_state_over_arguments": round(state / compiled["arguments"], 4),
            "ratio_rest_over_outputs_plus_temps": round(
                rest / (compiled["outputs"] - compiled["aliased"] + compiled["temps"]), 3),
            "within_25pct": abs(est["total"] / compiled["total"] - 1) <= 0.25,
            "compile_s": round(compile_s, 1),
            **meta,
        }
        emit("memory_estimate", row, save=not args.no_save)


if __name__ == "__main__":
    main()
