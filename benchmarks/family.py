"""The Adam family on MNIST: accuracy, step time and state size per optimizer, one table.

Every optimizer of ``examples/mnist``' ``--optimizer`` list trains the classic MLP
(784-512-256-10 ReLU, batch 64, float32) for ``--epochs`` epochs from ``--seeds`` seeds,
at its default learning rate (the reference's default where it has one, else the paper's
recommendation, see ``DEFAULT_LR``) and at 1e-3. Printed per optimizer and learning rate:
the final and the best test accuracy (median over the seeds; best = the highest epoch-end
accuracy of a run), the median time of a training step (forward, backward, update, from the
epochs' train time), the median time of the optimizer's update alone (``update_and_apply``
on the MLP's parameters, jitted and donated, 200 calls), and the state's bytes per parameter.

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


def update_seconds(tx, params, repeats: int = 200) -> float:
    """Median seconds of one jitted, donated ``update_and_apply`` on the MLP's parameters."""
    import jax
    import numpy as np

    import functional_adam as fa

    grads = jax.tree.map(lambda p: jax.numpy.full_like(p, 1e-3), params)
    step = jax.jit(lambda g, s, p: fa.update_and_apply(tx, g, s, p), donate_argnums=(1, 2))
    state = tx.init(params)
    params = jax.tree.map(lambda p: p.copy(), params)
    params, state = step(grads, state, params)
    jax.block_until_ready(params)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        params, state = step(grads, state, params)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(name: str, lr: float, seed: int, epochs: int, data, measure_update: bool) -> dict:
    from mnist.train import Config, make_optimizer, train

    config = Config(epochs=epochs, seed=seed, optimizer=name, learning_rate=lr, progress=False)
    result = train(config, data, log=None)
    steps_per_epoch = result.history[0]["step"]
    per_step = [r["train_seconds"] / steps_per_epoch for r in result.history]
    tx = make_optimizer(config)
    return {
        "accuracy": [r["test_accuracy"] for r in result.history],
        "step_seconds": statistics.median(per_step),
        "update_seconds": update_seconds(tx, result.params) if measure_update else None,
        "state_bytes_per_param": state_bytes_per_param(result.opt_state, result.params),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="*", default=None, help="optimizer names (default: all)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    args = p.parse_args()

    import jax
    import optax
    from mnist.data import load_mnist
    from mnist.train import optimizer_table

    import functional_adam as fa

    data = load_mnist(args.data_dir, progress=False)
    names = [n for n in sorted(optimizer_table()) if args.only is None or n in args.only]
    results = {}
    for name in names:
        for lr in sorted({DEFAULT_LR[name], 1e-3}):
            runs = [
                run(name, lr, seed, args.epochs, data, seed == args.seeds[0]) for seed in args.seeds
            ]
            results[f"{name}@{lr:g}"] = runs
            print(f"done {name} lr={lr:g}", file=sys.stderr, flush=True)
    print(
        f"MNIST MLP 784-512-256-10, batch 64, float32, {args.epochs} epochs, seeds "
        f"{' '.join(map(str, args.seeds))}; {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}, optax {optax.__version__}, "
        f"functional_adam {fa.__version__}"
    )
    print(
        "| optimizer | lr | final acc (median) | best acc (median) | train step | update | "
        "state B/param |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, runs in results.items():
        name, lr = key.split("@")
        final = statistics.median(r["accuracy"][-1] for r in runs)
        best = statistics.median(max(r["accuracy"]) for r in runs)
        step = statistics.median(r["step_seconds"] for r in runs)
        update = next(r["update_seconds"] for r in runs if r["update_seconds"] is not None)
        mark = " (default)" if float(lr) == DEFAULT_LR[name] else ""
        print(
            f"| {name} | {lr}{mark} | {100 * final:.2f}% | {100 * best:.2f}% | "
            f"{1e3 * step:.2f} ms | {1e3 * update:.3f} ms | {runs[0]['state_bytes_per_param']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
