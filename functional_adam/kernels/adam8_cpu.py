"""The fused CPU 8-bit Adam step: its codec constants, its arithmetic in ``jax.numpy``, its call.

The C++ kernel (``adam8_cpu.cc``, built and loaded by :mod:`functional_adam.kernels.build`)
makes one pass per block over all quantized leaves together, in place, on XLA's
intra-op thread pool: for each element it reads θ, g and the two 8-bit codes once
and writes θ and the two codes once (about 16 bytes per parameter), keeping each
block's float32 moments in L1 between computing the new block maxima and encoding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from functional_adam.kernels import build, per_shard
from functional_adam.kernels.adam_cpu import KernelScalars
from functional_adam.kernels.build import TARGET_8BIT
from functional_adam.storage import shard_blocks
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
    scalars: jax.Array,
    leaves: Sequence[Leaf8],
    decay: Sequence[bool],
    nesterov: bool,
    updates: bool = False,
    code: str = "dynamic",
) -> list[tuple[jax.Array, BlockQuantized, BlockQuantized]]:
    """The kernel's arithmetic in ``jax.numpy`` (its derivative rule; equal to it within rounding).

    Flat and shard-major leaves alike (a shard-major one as the flat blocks of its
    shard-major order, as the kernel takes it). ``updates``: the first result of each
    leaf is the update ``-lr·(u [+ wd·θ])`` instead of the new θ. ``code``: the codes'
    format (``"dynamic"`` or ``"float"``).

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
    for leaf, decays in zip(leaves, decay, strict=True):
        (p, g, *codes), back = as_flat((leaf[0], leaf[1], *leaf[2], *leaf[3]))
        mu, nu = BlockQuantized(*codes[:2]), BlockQuantized(*codes[2:])
        n_blocks, block = mu.codes.shape
        flat = jnp.pad(g.reshape(-1), (0, n_blocks * block - g.size)).reshape(n_blocks, block)
        m = s.one_minus_b1 * flat + s.b1 * decode_blocks(mu, signed=True, code=code)
        v_old = jnp.square(decode_blocks(nu, signed=False, code=code))
        v = s.one_minus_b2 * (flat * flat) + s.b2 * v_old
        mu, nu = encode_moments((m, v), (False, True), code=code)
        m, v = (x.reshape(-1)[: g.size].reshape(g.shape) for x in (m, v))
        if nesterov:
            m_hat = s.b1 * (m * s.inv_bc1_next) + s.one_minus_b1 * (g * s.inv_bc1)
        else:
            m_hat = m * s.inv_bc1
        u = m_hat / (jnp.sqrt(v * s.inv_bc2 + s.eps_root) + s.eps)
        if decays:
            u = u + s.wd * p
        q, mc, ms, vc, vs = back((s.neg_lr * u if updates else p + s.neg_lr * u, *mu, *nu))
        out.append((q, BlockQuantized(mc, ms), BlockQuantized(vc, vs)))
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6))
def adam8_step(
    scalars: jax.Array,
    leaves: Sequence[Leaf8],
    decay: tuple[bool, ...],
    nesterov: bool,
    simd: bool = True,
    updates: bool = False,
    code: str = "dynamic",
) -> list[tuple[jax.Array, BlockQuantized, BlockQuantized]]:
    """Calls the kernel: ``(θ, g, mu, nu)`` per leaf in, ``(θ, mu, nu)`` per leaf out, in place.

    ``scalars`` holds :class:`~functional_adam.kernels.adam_cpu.KernelScalars` (float32,
    stacked); θ and g are float32, ``mu``/``nu`` the int8/uint8 blocks of ``adam_8bit``.
    θ and both moments (codes and scales) are aliased to their results. ``simd=False``
    takes the kernel's scalar code (the one machines without AVX-512 run). ``updates``:
    the first result of each leaf is the update ``-lr·(u [+ wd·θ])`` (what
    ``GradientTransformation.update`` returns), written over g (aliased to it; XLA copies
    g first where it is still needed), and θ is read only for the decay (one device
    only). ``code``: the codes' format, ``"dynamic"`` or ``"float"``. Differentiable
    (through :func:`reference_step`) and batchable (one call per batch element).
    """
    return _call_kernel(scalars, list(leaves), tuple(decay), nesterov, simd, updates, code)


@adam8_step.defjvp
def _adam8_step_jvp(decay, nesterov, simd, updates, code, primals, tangents):
    del simd

    def reference(s, x):
        return reference_step(s, x, decay, nesterov, updates, code)

    return jax.jvp(reference, primals, tangents)


def _call_kernel(scalars, leaves, decay, nesterov, simd, updates, code):
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
                updates,
                code,
            )
        ]
    if not build.available():
        raise RuntimeError("functional_adam: the CPU kernel is not available (see the warning)")
    flat = [(p, g, *mu, *nu) for p, g, mu, nu in leaves]  # θ, g, m codes, m scales, v ...
    # The scalars, then the codec's tables: one replicated operand (no constant in the call).
    packed = jnp.concatenate([scalars, jnp.asarray(codec_constants())])
    static = (decay, nesterov, simd, updates, code)
    if jax.device_count() > 1:  # the arrays may be sharded: one call per device, on its shards
        if updates:
            raise ValueError("adam8_step(updates=True) runs on one device")
        out = per_shard.per_shard_call(_any_call, static, packed, flat, Blocks())
    else:
        out = _any_call(packed, flat, *static)
    return [(r[0], BlockQuantized(*r[1:3]), BlockQuantized(*r[3:5])) for r in out]


def _one_call(packed, leaves, decay, nesterov, simd, updates=False, code="dynamic"):
    """The kernel's ``jax.ffi`` call: ``(θ, g, m codes, m scales, v codes, v scales)`` per leaf
    in, ``(θ or the update, m codes, m scales, v codes, v scales)`` out; ``packed`` is the
    scalars, then :func:`codec_constants`."""
    n = len(KernelScalars._fields)
    operands = [packed[:n], packed[n:]]
    results, aliases = [], {}
    # Each result in the buffer of an operand: θ's (the update: g's, which the kernel reads
    # just before it writes the same element), then the moments'.
    aliased = ((1 if updates else 0, 0), (2, 1), (3, 2), (4, 3), (5, 4))
    for k, ins in enumerate(leaves):
        operands += ins
        outs = [ins[0], *ins[2:]]  # θ, m codes, m scales, v codes, v scales
        results += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs]
        aliases |= {2 + 6 * k + j: 5 * k + o for j, o in aliased}
    call = jax.ffi.ffi_call(
        TARGET_8BIT, results, input_output_aliases=aliases, vmap_method="sequential"
    )
    flat = call(
        *operands,
        decay=np.asarray(decay, np.int64),
        nesterov=bool(nesterov),
        simd=simd,
        updates=bool(updates),
        float_codes=code == "float",
    )
    return [tuple(flat[5 * k : 5 * k + 5]) for k in range(len(leaves))]


def is_shard_major(shapes) -> bool:
    """Whether a leaf's ``(θ, g, m codes, ...)`` shapes hold shard-major codes
    (:mod:`functional_adam.storage.shard_blocks`): codes of rank ``θ.ndim + 2``."""
    return len(shapes[0]) > 0 and len(shapes[2]) == len(shapes[0]) + 2


def _any_call(packed, leaves, decay, nesterov, simd, updates=False, code="dynamic"):
    """:func:`_one_call` for flat and shard-major leaves: the shard-major ones are called as
    the flat blocks of their arrays in shard-major order (each shard flattened and padded
    to whole blocks; on a device holding one shard's blocks, just a reshape) and put back."""
    flat, undo = zip(*(as_flat(leaf) for leaf in leaves), strict=True)
    out = _one_call(packed, list(flat), decay, nesterov, simd, updates, code)
    return [back(result) for back, result in zip(undo, out, strict=True)]


def as_flat(leaf):
    """``(leaf as flat blocks, results -> results in the leaf's layout)``."""
    p, g, m_codes, m_scales, v_codes, v_scales = leaf
    if not is_shard_major([x.shape for x in leaf]):
        return leaf, lambda out: out
    shards, block = m_codes.shape[: p.ndim], m_codes.shape[-1]

    def flat(x):
        return shard_blocks.to_blocks(x, shards, block).reshape(-1)

    def back(out):
        q, mc, ms, vc, vs = out
        q = shard_blocks.from_blocks(q.reshape(m_codes.shape), p.shape)
        return (
            q,
            mc.reshape(m_codes.shape),
            ms.reshape(m_scales.shape),
            vc.reshape(v_codes.shape),
            vs.reshape(v_scales.shape),
        )

    codes = (m_codes, m_scales, v_codes, v_scales)
    return (
        flat(p),
        flat(g),
        *(x.reshape(-1, block) if x.ndim == p.ndim + 2 else x.reshape(-1) for x in codes),
    ), back


def _shard_major_shardings(shardings, shapes) -> tuple[list, list]:
    """A shard-major leaf: per shard where its codes hold one shard's blocks on each device
    (θ and g then cut into the same shards); else replicated (every device, all blocks)."""
    r, codes = len(shapes[0]), shardings[2]
    if isinstance(codes, NamedSharding):
        spec = tuple(codes.spec) + (None,) * (r + 2 - len(codes.spec))
        lead = spec[:r]
        sizes = tuple(math.prod(codes.mesh.shape[a] for a in per_shard.axes_of([e])) for e in lead)
        if sizes == tuple(shapes[2][:r]) and spec[r:] == (None, None):
            theta = NamedSharding(codes.mesh, P(*lead))
            c, s = (
                NamedSharding(codes.mesh, P(*lead, None, None)),
                NamedSharding(codes.mesh, P(*lead, None)),
            )
            return [theta, theta, c, s, c, s], [theta, c, s, c, s]
    one = per_shard.replicated(shardings[0])
    return [one] * 6, [one] * 5


def block_axes(param: Any, codes: Any, shape: tuple[int, ...], blocks: tuple[int, int]):
    """The mesh axes over which a leaf's blocks and its parameter's first axis are cut alike,
    ``()`` for none (all replicated), or ``None`` where no such cut is local."""
    if not (isinstance(param, NamedSharding) and isinstance(codes, NamedSharding)):
        return None if per_shard.shards(param) > 1 or per_shard.shards(codes) > 1 else ()
    spec, code_spec = (tuple(s.spec) + (None,) * 2 for s in (param, codes))
    if not shape or per_shard.axes_of(spec[1 : len(shape)]) or per_shard.axes_of(code_spec[1:]):
        return None if per_shard.shards(param) > 1 or per_shard.shards(codes) > 1 else ()
    mine, theirs = sorted((per_shard.axes_of(spec[:1]), per_shard.axes_of(code_spec[:1])), key=len)
    if theirs[: len(mine)] != mine:
        return None
    k = math.prod(param.mesh.shape[a] for a in theirs)
    n_blocks, block = blocks
    size = math.prod(shape)
    if shape[0] % k or n_blocks % k or size != n_blocks * block:
        return None  # a shard of the parameter would not be whole blocks
    return tuple(theirs)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """An 8-bit leaf ``(θ, g, m codes, m scales, v codes, v scales)``, cut per shard where its
    blocks lie along the parameter's first-axis shards (:func:`block_axes`), or where its
    shard-major codes hold one shard's blocks per device (θ cut like them); else replicated
    (the arrays gathered, as the XLA path gathers them). The gradient is resharded to θ's."""

    results_of: tuple[int, ...] = (0, 2, 3, 4, 5)

    def factors(self, k: int, shapes) -> tuple[list[str], list[str]]:
        theta = " ".join(f"l{k}p{d}" for d in range(len(shapes[0])))
        grad = " ".join(f"l{k}g{d}" for d in range(len(shapes[0])))
        codes, scales = f"l{k}b l{k}e", f"l{k}b"
        if is_shard_major(shapes):  # leading axes: the shards, factors of their own
            lead = " ".join(f"l{k}s{d}" for d in range(len(shapes[0])))
            codes, scales = f"{lead} {codes}", f"{lead} {scales}"
        return [theta, grad, codes, scales, codes, scales], [theta, codes, scales, codes, scales]

    def shardings(self, shardings, shapes) -> tuple[list, list]:
        if is_shard_major(shapes):
            return _shard_major_shardings(shardings, shapes)
        axes = block_axes(shardings[0], shardings[2], tuple(shapes[0]), tuple(shapes[2]))
        if not axes:
            one = per_shard.replicated(shardings[0])
            return [one] * 6, [one] * 5
        mesh, entry = shardings[0].mesh, axes[0] if len(axes) == 1 else axes
        theta = NamedSharding(mesh, P(entry, *[None] * (len(shapes[0]) - 1)))
        codes, scales = NamedSharding(mesh, P(entry, None)), NamedSharding(mesh, P(entry))
        return [theta, theta, codes, scales, codes, scales], [theta, codes, scales, codes, scales]
