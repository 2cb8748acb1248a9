"""Optimizers and schedules: update rules, state round trips, bad input."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zoopt


def test_sgd_matches_torch_convention():
    torch = pytest.importorskip("torch")
    x0 = np.array([1.0, -2.0, 3.0])
    grads = [np.array([0.1, 0.2, -0.3]), np.array([-0.5, 0.0, 0.4]), np.array([0.2, 0.2, 0.2])]
    for nesterov in (False, True):
        p = torch.nn.Parameter(torch.tensor(x0))
        topt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-4)
        opt = zoopt.SGD(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-4)
        x = x0.copy()
        for g in grads:
            p.grad = torch.tensor(g)
            topt.step()
            x = opt.step(x, g)
        np.testing.assert_allclose(x, p.detach().numpy(), rtol=1e-12)


def test_adam_matches_torch():
    torch = pytest.importorskip("torch")
    x0 = np.array([0.5, -1.0])
    p = torch.nn.Parameter(torch.tensor(x0))
    topt = torch.optim.Adam([p], lr=0.01)
    opt = zoopt.Adam(lr=0.01)
    x = x0.copy()
    for k in range(5):
        g = np.array([np.sin(k), np.cos(k)])
        p.grad = torch.tensor(g)
        topt.step()
        x = opt.step(x, g)
    np.testing.assert_allclose(x, p.detach().numpy(), rtol=1e-10)


def test_signsgd_moves_by_lr_per_coordinate():
    x = zoopt.SignSGD(lr=0.5).step(np.zeros(3), np.array([2.0, -1e-9, 0.0]))
    np.testing.assert_array_equal(x, [-0.5, 0.5, 0.0])


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(["sgd", "adam", "signsgd"]),
    split=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_state_dict_round_trip_resumes_identically(name, split, seed):
    r = np.random.default_rng(seed)
    grads = r.standard_normal((6, 4))
    kw = {} if name == "adam" else {"momentum": 0.9}
    sched = zoopt.Cosine(base=0.1, total=6, warmup=2)
    a = zoopt.make_optimizer(name, lr=sched, **kw)
    x = np.ones(4)
    for g in grads:
        x = a.step(x, g)
    b = zoopt.make_optimizer(name, lr=sched, **kw)
    y = np.ones(4)
    for g in grads[:split]:
        y = b.step(y, g)
    c = zoopt.make_optimizer(name, lr=sched, **kw)
    c.load_state_dict(b.state_dict())
    for g in grads[split:]:
        y = c.step(y, g)
    np.testing.assert_array_equal(x, y)


def test_schedules():
    cos = zoopt.Cosine(base=1.0, total=10, warmup=2, final=0.1)
    assert cos(0) == pytest.approx(0.5)
    assert cos(1) == pytest.approx(1.0)
    assert cos(2) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(0.1)
    assert cos(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    step = zoopt.Step(base=1.0, step_size=3, gamma=0.5)
    assert [step(t) for t in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert zoopt.as_schedule(0.3)(100) == 0.3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: zoopt.SGD(lr=-1.0), "lr must be a finite number >= 0, got -1.0"),
        (lambda: zoopt.SGD(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
        (lambda: zoopt.SGD(nesterov=True), "nesterov=True needs momentum > 0"),
        (lambda: zoopt.Adam(beta2=1.5), "beta2"),
        (lambda: zoopt.SignSGD(weight_decay=-0.1), "weight_decay"),
        (lambda: zoopt.Cosine(base=1.0, total=0), "total must be an integer >= 1, got 0"),
        (lambda: zoopt.Cosine(base=1.0, total=5, warmup=5), "warmup"),
        (lambda: zoopt.Step(base=1.0, step_size=0), "step_size"),
        (lambda: zoopt.make_optimizer("lbfgs", lr=0.1), "'lbfgs'"),
    ],
)
def test_bad_optimizer_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_grad_shape_mismatch():
    with pytest.raises(ValueError, match=r"grad shape \(2,\) does not match x shape \(3,\)"):
        zoopt.SGD(lr=0.1).step(np.zeros(3), np.zeros(2))


def test_make_optimizer_and_make_estimator_are_the_registry():
    from zoopt import registry

    registry.register_optimizer("sgd_alias_for_test", zoopt.SGD, options=("momentum",))
    try:
        opt = zoopt.make_optimizer("sgd_alias_for_test", lr=0.1, momentum=0.5)
        assert isinstance(opt, zoopt.SGD) and opt.momentum == 0.5
    finally:
        registry.unregister("optimizer", "sgd_alias_for_test")
    with pytest.raises(TypeError, match="beta1"):
        zoopt.make_optimizer("sgd", lr=0.1, beta1=0.9)
    assert isinstance(zoopt.make_estimator("cge", mu=1e-3), zoopt.CGE)
