"""The metric (docs/metric.md): a loop-by-loop reference, hand-worked cases, decoding, DDP sync."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_spine.bench import benchmark_scoring, random_case
from lit_spine.data.labels import DISC_POINTS, NUM_POINTS, POINT_INDEX, get_vocabulary
from lit_spine.data.targets import gaussian_heatmaps
from lit_spine.metrics import (
    GroundTruthArrays,
    PredictionArrays,
    SpineDetectionMetric,
    decode_heatmaps,
    score_detections,
    select_predictions,
)

VOCAB = get_vocabulary("tianchi2020")
CLS = {name: i for i, name in enumerate(VOCAB.classes)}


# ---------------------------------------------------------------------------- reference
def reference_score(gt, pred, spacing, vocab=VOCAB, radius=8.0, b_radius=6.0, radii=(2, 4, 6, 8)):
    """docs/metric.md with plain loops, written independently of the vectorised core."""
    n_cls = vocab.num_classes

    def dist(s, a, b):
        row, col = spacing[s]
        dx, dy = (a[0] - b[0]) * col, (a[1] - b[1]) * row
        return math.sqrt(dx * dx + dy * dy)

    gts = [
        (
            int(gt.study[i]),
            int(gt.point[i]),
            tuple(gt.xy[i]),
            [c for c in range(n_cls) if gt.labels[i, c]],
        )
        for i in range(len(gt.study))
    ]
    preds = [
        (
            int(pred.study[j]),
            int(pred.point[j]),
            int(pred.cls[j]),
            tuple(pred.xy[j]),
            float(pred.score[j]),
        )
        for j in range(len(pred.study))
    ]
    instances = []  # (gt row, study, class, xy), GT rows in order, labels in class order
    for i, (s, _k, xy, labels) in enumerate(gts):
        instances += [(i, s, c, xy) for c in labels]
    instances.sort(key=lambda t: t[1])  # by study, stable

    # 1. detection
    claims = {}
    status = []
    for j, (s, _k, c, xy, _score) in enumerate(preds):
        best, best_d = None, None
        for n, (_i, s2, c2, gxy) in enumerate(instances):
            if s2 == s and c2 == c:
                d = dist(s, gxy, xy)
                if d < radius and (best is None or d < best_d):
                    best, best_d = n, d
        status.append("FP" if best is None else "hit")
        if best is not None:
            claims.setdefault(best, []).append((best_d, j))
    for lst in claims.values():
        winner = min(lst)[1]
        for _, j in lst:
            status[j] = "TP" if j == winner else "ignored"
    tp = [
        sum(1 for j, p in enumerate(preds) if p[2] == c and status[j] == "TP") for c in range(n_cls)
    ]
    fp = [
        sum(1 for j, p in enumerate(preds) if p[2] == c and status[j] == "FP") for c in range(n_cls)
    ]
    n_gt = [sum(1 for t in instances if t[2] == c) for c in range(n_cls)]
    ap = []
    for c in range(n_cls):
        if n_gt[c] == 0:
            ap.append(None)
            continue
        rows = sorted(
            (j for j, p in enumerate(preds) if p[2] == c and status[j] != "ignored"),
            key=lambda j: -preds[j][4],
        )
        mrec, mpre, n_tp = [0.0], [0.0], 0
        for n, j in enumerate(rows, 1):
            n_tp += status[j] == "TP"
            mrec.append(n_tp / n_gt[c])
            mpre.append(n_tp / n)
        mrec.append(1.0)
        mpre.append(0.0)
        for n in range(len(mpre) - 2, -1, -1):
            mpre[n] = max(mpre[n], mpre[n + 1])
        ap.append(sum((mrec[n + 1] - mrec[n]) * mpre[n + 1] for n in range(len(mrec) - 1)))

    # 2. baseline: selected prediction per (study, identification)
    selected = {}
    for j, p in enumerate(preds):
        key = (p[0], p[1])
        if key not in selected or p[4] > preds[selected[key]][4]:
            selected[key] = j
    conf = [[0] * n_cls for _ in range(n_cls)]
    hit_count = 0
    dists = []
    for s, k, xy, labels in gts:
        j = selected.get((s, k))
        d = None if j is None else dist(s, xy, preds[j][3])
        dists.append((k in DISC_POINTS, d))
        label_set = (
            set()
            if j is None
            else {p[2] for p in preds if (p[0], p[1], p[3]) == (s, k, preds[j][3])}
        )
        for c in labels:
            if d is None or d >= b_radius:
                continue
            hit_count += 1
            conf[c if c in label_set else preds[j][2]][c] += 1

    def ratio(a, b):
        return a / b if b else 0.0

    f1s = []
    for c in range(n_cls):
        predicted = sum(conf[c])
        if n_gt[c] == 0 and predicted == 0:
            continue
        p_, r_ = ratio(conf[c][c], predicted), ratio(conf[c][c], n_gt[c])
        f1s.append(ratio(2 * p_ * r_, p_ + r_))
    loc = {}
    for group in ("all", "vertebra", "disc"):
        ds = [d for is_disc, d in dists if group == "all" or is_disc == (group == "disc")]
        found = [d for d in ds if d is not None]
        loc[group] = {
            "mre": sum(found) / len(found) if found else float("nan"),
            "median": float(np.median(found)) if found else float("nan"),
            "sdr": {r: ratio(sum(1 for d in found if d < r), len(ds)) for r in radii},
        }
    defined = [a for a in ap if a is not None]
    t, f, n = sum(tp), sum(fp), sum(n_gt)
    prec, rec = ratio(t, t + f), ratio(t, n)
    return {
        "tp": tp,
        "fp": fp,
        "n_gt": n_gt,
        "ap": ap,
        "map": sum(defined) / len(defined) if defined else None,
        "precision": prec,
        "recall": rec,
        "f1": ratio(2 * prec * rec, prec + rec),
        "confusion": conf,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "keypoint_recall": ratio(hit_count, n),
        "loc": loc,
    }


def assert_matches_reference(report, ref):
    for c, name in enumerate(VOCAB.classes):
        r = report.classes[name]
        assert (r.tp, r.fp, r.n_gt, r.fn) == (
            ref["tp"][c],
            ref["fp"][c],
            ref["n_gt"][c],
            ref["n_gt"][c] - ref["tp"][c],
        ), name
        if ref["ap"][c] is None:
            assert r.ap is None
        else:
            assert r.ap == pytest.approx(ref["ap"][c], abs=1e-12), name
    if ref["map"] is None:
        assert report.map is None
    else:
        assert report.map == pytest.approx(ref["map"], abs=1e-12)
    for key in ("precision", "recall", "f1", "keypoint_recall"):
        assert getattr(report, key) == pytest.approx(ref[key], abs=1e-12), key
    assert report.baseline_macro_f1 == pytest.approx(ref["macro_f1"], abs=1e-12)
    assert report.confusion.tolist() == ref["confusion"]
    for group, r in report.localisation.items():
        want = ref["loc"][group]
        assert r.mre_mm == pytest.approx(want["mre"], abs=1e-9, nan_ok=True)
        assert r.median_re_mm == pytest.approx(want["median"], abs=1e-9, nan_ok=True)
        assert list(r.sdr.values()) == pytest.approx(list(want["sdr"].values()), abs=1e-12)


def _messy_case(seed: int):
    """Small random case with duplicates, score ties, absent studies and exact-R distances."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    gt, pred, spacing = random_case(n, seed=seed)
    spacing = np.round(spacing * 8) / 8  # exact binary fractions: exact-R distances happen
    m = len(pred.study)
    dup = rng.integers(0, m, size=m // 3)
    jitter = rng.integers(-3, 4, size=(len(dup), 2)) * 4.0
    keep_pred = rng.random(m) > 0.1
    absent = rng.integers(0, n)  # one study without predictions
    keep_pred &= pred.study != absent if rng.random() < 0.5 else True
    xy = np.concatenate([np.round(pred.xy[keep_pred]), np.round(pred.xy[dup]) + jitter])
    # Some predictions exactly on the ground truth, some exactly 8 mm away along x.
    sel = np.concatenate([pred.study[keep_pred], pred.study[dup]])
    pts = np.concatenate([pred.point[keep_pred], pred.point[dup]])
    return (
        GroundTruthArrays(gt.study, gt.point, np.round(gt.xy), gt.labels),
        PredictionArrays(
            sel,
            pts,
            np.concatenate([pred.cls[keep_pred], pred.cls[dup]]),
            xy,
            np.round(np.concatenate([pred.score[keep_pred], pred.score[dup]]), 1),
        ),
        spacing,
    )


@pytest.mark.parametrize("seed", range(60))
def test_matches_bruteforce_reference(seed):
    gt, pred, spacing = _messy_case(seed)
    report = score_detections(gt, pred, spacing)
    assert_matches_reference(report, reference_score(gt, pred, spacing))


def test_matches_reference_on_a_larger_case_and_other_radii():
    gt, pred, spacing = random_case(40, seed=7)
    report = score_detections(
        gt, pred, spacing, radius_mm=5.0, baseline_radius_mm=3.0, sdr_radii_mm=(1, 3)
    )
    assert_matches_reference(
        report, reference_score(gt, pred, spacing, radius=5.0, b_radius=3.0, radii=(1, 3))
    )


# ---------------------------------------------------------------------------- hand-worked
def case(gt_points, preds, spacing=((1.0, 1.0),)):
    """gt_points: (study, identification, x, y, 'kind/code,code'); preds: (study, ident, x, y,
    class name, score)."""
    g_labels = []
    for _s, _ident, _x, _y, labels in gt_points:
        kind, codes = labels.split("/")
        row = np.zeros(VOCAB.num_classes, bool)
        row[[CLS[f"{kind}/{c}"] for c in codes.split(",")]] = True
        g_labels.append(row)
    gt = GroundTruthArrays(
        np.array([g[0] for g in gt_points], dtype=np.int64),
        np.array([POINT_INDEX[g[1]] for g in gt_points], dtype=np.int64),
        np.array([(g[2], g[3]) for g in gt_points], dtype=float).reshape(-1, 2),
        np.array(g_labels, dtype=bool).reshape(-1, VOCAB.num_classes),
    )
    pred = PredictionArrays(
        np.array([p[0] for p in preds], dtype=np.int64),
        np.array([POINT_INDEX[p[1]] for p in preds], dtype=np.int64),
        np.array([CLS[p[4]] for p in preds], dtype=np.int64),
        np.array([(p[2], p[3]) for p in preds], dtype=float).reshape(-1, 2),
        np.array([p[5] for p in preds], dtype=float),
    )
    return gt, pred, np.array(spacing, dtype=float)


def scored(gt_points, preds, spacing=((1.0, 1.0),), **options):
    """`score_detections` of the `case` built from gt_points and preds (see `case`)."""
    return score_detections(*case(gt_points, preds, spacing), **options)


def counts(report, name):
    c = report.classes[name]
    return c.tp, c.fp, c.fn


def test_multi_label_ground_truth_is_one_instance_per_label():
    r = scored([(0, "L4-L5", 100, 100, "disc/v2,v5")], [(0, "L4-L5", 101, 100, "disc/v2", 0.9)])
    assert counts(r, "disc/v2") == (1, 0, 0)
    assert counts(r, "disc/v5") == (0, 0, 1)
    assert r.classes["disc/v2"].ap == 1.0 and r.classes["disc/v5"].ap == 0.0
    assert r.map == 0.5
    # Baseline: v2 diagonal; v5 is predicted-as the selected point's label v2.
    assert r.confusion[CLS["disc/v2"], CLS["disc/v2"]] == 1
    assert r.confusion[CLS["disc/v2"], CLS["disc/v5"]] == 1
    assert r.classes["disc/v2"].baseline_precision == 0.5
    assert r.classes["disc/v5"].baseline_recall == 0.0
    # macro-F1 over v2 (P 1/2, R 1 -> F1 2/3) and v5 (0): 1/3; both instances hit.
    assert r.baseline_macro_f1 == pytest.approx(1 / 3)
    assert r.keypoint_recall == 1.0
    assert r.localisation["all"].n_points == 1 and r.localisation["all"].mre_mm == 1.0


def test_multi_label_prediction_is_one_prediction_per_label():
    # A "v2,v5" point written as two rows at the same coordinates: both labels diagonal.
    r = scored(
        [(0, "L4-L5", 100, 100, "disc/v2,v5")],
        [(0, "L4-L5", 101, 100, "disc/v5", 0.8), (0, "L4-L5", 101, 100, "disc/v2", 0.8)],
    )
    assert counts(r, "disc/v2") == (1, 0, 0) and counts(r, "disc/v5") == (1, 0, 0)
    assert r.baseline_macro_f1 == 1.0
    # A second candidate at other coordinates does not add its label to the set.
    r = scored(
        [(0, "L4-L5", 100, 100, "disc/v2,v5")],
        [(0, "L4-L5", 101, 100, "disc/v2", 0.8), (0, "L4-L5", 102, 100, "disc/v5", 0.8)],
    )
    assert r.confusion[CLS["disc/v2"], CLS["disc/v5"]] == 1  # first on the score tie wins
    assert counts(r, "disc/v5") == (1, 0, 0)  # section 1 still matches both


def test_duplicates_near_one_point_nearest_is_tp_others_ignored():
    r = scored(
        [(0, "L1", 100, 100, "vertebra/v2")],
        [
            (0, "L1", 104, 100, "vertebra/v2", 0.9),
            (0, "L1", 101, 100, "vertebra/v2", 0.5),
            (0, "L1", 99, 100, "vertebra/v2", 0.7),
        ],
    )  # tie at 1 mm: earlier row wins
    assert counts(r, "vertebra/v2") == (1, 0, 0)
    assert r.classes["vertebra/v2"].ignored == 2
    assert r.precision == 1.0 and r.classes["vertebra/v2"].ap == 1.0
    # Section 2/3 use the highest-score row (4 mm away), not the nearest.
    assert r.localisation["all"].mre_mm == 4.0


def test_prediction_hitting_two_instances_goes_to_the_nearest_only():
    # L1 and L2 both vertebra/v2, 6 px apart; one prediction between, nearer L2 -> TP for L2.
    # A second prediction nearest L2 too is ignored even though L1 is unclaimed (no rematch).
    r = scored(
        [(0, "L1", 100, 100, "vertebra/v2"), (0, "L2", 100, 106, "vertebra/v2")],
        [(0, "L1", 100, 104, "vertebra/v2", 0.9), (0, "L2", 100, 105, "vertebra/v2", 0.8)],
    )
    assert counts(r, "vertebra/v2") == (1, 0, 1)
    assert r.classes["vertebra/v2"].ignored == 1
    assert r.classes["vertebra/v2"].ap == 0.5


def test_wrong_class_inside_the_circle_is_fp():
    r = scored([(0, "L3-L4", 100, 100, "disc/v2")], [(0, "L3-L4", 100, 100, "disc/v3", 1.0)])
    assert counts(r, "disc/v3") == (0, 1, 0)
    assert counts(r, "disc/v2") == (0, 0, 1)
    assert r.classes["disc/v3"].ap is None  # no ground truth -> no AP, not in mAP
    assert r.map == 0.0 and r.precision == 0.0 and r.recall == 0.0 and r.f1 == 0.0
    # Baseline: hit, predicted-as v3 -> v2 recall 0, v3 precision 0; keypoint recall 1.
    assert r.confusion[CLS["disc/v3"], CLS["disc/v2"]] == 1
    assert r.keypoint_recall == 1.0 and r.baseline_macro_f1 == 0.0


def test_missing_predictions_and_absent_studies_only_add_fn():
    r = scored(
        [
            (0, "L1", 100, 100, "vertebra/v1"),
            (0, "L2", 100, 130, "vertebra/v1"),
            (1, "L1", 50, 50, "vertebra/v2"),
        ],
        [(0, "L1", 100, 100, "vertebra/v1", 0.6)],
        spacing=((1.0, 1.0), (0.7, 0.7)),
    )
    assert counts(r, "vertebra/v1") == (1, 0, 1) and counts(r, "vertebra/v2") == (0, 0, 1)
    assert r.classes["vertebra/v1"].ap == 0.5 and r.classes["vertebra/v2"].ap == 0.0
    assert r.map == 0.25 and r.recall == pytest.approx(1 / 3) and r.precision == 1.0
    assert r.classes["vertebra/v1"].baseline_not_hit == 1
    assert r.keypoint_recall == pytest.approx(1 / 3)
    loc = r.localisation["all"]
    assert (loc.n_points, loc.n_missing, loc.mre_mm) == (3, 2, 0.0)
    assert loc.sdr[2.0] == pytest.approx(1 / 3)


def test_missing_ground_truth_point_prediction_is_fp_and_ignored_by_baseline():
    r = scored(
        [(0, "L1", 100, 100, "vertebra/v1")],
        [(0, "L1", 100, 100, "vertebra/v1", 0.9), (0, "L5", 100, 200, "vertebra/v1", 0.95)],
    )  # no L5 in the ground truth
    assert counts(r, "vertebra/v1") == (1, 1, 0)
    assert r.classes["vertebra/v1"].ap == 0.5  # FP ranked first: precision 1/2 at recall 1
    assert r.baseline_macro_f1 == 1.0 and r.keypoint_recall == 1.0
    assert r.localisation["all"].n_points == 1


def test_distance_exactly_r_is_not_a_hit():
    # spacing 0.5 mm, 16 px along x = exactly 8.0 mm: a miss at R = 8; 15.5 px (7.75 mm): a hit.
    r = scored(
        [(0, "L1", 100, 100, "vertebra/v2"), (0, "L5", 100, 300, "vertebra/v2")],
        [(0, "L1", 116, 100, "vertebra/v2", 0.9), (0, "L5", 115.5, 300, "vertebra/v2", 0.9)],
        spacing=((0.5, 0.5),),
        radius_mm=8.0,
        baseline_radius_mm=8.0,
        sdr_radii_mm=(8.0,),
    )
    assert counts(r, "vertebra/v2") == (1, 1, 1)
    assert r.keypoint_recall == 0.5
    assert r.classes["vertebra/v2"].baseline_wrong == 1
    assert r.localisation["all"].sdr[8.0] == 0.5
    assert r.localisation["all"].mre_mm == pytest.approx((8.0 + 7.75) / 2)


def test_anisotropic_spacing_x_uses_column_y_uses_row_spacing():
    # spacing [row 0.5, col 1.0]: 10 px along x = 10 mm (miss), 10 px along y = 5 mm (hit).
    r = scored(
        [(0, "L1", 100, 100, "vertebra/v2"), (0, "L5", 100, 300, "vertebra/v2")],
        [(0, "L1", 110, 100, "vertebra/v2", 0.9), (0, "L5", 100, 310, "vertebra/v2", 0.9)],
        spacing=((0.5, 1.0),),
    )
    assert counts(r, "vertebra/v2") == (1, 1, 1)
    assert sorted([r.localisation["all"].mre_mm * 2]) == [15.0]
    assert r.localisation["all"].median_re_mm == 7.5


def test_ap_envelope_and_score_ties_in_input_order():
    r = scored(
        [(0, "L1", 100, 100, "vertebra/v2"), (0, "L3", 100, 200, "vertebra/v2")],
        [
            (0, "L1", 100, 100, "vertebra/v2", 0.9),  # TP: P 1
            (0, "L2", 100, 150, "vertebra/v2", 0.8),  # FP: P 1/2
            (0, "L3", 100, 200, "vertebra/v2", 0.7),
        ],
    )  # TP: P 2/3
    assert r.classes["vertebra/v2"].ap == pytest.approx((1 + 2 / 3) / 2)
    # Equal scores: input order decides the ranking.
    fp_first = [(0, "L2", 100, 150, "vertebra/v2", 0.5), (0, "L1", 100, 100, "vertebra/v2", 0.5)]
    one_l1 = [(0, "L1", 100, 100, "vertebra/v2")]
    assert scored(one_l1, fp_first).classes["vertebra/v2"].ap == 0.5
    assert scored(one_l1, fp_first[::-1]).classes["vertebra/v2"].ap == 1.0


def test_empty_inputs_and_flat_keys():
    r = scored([], [], spacing=((1.0, 1.0),))
    assert r.map is None and r.precision == 0.0 and r.keypoint_recall == 0.0
    flat = r.flat()
    assert math.isnan(flat["map"]) and math.isnan(flat["mre_mm"])
    for key in (
        "map",
        "precision",
        "recall",
        "f1",
        "baseline_macro_f1",
        "keypoint_recall",
        "mre_mm",
        "median_re_mm",
        "sdr/2mm",
        "sdr/4mm",
        "sdr/6mm",
        "sdr/8mm",
        "mre_mm/vertebra",
        "mre_mm/disc",
        "ap/vertebra/v1",
        "ap/disc/v5",
    ):
        assert key in flat
    assert r.to_dict()["map"] is None


def test_invalid_arrays_are_rejected():
    gt, pred, sp = case([(0, "L1", 100, 100, "vertebra/v2")], [(0, "L1", 1, 1, "vertebra/v2", 0.5)])
    bad = PredictionArrays(pred.study, pred.point, np.array([CLS["disc/v2"]]), pred.xy, pred.score)
    with pytest.raises(ValueError, match="type"):
        score_detections(gt, bad, sp)
    bad = PredictionArrays(pred.study, pred.point, pred.cls, pred.xy, np.array([1.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score_detections(gt, bad, sp)


# ---------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("stride", [1, 4])
@pytest.mark.parametrize("logits", [True, False])
def test_decode_recovers_subpixel_gaussian_peak(stride, logits):
    rng = np.random.default_rng(0)
    h = w = 32
    size = (h * stride, w * stride)
    pts = rng.uniform(3 * stride, (h - 3) * stride, size=(NUM_POINTS, 2))
    present = np.ones(NUM_POINTS, bool)
    hm = torch.from_numpy(gaussian_heatmaps(pts, present, size, stride, sigma=2.0))[None] * 0.9
    if logits:
        p = hm.clamp(1e-6, 1 - 1e-6)
        hm = torch.log(p) - torch.log1p(-p)
    xy, scores = decode_heatmaps(hm, stride, logits=logits)
    assert xy.shape == (1, NUM_POINTS, 2) and scores.shape == (1, NUM_POINTS)
    err = (xy[0].double() - torch.from_numpy(pts)).abs().max().item()
    assert err < 0.25
    assert torch.all((scores > 0.8) & (scores <= 0.9 + 1e-5))


def test_decode_border_peak_and_flat_map():
    hm = torch.full((1, 2, 8, 8), -5.0)
    hm[0, 0, 0, 7] = 3.0  # corner peak: no neighbour on two sides -> no offset
    xy, scores = decode_heatmaps(hm, stride=2)
    assert xy[0, 0].tolist() == [(7 + 0.5) * 2 - 0.5, 0.5 * 2 - 0.5]
    assert scores[0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert xy[0, 1].tolist() == [0.5, 0.5]  # flat: first pixel, no offset


# ---------------------------------------------------------------------------- selection
def test_select_predictions_top_label_plus_multi_label_rows():
    pts = torch.arange(22, dtype=torch.float32).reshape(1, 11, 2)
    point_scores = torch.full((1, 11), 0.5)
    vert = torch.tensor([[0.3, 0.7]]).repeat(1, 5, 1)
    disc = torch.tensor([[0.1, 0.2, 0.1, 0.05, 0.55]]).repeat(1, 6, 1)
    disc[0, 4] = torch.tensor([0.0, 0.6, 0.0, 0.0, 0.6])  # L4-L5: tie -> v2 top, v5 extra
    disc[0, 5] = torch.tensor([0.0, 0.9, 0.0, 0.0, 0.5])  # L5-S1: v2 top, v5 at threshold
    rows = select_predictions(pts, point_scores, vert, disc, "tianchi2020", 0.5)
    n = int(rows.valid.sum())
    assert n == 5 + 6 + 2 and rows.points.shape == (1, 13, 2)
    names = [VOCAB.classes[c] for c in rows.cls[0].tolist()]
    idx = rows.point_index[0].tolist()
    assert idx == [1, 3, 5, 7, 9, 0, 2, 4, 6, 8, 8, 10, 10]
    assert names[:5] == ["vertebra/v2"] * 5
    assert names[5:] == ["disc/v5"] * 4 + ["disc/v2", "disc/v5", "disc/v2", "disc/v5"]
    assert torch.equal(rows.points[0, 0], pts[0, 1])
    assert torch.equal(rows.points[0, -1], pts[0, 10])
    assert rows.score[0, :5].tolist() == pytest.approx([0.35] * 5)
    assert rows.score[0, -2:].tolist() == pytest.approx([0.45, 0.25])


def test_select_predictions_pads_to_the_batch_maximum():
    pts = torch.zeros(2, 11, 2)
    vert = torch.tensor([0.6, 0.4]).repeat(2, 5, 1)
    disc = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1]).repeat(2, 6, 1)
    disc[1, 0, 4] = 0.9
    rows = select_predictions(pts, torch.ones(2, 11), vert, disc)
    assert rows.valid.shape == (2, 12)
    assert rows.valid.sum(1).tolist() == [11, 12]
    with pytest.raises(ValueError, match="class probabilities"):
        select_predictions(pts, torch.ones(2, 11), vert, disc[..., :4])


# ---------------------------------------------------------------------------- torchmetrics
def batches_from_case(gt, pred, spacing, batch_size=3):
    """Tensor batches (GT per-type multi-hot, padded prediction rows) carrying the same case."""
    n_vert = len(VOCAB.vertebra)
    k = max(len(VOCAB.vertebra), len(VOCAB.disc))
    out = []
    n_studies = len(spacing)
    for start in range(0, n_studies, batch_size):
        ids = list(range(start, min(start + batch_size, n_studies)))
        b = len(ids)
        gt_points = torch.zeros(b, 11, 2, dtype=torch.float64)
        present = torch.zeros(b, 11, dtype=torch.bool)
        labels = torch.zeros(b, 11, k)
        rows = [np.flatnonzero(pred.study == s) for s in ids]
        p = max([len(r) for r in rows] + [1])
        pp, pi, pc, ps = (
            torch.zeros(b, p, 2, dtype=torch.float64),
            torch.zeros(b, p, dtype=torch.long),
            torch.zeros(b, p, dtype=torch.long),
            torch.zeros(b, p, dtype=torch.float64),
        )
        pv = torch.zeros(b, p, dtype=torch.bool)
        for bi, s in enumerate(ids):
            for i in np.flatnonzero(gt.study == s):
                kpt = int(gt.point[i])
                gt_points[bi, kpt] = torch.from_numpy(gt.xy[i])
                present[bi, kpt] = True
                codes = np.flatnonzero(gt.labels[i])
                labels[bi, kpt, codes - (n_vert if kpt in DISC_POINTS else 0)] = 1
            r = rows[bi]
            pp[bi, : len(r)] = torch.from_numpy(pred.xy[r])
            pi[bi, : len(r)] = torch.from_numpy(pred.point[r])
            pc[bi, : len(r)] = torch.from_numpy(pred.cls[r])
            ps[bi, : len(r)] = torch.from_numpy(pred.score[r])
            pv[bi, : len(r)] = True
        out.append(
            (
                (pp, pi, pc, ps, pv),
                dict(
                    gt_points=gt_points,
                    gt_present=present,
                    gt_labels=labels,
                    spacing_mm=torch.from_numpy(spacing[ids]),
                ),
            )
        )
    return out


def _study_ordered_case(seed, n=10):
    """A random case in study order (one GT row per point, as a batch carries it) with
    distinct scores, so that no ranking depends on the order rows arrive in."""
    gt, pred, spacing = random_case(n, seed=seed)
    m = len(pred.score)
    score = (np.random.default_rng(seed).permutation(m) + 1) / (m + 1)
    return gt, PredictionArrays(pred.study, pred.point, pred.cls, pred.xy, score), spacing


def test_metric_over_batches_equals_the_core():
    gt, pred, spacing = _study_ordered_case(3)
    metric = SpineDetectionMetric()
    for rows, kw in batches_from_case(gt, pred, spacing):
        metric.update(*rows, **kw)
    flat = metric.compute()
    expected = score_detections(gt, pred, spacing)
    assert flat == pytest.approx(expected.flat(), nan_ok=True, abs=0)
    report = metric.compute_report()
    assert report.confusion.tolist() == expected.confusion.tolist()
    assert {k: vars(v) for k, v in report.classes.items()} == {
        k: vars(v) for k, v in expected.classes.items()
    }
    metric.reset()
    rows, kw = batches_from_case(gt, pred, spacing)[0]
    metric.update(*rows, **kw)
    assert metric.compute_report().n_studies == 3


def test_metric_accepts_global_multi_hot_and_rejects_other_widths():
    gt, pred, spacing = _study_ordered_case(4, n=2)
    ((rows, kw),) = batches_from_case(gt, pred, spacing, batch_size=2)
    a, b = SpineDetectionMetric(), SpineDetectionMetric()
    a.update(*rows, **kw)
    labels = a._global_labels(kw["gt_labels"])
    b.update(*rows, **{**kw, "gt_labels": labels.float()})
    assert a.compute() == pytest.approx(b.compute(), nan_ok=True, abs=0)
    with pytest.raises(ValueError, match="gt_labels"):
        b.update(*rows, **{**kw, "gt_labels": labels[..., :3]})


def _ddp_worker(rank, world, init_file, case_seed, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gt, pred, spacing = _study_ordered_case(case_seed, n=12)
        metric = SpineDetectionMetric()
        for i, (rows, kw) in enumerate(batches_from_case(gt, pred, spacing, batch_size=2)):
            if i % world == rank:
                metric.update(*rows, **kw)
        flat = metric.compute()
        if rank == 0:
            torch.save((flat, metric.compute_report().n_studies), out_file)
    finally:
        dist.destroy_process_group()


def test_cat_sync_of_two_ranks_equals_one_process(monkeypatch):
    """In-process stand-in for the DDP test: rank 1's states appended to rank 0's, as the
    'cat' reduction does; study keys must stay distinct across ranks."""
    gt, pred, spacing = _study_ordered_case(5, n=12)
    ranks = [SpineDetectionMetric(), SpineDetectionMetric()]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for i, (rows, kw) in enumerate(batches_from_case(gt, pred, spacing, batch_size=2)):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda r=i % 2: r)
        ranks[i % 2].update(*rows, **kw)
    monkeypatch.undo()
    merged = SpineDetectionMetric()
    for name in merged._defaults:
        setattr(merged, name, getattr(ranks[0], name) + getattr(ranks[1], name))
    merged._update_count = ranks[0]._update_count + ranks[1]._update_count
    assert merged.compute_report().n_studies == 12
    assert merged.compute() == pytest.approx(
        score_detections(gt, pred, spacing).flat(), nan_ok=True, rel=1e-12
    )


def test_ddp_sync_equals_one_process_seeing_everything(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "flat.pt"
    # spawn, not fork: a child forked after torch's thread pools ran can deadlock.
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), 5, str(out)), nprocs=2, join=True)
    synced, n_studies = torch.load(out)
    assert n_studies == 12
    gt, pred, spacing = _study_ordered_case(5, n=12)
    single = score_detections(gt, pred, spacing).flat()
    # Scores are distinct, so the cross-process order cannot change a ranking; sums may differ
    # in the last bit.
    assert synced == pytest.approx(single, nan_ok=True, rel=1e-12)


# ---------------------------------------------------------------------------- speed
def test_scoring_10k_studies_is_fast():
    assert benchmark_scoring(10000, repeats=1) < 2.0  # bench budget is 1 s; slack for CI noise


# ---------------------------------------------------------------------------- rsna log loss
@pytest.mark.parametrize(
    "probs, grades, expected",
    [
        ([[[0.7, 0.2, 0.1], [math.nan, 0.5, 0.5]]], [[0, 0]], r"probs\[0, 1\] = \[nan, 0.5, 0.5\]"),
        ([[[0.5, math.nan, 0.5]]], [[0]], r"probs\[0, 0\] = \[0.5, nan, 0.5\]"),
        ([[[-0.5, 1.0, 0.5]]], [[1]], r"probs\[0, 0\] = \[-0.5, 1.0, 0.5\] \(grade 1"),
        ([[[0.0, 0.0, 0.0]]], [[0]], r"probs\[0, 0\] = \[0.0, 0.0, 0.0\]"),
        ([[[math.inf, 0.0, 0.0]]], [[0]], r"probs\[0, 0\] = \[inf, 0.0, 0.0\]"),
        ([[[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]]], [[1, 3]], r"grades\[0, 1\] = 3 .*or -1"),
        ([[[0.2, 0.3, 0.5]]], [[-2]], r"grades\[0, 0\] = -2 .*or -1 \(ungraded\)"),
    ],
)
def test_rsna_logloss_rejects_unusable_levels_by_index(probs, grades, expected):
    from lit_spine.metrics_rsna import RsnaCanalLogLoss, rsna_weighted_logloss

    probs, grades = torch.tensor(probs, dtype=torch.float64), torch.tensor(grades)
    with pytest.raises(ValueError, match=expected):
        rsna_weighted_logloss(probs, grades)
    metric = RsnaCanalLogLoss()  # the same check behind val/rsna_canal_logloss: no NaN
    metric.update(probs, grades)
    with pytest.raises(ValueError, match=expected):
        metric.compute()


def test_rsna_logloss_checks_only_graded_levels_and_keeps_the_numbers():
    from lit_spine.metrics_rsna import RsnaCanalLogLoss, rsna_weighted_logloss

    # An ungraded level (-1) is never looked at, whatever its probabilities.
    p = torch.tensor(
        [[[0.7, 0.2, 0.1], [math.nan, -1.0, 0.0], [0.2, 0.2, 0.6]]], dtype=torch.float64
    )
    g = torch.tensor([[0, -1, 2]])
    expected = (-math.log(0.7) - 4 * math.log(0.6)) / 5
    assert rsna_weighted_logloss(p, g) == pytest.approx(expected, rel=1e-12)
    p2 = torch.tensor([[[2.0, 1.0, 1.0]]], dtype=torch.float64)  # normalised: -ln 0.5
    assert rsna_weighted_logloss(p2, torch.tensor([[0]])) == -math.log(0.5)
    # With groups (the foraminal task), the index is of the whole (N, L), not of one group.
    metric = RsnaCanalLogLoss(groups=((0,), (1,)))
    metric.update(torch.tensor([[[0.5, 0.3, 0.2], [0.5, -0.3, 0.8]]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"probs\[0, 1\] = \[0.5, -0.3"):
        metric.compute()
