"""``compat.torch_adamax``/``torch_radam``/``torch_nadam`` against ``torch.optim.Adamax``/
``RAdam``/``NAdam`` (CPU, float32, PyTorch's single-tensor and foreach kernels).

Open loop, as tests/test_compat_torch.py: the same 500 random float32
gradients (scales 1e-7 to 1, shrinking tenfold over the run) go into PyTorch
and into the compat constructor; the final parameters must be within 1e-5 of
the displacement (``tests.trees.displacement_error``). Reached (``python -m
tests.test_compat_torch_family``): Adamax 0.7e-6 to 1.4e-6, RAdam 0.2e-6 to
2.3e-6, NAdam 0.5e-6 to 2.7e-6, the same for both PyTorch kernels. Before the
float64-accurate ``1 - b^t`` and ``ρ_t``, RAdam was 1.7e-4 away (float32's
``ρ_6`` fell on the other side of the threshold 5 from PyTorch's); with one
rounding of θ per step instead of PyTorch's two, NAdam was 4.1e-5 away.
``test_the_check_tells_them_apart`` shows the check fails for Optax's NAdam and
RAdam, whose conventions differ.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import functional_adam as fa
from functional_adam import compat
from tests.test_compat_torch import run_torch
from tests.trees import displacement_error, parity_gradients, parity_initial_params, run_scan

TOLERANCE = 1e-5
IMPLEMENTATIONS = {"default": {"foreach": False}, "foreach": {"foreach": True}}
# Coupled L2 moves small-gradient coordinates by about lr per step, so those runs use lr 1e-3.
VARIANTS = {
    "adamax": {
        "plain": {"lr": 1e-2},
        "maximize": {"lr": 1e-2, "maximize": True},
        "weight_decay": {"lr": 1e-3, "weight_decay": 0.1},
        "betas": {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6},
    },
    "radam": {
        "plain": {"lr": 1e-2},
        "maximize": {"lr": 1e-2, "maximize": True},
        "weight_decay": {"lr": 1e-3, "weight_decay": 0.1},
        "decoupled": {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
        "betas": {"lr": 1e-2, "betas": (0.8, 0.99)},
    },
    "nadam": {
        "plain": {"lr": 1e-2},
        "defaults": {},
        "momentum_decay": {"lr": 1e-2, "momentum_decay": 4e-2},
        "weight_decay": {"lr": 1e-3, "weight_decay": 0.1},
        "decoupled": {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
        "maximize": {"lr": 1e-2, "maximize": True},
    },
}
CLASSES = {"adamax": torch.optim.Adamax, "radam": torch.optim.RAdam, "nadam": torch.optim.NAdam}
OURS = {"adamax": compat.torch_adamax, "radam": compat.torch_radam, "nadam": compat.torch_nadam}
PARAMS = [(n, v) for n, variants in VARIANTS.items() for v in variants]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _ours(name: str, variant: str) -> np.ndarray:
    tx = OURS[name](**VARIANTS[name][variant])
    return run_scan(tx, parity_gradients(), parity_initial_params())


def _theirs(name: str, variant: str, implementation: str) -> np.ndarray:
    kwargs = {**VARIANTS[name][variant], **IMPLEMENTATIONS[implementation]}
    return run_torch(CLASSES[name], parity_gradients(), parity_initial_params(), **kwargs)


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize(("name", "variant"), PARAMS, ids=[f"{n}-{v}" for n, v in PARAMS])
def test_open_loop_matches_torch(name, variant, implementation):
    p0 = parity_initial_params()
    theirs = _theirs(name, variant, implementation)
    assert np.max(np.abs(theirs - p0)) > 0.05  # the run moved the parameters
    assert displacement_error(_ours(name, variant), theirs, p0) < TOLERANCE


@pytest.mark.parametrize(
    ("name", "neighbour"),
    [
        ("nadam", lambda: fa.nadam(1e-2)),  # Optax's NAdam: no momentum schedule
        ("radam", lambda: fa.radam(1e-2)),  # Optax's RAdam: eps on sqrt(v̂), not sqrt(v)
    ],
)
def test_the_check_tells_them_apart(name, neighbour):
    grads, p0 = parity_gradients(), parity_initial_params()
    theirs = _theirs(name, "plain", "default")
    assert displacement_error(run_scan(neighbour(), grads, p0), theirs, p0) > TOLERANCE


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="'amsgrad'"):
        compat.torch_nadam(amsgrad=True)


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: compat.torch_nadam(momentum_decay=-4e-3), "momentum_decay"),
        (lambda: compat.torch_nadam(betas=(0.9, 1.0)), r"betas\[1\]"),
        (lambda: compat.torch_radam(lr=-1e-3), "lr"),
        (
            lambda: compat.torch_radam(weight_decay=-0.1, decoupled_weight_decay=True),
            "weight_decay",
        ),
        (lambda: compat.torch_adamax(eps=0.0), "eps"),
        (lambda: compat.torch_adamax(betas=(1.5, 0.999)), r"betas\[0\]"),
    ],
    ids=[
        "nadam_momentum_decay",
        "nadam_beta2",
        "radam_lr",
        "radam_wd",
        "adamax_eps",
        "adamax_beta1",
    ],
)
def test_bad_argument_is_named(make, argument):
    with pytest.raises(ValueError, match=f"^{argument}"):
        make()


def test_radam_state_carries_over_from_torch():
    """A RAdam run continued here from PyTorch's state_dict follows PyTorch's next steps."""
    grads, p0 = parity_gradients(steps=30), parity_initial_params()
    param = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.RAdam([param], lr=1e-2)
    for g in grads[:20]:
        param.grad = torch.tensor(g)
        opt.step()
    params = [np.array(param.detach().numpy())]  # a copy: PyTorch steps param in place
    tx = compat.torch_radam(lr=1e-2)
    state = fa.from_torch_state(opt.state_dict(), params, tx)
    for g in grads[20:]:
        param.grad = torch.tensor(g)
        opt.step()
        updates, state = tx.update([g], state, params)
        params = fa.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params[0]), param.detach().numpy(), rtol=1e-6)


def test_converted_state_does_not_share_torch_memory():
    """PyTorch keeps stepping its tensors in place: the converted state must not follow them."""
    param = torch.nn.Parameter(torch.ones(64))
    opt = torch.optim.Adam([param], lr=1e-2)
    param.grad = torch.ones(64)
    opt.step()
    state = fa.from_torch_state(opt.state_dict(), [np.ones(64, np.float32)], compat.torch_adam())
    before = np.array(state[2].mu[0])
    opt.step()
    np.testing.assert_array_equal(np.asarray(state[2].mu[0]), before)


def test_torch_nadam_without_params_says_so():
    tx = compat.torch_nadam()
    with pytest.raises(ValueError, match="needs params"):
        tx.update(np.ones(3, np.float32), tx.init(np.zeros(3, np.float32)))


def _report() -> None:
    """Prints the displacement error per optimizer, variant and PyTorch kernel."""
    torch.set_num_threads(1)
    for name, variant in PARAMS:
        errors = [
            displacement_error(
                _ours(name, variant), _theirs(name, variant, impl), parity_initial_params()
            )
            for impl in IMPLEMENTATIONS
        ]
        print(f"torch {name:7} {variant:15} " + " ".join(f"{e:.2e}" for e in errors))


if __name__ == "__main__":
    _report()
