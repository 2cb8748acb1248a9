"""A Ctrl-C is never lost: held through commits, and latched when Python drops it."""

from __future__ import annotations

import os
import signal

import pytest

from zoopt.interrupts import deferred_interrupt, latched_interrupts


class _InterruptInFinalizer:
    """Sends this process a Ctrl-C from ``__del__`` and keeps running bytecode there, so the
    ``KeyboardInterrupt`` is raised inside the finalizer, where Python prints "Exception
    ignored in ..." and drops it (as for an abandoned generator closed by the collector)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):
            pass


@pytest.fixture
def python_ctrl_c():
    # a CI shell without job control may start us with SIGINT ignored: give Python's own
    # handler, as in a terminal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _drop_one_interrupt():
    _InterruptInFinalizer()  # freed at once: the finalizer runs here


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_python_drops_an_interrupt_raised_in_a_finalizer_and_the_latch_keeps_it(python_ctrl_c):
    _drop_one_interrupt()  # without the latch: nothing happens (the premise of the latch)
    with latched_interrupts() as latch:
        _drop_one_interrupt()
        assert latch.requested
        with pytest.raises(KeyboardInterrupt):
            latch.check()
        latch.check()  # acted on once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_interrupt_is_latched_and_raised_after_the_block(python_ctrl_c):
    with latched_interrupts() as latch:
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupt():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(10_000):
                    pass
                done = True  # the block ran to its end
        assert done and latch.requested


def test_a_users_own_handler_is_left_alone():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda *a: seen.append(a))
    try:
        with latched_interrupts() as latch:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):
                pass
        assert seen and not latch.requested
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_trainer_stops_at_the_next_step_when_python_drops_the_interrupt(
    python_ctrl_c, tmp_path
):
    torch = pytest.importorskip("torch")
    from zoopt import data as zdata
    from zoopt.torch.callbacks import Callback, default_callbacks
    from zoopt.torch.models import build_model
    from zoopt.torch.tasks import ClassificationTask
    from zoopt.torch.train import TrainConfig, Trainer

    X_tr, y_tr, X_te, y_te = zdata.load_digits_split(seed=0)
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    task = ClassificationTask(
        model, (X_tr[:128], y_tr[:128]), (X_te[:50], y_te[:50]), batch_size=32
    )

    class DropsAnInterrupt(Callback):
        def on_step(self, trainer, loss, queries):
            if trainer.state.global_step == 3:
                _drop_one_interrupt()

    config = TrainConfig(
        method="cge", epochs=3, max_steps_per_epoch=4, progress=False, plots=False, seed=0
    )
    callbacks = [*default_callbacks(config, tmp_path), DropsAnInterrupt()]
    trainer = Trainer(task, config, callbacks=callbacks)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    # stopped before the 4th step, at a step boundary, with the checkpoint written there
    assert trainer.state.global_step == 3
    summary = (tmp_path / "summary.json").read_text()
    assert '"interrupted"' in summary
    assert (tmp_path / "checkpoint.pt").exists()
