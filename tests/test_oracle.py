"""Oracle adapters: counting, budgets, error policy, best-point tracking."""

import math

import numpy as np
import pytest

import zoopt


def test_counts_single_and_batch_queries():
    o = zoopt.as_oracle(lambda x: float(np.sum(x**2)), dim=3)
    assert o(np.ones(3)) == 3.0
    np.testing.assert_array_equal(o.batch(np.zeros((4, 3))), np.zeros(4))
    assert o.queries == 5
    assert o.best_f == 0.0


def test_budget_raises_before_evaluating_and_keeps_best():
    calls = []

    def f(x):
        calls.append(1)
        return float(np.sum((x - 2) ** 2))

    o = zoopt.as_oracle(f, dim=2, max_queries=3)
    o(np.array([2.0, 2.0]))
    o(np.array([0.0, 0.0]))
    with pytest.raises(zoopt.BudgetExceeded) as info:
        o.batch(np.zeros((2, 2)))
    assert len(calls) == 2  # nothing of the refused batch was evaluated
    assert info.value.best_f == 0.0
    np.testing.assert_array_equal(info.value.best_x, [2.0, 2.0])
    assert info.value.queries == 2 and info.value.max_queries == 3
    assert o.remaining == 1


def test_exception_policy_raise_names_the_query():
    def f(x):
        if x[0] > 0.5:
            raise ZeroDivisionError("boom")
        return 0.0

    o = zoopt.as_oracle(f, dim=1)
    o(np.array([0.0]))
    with pytest.raises(zoopt.OracleError, match=r"queries 1\.\.1 \(ZeroDivisionError: boom\)"):
        o(np.array([1.0]))


def test_exception_policy_inf_only_poisons_the_bad_query():
    def f(X):
        if np.any(X[:, 0] > 0.5):
            if X.shape[0] > 1:
                raise ValueError("batch has a bad row")
            raise ValueError("bad row")
        return X[:, 0]

    o = zoopt.as_oracle(f, dim=1, batched=True, on_error="inf")
    v = o.batch(np.array([[0.1], [0.9], [0.2]]))
    np.testing.assert_array_equal(v, [0.1, math.inf, 0.2])


def test_nonfinite_policy():
    o = zoopt.as_oracle(lambda x: float("nan") if x[0] > 0 else 1.0, dim=1)
    with pytest.raises(zoopt.OracleError, match="non-finite value nan at query 0"):
        o(np.array([1.0]))
    o2 = zoopt.as_oracle(lambda x: float("nan") if x[0] > 0 else 1.0, dim=1, on_nonfinite="inf")
    assert o2(np.array([1.0])) == math.inf


def test_malformed_return_values():
    o = zoopt.as_oracle(lambda X: np.zeros(2), dim=1, batched=True)
    with pytest.raises(zoopt.OracleError, match="returned 2 values for a batch of 3"):
        o.batch(np.zeros((3, 1)))
    o = zoopt.as_oracle(lambda x: "high", dim=1)
    with pytest.raises(zoopt.OracleError, match="'high'"):
        o(np.zeros(1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 0}, "dim must be a positive integer, got 0"),
        ({"dim": 2, "max_queries": -1}, "got -1"),
        ({"dim": 2, "on_error": "ignore"}, "'ignore'"),
        ({"dim": 2, "on_nonfinite": "zero"}, "'zero'"),
        ({"dim": None}, "dim is required"),
    ],
)
def test_bad_oracle_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zoopt.as_oracle(lambda x: 0.0, **kwargs)


def test_shape_checks_name_the_shapes():
    o = zoopt.as_oracle(lambda x: 0.0, dim=3)
    with pytest.raises(ValueError, match=r"\(3,\), got \(4,\)"):
        o(np.zeros(4))
    with pytest.raises(ValueError, match=r"\(n, 3\), got \(2, 2\)"):
        o.batch(np.zeros((2, 2)))
    with pytest.raises(TypeError, match="callable"):
        zoopt.as_oracle(3, dim=1)


def test_protocol_and_passthrough():
    o = zoopt.as_oracle(lambda x: 0.0, dim=2)
    assert isinstance(o, zoopt.Oracle)
    assert zoopt.as_oracle(o) is o
    with pytest.raises(ValueError, match="dim=3 does not match"):
        zoopt.as_oracle(o, dim=3)


def test_eval_coordinate_steps_matches_points_and_counts():
    d = 7
    o = zoopt.as_oracle(
        lambda X: np.sum(X**3, axis=1), dim=d, batched=True, max_batch_bytes=2 * d * 8
    )
    x = np.linspace(-1, 1, d)
    coords = np.array([0, 3, 6])
    got = o.eval_coordinate_steps(x, coords, -0.25)
    pts = np.repeat(x[None], 3, 0)
    pts[np.arange(3), coords] -= 0.25
    np.testing.assert_allclose(got, np.sum(pts**3, axis=1))
    assert o.queries == 3
