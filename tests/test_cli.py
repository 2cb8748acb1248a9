"""The zoopt console script, run as a user would (a real subprocess)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ZOOPT = [sys.executable, "-m", "zoopt.cli"]


def run(args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run(
        ZOOPT + args, capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_help_for_every_command():
    out = run(["--help"])
    assert out.returncode == 0 and "minimize" in out.stdout
    for cmd in ("minimize", "demo", "train", "serve-classifier", "experiment"):
        out = run([cmd, "--help"])
        assert out.returncode == 0 and "usage: zoopt " + cmd in out.stdout


def test_minimize_named_function_json():
    out = run(
        [
            "minimize",
            "quadratic",
            "--dim",
            "50",
            "--estimator",
            "cge",
            "--lr",
            "0.15",
            "--maxiter",
            "60",
            "--json",
            "--quiet",
        ]
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["gap_reduction"] > 1000
    assert summary["nfev"] == 60 * 51 + 1


def test_minimize_user_function_module_colon_name(tmp_path):
    (tmp_path / "myobjective.py").write_text(
        "import numpy as np\ndef loss(x):\n    return float(np.sum((x - 3.0) ** 2))\n"
    )
    xfile = tmp_path / "x.npy"
    out = run(
        [
            "minimize",
            "myobjective:loss",
            "--dim",
            "5",
            "--estimator",
            "rge",
            "--q",
            "5",
            "--lr",
            "0.05",
            "--maxiter",
            "300",
            "--out",
            str(xfile),
            "--quiet",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.load(xfile), 3.0, atol=0.05)


def test_errors_are_clear():
    out = run(["minimize", "nosuchfunction", "--quiet"])
    assert out.returncode != 0 and "unknown function 'nosuchfunction'" in out.stderr
    out = run(["minimize", "nosuchmodule:f", "--quiet"])
    assert out.returncode != 0 and "cannot import module 'nosuchmodule'" in out.stderr
    out = run(["minimize", "sphere", "--mu", "-1", "--quiet"])
    assert (
        out.returncode == 2
        and "zoopt: error: mu must be a finite number > 0, got -1.0" in out.stderr
    )
    assert "Traceback" not in out.stderr


def test_experiment_lists_every_application_and_forwards_its_options(capsys):
    from applications.commands import EXPERIMENTS
    from zoopt import cli

    apps = Path(__file__).resolve().parents[1] / "applications"
    names = {p.stem for p in apps.glob("*.py") if not p.stem.startswith("_")} - {"commands"}
    assert set(EXPERIMENTS) == names
    for name in sorted(names):
        with pytest.raises(SystemExit) as info:
            cli.main(["experiment", name, "--help"])  # the application's own --help
        assert info.value.code == 0
        assert "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["experiment", "no_such_experiment"])
    assert info.value.code == 2
    assert "invalid choice: 'no_such_experiment'" in capsys.readouterr().err


def test_train_options_are_the_cli_defaults_plus_overrides():
    from zoopt import cli
    from zoopt.train_cli import TrainOptions, options_from_args

    parsed = cli.build_parser().parse_args(["train", "--out", "somewhere"])
    assert options_from_args(parsed) == TrainOptions(out="somewhere")
    parsed = cli.build_parser().parse_args(
        ["train", "--out", "x", "--batch-size", "64", "--ratios", "uniform", "--no-progress"]
    )
    assert options_from_args(parsed) == TrainOptions(
        out="x", batch_size=64, ratios="uniform", progress=False
    )
    with pytest.raises(TypeError, match="batchsize"):
        TrainOptions(batchsize=64)
    with pytest.raises(ValueError, match="optimizer must be one of.*'lbfgs'"):
        TrainOptions(optimizer="lbfgs")
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainOptions().lr = 1.0  # type: ignore[misc]
