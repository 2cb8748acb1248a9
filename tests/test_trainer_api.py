"""The trainer as a library: any gradient source and core optimizer, callbacks, typed options."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import zoopt  # noqa: E402
from zoopt import data as zdata  # noqa: E402
from zoopt.oracle import DifferentiableOracle, TrainableOracle  # noqa: E402
from zoopt.step import ZO  # noqa: E402
from zoopt.torch.callbacks import (  # noqa: E402
    Callback,
    Checkpoint,
    CurvePlot,
    MetricsLog,
    Progress,
    QueryBudget,
    SummaryFile,
    default_callbacks,
)
from zoopt.torch.models import build_model  # noqa: E402
from zoopt.torch.tasks import ClassificationTask  # noqa: E402
from zoopt.torch.train import TrainConfig, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def small_task(seed=0):
    X_tr, y_tr, X_te, y_te = zdata.load_digits_split(seed=0)
    torch.manual_seed(seed)
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    return ClassificationTask(
        model,
        (X_tr[:128], y_tr[:128]),
        (X_te[:100], y_te[:100]),
        batch_size=32,
        grasp_per_class=3,
    )


def config(**kw):
    base = dict(epochs=2, max_steps_per_epoch=2, progress=False, plots=False, seed=0, grasp_q=4)
    return TrainConfig(**(base | kw))


class Recorder(Callback):
    """Writes down every hook call."""

    def __init__(self):
        self.calls = []

    def on_start(self, trainer):
        self.calls.append("start")

    def before_step(self, trainer):
        self.calls.append("before")

    def on_step(self, trainer, loss, queries):
        self.calls.append(("step", queries))

    def on_epoch(self, trainer, row):
        self.calls.append(("epoch", row["epoch"]))

    def after_epoch(self, trainer, row):
        self.calls.append("after")

    def on_checkpoint(self, trainer):
        self.calls.append("checkpoint")

    def on_stop(self, trainer, why):
        self.calls.append(("stop", why))


def test_the_module_oracle_declares_the_trainable_protocols():
    oracle = small_task().oracle
    assert isinstance(oracle, TrainableOracle) and isinstance(oracle, DifferentiableOracle)
    assert not isinstance(zoopt.as_oracle(lambda x: 0.0, dim=3), TrainableOracle)


def test_callbacks_replace_every_file_and_see_every_hook(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rec = Recorder()
    summary = Trainer(small_task(), config(method="cge"), callbacks=[rec]).fit()
    assert list(tmp_path.iterdir()) == []  # no out_dir: nothing written anywhere
    d = small_task().parameters_vector().numel()
    step = ("step", d + 1)
    assert rec.calls == (
        ["start"]
        + ["before", step] * 2
        + [("epoch", 1), "checkpoint", "after"]
        + ["before", step] * 2
        + [("epoch", 2), "checkpoint", "after", ("stop", None)]
    )
    assert summary["queries"] == 4 * (d + 1)


def test_default_callbacks_are_the_documented_files(tmp_path):
    cbs = default_callbacks(config(plots=True, progress=True, max_queries=10**6), tmp_path, {})
    kinds = [type(c) for c in cbs]
    for kind in (Checkpoint, MetricsLog, SummaryFile, CurvePlot, Progress, QueryBudget):
        assert kind in kinds
    assert CurvePlot not in [type(c) for c in default_callbacks(config(), tmp_path, {})]
    with pytest.raises(ValueError, match="out_dir is required unless callbacks are given"):
        Trainer(small_task(), config())


@pytest.mark.parametrize("optimizer", ["adam", "signsgd"])
def test_any_core_optimizer_trains(tmp_path, optimizer):
    cfg = config(method="deepzero", optimizer=optimizer, lr=1e-3, lr_schedule="constant")
    trainer = Trainer(small_task(), cfg, tmp_path)
    summary = trainer.fit()
    assert type(trainer.optimizer).__name__.lower() == optimizer
    assert summary["config"]["optimizer"] == optimizer and summary["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [1e-3, 1e-3]  # constant schedule
    sgd = Trainer(small_task(), config(method="deepzero"), tmp_path / "sgd").fit()
    assert summary["test_loss"] != sgd["test_loss"]


def test_adam_resumes_bit_exactly(tmp_path):
    # constant rate: the first run (1 epoch) and the whole run share the schedule
    cfg = config(method="deepzero", optimizer="adam", lr=1e-3, lr_schedule="constant")
    whole = Trainer(small_task(), cfg, tmp_path / "whole")
    whole.fit()
    half = Trainer(small_task(), config(**{**cfg.__dict__, "epochs": 1}), tmp_path / "half")
    half.fit()
    resumed = Trainer(small_task(), cfg, tmp_path / "half", resume=True)
    resumed.fit()
    assert torch.equal(whole.x, resumed.x)
    with pytest.raises(ValueError, match="optimizer='adam'.*optimizer='sgd'"):
        Trainer(small_task(), config(method="deepzero"), tmp_path / "half", resume=True)


def test_custom_gradient_source_with_a_mu_schedule(tmp_path):
    task = small_task()
    d = task.parameters_vector().numel()
    source = ZO(zoopt.RGE(q=3, mu=1e-2), mu=zoopt.Cosine(base=1e-2, total=4, final=1e-3))
    trainer = Trainer(task, config(method="custom"), tmp_path, source=source)
    assert trainer.queries_next_step() == 1 + 3
    summary = trainer.fit()
    assert summary["queries"] == 4 * (1 + 3) and summary["method"] == "custom"
    assert source.queries_per_step(d, fx_known=True) == 3
    with pytest.raises(ValueError, match="method='custom' needs a gradient source"):
        Trainer(small_task(), config(method="custom"), tmp_path / "x")


def test_a_given_optimizer_replaces_the_recipe(tmp_path):
    opt = zoopt.SGD(lr=0.0)  # no movement at all
    trainer = Trainer(small_task(), config(method="fo"), tmp_path, optimizer=opt)
    x0 = trainer.x.clone()
    trainer.fit()
    assert torch.equal(trainer.x, x0)


def test_zoopt_train_optimizer_flag_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "zoopt.cli", "train", "--out", str(tmp_path), "--epochs", "1"]
        + ["--max-steps", "2", "--optimizer", "adam", "--lr", "0.001", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["optimizer"] == "adam" and summary["steps"] == 2
    assert math.isfinite(summary["test_accuracy"])
    out = subprocess.run(
        [sys.executable, "-m", "zoopt.cli", "train", "--out", str(tmp_path), "--optimizer", "x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 2 and "invalid choice: 'x'" in out.stderr


def test_query_budget_callback_stops_before_the_step_that_would_exceed(tmp_path):
    task = small_task()
    d = task.parameters_vector().numel()
    cfg = config(method="cge", max_queries=3 * (d + 1) + d)  # room for 3 steps, not 4
    summary = Trainer(task, cfg, tmp_path).fit()
    assert summary["steps"] == 3 and summary["stopped"] == "query budget exhausted"
    assert np.isfinite(summary["queries"]) and summary["queries"] == 3 * (d + 1)
