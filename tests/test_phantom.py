"""The phantom: valid DICOM, the series choice of data-format.md, labels caused by the drawing,
calibrated priors, determinism and interrupt safety."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter, defaultdict

import numpy as np
import pydicom
import pytest
from pydicom.dataset import validate_file_meta

from lit_spine.commands.phantom import main
from lit_spine.data.annotation import load_annotations, parse_annotations
from lit_spine.data.labels import DISC_POINTS, POINT_NAMES, get_vocabulary
from lit_spine.phantom import anatomy, pathology
from lit_spine.phantom.generate import MARKER, PhantomError, generate_phantom, parse_splits
from lit_spine.phantom.signal import tissue_lut
from lit_spine.phantom.study import render_study

SPLITS = ("train", "val", "test")
TYPE1 = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "FrameOfReferenceUID",
    "ImageType",
    "ScanningSequence",
    "SequenceVariant",
    "MRAcquisitionType",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
)


def _files(root):
    return sorted(p for s in SPLITS for p in (root / s).glob("study*/*.dcm"))


def _digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "preview.png"
    }


# ----------------------------------------------------------------------------- DICOM and layout


def test_layout_and_valid_dicom(phantom_root):
    for split in SPLITS:
        assert (phantom_root / f"{split}_annotation.json").is_file()
        assert not list((phantom_root / split).glob(".tmp*"))
    marker = json.loads((phantom_root / MARKER).read_text())
    assert marker["complete"] is True
    files = _files(phantom_root)
    assert len(files) >= 12 * 30
    for path in files:
        ds = pydicom.dcmread(path)
        validate_file_meta(ds.file_meta, enforce_standard=True)
        for keyword in TYPE1:
            assert keyword in ds and ds[keyword].value not in (None, ""), (path, keyword)
        assert ds.Modality == "MR" and ds.SOPClassUID == pydicom.uid.MRImageStorage
        arr = ds.pixel_array
        assert arr.dtype == np.uint16 and arr.shape == (ds.Rows, ds.Columns)
        assert int(arr.max()) < (1 << ds.BitsStored)


def _series_choice(folder):
    """The rule of data-format.md, written independently of lit_spine.data.dicom."""
    series = defaultdict(list)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        series[ds.SeriesInstanceUID].append(ds)
    best = None
    for uid, slices in series.items():
        iop = np.array(slices[0].ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        text = str(slices[0].SeriesDescription).upper()
        weighting = "T1" if "T1" in text else "T2" if "T2" in text else "unknown"
        if abs(normal[0]) <= 0.75 or weighting != "T2":
            continue
        slices.sort(key=lambda d: float(np.array(d.ImagePositionPatient, float) @ normal))
        mid = (len(slices) - 1) // 2
        arr = slices[mid].pixel_array.astype(float)
        if slices[mid].PhotometricInterpretation == "MONOCHROME1":
            arr = (1 << slices[mid].BitsStored) - 1 - arr
        if best is None or arr.mean() > best[0]:
            best = (arr.mean(), uid, slices[mid].SOPInstanceUID, mid, slices[mid])
    return best


def test_series_choice_picks_the_annotated_t2_middle_slice(phantom_root):
    n_fs = 0
    for split in SPLITS:
        studies = parse_annotations(
            json.loads((phantom_root / f"{split}_annotation.json").read_text())
        )
        for folder in sorted((phantom_root / split).iterdir()):
            _, series_uid, instance_uid, mid, ds = _series_choice(folder)
            ann = studies[ds.StudyInstanceUID]
            assert (ann.series_uid, ann.instance_uid) == (series_uid, instance_uid), folder
            assert len(ann.points) == 11 and not ann.warnings
            for p in ann.points:
                assert p.z_index == mid
                assert 0 <= p.x < ds.Columns and 0 <= p.y < ds.Rows
            descriptions = {
                pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription
                for f in folder.iterdir()
            }
            n_fs += len(descriptions) == 4
    assert n_fs >= 1, "the fixture should hold a fat-suppressed series to reject"


def test_fat_suppressed_series_is_darker_and_rejected():
    found = 0
    for i in range(40):
        st = render_study(3, "train", i, size=128, pixels=False)
        if "T2FS" not in [s.role for s in st.series]:
            continue
        st = render_study(3, "train", i, size=128)
        by_role = {s.role: s for s in st.series}
        m = st.annotated_slice
        assert by_role["T2FS"].pixels[m].mean() < 0.85 * by_role["T2"].pixels[m].mean()
        assert "T2" in by_role["T2FS"].info.description.upper()
        found += 1
        if found == 3:
            break
    assert found == 3


def test_geometry_headers_are_consistent():
    st = render_study(1, "val", 2, size=160)
    sag = st.series[st.t2_series]
    normal = sag.planes[0].normal
    assert abs(normal[0]) > 0.9
    pos = [p.origin @ normal for p in sag.planes]
    steps = np.diff(pos)
    assert np.allclose(steps, sag.info.spacing_between, atol=1e-6)
    assert 11 <= len(sag.planes) <= 15
    axial = next(s for s in st.series if s.role == "AX")
    assert 6 <= len(axial.planes) <= 10
    assert all(abs(p.normal[2]) > 0.75 for p in axial.planes)
    # Anatomy: T12-L1 to L5-S1 spans about 170-190 mm (a bit more with the spread).
    span = np.linalg.norm(st.anatomy.disc_centre(1) - st.anatomy.disc_centre(6))
    assert 150 < span < 215


# ----------------------------------------------------------------------------- labels and drawing


@pytest.mark.parametrize("index", range(6))
def test_points_lie_inside_their_drawn_structure(index):
    st = render_study(5, "train", index, size=256)
    tissue = st.tissue_map
    for name, (x, y) in zip(POINT_NAMES, st.points):
        value = tissue[int(round(y)), int(round(x))]
        assert value in st.structure_ids(name), (index, name, value)


def _beyond_corner_line(st, disc: str, mm: float = 1.0) -> int:
    """Disc pixels more than `mm` posterior of the line through the vertebral corners."""
    (x0, y0), (x1, y1) = st.disc_corners_px[disc]
    tissue = st.tissue_map
    ids = st.structure_ids(disc)
    rows, cols = np.nonzero(np.isin(tissue, ids))
    d = np.array([x1 - x0, y1 - y0])
    normal = np.array([d[1], -d[0]]) / np.linalg.norm(d)
    if normal[0] < 0:  # posterior is towards larger column index
        normal = -normal
    along = ((cols - x0) * d[0] + (rows - y0) * d[1]) / (d @ d)
    dist = (cols - x0) * normal[0] + (rows - y0) * normal[1]
    spacing = st.series[st.t2_series].planes[0].col_spacing
    return int(np.sum((dist * spacing > mm) & (along > -0.2) & (along < 1.2)))


@pytest.mark.parametrize("state", ["protrusion", "extrusion", "diffuse_bulge"])
def test_labelled_herniation_changes_the_posterior_contour(state):
    # Bulges reach 1-3 mm beyond the corner line, protrusions and extrusions 3-10 mm.
    mm, minimum = (0.5, 4) if state == "diffuse_bulge" else (1.0, 15)
    for index in range(3):
        normal = render_study(11, "train", index, size=512, labels_override={"L4-L5": "normal"})
        lesion = render_study(11, "train", index, size=512, labels_override={"L4-L5": state})
        assert _beyond_corner_line(normal, "L4-L5", mm) <= 2
        assert _beyond_corner_line(lesion, "L4-L5", mm) > minimum, (state, index)
        # Only that label changed (a lesion's height loss moves the anatomy above it a little).
        assert {k: v for k, v in normal.codes.items() if k != "L4-L5"} == {
            k: v for k, v in lesion.codes.items() if k != "L4-L5"
        }


def test_degenerated_disc_has_dark_nucleus_and_lower_height():
    a = render_study(2, "train", 0, size=256, labels_override={"L3-L4": "normal"})
    b = render_study(2, "train", 0, size=256, labels_override={"L3-L4": "degenerated"})
    d = pathology.DISC_NAMES.index("L3-L4")
    lut_a, lut_b = tissue_lut(a.anatomy, "T2"), tissue_lut(b.anatomy, "T2")
    assert lut_b[anatomy.NUCLEUS0 + d] < lut_a[anatomy.NUCLEUS0 + d] - 0.2
    area_a = np.isin(a.tissue_map, a.structure_ids("L3-L4")).sum()
    area_b = np.isin(b.tissue_map, b.structure_ids("L3-L4")).sum()
    assert area_b < area_a


@pytest.mark.parametrize("index", [0, 10, 23, 28])
def test_mid_sagittal_slice_shows_a_continuous_csf_column(index):
    """Behind every body from T12 to L5 the annotated slice cuts the CSF of the thecal sac
    (the stack is planned on the spine, so even an oblique patient keeps it in the slice)."""
    st = render_study(0, "train", index)
    anat = st.anatomy
    plane = st.series[st.t2_series].planes[st.annotated_slice]
    rows, cols = st.tissue_map.shape
    for b in range(1, 7):  # T12 .. L5
        body = anat.bodies[b]
        start = 0.5 * (body.pi + body.ps)
        depth = np.linspace(0.0, anat.canal_depth[b], 40)
        rot_t = anat.rotation.T
        n_a = rot_t @ plane.normal
        o_a = rot_t @ (plane.centre - anat.translation)
        pts = start[None] + depth[:, None] * (-body.u)[None]
        x = o_a[0] - (n_a[1] * (pts[:, 0] - o_a[1]) + n_a[2] * (pts[:, 1] - o_a[2])) / n_a[0]
        px = plane.to_pixels(np.column_stack([x, pts]) @ anat.rotation.T + anat.translation)
        c = np.clip(np.rint(px[:, 0]).astype(int), 0, cols - 1)
        r = np.clip(np.rint(px[:, 1]).astype(int), 0, rows - 1)
        # At T12 the cord fills most of the sac; below the conus it is CSF and roots.
        assert (st.tissue_map[r, c] == anatomy.CSF).sum() >= (2 if b == 1 else 5), body.name


def test_pixels_have_partial_volume_edges():
    """Tissue maps are drawn supersampled: edges get intermediate grey levels."""
    st = render_study(3, "train", 0, size=128, difficulty=0.0)
    img = st.series[st.t2_series].pixels[st.annotated_slice]
    assert len(np.unique(img)) > 200


def test_degenerated_vertebra_shows_signs():
    for i in range(10):
        st = render_study(4, "train", i, size=128, pixels=False)
        for k, name in enumerate(("L1", "L2", "L3", "L4", "L5")):
            signs = st.anatomy.bodies[pathology.VERTEBRA_NAMES.index(name)].signs
            visible = max(signs.osteophytes) >= 2.0 or signs.modic_type > 0
            assert visible == st.labels.vertebra_degenerated[k], (i, name, signs)


@pytest.mark.parametrize("vocab", ["tianchi2020", "seed7"])
def test_codes_are_valid_in_the_vocabulary(vocab):
    v = get_vocabulary(vocab)
    entries = [render_study(0, "train", i, vocab=vocab, pixels=False).annotation for i in range(30)]
    studies = parse_annotations(entries, vocab)
    assert len(studies) == 30
    for s in studies.values():
        assert len(s.points) == 11
        for p in s.points:
            for code in p.labels:
                v.class_index(p.kind, code)


# ----------------------------------------------------------------------------- priors


def _disc_frequencies(labels_list, vocab):
    counts, n = Counter(), 0
    for labels in labels_list:
        for k in range(6):
            for code in pathology.disc_codes(labels.disc_states[k], labels.schmorl[k], vocab):
                counts[code] += 1
            n += 1
    return {c: counts[c] / n for c in counts}


def test_label_priors_hold_on_600_sampled_studies():
    rng = np.random.default_rng(123)
    labels = [pathology.sample_labels(rng, "tianchi2020") for _ in range(600)]
    freq = _disc_frequencies(labels, "tianchi2020")
    for code, target in {"v1": 0.48, "v2": 0.25, "v3": 0.24, "v4": 0.04, "v5": 0.05}.items():
        assert abs(freq.get(code, 0) - target) < 0.035, (code, freq)
    vert = np.mean([v for lab in labels for v in lab.vertebra_degenerated])
    assert abs(vert - 0.81) < 0.03
    # Degeneration concentrates at L4-L5 and L5-S1.
    path = np.array([[s != "normal" for s in lab.disc_states] for lab in labels]).mean(0)
    assert path[4] > path[0] + 0.2 and path[5] > path[0] + 0.2
    rng = np.random.default_rng(7)
    freq7 = _disc_frequencies([pathology.sample_labels(rng, "seed7") for _ in range(600)], "seed7")
    for code, target in {"v1": 0.40, "v2": 0.20, "v5": 0.14, "v7": 0.05}.items():
        assert abs(freq7.get(code, 0) - target) < 0.035, (code, freq7)


def test_priors_hold_in_written_annotations():
    entries = [render_study(9, "train", i, pixels=False).annotation for i in range(250)]
    studies = parse_annotations(entries, "tianchi2020")
    disc = Counter(
        c for s in studies.values() for p in s.points if p.kind == "disc" for c in p.labels
    )
    n_disc = 250 * len(DISC_POINTS)
    assert abs(disc["v1"] / n_disc - 0.48) < 0.06
    assert abs((disc["v2"] + disc["v3"]) / n_disc - 0.49) < 0.06
    vert = Counter(
        c for s in studies.values() for p in s.points if p.kind == "vertebra" for c in p.labels
    )
    assert abs(vert["v2"] / (250 * 5) - 0.81) < 0.05


# ----------------------------------------------------------------------------- determinism, resume, CLI


def test_render_is_deterministic():
    a = render_study(7, "train", 3, size=128)
    b = render_study(7, "train", 3, size=128)
    c = render_study(8, "train", 3, size=128)
    assert a.annotation == b.annotation
    for sa, sb in zip(a.series, b.series):
        assert all(np.array_equal(x, y) for x, y in zip(sa.pixels, sb.pixels))
    assert a.annotation != c.annotation
    assert not np.array_equal(a.series[a.t2_series].pixels[0], c.series[c.t2_series].pixels[0])


def test_generation_is_identical_for_any_worker_count_and_resumes(tmp_path):
    kw = dict(studies=4, seed=3, splits={"train": 3, "test": 1}, size=96)
    one = generate_phantom(tmp_path / "one", workers=1, **kw)
    two = generate_phantom(tmp_path / "two", workers=2, **kw)
    reference = _digest(one)
    assert reference == _digest(two)
    assert len(json.loads((one / "test_annotation.json").read_text())) == 1
    # Interrupted run: a study missing, one half-written (a file gone), a temp folder left
    # behind, marker gone. A rerun finishes it, byte for byte.
    shutil.rmtree(two / "train" / "study1")
    next((two / "train" / "study2").iterdir()).unlink()
    (two / "train" / ".tmp-study0-99").mkdir()
    (two / "train" / ".tmp-study0-99" / "image1.dcm").write_bytes(b"partial")
    (two / MARKER).unlink()
    (two / "train_annotation.json").unlink()
    generate_phantom(two, workers=1, **kw)
    assert _digest(two) == reference
    # A complete phantom is returned as is; other parameters are refused unless forced.
    generate_phantom(two, **kw)
    with pytest.raises(PhantomError, match="other parameters"):
        generate_phantom(two, **{**kw, "seed": 4})
    generate_phantom(two, force=True, **{**kw, "seed": 4})
    assert _digest(two) != reference


def _generate_in_child(out: str) -> None:
    generate_phantom(out, studies=4, seed=3, splits={"train": 3, "test": 1}, size=96)


def test_processes_asking_for_the_same_phantom_build_it_once(tmp_path):
    """Parallel sweep runs start together: they must not write the same files at once."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_generate_in_child, args=(str(tmp_path / "p"),)) for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    reference = generate_phantom(
        tmp_path / "ref", studies=4, seed=3, splits={"train": 3, "test": 1}, size=96
    )
    assert _digest(tmp_path / "p") == _digest(reference)


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "my_data.txt").write_text("keep me")
    with pytest.raises(PhantomError, match="not written by the phantom"):
        generate_phantom(tmp_path, studies=1, size=64)


@pytest.mark.parametrize("layout", ["tianchi2020", "rsna2024", "spider"])
def test_a_users_own_dataset_in_the_layout_is_never_overwritten(tmp_path, capsys, layout):
    """A folder holding a dataset in the layout's own names (split folders and annotation
    files; train.csv and train_images; images/ and the gradings) but no phantom marker is
    refused, and every file in it is left as it was."""
    files = {
        "tianchi2020": ["train/study0/image1.dcm", "train_annotation.json"],
        "rsna2024": ["train.csv", "train_images/4000000/40000001/1.dcm"],
        "spider": ["radiological_gradings.csv", "images/1_t1.mha"],
    }[layout]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"my own {name}")
    assert main(["--layout", layout, "--studies", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err or "holds files the phantom did not write" in err, err
    assert all((tmp_path / n).read_text() == f"my own {n}" for n in files)


def test_parse_splits():
    assert parse_splits("train=0.7,val=0.15,test=0.15", 20) == {"train": 14, "val": 3, "test": 3}
    assert parse_splits("train=8,val=2", 10) == {"train": 8, "val": 2}
    assert sum(parse_splits(None, 7).values()) == 7
    with pytest.raises(ValueError, match="add up"):
        parse_splits("train=8,val=2", 12)
    with pytest.raises(ValueError, match="name=value"):
        parse_splits("train", 12)


def test_cli_writes_dataset_and_preview(tmp_path, capsys):
    out = tmp_path / "ph"
    dataset = ["--out", str(out), "--studies", "3", "--splits", "train=2,test=1", "--size", "96"]
    rc = main([*dataset, "--workers", "1", "--vocab", "seed7", "--preview", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    png = out / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(load_annotations(out / "test_annotation.json", "seed7")) == 1
    # Preview of an existing dataset into another file; errors are one line, exit code 2.
    preview = ["--preview", str(tmp_path / "p.png")]
    assert main([*dataset, "--vocab", "seed7", *preview, "--no-progress"]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert main(["--out", str(out), "--studies", "3", "--size", "64", "--no-progress"]) == 2
    assert "other parameters" in capsys.readouterr().err
