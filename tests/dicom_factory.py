"""Minimal synthetic DICOM studies for edge-case tests (tiny images, a few series)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal = (-1, 0, 0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # normal = (0, 0, 1)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # normal = (0, 1, 0)


def write_slice(
    path: Path,
    pixels: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    description: str | None,
    orientation: tuple | None = SAGITTAL,
    position: tuple | None = (0.0, 0.0, 0.0),
    instance_uid: str | None = None,
    instance_number: int | None = None,
    spacing: tuple | None = (0.8, 0.8),
    imager_spacing: tuple | None = None,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> str:
    """Write one single-frame MR slice (uint16 pixels); returns its SOPInstanceUID."""
    instance_uid = instance_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = instance_uid
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    if description is not None:
        ds.SeriesDescription = description
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if spacing is not None:
        ds.PixelSpacing = [float(v) for v in spacing]
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = [float(v) for v in imager_spacing]
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        # Keep the SOPInstanceUID: compress() would otherwise make a new one.
        ds.compress(transfer_syntax, pixels, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return instance_uid


@dataclass
class SeriesInfo:
    """What a test needs to know about a written series: uids ordered along the normal."""

    uid: str
    description: str
    instance_uids: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    @property
    def middle(self) -> str:
        return self.instance_uids[(len(self.instance_uids) - 1) // 2]


@dataclass
class StudyInfo:
    folder: Path
    study_uid: str
    series: dict[str, SeriesInfo] = field(default_factory=dict)


class StudyWriter:
    """Writes series into one study folder with shuffled file names."""

    def __init__(self, folder: Path, seed: int = 0, study_uid: str | None = None):
        self.info = StudyInfo(Path(folder), study_uid or generate_uid())
        self.rng = np.random.default_rng(seed)
        self._names = list(self.rng.permutation(10_000))

    def _next_path(self) -> Path:
        return self.info.folder / f"image{self._names.pop()}.dcm"

    def series(
        self,
        key: str,
        description: str | None,
        n: int = 5,
        shape: tuple[int, int] = (64, 64),
        level: float = 1000.0,
        orientation: tuple | None = SAGITTAL,
        gap_mm: float = 4.0,
        pixels: np.ndarray | None = None,
        pixels_at: dict[int, np.ndarray] | None = None,
        **kwargs,
    ) -> SeriesInfo:
        """Write `n` slices of noise around `level`; `pixels` (or `pixels_at[i]`) override.

        Slices are written in a shuffled order with positions along the normal; the returned
        instance uids are ordered by position along the normal (what the reader must find).
        """
        uid = generate_uid()
        info = SeriesInfo(uid, description or "")
        normal = np.cross(orientation[:3], orientation[3:]) if orientation else np.zeros(3)
        order = self.rng.permutation(n)  # instance number order != position order
        for i in range(n):
            img = (
                pixels
                if pixels is not None
                else (self.rng.normal(level, level * 0.05, shape).clip(0, 60000))
            )
            if pixels_at and i in pixels_at:
                img = pixels_at[i]
            pos = tuple(float(v) for v in normal * (i - n / 2) * gap_mm + np.array([1.0, 2.0, 3.0]))
            path = self._next_path()
            kw = {"position": pos, **kwargs}
            iuid = write_slice(
                path,
                img,
                study_uid=self.info.study_uid,
                series_uid=uid,
                description=description,
                orientation=orientation,
                instance_number=int(order[i]) + 1,
                **kw,
            )
            info.instance_uids.append(iuid)
            info.paths.append(path)
        self.info.series[key] = info
        return info


def standard_study(
    folder: Path, seed: int = 0, shape=(64, 64), n: int = 6, **t2_kwargs
) -> StudyInfo:
    """T1 sag, T2 sag (brightest), T2 fat-suppressed sag (darker) and a T2 axial series."""
    w = StudyWriter(folder, seed)
    w.series("t1", "T1_TSE_SAG", n=n, shape=shape, level=900)
    w.series("t2", "T2_TSE_SAG", n=n, shape=shape, level=1500, **t2_kwargs)
    w.series("t2fs", "T2_TSE_FS_SAG", n=n, shape=shape, level=500)
    w.series("ax", "T2_TSE_TRA", n=4, shape=shape, level=1200, orientation=AXIAL)
    return w.info


def annotation_for(
    info: StudyInfo,
    points: dict[str, tuple[float, float]] | None = None,
    instance_uid: str | None = None,
    series_uid: str | None = None,
    labels: dict[str, str] | None = None,
) -> dict:
    """One study entry of an annotation file on the T2 sagittal middle slice (or as given)."""
    from lit_spine.data.labels import POINT_NAMES

    t2 = info.series["t2"]
    points = (
        points
        if points is not None
        else {name: (20.0 + i, 5.0 + 5 * i) for i, name in enumerate(POINT_NAMES)}
    )
    labels = labels or {}
    pts = []
    for name, (x, y) in points.items():
        kind = "disc" if "-" in name else "vertebra"
        pts.append(
            {
                "coord": [x, y],
                "tag": {"identification": name, kind: labels.get(name, "v1")},
                "zIndex": 2,
            }
        )
    return {
        "studyUid": info.study_uid,
        "data": [
            {
                "seriesUid": series_uid or t2.uid,
                "instanceUid": instance_uid or t2.middle,
                "annotation": [{"data": {"point": pts}}],
            }
        ],
    }


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def dataset(
    root: Path, n_studies: int = 2, split: str = "train", annotate: bool = True, **kwargs
) -> tuple[Path, list[StudyInfo]]:
    """`<root>/<split>/study<i>` standard studies plus `<split>_annotation.json`."""
    infos = [standard_study(root / split / f"study{i}", seed=i, **kwargs) for i in range(n_studies)]
    if annotate:
        write_json(root / f"{split}_annotation.json", [annotation_for(s) for s in infos])
    return root / split, infos


def read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)
