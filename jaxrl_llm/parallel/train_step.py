"""A jitted, sharded train step with gradient accumulation normalised by the GLOBAL token count.

The same step runs on 1 device or N: parameters, optimizer state and batch get
explicit ``in_shardings`` / ``out_shardings`` from the rules, the whole step is one
SPMD program and XLA inserts the collectives.

Loss normalisation. The caller's ``loss_fn(model, micro_batch)`` returns the **sum**
of per-token losses and the **number** of valid tokens of that micro-batch. The step
sums both over the ``k`` micro-batches (``lax.scan``) and divides once::

    grads = Σ_j ∇ loss_sum_j / max(Σ_j num_tokens_j, 1)
    loss  = Σ_j loss_sum_j   / max(Σ_j num_tokens_j, 1)

which is exactly the token mean over the whole global batch — identical to running
the big batch at once, whatever the split into micro-batches and devices. Because the
step is a single jitted SPMD program over the global batch, "sum over devices" needs
no code: the sums inside ``loss_fn`` are global sums. The common alternative — mean
per micro-batch (or per device), then mean of those means — weights a token in a
short micro-batch more than one in a long micro-batch and is NOT the token mean.
With no valid token at all the loss and grads are 0, not NaN.

Micro-batch ``j`` holds rows ``j, j + k, j + 2k, …`` of the global batch (a strided
split keeps every micro-batch spread over all batch shards with no data movement;
the token-mean result does not depend on the assignment).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl_llm.parallel.rules import LOGICAL_AXIS_RULES, Rules, validate_rules
from jaxrl_llm.parallel.sharding import (
    batch_sharding,
    batch_shardings,
    model_shardings,
    shard_batch,
    sharding_context,
)

__all__ = [
    "LossFn",
    "TrainState",
    "GradResult",
    "split_microbatches",
    "accumulate_gradients",
    "TrainStep",
    "make_train_step",
]

LossFn = Callable[[Any, Any], tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]]
"""``loss_fn(model, batch) -> (loss_sum [] float32, (num_tokens [], metrics {str: []}))``."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one sharded pytree.

    Attributes:
      params: ``nnx.State`` of the trainable Variables (``wrt`` filter), sharded by rules.
      rest: ``nnx.State`` of all other model state (frozen params, RNG counters).
      opt_state: optax state of ``params``, sharded like them.
      step: ``[]`` int32, number of updates applied.
    """

    params: Any
    rest: Any
    opt_state: Any
    step: jax.Array


@flax.struct.dataclass
class GradResult:
    """Output of :func:`accumulate_gradients`.

    Attributes:
      grads: like ``params``, float32: Σ ∇ loss_sum / max(Σ num_tokens, 1).
      loss: ``[]`` float32, Σ loss_sum / max(Σ num_tokens, 1) (global token mean).
      num_tokens: ``[]`` float32, Σ num_tokens over micro-batches (and devices).
      metrics: ``{name: []}``, the ``loss_fn`` metrics averaged over micro-batches.
      rest: the non-trainable state after the last micro-batch (RNG counters...).
    """

    grads: Any
    loss: jax.Array
    num_tokens: jax.Array
    metrics: dict[str, jax.Array]
    rest: Any


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
    """``[B, ...]`` leaves → ``[k, B/k, ...]`` with micro-batch ``j`` = rows ``j::k``.

    Rank-0 leaves are broadcast to ``[k]`` (each micro-batch sees the scalar).

    Raises:
      ValueError: ``B`` not divisible by ``num_microbatches``.
    """
    k = num_microbatches
    if k < 1:
        raise ValueError(f"num_microbatches: expected >= 1, got {k}")

    def split(x):
        x = jnp.asarray(x)
        if x.ndim == 0:
            return jnp.broadcast_to(x, (k,))
        if x.shape[0] % k != 0:
            raise ValueError(
                f"batch: leading size {x.shape[0]} is not divisible by num_microbatches={k}"
            )
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _check_loss_output(out: Any) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    try:
        loss_sum, (num_tokens, metrics) = out
    except (TypeError, ValueError) as e:
        raise ValueError(
            "loss_fn must return (loss_sum, (num_tokens, metrics)); got "
            f"{jax.tree.map(lambda x: getattr(x, 'shape', x), out)}"
        ) from e
    chex.assert_rank([loss_sum, num_tokens], 0)
    if not isinstance(metrics, dict):
        raise ValueError(f"loss_fn metrics must be a dict of scalars, got {type(metrics).__name__}")
    return (
        jnp.asarray(loss_sum, jnp.float32),
        jnp.asarray(num_tokens, jnp.float32),
        {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()},
    )


def accumulate_gradients(
    loss_fn: LossFn,
    graphdef: nnx.GraphDef,
    params: Any,
    rest: Any,
    batch: Any,
    num_microbatches: int = 1,
    *,
    wrt: Any = nnx.Param,
    grad_shardings: Any = None,
    microbatch_sharding: NamedSharding | None = None,
) -> GradResult:
    """Gradient of the global token-mean loss, accumulated over micro-batches with ``lax.scan``.

    Pure function of arrays (jit it, or use :class:`TrainStep`).

    Args:
      loss_fn: ``loss_fn(model, micro_batch) -> (loss_sum [], (num_tokens [], metrics))``;
        ``loss_sum`` is the SUM of per-token losses over valid tokens of the
        micro-batch (e.g. ``masked_sum(per_token_loss, mask)``) and ``num_tokens``
        the number of valid tokens (``mask.sum()``).
      graphdef, params, rest: ``nnx.split(model, wrt, ...)``.
      batch: pytree of ``[B, ...]`` arrays (rank-0 leaves are shared by all
        micro-batches).
      num_microbatches: ``k``; ``B`` must be divisible by ``k``.
      wrt: the filter that selected ``params``.
      grad_shardings: optional sharding tree of ``params``; the accumulator is
        constrained to it inside the scan (keeps grads FSDP-sharded).
      microbatch_sharding: optional sharding of one ``[B/k, ...]`` micro-batch
        (constrains the scanned micro-batches; default: none).

    Returns:
      :class:`GradResult`.
    """

    def micro_grad(params, rest, mb):
        def f(p, r):
            # fresh Variables at this trace level, so the model may mutate them (RNG counts)
            r = jax.tree.map(lambda x: x, r)
            model = nnx.merge(graphdef, p, r)
            loss_sum, num_tokens, metrics = _check_loss_output(loss_fn(model, mb))
            new_rest = nnx.state(model, wrt, ...)[1]
            return loss_sum, (num_tokens, metrics, new_rest)

        (loss_sum, (num_tokens, metrics, new_rest)), grads = jax.value_and_grad(f, has_aux=True)(
            params, rest
        )
        return loss_sum, num_tokens, metrics, new_rest, grads

    def constrain_grads(g):
        return g if grad_shardings is None else jax.lax.with_sharding_constraint(g, grad_shardings)

    if num_microbatches == 1:
        loss_sum, num_tokens, metrics, rest, grads = micro_grad(params, rest, batch)
        grads = constrain_grads(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    else:
        mbs = split_microbatches(batch, num_microbatches)
        if microbatch_sharding is not None:
            scanned = NamedSharding(
                microbatch_sharding.mesh, PartitionSpec(None, *microbatch_sharding.spec)
            )
            mbs = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(x, scanned) if x.ndim >= 2 else x, mbs
            )
        zeros = constrain_grads(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

        def body(carry, mb):
            g_acc, loss_acc, tok_acc, rest = carry
            loss_sum, num_tokens, metrics, rest, grads = micro_grad(params, rest, mb)
            g_acc = constrain_grads(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), g_acc, grads))
            return (g_acc, loss_acc + loss_sum, tok_acc + num_tokens, rest), metrics

        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), rest)
        (grads, loss_sum, num_tokens, rest), metrics = jax.lax.scan(body, init, mbs)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

    denom = jnp.maximum(num_tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    return GradResult(grads=grads, loss=loss_sum / denom, num_tokens=num_tokens, metrics=metrics, rest=rest)


class TrainStep:
    """A jitted train step bound to a model structure, an optimizer, a mesh and rules.

    Build with :func:`make_train_step`. Usage::

        step = make_train_step(loss_fn, model, optax.adamw(1e-4), mesh, num_microbatches=4)
        state = step.init(model)                 # params/opt state placed by the rules
        for batch in batches:                    # batch: global [B, ...] arrays
            state, metrics = step(state, batch)  # metrics: loss, num_tokens, grad_norm, ...
        model = step.model(state)

    Attributes:
      graphdef: the model's static structure.
      mesh, rules, tx, num_microbatches, wrt: as given.
      state_shardings: :class:`TrainState` of ``NamedSharding`` (in = out shardings).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        model: Any,
        tx: optax.GradientTransformation,
        mesh: Mesh,
        rules: Rules = LOGICAL_AXIS_RULES,
        *,
        num_microbatches: int = 1,
        wrt: Any = nnx.Param,
        donate: bool = True,
    ):
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches: expected >= 1, got {num_microbatches}")
        self.loss_fn = loss_fn
        self.tx = tx
        self.mesh = mesh
        self.rules = validate_rules(rules)
        self.num_microbatches = num_microbatches
        self.wrt = wrt
        self.donate = donate
        self.graphdef, params, rest = nnx.split(model, wrt, ...)
        abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        params, rest = abstract(params), abstract(rest)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.state_shardings = TrainState(
            params=model_shardings(params, mesh, self.rules),
            rest=model_shardings(rest, mesh, self.rules),
            opt_state=model_shardings(jax.eval_shape(tx.init, params), mesh, self.rules),
            step=self._replicated,
        )
        self._jitted: dict[Any, Callable] = {}

    # -- state ------------------------------------------------------------------------
    def init(self, model: Any) -> TrainState:
        """Place ``model``'s state by the rules and create the optimizer state sharded like it.

        The optimizer state is created by a jitted ``tx.init`` with ``out_shardings``, so
        it never exists unsharded. ``model`` may already be sharded (e.g. from
        :func:`~jaxrl_llm.parallel.sharding.create_sharded`): then nothing moves.
        """
        _, params, rest = nnx.split(model, self.wrt, ...)
        sh = self.state_shardings
        params = jax.device_put(params, sh.params)
        rest = jax.device_put(rest, sh.rest)
        opt_state = jax.jit(self.tx.init, out_shardings=sh.opt_state)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
        return TrainState(params=params, rest=rest, opt_state=opt_state, step=step)

    def model(self, state: TrainState) -> Any:
        """The NNX model holding ``state``'s params (shares the arrays, no copy)."""
        return nnx.merge(self.graphdef, state.params, state.rest)

    # -- step -------------------------------------------------------------------------
    def _grads(self, params, rest, batch):
        return accumulate_gradients(
            self.loss_fn,
            self.graphdef,
            params,
            rest,
            batch,
            self.num_microbatches,
            wrt=self.wrt,
            grad_shardings=self.state_shardings.params,
            microbatch_sharding=batch_sharding(self.mesh, self.rules),
        )

    def _step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        res = self._grads(state.params, state.rest, batch)
        updates, opt_state = self.tx.update(res.grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(res.metrics)
        metrics.update(loss=res.loss, num_tokens=res.num_tokens, grad_norm=optax.tree.norm(res.grads))
        new_state = TrainState(params=params, rest=res.rest, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    def _compiled(self, kind: str, batch: Any) -> tuple[Callable, Any]:
        bsh = batch_shardings(batch, self.mesh, self.rules, num_microbatches=self.num_microbatches)
        key = (kind, jax.tree.structure(batch), tuple(jnp.ndim(x) for x in jax.tree.leaves(batch)))
        if key not in self._jitted:
            sh = self.state_shardings
            if kind == "step":
                fn = jax.jit(
                    self._step,
                    in_shardings=(sh, bsh),
                    out_shardings=(sh, self._replicated),
                    donate_argnums=(0,) if self.donate else (),
                )
            else:
                grad_out = GradResult(
                    grads=sh.params, loss=self._replicated, num_tokens=self._replicated,
                    metrics=self._replicated, rest=sh.rest,
                )
                fn = jax.jit(self._grads, in_shardings=(sh.params, sh.rest, bsh), out_shardings=grad_out)
            self._jitted[key] = fn
        return self._jitted[key], bsh

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update on the global ``batch``.

        Args:
          state: from :meth:`init` or a previous call (donated when ``donate=True``).
          batch: pytree of ``[B, ...]`` arrays: the global batch, or on several
            processes either global ``jax.Array``s from
            :func:`~jaxrl_llm.parallel.sharding.shard_batch` or this process's rows
            (placed with ``shard_batch`` here).

        Returns:
          ``(new_state, metrics)``; metrics (replicated scalars) are the ``loss_fn``
          metrics averaged over micro-batches plus ``loss`` (global token mean),
          ``num_tokens`` and ``grad_norm`` (of the normalised gradient).

        Raises:
          ValueError: the batch size is not divisible by ``num_microbatches`` × the
            number of batch shards.
        """
        # place first: on several processes ``batch`` holds this process's rows only and the
        # size checks in ``_compiled`` must see the global batch
        batch = shard_batch(batch, self.mesh, self.rules, num_microbatches=self.num_microbatches)
        fn, _ = self._compiled("step", batch)
        with sharding_context(self.mesh, self.rules):
            return fn(state, batch)

    def grads(self, state: TrainState, batch: Any) -> GradResult:
        """The normalised gradients of ``batch`` at ``state`` without updating (same sharding)."""
        batch = shard_batch(batch, self.mesh, self.rules, num_microbatches=self.num_microbatches)
        fn, _ = self._compiled("grads", batch)
        with sharding_context(self.mesh, self.rules):
            return fn(state.params, state.rest, batch)


def make_train_step(
    loss_fn: LossFn,
    model: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    num_microbatches: int = 1,
    wrt: Any = nnx.Param,
    donate: bool = True,
) -> TrainStep:
    """Build a :class:`TrainStep`: jitted, explicit in/out shardings, global token-mean accumulation.

    Args:
      loss_fn: ``loss_fn(model, batch) -> (loss_sum, (num_tokens, metrics))`` — the SUM
        of per-token losses over valid tokens and their count, for one micro-batch.
      model: the NNX model (concrete or from ``nnx.eval_shape``); only its structure,
        shapes and logical annotations are read here.
      tx: optax optimizer, e.g. ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr))``.
      mesh: from :func:`~jaxrl_llm.parallel.mesh.make_mesh` (1 device is fine).
      rules: logical → mesh rules (e.g. ``rules_for_role('policy')``).
      num_microbatches: gradient-accumulation steps per update.
      wrt: filter of trainable Variables (default ``nnx.Param``).
      donate: donate the input state's buffers to the output (halves peak memory).
    """
    return TrainStep(
        loss_fn, model, tx, mesh, rules, num_microbatches=num_microbatches, wrt=wrt, donate=donate
    )

