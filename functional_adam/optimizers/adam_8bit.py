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

Each step, per leaf, runs in one jitted loop over chunks of 64K elements (so no
full-size float32 moment is ever materialised)::

    m, v = dequantize(m_codes), dequantize(v_codes) ** 2  # float32
    u, m, v = adam_leaf(g, m, v, ...)                     # the Adam step of functional_adam.optimizers.adam
    m_codes, v_codes = quantize(m), quantize(sqrt(v))     # new absmax per block

The arithmetic is float32 (``adam_leaf``'s) also for bfloat16/float16
parameters, and ``u`` has the gradient's dtype. The default ``block_size`` is
256 (bitsandbytes' choice; 2048 is as fast here and slightly less accurate,
see BENCHMARKS.md).

Leaves with fewer than ``min_8bit_size`` elements (biases, norms) and complex
leaves (by choice: the maps are real) keep unquantized moments (float32 for
16- and 32-bit parameters, or ``mu_dtype``/``nu_dtype`` when given), as
bitsandbytes does for small tensors.
The state ``ScaleByAdam8bitState(count, mu, nu)`` is an ordinary pytree of
arrays: each quantized leaf of ``mu``/``nu`` is a
:class:`~functional_adam.storage.quantized.BlockQuantized` ``(codes, scale)`` with codes of
shape ``(n_blocks, block_size)``, so it jits, checkpoints and can be sharded
along its block axis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.compat.conventions import OPTAX, Convention, check_convention
from functional_adam.core import checks
from functional_adam.core.base import (
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Updates,
    chain,
)
from functional_adam.core.numerics import (
    compute_dtype,
    moment_dtype,
    safe_increment,
    saturating_cast,
    zero_count,
)
from functional_adam.optimizers.adam import BiasCorrections, adam_leaf, bias_corrections
from functional_adam.storage.quantized import (
    BlockQuantized,
    check_block_size,
    decode_blocks,
    decode_second_moment,
    encode_blocks,
    encode_second_moment,
    zeros,
)
from functional_adam.transforms.learning_rate import scale_by_learning_rate
from functional_adam.transforms.weight_decay import add_decayed_weights

DEFAULT_BLOCK_SIZE = 256
DEFAULT_MIN_8BIT_SIZE = 4096


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`: per leaf, a ``BlockQuantized`` or a float array.

    For a quantized leaf, ``mu`` holds int8 codes of ``m`` and ``nu`` uint8 codes of
    ``sqrt(v)`` (decode with :func:`~functional_adam.storage.quantized.decode_second_moment`).
    """

    count: jax.Array  # int32 scalar, saturating
    mu: Updates
    nu: Updates


def _is_quantized(x: Any) -> bool:
    return isinstance(x, BlockQuantized)


_CHUNK_ELEMENTS = 2**16  # elements per loop iteration: the temporaries stay in cache


def _blocks_step(g, m_q, v_q, bc, hyper, nesterov, convention):
    """Dequantize, one :func:`adam_leaf` step, requantize, for ``(n, block_size)`` blocks."""
    b1, b2, eps, eps_root = hyper
    m = decode_blocks(m_q, signed=True)
    v = decode_second_moment(v_q)
    u, m, v, _ = adam_leaf(
        g, m, v, None, bc, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
        nesterov=nesterov, convention=convention,
    )  # fmt: skip
    return u.astype(g.dtype), encode_blocks(m, signed=True), encode_second_moment(v)


def _slice_blocks(q: BlockQuantized, start, n: int) -> BlockQuantized:
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, n, 0), q)


def _set_blocks(q: BlockQuantized, start, new: BlockQuantized) -> BlockQuantized:
    return jax.tree.map(lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, start, 0), q, new)


@functools.partial(jax.jit, static_argnames=("nesterov", "convention"))
def _quantized_leaf(
    g: jax.Array,
    m_q: BlockQuantized,
    v_q: BlockQuantized,
    bc: BiasCorrections,
    hyper: tuple,
    *,
    nesterov: bool,
    convention: Convention,
) -> tuple[jax.Array, BlockQuantized, BlockQuantized]:
    """One Adam step of a quantized leaf without full-size float32 temporaries.

    The new codes need each block's new absolute maximum, so a loop over
    chunks of 64K elements dequantizes, steps and requantizes, reading ``g``
    and the old codes and writing the new codes into buffers the loop carries
    (the blocks after the last whole chunk, with the zero-padded final block,
    are done after the loop). The loop never reads what it carries: when it
    did (and XLA fused that read into another output), XLA copied the whole
    buffers in every iteration, which made a step quadratic in the leaf size.
    ``u`` is elementwise in ``g`` and the old codes; left outside the loop, XLA
    fuses it into ``apply_updates`` instead of writing a full-size buffer.
    """
    step = functools.partial(
        _blocks_step, bc=bc, hyper=hyper, nesterov=nesterov, convention=convention
    )
    n_blocks, block_size = m_q.codes.shape
    size = g.size
    flat = g.reshape(-1)
    chunk = max(1, min(_CHUNK_ELEMENTS // block_size, size // block_size))
    looped = size // block_size // chunk * chunk  # blocks done inside the loop
    out = tuple(jax.tree.map(jnp.zeros_like, q) for q in (m_q, v_q))

    def body(i, carry):
        m_out, v_out = carry
        start = i * chunk
        g_chunk = jax.lax.dynamic_slice_in_dim(flat, start * block_size, chunk * block_size)
        _, m_new, v_new = step(
            g_chunk.reshape(chunk, block_size),
            _slice_blocks(m_q, start, chunk),
            _slice_blocks(v_q, start, chunk),
        )
        return _set_blocks(m_out, start, m_new), _set_blocks(v_out, start, v_new)

    if looped:
        out = jax.lax.fori_loop(0, looped // chunk, body, out)
    m_out, v_out = out
    if looped < n_blocks:
        tail = jnp.pad(flat[looped * block_size :], (0, n_blocks * block_size - size))
        _, m_new, v_new = step(tail.reshape(-1, block_size), _tail(m_q, looped), _tail(v_q, looped))
        m_out, v_out = _set_blocks(m_out, looped, m_new), _set_blocks(v_out, looped, v_new)
    # u is elementwise in (g, old codes): XLA fuses it into its consumer (apply_updates).
    m = decode_blocks(m_q, signed=True).reshape(-1)[:size].reshape(g.shape)
    v = decode_second_moment(v_q).reshape(-1)[:size].reshape(g.shape)
    b1, b2, eps, eps_root = hyper
    u = adam_leaf(
        g, m, v, None, bc, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
        nesterov=nesterov, convention=convention,
    )[0]  # fmt: skip
    return u.astype(g.dtype), m_out, v_out


def _tail(q: BlockQuantized, start: int) -> BlockQuantized:
    return jax.tree.map(lambda a: a[start:], q)


def _check_min_size(min_8bit_size: int) -> int:
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
    return min_8bit_size


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

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByAdam8bitState`.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_adam_8bit(block_size=256, min_8bit_size=1000)
        >>> state = tx.init({"w": jnp.zeros(5000), "b": jnp.zeros(3)})
        >>> state.mu["w"].codes.dtype, state.mu["w"].codes.shape, state.mu["b"].dtype
        (dtype('int8'), (20, 256), dtype('float32'))
        >>> u, state = tx.update({"w": jnp.ones(5000), "b": jnp.ones(3)}, state)
        >>> float(u["w"][0]), round(float(u["b"][0]), 4)  # first step: m̂/sqrt(v̂) = 1
        (1.0, 1.0)
    """
    for name, value, high in (("b1", b1, 1.0), ("b2", b2, 1.0), ("eps", eps, math.inf)):
        checks.check_hyperparameter(name, value, high=high)
    checks.check_hyperparameter("eps_root", eps_root)
    mu_dtype = checks.check_float_dtype("mu_dtype", mu_dtype)
    nu_dtype = checks.check_float_dtype("nu_dtype", nu_dtype)
    block_size = check_block_size(block_size)
    min_8bit_size = _check_min_size(min_8bit_size)
    convention = check_convention(convention)
    if nesterov and convention.epsilon == "hat":
        raise ValueError("nesterov=True is not defined with convention.epsilon='hat'.")

    def quantizes(p) -> bool:
        return math.prod(p.shape) >= min_8bit_size and jnp.issubdtype(p.dtype, jnp.floating)

    def init_moment(p, requested, squared):
        if quantizes(p):
            return zeros(p.shape, block_size, signed=not squared)
        dtype = moment_dtype(compute_dtype(p.dtype), requested, squared=squared)
        return jnp.zeros(p.shape, dtype)

    def init(params: Params) -> ScaleByAdam8bitState:
        checks.check_float_leaves(params, "params")
        mu = jax.tree.map(lambda p: init_moment(p, mu_dtype, False), params)
        nu = jax.tree.map(lambda p: init_moment(p, nu_dtype, True), params)
        return ScaleByAdam8bitState(zero_count(), mu, nu)

    def leaf_step(g, m, v, bc):
        if _is_quantized(m):
            hyper = (b1, b2, eps, eps_root)
            return _quantized_leaf(g, m, v, bc, hyper, nesterov=nesterov, convention=convention)
        u, m_new, v_new, _ = adam_leaf(
            g,
            m,
            v,
            None,
            bc,
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            nesterov=nesterov,
            convention=convention,
        )
        return u.astype(g.dtype), m_new.astype(m.dtype), saturating_cast(v_new, v)

    def update(updates: Updates, state: ScaleByAdam8bitState, params=None, **extra_args: Any):
        del params, extra_args
        skeleton = jax.tree.map(lambda _: 0, state.mu, is_leaf=_is_quantized)
        checks.check_same_structure(updates, skeleton)
        checks.check_float_leaves(updates, "updates")
        count_inc = safe_increment(state.count)
        bc = bias_corrections(b1, b2, count_inc)
        g_leaves, treedef = jax.tree.flatten(updates)
        m_leaves = treedef.flatten_up_to(state.mu)
        v_leaves = treedef.flatten_up_to(state.nu)
        results = [
            leaf_step(g, m, v, bc) for g, m, v in zip(g_leaves, m_leaves, v_leaves, strict=True)
        ]
        u, mu, nu = (treedef.unflatten([r[i] for r in results]) for i in range(3))
        return u, ScaleByAdam8bitState(count_inc, mu, nu)

    return GradientTransformation(init, update)


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
) -> GradientTransformation:
    r"""Adam with 8-bit block-quantized moments: :func:`adam`'s signature plus ``block_size``.

    ``chain(scale_by_adam_8bit(...), scale_by_learning_rate(learning_rate))``;
    about 2 bytes of optimizer state per parameter instead of 8.

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov, block_size,
            min_8bit_size: see :func:`scale_by_adam_8bit`.

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
    return chain(
        scale_by_adam_8bit(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            nu_dtype,
            block_size=block_size,
            min_8bit_size=min_8bit_size,
            nesterov=nesterov,
        ),
        scale_by_learning_rate(learning_rate),
    )


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
) -> GradientTransformation:
    r"""AdamW with 8-bit block-quantized moments: :func:`adamw`'s signature plus ``block_size``.

    ``θ ← θ - lr · (u_adam8bit + weight_decay · θ)``, decoupled weight decay as
    in :func:`functional_adam.adamw`.

    Args:
        learning_rate, weight_decay, mask: as in :func:`functional_adam.adamw`.
        b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov, block_size,
            min_8bit_size: see :func:`scale_by_adam_8bit`.

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
    return chain(
        scale_by_adam_8bit(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            nu_dtype,
            block_size=block_size,
            min_8bit_size=min_8bit_size,
            nesterov=nesterov,
        ),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
