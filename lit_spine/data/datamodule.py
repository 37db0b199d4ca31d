"""`SpineDataset` over the preprocessing cache and the `SpineDataModule` that feeds training.

The data module resolves a dataset root (or generates the phantom on first use), builds the
caches in `prepare_data` (once per node, before any DDP rank reads them) and opens them in
`setup`. It reads three layouts (`format`, docs/datasets.md): `tianchi2020` (split folders plus
annotation files, `data/cache.py`), `rsna2024` (the competition's CSVs and DICOM tree,
`data/rsna_cache.py`, one row per labelled instance, k-fold by study) and `spider` (.mha
images and masks plus the gradings CSV, `data/spider_cache.py`, one row per patient, k-fold
by patient). The dataset, its items and its randomness are described in
`lit_spine.data.dataset` (re-exported here).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lit_spine.data.dataset import (
    ConcatCache,
    EpochSampler,
    SpineDataset,
    kfold_indices,
    non_finite_rows,
    report_cache_problems,
    study_key,
)
from lit_spine.data.labels import Vocabulary
from lit_spine.data.transforms import AugmentConfig, SpineAugment
from lit_spine.task import Task, get_task
from lit_spine.utils import choose

# Importable from here as before the split (bench, tests).
__all__ = [
    "FORMAT_TASKS",
    "ONE_SET_FORMATS",
    "STAGE_SPLITS",
    "ConcatCache",
    "EpochSampler",
    "SpineDataModule",
    "SpineDataset",
    "kfold_indices",
    "non_finite_rows",
    "report_cache_problems",
    "study_key",
]

# The layouts the data module reads and the tasks each one can feed (docs/datasets.md).
FORMAT_TASKS: dict[str, tuple[str, ...]] = {
    "tianchi2020": ("tianchi2020",),
    "rsna2024": ("rsna2024_canal", "rsna2024_foraminal"),
    "spider": ("spider_disc", "spider_spine"),
}
# Layouts that publish one labelled set, split by study (patient) into folds.
ONE_SET_FORMATS = ("rsna2024", "spider")

STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}


# ---------------------------------------------------------------------------- data module
class SpineDataModule(pl.LightningDataModule):
    """Lumbar-spine MRI keypoints: phantom, 2020-layout or RSNA 2024 data, cached, augmented, batched.

    Args:
        data_root: tianchi2020: folder holding `<split>/study*/` and `<split>_annotation.json`;
            rsna2024: the competition folder (train.csv, train_label_coordinates.csv,
            train_series_descriptions.csv, train_images/); spider: the folder of images/,
            masks/ and radiological_gradings.csv; None uses the phantom.
        format: dataset layout, "tianchi2020", "rsna2024" or "spider" (docs/datasets.md).
        task: what is learned (`lit_spine.task`): "tianchi2020" for the 2020 layout,
            "rsna2024_canal" or "rsna2024_foraminal" for rsna2024, "spider_disc" or
            "spider_spine" for spider; linked to the model so its heads follow the task.
        train_split: training split name(s) under the root; a comma-separated list concatenates splits.
        val_split: validation split name.
        test_split: test split name.
        predict_split: split to predict (annotated or not); None means `test_split`.
        train_annotation: annotation file of the training split (default `<root>/<split>_annotation.json`).
        val_annotation: annotation file of the validation split (same default).
        test_annotation: annotation file of the test split (same default).
        vocab: disease-label vocabulary, one of the task's: "tianchi2020" (released data) or
            "seed7" for tianchi2020, "rsna2024_severity" for rsna2024_canal,
            "spider_pfirrmann" for spider_disc, "spider_findings" for spider_spine.
        image_size: side of the square network input in pixels (letterboxed).
        slices: neighbouring sagittal slices stacked as channels (odd: 1, 3, 5, ...).
        stride: heatmap stride of the model (input pixels per heatmap pixel).
        heatmap_sigma: standard deviation of the Gaussian targets, in heatmap pixels.
        batch_size: items per batch (per process under DDP).
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster GPU copies; None pins when CUDA is available.
        cache_dir: folder of preprocessing caches; None: $LIT_SPINE_CACHE_DIR or ./cache.
        phantom_dir: where the phantom is generated when data_root is None (rsna2024: in
            `<phantom_dir>/rsna2024`, spider: in `<phantom_dir>/spider`).
        phantom_studies: number of phantom studies (all splits together).
        phantom_seed: seed of the phantom generator.
        folds: k-fold cross-validation by study over train + val studies; 1 uses the splits as
            given (rsna2024 and spider have one labelled set: folds >= 2, its validation
            fold also serves test and predict).
        fold: which fold (0-based) validates when folds > 1.
        split_seed: seed of the study permutation that defines the folds.
        seed: seed of augmentation and shuffling; None takes the run's seed (seed_everything) or 0.
        augment: False disables every training augmentation (val/test/predict never augment).
        affine_p: probability of the random affine (rotation, scale, translation, shear).
        rotate_deg: maximum rotation in degrees.
        scale: maximum relative zoom: scale drawn log-uniformly in [1/(1+scale), 1+scale].
        translate: maximum shift as a fraction of the image side.
        shear_deg: maximum shear angle in degrees.
        slice_flip_p: probability of reversing the slice order (left/right mirror; no in-plane flips).
        gamma_p: probability of a gamma change.
        gamma: maximum |log gamma|.
        contrast_p: probability of a contrast/brightness change.
        contrast: maximum |log contrast factor|.
        brightness: maximum brightness shift (image units, about [0, 1]).
        bias_field_p: probability of a smooth multiplicative bias field (coil shading).
        bias_field: strength (log-amplitude) of the bias field.
        noise_p: probability of added noise.
        noise_std: maximum noise standard deviation (image units).
        rician: Rician (magnitude MRI) noise instead of Gaussian.
        cutout_p: probability of cutout.
        cutout_count: maximum number of zeroed rectangles.
        cutout_size: maximum rectangle side as a fraction of the image side.
    """

    def __init__(
        self,
        data_root: str | None = None,
        format: str = "tianchi2020",
        task: str = "tianchi2020",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        predict_split: str | None = None,
        train_annotation: str | None = None,
        val_annotation: str | None = None,
        test_annotation: str | None = None,
        vocab: str = "tianchi2020",
        image_size: int = 256,
        slices: int = 1,
        stride: int = 4,
        heatmap_sigma: float = 2.0,
        batch_size: int = 8,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        cache_dir: str | None = None,
        phantom_dir: str = "data/phantom",
        phantom_studies: int = 120,
        phantom_seed: int = 0,
        folds: int = 1,
        fold: int = 0,
        split_seed: int = 0,
        seed: int | None = None,
        augment: bool = True,
        affine_p: float = 0.9,
        rotate_deg: float = 10.0,
        scale: float = 0.15,
        translate: float = 0.06,
        shear_deg: float = 3.0,
        slice_flip_p: float = 0.5,
        gamma_p: float = 0.5,
        gamma: float = 0.3,
        contrast_p: float = 0.5,
        contrast: float = 0.2,
        brightness: float = 0.1,
        bias_field_p: float = 0.5,
        bias_field: float = 0.3,
        noise_p: float = 0.5,
        noise_std: float = 0.04,
        rician: bool = True,
        cutout_p: float = 0.3,
        cutout_count: int = 2,
        cutout_size: float = 0.15,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        choose(format, FORMAT_TASKS, "data.format")
        if task not in FORMAT_TASKS[format]:
            raise ValueError(
                f"data.task {task!r} does not fit data.format {format!r}: format "
                f"{format!r} feeds task {', '.join(FORMAT_TASKS[format])} "
                f"(valid pairs: "
                + "; ".join(f"{f}: {', '.join(t)}" for f, t in FORMAT_TASKS.items())
                + ")"
            )
        self.task: Task = get_task(task)
        self.vocab_obj: Vocabulary = self.task.vocabulary(vocab)
        if format in ONE_SET_FORMATS and folds < 2:
            raise ValueError(
                f"data.format {format} has one labelled set, split by study into folds: set "
                f"data.folds >= 2 (got {folds}) and data.fold to the validation fold"
            )
        if slices < 1 or slices % 2 == 0:
            raise ValueError(
                f"slices must be odd and >= 1 (the annotated slice in the middle), got {slices}"
            )
        if image_size % stride:
            raise ValueError(f"image_size {image_size} must be a multiple of stride {stride}")
        if folds > 1 and not 0 <= fold < folds:
            raise ValueError(f"fold must be in [0, {folds - 1}] for folds={folds}, got {fold}")
        if "," in train_split and train_annotation:
            raise ValueError(
                "train_annotation names one file but train_split lists several "
                "splits; put each split's <split>_annotation.json under data_root"
            )
        self.augment_config = AugmentConfig(
            affine_p=affine_p,
            rotate_deg=rotate_deg,
            scale=scale,
            translate=translate,
            shear_deg=shear_deg,
            slice_flip_p=slice_flip_p,
            gamma_p=gamma_p,
            gamma=gamma,
            contrast_p=contrast_p,
            contrast=contrast,
            brightness=brightness,
            bias_field_p=bias_field_p,
            bias_field=bias_field,
            noise_p=noise_p,
            noise_std=noise_std,
            rician=rician,
            cutout_p=cutout_p,
            cutout_count=cutout_count,
            cutout_size=cutout_size,
        )
        self._caches: dict[str, object] = {}
        self._datasets: dict[str, SpineDataset] = {}

    # ------------------------------------------------------------------ what was opened
    @property
    def cache_hashes(self) -> dict[str, str]:
        """Content hash of every opened cache, by split name (for run metadata)."""
        return {split: cache.path.name for split, cache in self._caches.items()}

    @property
    def train_dataset(self) -> SpineDataset:
        return self._dataset("train")

    @property
    def val_dataset(self) -> SpineDataset:
        return self._dataset("val")

    @property
    def test_dataset(self) -> SpineDataset:
        return self._dataset("test")

    @property
    def predict_dataset(self) -> SpineDataset:
        return self._dataset("predict")

    # ------------------------------------------------------------------ where the data is
    @property
    def root(self) -> Path:
        """The dataset root: `data_root`, or the phantom folder (`<phantom_dir>/<format>` for
        the rsna2024 and spider layouts)."""
        hp = self.hparams
        if hp.data_root is not None:
            return Path(hp.data_root).expanduser()
        phantom = Path(hp.phantom_dir).expanduser()
        if phantom.exists() and not phantom.is_dir():
            raise ValueError(
                f"data.phantom_dir={hp.phantom_dir!r} is a file, not a folder; point it at a "
                "folder (the phantom is generated there when it is missing)"
            )
        return phantom / hp.format if hp.format in ONE_SET_FORMATS else phantom

    @property
    def cache_dir(self) -> Path:
        hp = self.hparams
        return Path(hp.cache_dir or os.environ.get("LIT_SPINE_CACHE_DIR") or "cache").expanduser()

    def split_names(self, role: str) -> list[str]:
        """Split folder names behind a role ('train', 'val', 'test', 'predict')."""
        hp = self.hparams
        name = {
            "train": hp.train_split,
            "val": hp.val_split,
            "test": hp.test_split,
            "predict": hp.predict_split or hp.test_split,
        }[role]
        names = [s.strip() for s in name.split(",") if s.strip()]
        if not names:
            raise ValueError(f"{role}_split is empty")
        return names

    def _annotation(self, role: str) -> str | None:
        hp = self.hparams
        if role == "predict":
            same = self.split_names("predict") == self.split_names("test")
            return hp.test_annotation if same else None
        files = {"train": hp.train_annotation, "val": hp.val_annotation, "test": hp.test_annotation}
        return files[role]

    def _build(self, split: str, annotation: str | None):
        from lit_spine.data.cache import CacheSettings, build_cache

        folder = self.root / split
        if not folder.is_dir():
            available = (
                sorted(p.name for p in self.root.iterdir() if p.is_dir())
                if (self.root.is_dir())
                else []
            )
            raise FileNotFoundError(
                f"split {split!r}: no folder {folder}; folders under {self.root}: "
                f"{', '.join(available) or 'none'}. Set data.data_root and the *_split names."
            )
        settings = CacheSettings(
            image_size=self.hparams.image_size, neighbors=(self.hparams.slices - 1) // 2
        )
        return build_cache(
            folder,
            settings,
            cache_dir=self.cache_dir,
            annotation=annotation,
            vocab=self.hparams.vocab,
        )

    def _roles(self, stage: str | None) -> list[str]:
        """Roles a stage needs; without a stage, every role whose split folders exist."""
        if stage is None:
            roles = [
                r
                for r in ("train", "val", "test", "predict")
                if all((self.root / s).is_dir() for s in self.split_names(r))
            ]
        else:
            roles = list(STAGE_SPLITS[stage])
        if self.hparams.folds > 1 and "val" in roles:
            roles = list(dict.fromkeys(("train", "val", *roles)))
        return roles

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Generate the phantom if needed and build every split's cache (one process per node)."""
        from lit_spine.data.dicom import DatasetError

        hp = self.hparams
        if hp.format == "rsna2024":
            if hp.data_root is None:
                from lit_spine.phantom.rsna2024 import ensure_rsna2024_phantom

                ensure_rsna2024_phantom(self.root, hp.phantom_studies, hp.phantom_seed)
            self._rsna_cache()
            return
        if hp.format == "spider":
            if hp.data_root is None:
                from lit_spine.phantom.spider import ensure_spider_phantom

                ensure_spider_phantom(self.root, hp.phantom_studies, hp.phantom_seed)
            self._rsna_cache()
            return
        if hp.data_root is None:
            from lit_spine.phantom.generate import generate_phantom

            generate_phantom(self.root, studies=hp.phantom_studies, seed=hp.phantom_seed)
        # An empty split (a phantom too small for a test split) raises in setup, if a stage needs it.
        for role in self._roles(None):
            with contextlib.suppress(DatasetError):
                self._role_cache(role)

    def setup(self, stage: str | None = None) -> None:
        """Open the caches the stage needs and make its datasets (k-fold splits included)."""
        if self.hparams.data_root is None and not self.root.is_dir():
            self.prepare_data()  # used without a Trainer: nobody called prepare_data
        if self.hparams.format in ONE_SET_FORMATS:
            self._setup_rsna(stage)
            return
        for role in self._roles(stage):
            self._datasets[role] = self._make_dataset(role, self._role_cache(role))
        if self.hparams.folds > 1 and {"train", "val"} & set(self._datasets):
            self._make_folds()
        elif "train" in self._datasets:
            self._warn_overlap()

    def _warn_overlap(self) -> None:
        """Say when the training data is also evaluation data, or counted twice: a split named
        in both roles (the overfit check does it on purpose), a split listed twice, or a
        study (StudyInstanceUID) in a training and an evaluation split, e.g. a copied folder.
        A warning, not an error: validation then measures fit, not generalisation."""
        from pytorch_lightning.utilities import rank_zero_warn

        train = self.split_names("train")
        notes = [f"split {n!r} is listed {train.count(n)} times in train_split: its studies "
                 "count that many times" for n in dict.fromkeys(train) if train.count(n) > 1]  # fmt: skip

        def uids(role: str) -> set:
            cache = self._datasets[role].cache
            return {r.get("study_uid") for r in getattr(cache, "records", [])} - {None}

        for role in ("val", "test"):
            if role not in self._datasets:
                continue
            shared = [n for n in dict.fromkeys(self.split_names(role)) if n in train]
            if shared:
                notes.append(f"{role} split(s) {', '.join(shared)} are also training splits")
                continue
            both = sorted(uids("train") & uids(role))
            if both:
                notes.append(f"{len(both)} {role} studies are also in the training splits (by "
                             f"StudyInstanceUID, first {both[0]})")  # fmt: skip
        if notes:
            rank_zero_warn("data: " + "; ".join(notes) + ": evaluation on them measures fit to "
                           "the training data, not generalisation")  # fmt: skip

    def _rsna_cache(self):
        """The cache of the one labelled set of rsna2024 or spider, built or opened once."""
        hp = self.hparams
        if hp.format not in self._caches:
            from lit_spine.data.cache import CacheSettings

            if hp.format == "spider":
                from lit_spine.data.spider_cache import build_spider_cache as build
            else:
                from lit_spine.data.rsna_cache import build_rsna2024_cache as build
            settings = CacheSettings(image_size=hp.image_size, neighbors=(hp.slices - 1) // 2)
            cache = build(self.root, settings, self.cache_dir, task=hp.task, vocab=hp.vocab)
            report_cache_problems(hp.format, cache)
            self._caches[hp.format] = cache
        return self._caches[hp.format]

    def _setup_rsna(self, stage: str | None) -> None:
        """k-fold by study (spider: patient) over the one labelled set; the validation fold
        serves test/predict."""
        hp = self.hparams
        cache = self._rsna_cache()
        train_rows, val_rows = kfold_indices(cache.records, hp.folds, hp.fold, hp.split_seed)
        self._datasets["train"] = self._make_dataset("train", cache, train_rows)
        for role in ("val", "test", "predict"):
            self._datasets[role] = self._make_dataset(role, cache, val_rows)

    def _role_cache(self, role: str):
        """The (possibly concatenated) cache of a role's splits, built or opened once."""
        splits = self.split_names(role)
        annotation = self._annotation(role) if len(splits) == 1 else None
        for split in splits:
            if split not in self._caches:
                cache = self._build(split, annotation)
                report_cache_problems(split, cache)
                if cache.vocab != self.hparams.vocab:
                    raise ValueError(
                        f"{cache.path}: cache built with vocabulary {cache.vocab!r}, "
                        f"not {self.hparams.vocab!r}"
                    )
                self._caches[split] = cache
        caches = [self._caches[split] for split in splits]
        return caches[0] if len(caches) == 1 else ConcatCache(caches)

    def _seed(self) -> int:
        if self.hparams.seed is not None:
            return int(self.hparams.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _make_dataset(self, role: str, cache, indices=None) -> SpineDataset:
        hp = self.hparams
        augment = SpineAugment(self.augment_config) if role == "train" and hp.augment else None
        return SpineDataset(
            cache,
            indices,
            stride=hp.stride,
            heatmap_sigma=hp.heatmap_sigma,
            augment=augment,
            seed=self._seed(),
            task=self.task,
            graded=hp.format in ONE_SET_FORMATS,
        )

    def _make_folds(self) -> None:
        hp = self.hparams
        parts = []
        for role in ("train", "val"):
            ds = self._datasets[role]
            parts += [c for c in getattr(ds.cache, "caches", [ds.cache]) if c not in parts]
        merged = parts[0] if len(parts) == 1 else ConcatCache(parts)
        train_rows, val_rows = kfold_indices(merged.records, hp.folds, hp.fold, hp.split_seed)
        self._datasets["train"] = self._make_dataset("train", merged, train_rows)
        self._datasets["val"] = self._make_dataset("val", merged, val_rows)

    def _dataset(self, role: str) -> SpineDataset:
        if role not in self._datasets:
            self.setup({"train": "fit", "val": "validate"}.get(role, role))
        return self._datasets[role]

    # ------------------------------------------------------------------ loaders
    def _loader(self, role: str, train: bool = False) -> DataLoader:
        hp = self.hparams
        dataset = self._dataset(role)
        trainer = getattr(self, "trainer", None)
        replicas = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        sampler = EpochSampler(
            dataset, shuffle=train, seed=dataset.seed, num_replicas=replicas, rank=rank, pad=train
        )
        if train and len(sampler) < hp.batch_size:
            # Every step would see the whole split, a smaller batch than the learning-rate
            # rule, the logs and the sweep's factor say.
            raise ValueError(
                f"data.batch_size={hp.batch_size} is larger than the {len(sampler)} training "
                f"items {'per process ' if replicas > 1 else ''}of split(s) "
                f"{', '.join(self.split_names('train'))}; use data.batch_size={len(sampler)} "
                "or less, or more training data"
            )
        pin = torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=sampler,
            num_workers=hp.num_workers,
            pin_memory=pin,
            persistent_workers=hp.num_workers > 0,
            drop_last=train and len(sampler) > hp.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
