"""Losses: hand-computed values, label smoothing, masking of absent points."""

import math

import pytest
import torch

from lit_spine.losses import SpineLoss, class_probabilities, heatmap_focal, sigmoid_focal


def _batch(present=None):
    labels = torch.zeros(2, 11, 5)
    labels[:, :, 0] = 1
    return {
        "heatmap": torch.zeros(2, 11, 4, 4),
        "present": torch.ones(2, 11, dtype=torch.bool) if present is None else present,
        "labels": labels,
    }


def _outputs(heat=0.0):
    return {
        "heatmaps": torch.full((2, 11, 4, 4), heat),
        "vertebra_logits": torch.zeros(2, 5, 2),
        "disc_logits": torch.zeros(2, 6, 5),
    }


def test_sigmoid_focal_hand_values():
    logit = torch.tensor([0.0])
    # p = 0.5, target 1: ce = ln 2, (1 - p_t)^2 = 0.25, alpha 0.25
    assert sigmoid_focal(logit, torch.tensor([1.0]), 2.0, 0.25).item() == pytest.approx(
        0.25 * 0.25 * math.log(2)
    )
    assert sigmoid_focal(logit, torch.tensor([0.0]), 2.0, 0.25).item() == pytest.approx(
        0.75 * 0.25 * math.log(2)
    )
    assert sigmoid_focal(logit, torch.tensor([1.0]), 0.0, None).item() == pytest.approx(math.log(2))


def test_centernet_focal_hand_value():
    logits = torch.zeros(1, 1, 1, 2)
    target = torch.tensor([[[[1.0, 0.5]]]])
    present = torch.ones(1, 1, dtype=torch.bool)
    # peak: (1 - .5)^2 ln 2; other: (1 - .5)^4 .5^2 ln 2; one peak
    expected = 0.25 * math.log(2) + 0.0625 * 0.25 * math.log(2)
    assert heatmap_focal(logits, target, present).item() == pytest.approx(expected)


def test_mse_and_absent_points_masked():
    batch = _batch()
    batch["heatmap"][:, 0] = 1.0
    present = torch.ones(2, 11, dtype=torch.bool)
    present[:, 0] = False
    loss = SpineLoss(class_weight=0.0)
    assert loss(_outputs(), {**batch, "present": present})["heatmap"].item() == 0.0
    # squared error summed over the 4x4 map of point 0 (16), averaged over the 11 points
    assert loss(_outputs(), batch)["heatmap"].item() == pytest.approx(16 / 11)


def test_bce_with_label_smoothing_hand_value():
    out = SpineLoss(heatmap_weight=0.0, label_smoothing=0.2)(_outputs(), _batch())
    # logits 0: every code costs ln 2 whatever the (smoothed) target; 2 + 5 codes per type
    assert out["cls"].item() == pytest.approx(2 * math.log(2) + 5 * math.log(2))
    assert out["loss"].item() == pytest.approx(out["cls"].item())


def test_softmax_ce_label_smoothing_and_normalised_multi_hot():
    loss = SpineLoss(heatmap_weight=0.0, class_loss="ce", multi_label=False, label_smoothing=0.1)
    outputs = _outputs()
    outputs["vertebra_logits"][..., 0] = 2.0
    log_p = torch.log_softmax(torch.tensor([2.0, 0.0]), 0)
    vertebra = -(0.95 * log_p[0] + 0.05 * log_p[1])
    assert loss(outputs, _batch())["cls"].item() == pytest.approx(vertebra.item() + math.log(5))
    batch = _batch()
    batch["labels"][:, :, 4] = 1  # disc v1 + v5: target 1/2, 1/2
    plain = SpineLoss(heatmap_weight=0.0, class_loss="ce", multi_label=False)
    assert plain(_outputs(), batch)["cls"].item() == pytest.approx(math.log(2) + math.log(5))


def test_probabilities_match_loss_kind():
    outputs = _outputs()
    assert class_probabilities(outputs, True)["disc"].eq(0.5).all()
    assert class_probabilities(outputs, False)["disc"].sum(-1).allclose(torch.ones(2, 6))


def test_bad_choices():
    with pytest.raises(ValueError, match="did you mean 'focal'"):
        SpineLoss(class_loss="focall")
    with pytest.raises(ValueError, match="multi_label"):
        SpineLoss(class_loss="bce", multi_label=False)
