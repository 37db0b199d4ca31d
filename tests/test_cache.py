"""Preprocessing cache: geometry of points and spacing, channels, reuse, rebuild, atomicity."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from dicom_factory import AXIAL, StudyWriter, annotation_for, dataset, write_json

from lit_spine.data import cache as cache_mod
from lit_spine.data.annotation import AnnotationError
from lit_spine.data.cache import (
    CacheError,
    CacheSettings,
    SpineCache,
    build_cache,
    cache_key,
    letterbox,
)
from lit_spine.data.dicom import DatasetError
from lit_spine.data.dicom import pixels as dicom_pixels
from lit_spine.data.labels import POINT_INDEX, get_vocabulary


@pytest.fixture
def count_decodes(monkeypatch):
    """Count every real pixel decode."""
    calls = []
    real = dicom_pixels.decode_pixels

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(dicom_pixels, "decode_pixels", counting)
    return calls


def blob(shape, x0, y0, sigma=1.5, level=3000.0, base=200.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    g = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
    return (base + level * g).astype(np.uint16)


def centroid(img, x, y, r=4):
    """Intensity centroid of `img` in a window around (x, y), background removed."""
    y0, x0 = int(round(y)), int(round(x))
    win = img[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1].astype(np.float64)
    win = np.clip(win - np.median(img), 0, None)
    yy, xx = np.mgrid[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    return (win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()


@pytest.mark.parametrize("size", [128, 40])
def test_points_land_on_the_image_feature_and_spacing_rescales(tmp_path, size):
    shape, (x0, y0) = (48, 64), (41.0, 17.0)  # non-square: letterbox pads the rows
    w = StudyWriter(tmp_path / "train" / "study1")
    t2 = w.series(
        "t2", "T2_SAG", n=3, pixels_at={1: blob(shape, x0, y0)}, shape=shape, spacing=(0.9, 0.6)
    )
    write_json(
        tmp_path / "train_annotation.json", [annotation_for(w.info, points={"L3": (x0, y0)})]
    )
    # The full window keeps the blob's peak unclipped, so its argmax is meaningful.
    settings = CacheSettings(image_size=size, percentiles=(0.0, 100.0))
    c = build_cache(tmp_path / "train", settings, tmp_path / "cache", progress=False)
    assert c.images.shape == (1, 1, size, size) and c.images.dtype == np.float16
    k = POINT_INDEX["L3"]
    assert c.present[0].tolist() == [i == k for i in range(11)]
    px, py = c.points[0, k]
    s = size / 64
    assert px == pytest.approx((x0 + 0.5) * s - 0.5)
    assert py == pytest.approx((y0 + 0.5) * s - 0.5 + (size - round(48 * s)) // 2)
    img = np.asarray(c.images[0, 0], dtype=np.float32)
    cx, cy = centroid(img, px, py, r=max(2, int(3 * s)))
    assert abs(cx - px) < 0.35 and abs(cy - py) < 0.35
    assert np.unravel_index(img.argmax(), img.shape) == (round(py), round(px))
    np.testing.assert_allclose(c.spacing_mm[0], [0.9 * 48 / round(48 * s), 0.6 / s], rtol=1e-6)
    np.testing.assert_allclose(c.to_original(0, c.points[0, k]), [x0, y0], atol=1e-4)
    assert c.records[0]["instance_uid"] == t2.middle
    # normalised to [0, 1], padding exactly 0
    assert img.min() == 0.0 and 0.5 < img.max() <= 1.0
    assert (img[0] == 0).all() and (img[-1] == 0).all()


def test_letterbox_geometry():
    img, scale, pad = letterbox(np.ones((2, 30, 60), np.float32), 40)
    assert img.shape == (2, 40, 40) and scale == (20 / 30, 40 / 60) and pad == (10, 0)
    assert img[:, 10:30].min() == pytest.approx(1.0) and img[:, :10].max() == 0


def test_neighbour_channels_are_ordered_and_replicated_at_edges(tmp_path):
    w = StudyWriter(tmp_path / "train" / "study1")
    levels = [100, 200, 300, 400, 500]
    # Each slice is a ramp with an offset: the centre slice's window maps neighbours apart.
    ramp = np.tile(np.arange(32, dtype=np.float64) * 10, (32, 1))
    t2 = w.series(
        "t2",
        "T2_SAG",
        n=5,
        shape=(32, 32),
        pixels_at={i: (ramp + lv).astype(np.uint16) for i, lv in enumerate(levels)},
    )
    write_json(
        tmp_path / "train_annotation.json",
        [annotation_for(w.info, instance_uid=t2.instance_uids[0], points={"L1": (3, 3)})],
    )
    c = build_cache(
        tmp_path / "train",
        CacheSettings(image_size=32, neighbors=2, percentiles=(0, 100)),
        tmp_path / "cache",
        progress=False,
    )
    img = np.asarray(c.images[0], dtype=np.float32)
    assert img.shape == (5, 32, 32)
    means = img.mean(axis=(1, 2))
    # index 0: channels are slices [0, 0, 0, 1, 2] (edge replicated), top-to-bottom order.
    assert means[0] == means[1] == means[2] and means[2] < means[3] < means[4]
    assert c.records[0]["index"] == 0 and c.records[0]["source"] == "annotation"


def test_labels_are_multi_hot_over_vocabulary_classes(tmp_path):
    root, infos = dataset(tmp_path, 1, annotate=False)
    write_json(
        tmp_path / "train_annotation.json",
        [annotation_for(infos[0], labels={"L4-L5": "v2,v5", "L4": "v2"})],
    )
    c = build_cache(root, CacheSettings(image_size=32), tmp_path / "cache", progress=False)
    classes = get_vocabulary("tianchi2020").classes
    on = lambda name: [classes[i] for i in np.flatnonzero(c.labels[0, POINT_INDEX[name]])]  # noqa: E731
    assert on("L4-L5") == ["disc/v2", "disc/v5"]
    assert on("L4") == ["vertebra/v2"]
    assert on("L1-L2") == ["disc/v1"]
    assert c.labels.shape == (1, 11, len(classes))


def test_second_build_reuses_without_decoding(tmp_path, count_decodes):
    root, _ = dataset(tmp_path, 2)
    settings = CacheSettings(image_size=32, neighbors=1)
    first = build_cache(root, settings, tmp_path / "cache", progress=False)
    # Per study: the annotated slice and its two neighbours; no series competition is run
    # because the annotation names the instance.
    assert len(count_decodes) == 2 * 3 and len(set(count_decodes)) == 6
    mtime = (first.path / "index.json").stat().st_mtime_ns
    second = build_cache(root, settings, tmp_path / "cache", progress=False)
    assert len(count_decodes) == 6
    assert second.path == first.path
    assert (second.path / "index.json").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(np.asarray(second.images), np.asarray(first.images))


def test_unannotated_build_decodes_each_file_once(tmp_path, count_decodes):
    root, infos = dataset(tmp_path, 2, split="test", annotate=False)
    c = build_cache(
        root, CacheSettings(image_size=32, neighbors=1), tmp_path / "cache", progress=False
    )
    # Per study: the middle slice of both competing T2 sagittal series (T2 and T2 FS), then the
    # two neighbours of the chosen middle slice, which itself is not decoded again.
    assert len(count_decodes) == 2 * 4 and len(set(count_decodes)) == 8
    assert [r["instance_uid"] for r in c.records] == [i.series["t2"].middle for i in infos]


def test_rebuilds_when_settings_files_or_annotation_change(tmp_path):
    root, infos = dataset(tmp_path, 1)
    cache_dir = tmp_path / "cache"
    base = build_cache(root, CacheSettings(image_size=32), cache_dir, progress=False)
    other = build_cache(root, CacheSettings(image_size=48), cache_dir, progress=False)
    assert other.path != base.path and other.images.shape[-1] == 48
    assert (
        build_cache(
            root, CacheSettings(image_size=32, percentiles=(1, 99)), cache_dir, progress=False
        ).path
        != base.path
    )
    assert (
        build_cache(
            root, CacheSettings(image_size=32), cache_dir, vocab="seed7", progress=False
        ).path
        != base.path
    )
    path = infos[0].series["t1"].paths[0]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched = build_cache(root, CacheSettings(image_size=32), cache_dir, progress=False)
    assert touched.path != base.path
    write_json(
        tmp_path / "train_annotation.json", [annotation_for(infos[0], points={"L1": (5, 5)})]
    )
    edited = build_cache(root, CacheSettings(image_size=32), cache_dir, progress=False)
    assert edited.path != touched.path and edited.present[0].sum() == 1


def test_rebuilds_when_a_file_is_rewritten_with_its_old_mtime_or_behind_a_link(tmp_path):
    """A slice rewritten with its old size and mtime put back (os.utime, cp -p, rsync -t), and
    a file changed in a study folder that is a symlink into another store, give a new key:
    the stale cache is never reused."""
    root, infos = dataset(tmp_path, 2)
    cache_dir = tmp_path / "cache"
    base = build_cache(root, CacheSettings(image_size=32), cache_dir, progress=False)
    path = infos[0].series["t2"].paths[0]
    st, data = path.stat(), path.read_bytes()
    path.write_bytes(data[:-4] + bytes(4))  # the same size, other pixels
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    rewritten = build_cache(root, CacheSettings(image_size=32), cache_dir, progress=False)
    assert rewritten.path != base.path

    store = tmp_path / "store"
    shutil.move(str(root / infos[1].folder.name), store)
    (root / infos[1].folder.name).symlink_to(store, target_is_directory=True)
    linked = build_cache(root, CacheSettings(image_size=32), cache_dir, progress=False)
    source = next(p for p in sorted(store.rglob("*")) if p.is_file())
    (store / "extra.dcm").write_bytes(source.read_bytes())
    changed = build_cache(root, CacheSettings(image_size=32), cache_dir, progress=False)
    assert changed.path != linked.path, "a change behind a symlinked study folder rebuilds"


def test_a_copied_study_folder_is_reported_and_counted_once(tmp_path):
    root, infos = dataset(tmp_path, 2)
    shutil.copytree(infos[0].folder, root / "zz_copy")
    c = build_cache(root, CacheSettings(image_size=32), tmp_path / "cache", progress=False)
    assert len(c) == 2 and "zz_copy" not in {r["study"] for r in c.records}
    assert any(
        p.startswith(f"zz_copy: StudyInstanceUID {infos[0].study_uid} is also that of")
        and p.endswith("which is kept; this folder is left out")
        for p in c.problems
    ), c.problems


def test_failed_build_leaves_nothing_visible(tmp_path, monkeypatch):
    root, _ = dataset(tmp_path, 1)
    cache_dir = tmp_path / "cache"
    settings = CacheSettings(image_size=32)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "atomic_write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        build_cache(root, settings, cache_dir, progress=False)
    assert [p for p in cache_dir.iterdir() if p.suffix != ".lock"] == []  # only the lock file
    monkeypatch.undo()
    assert len(build_cache(root, settings, cache_dir, progress=False)) == 1


def test_losing_a_build_race_uses_the_winner(tmp_path, monkeypatch):
    root, _ = dataset(tmp_path, 1)
    settings = CacheSettings(image_size=32)
    winner = build_cache(root, settings, tmp_path / "elsewhere", progress=False)
    final = tmp_path / "cache" / winner.path.name
    real = cache_mod.atomic_write_json

    def finish_first(path, obj, **kw):
        real(path, obj, **kw)
        shutil.copytree(winner.path, final)  # the other builder renames its folder first

    monkeypatch.setattr(cache_mod, "atomic_write_json", finish_first)
    c = build_cache(root, settings, tmp_path / "cache", progress=False)
    assert c.path == final
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock") == [
        final.name
    ]


def test_open_rejects_incomplete_cache_and_build_repairs_it(tmp_path):
    root, _ = dataset(tmp_path, 1)
    c = build_cache(root, CacheSettings(image_size=32), tmp_path / "cache", progress=False)
    path = c.path
    del c
    with open(path / "images.f16", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CacheError, match=r"images.f16: expected 2048 bytes, found 100; delete"):
        SpineCache.open(path)
    assert build_cache(
        root, CacheSettings(image_size=32), tmp_path / "cache", progress=False
    ).images.shape == (1, 1, 32, 32)
    (path / "index.json").unlink()
    with pytest.raises(CacheError, match="incomplete cache"):
        SpineCache.open(path)


def test_stale_temporary_builds_are_removed(tmp_path):
    root, _ = dataset(tmp_path, 1)
    settings = CacheSettings(image_size=32)
    key = cache_key(root, settings, tmp_path / "train_annotation.json")
    stale = tmp_path / "cache" / f"{key}.tmp-999999999"
    stale.mkdir(parents=True)
    c = build_cache(root, settings, tmp_path / "cache", progress=False)
    assert c.path.name == key and not stale.exists()


def test_bad_inputs_are_reported_not_fatal(tmp_path):
    root, infos = dataset(tmp_path, 3, annotate=False)
    # study0: a corrupt file among good ones; study1: annotation names an unknown instance;
    # study2: a point outside the image. Plus an annotation for a study that is not there.
    (root / "study0" / "corrupt.dcm").write_bytes(infos[0].series["t2"].paths[0].read_bytes()[:900])
    entries = [
        annotation_for(infos[0]),
        annotation_for(infos[1], instance_uid="1.2.3.4"),
        annotation_for(infos[2], points={"L1": (10, 10), "L2": (64.5, 10)}),
        {**annotation_for(infos[0]), "studyUid": "5.5.5"},
    ]
    write_json(tmp_path / "train_annotation.json", entries)
    c = build_cache(root, CacheSettings(image_size=32), tmp_path / "cache", progress=False)
    assert len(c) == 3
    text = "\n".join(c.problems)
    assert f"study0: skipped {root / 'study0' / 'corrupt.dcm'}: truncated" in text
    assert "study1: annotation names instance 1.2.3.4" in text
    assert "falling back to the automatic choice" in text
    assert c.records[1]["source"] == "auto"
    assert "study2: point L2 at (64.5, 10) lies outside the 64x64 image; marked not present" in text
    assert c.present[2].tolist() == [n == "L1" for n in POINT_INDEX]
    assert "names study 5.5.5, which matches no study folder" in text
    assert "study2: annotation: 2 points; missing T12-L1" in text


def test_unannotated_studies_are_kept_without_points(tmp_path):
    root, _ = dataset(tmp_path, 2, split="test", annotate=False)
    c = build_cache(root, CacheSettings(image_size=32), tmp_path / "cache", progress=False)
    assert len(c) == 2 and not c.present.any() and np.isnan(c.points).all()
    assert [r["annotated"] for r in c.records] == [False, False]


def test_fatal_inputs_raise_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no DICOM files found"):
        build_cache(tmp_path / "empty", cache_dir=tmp_path / "cache", progress=False)
    w = StudyWriter(tmp_path / "axial" / "study1")
    w.series("ax", "T2_TRA", orientation=AXIAL)
    with pytest.raises(DatasetError, match="no usable study"):
        build_cache(tmp_path / "axial", cache_dir=tmp_path / "cache", progress=False)
    assert not any(p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock")
    root, infos = dataset(tmp_path / "d", 1, annotate=False)
    (tmp_path / "d" / "train_annotation.json").write_text("{oops")
    with pytest.raises(AnnotationError, match="malformed JSON"):
        build_cache(root, cache_dir=tmp_path / "cache", progress=False)
    write_json(
        tmp_path / "d" / "train_annotation.json", [annotation_for(infos[0], labels={"L2": "v3"})]
    )
    with pytest.raises(AnnotationError, match="unknown vertebra disease code 'v3'"):
        build_cache(root, cache_dir=tmp_path / "cache", progress=False)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    root, _ = dataset(tmp_path, 1)
    monkeypatch.setenv("LIT_SPINE_CACHE_DIR", str(tmp_path / "envcache"))
    c = build_cache(root, CacheSettings(image_size=32), progress=False)
    assert c.path.parent == tmp_path / "envcache"


def test_settings_validation():
    with pytest.raises(ValueError, match="neighbors"):
        CacheSettings(neighbors=-1)
    with pytest.raises(ValueError, match="percentiles"):
        CacheSettings(percentiles=(99, 1))
    assert CacheSettings(neighbors=2).channels == 5


def test_phantom_caches_cleanly(phantom_root, tmp_path, count_decodes):
    root = phantom_root / "train"
    c = build_cache(root, CacheSettings(image_size=64, neighbors=1), tmp_path, progress=False)
    n_studies = sum(p.is_dir() for p in root.iterdir())
    assert len(c) == n_studies and c.problems == []
    assert c.present.all() and all(r["source"] == "annotation" for r in c.records)
    assert len(count_decodes) == len(set(count_decodes)) <= 3 * n_studies
    assert float(np.min(c.images)) >= 0.0 and float(np.max(c.images)) <= 1.0
    assert np.all((c.spacing_mm > 0.6) & (c.spacing_mm < 16.0))
