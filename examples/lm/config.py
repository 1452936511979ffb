"""The configuration of a language-model run: one frozen dataclass, checked field by field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .model import PRESETS, ModelConfig
from .optim import MOMENTS, optimizer_names

PARAM_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration value out of range; the message names the command-line flag."""


def flag(field: str) -> str:
    """The command-line flag of a field: ``seq_len`` -> ``--seq-len``."""
    return "--" + field.replace("_", "-")


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; saved in ``metrics.json`` and in each checkpoint.

    The model fields are resolved (a preset's values where the user gave none), see
    :func:`resolve`.
    """

    preset: str = "tiny"
    layers: int = 2
    d_model: int = 128
    heads: int = 4
    context: int = 128
    vocab_size: int = 256
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1000
    until: int | None = None
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    optimizer: str = "adamw"
    moments: str = "float32"
    param_dtype: str = "float32"
    master_weights: bool = False
    flat: bool = False
    mesh: str | None = None
    zero1: bool = False
    seed: int = 0
    data: str | None = None
    val_fraction: float = 0.05
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = False
    output_dir: str | None = None
    prompt: str = "def "
    sample_tokens: int = 200
    temperature: float = 0.8
    progress: bool = True

    @property
    def model(self) -> ModelConfig:
        """The model's shape."""
        return ModelConfig(self.layers, self.d_model, self.heads, self.context, self.vocab_size)

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the flag of the first value out of range."""
        positive = ("layers", "d_model", "heads", "context", "seq_len", "batch_size", "steps")
        positive += ("eval_every", "eval_batches", "log_every", "keep_checkpoints")
        for name in positive:
            _check(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 1, "≥ 1")
        for name in ("warmup_steps", "checkpoint_every", "sample_tokens", "seed"):
            _check(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 0, "≥ 0")
        _check("learning_rate", self.learning_rate, lambda v: v > 0, "> 0")
        for name in ("weight_decay", "clip_norm", "temperature"):
            _check(name, getattr(self, name), lambda v: v >= 0, "≥ 0")
        _check("min_lr_ratio", self.min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check("val_fraction", self.val_fraction, lambda v: 0 < v < 1, "in (0, 1)")
        _check("until", self.until, lambda v: v is None or v >= 1, "≥ 1")
        self._validate_choices()
        self._validate_shape()

    def _validate_choices(self) -> None:
        choices = {
            "preset": list(PRESETS),
            "optimizer": optimizer_names(),
            "moments": list(MOMENTS),
            "param_dtype": list(PARAM_DTYPES),
        }
        for name, allowed in choices.items():
            _check(name, getattr(self, name), lambda v, a=allowed: v in a, f"one of {allowed}")

    def _validate_shape(self) -> None:
        if self.d_model % self.heads:
            raise ConfigError(f"--d-model {self.d_model} is not divisible by --heads {self.heads}")
        if self.seq_len > self.context:
            raise ConfigError(
                f"--seq-len {self.seq_len} is larger than the model's context (--context "
                f"{self.context}); the model has no position embedding beyond it"
            )
        if self.master_weights and self.param_dtype == "float32":
            raise ConfigError(
                "--master-weights keeps a float32 copy of 16-bit parameters: use it with "
                "--param-dtype bfloat16 (with float32 parameters there is nothing to copy)"
            )
        if self.vocab_size < 256:
            raise ConfigError(
                f"--vocab-size {self.vocab_size}: the tokens are bytes, so it must be ≥ 256"
            )

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-friendly values."""
        return dataclasses.asdict(self)


def _check(name: str, value: Any, ok, what: str) -> None:
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{flag(name)} must be {what}, got {value!r}")


def resolve(preset: str, **fields: Any) -> Config:
    """A :class:`Config` from a preset and the fields given (``None``: the preset's value).

    ``seq_len`` defaults to the context; ``learning_rate`` to 6e-4 for ``gpt2-small``.

    Example:
        >>> c = resolve("gpt2-small", seq_len=256, layers=None)
        >>> c.layers, c.d_model, c.context, c.seq_len, c.vocab_size
        (12, 768, 1024, 256, 50257)
    """
    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {list(PRESETS)}, got {preset!r}")
    shape = dataclasses.asdict(PRESETS[preset])
    given = {k: v for k, v in fields.items() if v is not None}
    merged = {**shape, **given}
    merged.setdefault("seq_len", merged["context"])
    if preset == "gpt2-small":
        merged.setdefault("learning_rate", 6e-4)
    return Config(preset=preset, **merged)
