"""What happens around the training loop: checkpoints, metrics, summary, plots, progress, budget.

The :class:`~zoopt.torch.train.Trainer` runs set_batch → base value → step; everything else
is a :class:`Callback` it is given. :func:`default_callbacks` gives what ``zoopt train``
writes (``checkpoint.pt``, ``metrics.jsonl``, ``summary.json``, ``curves.png``, a progress
bar, the ``--max-queries`` budget). Write your own by overriding any hook.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch

from ..interrupts import deferred_interrupt
from ..oracle import Budget, BudgetExceeded


class RunProgress(Protocol):
    """The counters of a run that callbacks read (:class:`~zoopt.torch.train.TrainState`)."""

    epoch: int
    step_in_epoch: int
    global_step: int
    queries: int
    history: list[dict[str, Any]]


class RunRecipe(Protocol):
    """The settings callbacks read: a few of the :class:`~zoopt.recipe.Recipe` and the
    :class:`~zoopt.recipe.RunOptions` (:class:`~zoopt.torch.train.TrainConfig` has both)."""

    method: str
    epochs: int
    sparsity: float
    checkpoint_every: int
    progress: bool
    plots: bool
    max_queries: int | None


class TrainerView(Protocol):
    """What a callback sees of the trainer (:class:`~zoopt.torch.train.Trainer` implements
    it). Declared here so that this module, below the trainer, never imports it."""

    state: RunProgress
    config: RunRecipe
    steps_per_epoch: int

    def queries_next_step(self) -> int: ...

    def epoch_elapsed(self) -> float: ...

    def state_payload(self) -> dict[str, Any]: ...

    def load_payload(self, payload: dict[str, Any], source: str = "checkpoint") -> None: ...

    def summary(self, stopped: str | None = None) -> dict[str, Any]: ...


#: Checkpoint file layout version (3: the recipe and the run options stored apart, as
#: ``"recipe"`` and ``"run"``; 2 held one ``"config"`` and a ``"batch_size"``, still read).
CHECKPOINT_FORMAT = 3


class Callback:
    """Hooks around the loop; each does nothing unless overridden.

    * ``on_start(trainer)``: before the first step (after a resume).
    * ``before_step(trainer)``: before each step; may raise ``BudgetExceeded`` to stop.
    * ``on_step(trainer, loss, queries)``: after each committed step.
    * ``on_epoch(trainer, row)``: after each epoch, with its metrics row. Called while a
      Ctrl-C is held: keep it short and do not let it fail (plots belong in ``after_epoch``).
    * ``after_epoch(trainer, row)``: after each epoch, once its state is committed.
    * ``on_checkpoint(trainer)``: a point where the state is consistent and worth keeping
      (scoring done, epoch done, every ``checkpoint_every`` steps).
    * ``on_stop(trainer, why)``: the run ends; ``why`` is ``None`` when it finished,
      ``"interrupted"``, ``"query budget exhausted"`` or ``"error"``.
    """

    def on_start(self, trainer: TrainerView) -> None:
        pass

    def before_step(self, trainer: TrainerView) -> None:
        pass

    def on_step(self, trainer: TrainerView, loss: float, queries: int) -> None:
        pass

    def on_epoch(self, trainer: TrainerView, row: dict[str, Any]) -> None:
        pass

    def after_epoch(self, trainer: TrainerView, row: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, trainer: TrainerView) -> None:
        pass

    def on_stop(self, trainer: TrainerView, why: str | None) -> None:
        pass


# ----------------------------------------------------------------------------------------
class Checkpoint(Callback):
    """``checkpoint.pt``: at every consistent point, every ``every`` steps and on any stop.

    Holds only tensors, numbers, strings, lists and dicts; read back with
    ``weights_only=True`` (:meth:`restore`). Written to a temporary file and renamed, with
    Ctrl-C held, so a crash or an interrupt mid-write keeps the previous checkpoint.
    """

    def __init__(self, path: str | os.PathLike, every: int = 0):
        self.path = Path(path)
        self.every = int(every)

    def on_step(self, trainer: TrainerView, loss: float, queries: int) -> None:
        if self.every and trainer.state.global_step % self.every == 0:
            self.save(trainer)

    def on_checkpoint(self, trainer: TrainerView) -> None:
        self.save(trainer)

    def on_stop(self, trainer: TrainerView, why: str | None) -> None:
        self.save(trainer)
        if why in ("interrupted", "query budget exhausted"):
            print(f"\nzoopt train: {why}; checkpoint saved to {self.path} (resume with --resume)")

    def save(self, trainer: TrainerView) -> None:
        payload = trainer.state_payload()
        payload["format"] = CHECKPOINT_FORMAT
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with deferred_interrupt():
            replace_atomically(
                self.path, self.path.with_suffix(".tmp"), lambda fh: torch.save(payload, fh)
            )

    def read(self) -> dict[str, Any]:
        """The payload, or ``ValueError`` naming the file and what is wrong with it."""
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(
                f"cannot read checkpoint {self.path} ({type(exc).__name__}: {detail[:300]})"
            ) from exc
        needed = {"state", "x", "buffers", "optimizer", "estimator_rng", "mask"}
        if isinstance(payload, dict) and "config" not in payload:
            needed.add("recipe")  # format 3 (format 2: "config")
        if not isinstance(payload, dict) or needed - set(payload):
            missing = sorted(needed - set(payload)) if isinstance(payload, dict) else "all"
            raise ValueError(
                f"cannot read checkpoint {self.path} (not a zoopt checkpoint: missing {missing})"
            )
        return payload

    def restore(self, trainer: TrainerView) -> bool:
        """Load the checkpoint into ``trainer`` if there is one; whether there was."""
        if not self.path.exists():
            print(f"zoopt train: no checkpoint in {self.path.parent}; starting from scratch")
            return False
        trainer.load_payload(self.read(), source=str(self.path))
        print(
            f"zoopt train: resumed from {self.path} at epoch {trainer.state.epoch}, "
            f"step {trainer.state.step_in_epoch}"
        )
        return True


class MetricsLog(Callback):
    """``metrics.jsonl``: one JSON object per epoch.

    Rewritten from the trainer's history when training starts, so after a resume it holds
    exactly the epochs the checkpoint counts (a row written just before an interrupt, for an
    epoch the checkpoint does not count, never repeats).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_start(self, trainer: TrainerView) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row) + "\n" for row in trainer.state.history)
        replace_atomically(
            self.path, self.path.with_suffix(".jsonl.tmp"), lambda fh: fh.write(text.encode())
        )

    def on_epoch(self, trainer: TrainerView, row: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


class SummaryFile(Callback):
    """``summary.json``: the run's outcome (:meth:`Trainer.summary`) whenever it stops."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_stop(self, trainer: TrainerView, why: str | None) -> None:
        stopped = why if why in ("interrupted", "query budget exhausted") else None
        summary = trainer.summary(stopped=stopped)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(summary, indent=2)
        # a full disk must not leave a truncated summary in place of the last good one
        replace_atomically(
            self.path, self.path.with_suffix(".json.tmp"), lambda fh: fh.write(text.encode())
        )


class CurvePlot(Callback):
    """``curves.png``: train/test loss and the test metric per epoch (matplotlib, Agg)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def after_epoch(self, trainer: TrainerView, row: dict[str, Any]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = trainer.state.history
        epochs = [h["epoch"] for h in hist]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        axes[0].plot(epochs, [h["train_loss"] for h in hist], marker="o", label="train loss")
        if "test_loss" in hist[-1]:
            axes[0].plot(epochs, [h["test_loss"] for h in hist], marker="s", label="test loss")
        axes[0].set_xlabel("epoch")
        axes[0].legend()
        metric = next((k for k in hist[-1] if k.startswith("test_") and k != "test_loss"), None)
        if metric is not None:
            axes[1].plot(epochs, [h[metric] for h in hist], marker="o", color="C2")
            axes[1].set_ylabel(metric)
        axes[1].set_xlabel("epoch")
        cfg = trainer.config
        fig.suptitle(f"{cfg.method} (sparsity {cfg.sparsity:g})")
        fig.tight_layout()
        fig.savefig(self.path, dpi=100)
        plt.close(fig)


class Progress(Callback):
    """A tqdm progress bar over all steps: loss, last test accuracy, queries per second."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_start(self, trainer: TrainerView) -> None:
        from tqdm.auto import tqdm

        total = trainer.config.epochs * trainer.steps_per_epoch
        done = trainer.state.epoch * trainer.steps_per_epoch + trainer.state.step_in_epoch
        self.bar = tqdm(
            total=total,
            initial=done,
            desc=f"train[{trainer.config.method}]",
            unit="step",
            mininterval=1.0,
        )

    def on_step(self, trainer: TrainerView, loss: float, queries: int) -> None:
        if self.bar is None:
            return
        st = trainer.state
        last = st.history[-1] if st.history else {}
        elapsed = trainer.epoch_elapsed()
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{loss:.4f}",
            acc=f"{last.get('test_accuracy', float('nan')):.4f}",
            qps=f"{st.epoch_queries / max(elapsed, 1e-9):.0f}",
            refresh=False,
        )

    def on_stop(self, trainer: TrainerView, why: str | None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class QueryBudget(Callback):
    """Stop (with a checkpoint) before a step would take the run past ``max_queries``."""

    def __init__(self, max_queries: int):
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(f"max_queries must be a positive integer, got {max_queries!r}")
        self.max_queries = max_queries

    def before_step(self, trainer: TrainerView) -> None:
        need = trainer.queries_next_step()
        # the one budget rule (zoopt.oracle.Budget) on the run's count, kept across resumes
        if not Budget(self.max_queries, spent=trainer.state.queries).fits(need):
            raise BudgetExceeded(trainer.state.queries, self.max_queries, None, math.nan)


def default_callbacks(
    config: RunRecipe, out_dir: str | os.PathLike, extra_summary: dict[str, Any] | None = None
) -> list[Callback]:
    """What ``zoopt train`` writes into ``out_dir``, as callbacks, in the order they run.

    ``out_dir`` is checked (:func:`check_out_dir`) and created first: a folder the run
    could not write fails here, before any training.
    """
    out = check_out_dir(out_dir)
    callbacks: list[Callback] = [
        Checkpoint(out / "checkpoint.pt", every=config.checkpoint_every),
        MetricsLog(out / "metrics.jsonl"),
        SummaryFile(out / "summary.json"),
    ]
    if config.plots:
        callbacks.append(CurvePlot(out / "curves.png"))
    if config.progress:
        callbacks.append(Progress())
    if config.max_queries is not None:
        callbacks.append(QueryBudget(config.max_queries))
    return callbacks


def tensors(state: dict[str, Any]) -> dict[str, Any]:
    """numpy arrays in a (flat) state dict as tensors, so it loads with weights_only=True."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}


#: the files :func:`default_callbacks` write into the output folder (and their temporaries)
OUTPUT_FILES = (
    "checkpoint.pt",
    "checkpoint.tmp",
    "metrics.jsonl",
    "metrics.jsonl.tmp",
    "summary.json",
    "summary.json.tmp",
    "curves.png",
)


def check_out_dir(out_dir: str | os.PathLike, label: str = "output folder") -> Path:
    """Create ``out_dir`` if needed and check that a run can write its files there; returns
    it as a ``Path``. Called before training, so that a run never ends in results it cannot
    save.

    Raises:
        OSError: (the same kind as the system's, e.g. ``PermissionError``, with ``errno``)
            naming ``label`` and the path: ``out_dir`` is a file, lies under a file, cannot
            be created or written to, or one of :data:`OUTPUT_FILES` is a folder there.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{label} {str(out)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = exc.strerror
        blocker = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
        if blocker is not None:
            why = f"{str(blocker)!r} is a file, not a folder"
        raise type(exc)(exc.errno, f"{label} {str(out)!r}: cannot create it ({why})") from exc
    for name in OUTPUT_FILES:
        if (out / name).is_dir():
            raise IsADirectoryError(
                errno.EISDIR,
                f"{label} {str(out)!r}: {name} there is a folder, where the run writes a file",
            )
    probe = None
    try:  # a real write: permission bits, read-only file systems, a full disk, root
        fd, probe = tempfile.mkstemp(prefix=".zoopt-write-test-", dir=out)
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"ok")
    except OSError as exc:
        raise type(exc)(
            exc.errno, f"{label} {str(out)!r} is not writable ({exc.strerror})"
        ) from exc
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    return out


def replace_atomically(path: Path, tmp: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``tmp``: ``write(file)`` fills ``tmp``, which then replaces
    ``path``. If anything fails (a full disk, a permission, an interrupt), ``path`` is as it
    was and ``tmp`` is removed; a failed write is an ``OSError`` naming ``path``.
    """
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(exc, OSError | RuntimeError):
            raise  # an interrupt, or a bug: as it is
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__  # torch reports a failed write as a RuntimeError
        if isinstance(cause, OSError):
            detail = cause.strerror or _first_line(cause)
            raise type(cause)(cause.errno, f"cannot write {path} ({detail})") from exc
        if "inline_container" in str(exc):  # torch's writer failed without an OSError
            raise OSError(f"cannot write {path} ({_first_line(exc)})") from exc
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
