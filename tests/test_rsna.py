"""RSNA 2024 layout: the phantom read back, bad rows reported, the competition log loss,
and the net built for the rsna2024_canal task trained on phantom instances."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lit_spine.data import phantom
from lit_spine.data.dicom import decode_pixels
from lit_spine.data.rsna import (
    COORDS_CSV,
    GRADES_CSV,
    SERIES_CSV,
    RsnaFormatError,
    read_rsna2024,
)
from lit_spine.metrics_rsna import RsnaCanalLogLoss, rsna_weighted_logloss
from lit_spine.models.net import SpineNet
from lit_spine.task import RSNA_LEVELS, get_task


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna") / "data"
    assert phantom.main(["--layout", "rsna2024", "--studies", "4", "--out", str(root)]) == 0
    return root


def _copy(rsna_root, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(rsna_root, dst)
    return dst


def test_phantom_layout_read_back(rsna_root):
    series = pd.read_csv(rsna_root / SERIES_CSV)
    coords = pd.read_csv(rsna_root / COORDS_CSV)
    grades = pd.read_csv(rsna_root / GRADES_CSV)
    assert list(series.columns) == ["study_id", "series_id", "series_description"]
    assert list(coords.columns) == [
        "study_id", "series_id", "instance_number", "condition", "level", "x", "y",
    ]  # fmt: skip
    assert len(grades.columns) == 1 + 25
    data = read_rsna2024(rsna_root)
    assert data.problems == []
    assert len(data.studies) == 4
    for st in data.studies:
        (ser,) = series[
            (series.study_id == st.study_id) & (series.series_description == "Sagittal T2/STIR")
        ].series_id
        assert st.series_id == ser
        assert set(st.points) == set(RSNA_LEVELS)
        row = grades[grades.study_id == st.study_id].iloc[0]
        for lv, g in st.grades.items():
            col = f"spinal_canal_stenosis_{lv.lower().replace('/', '_')}"
            assert ["Normal/Mild", "Moderate", "Severe"][g] == row[col]
        for lv, pt in st.points.items():
            rec = coords[
                (coords.study_id == st.study_id)
                & (coords.condition == "Spinal Canal Stenosis")
                & (coords.level == lv)
            ].iloc[0]
            assert pt.instance_number == rec.instance_number
            assert pt.path.name == f"{rec.instance_number}.dcm"
            assert (pt.x, pt.y) == pytest.approx((rec.x, rec.y))
            img = decode_pixels(pt.path)
            assert img.shape == (64, 64)
    # Not every point is on the middle instance (7 slices: mid is 4).
    instances = {p.instance_number for st in data.studies for p in st.points.values()}
    assert instances != {4}


def test_bad_rows_reported_and_skipped(rsna_root, tmp_path):
    root = _copy(rsna_root, tmp_path)
    data0 = read_rsna2024(root)
    sid = data0.studies[0].study_id
    grades = pd.read_csv(root / GRADES_CSV, dtype=str)
    grades.loc[grades.study_id == str(sid), "spinal_canal_stenosis_l4_l5"] = ""
    grades.loc[grades.study_id == str(sid), "spinal_canal_stenosis_l5_s1"] = "Severish"
    grades.to_csv(root / GRADES_CSV, index=False)
    coords = pd.read_csv(root / COORDS_CSV, dtype=str)
    canal = coords[(coords.study_id == str(sid)) & (coords.condition == "Spinal Canal Stenosis")]
    coords.loc[canal.index[0], "x"] = "abc"  # L1/L2
    coords = coords.drop(index=canal.index[1])  # L2/L3 coordinates missing
    coords.to_csv(root / COORDS_CSV, index=False)
    l34 = data0.studies[0].points["L3/L4"].path
    l34.unlink()
    data = read_rsna2024(root)
    st = next(s for s in data.studies if s.study_id == sid)
    # L1/L2, L2/L3 lost their coordinates; L3/L4 (and any level on the same instance) its file.
    same_file = {lv for lv, p in data0.studies[0].points.items() if p.path == l34}
    assert set(st.points) == {"L4/L5", "L5/S1"} - same_file
    assert set(st.grades) == {"L1/L2", "L2/L3", "L3/L4"}
    text = "\n".join(data.problems)
    assert f"train.csv row 2 (study {sid}): column spinal_canal_stenosis_l4_l5 is empty" in text
    assert "'Severish' is not one of Normal/Mild, Moderate, Severe" in text
    assert f"{COORDS_CSV} row" in text and "x 'abc' not a valid number" in text
    assert f"{l34} not found" in text
    assert f"study {sid} series {st.series_id}: no coordinates for L1/L2, L2/L3, L3/L4" in text
    assert text.count("not found; point skipped") == len(same_file - {"L1/L2", "L2/L3"})
    # The other studies are untouched.
    assert all(len(s.points) == 5 for s in data.studies if s.study_id != sid)


def test_missing_column_names_file_and_column(rsna_root, tmp_path):
    root = _copy(rsna_root, tmp_path)
    coords = pd.read_csv(root / COORDS_CSV).drop(columns=["instance_number"])
    coords.to_csv(root / COORDS_CSV, index=False)
    with pytest.raises(RsnaFormatError, match=r"train_label_coordinates.csv: missing column"):
        read_rsna2024(root)
    (root / SERIES_CSV).unlink()
    with pytest.raises(RsnaFormatError, match="train_series_descriptions.csv: file not found"):
        read_rsna2024(root)


def test_logloss_known_answers():
    # Two levels: Normal/Mild at p=0.7 (weight 1), Severe at p=0.6 (weight 4).
    p = torch.tensor([[[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]]], dtype=torch.float64)
    g = torch.tensor([[0, 2]])
    expected = (-math.log(0.7) - 4 * math.log(0.6)) / 5  # 0.4799954878...
    assert rsna_weighted_logloss(p, g) == pytest.approx(expected, rel=1e-12)
    # Unnormalised rows are normalised per level; ungraded (-1) levels are left out.
    p2 = torch.tensor([[[1.4, 0.4, 0.2], [2.0, 4.0, 4.0], [1.0, 1.0, 1.0]]], dtype=torch.float64)
    g2 = torch.tensor([[0, 1, -1]])
    expected2 = (-math.log(0.7) - 2 * math.log(0.4)) / 3
    assert rsna_weighted_logloss(p2, g2) == pytest.approx(expected2, rel=1e-12)
    # A zero probability is clipped to 1e-15, not infinite.
    p3 = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64)
    assert rsna_weighted_logloss(p3, torch.tensor([[1]])) == pytest.approx(-math.log(1e-15))
    m = RsnaCanalLogLoss()
    m.update(p[:, :1], g[:, :1])
    m.update(p[:, 1:], g[:, 1:])
    assert float(m.compute()) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="no graded level"):
        rsna_weighted_logloss(p, torch.tensor([[-1, -1]]))


def _batch(data, size=64):
    """One image per study: the instance of its L3/L4 point, with the points on it."""
    images, points, present, grades = [], [], [], []
    for st in data.studies:
        inst = st.points["L3/L4"].instance_number
        images.append(decode_pixels(st.points["L3/L4"].path))
        pts = [st.points[lv] for lv in RSNA_LEVELS]
        points.append([[p.x, p.y] for p in pts])
        present.append([p.instance_number == inst for p in pts])
        grades.append([st.grades.get(lv, -1) for lv in RSNA_LEVELS])
    x = torch.tensor(np.stack(images))[:, None]
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(points), torch.tensor(present), torch.tensor(grades)


def test_net_for_rsna_task_one_training_step(rsna_root):
    task = get_task("rsna2024_canal")
    net = SpineNet("resnet18", vocab="rsna2024_severity", task="rsna2024_canal", head_channels=32)
    x, points, present, grades = _batch(read_rsna2024(rsna_root))
    out = net(x, points)
    assert out["heatmaps"].shape == (4, task.num_points, 16, 16)
    assert out["vertebra_logits"].shape == (4, 0, 0)
    assert out["disc_logits"].shape == (4, 5, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    target = torch.zeros_like(out["heatmaps"])
    cell = (points / 4).long().clamp(0, 15)
    for b in range(4):
        for k in range(5):
            if present[b, k]:
                target[b, k, cell[b, k, 1], cell[b, k, 0]] = 1.0
    loss = F.mse_loss(out["heatmaps"], target) + F.cross_entropy(
        out["disc_logits"].flatten(0, 1), grades.flatten(), ignore_index=-1
    )
    before = net.heatmap.weight.detach().clone()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, net.heatmap.weight)
    probs = out["disc_logits"].softmax(-1).detach()
    assert math.isfinite(rsna_weighted_logloss(probs, grades))


def test_task_vocabulary_mismatch_refused():
    with pytest.raises(ValueError, match="does not belong to task 'rsna2024_canal'"):
        SpineNet("resnet18", vocab="tianchi2020", task="rsna2024_canal")
    with pytest.raises(ValueError, match="unknown task 'rsna2024_cana'.*did you mean"):
        get_task("rsna2024_cana")


def test_inspect_rsna2024_json(rsna_root, capsys):
    import json

    from lit_spine.data import inspect

    assert inspect.main(["--format", "rsna2024", "--json", str(rsna_root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "rsna2024" and out["num_studies"] == 4 and out["points"] == 20
    assert [s["series_id"] for s in out["studies"]] == [
        s * 10 + 2 for s in (4000000, 4000017, 4000034, 4000051)
    ]
    assert out["problems"] == []
    assert inspect.main(["--format", "rsna2024", str(rsna_root / "nowhere")]) == 2
    assert "train_series_descriptions.csv: file not found" in capsys.readouterr().err
