"""The training path with bad files: a real Trainer run skips them, reports each once, and
never sees a NaN image; predict-time data comes through the same cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dicom_factory import dataset
from fuzz_dicom import panic_rle
from pydicom.uid import RLELossless
from spine_helpers import BatchRecorder, bare_trainer

from lit_spine.data.datamodule import SpineDataModule, SpineDataset, non_finite_rows


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    split, infos = dataset(root, 4, split="train", transfer_syntax=RLELossless)
    # study0: a zero-filled and a truncated file among good ones; study1: its annotated slice
    # panics the RLE decoder; an empty study folder; a slice lying loose in the split folder.
    (split / "study0" / "zeros.dcm").write_bytes(b"\0" * 5000)
    t1 = infos[0].series["t1"].paths[0]
    (split / "study0" / "cut.dcm").write_bytes(t1.read_bytes()[:-500])
    t2 = infos[1].series["t2"]
    panic_rle(t2.paths[t2.instance_uids.index(t2.middle)])
    (split / "study9").mkdir()
    (split / "loose.dcm").write_bytes(t1.read_bytes())
    dataset(root, 2, split="val")
    return root, split


@pytest.mark.timeout(120)
def test_fit_skips_and_reports_bad_files_once(bad_root, tmp_path, capfd):
    root, split = bad_root
    dm = SpineDataModule(
        data_root=str(root),
        cache_dir=str(tmp_path),
        image_size=32,
        batch_size=2,
        num_workers=0,
        seed=0,
    )
    model = BatchRecorder()
    bare_trainer(max_epochs=2).fit(model, datamodule=dm)
    err = capfd.readouterr().err
    assert err.count("lit-spine: split 'train':") == 1, err
    for needle in ("zeros.dcm", "cut.dcm", "study1: the annotated slice cannot be decoded",
                   "study9: no DICOM files in this folder", "loose.dcm"):  # fmt: skip
        assert needle in err, needle
    assert "panicked" not in err and "Traceback" not in err
    records = dm.train_dataset.cache.records
    assert [r["study"] for r in records] == ["study0", "study2", "study3"]
    assert model.images and all(bool(torch.isfinite(b).all()) for b in model.images)
    # Reported once: each bad file has one problem line in the cache.
    problems = dm.train_dataset.cache.problems
    for name in ("zeros.dcm", "cut.dcm"):
        assert sum(name in p for p in problems) == 1, (name, problems)


@pytest.mark.timeout(60)
def test_predict_split_skips_the_bad_study(bad_root, tmp_path):
    root, _ = bad_root
    dm = SpineDataModule(
        data_root=str(root),
        predict_split="train",
        test_split="val",
        cache_dir=str(tmp_path),
        image_size=32,
        batch_size=8,
        num_workers=0,
    )
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["index"].tolist() == [0, 1, 2] and bool(torch.isfinite(batch["image"]).all())


class _Cache:
    """A cache whose row 1 holds a NaN (a cache not written by `build_cache`)."""

    def __init__(self):
        self.images = np.zeros((3, 1, 8, 8), np.float16)
        self.images[1, 0, 3, 3] = np.nan
        self.points = np.zeros((3, 11, 2), np.float32)
        self.present = np.zeros((3, 11), bool)
        self.labels = np.zeros((3, 11, 7), bool)
        self.spacing_mm = np.ones((3, 2), np.float32)
        self.records = [{"study": f"s{i}"} for i in range(3)]
        self.vocab = "tianchi2020"
        self.problems = []

    def __len__(self):
        return len(self.records)


def test_dataset_never_serves_a_nan_image(capfd):
    cache = _Cache()
    assert non_finite_rows(cache.images, [0, 1, 2]).tolist() == [1]
    ds = SpineDataset(cache, stride=4)
    assert len(ds) == 2 and ds.skipped_rows == [1]
    assert [ds[i]["index"] for i in range(len(ds))] == [0, 2]
    assert "1 cached images hold NaN/inf values and are left out (s1)" in capfd.readouterr().err
