"""Orbax checkpoints of a language-model run, restorable onto a different mesh.

A checkpoint, numbered by the training step, holds

- ``state``: ``{"params", "opt_state", "step"}`` as (sharded) arrays, ``StandardSave``;
- ``meta``: JSON with the configuration and the history so far (per-step training losses,
  validation rows), so a resumed run checks it continues the same experiment and writes the
  whole history into ``metrics.json``.

Restoring takes the *target's* abstract state: ``ShapeDtypeStruct``s carrying the shardings
of the mesh the resumed run uses (:func:`abstract_state`), so Orbax reads each device's
slice straight onto that device whatever mesh wrote the checkpoint. The batches depend only
on ``(seed, step)`` (:func:`lm.data.train_batch`), so nothing else needs saving.

Saving is synchronous: the next training step donates (reuses) the buffers being saved.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

MUST_MATCH = (
    "preset",
    "layers",
    "d_model",
    "heads",
    "context",
    "vocab_size",
    "seq_len",
    "batch_size",
    "steps",
    "learning_rate",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "clip_norm",
    "optimizer",
    "moments",
    "param_dtype",
    "master_weights",
    "flat",
    "seed",
    "data",
)
"""Configuration fields a resumed run must share with its checkpoint (the mesh may differ)."""


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used as asked."""


def _manager(directory: str, keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False, create=True, max_to_keep=keep
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(directory: str, step: int, params: Any, opt_state: Any, meta: dict, keep: int) -> None:
    """Writes the checkpoint of ``step`` (keeping the newest ``keep``)."""
    item = {"params": params, "opt_state": opt_state, "step": np.asarray(step, np.int64)}
    with _manager(directory, keep) as manager:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(item), meta=ocp.args.JsonSave(meta)
            ),
        )


def latest_step(directory: str) -> int | None:
    """The step of the newest checkpoint in ``directory``, or ``None`` when there is none."""
    if not Path(directory).is_dir():
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def abstract_state(abstract_params, param_shardings, abstract_opt_state, state_shardings):
    """The restore target: ``ShapeDtypeStruct``s with the shardings of the current mesh."""

    def with_sharding(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return {
        "params": jax.tree.map(with_sharding, abstract_params, param_shardings),
        "opt_state": jax.tree.map(with_sharding, abstract_opt_state, state_shardings),
        "step": jax.ShapeDtypeStruct((), np.int64),
    }


def restore(directory: str, target: dict, config: dict, resume: bool) -> tuple[dict, dict] | None:
    """The latest checkpoint as ``(state, meta)`` on ``target``'s shardings, or ``None``.

    Args:
      directory: the checkpoint directory.
      target: :func:`abstract_state` of the run that resumes.
      config: the resuming run's configuration (``Config.to_json()``).
      resume: whether the user asked to resume.

    Returns:
      ``None`` when there is no checkpoint; else the state dict and the JSON metadata.

    Raises:
      CheckpointError: checkpoints exist but ``resume`` is false (nothing is overwritten),
        or the checkpoint's configuration differs in a field of :data:`MUST_MATCH`.
    """
    step = latest_step(directory)
    if step is None:
        if resume:
            print(f"--resume: no checkpoint in {directory}; starting from scratch", file=sys.stderr)
        return None
    if not resume:
        raise CheckpointError(
            f"--checkpoint-dir {directory} already holds checkpoints (latest: step {step}); pass "
            "--resume to continue from it, or choose another --checkpoint-dir"
        )
    with _manager(directory) as manager:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        _check_config(config, meta["config"], directory, step)
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    return restored.state, meta


def _check_config(config: dict, saved: dict, directory: str, step: int) -> None:
    diffs = [
        f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {config[k]!r}"
        for k in MUST_MATCH
        if saved.get(k) != config[k]
    ]
    if diffs:
        raise CheckpointError(
            f"cannot resume from {directory} (step {step}): the configuration differs:\n  "
            + "\n  ".join(diffs)
        )
