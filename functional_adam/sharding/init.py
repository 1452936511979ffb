"""The state born sharded: ``jitted_init`` and ``init_sharded``."""

from __future__ import annotations

from typing import Any

import jax

from functional_adam.core.base import GradientTransformation, OptState, Params
from functional_adam.core.lift import layout_hints
from functional_adam.sharding.state import layout_hints_for, state_shardings


def jitted_init(
    tx: GradientTransformation,
    params: Params,
    *,
    zero1_axis: str | None = None,
    param_shardings: Any = None,
) -> Any:
    """``tx.init`` jitted with ``out_shardings=`` :func:`state_shardings`: what :func:`init_sharded` runs.

    ``tx.init`` is traced under :func:`~functional_adam.layout_hints` with each moment's
    sharding, so 8-bit blocks are laid out per shard as :func:`state_shardings` says
    (:mod:`functional_adam.storage.shard_blocks`). Lower it on abstract parameters to
    read the per-device bytes of the init without allocating anything.

    Args:
        tx, params, zero1_axis, param_shardings: as in :func:`state_shardings`
            (``params`` may be ``jax.ShapeDtypeStruct`` s).

    Returns:
        A jitted function ``params -> state``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> import functional_adam as fa
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> w = jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=NamedSharding(mesh, P()))
        >>> init = fa.jitted_init(fa.adam(1e-3), {"w": w})
        >>> init.lower({"w": w}).compile().memory_analysis().output_size_in_bytes >= 64
        True
    """
    shardings = state_shardings(tx, params, zero1_axis=zero1_axis, param_shardings=param_shardings)
    hints = layout_hints_for(params, zero1_axis, param_shardings)

    def init(params: Params) -> OptState:
        with layout_hints(hints):  # active while this fresh function is traced
            return tx.init(params)

    return jax.jit(init, out_shardings=shardings)


def init_sharded(
    tx: GradientTransformation,
    params: Params,
    *,
    zero1_axis: str | None = None,
) -> OptState:
    """``tx.init(params)`` born with :func:`state_shardings`: never gathered on one device.

    ``jax.jit(tx.init)(params)`` leaves the output sharding to the compiler,
    which puts the whole state on one device (or replicates it); this runs
    :func:`jitted_init` (``jax.jit(tx.init, out_shardings=state_shardings(tx, params, ...))``)
    so each device only ever allocates its own shards.

    Args:
        tx: the transformation.
        params: the parameters, ``jax.Array`` s placed on their mesh.
        zero1_axis: as in :func:`state_shardings`.

    Returns:
        The state, each leaf placed as :func:`state_shardings` says.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> import functional_adam as fa
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> params = jax.device_put({"w": jnp.ones((4, 2))}, NamedSharding(mesh, P("data")))
        >>> state = fa.init_sharded(fa.adam(1e-3), params)
        >>> state[0].mu["w"].sharding.spec
        P('data',)
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not isinstance(leaf, jax.Array):
            raise TypeError(
                f"init_sharded: params{jax.tree_util.keystr(path)} is {type(leaf).__name__}, "
                "not a jax.Array; for abstract parameters use abstract_state or state_shardings."
            )
    return jitted_init(tx, params, zero1_axis=zero1_axis)(params)
