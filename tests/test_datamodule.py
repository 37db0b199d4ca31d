"""SpineDataset, EpochSampler, k-fold splits and SpineDataModule (on the phantom)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from spine_helpers import BatchRecorder, bare_trainer, geometry_only, phantom_datamodule
from torch.utils.data import DataLoader

from lit_spine.data.datamodule import (
    ConcatCache,
    EpochSampler,
    SpineDataModule,
    SpineDataset,
    kfold_indices,
)
from lit_spine.data.labels import NUM_POINTS, get_vocabulary
from lit_spine.data.targets import heatmap_to_input_coords
from lit_spine.data.transforms import SpineAugment

ITEM_KEYS = {"image", "heatmap", "points", "present", "labels", "spacing_mm", "index"}


class FakeCache:
    """The attributes of `SpineCache` the dataset reads, in memory."""

    def __init__(self, n=6, size=64, channels=3, vocab="tianchi2020", seed=0, prefix="s"):
        rng = np.random.default_rng(seed)
        num_classes = get_vocabulary(vocab).num_classes
        self.vocab = vocab
        self.path = Path(f"/nonexistent/{prefix}{seed}")
        self.images = rng.uniform(0, 1, size=(n, channels, size, size)).astype(np.float16)
        self.points = rng.uniform(8, size - 9, size=(n, NUM_POINTS, 2)).astype(np.float32)
        self.present = np.ones((n, NUM_POINTS), bool)
        self.present[0, 4] = False
        self.points[0, 4] = np.nan  # as the cache stores an absent point
        self.labels = rng.uniform(size=(n, NUM_POINTS, num_classes)) < 0.3
        self.spacing_mm = np.full((n, 2), 1.2, np.float32)
        self.records = [
            {"study": f"{prefix}{i}", "study_uid": f"1.2.{prefix}.{i}"} for i in range(n)
        ]
        self.problems = []

    def __len__(self):
        return len(self.records)

    def to_original(self, i, xy):
        return np.asarray(xy) * 2.0


def test_item_shapes_and_dtypes_without_augmentation():
    cache = FakeCache()
    ds = SpineDataset(cache, stride=4, heatmap_sigma=1.5)
    item = ds[0]
    assert set(item) == ITEM_KEYS
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["heatmap"].shape == (NUM_POINTS, 16, 16) and item["heatmap"].dtype == torch.float32
    assert item["points"].shape == (NUM_POINTS, 2) and item["points"].dtype == torch.float32
    assert item["present"].dtype == torch.bool and not item["present"][4]
    assert item["labels"].shape == (NUM_POINTS, 5) and item["labels"].dtype == torch.bool
    assert not item["labels"][4].any()
    assert item["spacing_mm"].tolist() == pytest.approx([1.2, 1.2])
    assert item["index"] == 0
    # Absent points are finite zeros (safe to feed a point sampler) with an all-zero heatmap.
    assert torch.isfinite(item["points"]).all() and item["points"][4].tolist() == [0, 0]
    assert item["heatmap"][4].max() == 0
    np.testing.assert_array_equal(item["image"].numpy(), cache.images[0].astype(np.float32))
    np.testing.assert_array_equal(item["points"][5].numpy(), cache.points[0, 5])


def test_heatmap_peaks_match_points_after_augmentation():
    ds = SpineDataset(
        FakeCache(size=128), stride=4, heatmap_sigma=2.0, augment=SpineAugment(), seed=1
    )
    for i in range(len(ds)):
        item = ds[i]
        for k in np.flatnonzero(item["present"].numpy()):
            hm = item["heatmap"][k]
            y, x = np.unravel_index(int(hm.argmax()), hm.shape)
            back = heatmap_to_input_coords(np.array([x, y], np.float32), 4)
            assert np.abs(back - item["points"][k].numpy()).max() <= 2.0 + 1e-4


def test_augmented_items_depend_only_on_seed_epoch_and_row():
    cache = FakeCache()
    a = SpineDataset(cache, augment=SpineAugment(), seed=7)
    b = SpineDataset(cache, augment=SpineAugment(), seed=7)
    same = a[(2, 3)], b[(2, 3)]
    for key in ITEM_KEYS - {"index"}:
        assert torch.equal(same[0][key], same[1][key]), key
    assert same[0]["index"] == same[1]["index"] == 2
    b.set_epoch(3)
    assert torch.equal(b[2]["image"], same[0]["image"])  # plain index uses the dataset's epoch
    assert not torch.equal(a[(2, 4)]["image"], same[0]["image"])  # another epoch differs
    assert not torch.equal(
        SpineDataset(cache, augment=SpineAugment(), seed=8)[(2, 3)]["image"], same[0]["image"]
    )  # another seed differs


def test_geometry_keeps_points_on_their_pixels():
    """A bright dot drawn at each point stays under the transformed point."""
    size = 96
    cache = FakeCache(n=8, size=size, channels=1)
    cache.images[:] = 0
    for i in range(len(cache)):
        cache.present[i] = False
        cache.present[i, 0] = True
        x, y = np.round(cache.points[i, 0]).astype(int)
        cache.points[i, 0] = (x, y)
        cache.images[i, 0, y - 1 : y + 2, x - 1 : x + 2] = 0.5
        cache.images[i, 0, y, x] = 1.0
    geometry = geometry_only(rotate_deg=20, scale=0.2, translate=0.05, shear_deg=3)
    ds = SpineDataset(cache, augment=SpineAugment(geometry), seed=0)
    checked = 0
    for epoch in range(3):
        for i in range(len(ds)):
            item = ds[(i, epoch)]
            if not item["present"][0]:
                continue
            flat = int(item["image"][0].argmax())
            xy = np.array([flat % size, flat // size])
            assert np.abs(xy - item["points"][0].numpy()).max() <= 1.0
            checked += 1
    assert checked >= 12


def test_epoch_sampler_orders_and_shards():
    ds = SpineDataset(FakeCache(n=10))
    s = EpochSampler(ds, shuffle=True, seed=3)
    s.set_epoch(0)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10)) and {e for _, e in first} == {0}
    assert first == list(s)  # same epoch, same order
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in first]
    ranks = [list(EpochSampler(ds, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]  # padded for training: equal step counts
    evals = [
        list(EpochSampler(ds, shuffle=False, num_replicas=3, rank=r, pad=False)) for r in range(3)
    ]
    assert sorted(i for part in evals for i, _ in part) == list(range(10))  # each once


def test_loader_is_identical_with_and_without_workers():
    ds = SpineDataset(FakeCache(n=6), augment=SpineAugment(), seed=5)

    def run(workers):
        sampler = EpochSampler(ds, shuffle=True, seed=5)
        loader = DataLoader(
            ds, batch_size=4, sampler=sampler, num_workers=workers, persistent_workers=workers > 0
        )
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out += [b["image"] for b in loader]
        return torch.cat(out)

    assert torch.equal(run(0), run(2))


def test_kfold_partitions_studies():
    records = [{"study_uid": f"u{i // 2}", "study": f"study{i}"} for i in range(23)]  # 12 studies
    vals = []
    for fold in range(5):
        train, val = kfold_indices(records, 5, fold, seed=1)
        assert not set(train) & set(val) and len(train) + len(val) == len(records)
        train_uids = {records[i]["study_uid"] for i in train}
        val_uids = {records[i]["study_uid"] for i in val}
        assert not train_uids & val_uids  # rows of one study stay together
        vals.append(val_uids)
    assert set().union(*vals) == {r["study_uid"] for r in records}
    assert sum(len(v) for v in vals) == 12 and {len(v) for v in vals} <= {2, 3}
    # Stable: independent of record order, different for another seed.
    shuffled = records[::-1]
    assert {shuffled[i]["study_uid"] for i in kfold_indices(shuffled, 5, 0, seed=1)[1]} == vals[0]
    assert [kfold_indices(records, 5, f, seed=2)[1].tolist() for f in range(5)] != [
        kfold_indices(records, 5, f, seed=1)[1].tolist() for f in range(5)
    ]
    with pytest.raises(ValueError, match="fold"):
        kfold_indices(records, 5, 5)


def test_concat_cache_maps_rows_to_parts():
    a, b = FakeCache(n=3, seed=0, prefix="a"), FakeCache(n=4, seed=1, prefix="b")
    both = ConcatCache([a, b])
    assert len(both) == 7 and both.images.shape == (7, 3, 64, 64)
    np.testing.assert_array_equal(both.images[4], b.images[1])
    np.testing.assert_array_equal(both.points[4], b.points[1])
    assert both.records[4]["study"] == "b1"
    assert both.to_original(4, np.ones(2)).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="vocabulary"):
        ConcatCache([a, FakeCache(vocab="seed7")])


def test_datamodule_argument_checks():
    with pytest.raises(ValueError, match="odd"):
        SpineDataModule(slices=2)
    with pytest.raises(ValueError, match="multiple of stride"):
        SpineDataModule(image_size=130, stride=4)
    with pytest.raises(ValueError, match="fold"):
        SpineDataModule(folds=3, fold=3)
    with pytest.raises(ValueError, match="vocabulary"):
        SpineDataModule(vocab="tianchi")
    dm = SpineDataModule(slices=3, vocab="seed7")
    vocab = dm.vocab_obj
    assert (dm.hparams.slices, dm.task.num_points, len(vocab.vertebra), len(vocab.disc)) == (
        3,
        11,
        2,
        7,
    )
    assert dm.vocab_obj.name == "seed7" and dm.hparams.image_size == 256


# ---------------------------------------------------------------------------- on the phantom
@pytest.fixture(scope="module")
def phantom_dm(phantom_root, tmp_path_factory):
    dm = SpineDataModule(
        data_root=str(phantom_root),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        image_size=128,
        slices=3,
        stride=4,
        batch_size=4,
        num_workers=0,
        seed=0,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_datamodule_end_to_end_on_the_phantom(phantom_dm):
    dm = phantom_dm
    assert len(dm.train_dataset) == 8 and len(dm.val_dataset) == 2
    assert set(dm.cache_hashes) >= {"train", "val"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 128, 128) and batch["image"].dtype == torch.float32
    assert batch["heatmap"].shape == (4, NUM_POINTS, 32, 32)
    vocab = dm.vocab_obj
    assert batch["labels"].shape == (4, NUM_POINTS, max(len(vocab.vertebra), len(vocab.disc)))
    assert batch["present"].float().mean() > 0.8
    # Phantom images are 384-640 px at 0.6-1.0 mm: at 128 px that is about 1.8-5 mm per pixel.
    spacing = batch["spacing_mm"]
    assert spacing.shape == (4, 2) and bool(((spacing > 1.0) & (spacing < 8.0)).all())
    # Every annotated point has at least one label of its own type.
    present = batch["present"]
    assert bool((batch["labels"][present].sum(-1) >= 1).all())
    for name in ("val", "test", "predict"):
        dm.setup(name if name != "val" else "validate")
        loader = getattr(dm, f"{name}_dataloader")()
        b = next(iter(loader))
        assert b["image"].shape[1:] == (3, 128, 128), name
        assert sorted(torch.cat([x["index"] for x in loader]).tolist()) == list(
            range(len(getattr(dm, f"{name}_dataset")))
        ), name


def test_validation_items_are_not_augmented(phantom_dm):
    ds = phantom_dm.val_dataset
    assert ds.augment is None
    item = ds[0]
    cache = ds.cache
    row = int(item["index"])
    np.testing.assert_array_equal(item["image"].numpy(), np.asarray(cache.images[row], np.float32))
    np.testing.assert_allclose(item["spacing_mm"].numpy(), cache.spacing_mm[row])


def test_spacing_at_256_px(phantom_root, tmp_path):
    dm = SpineDataModule(
        data_root=str(phantom_root),
        cache_dir=str(tmp_path),
        image_size=256,
        batch_size=2,
        num_workers=0,
        augment=False,
    )
    dm.setup("validate")
    spacing = torch.stack([dm.val_dataset[i]["spacing_mm"] for i in range(len(dm.val_dataset))])
    assert bool(((spacing > 0.5) & (spacing < 4.0)).all())


def test_kfold_datamodule_covers_train_and_val(phantom_dm, phantom_root):
    cache_dir = str(Path(phantom_dm.cache_dir))
    seen = []
    for fold in range(3):
        dm = SpineDataModule(
            data_root=str(phantom_root),
            cache_dir=cache_dir,
            image_size=128,
            slices=3,
            folds=3,
            fold=fold,
            num_workers=0,
        )
        dm.setup("fit")
        tr, va = dm.train_dataset, dm.val_dataset
        uid = lambda ds: {ds.cache.records[int(r)]["study_uid"] for r in ds.indices}  # noqa: E731
        assert not uid(tr) & uid(va) and len(tr) + len(va) == 10
        seen.append(uid(va))
    assert sum(len(s) for s in seen) == 10 and len(set().union(*seen)) == 10


@pytest.fixture(scope="module")
def challenge_root(tmp_path_factory):
    """Tiny DICOM studies under the released data's split names; the test split unannotated."""
    import dicom_factory

    root = tmp_path_factory.mktemp("challenge")
    dicom_factory.dataset(root, 3, split="lumbar_train150", shape=(80, 64))
    dicom_factory.dataset(root, 2, split="lumbar_train51")
    dicom_factory.dataset(root, 2, split="lumbar_testA50", annotate=False)
    return root


def test_challenge_layout_with_several_train_splits(challenge_root, tmp_path):
    dm = SpineDataModule(
        data_root=str(challenge_root),
        train_split="lumbar_train150, lumbar_train51",
        val_split="lumbar_train51",
        test_split="lumbar_train51",
        predict_split="lumbar_testA50",
        cache_dir=str(tmp_path),
        image_size=64,
        slices=3,
        batch_size=2,
        num_workers=0,
    )
    dm.prepare_data()
    assert set(dm.cache_hashes) == {"lumbar_train150", "lumbar_train51", "lumbar_testA50"}
    dm.setup("fit")
    train = dm.train_dataset
    assert len(train) == 5 and isinstance(train.cache, ConcatCache)
    studies = [r["study"] for r in train.cache.records]
    assert studies == ["study0", "study1", "study2", "study0", "study1"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 64, 64) and bool(batch["present"].all())
    dm.setup("predict")
    predict = next(iter(dm.predict_dataloader()))
    assert not predict["present"].any()  # an unannotated split still feeds images
    assert predict["index"].tolist() == [0, 1]
    assert not dm.predict_dataset.cache.records[0]["annotated"]
    with pytest.raises(ValueError, match="several"):
        SpineDataModule(train_split="a,b", train_annotation="a.json")


def test_missing_split_names_the_folder(phantom_root, tmp_path):
    dm = SpineDataModule(
        data_root=str(phantom_root),
        cache_dir=str(tmp_path),
        test_split="lumbar_testA50",
        num_workers=0,
    )
    with pytest.raises(FileNotFoundError, match="lumbar_testA50"):
        dm.setup("test")


def test_no_data_root_generates_the_phantom(tmp_path):
    dm = phantom_datamodule(tmp_path, phantom_studies=4, batch_size=2)
    dm.prepare_data()
    assert (tmp_path / "phantom" / "train").is_dir()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 64, 64)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (3, 1)


def test_trainer_epochs_are_reproducible_with_any_worker_count(challenge_root, tmp_path):
    """Lightning calls EpochSampler.set_epoch: epochs differ, workers do not matter."""

    def fit(workers):
        dm = SpineDataModule(
            data_root=str(challenge_root),
            train_split="lumbar_train150",
            val_split="lumbar_train51",
            cache_dir=str(tmp_path),
            image_size=64,
            batch_size=2,
            num_workers=workers,
            seed=3,
        )
        model = BatchRecorder()
        bare_trainer(max_epochs=3).fit(model, datamodule=dm)
        return model.seen

    seen = fit(0)
    assert [epoch for epoch, _, _ in seen] == [0, 1, 2]  # 3 studies, batch 2, drop_last
    assert len({total for _, _, total in seen}) == 3
    assert fit(2) == seen


def test_training_data_reused_for_evaluation_is_said(phantom_root, tmp_path):
    """val_split=train (the overfit check does it on purpose), a split listed twice, and a
    validation study copied into the training split each give a warning naming it."""
    import shutil

    def setup(root, **splits):
        dm = SpineDataModule(data_root=str(root), image_size=64, batch_size=2, num_workers=0,
                             cache_dir=str(tmp_path / "cache"), **splits)  # fmt: skip
        dm.setup("fit")

    with pytest.warns(UserWarning, match="val split\\(s\\) train are also training splits"):
        setup(phantom_root, train_split="train", val_split="train")
    with pytest.warns(UserWarning, match="split 'train' is listed 2 times in train_split"):
        setup(phantom_root, train_split="train,train", val_split="val")
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    val_study = next(p for p in sorted((root / "val").iterdir()) if p.is_dir())
    shutil.copytree(val_study, root / "train" / "copied_from_val")
    with pytest.warns(UserWarning, match="1 val studies are also in the training splits"):
        setup(root, train_split="train", val_split="val")
