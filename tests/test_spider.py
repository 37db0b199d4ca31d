"""SPIDER layout: the phantom read back against its truth, a hand-made sample in the real
format, bad rows and files reported, the mask-label-to-level mapping, and training on it
(one step through the data module, a short real `lit-spine fit`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from spine_helpers import (
    copy_data,
    fit_on_phantom,
    phantom_datamodule,
    predict_run,
    train_one_step,
    write_labelled_predictions,
)

from lit_spine.commands import inspect, phantom
from lit_spine.data.spider import (
    GRADING_COLUMNS,
    GRADINGS_CSV,
    IMAGES_DIR,
    MASKS_DIR,
    SpiderFormatError,
    label_level,
    mask_points,
    mha_header,
    read_spider,
)
from lit_spine.models.net import SpineNet
from lit_spine.phantom.spider import write_spider_phantom
from lit_spine.task import RSNA_LEVELS, get_task

SIZE = 48


@pytest.fixture(scope="module")
def spider(tmp_path_factory):
    root = tmp_path_factory.mktemp("spider") / "data"
    truth = write_spider_phantom(root, studies=3, seed=0, size=SIZE)
    return root, truth


def test_phantom_layout_read_back(spider):
    root, truth = spider
    grades = pd.read_csv(root / GRADINGS_CSV)
    assert tuple(grades.columns) == GRADING_COLUMNS
    assert sorted(p.name for p in (root / IMAGES_DIR).iterdir()) == [
        f"{p}_{s}.mha" for p in (1, 2, 3) for s in ("t1", "t2")
    ]
    # Both axis orders SPIDER uses are written (TSE: LPS, SPACE: PIR), and read the same.
    matrices = {mha_header(root / MASKS_DIR / f"{p}_t2.mha")["TransformMatrix"] for p in (1, 2)}
    assert len(matrices) == 2
    data = read_spider(root)
    assert data.problems == [] and data.series_found == 6
    assert [st.patient for st in data.studies] == [1, 2, 3]
    for st in data.studies:
        assert st.series == "t2" and st.shape == (SIZE, SIZE)
        # spacing from the header: the phantom's plane spacing, never a default 1 mm
        image = sitk.ReadImage(str(st.image_path))
        assert sorted(st.spacing_mm) == pytest.approx(sorted(image.GetSpacing()))
        assert min(st.spacing_mm) > 3.0
        for level, (x, y) in truth[st.patient].items():
            p = st.points[level]
            assert math.hypot(p.x - x, p.y - y) < 1.0, (st.patient, level, p, x, y)
            assert p.x_mm == pytest.approx(p.x * st.spacing_mm[1])
            assert p.y_mm == pytest.approx(p.y * st.spacing_mm[0])
        assert {"L1", "L5"} <= set(st.points)  # vertebrae from the masks as well
        rows = grades[grades.Patient == st.patient]
        for level in RSNA_LEVELS:
            ivd = RSNA_LEVELS[::-1].index(level) + 1  # IVD label 1 = L5/S1
            (g,) = rows[rows["IVD label"] == ivd]["Pfirrman grade"]
            assert st.grades[level] == g - 1


def _write(path, array, spacing, direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _hand_made(root, patient=7, drop_spacing=False):
    """A 3-slice T2 volume stored as SPIDER's TSE series are (axis 0 = patient left, 1 =
    posterior, 2 = superior), its mask and one gradings row."""
    shape = (20, 16, 3)  # numpy (z = superior, y = posterior, x = left)
    mask = np.zeros(shape, np.uint8)
    mask[2:5, 3:9, 1] = 1  # L5, mid slice
    mask[10:12, 4:8, 1] = 203  # L3/L4 disc, mid slice only
    mask[13:16, 3:9, :] = 3  # L3, all slices
    mask[6:8, 4:8, 0] = 202  # L4/L5 on a lateral slice only
    mask[:, 12:14, 1] = 100  # canal
    image = (100 + 10 * mask.astype(np.int16)).astype(np.int16)
    spacing = (4.0, 0.5, 0.8)  # x (slice), y (posterior), z (superior) in mm
    _write(root / IMAGES_DIR / f"{patient}_t2.mha", image, spacing)
    _write(root / MASKS_DIR / f"{patient}_t2.mha", mask, spacing)
    if drop_spacing:
        path = root / MASKS_DIR / f"{patient}_t2.mha"
        lines = path.read_bytes().split(b"\n")
        path.write_bytes(b"\n".join(ln for ln in lines if not ln.startswith(b"ElementSpacing")))
    row = dict.fromkeys(GRADING_COLUMNS, 0) | {"Patient": patient, "IVD label": 3}
    row["Pfirrman grade"] = 4
    pd.DataFrame([row]).to_csv(root / GRADINGS_CSV, index=False)


def test_hand_made_sample_in_the_real_format(tmp_path):
    _hand_made(tmp_path)
    data = read_spider(tmp_path)
    (st,) = data.studies
    assert (st.patient, st.series, st.n_slices, st.slice_index) == (7, "t2", 3, 1)
    assert st.shape == (20, 16) and st.spacing_mm == (0.8, 0.5, 4.0)  # (row, col, slice)
    # Reoriented to columns posterior, rows inferior: row = 19 - z, column = y.
    p = st.points["L3/L4"]
    assert (p.label, p.x, p.y) == (203, 5.5, 19 - 10.5)
    assert (p.x_mm, p.y_mm) == pytest.approx((5.5 * 0.5, 8.5 * 0.8))
    assert st.points["L5"].y == pytest.approx(19 - 3.0)
    assert st.grades == {"L3/L4": 3}  # Pfirrmann 4
    text = "\n".join(data.problems)
    assert (
        "L4/L5 (label 202) not on the mid-sagittal slice 1 of 3 (present on other slices)" in text
    )
    assert "L1/L2 (label 205) not on the mid-sagittal slice 1 of 3 (absent from the mask)" in text
    assert "L4/L5" not in st.points  # never moved onto the mid slice


def test_missing_spacing_refused_not_defaulted(tmp_path):
    _hand_made(tmp_path, drop_spacing=True)
    data = read_spider(tmp_path)
    assert data.studies == []
    (problem,) = data.problems
    assert "7_t2.mha: the MetaImage header has no ElementSpacing" in problem
    assert "no default spacing is assumed" in problem


def test_bad_rows_and_files_reported_and_skipped(spider, tmp_path):
    root = copy_data(spider[0], tmp_path)
    csv = pd.read_csv(root / GRADINGS_CSV, dtype=str)
    csv.loc[0, "Patient"] = "x"
    csv.loc[1, "IVD label"] = "0"
    csv.loc[2, "Pfirrman grade"] = "7"
    csv.loc[3, "Modic"] = "9"
    csv = pd.concat([csv, csv.iloc[[4]]])
    csv.to_csv(root / GRADINGS_CSV, index=False)
    (root / IMAGES_DIR / "notes.mha").write_text("x")
    (root / MASKS_DIR / "2_t2.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")
    (root / MASKS_DIR / "3_t2.mha").unlink()
    data = read_spider(root)
    assert [st.patient for st in data.studies] == [1]  # one good study of three is kept
    text = "\n".join(data.problems)
    path = root / GRADINGS_CSV
    assert f"{path} row 2: column Patient 'x' is not an integer" in text
    assert f"{path} row 3 (patient 1): column IVD label '0' is not an integer 1-25" in text
    assert (
        f"{path} row 4 (patient 1): column Pfirrman grade '7' is not one of 1, 2, 3, 4, 5" in text
    )
    assert f"{path} row 5 (patient 1): column Modic '9' is not one of 0, 1, 2, 3" in text
    assert "second row for IVD label" in text
    assert "notes.mha: name is not <patient>_<t1|t2|t2_SPACE>.mha" in text
    assert "patient 2: " in text and "2_t2.mha" in text
    assert f"patient 3: mask {root / MASKS_DIR / '3_t2.mha'} not found" in text
    (st,) = data.studies
    graded = {lv for lv in RSNA_LEVELS if lv in st.grades}
    assert len(graded) == 3  # rows 2 (Patient x), 3 (IVD 0) and 4 (grade 7) give no grade
    csv.drop(columns=["Disc bulging"]).to_csv(root / GRADINGS_CSV, index=False)
    with pytest.raises(SpiderFormatError, match="missing column.s. Disc bulging; found Patient"):
        read_spider(root)


def _one_problem(data, start):
    """The one problem line that starts with `start`; it is one line."""
    (line,) = [p for p in data.problems if p.startswith(start)]
    assert "\n" not in line and "\\n" not in line, line
    return line


def test_unreadable_image_file_skips_only_that_patient(spider, tmp_path):
    # A dangling symlink and a folder under a series file's name: reported, not raised.
    root = copy_data(spider[0], tmp_path)
    link, folder = root / IMAGES_DIR / "2_t2.mha", root / IMAGES_DIR / "3_t2.mha"
    link.unlink()
    link.symlink_to(tmp_path / "missing" / "2_t2.mha")
    folder.unlink()
    folder.mkdir()
    data = read_spider(root)
    assert [st.patient for st in data.studies] == [1]
    assert _one_problem(data, "patient 2:") == (
        f"patient 2: {link}: cannot be read (No such file or directory); study skipped"
    )
    assert _one_problem(data, "patient 3:") == (
        f"patient 3: {folder}: cannot be read (Is a directory); study skipped"
    )


def test_two_file_names_of_one_patient_series_reported(spider, tmp_path):
    # 01_t2.mha and 1_t2.mha are both patient 1's t2: neither is used, both are named.
    root = copy_data(spider[0], tmp_path)
    for folder in (IMAGES_DIR, MASKS_DIR):
        (root / folder / "01_t2.mha").write_bytes((root / folder / "2_t2.mha").read_bytes())
    data = read_spider(root)
    assert [st.patient for st in data.studies] == [2, 3] and data.series_found == 7
    a, b = root / IMAGES_DIR / "01_t2.mha", root / IMAGES_DIR / "1_t2.mha"
    assert f"patient 1: {a} and {b} are both its t2 series" in data.problems[0]
    assert "series skipped" in data.problems[0]


def test_truncated_image_reported_by_reader_and_inspect(spider, tmp_path, capsys):
    # The phantom's compressed image (CompressedDataSize) and a raw one (DimSize x type).
    root = copy_data(spider[0], tmp_path)
    path = root / IMAGES_DIR / "2_t2.mha"
    path.write_bytes(path.read_bytes()[:-100])
    data = read_spider(root)
    assert [st.patient for st in data.studies] == [1, 3]
    line = _one_problem(data, "patient 2:")
    assert f"{path}: pixel data has " in line and "CompressedDataSize needs" in line
    assert line.endswith("the file is truncated; study skipped")
    assert inspect.main(["--format", "spider", str(root)]) == 0
    out = capsys.readouterr().out
    assert "2 patients kept" in out and f"{path}: pixel data has" in out
    _hand_made(tmp_path / "raw")
    path = tmp_path / "raw" / IMAGES_DIR / "7_t2.mha"
    path.write_bytes(path.read_bytes()[:-1])
    data = read_spider(tmp_path / "raw")
    assert data.studies == []
    line = _one_problem(data, "patient 7:")
    assert f"{path}: pixel data has {20 * 16 * 3 * 2 - 1} bytes, the header's DimSize x " in line
    assert f"MET_SHORT needs {20 * 16 * 3 * 2}; the file is truncated" in line


def _edit_header(path, key, value):
    lines = path.read_bytes().split(b"\n")
    lines = [f"{key} = {value}".encode() if ln.startswith(key.encode()) else ln for ln in lines]
    path.write_bytes(b"\n".join(lines))


def test_bad_header_keys_named_in_one_line(spider, tmp_path):
    root = copy_data(spider[0], tmp_path)
    image, mask = root / IMAGES_DIR / "1_t2.mha", root / MASKS_DIR / "2_t2.mha"
    _edit_header(image, "ElementSpacing", "0.5 0.5")  # ITK: 'No such file or directory'
    _edit_header(mask, "DimSize", "48 0 3")
    _edit_header(root / IMAGES_DIR / "3_t2.mha", "ElementType", "MET_NOTATYPE")
    data = read_spider(root)
    assert data.studies == []
    assert _one_problem(data, "patient 1:") == (
        f"patient 1: {image}: ElementSpacing '0.5 0.5' has 2 values for NDims 3; study skipped"
    )
    assert _one_problem(data, "patient 2:") == (
        f"patient 2: {mask}: DimSize '48 0 3' is not 3 positive integers; study skipped"
    )
    line = _one_problem(data, "patient 3:")  # left to ITK: its message, on one line
    assert "3_t2.mha: not a readable MetaImage (" in line and ".cxx" not in line


def test_gradings_of_a_patient_without_volumes_reported(spider, tmp_path):
    root = copy_data(spider[0], tmp_path)
    csv = pd.read_csv(root / GRADINGS_CSV, dtype=str)
    extra = csv[csv.Patient == "1"].assign(Patient="77")
    pd.concat([csv, extra]).to_csv(root / GRADINGS_CSV, index=False)
    data = read_spider(root)
    assert [st.patient for st in data.studies] == [1, 2, 3]
    assert data.problems == [
        f"{root / GRADINGS_CSV} (patient 77): {len(extra)} graded disc(s) but no "
        f"{IMAGES_DIR}/77_<series>.mha; rows unused"
    ]


def test_mask_label_to_level_mapping():
    assert label_level(1) == ("vertebra", "L5")
    assert label_level(5) == ("vertebra", "L1")
    assert label_level(6) == ("vertebra", "T12")
    assert label_level(201) == ("disc", "L5/S1")
    assert label_level(205) == ("disc", "L1/L2")
    assert label_level(206) == ("disc", "T12/L1")
    assert label_level(100) == ("canal", "canal")
    assert label_level(103) == ("partial vertebra", "L3")
    assert label_level(0) is None and label_level(150) is None
    plane = np.zeros((10, 8), np.int32)
    plane[1:3, 2:4] = 2  # L4: rows 1-2, columns 2-3
    plane[4, 1:6] = 202  # L4/L5: row 4, columns 1-5
    plane[8, 0] = 77  # undocumented
    points, unknown = mask_points(plane, (0.7, 0.4))
    assert unknown == [77] and set(points) == {"L4", "L4/L5"}
    assert (points["L4"].x, points["L4"].y) == (2.5, 1.5)
    assert (points["L4/L5"].x, points["L4/L5"].y, points["L4/L5"].label) == (3.0, 4.0, 202)
    assert (points["L4/L5"].x_mm, points["L4/L5"].y_mm) == pytest.approx((1.2, 2.8))


def test_numbering_without_bottom_vertebra_refused(tmp_path):
    _hand_made(tmp_path)
    path = tmp_path / MASKS_DIR / "7_t2.mha"
    mask = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(mask)
    arr[arr == 1] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(mask)
    sitk.WriteImage(out, str(path))
    data = read_spider(tmp_path)
    assert data.studies == []
    assert "numbering from the bottom (1 = L5) cannot be anchored" in data.problems[0]


def test_phantom_and_inspect_commands(tmp_path, capsys):
    root = tmp_path / "data"
    assert phantom.main(["--layout", "spider", "--studies", "2", "--size", "40",
                         "--out", str(root)]) == 0  # fmt: skip
    capsys.readouterr()
    assert inspect.main(["--format", "spider", "--json", str(root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "spider" and out["num_studies"] == 2 and out["series_files"] == 4
    assert out["points"] == 10 and out["grades"] == 10 and out["problems"] == []
    first = out["studies"][0]
    assert first["patient"] == 1 and set(RSNA_LEVELS) <= set(first["points"])
    assert set(first["pfirrmann"].values()) <= {1, 2, 3, 4, 5}
    (root / MASKS_DIR / "2_t2.mha").unlink()
    assert inspect.main(["--format", "spider", str(root)]) == 0
    captured = capsys.readouterr()
    assert "1 patients kept" in captured.out
    assert "patient 2: mask" in captured.out and "not found; patient skipped" in captured.out


# `phantom_datamodule` settings of these tests: spider_disc on a 4-study phantom, 2 folds.
SPIDER_DM = dict(
    format="spider", task="spider_disc", vocab="spider_pfirrmann", phantom_studies=4,
    folds=2, slices=3, batch_size=2,
)  # fmt: skip


def test_datamodule_one_training_step(tmp_path):
    from lit_spine.module import SpineModule

    dm = phantom_datamodule(tmp_path, SPIDER_DM, slices=1, augment=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.root == tmp_path / "phantom" / "spider"
    assert (
        dm.task.num_points == 5 and len(dm.vocab_obj.disc) == 5 and len(dm.vocab_obj.vertebra) == 0
    )
    cache = dm.train_dataset.cache
    train = {cache.records[r]["patient"] for r in dm.train_dataset.indices}
    val = {cache.records[r]["patient"] for r in dm.val_dataset.indices}
    assert train and val and not train & val and train | val == {1, 2, 3, 4}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 64, 64) and batch["labels"].shape == (2, 5, 5)
    assert bool(batch["graded"].all()) and bool(batch["present"].all())
    net = SpineNet("resnet18", vocab="spider_pfirrmann", task="spider_disc", head_channels=32)
    module = SpineModule(net, class_loss="ce", multi_label=False)
    assert module.task.name == "spider_disc"
    train_one_step(module, batch)
    with pytest.raises(ValueError, match="data.folds >= 2"):
        phantom_datamodule(tmp_path, SPIDER_DM, folds=1)
    with pytest.raises(ValueError, match=r"does not fit data.format 'spider'.*spider: spider_disc"):
        phantom_datamodule(tmp_path, SPIDER_DM, task="rsna2024_canal", vocab="rsna2024_severity")


def test_fit_through_cli(tmp_path, capsys):
    run, config, state = fit_on_phantom(tmp_path, "spider.yaml", "spider", studies=4, batch_size=2)
    assert config["data.task"] == "spider_disc" and config["data.format"] == "spider"
    assert state["net.heatmap.weight"].shape[0] == get_task("spider_disc").num_points
    assert state["net.classifier.disc.weight"].shape[0] == 5
    diagnostics = json.loads((run / "diagnostics.json").read_text())
    assert diagnostics["task"] == "spider_disc"
    assert [lv["name"] for lv in diagnostics["per_level"]["levels"]] == list(RSNA_LEVELS)

    # predict on the checkpoint writes predictions.csv; evaluate scores it with the metric.
    from lit_spine.commands import evaluate as evaluate_cmd

    predict_run(run)
    pred = pd.read_csv(run / "predict" / "predictions.csv")
    assert len(pred) == 2 * 5 and set(pred.level) == set(RSNA_LEVELS)
    grade_probs = pred[[f"pfirrmann_{g}" for g in range(1, 6)]].to_numpy()
    assert ((grade_probs >= 0) & (grade_probs <= 1)).all()  # sigmoid head: need not sum to 1
    assert (grade_probs.argmax(1) + 1 == pred.grade).all()
    capsys.readouterr()
    assert evaluate_cmd.main(["--format", "spider", "--pred", str(run / "predict" / "predictions.csv"),
                              "--data-root", str(tmp_path / "phantom" / "spider"),
                              "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert (
        result["metrics"]["studies_scored"] == 2 and result["metrics"]["studies_not_predicted"] == 2
    )
    assert result["detection"]["n_gt_points"] == 10


def test_prediction_file_round_trip_through_evaluate(tmp_path, capsys):
    from lit_spine.evaluate_layouts import LayoutEvaluationError, evaluate_spider

    dm = phantom_datamodule(tmp_path, SPIDER_DM, slices=1)
    dm.prepare_data()
    dm.setup("predict")
    cache, indices = dm.predict_dataset.cache, list(dm.predict_dataset.indices)
    n = len(indices)
    # spider_disc has no vertebra head: every class column is a disc's.
    (path,) = write_labelled_predictions(
        tmp_path / "predict",
        cache,
        indices,
        get_task("spider_disc"),
        lambda probs: (np.zeros((len(probs), 0, 0), np.float32), probs),
    )
    pred = pd.read_csv(path)
    root = tmp_path / "phantom" / "spider"
    data = read_spider(root)
    truth = {st.patient: st for st in data.studies}
    for _, r in pred.iterrows():
        st = truth[r.patient]
        p = st.points[r.level]
        assert (r.series, r.slice_index) == (st.series, st.slice_index)
        assert (r.x, r.y) == pytest.approx((p.x, p.y), abs=1e-3)
        assert (r.x_mm, r.y_mm) == pytest.approx((p.x_mm, p.y_mm), abs=1e-3)
        assert r.grade == st.grades[r.level] + 1 and str(r.labels) == str(r.grade)
    ev = evaluate_spider(path, root)
    assert ev.metrics["map"] == pytest.approx(1.0) and ev.metrics["studies_scored"] == n
    assert ev.detection.localisation["all"].mre_mm == pytest.approx(0.0, abs=1e-3)

    # A point 10 mm off (in rows) misses at R = 8 mm; its grade no longer counts.
    row_mm = truth[pred.patient[0]].spacing_mm[0]
    pred.loc[0, "y"] += 10.0 / row_mm
    pred.loc[len(pred)] = pred.loc[1].copy()
    pred.loc[len(pred) - 1, "patient"] = 999
    pred.to_csv(path, index=False)
    with pytest.raises(LayoutEvaluationError, match="999.*--ignore-unknown"):
        evaluate_spider(path, root)
    ev = evaluate_spider(path, root, ignore_unknown=True)
    assert ev.detection.localisation["all"].mre_mm == pytest.approx(10.0 / (5 * n), abs=1e-3)
    assert ev.detection.tp == 5 * n - 1 and any("patient 999" in p for p in ev.problems)
