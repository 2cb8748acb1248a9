"""DnCNN: layout of the paper (and of the denoised-smoothing checkpoints), shapes, residual form."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from oracles.dncnn import DnCNN


def expected_parameter_count(channels: int, depth: int, features: int, k: int = 3) -> int:
    first = channels * features * k * k + features  # conv with bias
    middle = (depth - 2) * (features * features * k * k + 2 * features)  # conv + BN affine
    last = features * channels * k * k  # conv without bias
    return first + middle + last


def test_default_is_the_17_layer_64_channel_dncnn():
    model = DnCNN()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 17 and len(norms) == 15
    assert convs[0].in_channels == 3 and convs[-1].out_channels == 3
    assert all(c.out_channels == 64 for c in convs[:-1])
    assert convs[0].bias is not None and all(c.bias is None for c in convs[1:])
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(3, 17, 64)
    # denoised-smoothing key layout: one Sequential named dncnn
    keys = list(model.state_dict())
    assert keys[:3] == ["dncnn.0.weight", "dncnn.0.bias", "dncnn.2.weight"]
    assert keys[-1] == "dncnn.47.weight"  # 2 + 15 * 3 layers before it


@settings(max_examples=15, deadline=None)
@given(
    channels=st.integers(1, 4),
    depth=st.integers(2, 5),
    features=st.integers(1, 8),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
)
def test_output_has_the_input_shape(channels, depth, features, height, width):
    model = DnCNN(channels, depth=depth, features=features).eval()
    x = torch.rand(2, channels, height, width)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(
        channels, depth, features
    )


def test_forward_is_input_minus_noise_estimate():
    torch.manual_seed(0)
    model = DnCNN(3, depth=5, features=8).eval()
    x = torch.rand(4, 3, 10, 10)
    with torch.no_grad():
        assert torch.allclose(model(x), x - model.dncnn(x))
        assert not torch.allclose(model(x), x)  # the random network does change its input
        nn.init.zeros_(model.dncnn[-1].weight)  # no noise estimated -> identity
        assert torch.equal(model(x), x)


def test_gradients_reach_every_parameter():
    model = DnCNN(1, depth=4, features=4).train()
    x = torch.rand(3, 1, 6, 6)
    ((model(x) - x) ** 2 + model(x).abs()).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs",
    [{"depth": 1}, {"channels": 0}, {"features": -1}, {"kernel_size": 4}, {"depth": 3.0}],
)
def test_rejects_bad_configuration(kwargs):
    with pytest.raises(ValueError):
        DnCNN(**kwargs)


def test_rejects_images_with_the_wrong_channel_count():
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\)"):
        DnCNN(3, depth=3, features=4)(torch.rand(1, 1, 8, 8))
