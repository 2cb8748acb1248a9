"""``zoopt train`` error paths (issue #22): the user's model failing and output folders the
run cannot write end in one line ``zoopt: error: ...`` naming the culprit, exit code 2,
before any training where that can be known; a write failing during training (a full disk)
keeps the last checkpoint and leaves no temporary file behind.

Everything runs for real: the ``zoopt`` CLI in a subprocess on the embedded digits, a tmpfs
when this process may mount one (else a file-size limit stands in for a full disk).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")

from test_reliability_round2 import one_line_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZOOPT = [sys.executable, "-P", "-m", "zoopt.cli"]
FAST = ["--dataset", "digits", "--method", "fo", "--epochs", "1", "--max-steps", "2"]

GOOD_MODEL = """
from torch import nn
def factory(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
"""


def run_train(args: list[str], cwd: Path, preexec=None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [*ZOOPT, "train", *FAST, "--no-progress", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
        preexec_fn=preexec,
    )


@pytest.fixture
def good_model(tmp_path: Path) -> str:
    (tmp_path / "good.py").write_text(GOOD_MODEL)
    return f"{tmp_path / 'good.py'}:factory"


# -- the user's model --------------------------------------------------------------------
MODELS = {
    "syntax": ("def factory(num_classes=10) return 1\n", ["bad.py", "line 1", "SyntaxError"]),
    "import-raises": (
        "raise RuntimeError('no GPU config')\n",
        ["bad.py", "line 1", "RuntimeError: no GPU config"],
    ),
    "factory-raises": (
        "def factory(num_classes=10):\n    raise KeyError('depth')\n",
        ["bad.py:factory", "raised", "line 2", "KeyError"],
    ),
    "forward-raises": (
        "from torch import nn\n"
        "def factory(num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(50, num_classes))\n",
        ["bad.py:factory", "(1, 8, 8)", "mat1 and mat2 shapes cannot be multiplied"],
    ),
    "nan-output": (
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self, n):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(64, n)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.flatten(1)) * float('nan')\n"
        "def factory(num_classes=10):\n    return M(num_classes)\n",
        ["bad.py:factory", "gives nan logits", "before any step"],
    ),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_a_failing_model_is_one_line_naming_it(case, tmp_path):
    source, needles = MODELS[case]
    (tmp_path / "bad.py").write_text(source)
    out = run_train(["--model", f"{tmp_path / 'bad.py'}:factory", "--out", "run"], tmp_path)
    line = one_line_error(out, *needles)
    assert "learning rate" not in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # no training happened


def test_nan_weights_are_named_before_training(good_model, tmp_path):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    state = model.state_dict()
    state["1.weight"][3, 5] = float("nan")
    torch.save(state, tmp_path / "init.pt")
    out = run_train(["--model", good_model, "--weights", "init.pt", "--out", "run"], tmp_path)
    line = one_line_error(out, "--weights 'init.pt' hold non-finite values (1.weight)", "nan")
    assert "learning rate" not in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_trainer_api_names_a_nan_loss_at_the_start():
    """Without the CLI's check: the first step's loss names the model, not the step size."""
    import numpy as np
    import torch
    from torch import nn

    from zoopt.torch.tasks import ClassificationTask
    from zoopt.torch.train import TrainConfig, Trainer

    class NaNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)) * float("nan")

    rng = np.random.default_rng(0)
    X = rng.random((16, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 3, 16)
    task = ClassificationTask(NaNModel(), (X, y), (X, y), batch_size=8)
    config = TrainConfig(method="fo", epochs=1, progress=False, plots=False)
    trainer = Trainer(task, config, callbacks=[])
    with pytest.raises(FloatingPointError, match="initial parameters is nan") as info:
        trainer.fit()
    assert "learning rate or mu" not in str(info.value)


# -- the output folder ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setup", "out", "needles"),
    [
        (lambda d: (d / "afile").write_text("x"), "afile", ["--out 'afile'", "is a file"]),
        (
            lambda d: (d / "afile").write_text("x"),
            "afile/run",
            ["--out 'afile/run'", "cannot create it", "'afile' is a file"],
        ),
        (
            lambda d: (d / "run" / "checkpoint.pt").mkdir(parents=True),
            "run",
            ["--out 'run'", "checkpoint.pt there is a folder"],
        ),
        (
            lambda d: (d / "run" / "summary.json").mkdir(parents=True),
            "run",
            ["--out 'run'", "summary.json there is a folder"],
        ),
    ],
    ids=["a-file", "under-a-file", "checkpoint-is-a-folder", "summary-is-a-folder"],
)
def test_an_output_folder_the_run_cannot_use_is_refused_before_training(
    setup, out, needles, good_model, tmp_path
):
    setup(tmp_path)
    result = run_train(["--model", good_model, "--out", out], tmp_path)
    one_line_error(result, *needles)
    assert "zoopt train: fo on digits" not in result.stdout  # refused before the data loaded


def _mount_tmpfs(where: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot write to: permission bits (a normal user), or a
    read-only tmpfs (root ignores permission bits)."""
    folder = tmp_path / "ro"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not _mount_tmpfs(folder, "ro,size=64k"):
        pytest.skip("root, and cannot mount a read-only tmpfs: no folder root cannot write")
    try:
        yield folder
    finally:
        _umount(folder)


@pytest.mark.parametrize("sub", ["", "run"])
def test_a_read_only_output_folder_is_refused_before_training(
    sub, read_only_folder, good_model, tmp_path
):
    out = str(read_only_folder / sub) if sub else str(read_only_folder)
    result = run_train(["--model", good_model, "--out", out], tmp_path)
    line = one_line_error(result, f"--out {out!r}")
    assert "inline_container" not in line
    assert ("not writable" in line) if not sub else ("cannot create it" in line)


# -- a full disk during training -----------------------------------------------------------
def _fsize_limit(limit: int):
    def preexec() -> None:  # the child: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@contextlib.contextmanager
def _full_disk(kind: str, tmp_path: Path) -> Iterator[tuple[Path, object]]:
    """(a folder, a preexec_fn) where the second run's checkpoint cannot be written."""
    if kind == "tmpfs":
        disk = tmp_path / "disk"
        if not _mount_tmpfs(disk, "size=256k"):
            pytest.skip("cannot mount a tmpfs here (the file-size-limit case stands in)")
        try:
            yield disk, None
        finally:
            _umount(disk)
    else:
        yield tmp_path, "rlimit"


def _fill(disk: Path, leave: int) -> None:
    """Fill the file system holding ``disk`` up to ``leave`` free bytes."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("kind", ["tmpfs", "rlimit"])
def test_a_full_disk_keeps_the_last_checkpoint_and_no_temporary_file(kind, good_model, tmp_path):
    with _full_disk(kind, tmp_path) as (disk, how):
        run = disk / "run"
        first = run_train(["--model", good_model, "--out", str(run)], tmp_path)
        assert first.returncode == 0, first.stderr
        before = hashlib.sha256((run / "checkpoint.pt").read_bytes()).hexdigest()
        size = (run / "checkpoint.pt").stat().st_size
        preexec = None
        if how == "rlimit":  # any file past half the checkpoint's size cannot be written
            preexec = _fsize_limit(size // 2)
        else:
            _fill(disk, leave=8192)  # room for the folder check, not for a checkpoint
        second = run_train(
            ["--model", good_model, "--out", str(run), "--resume", "--epochs", "2"],
            tmp_path,
            preexec=preexec,
        )
        line = one_line_error(second, "cannot write", str(run / "checkpoint.pt"))
        assert "File too large" in line or "No space left" in line
        assert hashlib.sha256((run / "checkpoint.pt").read_bytes()).hexdigest() == before
        assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []
        assert not any(p.name.startswith(".zoopt-write-test") for p in run.iterdir())
