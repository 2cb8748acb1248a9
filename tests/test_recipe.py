"""The recipe (what a run computes), the run options (how it runs) and the registry of
optimizers, schedules and estimators: torch-free, checked on resume field by field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from zoopt import registry
from zoopt.optim import SGD, Optimizer
from zoopt.recipe import (
    MAY_CHANGE,
    ON_RESUME,
    Recipe,
    RunOptions,
    check_resume,
    recipe_differences,
)
from zoopt.train_cli import TrainOptions

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_field_is_checked_on_resume_unless_it_says_otherwise():
    recipe = Recipe()
    saved = dataclasses.asdict(recipe)
    assert recipe_differences(saved, recipe) == {}
    may_change = set()
    for f in dataclasses.fields(Recipe):
        if f.metadata.get(ON_RESUME) == MAY_CHANGE:
            may_change.add(f.name)
            continue
        other = {**saved, f.name: "another value"}
        assert recipe_differences(other, recipe) == {f.name: ("another value", saved[f.name])}
    assert may_change == {"epochs"}  # the one declared exception: a run may be continued
    assert recipe_differences({**saved, "epochs": 7}, recipe) == {}


def test_resume_error_names_every_differing_field_with_both_values():
    saved = dataclasses.asdict(Recipe(lr=0.1, sparsity=0.9, seed=3))
    with pytest.raises(ValueError) as info:
        check_resume(saved, Recipe(lr=0.05, sparsity=0.8, seed=3), source="run/checkpoint.pt")
    text = str(info.value)
    assert "checkpoint run/checkpoint.pt was written with lr=0.1, sparsity=0.9" in text
    assert "but this run has lr=0.05, sparsity=0.8" in text
    assert "seed" not in text


def test_a_field_missing_from_an_older_checkpoint_counts_as_its_default():
    saved = dataclasses.asdict(Recipe())
    del saved["conservative"], saved["lr_schedule"]
    assert recipe_differences(saved, Recipe()) == {}
    assert recipe_differences(saved, Recipe(conservative=True)) == {"conservative": (False, True)}
    # a setting this version does not have is named, not ignored
    assert "dropped_knob" in recipe_differences({**saved, "dropped_knob": 1}, Recipe())


def test_recipe_and_run_options_are_frozen_and_checked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Recipe().lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="optimizer must be one of.*'lbfgs'"):
        Recipe(optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr_schedule must be one of.*'linear'"):
        Recipe(lr_schedule="linear")
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None, got 0"):
        Recipe(batch_size=0)
    with pytest.raises(ValueError, match="max_queries must be a positive integer, got 0"):
        RunOptions(max_queries=0)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 0, got -1"):
        RunOptions(checkpoint_every=-1)


def test_train_options_are_a_recipe_and_run_options_plus_the_command():
    opts = TrainOptions(dataset="digits", lr=0.05, max_queries=1000, out="x")
    assert opts.recipe == Recipe(lr=0.05, epochs=20, batch_size=64)  # digits' defaults
    assert opts.run == RunOptions(max_queries=1000)
    assert TrainOptions(epochs=3, batch_size=16).recipe.epochs == 3
    assert {f.name for f in dataclasses.fields(Recipe)} | {
        f.name for f in dataclasses.fields(RunOptions)
    } <= {f.name for f in dataclasses.fields(TrainOptions)}
    with pytest.raises(ValueError, match="method must be one of.*'custom'"):
        TrainOptions(method="custom")  # a gradient source is code, not a flag
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        TrainOptions(epochs=0)


def test_registry_builds_by_name_and_names_what_is_wrong():
    assert tuple(registry.OPTIMIZERS) == ("sgd", "adam", "signsgd")
    assert tuple(registry.SCHEDULES) == ("cosine", "constant")
    assert tuple(registry.ESTIMATORS) == ("rge", "cge")
    sgd = registry.optimizer("sgd", 0.1, momentum=0.9, nesterov=True)
    assert isinstance(sgd, SGD) and sgd.momentum == 0.9 and sgd.nesterov
    assert registry.schedule("constant", 0.3, total=10)(9) == 0.3
    cosine = registry.schedule("cosine", 1.0, total=10, warmup=2, final=0.1)
    assert cosine(0) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.1)
    assert registry.estimator("rge", q=3, mu=1e-3).q == 3
    with pytest.raises(ValueError, match=r"unknown optimizer 'lbfgs'; choose from \('sgd'"):
        registry.optimizer("lbfgs", 0.1)
    with pytest.raises(TypeError, match="optimizer 'adam' takes no option momentum"):
        registry.optimizer("adam", 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        registry.schedule("step", 0.1, total=10)
    with pytest.raises(ValueError, match="optimizer 'sgd' is already registered"):
        registry.register_optimizer("sgd", SGD)
    with pytest.raises(ValueError, match="built in"):
        registry.unregister("optimizer", "sgd")


class HalfSGD(SGD):
    """A user's optimizer: plain SGD at half the learning rate it is given."""

    def __init__(self, lr, weight_decay: float = 0.0):
        super().__init__(lambda t: 0.5 * (lr(t) if callable(lr) else lr), weight_decay=weight_decay)


def test_a_registered_optimizer_and_schedule_are_choices_everywhere():
    from zoopt import cli

    registry.register_optimizer("halfsgd", HalfSGD, options=("weight_decay",))
    registry.register_schedule("flat", lambda base, *, total, warmup, final: lambda t: base)
    try:
        recipe = Recipe(optimizer="halfsgd", lr_schedule="flat")
        assert recipe.optimizer == "halfsgd"
        opt: Optimizer = registry.optimizer("halfsgd", 0.2, weight_decay=0.1)
        assert isinstance(opt, HalfSGD) and opt.weight_decay == 0.1
        args = cli.build_parser().parse_args(
            ["train", "--out", "x", "--optimizer", "halfsgd", "--lr-schedule", "flat"]
        )
        assert (args.optimizer, args.lr_schedule) == ("halfsgd", "flat")
        args = cli.build_parser().parse_args(
            ["minimize", "sphere", "--optimizer", "halfsgd", "--schedule", "flat"]
        )
        assert (args.optimizer, args.schedule) == ("halfsgd", "flat")
    finally:
        registry.unregister("optimizer", "halfsgd")
        registry.unregister("schedule", "flat")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Recipe(optimizer="halfsgd")


def test_parsing_flags_imports_no_torch():
    """``zoopt train``'s and the SOL experiment's flags become their settings without torch
    (the torch halves load when a run starts)."""
    code = (
        "import sys\n"
        "from zoopt import cli\n"
        "from zoopt.train_cli import options_from_args\n"
        "opts = options_from_args(cli.build_parser().parse_args(['train', '--out', 'x']))\n"
        "assert opts.recipe.method == 'deepzero'\n"
        "from applications.sol.cli import parse_args\n"
        "settings, run = parse_args(['--methods', 'NON', 'ZO-SOL'])\n"
        "assert settings.recipe('ZO-SOL').method == 'deepzero'\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "assert not heavy, heavy[:5]\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
