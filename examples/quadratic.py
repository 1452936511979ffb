"""Adam on f(x) = x², step by step: the worked check of the README.

Prints g, m, v, m̂, v̂ and x for the first steps of ``functional_adam.adam`` from
x0 = 5, then how many steps each learning rate takes to reach |x| < 1e-2.

    python examples/quadratic.py --steps 5 --lrs 1e-3 1e-2 1e-1
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import functional_adam as fa
from functional_adam.optimizers.adam import bias_corrections


def loss(x: jax.Array) -> jax.Array:
    return x**2


def trace(
    lr: float, x0: float = 5.0, steps: int = 5, dtype: str = "float64"
) -> list[dict[str, float]]:
    """The first ``steps`` Adam steps on x²: one dict of g, m, v, m_hat, v_hat, x per step.

    In float64 by default, so the printed values are the exact arithmetic of the
    README (in float32, ``1 - 0.999`` is 0.0010000467 and v̂1 prints as 100.0013).
    """
    with jax.enable_x64(dtype == "float64"):
        return _trace(lr, x0, steps, jnp.dtype(dtype))


def _trace(lr, x0, steps, dtype):
    tx = fa.adam(learning_rate=lr)
    x = jnp.asarray(x0, dtype)
    state = tx.init(x)
    rows = []
    for t in range(1, steps + 1):
        g = jax.grad(loss)(x)
        updates, state = tx.update(g, state, x)
        x = fa.apply_updates(x, updates)
        adam_state = state[0]
        bc = bias_corrections(0.9, 0.999, adam_state.count)  # 1 - b1^t, 1 - b2^t
        m, v = adam_state.mu, adam_state.nu
        rows.append(
            {
                "t": t,
                "g": float(g),
                "m": float(m),
                "v": float(v),
                "m_hat": float(m / bc.bc1),
                "v_hat": float(v / bc.bc2),
                "x": float(x),
            }
        )
    return rows


def steps_to_reach(lr: float, x0: float = 5.0, tol: float = 1e-2, max_steps: int = 100_000) -> int:
    """How many Adam steps take x from ``x0`` to |x| < ``tol`` (``-1`` if never)."""
    tx = fa.adam(learning_rate=lr)

    def body(carry):
        x, state, t = carry
        updates, state = tx.update(jax.grad(loss)(x), state, x)
        return fa.apply_updates(x, updates), state, t + 1

    def not_done(carry):
        x, _, t = carry
        return (jnp.abs(x) >= tol) & (t < max_steps)

    x0 = jnp.asarray(x0, jnp.float32)
    x, _, t = jax.jit(lambda c: jax.lax.while_loop(not_done, body, c))((x0, tx.init(x0), 0))
    return int(t) if abs(float(x)) < tol else -1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--x0", type=float, default=5.0, help="starting point (default 5)")
    parser.add_argument("--steps", type=int, default=5, help="steps to print (default 5)")
    parser.add_argument(
        "--dtype",
        choices=["float64", "float32"],
        default="float64",
        help="precision of the printed steps (default float64: the exact arithmetic)",
    )
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[1e-3, 1e-2, 1e-1],
        help="learning rates to race to |x| < 1e-2",
    )
    args = parser.parse_args(argv)

    print(
        f"Adam on f(x) = x^2 from x0 = {args.x0}, lr = {args.lrs[0]}, b1 = 0.9, b2 = 0.999, eps = 1e-8"
    )
    print(f"{'t':>3} {'g':>12} {'m':>12} {'v':>12} {'m_hat':>12} {'v_hat':>12} {'x':>12}")
    for r in trace(args.lrs[0], args.x0, args.steps, args.dtype):
        print(
            f"{r['t']:>3} {r['g']:>12.6f} {r['m']:>12.6f} {r['v']:>12.6f} "
            f"{r['m_hat']:>12.6f} {r['v_hat']:>12.6f} {r['x']:>12.6f}"
        )
    print("\nsteps to |x| < 1e-2:")
    for lr in args.lrs:
        n = steps_to_reach(lr, args.x0)
        print(f"  lr = {lr:<8g} {n if n >= 0 else 'not reached'}")


if __name__ == "__main__":
    main()
