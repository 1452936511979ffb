"""The fused CPU 8-bit Adam step: its codec constants, its arithmetic in ``jax.numpy``, its call.

The C++ kernel (``adam8_cpu.cc``, built and loaded by :mod:`functional_adam.kernels.build`)
makes one pass per block over all quantized leaves together, in place, on XLA's
intra-op thread pool: for each element it reads θ, g and the two 8-bit codes once
and writes θ and the two codes once (about 16 bytes per parameter), keeping each
block's float32 moments in L1 between computing the new block maxima and encoding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from functional_adam.kernels import build
from functional_adam.kernels.adam_cpu import KernelScalars
from functional_adam.kernels.build import TARGET_8BIT
from functional_adam.storage.blockwise import encode_moments
from functional_adam.storage.codec import Codec, make_codec
from functional_adam.storage.quantized import BlockQuantized, decode_blocks

# Leaves per kernel call: XLA's compile time grows about cubically with the number of aliased
# operands of one custom call (5 per leaf here), so long trees are cut into calls of this many.
LEAVES_PER_CALL = 16

Leaf8 = tuple[jax.Array, jax.Array, BlockQuantized, BlockQuantized]  # (θ, g, mu, nu)


def _table(values: np.ndarray, fill: float = 0.0) -> np.ndarray:
    out = np.full(16, fill, np.float32)
    out[: len(values)] = values
    return out


def _binades(codec: Codec) -> list[np.ndarray]:
    """Per low 5 bits of the biased exponent of ``a`` in [2^-24, 2): the region at the start
    of that binade and the one threshold inside it (inf if none)."""
    exponent = np.arange(32) + np.where(np.arange(32) >= 7, 96, 128)  # 103..127, then 128..134
    start = np.ldexp(np.float32(1), exponent - 127).astype(np.float32)
    region = np.searchsorted(codec.thresholds, start, side="right")
    inside = (codec.thresholds[None, :] > start[:, None]) & (
        codec.thresholds[None, :] < 2 * start[:, None]
    )
    assert inside.sum(axis=1).max() <= 1  # at most one threshold per binade
    nxt = np.where(inside, codec.thresholds[None, :], np.inf).min(axis=1)
    return [region.astype(np.float32), nxt.astype(np.float32)]


@functools.cache
def codec_constants() -> np.ndarray:
    """The kernel's ``consts`` operand: for the signed map, then the unsigned one, six tables
    of 16 float32 (thresholds, gain, shift, last, slope, offset) and two of 32 (region and
    next threshold per binade of ``a``); ``enum Table`` in ``adam8_cpu.cc``.

    Example:
        >>> codec_constants().shape
        (320,)
    """

    def tables(codec: Codec) -> list[np.ndarray]:
        return [
            _table(codec.thresholds, np.inf),
            _table(codec.gain),
            _table(codec.shift),
            _table(codec.last.astype(np.float32)),
            _table(codec.slope),
            _table(codec.offset),
            *_binades(codec),
        ]

    return np.concatenate(tables(make_codec(True)) + tables(make_codec(False)))


def reference_step(
    scalars: jax.Array, leaves: Sequence[Leaf8], decay: Sequence[bool], nesterov: bool
) -> list[tuple[jax.Array, BlockQuantized, BlockQuantized]]:
    """The kernel's arithmetic in ``jax.numpy`` (its derivative rule; equal to it within rounding).

    Example:
        >>> import jax.numpy as jnp
        >>> from functional_adam.storage import quantized as qz
        >>> p = jnp.ones(16)
        >>> mu, nu = qz.zeros((16,), 16, signed=True), qz.zeros((16,), 16, signed=False)
        >>> s = jnp.array([0.9, 0.1, 0.999, 0.001, 1e-8, 0.0, 10.0, 1000.0, 1 / 0.19, -0.1, 0.0])
        >>> p, mu, nu = reference_step(s, [(p, p, mu, nu)], [False], False)[0]
        >>> round(float(p[0]), 4), round(float(mu.scale[0]), 6), round(float(nu.scale[0]) ** 2, 6)
        (0.9, 0.1, 0.001)
    """
    s = KernelScalars(*scalars)
    out = []
    for (p, g, mu, nu), decays in zip(leaves, decay, strict=True):
        n_blocks, block = mu.codes.shape
        flat = jnp.pad(g.reshape(-1), (0, n_blocks * block - g.size)).reshape(n_blocks, block)
        m = s.one_minus_b1 * flat + s.b1 * decode_blocks(mu, signed=True)
        v = s.one_minus_b2 * (flat * flat) + s.b2 * jnp.square(decode_blocks(nu, signed=False))
        mu, nu = encode_moments((m, v), (False, True))
        m, v = (x.reshape(-1)[: g.size].reshape(g.shape) for x in (m, v))
        if nesterov:
            m_hat = s.b1 * (m * s.inv_bc1_next) + s.one_minus_b1 * (g * s.inv_bc1)
        else:
            m_hat = m * s.inv_bc1
        u = m_hat / (jnp.sqrt(v * s.inv_bc2 + s.eps_root) + s.eps)
        if decays:
            u = u + s.wd * p
        out.append((p + s.neg_lr * u, mu, nu))
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def adam8_step(
    scalars: jax.Array,
    leaves: Sequence[Leaf8],
    decay: tuple[bool, ...],
    nesterov: bool,
    simd: bool = True,
) -> list[tuple[jax.Array, BlockQuantized, BlockQuantized]]:
    """Calls the kernel: ``(θ, g, mu, nu)`` per leaf in, ``(θ, mu, nu)`` per leaf out, in place.

    ``scalars`` holds :class:`~functional_adam.kernels.adam_cpu.KernelScalars` (float32,
    stacked); θ and g are float32, ``mu``/``nu`` the int8/uint8 blocks of ``adam_8bit``.
    θ and both moments (codes and scales) are aliased to their results. ``simd=False``
    takes the kernel's scalar code (the one machines without AVX-512 run). Differentiable
    (through :func:`reference_step`) and batchable (one call per batch element).
    """
    return _call_kernel(scalars, list(leaves), tuple(decay), nesterov, simd)


@adam8_step.defjvp
def _adam8_step_jvp(decay, nesterov, simd, primals, tangents):
    del simd
    return jax.jvp(lambda s, x: reference_step(s, x, decay, nesterov), primals, tangents)


def _call_kernel(scalars, leaves, decay, nesterov, simd):
    if len(leaves) > LEAVES_PER_CALL:
        return [
            out
            for i in range(0, len(leaves), LEAVES_PER_CALL)
            for out in _call_kernel(
                scalars,
                leaves[i : i + LEAVES_PER_CALL],
                decay[i : i + LEAVES_PER_CALL],
                nesterov,
                simd,
            )
        ]
    if not build.available():
        raise RuntimeError("functional_adam: the CPU kernel is not available (see the warning)")
    operands = [scalars, jnp.asarray(codec_constants())]
    results, aliases = [], {}
    for k, (p, g, mu, nu) in enumerate(leaves):
        ins = [p, g, mu.codes, mu.scale, nu.codes, nu.scale]
        operands += ins
        outs = [ins[0], *ins[2:]]  # θ, m codes, m scales, v codes, v scales
        results += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs]
        first = 2 + 6 * k
        aliases |= {first + j: 5 * k + i for i, j in enumerate((0, 2, 3, 4, 5))}
    call = jax.ffi.ffi_call(
        TARGET_8BIT, results, input_output_aliases=aliases, vmap_method="sequential"
    )
    flat = call(*operands, decay=np.asarray(decay, np.int64), nesterov=bool(nesterov), simd=simd)
    return [
        (
            flat[5 * k],
            BlockQuantized(*flat[5 * k + 1 : 5 * k + 3]),
            BlockQuantized(*flat[5 * k + 3 : 5 * k + 5]),
        )
        for k in range(len(leaves))
    ]
