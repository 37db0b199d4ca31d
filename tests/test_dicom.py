"""DICOM reading: header index, plane/weighting, series and slice choice, decoding, bad files."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import AXIAL, SAGITTAL, StudyWriter, standard_study, write_json
from pydicom.uid import JPEG2000Lossless, RLELossless

from lit_spine.data.annotation import AnnotationError, StudyAnnotation
from lit_spine.data.dicom import (
    DatasetError,
    PixelReader,
    auto_choice,
    choose_slice,
    classify_plane,
    classify_weighting,
    decode_pixels,
    find_annotation,
    find_series_map,
    index_dataset,
    index_study,
    load_series_map,
    read_spacing_for_instances,
)
from lit_spine.data.dicom import header as dicom_header


def test_classify_plane_and_weighting():
    assert classify_plane(np.array([-1.0, 0, 0])) == "sagittal"
    assert classify_plane(np.array([0, 0, 1.0])) == "axial"
    assert classify_plane(np.array([0, 0.9, 0.43])) == "coronal"
    assert classify_plane(np.array([0.6, 0.6, 0.52])) == "oblique"
    assert classify_plane(None) == "unknown"
    assert classify_weighting("t1_tse_sag") == "T1"
    assert classify_weighting("T2 FS SAG") == "T2"
    assert classify_weighting("T2/T1 mixed") == "T1"  # 'T1' is tested first (docs/data-format.md)
    assert classify_weighting("STIR") == "unknown"


def test_index_groups_and_classifies_series(tmp_path):
    info = standard_study(tmp_path / "s")
    study = index_study(tmp_path / "s")
    assert study.study_uid == info.study_uid
    assert study.problems == []
    assert study.n_files == study.n_readable == 6 + 6 + 6 + 4
    kinds = {s.description: (s.plane, s.weighting, s.n_slices) for s in study.series}
    assert kinds == {
        "T1_TSE_SAG": ("sagittal", "T1", 6),
        "T2_TSE_SAG": ("sagittal", "T2", 6),
        "T2_TSE_FS_SAG": ("sagittal", "T2", 6),
        "T2_TSE_TRA": ("axial", "T2", 4),
    }


@pytest.mark.parametrize("n", [5, 6, 7])
def test_auto_choice_is_brightest_t2_middle_frame_by_position(tmp_path, n):
    info = standard_study(tmp_path / "s", seed=n, n=n)
    study = index_study(tmp_path / "s")
    t2 = study.get_series(info.series["t2"].uid)
    # Files are named and numbered in shuffled order; the order must follow the position.
    assert [h.instance_uid for h in t2.slices] == info.series["t2"].instance_uids
    reader = PixelReader()
    choice = auto_choice(study, reader)
    assert choice.series.uid == info.series["t2"].uid  # the fat-suppressed one is darker
    assert choice.index == (n - 1) // 2
    assert choice.instance_uid == info.series["t2"].middle
    assert reader.decoded == 2  # the middle slice of each competing T2 sagittal series
    reader(choice.header)
    assert reader.decoded == 2  # kept: never decoded twice


def test_brighter_fat_suppressed_series_wins_and_single_candidate_decodes_nothing(tmp_path):
    w = StudyWriter(tmp_path / "a", seed=1)
    w.series("t2", "T2_SAG", level=400)
    fs = w.series("fs", "T2_FS_SAG", level=900)
    assert auto_choice(index_study(tmp_path / "a")).series.uid == fs.uid

    w = StudyWriter(tmp_path / "b", seed=2)
    w.series("t1", "T1_SAG", level=2000)
    t2 = w.series("t2", "T2_SAG", level=100)
    reader = PixelReader()
    assert auto_choice(index_study(tmp_path / "b"), reader).series.uid == t2.uid
    assert reader.decoded == 0


def test_fallback_to_any_sagittal_and_no_sagittal(tmp_path):
    w = StudyWriter(tmp_path / "a", seed=1)
    t1 = w.series("t1", "T1_SAG")
    w.series("ax", "T2_TRA", orientation=AXIAL)
    assert auto_choice(index_study(tmp_path / "a")).series.uid == t1.uid

    w = StudyWriter(tmp_path / "b", seed=2)
    w.series("ax", "T2_TRA", orientation=AXIAL)
    choice, auto, problems = choose_slice(index_study(tmp_path / "b"))
    assert choice is None and auto is None
    assert "no T2 sagittal series" in problems[0] and "T2_TRA (axial, T2, 5 slices)" in problems[0]


def test_monochrome1_is_inverted(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4000, (32, 40)).astype(np.uint16)
    w = StudyWriter(tmp_path / "s")
    mono1 = w.series("m1", "T2_SAG", n=1, pixels=65535 - values, photometric="MONOCHROME1")
    mono2 = w.series("m2", "T2_SAG", n=1, pixels=values)
    np.testing.assert_array_equal(decode_pixels(mono1.paths[0]), values.astype(np.float32))
    np.testing.assert_array_equal(decode_pixels(mono2.paths[0]), values.astype(np.float32))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_transfer_syntaxes_decode(tmp_path, syntax):
    values = np.random.default_rng(1).integers(0, 3000, (48, 64)).astype(np.uint16)
    w = StudyWriter(tmp_path / "s")
    s = w.series("t2", "T2_SAG", n=3, pixels=values, transfer_syntax=syntax)
    study = index_study(tmp_path / "s")
    assert study.problems == [] and study.series[0].n_slices == 3
    np.testing.assert_array_equal(decode_pixels(s.paths[1]), values.astype(np.float32))


def test_missing_pixel_spacing_falls_back(tmp_path):
    w = StudyWriter(tmp_path / "a")
    w.series("t2", "T2_SAG", n=2, spacing=None, imager_spacing=(0.7, 0.9))
    study = index_study(tmp_path / "a")
    assert study.series[0].slices[0].spacing_mm == (0.7, 0.9)
    assert any("PixelSpacing missing" in p and "ImagerPixelSpacing" in p for p in study.problems)

    w = StudyWriter(tmp_path / "b")
    w.series("t2", "T2_SAG", n=2, spacing=None)
    study = index_study(tmp_path / "b")
    # Never a guessed 1.0 mm: no spacing, and the problem names a file and both tags.
    assert study.series[0].slices[0].spacing_mm is None
    assert any(
        "no usable PixelSpacing" in p
        and "PixelSpacing missing (tag 0028,0030)" in p
        and "ImagerPixelSpacing missing" in p
        and "not used" in p
        for p in study.problems
    ), study.problems


def test_missing_geometry_tags_are_survived(tmp_path):
    w = StudyWriter(tmp_path / "s")
    w.series("t2", "T2_SAG", n=4, orientation=None)
    w.series("ax", "T2_TRA", n=3, orientation=AXIAL, position=None)
    study = index_study(tmp_path / "s")
    planes = {s.description: s.plane for s in study.series}
    assert planes == {"T2_SAG": "sagittal", "T2_TRA": "axial"}
    assert any("plane 'sagittal' guessed from the description" in p for p in study.problems)
    assert any("ordered by InstanceNumber" in p for p in study.problems)
    ax = next(s for s in study.series if s.plane == "axial")
    assert [h.instance_number for h in ax.slices] == sorted(h.instance_number for h in ax.slices)


def test_bad_files_are_skipped_and_reported(tmp_path):
    info = standard_study(tmp_path / "s")
    good = info.series["t1"].paths[0]
    (tmp_path / "s" / "tiny.dcm").write_bytes(b"DICM")
    (tmp_path / "s" / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "s" / "notes.txt").write_text("ignored silently")
    truncated = tmp_path / "s" / "truncated.dcm"
    truncated.write_bytes(info.series["ax"].paths[0].read_bytes()[:3000])
    study = index_study(tmp_path / "s")
    assert study.n_readable == 22 and study.n_files == 25
    text = "\n".join(study.problems)
    assert f"skipped {tmp_path / 's' / 'tiny.dcm'}: file is only 4 bytes" in text
    assert f"skipped {truncated}: truncated" in text
    assert f"skipped {tmp_path / 's' / 'garbage.dcm'}:" in text
    assert "notes.txt" not in text
    assert good.exists()


def test_file_without_preamble_is_read_with_force(tmp_path):
    w = StudyWriter(tmp_path / "s")
    s = w.series("t2", "T2_SAG", n=1)
    path = s.paths[0]
    path.write_bytes(path.read_bytes()[132:])  # strip the 128-byte preamble and "DICM"
    study = index_study(tmp_path / "s")
    assert study.n_readable == 1, study.problems
    assert decode_pixels(path).shape == (64, 64)


def test_annotation_instance_wins_and_mismatch_is_reported(tmp_path):
    info = standard_study(tmp_path / "s")
    study = index_study(tmp_path / "s")
    t2 = info.series["t2"]
    ann = StudyAnnotation(info.study_uid, t2.uid, t2.instance_uids[4])
    choice, auto, problems = choose_slice(study, ann, compare_auto=True)
    assert (choice.source, choice.index, choice.instance_uid) == (
        "annotation",
        4,
        t2.instance_uids[4],
    )
    assert auto.instance_uid == t2.middle
    assert len(problems) == 1 and "differs from the automatic choice" in problems[0]

    choice, auto, problems = choose_slice(study, ann)  # no comparison: nothing decoded
    assert auto is None and problems == []


def test_unknown_annotated_instance_falls_back_to_auto(tmp_path):
    info = standard_study(tmp_path / "s")
    study = index_study(tmp_path / "s")
    ann = StudyAnnotation(info.study_uid, "1.2.3", "1.2.3.4")
    choice, _, problems = choose_slice(study, ann)
    assert choice.source == "auto" and choice.instance_uid == info.series["t2"].middle
    assert (
        "annotation names instance 1.2.3.4 (series 1.2.3) which is not in this study" in problems[0]
    )
    assert "falling back to the automatic choice: series" in problems[0]


def test_an_unreadable_annotated_file_leaves_the_study_out_not_moved(tmp_path):
    """The annotated slice is in the folder but truncated: its points belong to it, so the
    study is left out (naming the file and why), never moved onto the automatic choice. An
    unreadable file whose UID cannot be read either might be the annotated one: left out too;
    an unreadable file of another instance leaves the documented fallback as it was."""
    info = standard_study(tmp_path / "s")
    t2 = info.series["t2"]
    middle = t2.paths[t2.instance_uids.index(t2.middle)]
    middle.write_bytes(middle.read_bytes()[:-600])  # the pixel data cut short
    study = index_study(tmp_path / "s")
    choice, _, problems = choose_slice(study, StudyAnnotation(info.study_uid, t2.uid, t2.middle))
    assert choice is None
    assert f"the annotated instance {t2.middle} is {middle}, which cannot be read" in problems[0]
    assert "truncated" in problems[0] and problems[0].endswith("study left out")

    (tmp_path / "s" / "junk.dcm").write_bytes(b"\x00" * 300)  # no UID can be read from it
    study = index_study(tmp_path / "s")
    choice, _, problems = choose_slice(study, StudyAnnotation(info.study_uid, "1.2.3", "1.2.3.4"))
    assert choice is None and "1 unreadable file(s) of this folder" in problems[0]
    assert f"(first {tmp_path / 's' / 'junk.dcm'}) may be it; study left out" in problems[0]

    (tmp_path / "s" / "junk.dcm").unlink()
    study = index_study(tmp_path / "s")  # only the truncated file of another instance
    choice, _, problems = choose_slice(study, StudyAnnotation(info.study_uid, "1.2.3", "1.2.3.4"))
    assert choice.source == "auto" and "falling back to the automatic choice" in problems[0]


def test_series_map_forces_series(tmp_path):
    info = standard_study(tmp_path / "s")
    study = index_study(tmp_path / "s")
    fs = info.series["t2fs"]
    choice, _, problems = choose_slice(study, series_uid=fs.uid)
    assert (choice.source, choice.instance_uid, problems) == ("series_map", fs.middle, [])
    choice, _, problems = choose_slice(study, series_uid="9.9")
    assert choice.source == "auto" and "series map names series 9.9" in problems[0]


def test_index_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        index_dataset(tmp_path / "nope")
    (tmp_path / "empty" / "study1").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no DICOM files found"):
        index_dataset(tmp_path / "empty")


def test_single_study_folder_and_threaded_indexing(tmp_path):
    info = standard_study(tmp_path / "s")
    (studies,) = index_dataset(tmp_path / "s")  # ROOT is one study folder
    assert studies.study_uid == info.study_uid
    threaded = index_dataset(tmp_path, workers=4)
    assert [s.uid for s in threaded[0].series] == [s.uid for s in studies.series]


def test_read_spacing_for_instances(tmp_path):
    w = StudyWriter(tmp_path / "root" / "study1")
    s = w.series("t2", "T2_SAG", n=3, spacing=(0.65, 0.7))
    spacing = read_spacing_for_instances(tmp_path / "root")
    assert set(spacing) == set(s.instance_uids)
    assert spacing[s.instance_uids[0]] == (0.65, 0.7)


def test_side_files(tmp_path):
    (tmp_path / "train").mkdir()
    assert find_annotation(tmp_path / "train") is None
    write_json(tmp_path / "train_annotation.json", [])
    write_json(tmp_path / "train_series_map.json", [{"studyUid": "1", "seriesUid": "2"}])
    assert find_annotation(tmp_path / "train") == (tmp_path / "train_annotation.json").resolve()
    assert load_series_map(find_series_map(tmp_path / "train")) == {"1": "2"}
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(AnnotationError, match="malformed JSON at line 1"):
        load_series_map(tmp_path / "bad.json")
    write_json(tmp_path / "bad2.json", [{"studyUid": "1"}])
    with pytest.raises(AnnotationError, match="entry 0 needs 'studyUid' and 'seriesUid'"):
        load_series_map(tmp_path / "bad2.json")


def test_header_reading_never_touches_pixels(tmp_path, monkeypatch):
    standard_study(tmp_path / "s")
    calls = []
    real = dicom_header.pydicom.dcmread

    def spy(*args, **kwargs):
        calls.append(kwargs.get("stop_before_pixels", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(dicom_header.pydicom, "dcmread", spy)
    index_study(tmp_path / "s")
    assert calls and all(calls)


def test_sagittal_orientation_constant():
    assert classify_plane(np.cross(SAGITTAL[:3], SAGITTAL[3:])) == "sagittal"
