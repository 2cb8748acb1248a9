"""ParamView round trips and the staged models (zoopt.torch.params, zoopt.torch.models)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from zoopt.torch.models import (  # noqa: E402
    CNN8,
    BasicBlock,
    ResNet20,
    SmallCNN,
    build_model,
    stages_of,
)
from zoopt.torch.params import ParamView, preserved_buffers  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _mlp(widths: list[int], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers.append(nn.Linear(a, b))
        if batch_norm:
            layers.append(nn.BatchNorm1d(b))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    batch_norm=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_flatten_assign_round_trip(widths, batch_norm, seed):
    torch.manual_seed(seed)
    net = _mlp(widths, batch_norm).double()
    view = ParamView(net)
    # groups tile [0, dim) in order and match the parameter shapes
    assert view.groups[0].start == 0 and view.groups[-1].stop == view.dim
    for g, h in zip(view.groups[:-1], view.groups[1:], strict=True):
        assert g.stop == h.start
    assert view.dim == sum(p.numel() for p in net.parameters())
    assert [g.shape for g in view.groups] == [tuple(p.shape) for p in net.parameters()]
    new = torch.randn(view.dim, dtype=torch.float64)
    view.assign(new)
    assert torch.equal(view.flatten(), new)
    for g, p in zip(view.groups, net.parameters(), strict=True):
        assert torch.equal(p.detach().reshape(-1), new[g.start : g.stop])
    # kinds: linear weights are prunable; biases and BatchNorm parameters are not
    for g in view.groups:
        assert g.kind == ("weight" if g.name.endswith("weight") and len(g.shape) == 2 else "other")
    # group_of agrees with the slices
    rng = np.random.default_rng(seed)
    for i in rng.integers(0, view.dim, size=10):
        g = view.group_of(int(i))
        assert g.start <= i < g.stop


def test_flatten_is_a_copy_with_same_dtype_and_device():
    net = nn.Linear(3, 2)
    view = ParamView(net)
    flat = view.flatten()
    assert flat.dtype == net.weight.dtype and flat.device == net.weight.device
    flat += 1.0
    assert not torch.equal(view.flatten(), flat)


def test_loaded_restores_parameters():
    net = nn.Linear(3, 2)
    view = ParamView(net)
    before = view.flatten()
    with view.loaded(torch.zeros(view.dim)):
        assert float(view.flatten().abs().sum()) == 0.0
    assert torch.equal(view.flatten(), before)


def test_frozen_parameters_are_excluded():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)
    view = ParamView(net)
    assert [g.name for g in view.groups] == ["0.bias", "1.weight", "1.bias"]
    assert view.dim == 4 + 8 + 2


def test_conv_and_batchnorm_kinds():
    view = ParamView(SmallCNN())
    kinds = {g.name: g.kind for g in view.groups}
    assert kinds["body.0.0.weight"] == "weight"  # conv
    assert kinds["body.0.1.weight"] == "other"  # BatchNorm gamma
    assert kinds["body.2.1.weight"] == "weight"  # linear
    assert kinds["body.2.1.bias"] == "other"
    assert int(view.mask("weight").sum()) + int(view.mask("other").sum()) == view.dim


def test_bad_input_errors():
    view = ParamView(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        view.assign(torch.zeros(7))
    with pytest.raises(TypeError, match="torch tensor"):
        view.assign([0.0] * 8)
    with pytest.raises(TypeError, match="floating"):
        view.assign(torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="out of range"):
        view.group_of(8)
    with pytest.raises(ValueError, match="out of range"):
        view.group_of(-1)
    with pytest.raises(TypeError, match="integer"):
        view.group_of(1.5)
    with pytest.raises(ValueError, match="kind"):
        view.mask("bias")
    with pytest.raises(ValueError, match="no trainable"):
        ParamView(nn.ReLU())
    with pytest.raises(TypeError):
        ParamView("not a module")


def test_preserved_buffers_restores_running_stats():
    bn = nn.BatchNorm1d(3).train()
    before = [b.clone() for b in bn.buffers()]
    with preserved_buffers(bn):
        bn(torch.randn(8, 3))
        assert not torch.equal(bn.running_mean, before[0])
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers(), strict=True))


# -- models ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "shape", "classes"),
    [
        (SmallCNN(), (3, 1, 8, 8), 10),
        (ResNet20(), (2, 3, 32, 32), 10),
        (ResNet20(shortcut="B"), (2, 3, 16, 16), 10),
        (CNN8(4), (2, 3, 32, 32), 10),
        (CNN8(4, batch_norm=False, image_size=16), (2, 3, 16, 16), 10),
        (build_model("resnet20", num_classes=7, in_channels=1), (2, 1, 16, 16), 7),
        (build_model("smallcnn", num_classes=3, in_channels=2, image_size=7), (2, 2, 7, 7), 3),
    ],
)
def test_forward_shapes_and_stages_compose(model, shape, classes):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model.eval()  # composing stages twice must see the same BatchNorm statistics
    with torch.no_grad():
        out = model(x)
        h = x
        for stage in stages_of(model):
            h = stage(h)
    assert out.shape == (shape[0], classes)
    assert torch.equal(h, out)


def test_parameter_counts():
    assert ParamView(SmallCNN()).dim == 3842
    assert ParamView(ResNet20()).dim == 269_722  # He et al.: 0.27M
    dims = [ParamView(CNN8(w)).dim for w in (4, 8, 16)]
    assert dims[0] < dims[1] < dims[2]
    assert 3.5 < dims[2] / dims[1] < 4.5  # quadratic growth in the width


def test_resnet20_stages_are_stem_blocks_head():
    model = ResNet20()
    stages = model.stages()
    assert len(stages) == 11
    assert all(isinstance(s, BasicBlock) for s in stages[1:10])
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convs == 19  # stem + 9 blocks x 2 (option A: no shortcut convs)
    assert sum(isinstance(m, nn.Conv2d) for m in ResNet20(shortcut="B").modules()) == 21


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg")
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model("cnn8", image_size=12)
    with pytest.raises(ValueError, match="shortcut"):
        ResNet20(shortcut="C")
    with pytest.raises(ValueError, match="positive"):
        SmallCNN(num_classes=0)
    with pytest.raises(TypeError, match="bad options"):
        build_model("smallcnn", width=3)
