"""The fused 8-bit Adam step as a Pallas kernel for GPUs (Triton lowering).

One program per group of blocks of one leaf, all leaves of a call in one launch
(each program finds its leaf by its index): load θ, g and the two 8-bit codes of
the group once, decode, step, take each block's new maxima over its valid
elements, encode, and write θ and the codes once (about 16 bytes per parameter).
The arithmetic is :mod:`functional_adam.kernels.adam8_cpu`'s, in ``jax.numpy``:
the codec's rule (:mod:`functional_adam.storage.codec`) by comparisons and
selects, since Triton has no table look-ups.

``interpret=True`` runs the same kernel on any backend with Pallas' interpreter
(how the tests check it on a CPU); on a GPU it is compiled by Triton.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from functional_adam.kernels import adam8_cpu, per_shard
from functional_adam.kernels.adam8_cpu import Leaf8, reference_step
from functional_adam.kernels.adam_cpu import KernelScalars
from functional_adam.kernels.adam_gpu import launch
from functional_adam.storage import float_codes
from functional_adam.storage.codec import (
    decode_codes_by_rule,
    make_codec,
    nearest_index_by_rule,
)
from functional_adam.storage.quantized import BlockQuantized

LEAVES_PER_CALL = 16  # leaves per launch (each leaf is a branch of the kernel)
INTERPRET = False  # update_and_apply's Pallas calls run interpreted (tests on a CPU set it)
ELEMENTS_PER_PROGRAM = 2048  # or one block, if blocks are larger
NUM_WARPS = 4


def _encode(m, v, valid, m_inv, v_inv, code):
    """The codes of the new ``m`` and ``sqrt(v)`` of some blocks, given the inverse scales."""
    root = jnp.sqrt(v)
    am = jnp.where(valid, jnp.abs(m) * m_inv, jnp.where(jnp.isnan(m), 0.0, 1.0))
    av = jnp.where(valid, root * v_inv, 1.0)
    if code == "float":
        km, kv = float_codes.encode(am, True), float_codes.encode(av, False)
        km = jnp.where(m < 0, -km, km)
    else:
        signed, unsigned = make_codec(True), make_codec(False)
        km = nearest_index_by_rule(am, signed)
        km = jnp.where(m < 0, -jnp.minimum(km, len(signed.magnitudes) - 2), km)
        km = jnp.where(km == 128, -128, km)  # the code of +1 (int8 wraps)
        kv = nearest_index_by_rule(av, unsigned)
    kv = jnp.where((root > 0) & (kv == 0), 1, kv)  # a positive v never gets the zero code
    return km.astype(jnp.int8), kv.astype(jnp.uint8)


def _decode(codes, signed: bool, code: str):
    """The values in [-1, 1] of some blocks' codes (without their scales)."""
    if code == "float":
        return float_codes.decode_codes(codes, signed)
    return decode_codes_by_rule(codes, make_codec(signed))


def _group_step(
    s: KernelScalars, p, g, m_codes, m_scale, v_codes, v_scale, decay, nesterov, updates, code
):
    """θ (``updates``: the update) and the new codes and scales of a group of blocks (shapes
    ``(G, block)`` and ``(G,)``)."""
    md = _decode(m_codes, True, code) * m_scale[:, None]
    vd = jnp.square(_decode(v_codes, False, code) * v_scale[:, None])
    m = s.one_minus_b1 * g + s.b1 * md
    v = s.one_minus_b2 * (g * g) + s.b2 * vd
    valid = jnp.isfinite(m) & jnp.isfinite(v)
    m_new_scale = jnp.max(jnp.where(valid, jnp.abs(m), 0.0), axis=1)
    v_new_scale = jnp.sqrt(jnp.max(jnp.where(valid, v, 0.0), axis=1))
    m_inv = jnp.where(m_new_scale > 0, 1 / m_new_scale, 0.0)[:, None]
    v_inv = jnp.where(v_new_scale > 0, 1 / v_new_scale, 0.0)[:, None]
    m_codes, v_codes = _encode(m, v, valid, m_inv, v_inv, code)
    if nesterov:
        m_hat = s.b1 * (m * s.inv_bc1_next) + s.one_minus_b1 * (g * s.inv_bc1)
    else:
        m_hat = m * s.inv_bc1
    u = m_hat / (jnp.sqrt(v * s.inv_bc2 + s.eps_root) + s.eps)
    if decay:
        u = u + s.wd * p
    first = s.neg_lr * u if updates else p + s.neg_lr * u
    return first, m_codes, m_new_scale, v_codes, v_new_scale


def _kernel(starts, sizes, block, group, decay, nesterov, updates, code, scalars_ref, *refs):
    """Program ``i`` does the ``group`` blocks of the leaf whose programs ``starts`` cover ``i``."""
    n_leaves = len(sizes)
    ins, outs = refs[: 6 * n_leaves], refs[6 * n_leaves :]
    s = KernelScalars(*(scalars_ref[j] for j in range(len(KernelScalars._fields))))
    i = pl.program_id(0)
    rows = jnp.arange(group)
    for k, size in enumerate(sizes):
        p_ref, g_ref, mc_ref, ms_ref, vc_ref, vs_ref = ins[6 * k : 6 * k + 6]
        p_out, mc_out, ms_out, vc_out, vs_out = outs[5 * k : 5 * k + 5]
        n_blocks = mc_ref.shape[0]

        @pl.when((i >= starts[k]) & (i < starts[k + 1]))
        def _(
            k=k,
            size=size,
            refs=(
                p_ref,
                g_ref,
                mc_ref,
                ms_ref,
                vc_ref,
                vs_ref,
                p_out,
                mc_out,
                ms_out,
                vc_out,
                vs_out,
            ),
            n_blocks=n_blocks,
        ):
            p_ref, g_ref, mc_ref, ms_ref, vc_ref, vs_ref, p_out, mc_out, ms_out, vc_out, vs_out = (
                refs
            )
            first = (i - starts[k]) * group  # the group's first block
            row_ok = first + rows < n_blocks
            index = (first + rows)[:, None] * block + jnp.arange(block)[None, :]
            ok = (index < size).reshape(-1)
            elements = pl.ds(first * block, group * block)
            if updates and not decay[k]:  # the update alone: θ is not read
                p = None
            else:
                p = plt.load(p_ref.at[elements], mask=ok, other=0.0).reshape(group, block)
            g = plt.load(g_ref.at[elements], mask=ok, other=0.0).reshape(group, block)
            row_mask = jnp.broadcast_to(row_ok[:, None], (group, block))
            mc = plt.load(mc_ref.at[pl.ds(first, group), :], mask=row_mask, other=0)
            vc = plt.load(vc_ref.at[pl.ds(first, group), :], mask=row_mask, other=0)
            ms = plt.load(ms_ref.at[pl.ds(first, group)], mask=row_ok, other=0.0)
            vs = plt.load(vs_ref.at[pl.ds(first, group)], mask=row_ok, other=0.0)
            p, mc, ms, vc, vs = _group_step(
                s, p, g, mc, ms, vc, vs, decay[k], nesterov, updates, code
            )
            plt.store(p_out.at[elements], p.reshape(-1), mask=ok)
            plt.store(mc_out.at[pl.ds(first, group), :], mc, mask=row_mask)
            plt.store(vc_out.at[pl.ds(first, group), :], vc, mask=row_mask)
            plt.store(ms_out.at[pl.ds(first, group)], ms, mask=row_ok)
            plt.store(vs_out.at[pl.ds(first, group)], vs, mask=row_ok)


def _call(scalars, leaves, decay, nesterov, interpret, updates, code):
    block = leaves[0][2].codes.shape[1]
    group = max(1, ELEMENTS_PER_PROGRAM // block)
    programs = [pl.cdiv(mu.codes.shape[0], group) for _, _, mu, _ in leaves]
    starts = tuple(int(x) for x in np.concatenate([[0], np.cumsum(programs)]))
    sizes = tuple(int(p.size) for p, *_ in leaves)
    operands, out_shape, aliases = [scalars], [], {}
    for k, (p, g, mu, nu) in enumerate(leaves):
        ins = [p.reshape(-1), g.reshape(-1), mu.codes, mu.scale, nu.codes, nu.scale]
        operands += ins
        out_shape += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (ins[0], *ins[2:])]
        aliased = ((1 if updates else 0, 0), (2, 1), (3, 2), (4, 3), (5, 4))  # the update over g
        aliases |= {1 + 6 * k + j: 5 * k + o for j, o in aliased}
    kernel = functools.partial(_kernel, starts, sizes, block, group, decay, nesterov, updates, code)
    flat = launch(kernel, operands, out_shape, aliases, starts[-1], "functional_adam_adam8",
                  NUM_WARPS, interpret)  # fmt: skip
    return [
        (
            flat[5 * k].reshape(p.shape),
            BlockQuantized(flat[5 * k + 1], flat[5 * k + 2]),
            BlockQuantized(flat[5 * k + 3], flat[5 * k + 4]),
        )
        for k, (p, *_) in enumerate(leaves)
    ]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6))
def adam8_step(
    scalars: jax.Array,
    leaves: Sequence[Leaf8],
    decay: tuple[bool, ...],
    nesterov: bool,
    interpret: bool = False,
    updates: bool = False,
    code: str = "dynamic",
) -> list[tuple[jax.Array, BlockQuantized, BlockQuantized]]:
    """:func:`functional_adam.kernels.adam8_cpu.adam8_step` as a Pallas kernel (GPU, or interpreted).

    Leaves go in launches of :data:`LEAVES_PER_CALL` leaves with the same block size.
    ``updates`` (the first result of each leaf is the update; one device only) and
    ``code``, as there. With several devices each runs the launches on its shards of each leaf, cut as the CPU
    kernel cuts them (:class:`functional_adam.kernels.adam8_cpu.Blocks`; shard-major
    blocks where they lie). Differentiable through
    :func:`~functional_adam.kernels.adam8_cpu.reference_step`.
    """
    flat = [(p, g, *mu, *nu) for p, g, mu, nu in leaves]
    statics = (tuple(decay), nesterov, interpret, updates, code)
    if jax.device_count() > 1:  # the arrays may be sharded: each device on its shards
        if updates:
            raise ValueError("adam8_step(updates=True) runs on one device")
        out = per_shard.per_shard_call(_per_device, statics, scalars, flat, adam8_cpu.Blocks())
    else:
        out = _per_device(scalars, flat, *statics)
    return [(r[0], BlockQuantized(*r[1:3]), BlockQuantized(*r[3:5])) for r in out]


def _per_device(scalars, leaves, decay, nesterov, interpret, updates, code):
    """One device's launches on its arrays ``(θ, g, m codes, m scales, v codes, v scales)``
    per leaf; shard-major leaves as the flat blocks of their shards, and back."""
    flat, undo = zip(*(adam8_cpu.as_flat(leaf) for leaf in leaves), strict=True)
    blocks = [
        (p, g, BlockQuantized(mc, ms), BlockQuantized(vc, vs)) for p, g, mc, ms, vc, vs in flat
    ]
    out = _launches(scalars, blocks, decay, nesterov, interpret, updates, code)
    return [back((q, *mu, *nu)) for back, (q, mu, nu) in zip(undo, out, strict=True)]


def _launches(scalars, leaves, decay, nesterov, interpret, updates, code):
    """Flat-block leaves in launches of up to :data:`LEAVES_PER_CALL` of one block size."""
    out = [None] * len(leaves)
    by_block: dict[int, list[int]] = {}
    for i, (_, _, mu, _) in enumerate(leaves):
        by_block.setdefault(int(mu.codes.shape[1]), []).append(i)
    for index in by_block.values():
        for c in range(0, len(index), LEAVES_PER_CALL):
            part = index[c : c + LEAVES_PER_CALL]
            results = _call(
                scalars,
                [leaves[i] for i in part],
                tuple(decay[i] for i in part),
                nesterov,
                interpret,
                updates,
                code,
            )
            for i, result in zip(part, results, strict=True):
                out[i] = result
    return out


@adam8_step.defjvp
def _adam8_step_jvp(decay, nesterov, interpret, updates, code, primals, tangents):
    del interpret

    def reference(s, x):
        return reference_step(s, x, decay, nesterov, updates, code)

    return jax.jvp(reference, primals, tangents)
