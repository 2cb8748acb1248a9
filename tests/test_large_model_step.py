"""The large-model step (#21): ZO-Bench's optimizers on seeded (lazy) gradients, the exact
in-place trainer path (mezo, rge), ZO-SGD-Cons, the forward gradient, --trainable / LoRA."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import zoopt  # noqa: E402
from zoopt import optim as zoptim  # noqa: E402
from zoopt.directions import DirectionCombination, SeededDirections  # noqa: E402
from zoopt.optim import SGD, Adam, OptState, SignSGD  # noqa: E402
from zoopt.step import ZO, accepts, conservative_step, step  # noqa: E402
from zoopt.torch import ModuleOracle  # noqa: E402
from zoopt.torch.forward_gradient import ForwardGradient  # noqa: E402
from zoopt.torch.params import select_trainable  # noqa: E402
from zoopt.torch.train import TrainConfig, Trainer, describe_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# -- every optimizer: lazy == dense, segments == whole, pure, in place == pure ---------------
OPTIMIZERS = {
    "sgd": lambda wd: SGD(lr=0.05, weight_decay=wd),
    "sgd-momentum": lambda wd: SGD(lr=0.05, momentum=0.9, weight_decay=wd),
    "nesterov": lambda wd: SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=wd),
    "signsgd": lambda wd: SignSGD(lr=0.01, weight_decay=wd),
    "signsgd-momentum": lambda wd: SignSGD(lr=0.01, momentum=0.5, weight_decay=wd),
    "adam": lambda wd: Adam(lr=0.01, weight_decay=wd),
}


def lazy_gradient(seed, q, dim, like, dist="gaussian"):
    dirs = SeededDirections(seed, q, dim, dist)
    coef = np.random.default_rng(seed).normal(size=q)
    return DirectionCombination(dirs, coef, like)


def arrays(lib, dim, seed, dtype):
    x = np.random.default_rng(seed + 1).normal(size=dim)
    if lib == "torch":
        return torch.tensor(x, dtype={"float32": torch.float32, "float64": torch.float64}[dtype])
    return x.astype(dtype)


def copy_of(a):
    return a.clone() if isinstance(a, torch.Tensor) else a.copy()


def equal(a, b):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return np.array_equal(a, b)


def same_state(a, b):
    return a.t == b.t and all(equal(a.buffers[k], b.buffers[k]) for k in a.buffers)


def frozen(state):
    return OptState(
        state.t, {k: None if v is None else copy_of(v) for k, v in state.buffers.items()}
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(sorted(OPTIMIZERS)),
    wd=st.sampled_from([0.0, 1e-2]),
    lib=st.sampled_from(["numpy", "torch"]),
    dtype=st.sampled_from(["float32", "float64"]),
    dim=st.integers(1, 300),
    q=st.integers(1, 4),
    seed=st.integers(0, 2**31),
    chunk=st.sampled_from([7, 64, 1 << 16]),
    dist=st.sampled_from(["gaussian", "rademacher"]),
    cuts=st.lists(st.floats(0, 1), max_size=4),
)
def test_every_optimizer_lazy_equals_dense_segments_pure_and_in_place(
    name, wd, lib, dtype, dim, q, seed, chunk, dist, cuts, monkeypatch
):
    monkeypatch.setattr(zoptim, "LAZY_CHUNK", chunk)  # chunk boundaries inside tensors
    opt = OPTIMIZERS[name](wd)
    x = arrays(lib, dim, seed, dtype)
    state = opt.init()
    for k in range(3):  # three steps: the buffers are used from the second on
        lazy = lazy_gradient(seed + k, q, dim, x, dist)
        dense = lazy.dense()
        x_before, dense_before, state_before = copy_of(x), copy_of(dense), frozen(state)
        x_lazy, s_lazy = opt.update(state, x, lazy)
        x_dense, s_dense = opt.update(state, x, dense)
        # lazy (seeded, chunk by chunk) == dense, bit for bit
        assert equal(x_lazy, x_dense) and same_state(s_lazy, s_dense), (name, k)
        # pure: nothing passed in changed
        assert equal(x, x_before) and equal(dense, dense_before)
        assert same_state(state, state_before)
        # update_segments on pieces == update on the concatenation
        bounds = sorted({0, dim, *(int(c * dim) for c in cuts)})
        pieces = copy_of(x)
        segments = [(a, pieces[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
        s_seg = opt.update_segments(frozen(state), segments, lazy)
        assert equal(pieces, x_lazy) and same_state(s_seg, s_lazy), (name, k)
        # inplace=True == the pure result, written into x itself
        x_in = copy_of(x)
        out, s_in = opt.update(frozen(state), x_in, lazy, inplace=True)
        assert out is x_in and equal(x_in, x_lazy) and same_state(s_in, s_lazy)
        x, state = x_lazy, s_lazy


# -- the exact in-place step on a module --------------------------------------------------------
def mlp(dtype=torch.float64, dropout=0.0, bn=True):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 12)]
    if bn:
        layers.append(nn.BatchNorm1d(12))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, 3)]
    return nn.Sequential(*layers).to(dtype)


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("engine", [True, False])
def test_exact_in_place_step_restores_and_matches_the_pure_step(name, engine):
    model = mlp(torch.float32)
    oracle = ModuleOracle(model, nn.functional.cross_entropy, *batch(), engine=engine)
    view = oracle.view
    x = view.flatten()
    source = ZO(zoopt.RGE(q=3, mu=1e-3, mu_mode="absolute"))
    pure_opt, inplace_opt = OPTIMIZERS[name](1e-3), OPTIMIZERS[name](1e-3)
    for t in range(3):
        fx = oracle.base_value(x)
        x_pure, _ = step(source, pure_opt, oracle, x, fx=fx, rng=np.random.default_rng(t))
        old = x.clone()
        x_in, est = step(
            source, inplace_opt, oracle, x, fx=fx, rng=np.random.default_rng(t), inplace=True
        )
        assert x_in is x and torch.equal(x, x_pure)
        assert same_state(inplace_opt.state, pure_opt.state)
        assert view.holds(old)  # the queries restored the parameters exactly
        view.assign(x)  # what the trainer's commit does: parameters == x bit for bit
        assert view.holds(x)


def digits_task(n_train=256, batch_size=32, model=None):
    from zoopt import data as zdata
    from zoopt.torch.models import build_model
    from zoopt.torch.tasks import ClassificationTask

    X_tr, y_tr, X_te, y_te = zdata.load_digits_split(seed=0)
    torch.manual_seed(0)
    if model is None:
        model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    return ClassificationTask(
        model, (X_tr[:n_train], y_tr[:n_train]), (X_te[:200], y_te[:200]),
        batch_size=batch_size, grasp_per_class=2,
    )  # fmt: skip


def recipe(method, **kw):
    base = dict(
        method=method, epochs=1, max_steps_per_epoch=3, rge_q=3, progress=False, plots=False,
        seed=0, lr=0.003, momentum=0.0, weight_decay=0.0, mu=1e-3, lr_schedule="constant",
    )  # fmt: skip
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("method", ["mezo", "rge", "forward-grad"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "signsgd"])
def test_trainer_in_place_keeps_parameters_bit_identical_to_x(method, optimizer, tmp_path):
    task = digits_task()
    trainer = Trainer(task, recipe(method, optimizer=optimizer, momentum=0.9), tmp_path)
    x_id = id(trainer.x)
    summary = trainer.fit()
    assert summary["steps"] == 3
    assert id(trainer.x) == x_id  # updated in place: never replaced by a copy
    assert task.oracle.view.holds(trainer.x)
    q = {"mezo": 1, "rge": 3, "forward-grad": 0}[method]
    assert summary["queries"] == 3 * (q + (method != "forward-grad"))
    if method == "forward-grad":
        assert task.oracle.grad_evaluations == 3 * 3
    assert "in place" in summary["path"] or "forward gradient" in summary["path"]


def test_in_place_path_equals_the_pure_path(tmp_path, monkeypatch):
    """The in-place trainer's trajectory is the copying trainer's, bit for bit."""
    a = Trainer(digits_task(), recipe("rge", momentum=0.9), tmp_path / "a")
    a.fit()
    monkeypatch.setattr(Trainer, "in_place", property(lambda self: False))
    b = Trainer(digits_task(), recipe("rge", momentum=0.9), tmp_path / "b")
    b.fit()
    assert torch.equal(a.x, b.x)


# -- ZO-SGD-Cons --------------------------------------------------------------------------------
def test_conservative_rejects_a_rise_and_keeps_the_old_state():
    f = zoopt.as_oracle(lambda x: float(np.sum(x**2)), dim=20)
    x = np.ones(20)
    source = ZO(zoopt.RGE(q=4, mu=1e-4))
    opt = SGD(lr=100.0, momentum=0.9)  # far too large: the loss rises
    old_state = opt.state
    before = f.queries
    x_new, est, ok = conservative_step(source, opt, f, x, rng=np.random.default_rng(0))
    assert not ok and x_new is x and opt.state is old_state
    assert f.queries - before == 4 + 1 + 1  # q + f(x) + the candidate
    opt = SGD(lr=1e-2, momentum=0.9)
    x_new, est, ok = conservative_step(source, opt, f, x, fx=20.0, rng=np.random.default_rng(0))
    assert ok and opt.state.t == 1 and np.sum(x_new**2) <= 20.0
    assert accepts(1.0, 1.0) and not accepts(1.0, 1.0 + 1e-12) and not accepts(1.0, np.nan)


def test_trainer_conservative_rejects_steps_and_counts_them(tmp_path):
    task = digits_task()
    trainer = Trainer(task, recipe("rge", lr=50.0, conservative=True), tmp_path)
    x0 = trainer.x.clone()
    summary = trainer.fit()
    assert summary["rejected_steps"] == 3 and torch.equal(trainer.x, x0)
    assert trainer.optimizer.state.t == 0  # the old state: no step was taken
    assert summary["queries"] == 3 * (3 + 1 + 1)
    assert task.oracle.view.holds(trainer.x)
    ok = Trainer(digits_task(), recipe("mezo", conservative=True), tmp_path / "ok").fit()
    assert ok["steps"] == 3 and 0 <= ok["rejected_steps"] <= 3
    assert trainer.queries_next_step() == 1 + 3 + 1


# -- the forward gradient -----------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_gradient_equals_autograd_directional_derivatives(dist, dropout):
    model = mlp(dropout=dropout)
    oracle = ModuleOracle(model, nn.functional.cross_entropy, *batch())
    x = oracle.view.flatten()
    q = 3
    source = ForwardGradient(q=q, dist=dist, update_stats=False)
    est = source.estimate(oracle, x, rng=np.random.default_rng(5))
    assert est.queries == 0 and oracle.queries == 0 and oracle.grad_evaluations == q
    assert isinstance(est.gradient, DirectionCombination)
    loss, g = oracle.loss_and_grad(x, update_stats=False)
    dirs = source.directions(oracle.dim, np.random.default_rng(5))
    want = sum(float(g @ dirs.dense(i, x)) * dirs.dense(i, x) for i in range(q)) / q
    torch.testing.assert_close(est.grad, want, rtol=1e-10, atol=1e-12)
    assert est.fx == pytest.approx(loss, rel=1e-12)


def test_forward_gradient_updates_running_statistics_once_like_a_training_forward():
    model = mlp()
    reference = mlp()
    oracle = ModuleOracle(model, nn.functional.cross_entropy, *batch())
    ForwardGradient(q=3).estimate(oracle, oracle.view.flatten(), rng=0)
    with torch.no_grad():
        reference(batch()[0])
    for (k, a), (_, b) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=k)


def test_forward_gradient_needs_a_module_oracle():
    f = zoopt.as_oracle(lambda x: float(np.sum(x**2)), dim=3)
    with pytest.raises(TypeError, match="needs a zoopt.torch.ModuleOracle"):
        ForwardGradient().estimate(f, np.zeros(3))


# -- training runs: the loss falls --------------------------------------------------------------
def test_rge_training_loss_falls(tmp_path):
    cfg = recipe("rge", epochs=3, max_steps_per_epoch=20, rge_q=4, lr=0.02)
    trainer = Trainer(digits_task(n_train=1024), cfg, tmp_path)
    summary = trainer.fit()
    losses = [r["train_loss"] for r in trainer.state.history]
    assert summary["finished"] and losses[-1] < losses[0], losses


MODEL_FILE = """
import torch
from torch import nn

def factory(num_classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
"""


def zoopt_train(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "zoopt.cli", "train", "--dataset", "digits", "--no-progress", *args],
        capture_output=True, text=True, timeout=600, cwd=cwd,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_cli_mezo_with_a_user_model_trains_and_its_loss_falls(tmp_path):
    (tmp_path / "mymodel.py").write_text(MODEL_FILE)
    out = tmp_path / "run"
    args = ["--model", f"{tmp_path / 'mymodel.py'}:factory", "--method", "mezo"]
    args += ["--epochs", "3", "--max-steps", "25", "--lr", "0.003", "--momentum", "0"]
    args += ["--weight-decay", "0", "--mu", "1e-3", "--lr-schedule", "constant", "--out", str(out)]
    done = zoopt_train(*args)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["finished"] and summary["queries"] == 2 * summary["steps"]  # q=1 + f(x)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], rows
    explained = zoopt_train(*args, "--explain")
    assert explained.returncode == 0, explained.stderr
    assert (
        "RGE q=1 in place (MeZO)" in explained.stdout and "exact restore from x" in explained.stdout
    )


def test_cli_rge_conservative_and_forward_grad_and_trainable(tmp_path):
    out = tmp_path / "rge"
    base = ["--epochs", "1", "--max-steps", "2", "--lr", "0.01", "--momentum", "0"]
    done = zoopt_train(*base, "--method", "rge", "--rge-q", "3", "--conservative",
                       "--trainable", r"^body\.2\.", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["conservative"] and summary["queries"] == 2 * (3 + 1 + 1)
    assert "rejected_steps" in summary
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["x"].numel()
    assert summary["parameters"] == trained < 3842  # only the classifier
    done = zoopt_train(
        *base, "--method", "forward-grad", "--rge-q", "2", "--out", str(tmp_path / "fg")
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "fg" / "summary.json").read_text())
    assert summary["queries"] == 0 and summary["method"] == "forward-grad"
    bad = zoopt_train(*base, "--trainable", "nomatch", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "matches none" in bad.stderr


# -- Ctrl-C at any line, then resume: bit-exact (see test_reliability.py) -------------------
@pytest.mark.parametrize(
    "method,kw",
    [("mezo", {}), ("mezo", {"conservative": True}), ("forward-grad", {})],
)
@pytest.mark.parametrize("fraction", [0.07, 0.38, 0.66, 0.93])
def test_ctrl_c_anywhere_then_resume_is_bit_identical(method, kw, fraction, tmp_path):
    import test_reliability as rel

    def recipe_of(m, **more):
        return TrainConfig(
            **(dict(rel.recipe(m).__dict__) | {"rge_q": 2, "momentum": 0.9} | kw | more)
        )

    key = (method, tuple(sorted(kw.items())))
    if key not in _REFERENCES:
        out = tmp_path / "ref"
        counter = rel.SigintAt(-1)
        trainer = Trainer(rel.tiny_task(), recipe_of(method), out)
        sys.settrace(counter)
        try:
            trainer.fit()
        finally:
            sys.settrace(None)
        _REFERENCES[key] = (rel.outcome(trainer, out), counter.count)
    want, lines = _REFERENCES[key]
    out = tmp_path / "run"
    tracer = rel.SigintAt(max(1, int(fraction * lines)))
    trainer = Trainer(rel.tiny_task(), recipe_of(method), out)
    sys.settrace(tracer)
    with pytest.raises(KeyboardInterrupt):
        try:
            trainer.fit()
        finally:
            sys.settrace(None)
    resumed = Trainer(rel.tiny_task(), recipe_of(method), out, resume=True)
    resumed.fit()
    rel.assert_same(rel.outcome(resumed, out), want)
    assert resumed.task.oracle.view.holds(resumed.x)


_REFERENCES: dict = {}


# -- which parameters are trained: requires_grad, --trainable, LoRA ----------------------------
def test_trainable_regex_selects_parameters_and_the_step_leaves_the_others():
    model = mlp(torch.float32, bn=False)
    names = select_trainable(model, r"^3\.")
    oracle = ModuleOracle(model, nn.functional.cross_entropy, *batch())
    assert [g.name for g in oracle.view.groups] == names == ["3.weight", "3.bias"]
    frozen_before = model[0].weight.detach().clone()
    x = oracle.view.flatten()
    x, _ = step(ZO(zoopt.RGE(q=2, mu=1e-3)), SGD(lr=0.1), oracle, x, rng=0, inplace=True)
    oracle.view.assign(x)
    assert torch.equal(model[0].weight, frozen_before)


def test_lora_adapters_are_the_only_trained_parameters(tmp_path):
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    torch.manual_seed(0)
    model = peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["1", "3"]), base
    )
    task = digits_task(model=model)
    names = [g.name for g in task.oracle.view.groups]
    assert names and all("lora_" in n for n in names)  # requires_grad as peft set it
    assert names == select_trainable(model, "lora_")  # the same through --trainable's regex
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainer = Trainer(task, recipe("mezo", lr=0.01), tmp_path)
    x0 = trainer.x.clone()
    trainer.fit()
    assert not torch.equal(trainer.x, x0)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen_before[n]), n
    assert "in place" in describe_path(trainer.config, trainer.x.numel(), trainer.optimizer)
