"""The Adam family on MNIST: accuracy, step time and state size per optimizer, one table.

Every optimizer of ``examples/mnist``' ``--optimizer`` list trains the classic MLP
(784-512-256-10 ReLU, batch 64, float32) for ``--epochs`` epochs from ``--seeds`` seeds,
at its default learning rate (the reference's default where it has one, else the paper's
recommendation, see ``DEFAULT_LR``) and at 1e-3. Printed per optimizer and learning rate:
the final and the best test accuracy (median over the seeds; best = the highest epoch-end
accuracy of a run), the median time of a training step (forward, backward, update, from the
epochs' train time, each run at its own time), the median time of the optimizer's update
alone (``update_and_apply`` on the MLP's parameters, jitted and donated; all optimizers
side by side in one process, 21 rounds of 40 calls each, with the ratio to Adam's), and the
state's bytes per parameter.

Schedule-free AdamW is evaluated at ``schedule_free_eval_params`` (what the example does).

    python benchmarks/family.py --data-dir ../shared/data/mnist --epochs 3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "examples")]  # this checkout's functional_adam

DEFAULT_LR = {
    "adam": 1e-3,  # Kingma & Ba
    "adamw": 1e-3,
    "amsgrad": 1e-3,
    "nadam": 2e-3,  # Dozat; torch.optim.NAdam
    "nadamw": 2e-3,
    "adam_8bit": 1e-3,
    "adamw_8bit": 1e-3,
    "adam_8bit_float": 1e-3,
    "adamw_8bit_float": 1e-3,
    "adamax": 2e-3,  # Kingma & Ba §7.1; torch.optim.Adamax
    "adamaxw": 2e-3,
    "radam": 1e-3,  # torch.optim.RAdam
    "adabelief": 1e-3,  # Zhuang et al.
    "yogi": 1e-2,  # Zaheer et al.
    "lamb": 1e-3,
    "lion": 1e-4,  # Chen et al.: 3-10x below AdamW's
    "lion_8bit": 1e-4,
    "adan": 1e-3,
    "adopt": 1e-3,  # Taniguchi et al.
    "ademamix": 1e-3,  # Pagliardini et al.: Adam's
    "ademamix_8bit": 1e-3,
    "simplified_ademamix": 1e-5,  # a momentum sum ~ 1/(1 - b1) = 100 times an average
    "schedule_free_adamw": 2.5e-3,  # optax.contrib's default
    "torch_adam": 1e-3,  # PyTorch's defaults
    "torch_adamax": 2e-3,
    "torch_radam": 1e-3,
    "torch_nadam": 2e-3,
    "keras_adam": 1e-3,
    "cautious_adamw": 1e-3,
    "cautious_lion": 1e-4,
}


def state_bytes_per_param(opt_state, params) -> float:
    import jax

    n = sum(x.size for x in jax.tree.leaves(params))
    return sum(x.nbytes for x in jax.tree.leaves(opt_state)) / n


def update_seconds(names: list[str], rounds: int = 21, calls: int = 40) -> dict[str, float]:
    """Median seconds of one jitted, donated ``update_and_apply`` on the MLP's parameters, per
    optimizer (at its default learning rate), measured side by side: ``rounds`` rounds, each
    timing ``calls`` calls of every optimizer in turn."""
    import jax
    import numpy as np
    from mnist.model import init_params
    from mnist.train import Config, make_optimizer

    import functional_adam as fa

    _, params0 = init_params(0)
    grads = jax.tree.map(lambda p: jax.numpy.full_like(p, 1e-3), params0)
    runs = {}
    for name in names:
        tx = make_optimizer(Config(optimizer=name, learning_rate=DEFAULT_LR[name]))
        step = jax.jit(
            lambda g, s, p, tx=tx: fa.update_and_apply(tx, g, s, p), donate_argnums=(1, 2)
        )
        params = jax.tree.map(lambda p: p.copy(), params0)
        runs[name] = [step, *step(grads, tx.init(params), params)[::-1]]  # step, state, params
    samples = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            step, state, params = runs[name]
            jax.block_until_ready(params)
            t0 = time.perf_counter()
            for _ in range(calls):
                params, state = step(grads, state, params)
            jax.block_until_ready(params)
            samples[name].append((time.perf_counter() - t0) / calls)
            runs[name][1:] = [state, params]
    return {name: float(np.median(times)) for name, times in samples.items()}


def run(name: str, lr: float, seed: int, epochs: int, data) -> dict:
    from mnist.train import Config, train

    config = Config(epochs=epochs, seed=seed, optimizer=name, learning_rate=lr, progress=False)
    result = train(config, data, log=None)
    steps_per_epoch = result.history[0]["step"]
    per_step = [r["train_seconds"] / steps_per_epoch for r in result.history]
    return {
        "accuracy": [r["test_accuracy"] for r in result.history],
        "step_seconds": statistics.median(per_step),
        "state_bytes_per_param": state_bytes_per_param(result.opt_state, result.params),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="*", default=None, help="optimizer names (default: all)")
    p.add_argument("--update-only", action="store_true", help="only time the updates (no training)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    args = p.parse_args()

    import jax
    import optax
    from mnist.data import load_mnist
    from mnist.train import optimizer_table

    import functional_adam as fa

    names = [n for n in sorted(optimizer_table()) if args.only is None or n in args.only]
    if args.update_only:
        updates = update_seconds(names)
        for name, seconds in updates.items():
            print(f"{name:22s} {1e3 * seconds:.3f} ms  {seconds / updates['adam']:.2f}x adam")
        return
    data = load_mnist(args.data_dir, progress=False)
    results = {}
    for name in names:
        for lr in sorted({DEFAULT_LR[name], 1e-3}):
            results[f"{name}@{lr:g}"] = [run(name, lr, s, args.epochs, data) for s in args.seeds]
            print(f"done {name} lr={lr:g}", file=sys.stderr, flush=True)
    updates = update_seconds(names)
    print(
        f"MNIST MLP 784-512-256-10, batch 64, float32, {args.epochs} epochs, seeds "
        f"{' '.join(map(str, args.seeds))}; {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}, optax {optax.__version__}, "
        f"functional_adam {fa.__version__}"
    )
    reference = updates.get("adam")
    print(
        "| optimizer | lr | final acc | best acc | train step | update (x adam) | state B/param |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, runs in results.items():
        name, lr = key.split("@")
        final = statistics.median(r["accuracy"][-1] for r in runs)
        best = statistics.median(max(r["accuracy"]) for r in runs)
        step = statistics.median(r["step_seconds"] for r in runs)
        ratio = f" ({updates[name] / reference:.2f}x)" if reference else ""
        mark = " (default)" if float(lr) == DEFAULT_LR[name] else ""
        print(
            f"| {name} | {lr}{mark} | {100 * final:.2f}% | {100 * best:.2f}% | "
            f"{1e3 * step:.2f} ms | {1e3 * updates[name]:.3f} ms{ratio} | "
            f"{runs[0]['state_bytes_per_param']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "update": updates}, indent=1))


if __name__ == "__main__":
    main()
