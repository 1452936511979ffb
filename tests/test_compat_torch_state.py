"""``from_torch_state``/``to_torch_state``: stop a run in PyTorch, go on here, and back.

Each round trip is compared with an uninterrupted PyTorch run of 200 steps on
the same gradients, to the open-loop bound of ``test_compat_torch`` (relative
1e-5). The converted state itself must be exact: moments and step are copied,
not recomputed.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import functional_adam as fa
from functional_adam import compat

RTOL = 1e-5
HALF = 100

# PyTorch's parameter i is leaf i of jax.tree.leaves: {"layer": {"bias", "weight"}} sorts bias first.
SHAPES = [(3,), (3, 4), (5,)]


def params_tree(values):
    return {"layer": {"bias": values[0], "weight": values[1]}, "scale": values[2]}


def make_data(steps: int = 2 * HALF, seed: int = 0):
    rng = np.random.default_rng(seed)
    p0 = [rng.uniform(1.0, 2.0, s).astype(np.float32) for s in SHAPES]
    grads = [
        [
            (rng.standard_normal(s) * np.geomspace(1.0, 0.1, steps)[t]).astype(np.float32)
            for s in SHAPES
        ]
        for t in range(steps)
    ]
    return p0, grads


def torch_steps(opt, params, grads, sched=None):
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = torch.tensor(g)
        opt.step()
        if sched is not None:
            sched.step()


def jax_steps(tx, params, state, grads):
    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return fa.apply_updates(params, updates), state

    for step_grads in grads:
        params, state = step(params, state, params_tree([jnp.asarray(g) for g in step_grads]))
    return params, state


def factor(step):
    return 0.5 ** (step / 50)


CASES = {
    "adam": (torch.optim.Adam, compat.torch_adam, {"lr": 1e-2}),
    "adam_amsgrad_l2": (
        torch.optim.Adam,
        compat.torch_adam,
        {"lr": 1e-3, "amsgrad": True, "weight_decay": 0.1},
    ),
    "adamw_maximize": (torch.optim.AdamW, compat.torch_adamw, {"lr": 1e-2, "maximize": True}),
    "adamax_l2": (torch.optim.Adamax, compat.torch_adamax, {"lr": 1e-2, "weight_decay": 0.1}),
    "nadam": (torch.optim.NAdam, compat.torch_nadam, {"lr": 1e-2}),
    "radamw": (
        torch.optim.RAdam,
        compat.torch_radam,
        {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ),
}


def reference(cls, kwargs, p0, grads, schedule=False):
    params = [torch.nn.Parameter(torch.tensor(p)) for p in p0]
    opt = cls(params, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if schedule else None
    torch_steps(opt, params, grads, sched)
    return [p.detach().numpy() for p in params]


@pytest.mark.parametrize("schedule", [False, True], ids=["constant_lr", "schedule"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_then_here_equals_torch(case, schedule):
    """100 steps in PyTorch, convert, 100 steps here == 200 steps in PyTorch."""
    cls, make, kwargs = CASES[case]
    p0, grads = make_data()
    params = [torch.nn.Parameter(torch.tensor(p)) for p in p0]
    opt = cls(params, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if schedule else None
    torch_steps(opt, params, grads[:HALF], sched)

    jax_params = params_tree([jnp.asarray(p.detach().numpy()) for p in params])
    lr = (lambda count: kwargs["lr"] * factor(count)) if schedule else kwargs["lr"]
    tx = make(**{**kwargs, "lr": lr})
    state = compat.from_torch_state(opt.state_dict(), jax_params, tx)
    jax_params, _ = jax_steps(tx, jax_params, state, grads[HALF:])

    expected = reference(cls, kwargs, p0, grads, schedule)
    chex.assert_trees_all_close(
        jax.tree.leaves(jax_params), expected, rtol=RTOL, atol=0.0, strict=False
    )


@pytest.mark.parametrize("case", list(CASES))
def test_here_then_torch_equals_torch(case):
    """100 steps here, ``to_torch_state``, 100 steps in PyTorch == 200 steps in PyTorch."""
    cls, make, kwargs = CASES[case]
    p0, grads = make_data()
    tx = make(**kwargs)
    jax_params = params_tree([jnp.asarray(p) for p in p0])
    jax_params, state = jax_steps(tx, jax_params, tx.init(jax_params), grads[:HALF])

    params = [torch.nn.Parameter(torch.tensor(np.asarray(p))) for p in jax.tree.leaves(jax_params)]
    opt = cls(params, **kwargs)
    opt.load_state_dict(compat.to_torch_state(state, jax_params, opt.state_dict()["param_groups"]))
    torch_steps(opt, params, grads[HALF:])

    expected = reference(cls, kwargs, p0, grads)
    got = [p.detach().numpy() for p in params]
    chex.assert_trees_all_close(got, expected, rtol=RTOL, atol=0.0)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_round_trip_is_exact(amsgrad):
    _assert_round_trip_is_exact(
        lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=amsgrad),
        fa.ScaleByAmsgradState if amsgrad else fa.ScaleByAdamState,
    )


@pytest.mark.parametrize("name", ["Adamax", "NAdam"])
def test_adamax_and_nadam_states_round_trip_exactly(name):
    """Adamax's exp_inf becomes nu; NAdam's per-parameter mu_product becomes its one scalar."""
    kind = fa.ScaleByAdamState if name == "Adamax" else compat.ScaleByTorchNAdamState
    state = _assert_round_trip_is_exact(lambda p: getattr(torch.optim, name)(p, lr=1e-2), kind)
    if name == "NAdam":  # Π μ_t over 7 steps, μ_t = 0.9·(1 - 0.5·0.96^(0.004 t))
        mus = [0.9 * (1 - 0.5 * 0.96 ** (0.004 * t)) for t in range(1, 8)]
        np.testing.assert_allclose(float(state.mu_product), np.prod(mus), rtol=1e-6)


def test_nadam_state_needs_a_nadam_tx():
    p0, grads = make_data(steps=2)
    params = [torch.nn.Parameter(torch.tensor(p)) for p in p0]
    opt = torch.optim.NAdam(params)
    torch_steps(opt, params, grads)
    jax_params = params_tree([jnp.asarray(p.detach().numpy()) for p in params])
    with pytest.raises(ValueError, match=r"mu_product.*compat\.torch_nadam"):
        compat.from_torch_state(opt.state_dict(), jax_params, compat.torch_adam())


def _assert_round_trip_is_exact(make_optimizer, kind):
    """7 torch steps; from_torch_state copies every moment; to_torch_state gives the torch
    state back, dtypes and keys included. Returns the converted state."""
    p0, grads = make_data(steps=7)
    params = [torch.nn.Parameter(torch.tensor(p)) for p in p0]
    opt = make_optimizer(params)
    torch_steps(opt, params, grads)
    saved = opt.state_dict()
    jax_params = params_tree([jnp.asarray(p.detach().numpy()) for p in params])

    state = compat.from_torch_state(saved, jax_params)
    assert type(state) is kind
    assert int(state.count) == 7
    leaves = jax.tree.leaves(state.mu)
    for i, leaf in enumerate(leaves):
        np.testing.assert_array_equal(np.asarray(leaf), saved["state"][i]["exp_avg"].numpy())

    back = compat.to_torch_state(state, jax_params, saved["param_groups"])
    assert back["param_groups"] == saved["param_groups"]
    for i, entry in saved["state"].items():
        assert back["state"][i].keys() == entry.keys()
        for key, value in entry.items():
            assert back["state"][i][key].dtype == value.dtype, key
            np.testing.assert_array_equal(back["state"][i][key].numpy(), value.numpy())
    return state


def test_from_torch_state_sets_schedule_counters():
    params = [jnp.zeros(2)]
    saved = {
        "state": {
            0: {"step": torch.tensor(42.0), "exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)}
        },
        "param_groups": [{"params": [0], "amsgrad": False}],
    }
    tx = compat.torch_adamw(lr=lambda count: 1e-3 * count, weight_decay=0.1)
    state = compat.from_torch_state(saved, params, tx)
    counts = [x for x in jax.tree.leaves(state) if x.shape == () and x.dtype == jnp.int32]
    assert [int(c) for c in counts] == [42, 42, 42]  # Adam, lr schedule, decay's lr schedule


def test_fresh_torch_optimizer_gives_the_initial_state():
    params = params_tree([jnp.ones(s) for s in SHAPES])
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(s)) for s in SHAPES])
    tx = compat.torch_adam()
    chex.assert_trees_all_equal(
        compat.from_torch_state(opt.state_dict(), params, tx), tx.init(params)
    )
    assert (
        compat.to_torch_state(tx.init(params), params, opt.state_dict()["param_groups"])["state"]
        == {}
    )


# ---- bad input: errors that name the parameter --------------------------------------------


def stepped_state_dict(amsgrad=False):
    p0, grads = make_data(steps=2)
    params = [torch.nn.Parameter(torch.tensor(p)) for p in p0]
    opt = torch.optim.Adam(params, amsgrad=amsgrad)
    torch_steps(opt, params, grads)
    return opt.state_dict(), params_tree([jnp.asarray(p) for p in p0])


def test_shape_mismatch_names_the_parameter():
    saved, params = stepped_state_dict()
    params["layer"]["weight"] = jnp.zeros((4, 3))
    with pytest.raises(
        ValueError, match=r"parameter 1 .*\['layer'\]\['weight'\] has shape \(4, 3\)"
    ):
        compat.from_torch_state(saved, params)


def test_missing_key_names_the_parameter():
    saved, params = stepped_state_dict()
    del saved["state"][2]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"parameter 2 \(params\['scale'\]\) has no 'exp_avg_sq'"):
        compat.from_torch_state(saved, params)


def test_number_of_parameters_must_match():
    saved, params = stepped_state_dict()
    params["extra"] = jnp.zeros(2)
    with pytest.raises(ValueError, match=r"3 parameters .* params has 4 leaves"):
        compat.from_torch_state(saved, params)


def test_unequal_steps_are_refused():
    saved, params = stepped_state_dict()
    saved["state"][1]["step"] = torch.tensor(5.0)
    with pytest.raises(ValueError, match="stepped unequally often"):
        compat.from_torch_state(saved, params)


def test_amsgrad_mismatch_with_tx_is_refused():
    saved, params = stepped_state_dict(amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad=True"):
        compat.from_torch_state(saved, params, compat.torch_adam())


def test_not_a_state_dict_is_refused():
    with pytest.raises(ValueError, match="state_dict"):
        compat.from_torch_state({"exp_avg": torch.ones(2)}, [jnp.zeros(2)])


def test_complex_parameters_are_refused():
    saved = {"state": {}, "param_groups": [{"params": [0]}]}
    with pytest.raises(ValueError, match=r"params\[0\] is complex"):
        compat.from_torch_state(saved, [jnp.zeros(2, jnp.complex64)])


def test_to_torch_state_checks_shapes_and_amsgrad():
    params = params_tree([jnp.ones(s) for s in SHAPES])
    tx = compat.torch_adam()
    state = tx.init(params)
    groups = [{"params": [0, 1, 2], "amsgrad": False}]
    wrong = params_tree([jnp.ones((2,)), jnp.ones((3, 4)), jnp.ones((5,))])
    with pytest.raises(
        ValueError, match=r"state.mu at params\['layer'\]\['bias'\] has shape \(3,\)"
    ):
        compat.to_torch_state(state, wrong, groups)
    with pytest.raises(ValueError, match="amsgrad=True"):
        compat.to_torch_state(state, params, [{"params": [0, 1, 2], "amsgrad": True}])
    with pytest.raises(ValueError, match="2 parameters"):
        compat.to_torch_state(state, params, [{"params": [0, 1]}])
    with pytest.raises(ValueError, match="exactly one Adam state"):
        compat.to_torch_state((), params, groups)


def test_bfloat16_state_round_trips_and_abstract_params_work():
    """bfloat16 moments (which numpy cannot hand to torch) survive both directions exactly."""
    params = [torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))]
    opt = torch.optim.Adam(params, lr=1e-2)
    for g in ([0.5, -1.0, 2.0], [0.25, 3.0, -1.0]):
        params[0].grad = torch.tensor(g, dtype=torch.bfloat16)
        opt.step()
    saved = opt.state_dict()
    abstract = [jax.ShapeDtypeStruct((3,), jnp.bfloat16)]
    state = compat.from_torch_state(saved, abstract)
    assert state.mu[0].dtype == jnp.bfloat16
    back = compat.to_torch_state(state, abstract, saved["param_groups"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert back["state"][0][key].dtype == torch.bfloat16
        assert torch.equal(back["state"][0][key], saved["state"][0][key])


# ---- keys, steps and states that used to slip through or fail unclearly ----------------------


def test_string_state_keys_are_matched_to_the_parameters():
    """A JSON round trip makes the state's keys strings while param_groups keeps ints."""
    saved, params = stepped_state_dict()
    as_json = {**saved, "state": {str(k): v for k, v in saved["state"].items()}}
    expected = compat.from_torch_state(saved, params)
    assert int(expected.count) == 2
    chex.assert_trees_all_equal(compat.from_torch_state(as_json, params), expected)


def test_state_keys_that_match_no_parameter_are_refused():
    saved, params = stepped_state_dict()
    renamed = {**saved, "state": {f"p{k}": v for k, v in saved["state"].items()}}
    with pytest.raises(
        ValueError, match=r"state has entries for \['p0', 'p1', 'p2'\].*\[0, 1, 2\]"
    ):
        compat.from_torch_state(renamed, params)


@pytest.mark.parametrize("step", [float("inf"), float("nan"), -1.0, 2.5])
def test_steps_that_are_not_counts_are_refused(step):
    saved, params = stepped_state_dict()
    for entry in saved["state"].values():
        entry["step"] = torch.tensor(step)
    with pytest.raises(ValueError, match=rf"torch step {step} .*is not a count"):
        compat.from_torch_state(saved, params)


def test_state_that_is_not_a_dict_is_refused():
    saved, params = stepped_state_dict()
    with pytest.raises(TypeError, match=r"optimizer_state_dict\['state'\] must be a dict"):
        compat.from_torch_state({**saved, "state": list(saved["state"].values())}, params)


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda: fa.adam_8bit(1e-3, min_8bit_size=0), "8-bit"),
        (lambda: fa.adam(1e-3, flat=True), "flat"),
    ],
    ids=["adam_8bit", "flat"],
)
def test_moments_that_are_not_float_arrays_per_parameter_are_refused(make, what):
    saved, params = stepped_state_dict()
    tx = make()
    with pytest.raises(ValueError, match=rf"{what} moments cannot be mapped to PyTorch"):
        compat.from_torch_state(saved, params, tx)
    with pytest.raises(ValueError, match=rf"{what} moments cannot be mapped to PyTorch"):
        compat.to_torch_state(tx.init(params), params, saved["param_groups"])


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_step_is_written_as_torch_writes_it(default_dtype):
    """A float tensor of torch's default dtype (float32 for fused or capturable groups)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        saved, params = stepped_state_dict()
        for fused in (False, True):
            groups = [{**g, "fused": fused} for g in saved["param_groups"]]
            back = compat.to_torch_state(compat.from_torch_state(saved, params), params, groups)
            theirs = torch.float32 if fused else saved["state"][0]["step"].dtype
            assert back["state"][0]["step"].dtype == theirs
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize(
    ("count", "comes_back"),
    [(2**24, 2**24), (2**24 + 1, 2**24), (2**31 - 1, 2**31 - 1)],
    ids=["2^24", "2^24+1", "saturated"],
)
def test_large_counts_round_trip_as_torch_stores_them(count, comes_back):
    """float32 steps, as in PyTorch: above 2^24 a count comes back rounded to float32, and a
    saturated count (written as 2^31) comes back saturated."""
    saved, params = stepped_state_dict()
    state = compat.from_torch_state(saved, params)._replace(count=jnp.array(count, jnp.int32))
    back = compat.to_torch_state(state, params, saved["param_groups"])
    assert back["state"][0]["step"].item() == float(np.float32(count))
    assert int(compat.from_torch_state(back, params).count) == comes_back
    torch_params = [torch.nn.Parameter(torch.ones(s)) for s in SHAPES]
    opt = torch.optim.Adam(torch_params)
    opt.load_state_dict(back)  # PyTorch takes it and steps on
    torch_steps(opt, torch_params, make_data(steps=1)[1])
    assert torch.isfinite(torch_params[0]).all()
