"""Orbax checkpoints of a training run: parameters, optimizer state, step, RNG and history.

One checkpoint per epoch, numbered by the epoch, in ``--checkpoint-dir``. Each holds

- ``state``: ``{"params", "opt_state", "step", "rng"}`` as arrays (``rng`` is the raw key
  data of the shuffling key after that epoch), written with ``StandardSave``; the optimizer
  state keeps its NamedTuple structure because it is restored into a template built from a
  fresh ``tx.init(params)``;
- ``meta``: JSON with the configuration and the per-epoch history, so a resumed run checks
  that it continues the same experiment and writes the whole history into ``metrics.json``.

Saving is synchronous: the next training step donates (reuses) the buffers being saved.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp

if TYPE_CHECKING:
    from mnist.train import Config

MUST_MATCH = (
    "batch_size",
    "learning_rate",
    "optimizer",
    "seed",
    "param_dtype",
    "hidden",
    "train_subset",
)
"""Configuration fields a resumed run must share with the checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used as asked."""


def _manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(config: Config, state: Any) -> None:
    """Saves ``state`` (a ``train._State``) as the checkpoint of epoch ``state.epoch``."""
    item = {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": np.asarray(state.step, np.int64),
        "rng": jax.random.key_data(state.key),
    }
    meta = {"config": config.to_json(), "history": state.history}
    with _manager(config.checkpoint_dir) as manager:
        manager.save(
            state.epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(item), meta=ocp.args.JsonSave(meta)
            ),
        )


def latest_epoch(directory: str) -> int | None:
    """The epoch of the newest checkpoint in ``directory``, or ``None`` when there is none."""
    if not Path(directory).is_dir():
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def restore_or_check(config: Config, fresh: Any) -> Any:
    """The state to start from: ``fresh``, or the latest checkpoint when ``config.resume``.

    Args:
      config: the run; its ``checkpoint_dir`` is read.
      fresh: the freshly initialised ``train._State``; its arrays are the restore template.

    Returns:
      A ``train._State``.

    Raises:
      CheckpointError: checkpoints exist but ``config.resume`` is false (nothing is
        overwritten), or the checkpoint's configuration differs in a field of
        :data:`MUST_MATCH`.
    """
    directory = config.checkpoint_dir
    epoch = latest_epoch(directory)
    if epoch is None:
        if config.resume:
            print(f"--resume: no checkpoint in {directory}; starting from scratch", file=sys.stderr)
        return fresh
    if not config.resume:
        raise CheckpointError(
            f"{directory} already holds checkpoints (latest: epoch {epoch}); pass --resume to "
            "continue from it, or choose another --checkpoint-dir (or delete that one)"
        )
    template = {
        "params": fresh.params,
        "opt_state": fresh.opt_state,
        "step": np.asarray(0, np.int64),
        "rng": jax.random.key_data(fresh.key),
    }
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    with _manager(directory) as manager:
        restored = manager.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
    _check_config(config, restored.meta["config"], directory, epoch)
    s = restored.state
    return type(fresh)(
        params=s["params"],
        opt_state=s["opt_state"],
        key=jax.random.wrap_key_data(s["rng"]),
        step=int(s["step"]),
        epoch=epoch,
        history=list(restored.meta["history"]),
    )


def _check_config(config: Config, saved: dict[str, Any], directory: str, epoch: int) -> None:
    current = config.to_json()
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}"
        for k in MUST_MATCH
        if saved.get(k) != current[k]
    ]
    if diffs:
        raise CheckpointError(
            f"cannot resume from {directory} (epoch {epoch}): the configuration differs:\n  "
            + "\n  ".join(diffs)
        )
