"""Train a GPT-style byte-level language model with functional_adam on a device mesh.

The text is the Python standard library's source (found on every machine; --data for your
own), one byte per token. A Flax NNX decoder-only transformer, AdamW from functional_adam
behind Optax's gradient clipping, warm-up and cosine decay, on a jax.sharding.Mesh: data
parallel, FSDP or ZeRO-1. Prints validation loss and perplexity, writes metrics.json,
training.png and Orbax checkpoints, and ends with a sample of generated text.

    python -m examples.lm.train                                  # tiny model, minutes on a CPU
    python -m examples.lm.train --steps 200 --optimizer adam_8bit --param-dtype bfloat16
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m examples.lm.train --mesh data=2,fsdp=4 --zero1   # 8 simulated devices
    python -m examples.lm.train --resume --mesh fsdp=8           # continue on another mesh
    python -m examples.lm.train --preset gpt2-small --seq-len 1024 --batch-size 32

See docs/lm.md for what each option costs and saves.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import PARAM_DTYPES, Config, ConfigError, resolve
from .data import DataError
from .loop import train
from .mesh import MeshError
from .model import PRESETS
from .optim import MOMENTS, OptimizerError, optimizer_names

DEFAULTS = Config()


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (defaults: the preset's)")
    g.add_argument("--preset", choices=list(PRESETS), default="tiny", help="model shape (tiny)")
    g.add_argument("--layers", type=_int, help="transformer blocks")
    g.add_argument("--d-model", type=_int, help="width of the residual stream")
    g.add_argument("--heads", type=_int, help="attention heads (must divide --d-model)")
    g.add_argument("--context", type=_int, help="longest sequence the model takes")
    g.add_argument("--vocab-size", type=_int, help="embedding rows (≥ 256; bytes use 256)")
    g.add_argument("--seq-len", type=_int, help="training sequence length (default: --context)")


def _training_flags(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_int, default=d.steps, help=f"({d.steps})")
    g.add_argument("--until", type=_int, help="stop after this step; continue with --resume")
    g.add_argument("--batch-size", type=_int, default=d.batch_size, help=f"({d.batch_size})")
    g.add_argument("--learning-rate", type=float, help="peak (2e-3; 6e-4 for gpt2-small)")
    g.add_argument("--warmup-steps", type=_int, default=d.warmup_steps, help="(100)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine end (0.1)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW's (0.1)")
    g.add_argument("--clip-norm", type=float, default=d.clip_norm, help="global norm; 0: off")
    g.add_argument("--seed", type=_int, default=d.seed, help="initialisation and batches (0)")
    g.add_argument("--data", help="a text file or a folder of them (default: Python's stdlib)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="(0.05)")


def _optimizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer, precision and memory")
    g.add_argument("--optimizer", choices=optimizer_names(), default="adamw", help="(adamw)")
    g.add_argument("--moments", choices=MOMENTS, default="float32", help="moment storage")
    g.add_argument("--param-dtype", choices=PARAM_DTYPES, default="float32")
    g.add_argument(
        "--master-weights", action="store_true", help="float32 copy of bf16 params in the state"
    )
    g.add_argument("--flat", action="store_true", help="parameters in one buffer per dtype")
    g.add_argument("--mesh", help="axis sizes, e.g. data=2,fsdp=4 (default: data=all devices)")
    g.add_argument("--zero1", action="store_true", help="moments also split over the data axis")


def _output_flags(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group("evaluation, checkpoints, outputs")
    g.add_argument("--eval-every", type=_int, default=d.eval_every, help="steps (200)")
    g.add_argument("--eval-batches", type=_int, default=d.eval_batches, help="(8)")
    g.add_argument("--log-every", type=_int, default=d.log_every, help="steps per bar update")
    g.add_argument("--output-dir", default="runs/lm", help="metrics.json, training.png")
    g.add_argument("--checkpoint-dir", help="default OUTPUT_DIR/checkpoints; '' for none")
    g.add_argument("--checkpoint-every", type=_int, default=d.checkpoint_every, help="(500)")
    g.add_argument("--keep-checkpoints", type=_int, default=d.keep_checkpoints, help="(3)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    g.add_argument("--prompt", default=d.prompt, help=f"start of the sample ({d.prompt!r})")
    g.add_argument("--sample-tokens", type=_int, default=d.sample_tokens, help="0: no sample")
    g.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy (0.8)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m examples.lm.train",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for add in (_model_flags, _training_flags, _optimizer_flags, _output_flags):
        add(p)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """The resolved :class:`Config` the parsed command line asks for."""
    fields = vars(args).copy()
    preset, no_progress = fields.pop("preset"), fields.pop("no_progress")
    if fields["checkpoint_dir"] is None:
        fields["checkpoint_dir"] = str(Path(args.output_dir) / "checkpoints")
    fields["checkpoint_dir"] = fields["checkpoint_dir"] or None
    model_fields = ("layers", "d_model", "heads", "context", "vocab_size", "seq_len")
    model_fields += ("learning_rate",)
    given = {k: fields.pop(k) for k in model_fields}
    return resolve(preset, **given, **fields, progress=not no_progress)


def _make_dirs(config: Config) -> None:
    """Creates the output and checkpoint directories now, not after an hour of training."""
    for name, directory in (
        ("--output-dir", config.output_dir),
        ("--checkpoint-dir", config.checkpoint_dir),
    ):
        if not directory:
            continue
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{name} {directory!r} cannot be created: {e.strerror}") from e
        if not os.access(directory, os.W_OK):
            raise ConfigError(f"{name} {directory!r} is not writable")


USAGE_ERRORS = (ConfigError, DataError, MeshError, OptimizerError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, trains, and returns the exit status (2 on a usage or data error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        config.validate()
        _make_dirs(config)
        train(config)
    except USAGE_ERRORS as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
