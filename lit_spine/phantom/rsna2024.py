"""The phantom in the RSNA 2024 layout (`lit-spine phantom --layout rsna2024`).

Writes the competition's three CSVs and a `train_images/<study_id>/<series_id>/
<instance_number>.dcm` tree of real DICOM files (the phantom's own writer,
`dicom.build_dataset`), so `data/rsna.py` is exercised on files of that format.
Each study has a Sagittal T1, a Sagittal T2/STIR and an Axial T2 series. On the Sagittal
T2/STIR series a bright vertical canal runs down the image with a disc at each level; the
canal is narrowed at a level in proportion to its spinal canal stenosis grade, drawn on the
instance the coordinates name (not always the middle one). On the Sagittal T1 series the
left foramina lie on the last instance and the right ones on the first, drawn the same way
and narrowed by the left / right neural foraminal narrowing grade. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lit_spine.data.rsna import (
    CANAL_CONDITION,
    COORDS_CSV,
    GRADES_CSV,
    IMAGES_DIR,
    SERIES_CSV,
    grade_column,
)
from lit_spine.phantom import dicom as pd_dicom
from lit_spine.task import RSNA_LEVELS, RSNA_SEVERITIES
from lit_spine.utils import atomic_write_text

CONDITIONS = (
    "Spinal Canal Stenosis",
    "Left Neural Foraminal Narrowing",
    "Right Neural Foraminal Narrowing",
    "Left Subarticular Stenosis",
    "Right Subarticular Stenosis",
)
SERIES = (
    ("Sagittal T1", "T1", 5, 1),
    ("Sagittal T2/STIR", "T2", 7, 2),
    ("Axial T2", "T2", 3, 3),
)
GRADE_PROBS = (0.6, 0.25, 0.15)


def _sagittal_plane(x_mm: float, size: int, spacing: float) -> pd_dicom.Plane:
    return pd_dicom.Plane(
        centre=np.array([x_mm, 0.0, 0.0]),
        row_dir=np.array([0.0, 1.0, 0.0]),
        col_dir=np.array([0.0, 0.0, -1.0]),
        rows=size,
        cols=size,
        row_spacing=spacing,
        col_spacing=spacing,
    )


def _axial_plane(z_mm: float, size: int, spacing: float) -> pd_dicom.Plane:
    return pd_dicom.Plane(
        centre=np.array([0.0, 0.0, z_mm]),
        row_dir=np.array([1.0, 0.0, 0.0]),
        col_dir=np.array([0.0, 1.0, 0.0]),
        rows=size,
        cols=size,
        row_spacing=spacing,
        col_spacing=spacing,
    )


def _canal_image(
    rng: np.random.Generator, size: int, points: dict[str, tuple[float, float]], grades: dict
) -> np.ndarray:
    """A T2-like slice: a bright canal column, dark discs, narrowing at graded levels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx = np.mean([p[0] for p in points.values()]) if points else size / 2
    img = 200.0 + 30.0 * rng.standard_normal((size, size))
    width = np.full(size, size * 0.08, dtype=np.float32)
    for level, (x, y) in points.items():
        img += 500.0 * np.exp(
            -(((xx - x + size * 0.12) / (size * 0.1)) ** 2 + ((yy - y) / (size * 0.025)) ** 2)
        )
        narrowing = (0.0, 0.45, 0.85)[grades.get(level, 0)]
        width *= 1.0 - narrowing * np.exp(-(((np.arange(size) - y) / (size * 0.03)) ** 2))
    canal = np.abs(xx - cx) < width[:, None]
    img[canal] += 700.0
    return np.clip(img, 0, 4095).astype(np.uint16)


def write_rsna2024_phantom(
    root: str | Path, studies: int = 8, seed: int = 0, size: int = 64
) -> Path:
    """Write `studies` studies in the RSNA 2024 layout under `root`; returns `root`."""
    if studies < 1:
        raise ValueError(f"studies must be >= 1, got {studies}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    series_rows, coord_rows, grade_rows = [], [], []
    spacing = 200.0 / size
    for i in range(studies):
        study_id = 4000000 + 1000 * seed + 17 * i
        info = pd_dicom.StudyInfo(
            uid=pd_dicom.phantom_uid("an rsna2024 phantom", seed, i),
            frame_uid=pd_dicom.phantom_uid("rsna2024", seed, i, "frame"),
            patient_id=str(study_id),
            patient_name=f"PHANTOM^{study_id}",
            age=int(rng.integers(25, 80)),
            sex=str(rng.choice(["F", "M"])),
            date="20240101",
            time="120000",
            field_t=1.5,
            manufacturer="lit_spine",
        )
        grades = {
            cond: {lv: int(rng.choice(3, p=GRADE_PROBS)) for lv in RSNA_LEVELS}
            for cond in CONDITIONS
        }
        grade_rows.append(
            {"study_id": study_id}
            | {
                grade_column(cond, lv): RSNA_SEVERITIES[g]
                for cond in CONDITIONS
                for lv, g in grades[cond].items()
            }
        )
        top = size * (0.18 + 0.05 * rng.random())
        step = size * (0.15 + 0.02 * rng.random())
        x0 = size * (0.45 + 0.1 * rng.random())
        canal_xy = {
            lv: (x0 + rng.normal(0, 0.5), top + k * step + rng.normal(0, 0.5))
            for k, lv in enumerate(RSNA_LEVELS)
        }
        for description, sequence, n_slices, number in SERIES:
            series_id = study_id * 10 + number
            series_rows.append(
                {"study_id": study_id, "series_id": series_id, "series_description": description}
            )
            sinfo = pd_dicom.SeriesInfo(
                uid=pd_dicom.phantom_uid("rsna2024", seed, i, number),
                number=number,
                description=description,
                sequence=sequence,
                echo_ms=90.0 if sequence == "T2" else 10.0,
                repetition_ms=3000.0 if sequence == "T2" else 500.0,
                slice_thickness=4.0,
                spacing_between=4.4,
            )
            mid = n_slices // 2 + 1
            on = {}  # instance -> {level: (x, y)}
            on_grades = {}  # instance -> {level: grade} drawn there (default: the canal's)
            if description == "Sagittal T2/STIR":
                for lv, xy in canal_xy.items():
                    inst = mid + int(rng.integers(-1, 2))
                    on.setdefault(inst, {})[lv] = xy
                    coord_rows.append(
                        {
                            "study_id": study_id,
                            "series_id": series_id,
                            "instance_number": inst,
                            "condition": CANAL_CONDITION,
                            "level": lv,
                            "x": round(xy[0], 4),
                            "y": round(xy[1], 4),
                        }
                    )
            elif description == "Sagittal T1":
                # Each side's foramina on its own parasagittal instance, narrowed by grade.
                for side, inst in (("Left", n_slices), ("Right", 1)):
                    condition = f"{side} Neural Foraminal Narrowing"
                    on_grades[inst] = grades[condition]
                    for lv, (x, y) in canal_xy.items():
                        on.setdefault(inst, {})[lv] = (x - size * 0.1, y)
                        coord_rows.append(
                            {
                                "study_id": study_id,
                                "series_id": series_id,
                                "instance_number": inst,
                                "condition": f"{side} Neural Foraminal Narrowing",
                                "level": lv,
                                "x": round(x - size * 0.1, 4),
                                "y": round(y, 4),
                            }
                        )
            folder = root / IMAGES_DIR / str(study_id) / str(series_id)
            folder.mkdir(parents=True, exist_ok=True)
            for inst in range(1, n_slices + 1):
                offset = (inst - mid) * sinfo.spacing_between
                plane = (
                    _axial_plane(offset, size, spacing)
                    if description.startswith("Axial")
                    else _sagittal_plane(offset, size, spacing)
                )
                drawn = on_grades.get(inst, grades["Spinal Canal Stenosis"])
                pixels = _canal_image(rng, size, on.get(inst, {}), drawn)
                ds = pd_dicom.build_dataset(
                    info,
                    sinfo,
                    plane,
                    pixels,
                    pd_dicom.phantom_uid("rsna2024", seed, i, number, inst),
                    inst,
                )
                tmp = folder / f".{inst}.dcm.tmp"
                pd_dicom.write_dataset(ds, tmp)
                tmp.replace(folder / f"{inst}.dcm")
    for name, rows in (
        (SERIES_CSV, series_rows),
        (COORDS_CSV, coord_rows),
        (GRADES_CSV, grade_rows),
    ):
        atomic_write_text(root / name, pd.DataFrame(rows).to_csv(index=False))
    return root


MARKER = "phantom_rsna2024.json"


def ensure_rsna2024_phantom(
    root: str | Path, studies: int = 8, seed: int = 0, size: int = 64
) -> Path:
    """The rsna2024 phantom under `root`, written once: a complete one with the same
    parameters is returned as it is (its files, and so the cache key, stay unchanged).

    Parallel processes build it in turn (a file lock); a folder written with other
    parameters is replaced, a non-empty folder that is no phantom is refused.
    """
    from lit_spine.phantom.marker import ensure_layout

    # version 2: the Sagittal T1 foramina are drawn (a version-1 folder is rewritten).
    params = {"studies": int(studies), "seed": int(seed), "size": int(size), "version": 2}
    return ensure_layout(
        root,
        params,
        MARKER,
        "rsna2024",
        (IMAGES_DIR,),
        lambda out: write_rsna2024_phantom(out, studies, seed, size),
    )
