"""Exactness of the large-model ZO paths (issue #21, benchmark 2), float64, small models.

* The seeded estimate -- MeZO's in-place mode (:class:`zoopt.torch.inplace.InPlaceRGE`) and
  the exact mode (``ModuleOracle.eval_direction_steps``) -- equals a reference that
  materializes the same seeded directions as a matrix (``RGE.directions``) and evaluates
  ``f(x + h_i u_i)`` by loading each point into the module, to 1e-12 relative, for every
  ``dist``, ``scheme`` and ``mu_mode``.
* Exact mode: after the queries the parameters are bit-identical to ``x``; the update written
  into the parameter tensors equals the update of the flat ``x`` bit for bit, step after step.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import zoopt
from zoopt.step import ZO
from zoopt.torch import ModuleOracle
from zoopt.torch.inplace import InPlaceRGE

MU = 1e-2
TOL = 1e-12


def make_problem(width: int = 6, features: int = 5, classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(features, width), nn.Tanh(), nn.LayerNorm(width), nn.Linear(width, classes)
    ).double()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(7, features, generator=g, dtype=torch.float64)
    targets = torch.randint(0, classes, (7,), generator=g)
    return net, inputs, targets


def reference_grad(est: zoopt.RGE, net, inputs, targets, x: torch.Tensor, seed: int) -> np.ndarray:
    """The textbook RGE on a materialized direction matrix, each point loaded into ``net``."""
    view = ModuleOracle(net, F.cross_entropy, engine=False).view
    d = view.dim
    u = est.directions(d, np.random.default_rng(seed))  # (m, d) float64, the plan's directions
    norms = np.linalg.norm(u, axis=1)
    h = np.full(u.shape[0], est.mu)
    if est.mu_mode == "direction" and est.dist != "sphere":
        h = est.mu / norms
    x_np = x.detach().numpy().copy()

    def f(point: np.ndarray) -> float:
        view.assign(torch.from_numpy(point))
        with torch.no_grad():
            return float(F.cross_entropy(net(inputs), targets))

    if est.scheme == "forward":
        fx = f(x_np)
        coef = np.array([(f(x_np + h[i] * u[i]) - fx) / h[i] for i in range(len(h))])
    else:
        diff = np.array([f(x_np + h[i] * u[i]) - f(x_np - h[i] * u[i]) for i in range(len(h))])
        coef = diff / (2 * h) if est.scheme == "central" else diff / h
    view.assign(x)
    scale = (d if est.dist == "sphere" else 1.0) / est.q
    return scale * (coef @ u)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def estimator(dist: str, scheme: str, mu_mode: str, q: int = 4) -> zoopt.RGE:
    return zoopt.RGE(q, mu=MU, dist=dist, scheme=scheme, mu_mode=mu_mode)


CASES = list(
    itertools.product(
        ("gaussian", "sphere", "rademacher"),
        ("forward", "central", "antithetic"),
        ("direction", "absolute"),
    )
)


@pytest.mark.parametrize(("dist", "scheme", "mu_mode"), CASES)
def test_inplace_estimate_equals_materialized_reference(dist, scheme, mu_mode):
    est = estimator(dist, scheme, mu_mode)
    net, inputs, targets = make_problem()
    oracle = ModuleOracle(net, F.cross_entropy, inputs, targets, engine=False)
    x = oracle.view.flatten()
    ref = reference_grad(est, net, inputs, targets, x, seed=3)
    zo = InPlaceRGE(est, zoopt.SGD(lr=1e-3))
    _, e = zo.step(oracle, zo.init(), rng=np.random.default_rng(3))
    assert e.queries == est.queries_per_step(oracle.dim)
    assert rel_err(e.grad.numpy(), ref) <= TOL


@pytest.mark.parametrize(("dist", "scheme", "mu_mode"), CASES)
def test_exact_estimate_equals_reference_and_restores_bit_exactly(dist, scheme, mu_mode):
    est = estimator(dist, scheme, mu_mode)
    net, inputs, targets = make_problem()
    oracle = ModuleOracle(net, F.cross_entropy, inputs, targets, engine=False)
    x = oracle.view.flatten()
    ref = reference_grad(est, net, inputs, targets, x, seed=5)
    e = ZO(est).estimate(oracle, x, rng=np.random.default_rng(5))
    assert oracle.view.holds(x)  # restored exactly, not up to rounding
    assert rel_err(e.grad.numpy(), ref) <= TOL


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    width=st.integers(1, 9),
    features=st.integers(1, 6),
    q=st.sampled_from([2, 4, 6]),
    case=st.sampled_from(CASES),
)
def test_seeded_estimates_match_reference_over_seeds_and_shapes(seed, width, features, q, case):
    dist, scheme, mu_mode = case
    est = estimator(dist, scheme, mu_mode, q=q)
    net, inputs, targets = make_problem(width, features, seed=seed % 1000)
    oracle = ModuleOracle(net, F.cross_entropy, inputs, targets, engine=False)
    x = oracle.view.flatten()
    ref = reference_grad(est, net, inputs, targets, x, seed=seed)
    exact = ZO(est).estimate(oracle, x, rng=np.random.default_rng(seed))
    assert oracle.view.holds(x)
    assert rel_err(exact.grad.numpy(), ref) <= TOL
    zo = InPlaceRGE(est, zoopt.SGD(lr=1e-3))
    _, inplace = zo.step(oracle, zo.init(), rng=np.random.default_rng(seed))
    assert rel_err(inplace.grad.numpy(), ref) <= TOL


OPTIMIZERS = [
    lambda: zoopt.SGD(lr=1e-2),
    lambda: zoopt.SGD(lr=1e-2, momentum=0.9, weight_decay=1e-3),
    lambda: zoopt.SGD(lr=1e-2, momentum=0.9, nesterov=True),
    lambda: zoopt.Adam(lr=1e-2),
    lambda: zoopt.SignSGD(lr=1e-3, momentum=0.5),
]


@pytest.mark.parametrize("make_opt", OPTIMIZERS)
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_exact_mode_parameters_bit_identical_to_updated_x(make_opt, dist):
    """θ is held as x; each step queries in place (parameters restored from x bit for bit),
    updates x in place, and the same update written into the parameter tensors
    (``update_segments``, the fused in-model update) gives bit-identical parameters."""
    net, inputs, targets = make_problem(width=8)
    oracle = ModuleOracle(net, F.cross_entropy, inputs, targets, engine=False)
    x = oracle.view.flatten()
    source = ZO(zoopt.RGE(3, mu=1e-3, dist=dist, mu_mode="absolute"))
    opt_x, opt_p = make_opt(), make_opt()
    rng = np.random.default_rng(11)
    x_before = x.clone()
    for _ in range(4):
        x_new, est = zoopt.step.step(source, opt_x, oracle, x, rng=rng, inplace=True)
        assert x_new is x
        opt_p.state = opt_p.update_segments(opt_p.state, oracle.view.segments(), est.gradient)
        assert oracle.view.holds(x)  # bit for bit: torch.equal on every tensor
    assert not torch.equal(x, x_before)


def test_exact_mode_values_bit_identical_to_built_points():
    """``eval_direction_steps`` (in place) returns exactly ``batch`` of the built points."""
    net, inputs, targets = make_problem()
    oracle = ModuleOracle(net, F.cross_entropy, inputs, targets, engine=False)
    x = oracle.view.flatten()
    plan = zoopt.RGE(5, mu=MU, scheme="central").plan(x, rng=np.random.default_rng(2))
    steps = plan.direction_steps
    in_place = oracle.eval_direction_steps(x, steps)
    built = oracle.batch(steps.points(x))
    assert torch.equal(in_place, built)
    assert oracle.view.holds(x)
