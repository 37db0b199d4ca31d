"""Drop layers measured statistically: rates in training, identity in eval."""

import warnings

import pytest
import torch

from lit_spine.models import SpineNet
from lit_spine.models.drops import ScheduledDropBlock2d, stochastic_depth_rates


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_dropblock_drops_configured_fraction_and_eval_is_identity(rate):
    torch.manual_seed(0)
    layer = ScheduledDropBlock2d(rate, block_size=5)
    x = torch.ones(64, 4, 64, 64)
    dropped = (layer.train()(x) == 0).float()
    assert abs(dropped.mean().item() - rate) < 0.2 * rate
    assert torch.equal(dropped[:, 0], dropped[:, 3])  # one mask shared by all channels
    assert torch.equal(layer.eval()(x), x)


def test_dropblock_warmup_schedule():
    net = SpineNet("test_resnet", drop="dropblock", drop_rate=0.2, head_channels=16)
    layers = [m for m in net.modules() if isinstance(m, ScheduledDropBlock2d)]
    assert len(layers) == 2
    net.set_drop_schedule(0.25)
    assert all(abs(m.drop_prob - 0.05) < 1e-9 for m in layers)
    net.set_drop_schedule(3.0)
    assert all(abs(m.drop_prob - 0.2) < 1e-9 for m in layers)


def test_stochastic_depth_rules():
    assert stochastic_depth_rates(4, 0.5, "linear") == [0.125, 0.25, 0.375, 0.5]
    assert stochastic_depth_rates(3, 0.2, "uniform") == [0.2, 0.2, 0.2]


@pytest.mark.parametrize("rule", ["linear", "uniform"])
def test_stochastic_depth_drops_blocks_at_their_rates(rule):
    torch.manual_seed(0)
    net = SpineNet(
        "test_resnet",
        drop="stochastic_depth",
        drop_rate=0.5,
        stochastic_depth_rule=rule,
        head_channels=16,
    )
    for m in net.modules():  # undo timm's zero-init of the last norm: branches must be non-zero
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    expected = list(net.stochastic_depth.values())
    blocks = [net.backbone.get_submodule(p) for p in net.stochastic_depth]
    counts = [0] * len(blocks)
    seen = 0

    def hook(index):
        def record(module, inputs, output):
            counts[index] += int((output.flatten(1).abs().sum(1) == 0).sum())

        return record

    for i, block in enumerate(blocks):
        block.drop_path.register_forward_hook(hook(i))
    net.backbone.train()
    x = torch.randn(64, 1, 32, 32)
    with torch.no_grad():
        for _ in range(8):
            net.backbone(x)
            seen += 64
    measured = [c / seen for c in counts]
    for m, e in zip(measured, expected):
        assert abs(m - e) < 0.08, (measured, expected)
    net.eval()
    with torch.no_grad():
        a, b = net.backbone(x), net.backbone(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_stochastic_depth_on_densenet_fails_at_construction():
    with pytest.raises(ValueError, match="needs residual blocks"):
        SpineNet("densenet121", drop="stochastic_depth")


def test_dropblock_stages_validated():
    with pytest.raises(ValueError, match="outside the 5 feature levels"):
        SpineNet("test_resnet", drop="dropblock", dropblock_stages=[5])


@pytest.mark.parametrize("drop", ["dropout", "spatial_dropout"])
def test_head_dropouts_are_identity_in_eval(drop):
    with warnings.catch_warnings():
        net = SpineNet("test_resnet", drop=drop, drop_rate=0.5, head_channels=16).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x)["heatmaps"], net(x)["heatmaps"])
    assert (
        type(net.head_drop).__name__ == {"dropout": "Dropout", "spatial_dropout": "Dropout2d"}[drop]
    )
