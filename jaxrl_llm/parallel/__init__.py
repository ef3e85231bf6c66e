"""jaxrl_llm.parallel: one device mesh, logical-axis sharding rules, sharded train steps, multi-host start-up.

Typical use (same code on 1 device or a multi-host mesh)::

    from jaxrl_llm import parallel

    parallel.init_distributed()                        # no-op on one host
    mesh = parallel.make_mesh(data=-1, fsdp=4, tensor=2)
    policy = parallel.create_sharded(lambda: Model(cfg, rngs=nnx.Rngs(0)), mesh,
                                     parallel.rules_for_role("policy"))
    step = parallel.make_train_step(loss_fn, policy, tx, mesh, num_microbatches=4)
    state = step.init(policy)
    state, metrics = step(state, batch)

    parallel.print_memory_estimate(cfg, (1, 8, 1), batch=64, seq_len=2048)  # fits?

See docs/scaling.md.
"""

from jaxrl_llm.parallel.memory import (
    MEMORY_TERMS,
    abstract_mesh,
    compiled_memory,
    estimate_memory,
    format_memory_estimate,
    per_device_bytes,
    print_memory_estimate,
)
from jaxrl_llm.parallel.mesh import MESH_AXES, data_parallel_size, init_distributed, make_mesh, mesh_shape
from jaxrl_llm.parallel.placement import MeshConfig, Placement
from jaxrl_llm.parallel.rules import (
    LOGICAL_AXIS_RULES,
    ROLES,
    TRAINABLE_ROLES,
    MeshAxes,
    Rules,
    logical_to_mesh_spec,
    override_rules,
    resolve_spec,
    rules_for_role,
    validate_rules,
)
from jaxrl_llm.parallel.sharding import (
    abstract_model,
    batch_sharding,
    batch_shardings,
    check_batch_size,
    constrain,
    create_sharded,
    current_rules,
    model_shardings,
    optimizer_shardings,
    shard_batch,
    shard_model,
    sharding_context,
    sharding_fallbacks,
)
from jaxrl_llm.parallel.train_step import (
    GradResult,
    LossFn,
    TrainState,
    TrainStep,
    accumulate_gradients,
    make_train_step,
    split_microbatches,
)

__all__ = [
    # mesh
    "MESH_AXES",
    "make_mesh",
    "mesh_shape",
    "data_parallel_size",
    "init_distributed",
    # placement (what trainers use)
    "MeshConfig",
    "Placement",
    # rules
    "MeshAxes",
    "Rules",
    "LOGICAL_AXIS_RULES",
    "ROLES",
    "TRAINABLE_ROLES",
    "validate_rules",
    "override_rules",
    "rules_for_role",
    "resolve_spec",
    "logical_to_mesh_spec",
    # sharding
    "model_shardings",
    "sharding_fallbacks",
    "abstract_model",
    "create_sharded",
    "shard_model",
    "optimizer_shardings",
    "batch_sharding",
    "batch_shardings",
    "shard_batch",
    "check_batch_size",
    "constrain",
    "sharding_context",
    "current_rules",
    # train step
    "LossFn",
    "TrainState",
    "GradResult",
    "split_microbatches",
    "accumulate_gradients",
    "TrainStep",
    "make_train_step",
    # memory
    "MEMORY_TERMS",
    "abstract_mesh",
    "per_device_bytes",
    "compiled_memory",
    "estimate_memory",
    "format_memory_estimate",
    "print_memory_estimate",
]
