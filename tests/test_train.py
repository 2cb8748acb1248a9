"""The one trainer: DeepZero / FO / RGE steps, masks, checkpoints and exact resume, CLI."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from zoopt import data as zdata  # noqa: E402
from zoopt.torch.models import build_model  # noqa: E402
from zoopt.torch.tasks import ClassificationTask  # noqa: E402
from zoopt.torch.train import TrainConfig, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def small_task(seed=0, n_train=256, batch_size=32):
    X_tr, y_tr, X_te, y_te = zdata.load_digits_split(seed=0)
    torch.manual_seed(seed)
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    return ClassificationTask(
        model,
        (X_tr[:n_train], y_tr[:n_train]),
        (X_te[:200], y_te[:200]),
        batch_size=batch_size,
        grasp_per_class=3,
    )


def config(**kw):
    base = dict(
        method="deepzero",
        epochs=2,
        max_steps_per_epoch=3,
        sparsity=0.9,
        grasp_q=8,
        reshuffle_every=1,
        progress=False,
        plots=False,
        seed=0,
    )
    return TrainConfig(**(base | kw))


class InterruptAt:
    """A task whose batch stream raises KeyboardInterrupt at a global step — Ctrl-C arriving."""

    def __init__(self, task, step):
        self._task, self._step, self._seen = task, step, 0

    def __getattr__(self, name):
        return getattr(self._task, name)

    def train_batches(self, epoch, rng):
        for batch in self._task.train_batches(epoch, rng):
            if self._seen == self._step:
                raise KeyboardInterrupt
            self._seen += 1
            yield batch


@pytest.mark.parametrize("method", ["deepzero", "fo", "rge"])
def test_each_method_trains_a_few_steps(tmp_path, method):
    task = small_task()
    cfg = config(method=method, rge_q=4)
    summary = Trainer(task, cfg, tmp_path).fit()
    assert summary["epochs_completed"] == 2 and summary["steps"] == 6
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    for name in ("summary.json", "metrics.jsonl", "checkpoint.pt"):
        assert (tmp_path / name).exists()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    d = task.parameters_vector().numel()
    if method == "deepzero":
        # ZO-GraSP scoring 2(q+1) queries + per step (|S| + 1)
        per_step = summary["queries"] - 2 * (8 + 1)
        assert 6 * 2 <= per_step < 6 * (0.2 * d + 1)
    elif method == "rge":
        assert summary["queries"] == 6 * (4 + 1)
    else:
        assert summary["queries"] == 0


def test_deepzero_masks_respect_keep_ratios(tmp_path):
    task = small_task()
    trainer = Trainer(task, config(), tmp_path)
    trainer._ensure_mask()
    coords = trainer.mask.coords()
    for g in task.groups:
        inside = np.count_nonzero((coords >= g.start) & (coords < g.stop))
        size = g.stop - g.start
        if g.kind == "weight":
            expected = max(1, round(trainer.state.keep_ratios[g.name] * size))
            assert inside == expected, g.name
        else:
            assert inside == size, g.name  # BN and biases are always estimated


def test_resume_after_interrupt_is_exact(tmp_path):
    straight = Trainer(small_task(), config(), tmp_path / "a").fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(InterruptAt(small_task(), 4), config(), tmp_path / "b").fit()
    # a fresh process would rebuild everything from scratch: so do we (other init seed even)
    resumed = Trainer(small_task(seed=123), config(), tmp_path / "b", resume=True).fit()
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert torch.equal(a["x"], b["x"])
    for k in a["buffers"]:
        assert torch.equal(a["buffers"][k], b["buffers"][k]), k
    assert straight["queries"] == resumed["queries"]
    assert straight["test_accuracy"] == resumed["test_accuracy"]


def test_budget_stop_checkpoints_and_resumes(tmp_path):
    task = small_task()
    summary = Trainer(task, config(max_queries=400), tmp_path).fit()
    assert summary["stopped"] == "query budget exhausted" and summary["queries"] <= 400
    more = Trainer(small_task(), config(max_queries=None), tmp_path, resume=True).fit()
    assert more["finished"] and more["steps"] == 6


def test_resume_refuses_a_different_recipe(tmp_path):
    Trainer(small_task(), config(epochs=1), tmp_path).fit()
    with pytest.raises(ValueError, match="sparsity=0.9, but this run has sparsity=0.8"):
        Trainer(small_task(), config(sparsity=0.8), tmp_path, resume=True)


def test_bad_config_values():
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="adam")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        TrainConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="reshuffle_every"):
        TrainConfig(reshuffle_every=0)


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and a child
    # inherits that; give the CLI the default Ctrl-C, as a user's terminal does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "zoopt.cli", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_default_sigint,
        **kw,
    )


def test_cli_train_end_to_end_and_sigint_resume(tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--dataset",
        "digits",
        "--method",
        "deepzero",
        "--sparsity",
        "0.9",
        "--epochs",
        "2",
        "--max-steps",
        "2",
        "--grasp-q",
        "16",
        "--out",
        str(out),
        "--no-progress",
    ]
    p = _cli(args)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_accuracy", "queries", "wall_seconds", "method", "sparsity"):
        assert key in summary
    assert summary["method"] == "deepzero" and summary["sparsity"] == 0.9
    assert (out / "curves.png").stat().st_size > 0

    # Ctrl-C a longer run once it has written a checkpoint, then resume it to the end
    out2 = tmp_path / "interrupted"
    # enough epochs that the run is still going when the signal comes (an epoch of 2 steps can
    # take well under 0.1 s on an idle machine)
    args2 = [*args[:-3], "--epochs", "60", "--out", str(out2), "--no-progress"]
    p = _cli(args2)
    deadline = time.time() + 300
    while not (out2 / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 130 and "checkpoint saved" in (stderr + stdout), (
        f"rc {p.returncode}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-4000:]}"
    )
    done_before = len((out2 / "metrics.jsonl").read_text().splitlines())
    p = _cli([*args2, "--resume"])
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["epochs_completed"] == 60 and done_before < 60


# -- the recipe: TrainConfig = Recipe + RunOptions; resume checks the recipe ----------------
def test_train_config_is_a_recipe_plus_run_options():
    from zoopt.recipe import Recipe, RunOptions

    recipe, run = Recipe(method="fo", epochs=3, lr=0.05), RunOptions(progress=False, plots=False)
    cfg = TrainConfig.of(recipe, run)
    assert (cfg.recipe, cfg.run) == (recipe, run)
    assert cfg == TrainConfig(method="fo", epochs=3, lr=0.05, progress=False, plots=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_resume_names_every_differing_setting_and_reads_format_2_checkpoints(tmp_path):
    Trainer(small_task(), config(epochs=1), tmp_path).fit()
    with pytest.raises(ValueError) as info:
        Trainer(small_task(), config(sparsity=0.8, lr=0.05), tmp_path, resume=True)
    assert "written with lr=0.1, sparsity=0.9, but this run has lr=0.05, sparsity=0.8" in str(
        info.value
    )
    # the layout before the recipe had its own key: one "config" (run options included) and
    # the batch size beside it
    path = tmp_path / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    recipe, run = payload.pop("recipe"), payload.pop("run")
    payload["batch_size"] = recipe.pop("batch_size")
    payload["config"] = {**recipe, **run}
    payload["format"] = 2
    torch.save(payload, path)
    with pytest.raises(ValueError, match="sparsity=0.9, but this run has sparsity=0.8"):
        Trainer(small_task(), config(sparsity=0.8), tmp_path, resume=True)
    summary = Trainer(small_task(), config(epochs=2), tmp_path, resume=True).fit()
    assert summary["finished"] and summary["epochs_completed"] == 2
    assert summary["config"]["batch_size"] == 32


def test_a_recipe_batch_size_must_be_the_tasks():
    with pytest.raises(ValueError, match="batch_size=16 is not the task's batch_size=32"):
        Trainer(small_task(), config(batch_size=16), callbacks=[])
    trainer = Trainer(small_task(), config(batch_size=32), callbacks=[])
    assert trainer.recipe.batch_size == 32


def test_a_registered_optimizer_trains_with_the_recipes_options(tmp_path):
    from zoopt import registry
    from zoopt.optim import SGD

    registry.register_optimizer("plain", SGD, options=("weight_decay",))
    try:
        trainer = Trainer(
            small_task(), config(method="fo", optimizer="plain", weight_decay=0.01), tmp_path
        )
        assert type(trainer.optimizer) is SGD and trainer.optimizer.momentum == 0
        assert trainer.optimizer.weight_decay == 0.01
        assert trainer.fit()["finished"]
    finally:
        registry.unregister("optimizer", "plain")
