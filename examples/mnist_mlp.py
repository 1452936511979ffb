"""Train the classic MNIST MLP (784-512-256-10, ReLU) with Flax NNX and functional_adam.

Adam with its defaults (lr 1e-3), batch 64, reshuffled each epoch, 10 epochs; prints test
accuracy after each epoch and writes metrics.json and training.png to --output-dir.

    python examples/mnist_mlp.py --data-dir ../shared/data/mnist
    python examples/mnist_mlp.py --epochs 3 --optimizer adamw --param-dtype bfloat16
    python examples/mnist_mlp.py --resume            # continue from the latest checkpoint
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python examples/mnist_mlp.py --mesh data=8 --zero1   # data parallel on 8 CPU devices

MNIST is looked for in --data-dir, then $MNIST_DIR, then ~/.cache/functional_adam/mnist, and
downloaded there (into the first of them) when absent. See docs/mnist.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mnist.checkpoint import CheckpointError
from mnist.data import MnistError
from mnist.model import HIDDEN
from mnist.train import LOOPS, PARAM_DTYPES, Config, ConfigError, optimizer_table, train


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--epochs", type=_positive_int, default=10, help="epochs in total (default 10)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="default 64")
    p.add_argument("--learning-rate", type=_positive_float, default=1e-3, help="default 1e-3")
    p.add_argument(
        "--optimizer",
        choices=sorted(optimizer_table()),
        default="adam",
        help="a functional_adam optimizer with its defaults besides the learning rate (default adam)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="initialisation and shuffling seed (default 0)"
    )
    p.add_argument(
        "--data-dir", default=None, help="directory with the MNIST IDX files (.gz or raw)"
    )
    p.add_argument(
        "--output-dir",
        default="runs/mnist_mlp",
        help="metrics.json and training.png (default runs/mnist_mlp)",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="Orbax checkpoints, one per epoch (default OUTPUT_DIR/checkpoints; '' for none)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument(
        "--param-dtype",
        choices=list(PARAM_DTYPES),
        default="float32",
        help="dtype of the parameters",
    )
    p.add_argument(
        "--hidden",
        type=_positive_int,
        nargs="+",
        default=list(HIDDEN),
        help="hidden layer widths (default 512 256)",
    )
    p.add_argument(
        "--train-subset", type=_positive_int, default=None, help="use the first N training examples"
    )
    p.add_argument(
        "--test-subset", type=_positive_int, default=None, help="use the first N test examples"
    )
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default="step",
        help="per-step jit (default) or a whole epoch under lax.scan",
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="train on a device mesh: data=N (data parallel), fsdp=N (sharded parameters) "
        "or data=N,fsdp=M; see examples/mnist/mesh.py",
    )
    p.add_argument(
        "--zero1",
        action="store_true",
        help="with --mesh data=N: partition the optimizer state over data (ZeRO-1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """The :class:`Config` the parsed command line asks for."""
    checkpoint_dir = args.checkpoint_dir
    if checkpoint_dir is None:
        checkpoint_dir = str(Path(args.output_dir) / "checkpoints")
    return Config(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        seed=args.seed,
        param_dtype=args.param_dtype,
        hidden=tuple(args.hidden),
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        loop=args.loop,
        data_dir=args.data_dir,
        checkpoint_dir=checkpoint_dir or None,
        resume=args.resume,
        output_dir=args.output_dir,
        progress=not args.no_progress,
        mesh=args.mesh,
        zero1=args.zero1,
    )


def _make_dirs(config: Config) -> None:
    """Creates the output and checkpoint directories now, not after an hour of training."""
    for flag, directory in (
        ("--output-dir", config.output_dir),
        ("--checkpoint-dir", config.checkpoint_dir),
    ):
        if not directory:
            continue
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{flag} {directory!r} cannot be created: {e.strerror}") from e
        if not os.access(directory, os.W_OK):
            raise ConfigError(f"{flag} {directory!r} is not writable")


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, trains, and returns the exit status (2 on a usage or data error)."""
    parser = build_parser()
    config = config_from_args(parser.parse_args(argv))
    try:
        _make_dirs(config)
        train(config)
    except (ConfigError, MnistError, CheckpointError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
