"""RSNA 2024 layout: the phantom read back, a hand-made sample in the real format, bad rows
reported, the competition log loss, and the net built for the rsna2024_canal task trained on
phantom instances."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from dicom_factory import write_slice
from pydicom.uid import generate_uid
from spine_helpers import (
    checked_losses,
    copy_data,
    fit_on_phantom,
    phantom_datamodule,
    predict_run,
    train_one_step,
    write_diagnostics,
)

from lit_spine.commands import phantom
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


def test_hand_made_sample_in_the_real_format(tmp_path):
    """Three CSVs and a DICOM tree written here as the competition publishes them (not by the
    phantom): the canal points are read from the instances the coordinates name, the axial
    series and the other conditions are ignored, and a missing grade or a missing
    coordinate is reported and skipped, never filled in."""
    study, sagittal, axial = 4003253, 702807833, 2448190387
    levels = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
    conditions = [
        "spinal_canal_stenosis", "left_neural_foraminal_narrowing",
        "right_neural_foraminal_narrowing", "left_subarticular_stenosis",
        "right_subarticular_stenosis",
    ]  # fmt: skip
    columns = ["study_id"] + [f"{c}_{lv}" for c in conditions for lv in levels]
    grades = dict.fromkeys(columns, "Normal/Mild") | {
        "study_id": study,
        "spinal_canal_stenosis_l1_l2": "",  # a missing grade
        "spinal_canal_stenosis_l3_l4": "Severe",
        "spinal_canal_stenosis_l4_l5": "Moderate",
    }
    root = tmp_path / "rsna"
    root.mkdir()
    pd.DataFrame([grades], columns=columns).to_csv(root / GRADES_CSV, index=False)
    pd.DataFrame(
        [(study, sagittal, "Sagittal T2/STIR"), (study, axial, "Axial T2")],
        columns=["study_id", "series_id", "series_description"],
    ).to_csv(root / SERIES_CSV, index=False)
    canal = "Spinal Canal Stenosis"
    coords = [  # no row for L5/S1: a missing coordinate
        (study, sagittal, 2, canal, "L1/L2", 20.5, 10.0),
        (study, sagittal, 2, canal, "L2/L3", 21.0, 18.0),
        (study, sagittal, 3, canal, "L3/L4", 22.0, 26.5),
        (study, sagittal, 1, canal, "L4/L5", 23.0, 34.0),
        (study, axial, 5, "Left Subarticular Stenosis", "L4/L5", 10.0, 10.0),
    ]
    pd.DataFrame(
        coords, columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    ).to_csv(root / COORDS_CSV, index=False)
    study_uid, series_uid = generate_uid(), generate_uid()
    for inst in (1, 2, 3):
        path = root / "train_images" / str(study) / str(sagittal) / f"{inst}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (np.arange(48 * 40).reshape(48, 40) % 500 + 100 * inst).astype(np.uint16)
        write_slice(
            path, pixels, study_uid=study_uid, series_uid=series_uid,
            description="Sagittal T2/STIR", instance_number=inst, position=(4.0 * inst, 0, 0),
        )  # fmt: skip
    data = read_rsna2024(root)
    (st,) = data.studies
    assert (st.study_id, st.series_id) == (study, sagittal)
    got = {lv: (p.instance_number, p.x, p.y, p.path.name) for lv, p in st.points.items()}
    assert got == {
        "L1/L2": (2, 20.5, 10.0, "2.dcm"),
        "L2/L3": (2, 21.0, 18.0, "2.dcm"),
        "L3/L4": (3, 22.0, 26.5, "3.dcm"),
        "L4/L5": (1, 23.0, 34.0, "1.dcm"),
    }
    assert decode_pixels(st.points["L3/L4"].path)[0, 0] == 300  # instance 3's own pixels
    assert st.grades == {"L2/L3": 0, "L3/L4": 2, "L4/L5": 1, "L5/S1": 0}  # L1/L2: no grade
    text = "\n".join(data.problems)
    assert len(data.problems) == 2, text
    assert (
        f"{root / GRADES_CSV} row 2 (study {study}): column spinal_canal_stenosis_l1_l2 is empty"
        in text
    )
    assert f"study {study} series {sagittal}: no coordinates for L5/S1" in text


def test_bad_rows_reported_and_skipped(rsna_root, tmp_path):
    root = copy_data(rsna_root, tmp_path)
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


def test_grade_rows_and_condition_spellings_are_never_read_silently(rsna_root, tmp_path):
    """A second train.csv row for a study (the first is kept), a study with no row, a row
    whose study_id is no integer, and a condition that differs from the competition's
    spelling only in case: each named with its file and row, nothing read from a guess."""
    root = copy_data(rsna_root, tmp_path)
    first, second, third = (s.study_id for s in read_rsna2024(root).studies[:3])
    grades = pd.read_csv(root / GRADES_CSV, dtype=str)
    dup = grades[grades.study_id == str(first)].assign(spinal_canal_stenosis_l1_l2="Severe")
    grades.loc[grades.study_id == str(first), "spinal_canal_stenosis_l1_l2"] = "Normal/Mild"
    grades.loc[grades.study_id == str(third), "study_id"] = f"{third}x"
    grades = pd.concat([grades[grades.study_id != str(second)], dup], ignore_index=True)
    grades.to_csv(root / GRADES_CSV, index=False)
    coords = pd.read_csv(root / COORDS_CSV, dtype=str)
    rows = coords.index[(coords.study_id == str(second)) & (coords.level == "L1/L2")
                        & (coords.condition == "Spinal Canal Stenosis")]  # fmt: skip
    coords.loc[rows, "condition"] = "spinal canal stenosis "
    coords.to_csv(root / COORDS_CSV, index=False)

    data = read_rsna2024(root)
    by_id = {s.study_id: s for s in data.studies}
    assert by_id[first].grades["L1/L2"] == 0, "the first of two rows is kept, not the last"
    assert by_id[second].grades == {} and by_id[third].grades == {}
    assert "L1/L2" not in by_id[second].points
    text = "\n".join(data.problems)
    last_row = len(grades) + 1
    assert (f"{GRADES_CSV} row {last_row}: second row for study {first} (the first is row"
            in text)  # fmt: skip
    assert f"{GRADES_CSV}: no row for study {second}; its levels are kept without a grade" in text
    assert f"study_id '{third}x' is not an integer; row skipped" in text
    assert f"{GRADES_CSV}: no row for study {third}" in text
    assert (f"(study {second}): condition 'spinal canal stenosis ' is not spelled "
            "'Spinal Canal Stenosis' as the competition spells it; row skipped") in text  # fmt: skip


def test_the_file_the_coordinates_name_is_read_and_inspect_sees_its_header(
    rsna_root, tmp_path, capsys
):
    """`<instance_number>.dcm` with another InstanceNumber tag, and a stray copy of a labelled
    file that sorts before it (same SOPInstanceUID), are read and reported, not dropped; a
    labelled slice without pixel spacing and a point outside the image are problems that
    `inspect` reports from the headers, as the cache build does."""
    import pydicom

    from lit_spine.commands import inspect
    from lit_spine.data.cache import CacheSettings
    from lit_spine.data.rsna_cache import build_rsna2024_cache

    root = copy_data(rsna_root, tmp_path)
    a, b = read_rsna2024(root).studies[:2]
    tagged = a.points["L1/L2"].path
    ds = pydicom.dcmread(tagged)
    ds.InstanceNumber = 99
    ds.save_as(tagged)
    copied = b.points["L5/S1"].path
    (copied.parent / f"{copied.stem} (1).dcm").write_bytes(copied.read_bytes())

    cache = build_rsna2024_cache(root, CacheSettings(image_size=64), tmp_path / "cache")
    levels = {(r["study_id"], r["instance_number"]): r["levels"] for r in cache.records}
    for st, level in ((a, "L1/L2"), (b, "L5/S1")):
        inst = st.points[level].instance_number
        assert level in levels[(st.study_id, inst)], (st.study_id, level)
    text = "\n".join(cache.problems)
    assert f"{tagged.name} has InstanceNumber 99; the file the coordinates name is read" in text
    assert f"{copied.name}, the file the coordinates name, is read" in text

    c = next(s for s in read_rsna2024(root).studies if s.study_id not in (a.study_id, b.study_id))
    ds = pydicom.dcmread(c.points["L3/L4"].path)
    del ds.PixelSpacing
    ds.save_as(c.points["L3/L4"].path)
    coords = pd.read_csv(root / COORDS_CSV, dtype=str)
    row = coords.index[(coords.study_id == str(a.study_id)) & (coords.level == "L4/L5")
                       & (coords.condition == "Spinal Canal Stenosis")][0]  # fmt: skip
    coords.loc[row, "x"] = "70"
    coords.to_csv(root / COORDS_CSV, index=False)
    capsys.readouterr()
    assert inspect.main(["--format", "rsna2024", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{c.points['L3/L4'].path} has no usable pixel spacing" in out
    assert "L4/L5 at (70, " in out and "lies outside the 64x64 image" in out


def test_missing_column_names_file_and_column(rsna_root, tmp_path):
    root = copy_data(rsna_root, tmp_path)
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


def test_foraminal_validation_logloss_pools_both_sides():
    """val/rsna_foraminal_logloss is the competition's 'foraminal' condition: one weighted
    log loss over the left and the right levels. Here the left side has two Severe levels
    (weight 4 each) and the right two Normal/Mild (weight 1), so the pooled loss (weights
    8 : 2) differs from the mean of the sides (1 : 1)."""
    from lit_spine.metrics_rsna import RSNA_LOGLOSS

    name, groups = RSNA_LOGLOSS["rsna2024_foraminal"]
    assert name == "rsna_foraminal_logloss"
    probs = torch.full((1, 10, 3), 1 / 3, dtype=torch.float64)
    grades = torch.full((1, 10), -1)
    grades[0, [0, 1]] = 2  # L1/L2 left, L2/L3 left: Severe
    probs[0, [0, 1]] = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    grades[0, [5, 6]] = 0  # L1/L2 right, L2/L3 right: Normal/Mild
    probs[0, [5, 6]] = torch.tensor([0.4, 0.3, 0.3], dtype=torch.float64)
    m = RsnaCanalLogLoss(groups)
    m.update(probs, grades)
    left, right = -math.log(0.7), -math.log(0.4)
    expected = (2 * 4 * left + 2 * 1 * right) / (2 * 4 + 2 * 1)
    assert float(m.compute()) == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx((left + right) / 2)


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

    from lit_spine.commands import inspect

    assert inspect.main(["--format", "rsna2024", "--json", str(rsna_root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "rsna2024" and out["num_studies"] == 4 and out["points"] == 20
    assert [s["series_id"] for s in out["studies"]] == [
        s * 10 + 2 for s in (4000000, 4000017, 4000034, 4000051)
    ]
    assert out["problems"] == []
    assert inspect.main(["--format", "rsna2024", str(rsna_root / "nowhere")]) == 2
    assert "train_series_descriptions.csv: file not found" in capsys.readouterr().err
    # The foraminal task: Sagittal T1 (series number 1), ten points per study.
    args = ["--format", "rsna2024", "--task", "rsna2024_foraminal", "--json", str(rsna_root)]
    assert inspect.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "rsna2024_foraminal" and out["points"] == 40
    assert [s["series_id"] % 10 for s in out["studies"]] == [1, 1, 1, 1]
    assert inspect.main(["--format", "spider", "--task", "rsna2024_canal", str(rsna_root)]) == 2
    assert "--task is for --format rsna2024" in capsys.readouterr().err


# ---------------------------------------------------------------------------- training path
# `phantom_datamodule` settings of these tests: rsna2024_canal on a 6-study phantom, 2 folds.
RSNA_DM = dict(
    format="rsna2024", task="rsna2024_canal", vocab="rsna2024_severity", phantom_studies=6,
    folds=2, slices=3, batch_size=4,
)  # fmt: skip


def test_datamodule_rsna2024_phantom_batches(tmp_path):
    dm = phantom_datamodule(tmp_path, RSNA_DM)
    dm.prepare_data()
    dm.setup("fit")
    root = tmp_path / "phantom" / "rsna2024"
    assert dm.root == root and (root / "train.csv").is_file()
    assert (
        dm.task.num_points == 5 and len(dm.vocab_obj.disc) == 3 and len(dm.vocab_obj.vertebra) == 0
    )
    cache = dm.train_dataset.cache
    train_studies = {cache.records[r]["study"] for r in dm.train_dataset.indices}
    val_studies = {cache.records[r]["study"] for r in dm.val_dataset.indices}
    assert train_studies and val_studies and not train_studies & val_studies
    assert len(train_studies | val_studies) == 6

    batch = next(iter(dm.train_dataloader()))
    b = batch["image"].shape[0]
    assert batch["image"].shape == (b, 3, 64, 64)
    assert batch["heatmap"].shape == (b, 5, 16, 16)
    assert batch["points"].shape == (b, 5, 2)
    assert batch["present"].shape == (b, 5) and batch["graded"].shape == (b, 5)
    assert batch["labels"].shape == (b, 5, 3)

    # Each level is present in exactly one row of its study: the row of the instance the
    # coordinates name, with the grade of train.csv (nothing moved to another slice).
    data = read_rsna2024(root)
    coords = pd.read_csv(root / COORDS_CSV)
    canal = coords[coords.condition == "Spinal Canal Stenosis"]
    seen = set()
    for row, rec in enumerate(cache.records):
        st = next(s for s in data.studies if s.study_id == rec["study_id"])
        present = [lv for k, lv in enumerate(RSNA_LEVELS) if cache.present[row, k]]
        assert present == rec["levels"]
        for lv in present:
            (inst,) = canal[(canal.study_id == st.study_id) & (canal.level == lv)].instance_number
            assert rec["instance_number"] == inst
            k = RSNA_LEVELS.index(lv)
            assert np.flatnonzero(cache.labels[row, k]).tolist() == [st.grades[lv]]
            assert (st.study_id, lv) not in seen
            seen.add((st.study_id, lv))
    assert len(seen) == 6 * 5

    # A second data module reuses the phantom and its cache (no rewrite, same key).
    again = phantom_datamodule(tmp_path, RSNA_DM)
    again.prepare_data()
    assert again.cache_hashes == dm.cache_hashes


def test_format_task_mismatch_and_rsna_settings_refused(tmp_path):
    from lit_spine.data.datamodule import SpineDataModule

    with pytest.raises(ValueError, match=r"data.task 'tianchi2020' does not fit data.format "
                       r"'rsna2024'.*rsna2024: rsna2024_canal"):  # fmt: skip
        SpineDataModule(format="rsna2024")
    with pytest.raises(ValueError, match=r"data.task 'rsna2024_canal' does not fit data.format "
                       r"'tianchi2020'.*tianchi2020: tianchi2020"):  # fmt: skip
        SpineDataModule(task="rsna2024_canal", vocab="rsna2024_severity")
    with pytest.raises(ValueError, match="did you mean"):
        SpineDataModule(format="rsna", task="rsna2024_canal")
    with pytest.raises(ValueError, match="does not belong to task 'rsna2024_canal'"):
        SpineDataModule(format="rsna2024", task="rsna2024_canal", folds=5)
    with pytest.raises(ValueError, match="data.folds >= 2"):
        SpineDataModule(format="rsna2024", task="rsna2024_canal", vocab="rsna2024_severity")


def test_bad_study_reported_and_skipped(rsna_root, tmp_path):
    from lit_spine.data.cache import CacheSettings
    from lit_spine.data.rsna_cache import build_rsna2024_cache

    root = copy_data(rsna_root, tmp_path)
    data = read_rsna2024(root)
    bad = data.studies[1]
    broken = {p.path for p in bad.points.values()}
    for path in broken:
        path.write_bytes(b"not a DICOM file")
    cache = build_rsna2024_cache(root, CacheSettings(image_size=64), tmp_path / "cache")
    kept = {r["study_id"] for r in cache.records}
    assert kept == {s.study_id for s in data.studies}  - {bad.study_id}  # fmt: skip
    text = "\n".join(cache.problems)
    for path in broken:
        assert str(path) in text
    assert f"study {bad.study_id} series {bad.series_id}" in text


def test_module_one_training_step_on_rsna_batch(tmp_path):
    from lit_spine.module import SpineModule

    dm = phantom_datamodule(tmp_path, RSNA_DM, slices=1, augment=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    net = SpineNet("resnet18", vocab="rsna2024_severity", task="rsna2024_canal", head_channels=32)
    module = SpineModule(net, class_loss="ce", multi_label=False)
    assert module.task.name == "rsna2024_canal" and module.val_rsna_logloss is not None
    train_one_step(module, batch)
    # The competition log loss sees each graded level of the batch once.
    with torch.no_grad():
        pred = module._predict(batch["image"])
    module._update_rsna_logloss(pred["disc_probs"], batch)
    (grades,) = module.val_rsna_logloss.grades
    assert int((grades >= 0).sum()) == int(batch["graded"].sum()) > 0
    assert math.isfinite(float(module.val_rsna_logloss.compute()))
    # The 2020 module has no such metric.
    assert SpineModule(SpineNet("resnet18", head_channels=32)).val_rsna_logloss is None


def test_fit_through_cli_logs_rsna_logloss(tmp_path, capsys):
    import csv
    import json

    run, config, state = fit_on_phantom(tmp_path, "rsna2024.yaml", "rsna", studies=6,
                                        batch_size=4, max_epochs=2)  # fmt: skip
    assert config["data.task"] == "rsna2024_canal" and config["data.format"] == "rsna2024"
    # data.task is linked to the net: 5 heatmap channels, 3 severity logits, no vertebra head.
    assert state["net.heatmap.weight"].shape[0] == 5
    assert state["net.classifier.disc.weight"].shape[0] == 3
    assert state["net.classifier.vertebra.weight"].shape[0] == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    values = [float(r["val/rsna_canal_logloss"]) for r in rows if r.get("val/rsna_canal_logloss")]
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    assert any(r.get("val/mAP") for r in rows)
    diagnostics = json.loads((run / "diagnostics.json").read_text())
    assert diagnostics["task"] == "rsna2024_canal"
    assert [lv["name"] for lv in diagnostics["per_level"]["levels"]] == list(RSNA_LEVELS)

    # predict on the checkpoint writes the competition's submission file and the points;
    # evaluate scores them against the phantom's labels with the same log loss.
    from lit_spine.commands import evaluate as evaluate_cmd

    predict_run(run)
    out = run / "predict"
    submission = pd.read_csv(out / "submission.csv")
    coords = pd.read_csv(out / "coordinates.csv")
    studies = set(coords.study_id)
    assert len(submission) == len(coords) == 5 * len(studies) and len(studies) == 3
    assert list((out / "overlays").glob("*.png"))
    capsys.readouterr()
    assert evaluate_cmd.main(["--format", "rsna2024", "--pred", str(out / "submission.csv"),
                              "--data-root", str(tmp_path / "phantom" / "rsna2024"),
                              "--json"]) == 0  # fmt: skip
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert math.isfinite(metrics["rsna_canal_logloss"]) and metrics["rsna_canal_logloss"] > 0
    assert metrics["rsna_canal_logloss_levels"] == 15 and metrics["localisation_points"] == 15
    assert metrics["studies_not_predicted"] == 3


def test_report_per_level_follows_the_task_and_skips_mixed_tasks(tmp_path):
    from types import SimpleNamespace

    from lit_spine.report_diagnostics import SECTIONS, render_sections
    from lit_spine.task import POINT_NAMES

    def cell(name: str, levels: tuple[str, ...]):
        d = write_diagnostics(
            tmp_path / name, levels, hit_rate=0.5, ap=0.25, norm="groupnorm",
            batchnorm={"has_batchnorm": False, "map_eval": 0.2, "map_batch_stats": 0.2,
                "map_gap": 0.0, "mean_shift_sd": None, "log_var_ratio": None},
            calibration={"ece": 0.1, "n": 4, "kind": "k",
                "bins": [{"n": 4, "confidence": 0.5, "accuracy": 0.4}]},
        )  # fmt: skip
        return SimpleNamespace(name=name, runs=[SimpleNamespace(dir=d)])

    rsna, tianchi = cell("rsna", RSNA_LEVELS), cell("tianchi", POINT_NAMES)
    md = render_sections([rsna], lambda c: c.name, tmp_path / "one")
    assert "| L1/L2 | 1.00" in md and "| L5/S1 | 5.00" in md and "L5-S1" not in md
    mixed = render_sections([rsna, tianchi], lambda c: c.name, tmp_path / "mixed")
    assert all(f"## {name}" in mixed for name in SECTIONS)
    assert "Skipped: the runs have different levels" in mixed
    assert "| L5-S1 |" not in mixed and "| L5/S1 |" not in mixed


def test_predict_writer_refuses_a_task_without_a_writer(tmp_path):
    from types import SimpleNamespace

    from lit_spine.predict import PredictionWriter
    from lit_spine.task import Task

    writer = PredictionWriter(tmp_path)
    # rsna2024_canal has its writer now (submission.csv); a task without one is refused.
    unwritten = Task("my_discs", ("L4/L5",), ("disc",), ("rsna2024_severity",), "Sagittal T2/STIR")
    with pytest.raises(ValueError, match="task 'my_discs' has no prediction writer yet"):
        writer.on_predict_epoch_start(None, SimpleNamespace(task=unwritten))
    for name in ("tianchi2020", "rsna2024_canal", "spider_disc"):
        writer.on_predict_epoch_start(None, SimpleNamespace(task=get_task(name)))
    assert writer.batches == []


# ---------------------------------------------------------------------------- prediction files
def _perfect_outputs(cache, indices, wrong_grade=False):
    """predict_step outputs that put each level at its labelled point, with the highest
    heatmap peak in the item of its own instance and 0.8 on the true severity."""
    n = len(indices)
    present = cache.present[indices]
    n_points = present.shape[1]
    points = np.where(present[..., None], np.nan_to_num(cache.points[indices]), 5.0)
    labels = cache.labels[indices]
    grade = np.where(labels.any(-1), labels.argmax(-1), 0)
    # 0.8 on the true severity; with wrong_grade 0.1 .. 0.5 by level (so the weights matter).
    p_true = np.full((n, n_points), 0.8)
    if wrong_grade:
        p_true = np.tile(np.arange(n_points) % 5 / 10 + 0.1, (n, 1))
    probs = np.repeat(((1 - p_true) / 2)[..., None], 3, axis=-1).astype(np.float32)
    np.put_along_axis(probs, grade[..., None], p_true[..., None].astype(np.float32), axis=-1)
    return {
        "index": np.asarray(indices),
        "points": points.astype(np.float32),
        "scores": np.where(present, 0.9, 0.1).astype(np.float32),
        "vertebra_probs": np.zeros((n, 0, 0), np.float32),
        "disc_probs": probs,
    }


def test_prediction_files_round_trip_through_evaluate(tmp_path, capsys):
    import json

    from lit_spine.commands import evaluate as evaluate_cmd
    from lit_spine.evaluate_layouts import LayoutEvaluationError, evaluate_rsna2024
    from lit_spine.predict_layouts import write_layout_predictions

    dm = phantom_datamodule(tmp_path, RSNA_DM, slices=1)
    dm.prepare_data()
    dm.setup("predict")
    data = dm.predict_dataset
    cache, indices = data.cache, list(data.indices)
    task = get_task("rsna2024_canal")
    out = tmp_path / "predict"
    paths = write_layout_predictions(out, _perfect_outputs(cache, indices), cache, task,
                                     task.vocabulary(), None)  # fmt: skip
    assert [p.name for p in paths] == ["submission.csv", "coordinates.csv"]
    submission = pd.read_csv(out / "submission.csv")
    assert list(submission.columns) == ["row_id", "normal_mild", "moderate", "severe"]
    studies = sorted({cache.records[i]["study_id"] for i in indices})
    assert len(submission) == 5 * len(studies)
    assert submission.row_id.iloc[0] == f"{studies[0]}_spinal_canal_stenosis_l1_l2"
    assert np.allclose(submission[["normal_mild", "moderate", "severe"]].sum(1), 1.0)
    # Each level comes from the item of its labelled instance, at its labelled point.
    coords = pd.read_csv(out / "coordinates.csv")
    root = tmp_path / "phantom" / "rsna2024"
    truth = pd.read_csv(root / COORDS_CSV)
    truth = truth[truth.condition == "Spinal Canal Stenosis"]
    merged = coords.merge(truth, on=["study_id", "condition", "level"], suffixes=("", "_gt"))
    assert len(merged) == len(coords) == 5 * len(studies)
    assert (merged.instance_number == merged.instance_number_gt).all()
    assert np.allclose(merged[["x", "y"]], merged[["x_gt", "y_gt"]].to_numpy(), atol=1e-3)

    ev = evaluate_rsna2024(out / "submission.csv", root)
    # 0.8 on every true severity: -ln 0.8 whatever the weights.
    assert ev.metrics["rsna_canal_logloss"] == pytest.approx(-math.log(0.8))
    assert ev.metrics["rsna_canal_logloss_levels"] == 5 * len(studies)
    assert ev.metrics["studies_not_predicted"] == 6 - len(studies)
    assert ev.metrics["localisation_mre_mm"] == pytest.approx(0.0, abs=1e-3)
    assert ev.metrics["localisation_same_instance_rate"] == 1.0
    assert ev.problems == []

    # Wrong severities score the competition's weighted loss; a point moved to the next
    # instance at the same pixel is one slice gap (4.4 mm in the phantom) away.
    write_layout_predictions(out, _perfect_outputs(cache, indices, wrong_grade=True), cache,
                             task, task.vocabulary(), None)  # fmt: skip
    sub = pd.read_csv(out / "submission.csv")
    grades = pd.read_csv(root / GRADES_CSV).set_index("study_id")
    probs, labels = [], []
    for _, r in sub.iterrows():
        sid, col = r.row_id.split("_", 1)
        probs.append([r.normal_mild, r.moderate, r.severe])
        labels.append(["Normal/Mild", "Moderate", "Severe"].index(grades.loc[int(sid), col]))
    expected = rsna_weighted_logloss(torch.tensor(probs)[:, None], torch.tensor(labels)[:, None])
    unweighted = -np.mean([math.log(p[g]) for p, g in zip(probs, labels)])
    assert expected > 0.6 and expected != pytest.approx(unweighted)
    moved = coords.copy()
    moved.loc[0, "instance_number"] = moved.loc[0, "instance_number"] + (
        1 if moved.loc[0, "instance_number"] < 7 else -1
    )
    moved.to_csv(out / "coordinates.csv", index=False)
    # A missing grade is reported and skipped, never filled in.
    blank = pd.read_csv(root / GRADES_CSV, dtype=str, keep_default_na=False)
    blank.loc[blank.study_id == str(studies[0]), "spinal_canal_stenosis_l3_l4"] = ""
    blank.to_csv(root / GRADES_CSV, index=False)
    assert evaluate_cmd.main(["--format", "rsna2024", "--pred", str(out / "submission.csv"),
                              "--data-root", str(root), "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    metrics = result["metrics"]
    assert metrics["rsna_canal_logloss_levels"] == 5 * len(studies) - 1
    assert metrics["rsna_canal_logloss"] != pytest.approx(expected)
    keep = [i for i, r in enumerate(sub.row_id) if r != f"{studies[0]}_spinal_canal_stenosis_l3_l4"]
    assert metrics["rsna_canal_logloss"] == pytest.approx(
        rsna_weighted_logloss(torch.tensor(probs)[keep, None], torch.tensor(labels)[keep, None])
    )
    assert metrics["localisation_same_instance_rate"] == pytest.approx(1 - 1 / len(coords))
    assert metrics["localisation_mre_mm"] * len(coords) == pytest.approx(4.4, abs=1e-2)
    assert any("spinal_canal_stenosis_l3_l4 is empty" in p for p in result["problems"])

    # A study that is not in train.csv stops the run unless --ignore-unknown.
    sub.loc[len(sub)] = ["999_spinal_canal_stenosis_l1_l2", 0.2, 0.3, 0.5]
    sub.to_csv(out / "submission.csv", index=False)
    with pytest.raises(LayoutEvaluationError, match=r"not in .*train.csv.*--ignore-unknown"):
        evaluate_rsna2024(out / "submission.csv", root)
    ev = evaluate_rsna2024(out / "submission.csv", root, ignore_unknown=True)
    assert any("study 999 is not in" in p for p in ev.problems)
    assert evaluate_cmd.main(["--format", "rsna2024", "--pred", str(out / "submission.csv")]) == 2
    assert "needs --data-root" in capsys.readouterr().err


# ---------------------------------------------------------------------------- foraminal task
def test_foraminal_task_reads_each_side_on_its_own_t1_slice(rsna_root, tmp_path):
    from lit_spine.data.cache import CacheSettings
    from lit_spine.data.rsna_cache import build_rsna2024_cache
    from lit_spine.task import RSNA_FORAMINAL_POINTS

    task = get_task("rsna2024_foraminal")
    assert task.num_points == 10 and task.series == "Sagittal T1"
    assert RSNA_FORAMINAL_POINTS[0] == "L1/L2 left" and RSNA_FORAMINAL_POINTS[5] == "L1/L2 right"
    data = read_rsna2024(rsna_root, "rsna2024_foraminal")
    assert data.problems == [] and len(data.studies) == 4
    series = pd.read_csv(rsna_root / SERIES_CSV)
    coords = pd.read_csv(rsna_root / COORDS_CSV)
    grades = pd.read_csv(rsna_root / GRADES_CSV)
    for st in data.studies:
        (t1,) = series[(series.study_id == st.study_id)
                       & (series.series_description == "Sagittal T1")].series_id  # fmt: skip
        assert st.series_id == t1 and set(st.points) == set(RSNA_FORAMINAL_POINTS)
        for point, p in st.points.items():
            level, side = point.split()
            (rec,) = coords[(coords.study_id == st.study_id) & (coords.level == level)
                            & (coords.condition == f"{side.title()} Neural Foraminal Narrowing")
                            ].itertuples()  # fmt: skip
            assert (p.instance_number, p.x, p.y) == pytest.approx(
                (rec.instance_number, rec.x, rec.y)
            )
            col = f"{side}_neural_foraminal_narrowing_{level.lower().replace('/', '_')}"
            row = grades[grades.study_id == st.study_id].iloc[0]
            assert ["Normal/Mild", "Moderate", "Severe"][st.grades[point]] == row[col]
        # Left and right lie on different parasagittal slices.
        left = {p.instance_number for k, p in st.points.items() if k.endswith("left")}
        right = {p.instance_number for k, p in st.points.items() if k.endswith("right")}
        assert len(left) == len(right) == 1 and left != right

    # The cache: one item per side, centred on that side's slice; the other side is absent
    # from it (not moved onto a slice it does not lie on).
    settings = CacheSettings(image_size=64, neighbors=1)
    cache = build_rsna2024_cache(rsna_root, settings, tmp_path / "cache",
                                 task="rsna2024_foraminal", progress=False)  # fmt: skip
    assert len(cache.records) == 2 * 4 and cache.present.shape == (8, 10)
    for row, rec in enumerate(cache.records):
        st = next(s for s in data.studies if s.study_id == rec["study_id"])
        present = [p for k, p in enumerate(RSNA_FORAMINAL_POINTS) if cache.present[row, k]]
        assert present == rec["levels"] and len(present) == 5
        assert {st.points[p].instance_number for p in present} == {rec["instance_number"]}
        assert len({p.split()[1] for p in present}) == 1
    assert cache.labels.any(-1)[cache.present].all()
    # A point whose instance file is gone is reported and left out, not moved.
    root = copy_data(rsna_root, tmp_path)
    st = read_rsna2024(root, "rsna2024_foraminal").studies[0]
    st.points["L1/L2 left"].path.unlink()
    again = read_rsna2024(root, "rsna2024_foraminal")
    assert "L1/L2 left" not in again.studies[0].points
    assert any("not found; point skipped" in p for p in again.problems)
    with pytest.raises(ValueError, match="is not an rsna2024 task"):
        read_rsna2024(rsna_root, "spider_disc")


def test_foraminal_training_step_logloss_and_prediction_files(tmp_path):
    from lit_spine.evaluate_layouts import evaluate_rsna2024
    from lit_spine.module import SpineModule
    from lit_spine.predict_layouts import write_layout_predictions

    dm = phantom_datamodule(tmp_path, RSNA_DM, task="rsna2024_foraminal", slices=1, augment=False)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["points"].shape[1:] == (10, 2) and batch["labels"].shape[1:] == (10, 3)
    net = SpineNet("resnet18", vocab="rsna2024_severity", task="rsna2024_foraminal",
                   head_channels=32)  # fmt: skip
    module = SpineModule(net)
    assert module.rsna_logloss_name == "rsna_foraminal_logloss"
    checked_losses(module, batch)
    with torch.no_grad():
        pred = module._predict(batch["image"])
    module._update_rsna_logloss(pred["disc_probs"], batch)
    (grades,) = module.val_rsna_logloss.grades
    probs = module.val_rsna_logloss.probs[0]
    # One weighted log loss over the graded levels of both sides (the competition's
    # 'foraminal' condition), not a mean of sides.
    assert (grades >= 0).any()
    assert float(module.val_rsna_logloss.compute()) == pytest.approx(
        rsna_weighted_logloss(probs, grades)
    )

    # Prediction files: left and right rows of the competition's conditions, each from the
    # item of its own slice; evaluate scores both conditions.
    data = dm.val_dataset
    cache, indices = data.cache, list(data.indices)
    task = get_task("rsna2024_foraminal")
    out = tmp_path / "predict"
    write_layout_predictions(out, _perfect_outputs(cache, indices), cache, task,
                             task.vocabulary(), None)  # fmt: skip
    submission = pd.read_csv(out / "submission.csv")
    studies = sorted({cache.records[i]["study_id"] for i in indices})
    assert len(submission) == 10 * len(studies)
    assert f"{studies[0]}_left_neural_foraminal_narrowing_l1_l2" in set(submission.row_id)
    assert f"{studies[0]}_right_neural_foraminal_narrowing_l5_s1" in set(submission.row_id)
    ev = evaluate_rsna2024(out / "submission.csv", tmp_path / "phantom" / "rsna2024")
    assert ev.metrics["rsna_left_foraminal_logloss"] == pytest.approx(-math.log(0.8))
    assert ev.metrics["rsna_right_foraminal_logloss"] == pytest.approx(-math.log(0.8))
    assert ev.metrics["rsna_foraminal_logloss"] == pytest.approx(-math.log(0.8))
    assert ev.metrics["rsna_foraminal_logloss_levels"] == 10 * len(studies)
    assert ev.metrics["localisation_same_instance_rate"] == 1.0
    assert ev.metrics["localisation_mre_mm"] == pytest.approx(0.0, abs=1e-3)
