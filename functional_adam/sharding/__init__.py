"""Optimizer state at scale: state that follows the parameters' sharding, born sharded, ZeRO-1.

JAX is the distributed engine (``jax.sharding``, ``jax.jit``'s
``out_shardings``, ``jax.distributed``); this package only says where each
leaf of an optimizer state lives. See ``docs/scale.md``.
"""

from functional_adam.sharding.init import init_sharded, jitted_init
from functional_adam.sharding.state import (
    StateLeafSharding,
    abstract_state,
    check_state_shardings,
    describe_state_shardings,
    state_shardings,
)

__all__ = [
    "StateLeafSharding",
    "abstract_state",
    "check_state_shardings",
    "describe_state_shardings",
    "init_sharded",
    "jitted_init",
    "state_shardings",
]
