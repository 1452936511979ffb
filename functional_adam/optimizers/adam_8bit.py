r"""Adam with 8-bit block-quantized moments: ``scale_by_adam_8bit``, ``adam_8bit``, ``adamw_8bit``.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022
(https://arxiv.org/abs/2110.02861). Each moment of a large leaf is stored as
8-bit codes of the dynamic map with one float32 absmax scale per block
(:mod:`functional_adam.storage.quantized`): ``m`` with the signed map (int8 codes),
``v`` with the unsigned map (uint8 codes), about 2 bytes per parameter instead
of 8. Unlike bitsandbytes, ``nu`` holds the codes of ``sqrt(v)``, and a positive
value never gets the zero code
(:func:`~functional_adam.storage.quantized.encode_second_moment`): with ``v``
itself, the gradients more than ~2,500 times smaller than their block's largest
had ``v`` rounded to 0 and Adam steps up to 9 times too large.

The optimizer is :func:`functional_adam.optimizers.adam.adam_optimizer`, the
per-leaf Adam of ``scale_by_adam``, lifted with the 8-bit storage layer
:class:`~functional_adam.storage.blockwise.BlockStorage`, which runs it in one
loop over chunks of 64K elements per leaf (so no full-size float32 moment is
ever materialised)::

    m, v = dequantize(m_codes), dequantize(v_codes) ** 2  # float32
    u, m, v = adam_leaf(g, m, v, ...)                     # Adam's per-leaf step
    m_codes, v_codes = quantize(m), quantize(sqrt(v))     # new absmax per block

The arithmetic is float32 (``adam_leaf``'s) also for bfloat16/float16
parameters, and ``u`` has the gradient's dtype.

``adam_8bit`` and ``adamw_8bit`` are fusable
(:mod:`functional_adam.kernels.fused_adam8`): inside
:func:`functional_adam.update_and_apply`, with float32 parameters on the CPU
(with several devices, each on its shards) or one GPU, one pass of a compiled kernel per
block decodes, steps, finds the new block maxima, encodes and writes θ, in place, with
the same codes as the chain. A plain ``update`` on one device takes the same kernel and
writes the update over the gradient's buffer, so ``update`` + ``optax.apply_updates``
(Flax's ``TrainState.apply_gradients``) is fast too; inside
:func:`functional_adam.reference_path` both take the chain's
``jax.numpy`` path. The default ``block_size`` is
256 (bitsandbytes' choice; 2048 is as fast here and slightly less accurate,
see BENCHMARKS.md).

Leaves with fewer than ``min_8bit_size`` elements (biases, norms) and complex
leaves (by choice: the maps are real) keep unquantized moments (float32 for
16- and 32-bit parameters, or ``mu_dtype``/``nu_dtype`` when given), as
bitsandbytes does for small tensors.
The state ``ScaleByAdam8bitState(count, mu, nu)`` is an ordinary pytree of
arrays: each quantized leaf of ``mu``/``nu`` is a
:class:`~functional_adam.storage.quantized.BlockQuantized` ``(codes, scale)`` with codes of
shape ``(n_blocks, block_size)``, so it jits and checkpoints. For a parameter split
over several devices (:func:`functional_adam.init_sharded`), each shard is blocked on its
own: codes ``(S_0, ..., S_{r-1}, n_local_blocks, block_size)`` sharded like the
parameter, so a sharded step moves nothing between devices
(:mod:`functional_adam.storage.shard_blocks`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from functional_adam.compat.conventions import OPTAX, Convention
from functional_adam.core.base import GradientTransformation, Params, ScalarOrSchedule, Updates
from functional_adam.core.lift import lift
from functional_adam.kernels.fused_adam8 import adam8_chain
from functional_adam.optimizers.adam import AdamHyperparameters, adam_optimizer
from functional_adam.storage.blockwise import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MIN_8BIT_SIZE,
    BlockStorage,
)


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`: per leaf, a ``BlockQuantized`` or a float array.

    For a quantized leaf, ``mu`` holds int8 codes of ``m`` and ``nu`` uint8 codes of
    ``sqrt(v)`` (decode with :func:`~functional_adam.storage.quantized.decode_second_moment`).
    """

    count: jax.Array  # int32 scalar, saturating
    mu: Updates
    nu: Updates


def scale_by_adam_8bit(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
    nesterov: bool = False,
    convention: Convention = OPTAX,
    code: str = "dynamic",
) -> GradientTransformation:
    r"""Rescales updates by Adam's ``m̂ / (sqrt(v̂ + eps_root) + eps)`` with 8-bit moments.

    The Adam math is :func:`functional_adam.adam_leaf`; only the storage of
    the moments differs (see the module docstring).

    Args:
        b1, b2, eps, eps_root, nesterov, convention: as in :func:`scale_by_adam`.
        mu_dtype, nu_dtype: storage dtypes of the moments of leaves that stay
            unquantized (``None``: float32 for 16- and 32-bit parameters, the
            parameter's precision otherwise).
        block_size: elements per quantization block (one float32 scale each),
            a positive power of two.
        min_8bit_size: leaves with fewer elements keep unquantized moments.
            Both sizes may be ints or 0-d integer arrays, as ``optax.inject_hyperparams``
            passes them; ``init`` needs them concrete, and ``update`` reads them from
            the state (so their traced copies in a jitted update are not used).
        code: the 8-bit format: ``"dynamic"``, bitsandbytes' map (more precise near
            each block's maximum), or ``"float"``, the top bits of the float32 of
            ``x / scale`` (:mod:`~functional_adam.storage.float_codes`; faster to
            encode and decode). A state is read with the code it was written with.

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByAdam8bitState`.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_adam_8bit(block_size=256, min_8bit_size=1000)
        >>> state = tx.init({"w": jnp.zeros(5000), "b": jnp.zeros(3)})
        >>> state.mu["w"].codes.dtype, state.mu["w"].codes.shape, state.mu["b"].dtype
        (dtype('int8'), (20, 256), dtype('float32'))
        >>> u, state = tx.update({"w": jnp.ones(5000), "b": jnp.ones(3)}, state)
        >>> round(float(u["w"][0]), 4), round(float(u["b"][0]), 4)  # first step: m̂/sqrt(v̂) = 1
        (1.0, 1.0)
    """
    hyper = AdamHyperparameters(b1, b2, eps, eps_root, nesterov, convention)
    optimizer = adam_optimizer(hyper, mu_dtype, nu_dtype)
    storage = BlockStorage(block_size, min_8bit_size, code).checked()
    return lift(optimizer._replace(state_type=ScaleByAdam8bitState), storage)


def adam_8bit(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
    code: str = "dynamic",
) -> GradientTransformation:
    r"""Adam with 8-bit block-quantized moments: :func:`adam`'s signature plus ``block_size``.

    ``chain(scale_by_adam_8bit(...), scale_by_learning_rate(learning_rate))``;
    about 2 bytes of optimizer state per parameter instead of 8.

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov, block_size,
            min_8bit_size, code: see :func:`scale_by_adam_8bit`.

    Returns:
        A ``GradientTransformation``.

    Example (the quadratic f(x) = x², x0 = 5: the first step moves x by about lr):
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> x = jnp.full(8192, 5.0)
        >>> tx = fa.adam_8bit(learning_rate=1e-3)
        >>> state = tx.init(x)
        >>> updates, state = tx.update(jax.grad(lambda x: (x**2).sum())(x), state, x)
        >>> round(float(fa.apply_updates(x, updates)[0]), 6)
        4.999
    """
    direction = scale_by_adam_8bit(
        b1, b2, eps, eps_root, mu_dtype, nu_dtype,
        block_size=block_size, min_8bit_size=min_8bit_size, nesterov=nesterov, code=code,
    )  # fmt: skip
    return adam8_chain(
        direction, ScaleByAdam8bitState, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
        nesterov=nesterov, learning_rate=learning_rate, code=code,
    )  # fmt: skip


def adamw_8bit(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[Params], Any] | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
    code: str = "dynamic",
) -> GradientTransformation:
    r"""AdamW with 8-bit block-quantized moments: :func:`adamw`'s signature plus ``block_size``.

    ``θ ← θ - lr · (u_adam8bit + weight_decay · θ)``, decoupled weight decay as
    in :func:`functional_adam.adamw`.

    Args:
        learning_rate, weight_decay, mask: as in :func:`functional_adam.adamw`.
        b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov, block_size,
            min_8bit_size, code: see :func:`scale_by_adam_8bit`.

    Returns:
        ``chain(scale_by_adam_8bit, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> params = {"w": jnp.ones(5000)}
        >>> tx = fa.adamw_8bit(1e-3, weight_decay=0.1)
        >>> updates, _ = tx.update({"w": jnp.zeros(5000)}, tx.init(params), params)
        >>> round(float(updates["w"][0]), 8)  # zero gradient: only the decay, -lr·wd·θ
        -0.0001
    """
    direction = scale_by_adam_8bit(
        b1, b2, eps, eps_root, mu_dtype, nu_dtype,
        block_size=block_size, min_8bit_size=min_8bit_size, nesterov=nesterov, code=code,
    )  # fmt: skip
    return adam8_chain(
        direction, ScaleByAdam8bitState, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
        nesterov=nesterov, learning_rate=learning_rate, weight_decay=weight_decay, mask=mask,
        code=code,
    )  # fmt: skip
