"""SPIDER's `spider_spine` task: vertebra and disc points from the masks, the disc findings
mapped from the gradings CSV (hand-computed labels for given rows), the phantom read back, a
hand-made sample in the real format, one training step, a short real `lit-spine fit`,
predict and evaluate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from spine_helpers import (
    fit_on_phantom,
    phantom_datamodule,
    predict_run,
    train_one_step,
    write_labelled_predictions,
)

from lit_spine.commands import inspect
from lit_spine.data.spider import (
    GRADING_COLUMNS,
    GRADINGS_CSV,
    IMAGES_DIR,
    MASKS_DIR,
    finding_codes,
    read_spider,
)
from lit_spine.phantom.spider import write_spider_phantom
from lit_spine.task import RSNA_LEVELS, get_task

SIZE = 48
SPINE = ("L1", "L1/L2", "L2", "L2/L3", "L3", "L3/L4", "L4", "L4/L5", "L5", "L5/S1")


@pytest.fixture(scope="module")
def spider(tmp_path_factory):
    root = tmp_path_factory.mktemp("spider_spine") / "data"
    write_spider_phantom(root, studies=3, seed=0, size=SIZE)
    return root


def _row(**values):
    return {"Modic": 0, "Disc herniation": 0, "Disc bulging": 0, "Disc narrowing": 0} | values


def test_task_and_vocabulary():
    task = get_task("spider_spine")
    assert task.point_names == SPINE
    assert task.point_kinds == ("vertebra", "disc") * 5
    vocab = task.vocabulary()
    assert vocab.name == "spider_findings" and task.vocabulary("spider_findings") is vocab
    assert vocab.classes == (
        "vertebra/v1", "disc/v1", "disc/v2", "disc/v3", "disc/v4", "disc/v5",
    )  # fmt: skip
    with pytest.raises(ValueError, match="does not belong to task 'spider_spine'"):
        task.vocabulary("spider_pfirrmann")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (_row(), ("v1",)),  # no finding: normal
        (_row(Modic=2), ("v2",)),  # Modic type 2 -> Modic change
        (_row(Modic=3, **{"Disc narrowing": 1}), ("v2", "v5")),
        (_row(**{"Disc herniation": 1, "Disc narrowing": 1}), ("v3", "v5")),
        (_row(**{"Disc bulging": 1}), ("v4",)),
        (
            _row(Modic=1, **{"Disc herniation": 1, "Disc bulging": 1, "Disc narrowing": 1}),
            ("v2", "v3", "v4", "v5"),
        ),  # fmt: skip
        # Endplates, spondylolisthesis and Pfirrmann are not findings of this vocabulary.
        (_row(**{"UP endplate": 1, "Spondylolisthesis": 1, "Pfirrman grade": 5}), ("v1",)),
    ],
)
def test_findings_mapping_table(values, expected):
    assert finding_codes(values) == expected


def test_every_finding_code_has_its_column():
    from lit_spine.data.datamodule import FORMAT_TASKS
    from lit_spine.data.spider import FINDING_COLUMNS, SPIDER_TASKS
    from lit_spine.task import SPIDER_FINDING_NAMES, SPIDER_FINDINGS

    assert set(FINDING_COLUMNS) | {"v1"} == set(SPIDER_FINDINGS) == set(SPIDER_FINDING_NAMES)
    assert FORMAT_TASKS["spider"] == SPIDER_TASKS


def test_missing_finding_column_gives_no_labels():
    values = _row()
    del values["Disc bulging"]  # the reader left an unparseable value out
    assert finding_codes(values) is None  # unknown, not "absent"
    assert finding_codes({}) is None


def test_phantom_read_back(spider):
    data = read_spider(spider, "spider_spine")
    assert data.problems == [] and [st.patient for st in data.studies] == [1, 2, 3]
    grades = pd.read_csv(spider / GRADINGS_CSV)
    assert grades["Modic"].gt(0).any() and grades["Disc herniation"].eq(1).any()
    names = {"Modic": "v2", "Disc herniation": "v3", "Disc bulging": "v4", "Disc narrowing": "v5"}
    for st in data.studies:
        assert set(SPINE) <= set(st.points) and set(st.labels) == set(SPINE)
        for level in SPINE[0::2]:
            assert st.labels[level] == ("v1",)
        # Vertebra k lies between the disc above and the disc below (rows grow downward).
        for k, level in enumerate(SPINE[0::2]):
            above = "T12/L1" if k == 0 else RSNA_LEVELS[k - 1]
            below = RSNA_LEVELS[k]
            assert st.points[above].y < st.points[level].y < st.points[below].y
            assert st.points[level].label == 5 - k  # L1 = 5 .. L5 = 1
        rows = grades[grades.Patient == st.patient]
        for level in RSNA_LEVELS:
            (rec,) = rows[rows["IVD label"] == RSNA_LEVELS[::-1].index(level) + 1].to_dict(
                "records"
            )
            expected = tuple(code for column, code in names.items() if rec[column] > 0)
            assert st.labels[level] == (expected or ("v1",)), (st.patient, level, rec)


def _write(path, array, spacing):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def test_hand_made_sample_in_the_real_format(tmp_path):
    """A TSE-ordered volume (axis 0 = left, 1 = posterior, 2 = superior) with L5, L4 and
    their discs on the mid slice, and two gradings rows, one with an empty bulging value."""
    shape = (24, 16, 3)  # numpy (z = superior, y = posterior, x = left)
    mask = np.zeros(shape, np.uint8)
    mask[0:2, 3:9, 1] = 201  # L5/S1
    mask[3:7, 2:10, 1] = 1  # L5: z 3-6, y 2-9
    mask[8:10, 3:9, 1] = 202  # L4/L5
    mask[11:15, 2:8, 1] = 2  # L4: z 11-14, y 2-7
    image = (100 + 10 * mask.astype(np.int16)).astype(np.int16)
    spacing = (4.0, 0.5, 0.8)
    _write(tmp_path / IMAGES_DIR / "9_t2.mha", image, spacing)
    _write(tmp_path / MASKS_DIR / "9_t2.mha", mask, spacing)
    rows = [
        dict.fromkeys(GRADING_COLUMNS, 0) | {"Patient": 9, "IVD label": 1, "Modic": 2,
                                             "Disc herniation": 1, "Pfirrman grade": 4},
        dict.fromkeys(GRADING_COLUMNS, 0) | {"Patient": 9, "IVD label": 2, "Disc bulging": "",
                                             "Pfirrman grade": 3},
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / GRADINGS_CSV, index=False)
    data = read_spider(tmp_path, "spider_spine")
    (st,) = data.studies
    # Reoriented: row = 23 - z, column = y.
    assert (st.points["L5"].x, st.points["L5"].y) == (5.5, 23 - 4.5)
    assert (st.points["L4"].x, st.points["L4"].y) == (4.5, 23 - 12.5)
    assert st.points["L4"].y_mm == pytest.approx(10.5 * 0.8)
    assert st.labels == {"L5/S1": ("v2", "v3"), "L5": ("v1",), "L4": ("v1",)}
    text = "\n".join(data.problems)
    assert "column Disc bulging '' is not one of 0, 1; left out" in text
    assert "patient 9: L4/L5 has a point but no valid Disc bulging grading" in text
    assert "L3 (label 3) not on the mid-sagittal slice 1 of 3 (absent from the mask)" in text
    assert "L4/L5" in st.points and "L4/L5" not in st.labels  # a point, no invented label


def test_inspect_task(spider, capsys):
    args = ["--format", "spider", "--task", "spider_spine", "--json", str(spider)]
    assert inspect.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "spider_spine" and out["points"] == 30
    assert out["labelled_points"] == 30 and out["problems"] == []
    assert out["studies"][0]["labels"]["L3"] == ["v1"]
    assert inspect.main(["--format", "spider", "--task", "spider_spine", str(spider)]) == 0
    assert "findings L1/L2:" in capsys.readouterr().out
    assert inspect.main(["--format", "spider", "--task", "rsna2024_canal", str(spider)]) == 2
    assert "does not fit --format spider" in capsys.readouterr().err


# `phantom_datamodule` settings of these tests: spider_spine on a 4-study phantom, 2 folds.
SPINE_DM = dict(
    format="spider", task="spider_spine", vocab="spider_findings", phantom_studies=4,
    folds=2, slices=1, batch_size=2, augment=False,
)  # fmt: skip


def test_datamodule_one_training_step(tmp_path):
    from lit_spine.models.net import SpineNet
    from lit_spine.module import SpineModule

    dm = phantom_datamodule(tmp_path, SPINE_DM)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.task.name == "spider_spine" and dm.task.num_points == 10
    batch = next(iter(dm.train_dataloader()))
    # Per point its own kind's codes (max(1, 5) columns): vertebra v1 only; discs v1 .. v5.
    assert batch["image"].shape == (2, 1, 64, 64) and batch["labels"].shape == (2, 10, 5)
    labels = batch["labels"]
    assert labels[:, 0::2, 0].all() and not labels[:, 0::2, 1:].any()
    assert labels[:, 1::2].any(-1).all() and bool(batch["graded"].all())
    assert not (labels[:, 1::2, 0] & labels[:, 1::2, 1:].any(-1)).any()  # normal excludes
    # The cache holds what the reader mapped, point by point.
    cache = dm.train_dataset.cache
    data = read_spider(tmp_path / "phantom" / "spider", "spider_spine")
    truth = {st.patient: st for st in data.studies}
    vocab = dm.vocab_obj
    for row, rec in enumerate(cache.records):
        st = truth[rec["patient"]]
        for k, level in enumerate(SPINE):
            kind = dm.task.point_kinds[k]
            want = {vocab.class_index(kind, c) for c in st.labels[level]}
            assert set(np.flatnonzero(cache.labels[row, k]).tolist()) == want
    net = SpineNet("resnet18", vocab="spider_findings", task="spider_spine", head_channels=32)
    module = SpineModule(net)
    train_one_step(module, batch)
    assert net.classifier.vertebra.weight.shape[0] == 1


def test_prediction_file_round_trip_through_evaluate(tmp_path):
    from lit_spine.evaluate_layouts import evaluate_spider

    dm = phantom_datamodule(tmp_path, SPINE_DM)
    dm.prepare_data()
    dm.setup("predict")
    cache, indices = dm.predict_dataset.cache, list(dm.predict_dataset.indices)
    n = len(indices)
    # Vertebrae (even points) have one class, v1; discs (odd points) the other five.
    (path,) = write_labelled_predictions(
        tmp_path / "predict",
        cache,
        indices,
        get_task("spider_spine"),
        lambda probs: (probs[:, 0::2, :1], probs[:, 1::2, 1:]),
    )
    pred = pd.read_csv(path)
    assert len(pred) == 10 * n and list(pred.columns[-6:]) == [
        "p_vertebra", "p_normal", "p_modic", "p_herniation", "p_bulging", "p_narrowing",
    ]  # fmt: skip
    vert, disc = pred[pred.level.isin(SPINE[0::2])], pred[pred.level.isin(RSNA_LEVELS)]
    assert (vert.labels == "vertebra").all() and vert.p_normal.isna().all()
    assert disc.p_vertebra.isna().all()
    data = read_spider(tmp_path / "phantom" / "spider", "spider_spine")
    truth = {st.patient: st for st in data.studies}
    names = {"v1": "normal", "v2": "modic", "v3": "herniation", "v4": "bulging", "v5": "narrowing"}
    for _, r in disc.iterrows():
        want = {names[c] for c in truth[r.patient].labels[r.level]}
        assert set(r.labels.split()) == want, (r.patient, r.level)
    ev = evaluate_spider(path, tmp_path / "phantom" / "spider")
    assert ev.metrics["map"] == pytest.approx(1.0) and ev.metrics["studies_scored"] == n
    assert ev.detection.n_gt_points == 10 * n
    # A disc row claiming the vertebra class is refused, not scored as a disc finding.
    pred.loc[pred.index[1], "labels"] = "vertebra"
    pred.to_csv(path, index=False)
    ev = evaluate_spider(path, tmp_path / "phantom" / "spider")
    assert any("not valid for a disc point; row skipped" in p for p in ev.problems)


def test_fit_predict_evaluate_through_cli(tmp_path, capsys):
    from lit_spine.commands import evaluate as evaluate_cmd

    settings = ("--data.task=spider_spine", "--data.vocab=spider_findings")
    run, config, state = fit_on_phantom(tmp_path, "spider.yaml", "spine", *settings, studies=4,
                                        batch_size=2)  # fmt: skip
    assert config["data.task"] == "spider_spine" and config["data.vocab"] == "spider_findings"
    assert state["net.heatmap.weight"].shape[0] == 10
    assert state["net.classifier.vertebra.weight"].shape[0] == 1
    assert state["net.classifier.disc.weight"].shape[0] == 5
    diagnostics = json.loads((run / "diagnostics.json").read_text())
    assert [lv["name"] for lv in diagnostics["per_level"]["levels"]] == list(SPINE)
    predict_run(run)
    pred = pd.read_csv(run / "predict" / "predictions.csv")
    assert len(pred) == 2 * 10 and list(pred.level[:10]) == list(SPINE)
    capsys.readouterr()
    assert evaluate_cmd.main(["--format", "spider", "--pred", str(run / "predict" / "predictions.csv"),
                              "--data-root", str(tmp_path / "phantom" / "spider"),
                              "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["studies_scored"] == 2
    assert result["detection"]["n_gt_points"] == 20
