"""What a finished run writes: ``metrics.json`` and ``training.png``."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

import functional_adam as fa

if TYPE_CHECKING:
    from mnist.train import Config, TrainResult


def write_outputs(config: Config, result: TrainResult, log: Callable[[str], None]) -> None:
    """Writes ``metrics.json`` and ``training.png`` into ``config.output_dir``."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "config": config.to_json(),
        "epochs": result.history,
        "compile_seconds": result.compile_seconds,
        "total_seconds": result.total_seconds,
        "final_test_accuracy": result.history[-1]["test_accuracy"] if result.history else None,
        "best_test_accuracy": max((r["test_accuracy"] for r in result.history), default=None),
        "machine": {
            "platform": platform.platform(),
            "device": str(jax.devices()[0]),
            "devices": jax.device_count(),
            "jax": jax.__version__,
            "functional_adam": fa.__version__,
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    title = f"MNIST MLP {'-'.join(map(str, (784, *config.hidden, 10)))}, {config.optimizer}"
    if result.history:
        title += f": final test accuracy {100 * result.history[-1]['test_accuracy']:.2f}%"
    plot_history(result.history, out / "training.png", title=title)
    log(f"wrote {out / 'metrics.json'} and {out / 'training.png'}")


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Plots train loss and test accuracy per epoch into the PNG ``path`` (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "s--", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in history], "o-", color="C2")
    ax_acc.set(xlabel="epoch", ylabel="%", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_bar(config: Config, epoch: int, steps: int):
    """A tqdm bar for one epoch, or ``None`` without ``config.progress``."""
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=steps,
        desc=f"epoch {epoch}/{config.epochs}",
        unit="ex",
        unit_scale=config.batch_size,
        leave=False,
        dynamic_ncols=True,
        postfix={"loss": "?"},
    )


def summary_line(row: dict[str, Any], epochs: int) -> str:
    """The one-line summary of an epoch's row of the history."""
    return (
        f"epoch {row['epoch']:>2}/{epochs}  train loss {row['train_loss']:.4f}  "
        f"test acc {100 * row['test_accuracy']:.2f}%  "
        f"epoch {row['epoch_seconds']:.2f} s ({row['examples_per_second']:,.0f} ex/s)"
    )
