"""MNIST MLP three ways: functional_adam + Flax, optax + Flax, and plain PyTorch.

The classic recipe (784-512-256-10 ReLU MLP, inputs in [0, 1], softmax cross-entropy, Adam
with defaults, batch 64, shuffled each epoch, test accuracy after each epoch), run in one
process tree: this script starts one worker process per (framework, seed), one after the
other, and prints one table of medians over the seeds, each value with its ratio to PyTorch.

- ``fa``: ``examples/mnist`` (Flax NNX, per-step jitted and donated step) with
  ``functional_adam.adam()``;
- ``optax``: the very same loop with ``optax.adam(1e-3)``;
- ``torch``: ``torch.utils.data.DataLoader(batch_size=64, shuffle=True)`` over a ``Dataset``
  that returns ``(image / 255, label)`` per example, ``torch.optim.Adam()`` defaults, the same
  MLP (PyTorch's default init), evaluation with a batch-1000 loader under ``no_grad``.

All three read the same IDX files with ``examples/mnist/data.py``; reading them is not timed.
"Compile" is the ahead-of-time compilation of the train step and evaluation (PyTorch eager:
none). "Epoch" is one epoch of training plus the test evaluation. "Wall" is everything from
having the numpy arrays to the last evaluation: model init, moving data to the device,
compile, all epochs. Imports and interpreter start are not counted for any of them.

    python benchmarks/mnist_vs_pytorch.py --data-dir ../shared/data/mnist --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

FRAMEWORKS = {"fa": "functional_adam + Flax", "optax": "optax + Flax", "torch": "PyTorch"}


def run_flax(framework: str, seed: int, epochs: int, data_dir: str | None) -> dict:
    """One run of the Flax example with functional_adam or optax; returns its measurements."""
    import optax
    from mnist.data import load_mnist
    from mnist.train import Config, train

    import functional_adam as fa

    data = load_mnist(data_dir, progress=False)
    tx = fa.adam(1e-3) if framework == "fa" else optax.adam(1e-3)
    result = train(Config(epochs=epochs, seed=seed, progress=False), data, tx=tx, log=None)
    return {
        "compile_seconds": result.compile_seconds,
        "epoch_seconds": [r["epoch_seconds"] for r in result.history],
        "wall_seconds": result.total_seconds,
        "test_accuracy": [r["test_accuracy"] for r in result.history],
        "train_loss": [r["train_loss"] for r in result.history],
    }


def run_torch(seed: int, epochs: int, data_dir: str | None) -> dict:
    """The same recipe written the usual PyTorch way; returns its measurements."""
    import torch
    from mnist.data import load_mnist
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, Dataset

    data = load_mnist(data_dir, progress=False)

    class IdxDataset(Dataset):
        def __init__(self, images, labels):
            self.images = torch.from_numpy(images)
            self.labels = torch.from_numpy(labels.astype("int64"))

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.images[i].flatten().float() / 255, self.labels[i]

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    optimizer = torch.optim.Adam(model.parameters())
    train_loader = DataLoader(
        IdxDataset(data.train_images, data.train_labels), batch_size=64, shuffle=True
    )
    test_loader = DataLoader(IdxDataset(data.test_images, data.test_labels), batch_size=1000)
    epoch_seconds, accuracies, losses = [], [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x).argmax(dim=1) == y).sum().item()
        epoch_seconds.append(time.perf_counter() - t0)
        accuracies.append(correct / len(test_loader.dataset))
        losses.append(total / count)
    return {
        "compile_seconds": 0.0,
        "epoch_seconds": epoch_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "test_accuracy": accuracies,
        "train_loss": losses,
    }


def worker(framework: str, seed: int, epochs: int, data_dir: str | None) -> None:
    """Runs one measurement and prints it as the last line of stdout, in JSON."""
    load_before = os.getloadavg()
    if framework == "torch":
        out = run_torch(seed, epochs, data_dir)
    else:
        out = run_flax(framework, seed, epochs, data_dir)
    load = [list(load_before), list(os.getloadavg())]
    print(json.dumps({"framework": framework, "seed": seed, **out, "load": load}))


def spawn(framework: str, seed: int, epochs: int, data_dir: str | None) -> dict:
    """Runs :func:`worker` in a child process and returns what it printed."""
    cmd = [sys.executable, __file__, "--worker", framework, "--seeds", str(seed)]
    cmd += ["--epochs", str(epochs)] + (["--data-dir", data_dir] if data_dir else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {framework} seed {seed} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Medians over seeds of the table's quantities for one framework."""
    med = statistics.median
    return {
        "compile": med(r["compile_seconds"] for r in runs),
        "steady": med(med(r["epoch_seconds"][1:] or r["epoch_seconds"]) for r in runs),
        "fastest": med(min(r["epoch_seconds"]) for r in runs),
        "wall": med(r["wall_seconds"] for r in runs),
        "final": med(100 * r["test_accuracy"][-1] for r in runs),
        "best": med(100 * max(r["test_accuracy"]) for r in runs),
    }


ROWS = (
    ("compile", "compile time (s)", "{:.2f}"),
    ("steady", "steady epoch time, median (s)", "{:.2f}"),
    ("fastest", "fastest epoch (s)", "{:.2f}"),
    ("wall", "{epochs}-epoch wall time (s)", "{:.1f}"),
    ("final", "final test accuracy (%)", "{:.2f}"),
    ("best", "best test accuracy (%)", "{:.2f}"),
)


def table(summary: dict[str, dict], epochs: int) -> str:
    """The Markdown table: one row per quantity, ``value (ratio to PyTorch)`` per framework."""
    names = list(summary)
    lines = [
        "| | " + " | ".join(FRAMEWORKS[n] for n in names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    ref = summary.get("torch")
    for key, label, fmt in ROWS:
        cells = []
        for n in names:
            value = summary[n][key]
            cell = fmt.format(value)
            if ref is not None and n != "torch":
                cell += f" ({value / ref[key]:.2f}x)" if ref[key] > 0 else " (n/a)"
            cells.append(cell)
        lines.append(f"| {label.format(epochs=epochs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    """Cores, CPU model and library versions, one line."""
    import importlib.metadata as md

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "functional-adam"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, " + ", ".join(
        versions
    )


def targets(summary: dict[str, dict]) -> list[str]:
    """The issue's three targets, each with whether it is met."""
    out = []
    for n, s in summary.items():
        out.append(
            f"{FRAMEWORKS[n]}: final accuracy {s['final']:.2f}% >= 98.0%: {s['final'] >= 98.0}"
        )
    if "fa" in summary and "optax" in summary:
        fa_s, op_s = summary["fa"]["steady"], summary["optax"]["steady"]
        out.append(f"fa steady epoch {fa_s:.2f} s <= optax {op_s:.2f} s: {fa_s <= op_s}")
    if "fa" in summary and "torch" in summary:
        ratio = summary["fa"]["wall"] / summary["torch"]["wall"]
        out.append(f"fa wall {ratio:.2f}x PyTorch <= 0.5x: {ratio <= 0.5}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    p.add_argument("--data-dir", default=None, help="MNIST IDX directory (see the example)")
    p.add_argument("--frameworks", nargs="+", choices=list(FRAMEWORKS), default=list(FRAMEWORKS))
    p.add_argument("--json", default=None, help="also write every run's numbers here")
    p.add_argument(
        "--from-json", default=None, help="print the table of a --json file instead of running"
    )
    p.add_argument("--worker", choices=list(FRAMEWORKS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.worker:
        worker(args.worker, args.seeds[0], args.epochs, args.data_dir)
        return
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        epochs = saved.get("epochs", args.epochs)
        seeds = [r["seed"] for r in next(iter(saved["runs"].values()))]
        report(saved["runs"], saved["machine"], saved.get("load"), epochs, seeds)
        return
    runs: dict[str, list[dict]] = {n: [] for n in args.frameworks}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    for i, seed in enumerate(args.seeds):
        order = (
            args.frameworks[i % len(args.frameworks) :]
            + args.frameworks[: i % len(args.frameworks)]
        )
        for n in order:
            r = spawn(n, seed, args.epochs, args.data_dir)
            runs[n].append(r)
            print(
                f"seed {seed} {FRAMEWORKS[n]:>22}: final acc {100 * r['test_accuracy'][-1]:.2f}%, "
                f"wall {r['wall_seconds']:.1f} s, epochs "
                + " ".join(f"{s:.2f}" for s in r["epoch_seconds"]),
                flush=True,
            )
    load = [list(load_before), list(os.getloadavg())]
    print(f"{time.perf_counter() - t0:.0f} s in all")
    report(runs, machine(), load, args.epochs, args.seeds)
    if args.json:
        record = {"machine": machine(), "load": load, "epochs": args.epochs, "runs": runs}
        Path(args.json).write_text(json.dumps(record, indent=1))


def report(runs: dict, machine_line: str, load, epochs: int, seeds) -> None:
    """Prints the machine, the load, the table and the targets."""
    summary = {n: summarize(rs) for n, rs in runs.items()}
    print(f"\n{machine_line}")
    if load:
        before, after = (", ".join(f"{x:.1f}" for x in v) for v in load)
        print(f"load average (1, 5, 15 min): before {before}; after {after}")
    print(f"{epochs} epochs, median over seeds {seeds}\n")
    print(table(summary, epochs))
    print()
    print("\n".join(targets(summary)))


if __name__ == "__main__":
    main()
