"""`lit-spine inspect`: table and JSON output, side-file discovery, every bad-input message."""

from __future__ import annotations

import json

from dicom_factory import AXIAL, StudyWriter, annotation_for, dataset, standard_study, write_json

from lit_spine.cli import main as cli_main
from lit_spine.commands.inspect import main
from lit_spine.data.inspect import inspect_dataset


def run_json(capsys, *argv) -> tuple[int, list[dict], str]:
    code = main([*map(str, argv), "--json"])
    out, err = capsys.readouterr()
    if code != 0:
        return code, [], err
    obj = json.loads(out)
    assert set(obj) == {"studies", "problems"}
    return code, obj["studies"], err


def test_table_lists_every_study_and_a_summary(tmp_path, capsys):
    root, infos = dataset(tmp_path, 2)
    (root / "study1" / "broken.dcm").write_bytes(b"\x00" * 10)
    assert cli_main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    for name in ("study0", "study1", "T2_TSE_SAG", "64x64", "0.800x0.800", "summary"):
        assert name in out
    assert "studies               2 (2 with a T2 sagittal slice, 2 annotated)" in out
    assert "files                 45 (44 readable, 1 unreadable)" in out
    assert "2 T1 sagittal, 2 T2 axial, 4 T2 sagittal" in out
    assert "annotation mismatches 0" in out
    assert f"study1: skipped {root / 'study1' / 'broken.dcm'}: file is only 10 bytes" in out


def test_json_schema_and_side_file_discovery(tmp_path, capsys):
    root, infos = dataset(tmp_path, 2)
    code, reports, err = run_json(capsys, root)
    assert code == 0 and err == ""
    assert [r["study"] for r in reports] == ["study0", "study1"]
    for r, info in zip(reports, infos):
        t2 = info.series["t2"]
        assert r["study_uid"] == info.study_uid
        assert r["t2_sagittal"]["series_uid"] == t2.uid
        assert r["t2_sagittal"]["instance_uid"] == t2.middle
        assert (r["t2_sagittal"]["index"], r["t2_sagittal"]["n_slices"]) == (2, 6)
        assert r["t2_sagittal"]["pixel_spacing"] == [0.8, 0.8]
        assert (r["t2_sagittal"]["rows"], r["t2_sagittal"]["cols"]) == (64, 64)
        assert r["auto_choice"] == {"series_uid": t2.uid, "instance_uid": t2.middle, "index": 2}
        assert len(r["points"]) == 11
        assert r["points"][0] == {
            "identification": "T12-L1",
            "coord": [20.0, 5.0],
            "labels": ["v1"],
        }
        assert r["problems"] == []


def test_series_map_discovered_beside_the_split(tmp_path, capsys):
    root, infos = dataset(tmp_path, 1, annotate=False)
    fs = infos[0].series["t2fs"]
    write_json(
        tmp_path / "train_series_map.json", [{"studyUid": infos[0].study_uid, "seriesUid": fs.uid}]
    )
    _, (r,), _ = run_json(capsys, root)
    assert r["t2_sagittal"]["instance_uid"] == fs.middle
    assert r["t2_sagittal"]["source"] == "series_map"
    assert r["auto_choice"]["series_uid"] == infos[0].series["t2"].uid
    assert r["points"] == [] and r["problems"] == []


def test_empty_and_missing_folders_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no DICOM files found" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "missing: no such folder" in capsys.readouterr().err


def test_dataset_root_instead_of_split_is_explained(tmp_path, capsys):
    dataset(tmp_path, 1)
    assert main([str(tmp_path)]) == 2
    assert "holds split folders (train), not study folders; point at one split, e.g. " in (
        capsys.readouterr().err
    )


def test_study_without_t2_sagittal(tmp_path, capsys):
    w = StudyWriter(tmp_path / "root" / "study1")
    w.series("ax", "T2_TRA", orientation=AXIAL)
    code, (r,), _ = run_json(capsys, tmp_path / "root")
    assert code == 0 and r["t2_sagittal"] is None and r["auto_choice"] is None
    assert "no T2 sagittal series" in r["problems"][0]
    main([str(tmp_path / "root")])
    assert "-- none --" in capsys.readouterr().out


def test_annotation_naming_unknown_study_and_instance(tmp_path, capsys):
    root, infos = dataset(tmp_path, 1, annotate=False)
    entries = [
        annotation_for(infos[0], instance_uid="1.2.999"),
        {**annotation_for(infos[0]), "studyUid": "9.8.7"},
    ]
    ann = write_json(tmp_path / "ann.json", entries)
    code, (r,), err = run_json(capsys, root, "--annotation", ann)
    assert code == 0
    assert "annotation " + str(ann) + " names study 9.8.7, which matches no study folder" in err
    assert any(
        "names instance 1.2.999" in p and "falling back to the automatic choice" in p
        for p in r["problems"]
    )
    assert r["t2_sagittal"]["instance_uid"] == infos[0].series["t2"].middle
    main([str(root), "--annotation", str(ann)])
    assert "names study 9.8.7" in capsys.readouterr().out


def test_mismatch_between_annotation_and_auto_choice(tmp_path, capsys):
    root, infos = dataset(tmp_path, 1, annotate=False)
    t2 = infos[0].series["t2"]
    write_json(
        tmp_path / "train_annotation.json",
        [annotation_for(infos[0], instance_uid=t2.instance_uids[0])],
    )
    _, (r,), _ = run_json(capsys, root)
    assert r["t2_sagittal"]["index"] == 0 and r["auto_choice"]["index"] == 2
    assert any("differs from the automatic choice" in p for p in r["problems"])
    main([str(root)])
    assert "annotation mismatches 1" in capsys.readouterr().out


def test_malformed_json_and_unknown_disease_exit_2(tmp_path, capsys):
    root, infos = dataset(tmp_path, 1, annotate=False)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"studyUid": "1",]')
    assert main([str(root), "--annotation", str(bad)]) == 2
    assert f"{bad}: malformed JSON at line 1" in capsys.readouterr().err
    ann = write_json(tmp_path / "ann.json", [annotation_for(infos[0], labels={"L4-L5": "v9"})])
    assert main([str(root), "--annotation", str(ann)]) == 2
    err = capsys.readouterr().err
    assert "point L4-L5" in err and "unknown disc disease code 'v9'" in err
    assert main([str(root), "--annotation", str(ann), "--vocab", "seed9"]) == 2
    assert "did you mean 'seed7'" in capsys.readouterr().err


def test_points_outside_the_image_are_reported(tmp_path, capsys):
    root, infos = dataset(tmp_path, 1, annotate=False)
    ann = write_json(
        tmp_path / "a.json",
        [annotation_for(infos[0], points={"L1": (70.0, 10.0), "L2": (10.0, -3.0)})],
    )
    _, (r,), _ = run_json(capsys, root, "--annotation", ann)
    assert "point L1 at (70, 10) lies outside the 64x64 image" in r["problems"]
    assert "point L2 at (10, -3) lies outside the 64x64 image" in r["problems"]


def test_real_data_quirks_survive(tmp_path, capsys):
    root, infos = dataset(tmp_path, 1, annotate=False)
    entry = annotation_for(infos[0])
    pts = entry["data"][0]["annotation"][0]["data"]["point"]
    pts.pop()  # 10 points
    pts.append({"coord": [1, 2], "tag": {"identification": "T11-T12", "disc": "v1"}})
    pts[1]["tag"] = {"identification": "L1", "vertebra": "v2", "disc": ""}
    entry["annotator"] = "x"
    entry["data"][0]["version"] = 2
    ann = write_json(tmp_path / "a.json", [entry])
    code, (r,), _ = run_json(capsys, root, "--annotation", ann)
    assert code == 0 and len(r["points"]) == 10
    assert r["points"][1]["labels"] == ["v2"]
    assert "annotation: unexpected identification 'T11-T12' ignored" in r["problems"]
    assert "annotation: 10 points; missing L5-S1" in r["problems"]


def test_unannotated_study_when_annotation_given(tmp_path):
    root, infos = dataset(tmp_path, 1)
    standard_study(root / "study9", seed=9)
    reports, dataset_problems = inspect_dataset(root)
    assert dataset_problems == []
    assert reports[1]["study"] == "study9"
    assert "has no entry in the annotation file" in reports[1]["problems"][0]


def test_phantom_is_seen_without_problems(phantom_root, capsys):
    for split in ("train", "val", "test"):
        code, reports, err = run_json(capsys, phantom_root / split)
        assert code == 0 and err == "", err
        assert reports, split
        studies = sorted(p.name for p in (phantom_root / split).iterdir() if p.is_dir())
        assert sorted(r["study"] for r in reports) == studies
        for r in reports:
            assert r["problems"] == [], (split, r["study"], r["problems"])
            assert r["t2_sagittal"] is not None
            assert r["auto_choice"]["instance_uid"] == r["t2_sagittal"]["instance_uid"]
            if split != "test":
                assert len(r["points"]) == 11
