"""A GPT-style decoder-only transformer in Flax NNX (GPT-2's layout, Radford et al., 2019).

Pre-norm blocks ``x + attn(ln1(x))``, ``x + mlp(ln2(x))``; causal multi-head self-attention
(``jax.nn.dot_product_attention``); a GELU MLP of width ``4 · d_model``; learned position
embeddings; a final LayerNorm; output logits through the token embedding (tied weights).
Initialisation as GPT-2: normal(0.02) weights, residual projections normal(0.02/sqrt(2L)),
zero biases. GPT-2 small is 12 layers, d_model 768, 12 heads, context 1024, vocabulary
50257: 124,439,808 parameters (:data:`PRESETS`).

The training code sees the parameters as a plain nested dict (``nnx.to_pure_dict``), what the
optimizer, the shardings and the checkpoints work on; :func:`apply` merges them back into the
module for a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import functional_adam as fa


@dataclass(frozen=True)
class ModelConfig:
    """The shape of the model."""

    layers: int = 2
    d_model: int = 128
    heads: int = 4
    context: int = 128
    vocab_size: int = 256

    def num_params(self) -> int:
        """The parameter count (weights, biases, LayerNorms, both embeddings)."""
        d = self.d_model
        block = 12 * d * d + 13 * d  # qkv, out, fc, proj with biases; two LayerNorms
        return self.layers * block + (self.vocab_size + self.context) * d + 2 * d


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(layers=2, d_model=128, heads=4, context=128),
    "medium": ModelConfig(layers=6, d_model=384, heads=6, context=256),
    "gpt2-small": ModelConfig(layers=12, d_model=768, heads=12, context=1024, vocab_size=50257),
}
"""Named model shapes; ``tiny`` is the default (trains in minutes on a 2-core CPU)."""


class Block(nnx.Module):
    """One pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs) -> None:
        d, init = c.d_model, nnx.initializers.normal(0.02)
        residual = nnx.initializers.normal(0.02 / math.sqrt(2 * c.layers))
        self.heads = c.heads
        self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, kernel_init=init, rngs=rngs)
        self.attn_out = nnx.Linear(d, d, kernel_init=residual, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
        self.fc = nnx.Linear(d, 4 * d, kernel_init=init, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * d, d, kernel_init=residual, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(batch, time, d_model) -> (batch, time, d_model)``."""
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        heads = (b, t, self.heads, d // self.heads)
        y = jax.nn.dot_product_attention(
            q.reshape(heads), k.reshape(heads), v.reshape(heads), is_causal=True
        )
        x = x + self.attn_out(y.reshape(b, t, d))
        return x + self.mlp_out(jax.nn.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
    """Token ids ``(batch, time)`` to next-token logits ``(batch, time, vocab_size)``."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs) -> None:
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(c.vocab_size, c.d_model, embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(nnx.initializers.normal(0.01)(rngs.params(), (c.context, c.d_model)))
        self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.layers)])
        self.ln_f = nnx.LayerNorm(c.d_model, epsilon=1e-5, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits for ``tokens``; ``time`` must not exceed the context."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.ln_f(x))


def graphdef(c: ModelConfig) -> nnx.GraphDef:
    """The static structure of the model (no arrays allocated)."""
    return nnx.graphdef(nnx.eval_shape(lambda: GPT(c, rngs=nnx.Rngs(0))))


def init_fn(c: ModelConfig, seed: int, param_dtype: Any = jnp.float32):
    """A function ``() -> params`` (a pure dict), to jit with the parameters' shardings.

    Initialised in float32 and cast, so a bfloat16 run starts from the rounded float32 model.
    """

    def init() -> dict:
        state = nnx.state(GPT(c, rngs=nnx.Rngs(seed)))
        return jax.tree.map(lambda p: p.astype(param_dtype), nnx.to_pure_dict(state))

    return init


def apply(gdef: nnx.GraphDef, params: Any, tokens: jax.Array) -> jax.Array:
    """Runs the model on ``tokens`` with ``params`` (a pure dict or an ``fa.FlatParams``)."""
    if isinstance(params, fa.FlatParams):
        params = params.tree()
    return nnx.merge(gdef, params)(tokens)


def loss(gdef: nnx.GraphDef, params: Any, batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) of ``batch`` ``(b, seq_len + 1)``, in float32."""
    batch = batch.astype(jnp.int32)
    logits = apply(gdef, params, batch[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))
