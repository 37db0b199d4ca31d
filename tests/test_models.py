"""SpineNet: every family x norm x drop builds and trains; heads, points, summary, receptive field."""

import itertools
import json
import warnings

import pytest
import torch

from lit_spine.commands.describe import main
from lit_spine.models import SpineNet
from lit_spine.models.backbones import FAMILIES, backbone_family
from lit_spine.models.drops import DROPS
from lit_spine.models.norms import NORMS
from lit_spine.models.summary import describe, receptive_field

FAST_BACKBONES = ["test_resnet", "test_efficientnet", "test_convnext"]
FAMILY_BACKBONES = [
    "resnet18",
    "resnet18d",
    "resnext50_32x4d",
    "seresnext26d_32x4d",
    "resnest14d",
    "densenet121",
    "efficientnet_b0",
    "tf_efficientnetv2_b0",
    "mobilenetv3_small_100",
    "convnext_atto",
    "regnetx_002",
]


# test_efficientnet's blocks all change their channel count: none has a skip connection.
NO_RESIDUAL_BLOCKS = {"test_efficientnet"}


def _rejected(backbone: str, norm: str, drop: str) -> str | None:
    """Why a combination must fail at construction (None when it must work)."""
    family = FAMILIES[backbone_family(backbone)]
    if drop == "stochastic_depth" and (not family.residual or backbone in NO_RESIDUAL_BLOCKS):
        return "needs residual blocks"
    if norm in family.unsupported_norms:
        return "does not fit backbone"
    return None


def _build_and_step(backbone: str, norm: str, drop: str, head: str = "deconv") -> None:
    kwargs = dict(
        backbone=backbone,
        norm=norm,
        drop=drop,
        head=head,
        head_channels=16,
        class_features=8,
        norm_group_size=8 if norm == "groupnorm" else None,
    )
    reason = _rejected(backbone, norm, drop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frozen_batchnorm without pretrained weights warns
        if reason:
            with pytest.raises(ValueError, match=reason):
                SpineNet(**kwargs)
            return
        net = SpineNet(**kwargs)
    out = net(torch.randn(2, 1, 64, 64))
    assert out["heatmaps"].shape == (2, 11, 16, 16)
    assert out["vertebra_logits"].shape == (2, 5, 2) and out["disc_logits"].shape == (2, 6, 5)
    (out["heatmaps"].mean() + out["vertebra_logits"].mean() + out["disc_logits"].mean()).backward()
    if norm != "batchnorm":
        assert not any(type(m).__name__ in ("BatchNorm2d", "BatchNormAct2d") for m in net.modules())


@pytest.mark.parametrize("drop", list(DROPS))
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("backbone", FAST_BACKBONES)
def test_tiny_backbone_norm_drop_forward_backward(backbone, norm, drop):
    _build_and_step(backbone, norm, drop)


# Every real family x norm x drop: ~75 s in all on the 2-core machine, so in the fast suite.
@pytest.mark.parametrize(
    ("backbone", "norm", "drop"), list(itertools.product(FAMILY_BACKBONES, NORMS, DROPS))
)
def test_family_norm_drop_forward_backward(backbone, norm, drop):
    _build_and_step(backbone, norm, drop)


@pytest.mark.parametrize("head", ["deconv", "fpn"])
@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_heads_reach_every_stride(head, stride):
    net = SpineNet("test_resnet", head=head, heatmap_stride=stride, head_channels=16)
    assert net(torch.randn(1, 1, 64, 64))["heatmaps"].shape[-1] == 64 // stride


def test_family_representatives_build():
    for backbone in ["resnet18", "densenet121", "mobilenetv3_small_100", "regnetx_002"]:
        SpineNet(backbone, head_channels=16)(torch.randn(1, 1, 64, 64))


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="did you mean 'dropblock'"):
        SpineNet("test_resnet", drop="drop_block")
    with pytest.raises(ValueError, match="does not support"):
        SpineNet("test_vit")
    with pytest.raises(ValueError, match="heatmap_stride"):
        SpineNet("test_resnet", heatmap_stride=3)
    with pytest.raises(ValueError, match="multiple of"):
        SpineNet("test_resnet")(torch.randn(1, 1, 60, 64))


def test_classifier_reads_features_at_given_points():
    torch.manual_seed(0)
    net = SpineNet("test_resnet", head_channels=16, vocab="seed7").eval()
    x = torch.randn(1, 1, 64, 64)
    points = torch.full((1, 11, 2), 20.0)
    moved = points.clone()
    moved[0, 3] = 50.0  # L2 (a vertebra, row 1 of the vertebra logits)
    with torch.no_grad():
        a, b = net(x, points), net(x, moved)
    assert a["disc_logits"].shape == (1, 6, 7)
    torch.testing.assert_close(a["disc_logits"], b["disc_logits"])
    assert not torch.allclose(a["vertebra_logits"][0, 1], b["vertebra_logits"][0, 1])
    torch.testing.assert_close(a["vertebra_logits"][0, 0], b["vertebra_logits"][0, 0])


def test_points_decoded_from_heatmaps_by_argmax():
    net = SpineNet("test_resnet", head_channels=16, heatmap_stride=4).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 64, 64))
    heat = out["heatmaps"][0, 0]
    row, col = divmod(int(heat.argmax()), heat.shape[-1])
    assert out["points"][0, 0].tolist() == [col * 4 + 1.5, row * 4 + 1.5]


def test_param_groups_exclude_norms_and_biases():
    net = SpineNet("test_resnet", norm="groupnorm", norm_group_size=8, head_channels=16)
    groups = {g["name"]: g for g in net.param_groups(1e-4)}
    assert groups["decay"]["weight_decay"] == 1e-4
    assert groups["norm"]["weight_decay"] == 0.0 and groups["bias"]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in groups["decay"]["params"])
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in net.parameters())


def test_receptive_field_matches_brute_force_gradient():
    torch.manual_seed(0)
    net = SpineNet("test_convnext", norm="layernorm2d", head_channels=16).eval().double()
    for level in (0, 1):

        def features(x, level=level):
            return net.backbone(x)[level]

        x = torch.randn(1, 1, 256, 256, dtype=torch.double, requires_grad=True)
        analytic = receptive_field(features, x.detach())
        out = features(x)
        out[0, :, out.shape[-2] // 2, out.shape[-1] // 2].sum().backward()
        touched = x.grad[0, 0] != 0
        rows = touched.any(1).nonzero().flatten()
        cols = touched.any(0).nonzero().flatten()
        assert rows.min() > 0 and rows.max() < 255  # fully inside the image
        brute = (int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1))
        assert analytic["size"] == brute
        assert analytic["jump"] == (4.0 * 2**level,) * 2


def test_receptive_field_of_heatmaps_grows_through_deconv_head():
    net = SpineNet("test_resnet", head_channels=16, heatmap_stride=4)
    info = describe(net, 64)
    assert info["receptive_field"]["jump"] == (4.0, 4.0)
    backbone_rf = receptive_field(lambda x: net.backbone(x)[-1], torch.zeros(1, 1, 64, 64))
    # three 4x4 stride-2 transposed convs add one input tap each: 32 + 16 + 8 pixels
    assert info["receptive_field"]["size"][0] == backbone_rf["size"][0] + 56


def test_describe_cli(capsys):
    assert (
        main(
            [
                "--backbone",
                "test_resnet",
                "--norm",
                "groupnorm",
                "--norm-group-size",
                "8",
                "--drop",
                "dropblock",
                "--image-size",
                "64",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "receptive field" in text and "ScheduledDropBlock2d x2" in text and "GroupNorm" in text
    assert main(["--backbone", "test_resnet", "--image-size", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] > 0 and info["flops"] > 0 and info["norm_counts"]
    assert main(["--backbone", "densenet121", "--drop", "stochastic_depth"]) == 2


def test_describe_reads_lightning_config(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model:\n  net:\n    class_path: lit_spine.models.SpineNet\n"
        "    init_args:\n      backbone: test_efficientnet\n      norm: layernorm\n"
    )
    assert main(["--config", str(config), "--image-size", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backbone"] == "test_efficientnet" and info["norm"] == "layernorm"
