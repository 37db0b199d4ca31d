"""The phantom in the SPIDER layout (`lit-spine phantom --layout spider`).

Each patient is one study of the 2020 phantom (`study.render_study`, the anatomy of
`anatomy.py`), written as SPIDER publishes it (docs/datasets.md, "SPIDER"):
`images/<patient>_t1.mha` and `<patient>_t2.mha` (the sagittal T1 and T2 stacks, real
MetaImage files written with SimpleITK, spacing and direction from the phantom's planes),
`masks/<patient>_<series>.mha` (label volumes drawn from the phantom's tissue maps: marrow ->
vertebra 1-7 counted from the bottom, 1 = L5; annulus, nucleus and fragments -> disc 201-207,
201 = L5/S1; thecal sac and roots -> canal 100; the sacrum unlabelled) and
`radiological_gradings.csv` with SPIDER's columns for the six discs T12/L1 .. L5/S1.
Even patients are stored in the SPACE series' axis order (PIR), odd ones in the TSE
series' (LPS), so the reader's reorientation is exercised. The gradings follow what the
phantom draws, a phantom convention, not a clinical one: Pfirrmann from the disc state
(normal 1-2, degenerated 3-4, bulge 3, protrusion 4, extrusion 5), herniation for a
protrusion or extrusion, bulging for a bulge, narrowing for Pfirrmann >= 4, Modic the type
of a Modic band drawn under an endplate facing the disc (0 if none), UP endplate for a
Schmorl's node. Marker version 2 (Modic from the drawn bands); a version-1 folder is
rewritten once. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lit_spine.data.spider import GRADING_COLUMNS, GRADINGS_CSV, IMAGES_DIR, MASKS_DIR
from lit_spine.phantom import anatomy as pa
from lit_spine.phantom import pathology
from lit_spine.utils import atomic_write_text

PFIRRMANN_OF_STATE = {
    "normal": (1, 2),
    "degenerated": (3, 4),
    "diffuse_bulge": (3,),
    "asymmetric_bulge": (3,),
    "protrusion": (4,),
    "extrusion": (5,),
}
MARKER = "phantom_spider.json"


def spider_mask(tissue: np.ndarray) -> np.ndarray:
    """SPIDER label map (uint16) of a phantom tissue-id map."""
    out = np.zeros(tissue.shape, np.uint16)
    n = len(pathology.VERTEBRA_NAMES)  # T11 .. L5: body b is vertebra n - b from the bottom
    for b in range(n):
        out[(tissue == pa.MARROW0 + b) | (tissue == pa.MODIC0 + b)] = n - b
        disc = (
            (tissue == pa.ANNULUS0 + b) | (tissue == pa.NUCLEUS0 + b) | (tissue == pa.FRAGMENT0 + b)
        )
        out[disc] = 200 + n - b  # disc b lies below body b: L5-S1 (b = 6) -> 201
    out[(tissue == pa.CSF) | (tissue == pa.NERVE)] = 100
    return out


def _modic(bodies, k: int) -> int:
    """Phantom Modic type of disc k (0 = T12-L1 .. 5 = L5-S1) as drawn: the type of the
    Modic band under the endplate facing the disc, of the body above (its inferior band) or
    below (its superior band); the larger if both, 0 if neither. `bodies`: T11 .. L5, S1 .."""
    above, below = bodies[k + 1].signs, bodies[k + 2].signs
    types = [above.modic_type] if above.modic_inf > 0 else []
    types += [below.modic_type] if below.modic_sup > 0 else []
    return max(types, default=0)


def _volume(slices: list[np.ndarray], planes, pixel_type):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.stack(slices))  # (slices, rows, cols) -> x = column
    p0 = planes[0]
    gap = float(np.dot(planes[1].centre - p0.centre, p0.normal)) if len(planes) > 1 else 4.0
    image.SetSpacing((p0.col_spacing, p0.row_spacing, gap))
    image.SetOrigin(tuple(float(v) for v in p0.origin))
    direction = np.column_stack([p0.row_dir, p0.col_dir, p0.normal])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return sitk.Cast(image, pixel_type)


def write_spider_phantom(
    root: str | Path, studies: int = 8, seed: int = 0, size: int = 64
) -> dict[int, dict[str, tuple[float, float]]]:
    """Write `studies` patients in the SPIDER layout under `root`.

    Returns the truth: patient -> {level ('L4/L5'): (x, y) pixel on the mid-sagittal slice}
    (the phantom's disc centres, as its 2020 annotation places them).
    """
    import SimpleITK as sitk

    from lit_spine.phantom.study import render_study
    from lit_spine.task import POINT_NAMES

    if studies < 1:
        raise ValueError(f"studies must be >= 1, got {studies}")
    root = Path(root)
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (root / MASKS_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for i in range(studies):
        patient = i + 1
        st = render_study(seed, "a spider phantom", i, size=size, pixels=True)
        by_role = {s.role: s for s in st.series}
        planes = by_role["T2"].planes
        mask = _volume([spider_mask(t) for t in st.tissue_maps], planes, sitk.sitkUInt16)
        storage = "PIR" if patient % 2 == 0 else "LPS"
        for role, name in (("T2", "t2"), ("T1", "t1")):
            image = _volume(by_role[role].pixels, planes, sitk.sitkInt16)
            for folder, volume in ((IMAGES_DIR, image), (MASKS_DIR, mask)):
                path = root / folder / f"{patient}_{name}.mha"
                tmp = path.with_name(f".{path.name}.tmp.mha")
                sitk.WriteImage(sitk.DICOMOrient(volume, storage), str(tmp), useCompression=True)
                tmp.replace(path)
        truth[patient] = {
            name.replace("-", "/"): (float(x), float(y))
            for name, (x, y) in zip(POINT_NAMES, st.points)
            if "-" in name
        }
        for k, state in enumerate(st.labels.disc_states):  # T12-L1 .. L5-S1
            grade = int(rng.choice(PFIRRMANN_OF_STATE[state]))
            rows.append(
                {
                    "Patient": patient,
                    "IVD label": 6 - k,
                    "Modic": _modic(st.anatomy.bodies, k),
                    "UP endplate": int(st.labels.schmorl[k]),
                    "LOW endplate": 0,
                    "Spondylolisthesis": 0,
                    "Disc herniation": int(state in ("protrusion", "extrusion")),
                    "Disc narrowing": int(grade >= 4),
                    "Disc bulging": int(state.endswith("bulge")),
                    "Pfirrman grade": grade,
                }
            )
    frame = pd.DataFrame(rows, columns=list(GRADING_COLUMNS))
    atomic_write_text(root / GRADINGS_CSV, frame.to_csv(index=False))
    return truth


def ensure_spider_phantom(
    root: str | Path, studies: int = 8, seed: int = 0, size: int = 64
) -> Path:
    """The spider phantom under `root`, written once (a complete one with the same
    parameters is kept as it is, so the cache key stays); a file lock orders parallel
    builders; a non-empty folder that is no spider phantom is refused."""
    from lit_spine.phantom.marker import ensure_layout

    params = {"studies": int(studies), "seed": int(seed), "size": int(size), "version": 2}
    return ensure_layout(
        root,
        params,
        MARKER,
        "spider",
        (IMAGES_DIR, MASKS_DIR),
        lambda out: write_spider_phantom(out, studies, seed, size),
    )
