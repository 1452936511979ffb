"""The classic MNIST MLP in Flax NNX: 784 -> 512 -> 256 -> 10 with ReLU."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

HIDDEN: tuple[int, ...] = (512, 256)
"""Hidden layer widths of the classic recipe."""


class MLP(nnx.Module):
    """A ReLU multilayer perceptron mapping flat images to class logits.

    Args:
      in_features: input width (784 for MNIST).
      hidden: widths of the hidden layers.
      num_classes: output width.
      rngs: Flax NNX random streams for the initialisation (Flax's defaults: LeCun-normal
        kernels, zero biases).
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = HIDDEN,
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        widths = [in_features, *hidden, num_classes]
        self.num_layers = len(widths) - 1
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            setattr(self, f"dense{i}", nnx.Linear(a, b, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``(batch, num_classes)`` for inputs ``(batch, in_features)``."""
        for i in range(self.num_layers - 1):
            x = jax.nn.relu(getattr(self, f"dense{i}")(x))
        return getattr(self, f"dense{self.num_layers - 1}")(x)


def init_params(
    seed: int, hidden: Sequence[int] = HIDDEN, param_dtype: jnp.dtype = jnp.float32
) -> tuple[nnx.GraphDef, dict]:
    """Builds the MLP and splits it into its static graph and its parameters.

    The parameters are initialised in float32 (in one jitted call) and then cast to ``param_dtype``, so a
    bfloat16 run starts from the rounded float32 initialisation.

    Args:
      seed: the initialisation seed.
      hidden: hidden layer widths.
      param_dtype: the dtype the parameters are stored and trained in.

    Returns:
      ``(graphdef, params)``: params a plain nested dict of arrays (``{"dense0": {"kernel":
      ..., "bias": ...}, ...}``, what the optimizer and the checkpoints see);
      :func:`apply` runs the model on them.
    """
    hidden = tuple(hidden)

    def make() -> dict:
        state = nnx.state(MLP(hidden=hidden, rngs=nnx.Rngs(seed)))
        return jax.tree.map(lambda p: p.astype(param_dtype), nnx.to_pure_dict(state))

    # Jitted: eager initialisation would compile each small random op on its own (~2 s on CPU).
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MLP(hidden=hidden, rngs=nnx.Rngs(0))))
    params = jax.jit(make)()
    return graphdef, params


def apply(graphdef: nnx.GraphDef, params: dict, x: jax.Array) -> jax.Array:
    """Runs the MLP given by ``graphdef`` with ``params`` (a pure dict) on ``x``."""
    return nnx.merge(graphdef, params)(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer ``labels`` under ``logits`` (in float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
