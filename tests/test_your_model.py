"""Bring your own model, from the command line: the page docs/your_model.md, run as written."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "docs/examples/my_resnet.py:resnet"


def zoopt(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "zoopt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_explain_prints_the_plan_of_a_user_model(tmp_path):
    out = zoopt("train", "--model", EXAMPLE, "--explain", "--out", tmp_path / "run")
    assert out.returncode == 0, out.stderr
    assert "SparseCGEEngine on ResNet: the whole forward traced" in out.stdout
    assert "layer2.shortcut.0.weight" in out.stdout and " fast " in out.stdout
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # explain trains nothing


def test_train_a_user_model_with_deepzero_from_its_weights(tmp_path):
    sys.path.insert(0, str(ROOT / "docs" / "examples"))
    try:
        import my_resnet
    finally:
        sys.path.pop(0)
    torch.manual_seed(123)
    weights = tmp_path / "init.pt"
    torch.save({"state_dict": my_resnet.resnet(10).state_dict()}, weights)
    out = zoopt(
        "train", "--model", EXAMPLE, "--weights", weights, "--method", "deepzero",
        "--epochs", "1", "--max-steps", "3", "--grasp-q", "4", "--no-progress",
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["queries"] > 0
    assert 0.0 <= summary["test_accuracy"] <= 1.0


class Boom:
    def __reduce__(self):
        return (os.system, ("touch " + str(Path(os.environ["BOOM_FILE"])),))


def test_weights_never_run_code_and_bad_input_is_one_clear_line(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("BOOM_FILE", str(marker))
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": Boom()}, f)
    out = zoopt("train", "--model", EXAMPLE, "--weights", evil, "--explain", "--out", tmp_path)
    assert out.returncode == 2 and "cannot read weights" in out.stderr and str(evil) in out.stderr
    assert not marker.exists()
    assert "Traceback" not in out.stderr

    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    out = zoopt("train", "--model", EXAMPLE, "--weights", wrong, "--explain", "--out", tmp_path)
    assert out.returncode == 2 and "do not fit the model" in out.stderr

    for spec, message in [
        ("nowhere.py:resnet", "does not exist"),
        ("docs/examples/my_resnet.py:missing", "has no callable 'missing'"),
        ("resnet99", "unknown --model"),
    ]:
        out = zoopt("train", "--model", spec, "--explain", "--out", tmp_path)
        assert out.returncode == 2 and message in out.stderr, out.stderr

    (tmp_path / "flat.py").write_text(
        "import torch.nn as nn\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n"
    )
    out = zoopt("train", "--model", f"{tmp_path / 'flat.py'}:make", "--explain", "--out", tmp_path)
    assert out.returncode == 2 and "expected logits (batch, 10)" in out.stderr
