"""`lit-spine evaluate`: same numbers as the training-time metric, DICOM spacing, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from dicom_factory import write_slice
from test_metrics import _study_ordered_case, batches_from_case

from lit_spine import cli
from lit_spine.commands.evaluate import main
from lit_spine.data.annotation import Point, StudyAnnotation, write_annotations
from lit_spine.data.dicom import read_spacing_for_instances
from lit_spine.data.labels import POINT_NAMES, get_vocabulary
from lit_spine.metrics import PredictionArrays, SpineDetectionMetric, score_detections

VOCAB = get_vocabulary("tianchi2020")
SPACINGS = [(0.625, 0.75), (0.5, 0.5), (0.875, 0.6875), (0.75, 0.75)]


def write_dicom(path, study_uid, instance_uid, spacing):
    """A blank MR slice (large enough for every point) carrying study, instance and spacing."""
    write_slice(
        path,
        np.zeros((320, 320)),
        study_uid=study_uid,
        series_uid=study_uid + ".7",
        description="T2 sag",
        instance_uid=instance_uid,
        spacing=spacing,
    )


def exact_case(n_studies=4, seed=11):
    """A random case whose coordinates and scores survive the JSON writer unchanged."""
    gt, pred, _ = _study_ordered_case(seed, n=n_studies)
    spacing = np.array(SPACINGS * (n_studies // len(SPACINGS) + 1))[:n_studies]
    pred = PredictionArrays(
        pred.study, pred.point, pred.cls, np.round(pred.xy * 8) / 8, np.round(pred.score * 64) / 64
    )
    gt = type(gt)(gt.study, gt.point, np.round(gt.xy * 8) / 8, gt.labels)
    return gt, pred, spacing


def to_studies(gt, pred, n_studies):
    """Annotation-schema studies: GT points with all labels; one predicted point per row."""
    classes = VOCAB.classes
    gts, preds = [], []
    for s in range(n_studies):
        uid, inst = f"1.2.826.0.1.{s}", f"1.2.826.0.1.{s}.7.1"
        g = StudyAnnotation(uid, f"{uid}.7", inst)
        for i in np.flatnonzero(gt.study == s):
            codes = tuple(classes[c].split("/")[1] for c in np.flatnonzero(gt.labels[i]))
            g.points.append(
                Point(POINT_NAMES[gt.point[i]], *map(float, gt.xy[i]), codes, z_index=0)
            )
        p = StudyAnnotation(uid, f"{uid}.7", inst)
        for j in np.flatnonzero(pred.study == s):
            code = classes[pred.cls[j]].split("/")[1]
            p.points.append(
                Point(
                    POINT_NAMES[pred.point[j]],
                    *map(float, pred.xy[j]),
                    (code,),
                    score=float(pred.score[j]),
                )
            )
        gts.append(g)
        preds.append(p)
    return gts, preds


@pytest.fixture()
def dataset(tmp_path):
    n = 4
    gt, pred, spacing = exact_case(n)
    gts, preds = to_studies(gt, pred, n)
    root = tmp_path / "data"
    for s, study in enumerate(gts):
        write_dicom(
            root / "val" / f"study{s}" / "image5.dcm",
            study.study_uid,
            study.instance_uid,
            spacing[s],
        )
        write_dicom(
            root / "val" / f"study{s}" / "image6.dcm",
            study.study_uid,
            study.instance_uid + ".2",
            (9.0, 9.0),
        )  # another slice: not the annotated one
    (root / "val" / "study0" / "broken.dcm").write_bytes(b"DICM")  # truncated: skipped
    write_annotations(root / "val_annotation.json", gts)  # the dataset layout: a split's file
    write_annotations(tmp_path / "pred.json", preds)
    return dict(
        tmp=tmp_path,
        root=root,
        gt=gt,
        pred=pred,
        spacing=spacing,
        gts=gts,
        preds=preds,
        args=[
            "--pred",
            str(tmp_path / "pred.json"),
            "--gt",
            str(root / "val_annotation.json"),
            "--data-root",
            str(root),
        ],
    )


def without_expected_problems(result, dataset):
    """The report part of evaluate's JSON, after checking that nothing was skipped and that
    the only problems are the ground truth's incomplete studies (random_case drops 3%)."""
    result = dict(result)
    assert result.pop("skipped_studies") == []
    n_incomplete = sum(len(s.points) < len(POINT_NAMES) for s in dataset["gts"])
    assert [p["kind"] for p in result.pop("problems")] == ["missing_points"] * n_incomplete
    return result


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def test_cli_json_equals_metric_on_the_same_predictions(dataset, capsys):
    rc, out, _ = run([*dataset["args"], "--json"], capsys)
    assert rc == 0
    result = json.loads(out)
    metric = SpineDetectionMetric()
    for rows, kw in batches_from_case(dataset["gt"], dataset["pred"], dataset["spacing"], 3):
        metric.update(*rows, **kw)
    expected = json.loads(json.dumps(metric.compute_report().to_dict()))
    assert without_expected_problems(result, dataset) == expected
    for key in (
        "map",
        "precision",
        "recall",
        "f1",
        "ap",
        "baseline_macro_f1",
        "keypoint_recall",
        "mre_mm",
        "sdr",
    ):
        assert key in result
    assert set(result["sdr"]) == {"2", "4", "6", "8"}
    assert result["tp"] > 0 and result["fp"] > 0
    flat = metric.compute()
    assert flat["map"] == result["map"] and flat["sdr/6mm"] == result["sdr"]["6"]


def test_cli_table_and_dispatcher(dataset, capsys):
    assert cli.main(["evaluate", *dataset["args"], "--radius-mm", "6"]) == 0
    out = capsys.readouterr().out
    assert "Point detection at R = 6 mm (4 studies" in out
    for text in (
        "disc/v5",
        "Schmorl",
        "pooled",
        "baseline macro-F1 @ 6 mm",
        "key-point recall",
        "vertebra",
        "<8mm",
    ):
        assert text in out


def test_data_root_may_be_the_split_or_the_dataset_root(dataset, capsys):
    found = read_spacing_for_instances(dataset["root"] / "val")
    assert found[dataset["gts"][2].instance_uid] == (0.875, 0.6875)
    _, by_root, _ = run([*dataset["args"], "--json"], capsys)
    args = [*dataset["args"][:-1], str(dataset["root"] / "val"), "--json"]
    _, by_split, _ = run(args, capsys)
    assert json.loads(by_root) == json.loads(by_split)


def test_spacing_override(dataset, capsys):
    rc, out, _ = run([*dataset["args"][:4], "--spacing-mm", "0.5,0.5", "--json"], capsys)
    assert rc == 0
    metric = SpineDetectionMetric()
    for rows, kw in batches_from_case(dataset["gt"], dataset["pred"], np.full((4, 2), 0.5), 4):
        metric.update(*rows, **kw)
    expected = json.loads(json.dumps(metric.compute_report().to_dict()))
    assert without_expected_problems(json.loads(out), dataset) == expected


def test_studies_absent_from_the_prediction_file_count_as_missed(dataset, capsys):
    write_annotations(dataset["tmp"] / "pred.json", dataset["preds"][1:])
    rc, out, err = run([*dataset["args"], "--json"], capsys)
    assert rc == 0
    result = json.loads(out)
    assert result["n_studies"] == 4
    assert result["localisation"]["all"]["n_missing"] >= 10
    # ... and the run says so: the lower numbers are not left unexplained.
    pred_path = str(dataset["tmp"] / "pred.json")
    uids = [s.study_uid for s in dataset["gts"]]
    (p,) = [p for p in result["problems"] if p["kind"] == "unpredicted_study"]
    assert p["file"] == pred_path
    assert p["message"] == (
        f"1 ground-truth study has no predictions ({uids[0]}); its points count as missed"
    )
    assert f"warning: {pred_path}: 1 ground-truth study has no predictions" in err
    write_annotations(dataset["tmp"] / "pred.json", [])  # an empty prediction list
    rc, out, _ = run([*dataset["args"], "--json"], capsys)
    assert rc == 0
    result = json.loads(out)
    assert result["map"] == 0.0 and result["tp"] == 0
    (p,) = [p for p in result["problems"] if p["kind"] == "unpredicted_study"]
    assert p["message"] == (
        f"4 ground-truth studies have no predictions (first: {', '.join(uids)}); their points "
        "count as missed"
    )


def test_empty_ground_truth_is_named_not_the_predictions(dataset, capsys):
    gt_path = dataset["root"] / "val_annotation.json"
    for text in ("[]", json.dumps([{"studyUid": dataset["gts"][0].study_uid}])):
        gt_path.write_text(text)
        for extra in ([], ["--ignore-unknown"]):
            rc, out, err = run([*dataset["args"], *extra], capsys)
            assert rc == 2 and out == ""
            assert f"error: no ground-truth points to score in {gt_path}" in err, err
            assert "prediction file" not in err


def test_a_point_exactly_r_away_is_a_miss(tmp_path, capsys):
    # spacing 0.5 mm: 16 px along x is exactly 8.0 mm, a miss at 8 mm, a hit at 8.5 mm.
    uid = "1.2.826.0.1.1"
    gt = StudyAnnotation(uid, f"{uid}.7", f"{uid}.7.1")
    gt.points.append(Point("L1", 100.0, 100.0, ("v2",), z_index=0))
    pred = StudyAnnotation(uid, f"{uid}.7", f"{uid}.7.1")
    pred.points.append(Point("L1", 116.0, 100.0, ("v2",), score=0.9))
    write_annotations(tmp_path / "gt.json", [gt])
    write_annotations(tmp_path / "pred.json", [pred])
    args = ["--pred", str(tmp_path / "pred.json"), "--gt", str(tmp_path / "gt.json")]
    rc, out, err = run([*args, "--spacing-mm", "0.5,0.5", "--radius-mm", "8",
                        "--baseline-radius-mm", "8", "--sdr-mm", "8,8.5", "--json"], capsys)  # fmt: skip
    assert rc == 0, err
    result = json.loads(out)
    assert result["mre_mm"] == 8.0
    assert (result["tp"], result["fp"], result["fn"]) == (0, 1, 1)
    assert result["keypoint_recall"] == 0.0
    assert result["sdr"] == {"8": 0.0, "8.5": 1.0}


# ---------------------------------------------------------------------------- rsna2024
@pytest.fixture(scope="module")
def rsna_phantom(tmp_path_factory):
    from lit_spine.commands import phantom

    root = tmp_path_factory.mktemp("rsna") / "data"
    assert phantom.main(["--layout", "rsna2024", "--studies", "4", "--out", str(root)]) == 0
    return root


@pytest.fixture()
def rsna(rsna_phantom, tmp_path):
    """A copy of the phantom's rsna2024 root (the tests edit its CSV files) and a canal
    submission.csv beside it with probabilities (0.6, 0.3, 0.1) for every level."""
    import shutil

    root = tmp_path / "rsna2024"
    shutil.copytree(rsna_phantom, root)
    grades = list(csv.DictReader((root / "train.csv").open()))
    rows = [
        [f"{g['study_id']}_{col}", 0.6, 0.3, 0.1]
        for g in grades
        for col in g
        if col.startswith("spinal_canal_stenosis_")
    ]
    sub = tmp_path / "submission.csv"
    write_csv(sub, ["row_id", "normal_mild", "moderate", "severe"], rows)
    return root, sub, grades, rows


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_rsna_second_train_csv_row_of_a_study_is_reported(rsna):
    from lit_spine.evaluate_layouts import evaluate_rsna2024

    root, sub, grades, _ = rsna
    first = evaluate_rsna2024(sub, root)
    assert first.problems == []
    twin = dict(grades[0])
    twin["spinal_canal_stenosis_l1_l2"] = next(
        g for g in ("Normal/Mild", "Severe") if g != grades[0]["spinal_canal_stenosis_l1_l2"]
    )
    write_csv(root / "train.csv", list(grades[0]), [list(g.values()) for g in [*grades, twin]])
    ev = evaluate_rsna2024(sub, root)
    assert ev.problems == [
        f"{root / 'train.csv'} row {len(grades) + 2}: second row for study "
        f"{grades[0]['study_id']} (the first is row 2); the first is kept"
    ]
    assert ev.metrics["rsna_canal_logloss"] == first.metrics["rsna_canal_logloss"]


def test_rsna_no_usable_row_says_why(rsna, capsys):
    from lit_spine.evaluate_layouts import LayoutEvaluationError, evaluate_rsna2024

    root, sub, _, rows = rsna
    write_csv(sub, ["row_id", "normal_mild", "moderate", "severe"],
              [[r[0].upper(), *r[1:]] for r in rows])  # fmt: skip
    with pytest.raises(LayoutEvaluationError) as err:
        evaluate_rsna2024(sub, root)
    text = str(err.value)
    assert text.startswith(f"{sub}: no usable submission row; nothing to score ")
    assert (
        f"({len(rows)} problem(s), the first 3: {sub} row 2: row_id {rows[0][0].upper()!r}" in text
    )
    assert f"{sub} row 4: row_id" in text and f"{sub} row 5:" not in text
    write_csv(sub, ["row_id", "normal_mild", "moderate", "severe"],
              [[r[0], "nan", "nan", "nan"] for r in rows])  # fmt: skip
    rc = main(["--format", "rsna2024", "--pred", str(sub), "--data-root", str(root)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{sub} row 2: probabilities normal_mild 'nan'" in err


def test_rsna_localisation_hit_is_strict_at_the_radius(rsna):
    from lit_spine.evaluate_layouts import evaluate_rsna2024

    root, sub, _, _ = rsna
    labels = list(csv.DictReader((root / "train_label_coordinates.csv").open()))
    label = next(r for r in labels if r["condition"] == "Spinal Canal Stenosis")
    coords = sub.parent / "coordinates.csv"
    row = [label[c] for c in ("study_id", "series_id", "instance_number", "condition", "level")]
    write_csv(coords, ["study_id", "series_id", "instance_number", "condition", "level", "x",
                       "y", "score"], [[*row, float(label["x"]) + 4, label["y"], 0.9]])  # fmt: skip
    d = evaluate_rsna2024(sub, root, coords).metrics["localisation_mre_mm"]  # its one distance
    assert d > 0
    m = evaluate_rsna2024(sub, root, coords, radius_mm=d, sdr_radii_mm=(d, 2 * d)).metrics
    assert m["localisation_points"] == 1 and m["localisation_mre_mm"] == d
    assert m[f"localisation_hit_rate@{d:g}mm"] == 0.0  # exactly R away: a miss
    assert m[f"localisation_sdr@{d:g}mm"] == 0.0 and m[f"localisation_sdr@{2 * d:g}mm"] == 1.0


LEVELS = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")


def _set_grades(root, grades, columns):
    """Rewrite train.csv with the canal/foraminal columns of each study given by `columns`
    (study row -> {column: grade}); the other columns stay as they are."""
    edited = [dict(g) | columns.get(i, {}) for i, g in enumerate(grades)]
    write_csv(root / "train.csv", list(grades[0]), [list(g.values()) for g in edited])
    return edited


def test_rsna_foraminal_sides_are_one_pooled_condition(rsna):
    """The competition's metric calls both sides 'foraminal': one sample-weighted log loss
    over the left and the right levels, not the mean of a left and a right one (they differ
    when the sides' weight sums differ: here all left levels Severe, all right Normal/Mild)."""
    from lit_spine.evaluate_layouts import evaluate_rsna2024

    root, sub, grades, canal_rows = rsna
    edit = {i: {f"{side}_neural_foraminal_narrowing_{lv}": grade for lv in LEVELS
                for side, grade in (("left", "Severe"), ("right", "Normal/Mild"))}
            for i in range(len(grades))}  # fmt: skip
    _set_grades(root, grades, edit)
    rows = [[f"{g['study_id']}_{side}_neural_foraminal_narrowing_{lv}", *probs]
            for g in grades for lv in LEVELS
            for side, probs in (("left", (0.2, 0.3, 0.5)), ("right", (0.9, 0.05, 0.05)))]  # fmt: skip
    write_csv(sub, ["row_id", "normal_mild", "moderate", "severe"], rows)
    m = evaluate_rsna2024(sub, root).metrics
    n = 5 * len(grades)  # levels per side
    left, right = -np.log(0.5), -np.log(0.9)
    pooled = (4 * n * left + 1 * n * right) / (4 * n + 1 * n)  # = 0.8 left + 0.2 right
    assert m["rsna_left_foraminal_logloss"] == pytest.approx(left)
    assert m["rsna_right_foraminal_logloss"] == pytest.approx(right)
    assert m["rsna_foraminal_logloss"] == pytest.approx(pooled, rel=1e-12)
    assert m["rsna_foraminal_logloss_levels"] == 2 * n
    assert pooled != pytest.approx((left + right) / 2)
    assert "rsna_mean_logloss" not in m  # one competition condition: nothing to average
    # With the canal rows too: the mean over the competition's conditions (canal, foraminal).
    write_csv(sub, ["row_id", "normal_mild", "moderate", "severe"], canal_rows + rows)
    m2 = evaluate_rsna2024(sub, root).metrics
    assert m2["rsna_mean_logloss"] == pytest.approx((m2["rsna_canal_logloss"] + pooled) / 2)


def test_rsna_any_severe_spinal_term_by_hand(rsna):
    """The competition's any_severe_spinal term, per study: label = any canal level Severe,
    prediction = the largest 'severe' probability of its scored canal levels, weight = that
    of its worst grade (1/2/4); a level without a grade is in neither."""
    from lit_spine.evaluate_layouts import evaluate_rsna2024

    root, sub, grades, _ = rsna
    assert len(grades) == 4
    canal = {f"spinal_canal_stenosis_{lv}": "Normal/Mild" for lv in LEVELS}
    edit = {
        0: canal | {"spinal_canal_stenosis_l1_l2": "Severe"},  # severe where p(severe) is least
        1: canal | {"spinal_canal_stenosis_l3_l4": "Moderate"},
        2: canal,
        3: canal | {"spinal_canal_stenosis_l5_s1": ""},  # ungraded: its 0.25 is not the max
    }
    _set_grades(root, grades, edit)
    rows = [[f"{g['study_id']}_spinal_canal_stenosis_{lv}", 0.65 - 0.05 * (j + 1), 0.3,
             0.05 * (j + 1)] for g in grades for j, lv in enumerate(LEVELS)]  # fmt: skip
    write_csv(sub, ["row_id", "normal_mild", "moderate", "severe"], rows)
    ev = evaluate_rsna2024(sub, root)
    expected = (
        -4 * np.log(0.25)  # study 0: Severe, max severe 0.25 (L5/S1), weight 4
        - 2 * np.log(1 - 0.25)  # study 1: worst Moderate, weight 2
        - 1 * np.log(1 - 0.25)  # study 2: all Normal/Mild, weight 1
        - 1 * np.log(1 - 0.20)  # study 3: L5/S1 ungraded, max over L1/L2 .. L4/L5
    ) / (4 + 2 + 1 + 1)
    assert ev.metrics["rsna_any_severe_spinal_logloss"] == pytest.approx(expected, rel=1e-12)
    assert ev.metrics["rsna_any_severe_spinal_logloss_studies"] == 4
    assert "rsna_mean_logloss" not in ev.metrics  # canal only: one condition


def _edit_pred(dataset, fn):
    path = dataset["tmp"] / "pred.json"
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _first_point(obj):
    return obj[0]["data"][0]["annotation"][0]["data"]["point"][0]


def test_unknown_study_is_an_error_or_a_warning(dataset, capsys):
    def add(obj):
        extra = json.loads(json.dumps(obj[0]))
        extra["studyUid"] = "9.9.9"
        obj.append(extra)

    _edit_pred(dataset, add)
    rc, _, err = run(dataset["args"], capsys)
    assert rc == 2 and "study 9.9.9" in err and "--ignore-unknown" in err
    rc, out, err = run([*dataset["args"], "--ignore-unknown", "--json"], capsys)
    assert rc == 0 and "warning" in err and "9.9.9" in err
    assert json.loads(out)["n_studies"] == 4


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda p: p.__setitem__("coord", ["a", 3]), "'coord' must be two finite numbers"),
        (lambda p: p.__setitem__("coord", [1.0]), "'coord' must be two finite numbers"),
        (
            lambda p: p["tag"].__setitem__(
                next(k for k in p["tag"] if k != "identification"), "v9"
            ),
            "unknown",
        ),
        (lambda p: p.__setitem__("score", 1.5), "'score' must be a number in [0, 1]"),
        (lambda p: p.__setitem__("score", -0.1), "'score' must be a number in [0, 1]"),
    ],
)
def test_bad_predictions_name_the_study_and_point(dataset, capsys, edit, expected):
    ident = []

    def apply(obj):
        point = _first_point(obj)
        ident.append(point["tag"]["identification"])
        edit(point)

    _edit_pred(dataset, apply)
    rc, out, err = run(dataset["args"], capsys)
    assert rc == 2 and out == ""
    assert expected in err
    assert f"study {dataset['gts'][0].study_uid}, point {ident[0]}" in err


def test_missing_spacing_names_study_and_instance(dataset, capsys):
    for f in (dataset["root"] / "val" / "study2").glob("image5.dcm"):
        f.unlink()
    rc, _, err = run(dataset["args"], capsys)
    study = dataset["gts"][2]
    assert rc == 2
    assert f"study {study.study_uid}" in err and study.instance_uid in err


def test_spacing_source_required_and_files_checked(dataset, capsys):
    rc, _, err = run(dataset["args"][:4], capsys)
    assert rc == 2 and "--spacing-mm" in err
    rc, _, err = run(
        ["--pred", "nope.json", "--gt", dataset["args"][3], "--spacing-mm", "1,1"], capsys
    )
    assert rc == 2 and "nope.json: file not found" in err
    with pytest.raises(SystemExit) as exc:
        main([*dataset["args"], "--spacing-mm", "0.7"])
    assert exc.value.code == 2


def test_phantom_annotation_scored_against_itself_is_perfect(phantom_root, tmp_path, capsys):
    gt_path = phantom_root / "val_annotation.json"
    rc, out, err = run(
        ["--pred", str(gt_path), "--gt", str(gt_path), "--data-root", str(phantom_root), "--json"],
        capsys,
    )
    assert rc == 0, err
    result = json.loads(out)
    assert result["n_studies"] == 2 and result["fp"] == 0 and result["fn"] == 0
    assert result["map"] == 1.0 and result["baseline_macro_f1"] == 1.0
    assert result["mre_mm"] == 0.0 and result["sdr"]["2"] == 1.0


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -8.0, float("inf")])
@pytest.mark.parametrize("which", ["radius_mm", "baseline_radius_mm", "sdr_radii_mm"])
def test_the_metric_itself_rejects_unusable_radii(bad, which):
    gt, pred, spacing = _study_ordered_case(0, n=1)
    kwargs = {which: (2.0, bad) if which == "sdr_radii_mm" else bad}
    with pytest.raises(ValueError, match=which):
        score_detections(gt, pred, spacing, **kwargs)
    with pytest.raises(ValueError, match=which):
        SpineDetectionMetric(**kwargs)


def test_ground_truth_problems_are_printed_under_the_table(dataset, capsys):
    path = dataset["root"] / "val_annotation.json"
    obj = json.loads(path.read_text())
    pts = obj[1]["data"][0]["annotation"][0]["data"]["point"]
    pts.append(json.loads(json.dumps(pts[0])))  # an exact copy: scored once
    pts[1]["tag"]["identification"] = "T11-T12"  # not one of the 11 points: left out
    path.write_text(json.dumps(obj))
    rc, out, err = run(dataset["args"], capsys)
    study = dataset["gts"][1].study_uid
    assert rc == 0
    assert "problems, listed under the table" in err
    problems = out.split("\nProblems (")[1].splitlines()
    assert (
        f"  {path}, study {study}, point T11-T12: unexpected identification 'T11-T12' ignored"
        in (problems)
    )
    ident = pts[0]["tag"]["identification"]
    assert (
        f"  {path}, study {study}, point {ident}: 1 exact duplicate(s) of point {ident} scored once"
        in (problems)
    )
    rc, out, err = run([*dataset["args"], "--json"], capsys)
    kinds = {(p["kind"], p["study"]) for p in json.loads(out)["problems"]}
    assert {("unknown_identification", study), ("duplicate_point", study)} <= kinds
    assert f"warning: {path}, study {study}, point T11-T12" in err


def test_imager_pixel_spacing_is_used_and_reported(dataset, capsys):
    study = dataset["gts"][3]
    path = dataset["root"] / "val" / "study3" / "image5.dcm"
    write_slice(
        path,
        np.zeros((320, 320)),
        study_uid=study.study_uid,
        series_uid=study.study_uid + ".7",
        description="T2 sag",
        instance_uid=study.instance_uid,
        spacing=None,
        imager_spacing=(0.75, 0.75),
    )
    rc, out, err = run([*dataset["args"], "--json"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    (p,) = [p for p in result["problems"] if p["kind"] == "spacing_source"]
    assert p["study"] == study.study_uid and p["file"] == str(path)
    assert "no PixelSpacing; using ImagerPixelSpacing (0.75, 0.75)" in p["message"]
    assert without_expected_problems(
        {**result, "problems": [q for q in result["problems"] if q is not p]}, dataset
    ) == json.loads(json.dumps(expected_report(dataset)))


def expected_report(dataset):
    metric = SpineDetectionMetric()
    for rows, kw in batches_from_case(dataset["gt"], dataset["pred"], dataset["spacing"], 3):
        metric.update(*rows, **kw)
    return metric.compute_report().to_dict()
