"""What a run prints and writes: the progress bar, summary lines, metrics.json, training.png."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

import functional_adam as fa

from . import mesh as mesh_lib

if TYPE_CHECKING:
    from .config import Config
    from .loop import Result, Setup


def memory_analysis(compiled: Any) -> dict[str, int]:
    """Per-device byte counts XLA reports for a compiled step (empty where it reports none)."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return {}
    if m is None:
        return {}
    names = ("argument", "output", "alias", "temp", "generated_code")
    return {f"step_{n}_bytes": int(getattr(m, f"{n}_size_in_bytes", 0)) for n in names}


def progress_bar(config: Config, start: int):
    """A tqdm bar over the steps (``None`` with ``progress=False``)."""
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=config.steps,
        initial=start,
        unit="step",
        dynamic_ncols=True,
        postfix={"loss": "?", "tok_s": "?"},
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def setup_line(config: Config, s: Setup, fns: Any, start: int) -> str:
    """What is being trained where, the compile time and the per-device state size."""
    n = sum(x.size for x in jax.tree.leaves(s.target["params"]))
    start_text = f"resuming at step {start}" if start else "from scratch"
    return (
        f"model: {config.layers} layers, d_model {config.d_model}, {config.heads} heads, "
        f"context {config.context}, {n:,} parameters ({config.param_dtype}); "
        f"{config.optimizer}, moments {config.moments}"
        f"{', master weights' if config.master_weights else ''}{', flat' if config.flat else ''}\n"
        f"mesh: {mesh_lib.describe(s.mesh)}{', ZeRO-1' if config.zero1 else ''}; per device: "
        f"params {_mib(fns.memory['params_bytes_per_device'])}, optimizer state "
        f"{_mib(fns.memory['opt_state_bytes_per_device'])}\n"
        f"compile: {fns.seconds:.2f} s (step and evaluation); {start_text}, "
        f"{config.steps} steps of {config.batch_size} x {config.seq_len} tokens"
    )


def eval_line(row: dict[str, Any], steps: int) -> str:
    """``step 200/2000  train 2.1234  val 2.2345  ppl 9.34  12,345 tok/s``."""
    rate = row.get("tokens_per_second")
    return (
        f"step {row['step']:>6}/{steps}  train loss {row['train_loss']:.4f}  "
        f"val loss {row['val_loss']:.4f}  val ppl {row['val_perplexity']:.2f}"
        + (f"  {rate:,.0f} tok/s" if rate else "")
    )


def write_outputs(config: Config, s: Setup, result: Result, log) -> None:
    """Writes ``metrics.json`` and ``training.png`` into ``config.output_dir``."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = result.state
    metrics = {
        "config": config.to_json(),
        "parameters": sum(x.size for x in jax.tree.leaves(s.target["params"])),
        "mesh": mesh_lib.describe(s.mesh),
        "step": state.step,
        "train_loss": state.losses,
        "evals": state.evals,
        "final_val_loss": state.evals[-1]["val_loss"] if state.evals else None,
        "tokens_per_second": result.tokens_per_second,
        "compile_seconds": result.compile_seconds,
        "total_seconds": result.total_seconds,
        "memory": result.memory,
        "sample": {
            "prompt": config.prompt,
            "temperature": config.temperature,
            "text": result.sample,
        },
        "machine": {
            "platform": platform.platform(),
            "device": str(jax.devices()[0]),
            "devices": jax.device_count(),
            "jax": jax.__version__,
            "functional_adam": fa.__version__,
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    title = (
        f"{config.layers}x{config.d_model} byte-level LM, {config.optimizer}, "
        f"{mesh_lib.describe(s.mesh)}"
    )
    plot_losses(state.losses, state.evals, out / "training.png", title)
    log(f"wrote {out / 'metrics.json'} and {out / 'training.png'}")


def plot_losses(losses: list[float], evals: list[dict], path: str | Path, title: str = "") -> None:
    """Training loss per step and validation loss per evaluation, into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.7, label="train (per step)")
    if evals:
        steps = [r["step"] for r in evals]
        ax.plot(steps, [r["val_loss"] for r in evals], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/byte)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
