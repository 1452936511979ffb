"""Training loop for the MNIST MLP with a functional_adam (or any Optax-shaped) optimizer.

One jitted, buffer-donating step does forward, backward, optimizer update and parameter
update. The training set lives on the device as uint8; each step gathers its batch by index
there, so a step moves 256 bytes of indices from the host. Two loop shapes are available:

- ``step`` (default): a Python loop over a per-step jitted function;
- ``scan``: the whole epoch in one call, ``jax.lax.scan`` over the batches.

On a 2-core CPU the per-step loop was the faster (about 2.0-2.4 s against 3.1-3.2 s per
epoch, see ``docs/mnist.md``), so it is the default; ``--loop scan`` re-measures. Both
compile ahead of time (``jit(...).lower(...).compile()``) so compile time is reported apart
from the steady-state epoch time. The last ``n mod batch_size`` examples of each shuffled
epoch are dropped, so every step has the same shape.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import functional_adam as fa
from mnist import checkpoint as ckpt
from mnist import mesh as mesh_lib
from mnist.data import Mnist, load_mnist
from mnist.model import HIDDEN, apply, cross_entropy, init_params
from mnist.report import progress_bar, summary_line, write_outputs

OPTIMIZER_NAMES: tuple[str, ...] = (
    "adam",
    "adamw",
    "amsgrad",
    "nadam",
    "nadamw",
    "adam_8bit",
    "adamw_8bit",
    "adamax",
    "adamaxw",
    "radam",
    "adabelief",
    "yogi",
    "lamb",
    "lion",
    "lion_8bit",
    "adan",
    "adopt",
    "ademamix",
    "ademamix_8bit",
    "simplified_ademamix",
    "schedule_free_adamw",
    "torch_adam",
    "torch_adamax",
    "torch_radam",
    "torch_nadam",
    "keras_adam",
)
"""Optimizer names offered when ``functional_adam`` (or ``functional_adam.compat``) has them."""


def _cautious(direction: Callable[[], fa.GradientTransformation], weight_decay: float):
    def make(learning_rate) -> fa.GradientTransformation:
        return fa.chain(
            fa.cautious(direction()),
            fa.add_decayed_weights(weight_decay),
            fa.scale_by_learning_rate(learning_rate),
        )

    return make


COMPOSITES: dict[str, Callable[..., fa.GradientTransformation]] = {
    "cautious_adamw": _cautious(lambda: fa.scale_by_adam(), 1e-4),
    "cautious_lion": _cautious(lambda: fa.scale_by_lion(), 1e-3),
}
"""Optimizers that are chains rather than one constructor: the cautious mask (arXiv 2411.16085)
on Adam's and Lion's directions, with AdamW's and Lion's default decays."""

FLOAT_CODES: dict[str, Callable[..., fa.GradientTransformation]] = {
    "adam_8bit_float": lambda learning_rate: fa.adam_8bit(learning_rate, code="float"),
    "adamw_8bit_float": lambda learning_rate: fa.adamw_8bit(learning_rate, code="float"),
}
"""8-bit Adam and AdamW with float codes instead of the dynamic map (``code="float"``)."""

PARAM_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

LOOPS: tuple[str, ...] = ("step", "scan")


class ConfigError(ValueError):
    """A configuration value out of range; the message names the field."""


def optimizer_table() -> dict[str, Callable[..., fa.GradientTransformation]]:
    """Name -> constructor for every name in :data:`OPTIMIZER_NAMES` the library exports.

    Looked up with ``getattr`` on ``functional_adam`` and then ``functional_adam.compat``, so
    variants added to the library later appear without a change here.
    """
    modules = [fa]
    try:
        from functional_adam import compat

        modules.append(compat)
    except ImportError:
        pass
    table = {}
    for name in OPTIMIZER_NAMES:
        for module in modules:
            constructor = getattr(module, name, None)
            if callable(constructor):
                table[name] = constructor
                break
    if hasattr(fa, "cautious"):
        table.update(COMPOSITES)
    if "code" in inspect.signature(fa.adam_8bit).parameters:
        table.update(FLOAT_CODES)
    return table


def evaluation_params(opt_state: Any, params: Any) -> Any:
    """The parameters to evaluate: schedule-free optimizers evaluate their averaged ``x``."""
    if any(
        isinstance(s, fa.ScheduleFreeState)
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, fa.ScheduleFreeState))
    ):
        return fa.schedule_free_eval_params(opt_state, params)
    return params


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; saved in ``metrics.json`` and in each checkpoint."""

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0
    param_dtype: str = "float32"
    hidden: tuple[int, ...] = HIDDEN
    train_subset: int | None = None
    test_subset: int | None = None
    loop: str = "step"
    data_dir: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    output_dir: str | None = None
    progress: bool = True
    mesh: str | None = None
    zero1: bool = False

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the first field that is out of range."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ConfigError(
                f"param_dtype must be one of {list(PARAM_DTYPES)}, got {self.param_dtype!r}"
            )
        if self.loop not in LOOPS:
            raise ConfigError(f"loop must be one of {list(LOOPS)}, got {self.loop!r}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden must be positive layer widths, got {self.hidden!r}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        problem = mesh_lib.check(self.mesh, self.zero1, self.batch_size)
        if problem is not None:
            raise ConfigError(problem)

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-friendly values."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      params: the final parameters (a nested dict).
      opt_state: the final optimizer state.
      history: one dict per epoch (also the run's earlier epochs when resumed).
      step_losses: the training loss of every step this call ran, float32.
      compile_seconds: time to compile the train step and the evaluation.
      total_seconds: wall time of this call, data on device to last epoch, compile included.
    """

    params: Any
    opt_state: Any
    history: list[dict[str, Any]]
    step_losses: np.ndarray
    compile_seconds: float
    total_seconds: float


def make_optimizer(config: Config) -> fa.GradientTransformation:
    """The optimizer named by ``config.optimizer`` with ``config.learning_rate``."""
    table = optimizer_table()
    if config.optimizer not in table:
        raise ConfigError(
            f"optimizer must be one of {sorted(table)} (what functional_adam exports), "
            f"got {config.optimizer!r}"
        )
    constructor = table[config.optimizer]
    # Optax-style constructors take ``learning_rate``; PyTorch-style ones (compat) take ``lr``.
    names = inspect.signature(constructor).parameters
    key = "learning_rate" if "learning_rate" in names or "lr" not in names else "lr"
    return constructor(**{key: config.learning_rate})


def make_step(graphdef, tx, param_dtype) -> Callable:
    """The training step ``(params, opt_state, images, labels, idx) -> (params, opt_state, loss)``.

    ``images`` ``(n, 784)`` uint8 and ``labels`` ``(n,)`` int32 are the whole training set;
    ``idx`` ``(batch,)`` picks this step's examples.
    """

    def loss_fn(params, x, y):
        return cross_entropy(apply(graphdef, params, x), y)

    def step(params, opt_state, images, labels, idx):
        x = images[idx].astype(param_dtype) / 255
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels[idx])
        # update + apply_updates in one call: one pass of the fused kernel on the CPU
        # for adam/adamw/nadam/nadamw; the same as the two calls for any other optimizer.
        params, opt_state = fa.update_and_apply(tx, grads, opt_state, params)
        return params, opt_state, loss

    return step


def make_epoch(step: Callable) -> Callable:
    """A whole epoch as one ``lax.scan`` of ``step`` over ``perm`` ``(steps, batch)``."""

    def epoch(params, opt_state, images, labels, perm):
        def body(carry, idx):
            params, opt_state, loss = step(*carry, images, labels, idx)
            return (params, opt_state), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), perm)
        return params, opt_state, losses

    return epoch


def make_eval(graphdef, param_dtype) -> Callable:
    """``(params, images, labels) -> (mean loss, number correct)`` over the whole test set."""

    def evaluate(params, images, labels):
        logits = apply(graphdef, params, images.astype(param_dtype) / 255)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
        return cross_entropy(logits, labels), correct

    return evaluate


def make_shuffle(n: int, batch_size: int) -> Callable:
    """``key -> (next key, perm)``: a fresh shuffle of ``range(n)`` per epoch.

    ``perm`` is ``(n // batch_size, batch_size)`` int32; the last ``n mod batch_size``
    shuffled examples are dropped.
    """
    steps = n // batch_size

    def shuffle(key):
        key, sub = jax.random.split(key)
        perm = jax.random.permutation(sub, n)[: steps * batch_size]
        return key, perm.reshape(steps, batch_size).astype(jnp.int32)

    return shuffle


def _device_data(data: Mnist, config: Config) -> dict[str, jax.Array]:
    def flat(images, n):
        return jnp.asarray(images[:n].reshape(len(images[:n]), -1))

    n_train, n_test = config.train_subset, config.test_subset
    if n_train is not None and n_train > len(data.train_images):
        raise ConfigError(f"train_subset {n_train} exceeds the {len(data.train_images)} examples")
    out = {
        "train_x": flat(data.train_images, n_train),
        "train_y": jnp.asarray(data.train_labels[:n_train].astype(np.int32)),
        "test_x": flat(data.test_images, n_test),
        "test_y": jnp.asarray(data.test_labels[:n_test].astype(np.int32)),
    }
    if config.batch_size > len(out["train_x"]):
        raise ConfigError(
            f"batch_size {config.batch_size} exceeds the {len(out['train_x'])} training examples"
        )
    return out


class _Loop(NamedTuple):
    shuffle: Callable  # key -> (key, perm)
    run_epoch: Callable  # (params, opt_state, perm, bar) -> (params, opt_state, losses)
    evaluate: Callable  # (params) -> (loss, number correct)
    compile_seconds: float


def _compile(config: Config, graphdef, tx, params, opt_state, key, d, mesh=None) -> _Loop:
    """Compiles the shuffle, the step (or the scanned epoch) and the evaluation ahead of time.

    On a ``mesh`` the indices (so the batch) are split over its devices and the outputs keep
    the parameters' and the optimizer state's shardings.
    """
    dtype = PARAM_DTYPES[config.param_dtype]
    step = make_step(graphdef, tx, dtype)
    steps = len(d["train_x"]) // config.batch_size
    batch, out_shardings = None, None
    if mesh is not None:
        batch, out_shardings = mesh_lib.step_shardings(tx, params, mesh, config.zero1)
    t0 = time.perf_counter()
    if config.loop == "scan":
        sharding = None if mesh is None else batch.update(spec=(None, *batch.spec))
        perm = jax.ShapeDtypeStruct((steps, config.batch_size), jnp.int32, sharding=sharding)
        fn = jax.jit(make_epoch(step), donate_argnums=(0, 1), out_shardings=out_shardings)
        compiled = fn.lower(params, opt_state, d["train_x"], d["train_y"], perm).compile()
    else:
        idx = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch)
        fn = jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)
        compiled = fn.lower(params, opt_state, d["train_x"], d["train_y"], idx).compile()
    ev = jax.jit(make_eval(graphdef, dtype)).lower(params, d["test_x"], d["test_y"]).compile()
    shuffle = jax.jit(make_shuffle(len(d["train_x"]), config.batch_size)).lower(key).compile()
    seconds = time.perf_counter() - t0
    run = _scan_epoch if config.loop == "scan" else _step_epoch
    if mesh is not None and jax.default_backend() == "cpu":
        compiled = mesh_lib.synchronous(compiled, perm if config.loop == "scan" else idx)
    run_epoch = functools.partial(run, compiled, d["train_x"], d["train_y"])
    return _Loop(shuffle, run_epoch, lambda p: ev(p, d["test_x"], d["test_y"]), seconds)


def _step_epoch(compiled, images, labels, params, opt_state, perm, bar, log_every=50):
    losses = []
    for i in range(len(perm)):
        params, opt_state, loss = compiled(params, opt_state, images, labels, perm[i])
        losses.append(loss)
        if bar is not None and ((i + 1) % log_every == 0 or i + 1 == len(perm)):
            block = np.asarray(jax.device_get(losses[-log_every:]))  # waits for those steps
            bar.set_postfix(loss=f"{block.mean():.4f}", refresh=False)
            bar.update(len(block) if (i + 1) % log_every == 0 else (i + 1) % log_every)
    return params, opt_state, np.asarray(jax.device_get(losses), np.float32)


def _scan_epoch(compiled, images, labels, params, opt_state, perm, bar):
    params, opt_state, losses = compiled(params, opt_state, images, labels, perm)
    losses = np.asarray(losses, np.float32)
    if bar is not None:
        bar.set_postfix(loss=f"{losses.mean():.4f}", refresh=False)
        bar.update(len(perm))
    return params, opt_state, losses


class _State(NamedTuple):
    params: Any
    opt_state: Any
    key: jax.Array
    step: int
    epoch: int
    history: list


def _initial_state(config: Config, tx, mesh=None) -> tuple[Any, _State]:
    graphdef, params = init_params(config.seed, config.hidden, PARAM_DTYPES[config.param_dtype])
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    if mesh is None:
        opt_state = tx.init(params)
    else:
        params = mesh_lib.place_params(params, mesh)
        opt_state = mesh_lib.init_state(tx, params, config.zero1)
    state = _State(params, opt_state, key, 0, 0, [])
    if config.checkpoint_dir:
        state = ckpt.restore_or_check(config, state)
    return graphdef, state


def train(
    config: Config,
    data: Mnist | None = None,
    tx: fa.GradientTransformation | None = None,
    log: Callable[[str], None] | None = print,
) -> TrainResult:
    """Trains the MLP as ``config`` says; checkpoints, metrics and plot when asked.

    Args:
      config: the run.
      data: MNIST; loaded with :func:`load_mnist` from ``config.data_dir`` when ``None``.
      tx: an Optax-shaped optimizer to use instead of ``config.optimizer`` (e.g.
        ``optax.adam``, for comparisons); ``config.optimizer`` is then only a label.
      log: where the per-epoch summary lines go (``None``: nowhere).

    Returns:
      A :class:`TrainResult`.
    """
    config.validate()
    log = log or (lambda _: None)
    data = data if data is not None else load_mnist(config.data_dir, progress=config.progress)
    tx = tx if tx is not None else make_optimizer(config)
    t_start = time.perf_counter()
    try:
        mesh = mesh_lib.make_mesh(config.mesh) if config.mesh else None
    except mesh_lib.MeshError as e:
        raise ConfigError(str(e)) from None
    d = _device_data(data, config)
    if mesh is not None:
        d = mesh_lib.replicate(d, mesh)
    graphdef, state = _initial_state(config, tx, mesh)
    loop = _compile(config, graphdef, tx, state.params, state.opt_state, state.key, d, mesh)
    log(f"compile: {loop.compile_seconds:.2f} s (step, evaluation and shuffle, ahead of time)")
    all_losses = []
    for epoch in range(state.epoch + 1, config.epochs + 1):
        state, losses = _train_epoch(config, loop, state, epoch, len(d["test_y"]))
        all_losses.append(losses)
        if config.checkpoint_dir:
            t0 = time.perf_counter()
            ckpt.save(config, state)
            state.history[-1]["checkpoint_seconds"] = time.perf_counter() - t0
        log(summary_line(state.history[-1], config.epochs))
    total = time.perf_counter() - t_start
    losses = np.concatenate(all_losses) if all_losses else np.zeros(0, np.float32)
    result = TrainResult(
        state.params, state.opt_state, state.history, losses, loop.compile_seconds, total
    )
    if config.output_dir:
        write_outputs(config, result, log)
    return result


def _train_epoch(
    config: Config, loop: _Loop, state: _State, epoch: int, n_test: int
) -> tuple[_State, np.ndarray]:
    """One epoch: shuffle, train, evaluate; returns the new state and the step losses."""
    key, perm = loop.shuffle(state.key)
    perm = np.asarray(perm)  # the step loop slices it on the host: no device op per step
    bar = progress_bar(config, epoch, len(perm))
    t0 = time.perf_counter()
    params, opt_state, losses = loop.run_epoch(state.params, state.opt_state, perm, bar)
    t1 = time.perf_counter()
    test_loss, correct = loop.evaluate(evaluation_params(opt_state, params))
    test_loss, test_acc = float(test_loss), int(correct) / n_test
    t2 = time.perf_counter()
    if bar is not None:
        bar.close()
    step = state.step + len(perm)
    row = {
        "epoch": epoch,
        "step": step,
        "train_loss": float(losses.mean()),
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "train_seconds": t1 - t0,
        "eval_seconds": t2 - t1,
        "epoch_seconds": t2 - t0,
        "examples_per_second": len(perm) * config.batch_size / (t1 - t0),
    }
    return _State(params, opt_state, key, step, epoch, [*state.history, row]), losses
