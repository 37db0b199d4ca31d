"""Norm resolver and norm swap: no BatchNorm left, fused activations kept, clear group errors."""

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from lit_spine.models.norms import NORMS, find_norms, make_norm, swap_norms


def _batchnorm_like(m: nn.Module) -> bool:
    return "BatchNorm" in type(m).__name__


@pytest.mark.parametrize("norm", ["groupnorm", "layernorm", "layernorm2d", "instancenorm"])
@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet"])
def test_swap_leaves_no_batchnorm_and_keeps_activations(backbone, norm):
    model = timm.create_model(backbone, features_only=True, in_chans=1)
    acts_before = {p: type(m.act) for p, m in find_norms(model).items() if hasattr(m, "act")}
    assert acts_before or backbone == "test_resnet"
    swap_norms(model, norm, groups=8)
    assert not [m for m in model.modules() if _batchnorm_like(m)]
    after = find_norms(model)
    assert {p: type(after[p].act) for p in acts_before} == acts_before
    model(torch.randn(2, 1, 64, 64)).pop().sum().backward()  # InstanceNorm needs > 1x1 maps


def test_layernorm_is_groupnorm_over_chw_and_layernorm2d_channels_only():
    x = torch.randn(2, 8, 5, 5)
    ln = make_norm("layernorm", 8)
    assert isinstance(ln, nn.GroupNorm) and ln.num_groups == 1
    torch.testing.assert_close(ln(x).mean((1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    ln2d = make_norm("layernorm2d", 8)
    torch.testing.assert_close(ln2d(x).mean(1), torch.zeros(2, 5, 5), atol=1e-5, rtol=0)


def test_frozen_batchnorm_has_no_trainable_params_and_uses_running_stats():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), BatchNormAct2d(4))
    model[1].running_mean.fill_(2.0)
    model = swap_norms(model, "frozen_batchnorm")
    norms = find_norms(model)
    assert all("Frozen" in type(m).__name__ for m in norms.values())
    assert not any(p.requires_grad for m in norms.values() for p in m.parameters())
    assert isinstance(norms["2"].act, nn.ReLU)
    x = torch.randn(3, 4, 6, 6)
    expected = (x - 2.0) / torch.sqrt(torch.tensor(1.0 + 1e-5))
    torch.testing.assert_close(norms["1"].train()(x), expected)  # same in train mode


def test_swap_to_batchnorm_on_convnext_layernorms():
    model = timm.create_model("test_convnext", features_only=True, conv_mlp=True)
    swap_norms(model, "batchnorm")
    assert {type(m).__name__ for m in find_norms(model).values()} == {"BatchNorm2d"}


def test_channels_last_layernorm_is_rejected():
    model = timm.create_model("test_convnext", features_only=True)  # conv_mlp=False: NHWC norms
    with pytest.raises(ValueError, match="channels-last"):
        swap_norms(model, "groupnorm")


def test_group_errors_name_layers_and_suggest_sizes():
    model = nn.Sequential(nn.BatchNorm2d(32), nn.BatchNorm2d(24))
    with pytest.raises(ValueError, match=r"1\.? \(24 ch\).*multiple of 8"):
        swap_norms(model, "groupnorm", groups=32)
    swapped = swap_norms(model, "groupnorm", group_size=8)
    assert [m.num_groups for m in swapped] == [4, 3]


def test_misspelled_norm_names_closest():
    with pytest.raises(ValueError, match="did you mean 'groupnorm'"):
        make_norm("grupnorm", 8)


def test_every_norm_builds_plain_and_fused():
    for name in NORMS:
        assert make_norm(name, 16, groups=4)(torch.randn(2, 16, 4, 4)).shape == (2, 16, 4, 4)
        fused = make_norm(name, 16, act=nn.SiLU(), groups=4)
        assert isinstance(fused.act, nn.SiLU)


@pytest.mark.parametrize(
    "norm, reference",
    [
        ("groupnorm", lambda c: nn.GroupNorm(c // 4, c)),  # 4 channels per group: NCHW detour
        ("layernorm", lambda c: nn.GroupNorm(1, c)),  # one group: channels-last kernel
        ("instancenorm", lambda c: nn.InstanceNorm2d(c, affine=True)),
    ],
)
@pytest.mark.parametrize("fused", [False, True])
def test_per_sample_norms_equal_torch_in_both_layouts(norm, reference, fused):
    """The layout detour changes where the numbers live, not what they are: outputs,
    input gradients and affine gradients match torch's own layer, and channels-last input
    comes back channels-last."""
    c = 32
    ours = make_norm(norm, c, nn.Identity() if fused else None, groups=c // 4)
    ref = reference(c)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-1, 1, c))
    base = torch.randn(3, c, 7, 9) * 3 + 1
    for layout in (torch.contiguous_format, torch.channels_last):
        xs = [base.clone().to(memory_format=layout).requires_grad_() for _ in range(2)]
        ys = [m(x) for m, x in zip((ours, ref), xs, strict=True)]
        upstream = torch.randn_like(base)
        for y in ys:
            (y * upstream).sum().backward()
        torch.testing.assert_close(ys[0], ys[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-5, rtol=1e-5)
        assert ys[0].is_contiguous(memory_format=layout)
        for name in ("weight", "bias"):
            g_ours, g_ref = getattr(ours, name).grad, getattr(ref, name).grad
            torch.testing.assert_close(g_ours, g_ref, atol=1e-4, rtol=1e-5)
            g_ours.zero_(), g_ref.zero_()


@pytest.mark.parametrize("backbone", ["resnet18", "regnetx_002"])
def test_frozen_batchnorm_from_scratch_keeps_every_residual_branch_alive(backbone):
    """Without pretrained weights there are no statistics to freeze: the frozen norms are
    identity maps. timm zero-initialises the last scale of each residual block; frozen at 0
    it would make every residual branch output 0 and get no gradient, forever."""
    import warnings

    from torchvision.ops.misc import FrozenBatchNorm2d

    from lit_spine.models.net import SpineNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = SpineNet(backbone=backbone, norm="frozen_batchnorm", norm_group_size=8)
    frozen = [m for m in net.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    frozen += [m for m in net.backbone.modules() if type(m).__name__ == "FrozenBatchNormAct2d"]
    assert frozen and all(bool((m.weight == 1).all()) for m in frozen)
    net.train()
    out = net(torch.randn(2, 1, 64, 64), torch.rand(2, net.task.num_points, 2) * 63)
    sum(o.float().square().sum() for o in out.values() if torch.is_tensor(o)).backward()
    convs = [m for m in net.backbone.modules() if isinstance(m, nn.Conv2d)]
    dead = [m for m in convs if m.weight.grad is None or not m.weight.grad.any()]
    assert not dead, f"{len(dead)} of {len(convs)} convolutions get no gradient"


def test_instancenorm_refuses_a_one_pixel_map_in_training_as_torch_does():
    layer = make_norm("instancenorm", 4).train()
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        layer(torch.randn(2, 4, 1, 1))
    layer.eval()(torch.randn(2, 4, 1, 1))  # evaluation: torch allows it too
