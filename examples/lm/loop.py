"""The training loop: mesh, data, sharded state, one jitted donated step, evaluation, outputs.

Per step the host cuts ``batch_size`` windows out of the training bytes (a function of
``(seed, step)`` only), puts them on the mesh split over ``data`` and ``fsdp``, and calls
the step compiled ahead of time::

    loss, grads = value_and_grad(loss)(params, batch)
    params, opt_state = fa.update_and_apply(tx, grads, opt_state, params)   # donated

with explicit in/out shardings, so parameters and optimizer state stay where
:mod:`lm.mesh` and ``fa.state_shardings`` put them. Losses are fetched every ``log_every``
steps, so the host does not wait for each step.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import functional_adam as fa
from functional_adam import init_sharded, state_shardings

from . import checkpoint as ckpt
from . import data as D
from . import generate, optim, report
from . import mesh as mesh_lib
from . import model as M
from .config import Config, ConfigError


class TrainState(NamedTuple):
    """Where a run stands: arrays on the mesh and the history so far."""

    params: Any
    opt_state: Any
    step: int
    losses: list[float]  # training loss of steps 1..step
    evals: list[dict]  # {"step", "val_loss", "val_perplexity", ...}


class Setup(NamedTuple):
    """What a configuration builds before the first step."""

    mesh: Any
    corpus: D.Corpus
    gdef: Any
    tx: fa.GradientTransformation
    make_params: Callable[[], Any]
    target: dict  # ShapeDtypeStructs with shardings: "params", "opt_state", "step"
    param_sh: Any
    state_sh: Any
    batch_sh: Any


class Compiled(NamedTuple):
    step: Any
    evaluate: Any
    seconds: float
    memory: dict


class Result(NamedTuple):
    """What :func:`train` returns."""

    state: TrainState
    compile_seconds: float
    total_seconds: float
    tokens_per_second: float | None  # median over this call's logging windows
    sample: str | None
    memory: dict


def _param_init(config: Config) -> Callable[[], Any]:
    init = M.init_fn(config.model, config.seed, jnp.dtype(config.param_dtype))
    if config.flat:
        return lambda: fa.FlatParams.of(init(), groups=optim.decay_group)
    return init


def make_tx(config: Config) -> fa.GradientTransformation:
    """The optimizer ``config`` names, with its learning-rate schedule and clipping."""
    lr = optim.schedule(
        config.learning_rate, config.steps, config.warmup_steps, config.min_lr_ratio
    )
    return optim.make_optimizer(
        config.optimizer,
        learning_rate=lr,
        weight_decay=config.weight_decay,
        moments=config.moments,
        master_weights=config.master_weights,
        clip_norm=config.clip_norm,
    )


def make_mesh(config: Config) -> Any:
    """The mesh ``config.mesh`` asks for, checked against the devices and the batch size."""
    sizes = mesh_lib.parse_mesh(config.mesh, jax.device_count())
    split = sizes["data"] * sizes["fsdp"]
    if config.batch_size % split:
        raise ConfigError(
            f"--batch-size {config.batch_size} is not divisible by {split}, the devices of the "
            f"data and fsdp axes of the mesh ({sizes})"
        )
    return mesh_lib.make_mesh(sizes)


def layout(config: Config, mesh: Any, tx: fa.GradientTransformation):
    """``(make_params, target, param_shardings, state_shardings)`` on ``mesh``; no allocation.

    ``target`` holds ``ShapeDtypeStruct``s with shardings: ``"params"``, ``"opt_state"``,
    ``"step"`` (the checkpoint's restore target, and what the step is compiled for).
    """
    make_params = _param_init(config)
    abstract_params = jax.eval_shape(make_params)
    param_sh = mesh_lib.param_shardings(abstract_params, mesh)
    with_sh = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, param_sh
    )
    zero1 = "data" if config.zero1 else None
    state_sh = state_shardings(tx, with_sh, zero1_axis=zero1)
    abstract_state = fa.abstract_state(tx, with_sh, zero1_axis=zero1)  # 8-bit: blocks per shard
    target = ckpt.abstract_state(abstract_params, param_sh, abstract_state, state_sh)
    return make_params, target, param_sh, state_sh


def build(config: Config, log: Callable[[str], None], tx: Any = None) -> Setup:
    """Mesh, data, optimizer and every sharding of ``config``; allocates no parameters.

    ``tx``: an Optax-shaped optimizer to use instead of the one ``config`` names.
    """
    mesh = make_mesh(config)
    corpus = D.load_corpus(config.data, config.val_fraction)
    D.check_length(corpus, config.seq_len)
    log(corpus.describe())
    tx = tx if tx is not None else make_tx(config)
    make_params, target, param_sh, state_sh = layout(config, mesh, tx)
    batch_sh = mesh_lib.batch_sharding(mesh)
    gdef = M.graphdef(config.model)
    return Setup(mesh, corpus, gdef, tx, make_params, target, param_sh, state_sh, batch_sh)


def initial_state(config: Config, s: Setup, initial: TrainState | None = None) -> TrainState:
    """``initial`` moved onto this mesh, else the latest checkpoint, else a fresh start."""
    if initial is not None:
        params = jax.device_put(initial.params, s.param_sh)
        opt_state = jax.device_put(initial.opt_state, s.state_sh)
        return TrainState(params, opt_state, initial.step, [*initial.losses], [*initial.evals])
    if config.checkpoint_dir:
        restored = ckpt.restore(config.checkpoint_dir, s.target, config.to_json(), config.resume)
        if restored is not None:
            state, meta = restored
            return TrainState(
                state["params"],
                state["opt_state"],
                int(state["step"]),
                meta["losses"],
                meta["evals"],
            )
    params = jax.jit(s.make_params, out_shardings=s.param_sh)()
    opt_state = init_sharded(s.tx, params, zero1_axis="data" if config.zero1 else None)
    return TrainState(params, opt_state, 0, [], [])


def make_step(gdef: Any, tx: fa.GradientTransformation) -> Callable:
    """``(params, opt_state, batch) -> (params, opt_state, loss)``: one training step."""

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(functools.partial(M.loss, gdef))(params, batch)
        params, opt_state = fa.update_and_apply(tx, grads, opt_state, params)
        return params, opt_state, loss

    return step


def make_eval(gdef: Any) -> Callable:
    """``(params, batches (n, b, seq_len + 1)) -> mean loss`` over the ``n`` batches."""

    def evaluate(params, batches):
        return jnp.mean(jax.lax.map(functools.partial(M.loss, gdef, params), batches))

    return evaluate


def compile_fns(config: Config, s: Setup) -> Compiled:
    """The step and the evaluation, compiled ahead of time for this mesh's shardings."""
    replicated = mesh_lib.replicated(s.mesh)
    eval_sh = mesh_lib.batch_sharding(s.mesh, leading=1)
    shape = (config.batch_size, config.seq_len + 1)
    batch = jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=s.batch_sh)
    batches = jax.ShapeDtypeStruct((config.eval_batches, *shape), jnp.uint8, sharding=eval_sh)
    params, opt_state = s.target["params"], s.target["opt_state"]
    t0 = time.perf_counter()
    step = jax.jit(
        make_step(s.gdef, s.tx),
        in_shardings=(s.param_sh, s.state_sh, s.batch_sh),
        out_shardings=(s.param_sh, s.state_sh, replicated),
        donate_argnums=(0, 1),
    ).lower(params, opt_state, batch)
    step = step.compile()
    evaluate = jax.jit(
        make_eval(s.gdef), in_shardings=(s.param_sh, eval_sh), out_shardings=replicated
    ).lower(params, batches)
    evaluate = evaluate.compile()
    seconds = time.perf_counter() - t0
    memory = {
        "params_bytes_per_device": mesh_lib.bytes_per_device(params),
        "opt_state_bytes_per_device": mesh_lib.bytes_per_device(opt_state),
        **report.memory_analysis(step),
    }
    return Compiled(step, evaluate, seconds, memory)


class _Loop:
    """The mutable bookkeeping of one :func:`train` call: history, timing, progress bar."""

    def __init__(self, config: Config, s: Setup, fns: Compiled, state: TrainState, log) -> None:
        self.config, self.s, self.fns, self.log = config, s, fns, log
        self.params, self.opt_state, self.step = state.params, state.opt_state, state.step
        self.losses, self.evals = list(state.losses), list(state.evals)
        self.pending: list[jax.Array] = []
        self.rates: list[float] = []
        self.window = (time.perf_counter(), state.step)
        self.val = jax.device_put(
            D.eval_batches(s.corpus.val, config.batch_size, config.seq_len, config.eval_batches),
            mesh_lib.batch_sharding(s.mesh, leading=1),
        )
        self.bar = report.progress_bar(config, state.step)

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.log is not None:
            self.log(line)

    def run(self, end: int) -> None:
        c = self.config
        for step in range(self.step + 1, end + 1):
            batch = D.train_batch(self.s.corpus.train, c.batch_size, c.seq_len, c.seed, step)
            batch = jax.device_put(batch, self.s.batch_sh)
            self.params, self.opt_state, loss = self.fns.step(self.params, self.opt_state, batch)
            self.pending.append(loss)
            self.step = step
            evaluate = step % c.eval_every == 0 or step == end
            save = c.checkpoint_dir and (step % c.checkpoint_every == 0 or step == end)
            if step % c.log_every == 0 or evaluate or save:
                self.flush()
            if evaluate:
                self.evaluate()
            if save:
                self.save()
        if self.bar is not None:
            self.bar.close()

    def flush(self) -> None:
        """Fetches the pending losses (waits for those steps) and updates the bar."""
        n = len(self.pending)
        self.losses += [float(x) for x in jax.device_get(self.pending)]
        self.pending = []
        t0, _ = self.window
        now = time.perf_counter()
        rate = n * self.config.batch_size * self.config.seq_len / (now - t0)
        self.rates.append(rate)
        self.window = (now, self.step)
        if self.bar is not None:
            recent = np.mean(self.losses[-n:])
            self.bar.set_postfix(loss=f"{recent:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
            self.bar.update(n)

    def evaluate(self) -> None:
        val = float(self.fns.evaluate(self.params, self.val))
        since = self.evals[-1]["step"] if self.evals else 0
        row = {
            "step": self.step,
            "val_loss": val,
            "val_perplexity": math.exp(min(val, 80.0)),
            "train_loss": float(np.mean(self.losses[since:])),
            "tokens_per_second": self.rates[-1] if self.rates else None,
        }
        self.evals.append(row)
        self.say(report.eval_line(row, self.config.steps))
        self.window = (time.perf_counter(), self.step)

    def save(self) -> None:
        meta = {"config": self.config.to_json(), "losses": self.losses, "evals": self.evals}
        c = self.config
        ckpt.save(
            c.checkpoint_dir, self.step, self.params, self.opt_state, meta, c.keep_checkpoints
        )
        self.window = (time.perf_counter(), self.step)

    def state(self) -> TrainState:
        return TrainState(self.params, self.opt_state, self.step, self.losses, self.evals)


def train(
    config: Config,
    log: Callable[[str], None] | None = print,
    initial: TrainState | None = None,
    tx: fa.GradientTransformation | None = None,
) -> Result:
    """Trains as ``config`` says; checkpoints, metrics, plot and a sample when asked.

    Args:
      config: the run (validated here).
      log: where the summary lines go (``None``: nowhere).
      initial: a state to continue from, moved onto this run's mesh (e.g. the state of a run
        on another mesh); otherwise the latest checkpoint (``config.resume``) or a fresh start.
      tx: an Optax-shaped optimizer to use instead of ``config.optimizer`` (e.g. an Optax
        chain, for comparisons); ``config.optimizer`` is then only a label.

    Returns:
      A :class:`Result`.
    """
    config.validate()
    t_start = time.perf_counter()
    say = log or (lambda _: None)
    s = build(config, say, tx)
    state = initial_state(config, s, initial)
    fns = compile_fns(config, s)
    say(report.setup_line(config, s, fns, state.step))
    loop = _Loop(config, s, fns, state, log)
    loop.run(min(config.until or config.steps, config.steps))
    text = None
    if config.sample_tokens:
        text = generate.sample(
            s.gdef,
            loop.params,
            config.prompt,
            config.sample_tokens,
            context=config.context,
            temperature=config.temperature,
            seed=config.seed,
        )
        say(f"sample (temperature {config.temperature}):\n{config.prompt}{text}")
    rate = float(np.median(loop.rates)) if loop.rates else None
    total = time.perf_counter() - t_start
    result = Result(loop.state(), fns.seconds, total, rate, text, fns.memory)
    if config.output_dir:
        report.write_outputs(config, s, result, say)
    return result
