"""Text from the trained model: greedy or temperature sampling, one byte at a time.

Each new byte runs the model on the last ``context`` bytes, padded on the right to the full
context so that one compiled function serves every step (causal attention: the padding
after position ``i`` does not change the logits at ``i``). No key-value cache: simple, and
quick enough for a few hundred bytes of a small model.

    temperature 0:  next = argmax(logits)
    temperature T:  next ~ softmax(logits / T)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import model as M


def make_next_byte(gdef: Any, context: int, temperature: float):
    """A jitted ``(params, window (1, context) int32, pos, key) -> next token`` (int32)."""

    def next_byte(params, window, pos, key):
        logits = M.apply(gdef, params, window)[0, pos, :256].astype(jnp.float32)  # bytes only
        if temperature == 0:
            return jnp.argmax(logits).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    return jax.jit(next_byte)


def sample(
    gdef: Any,
    params: Any,
    prompt: str,
    n_bytes: int,
    *,
    context: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """``n_bytes`` bytes generated after ``prompt``, decoded as UTF-8 (bad bytes replaced).

    Args:
      gdef: the model's graph definition (:func:`lm.model.graphdef`).
      params: the parameters (any sharding).
      prompt: the text to continue; empty means one newline.
      n_bytes: how many bytes to generate.
      context: the model's context length.
      temperature: 0 for greedy decoding, else the softmax temperature.
      seed: the sampling seed (temperature > 0).

    Returns:
      The generated continuation (without the prompt).
    """
    tokens = list(prompt.encode() or b"\n")
    next_byte = make_next_byte(gdef, context, temperature)
    key = jax.random.key(seed)
    out = []
    for i in range(n_bytes):
        window = tokens[-context:]
        padded = np.zeros((1, context), np.int32)
        padded[0, : len(window)] = window
        token = int(next_byte(params, padded, len(window) - 1, jax.random.fold_in(key, i)))
        tokens.append(token)
        out.append(token)
    return bytes(out).decode("utf-8", errors="replace")
