"""One phantom study in memory: labels, anatomy, series geometry, points and pixels.

`render_study` draws a study's random streams from ``SeedSequence([seed, crc32(split),
index])`` (byte-identical output whatever the number of workers), samples labels and
anatomy, lays out a real exam in miniature (a T2 sagittal series of 11-15 slices, a T1
sagittal series on the same positions, sometimes a fat-suppressed T2 sagittal series that
the series choice must reject, and a T2 axial series through the lower discs; vendor-style
headers and image sizes), projects the 11 annotated points onto the middle T2 slice and
renders every slice through `sagittal` / `axial` and `signal`. Difficulty (0 easy, 1
default, 2 hard) scales noise, shading, blur, heterogeneity, anatomical spread and the
subtlety of pathology together (``docs/phantom.md``). `write_study` writes it as DICOM.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lit_spine.data.labels import POINT_NAMES, get_vocabulary
from lit_spine.phantom import anatomy as pa
from lit_spine.phantom import pathology
from lit_spine.phantom.axial import render_axial
from lit_spine.phantom.dicom import (
    Plane,
    SeriesInfo,
    StudyInfo,
    build_dataset,
    phantom_uid,
    write_dataset,
)
from lit_spine.phantom.sagittal import render_sagittal
from lit_spine.phantom.signal import PVMap, acquire, coil_bias, smooth_field, tissue_lut, to_uint16

SUPERSAMPLE = 2  # tissue maps are drawn at 2x and averaged: soft, partial-volume edges
# Vendor-style series descriptions: (T2 sag, T1 sag, fat-suppressed T2 sag variants, T2 axial).
VENDORS = (
    ("SIEMENS", "t2_tse_sag", "t1_tse_sag", ("t2_tse_fs_sag", "t2_tirm_sag"), "t2_tse_tra"),
    (
        "GE MEDICAL SYSTEMS",
        "SAG T2 FRFSE",
        "SAG T1 FSE",
        ("SAG T2 FS", "SAG T2 FRFSE FS"),
        "AX T2 FRFSE",
    ),
    ("Philips", "T2W_TSE_SAG", "T1W_TSE_SAG", ("T2W_SPAIR_SAG", "T2W_TSE_FS_SAG"), "T2W_TSE_TRA"),
)
SAGITTAL_SIZES = (
    (384, 384),
    (448, 448),
    (512, 512),
    (640, 640),
    (512, 448),
    (448, 384),
    (640, 512),
)
SAGITTAL_SIZE_P = (0.3, 0.12, 0.3, 0.13, 0.06, 0.05, 0.04)
AXIAL_PATTERNS = (  # (disc index, height as a fraction of the disc height)
    tuple((d, h) for d in (4, 5, 6) for h in (-0.3, 0.0, 0.3)),
    tuple((d, 0.0) for d in range(1, 7)) + ((5, 0.3), (6, -0.3)),
    tuple((d, h) for d in (3, 4, 5, 6) for h in (-0.2, 0.2)),
)


@dataclass
class PhantomSeries:
    """One rendered series: headers, planes and uint16 pixels in acquisition order."""

    role: str  # 'T2', 'T1', 'T2FS' (sagittal) or 'AX'
    info: SeriesInfo
    planes: list[Plane]
    pixels: list[np.ndarray]
    sop_uids: list[str]


@dataclass
class PhantomStudy:
    """One study in memory: series, ground truth and the drawn tissue maps."""

    split: str
    index: int
    study: StudyInfo
    series: list[PhantomSeries]
    t2_series: int  # index into `series` of the annotated T2 sagittal series
    annotated_slice: int  # its middle slice, (n - 1) // 2 along the normal
    points: np.ndarray  # (11, 2) pixel (column, row) on the annotated slice, POINT_NAMES order
    codes: dict[str, tuple[str, ...]]
    labels: pathology.StudyLabels
    anatomy: pa.Anatomy
    tissue_maps: list[np.ndarray] = field(default_factory=list)  # per sagittal slice
    disc_corners_px: dict[str, np.ndarray] = field(default_factory=dict)  # (2, 2) lower/upper P
    annotation: dict = field(default_factory=dict)  # this study's entry of the JSON file
    file_names: list[str] = field(default_factory=list)  # per slice, series by series

    @property
    def tissue_map(self) -> np.ndarray:
        """Tissue ids of the annotated slice."""
        return self.tissue_maps[self.annotated_slice]

    def structure_ids(self, name: str) -> tuple[int, ...]:
        """Tissue ids that belong to the structure of a point name ('L3', 'L4-L5')."""
        if "-" in name:
            d = pathology.DISC_NAMES.index(name)
            return (pa.ANNULUS0 + d, pa.NUCLEUS0 + d, pa.FRAGMENT0 + d)
        b = pathology.VERTEBRA_NAMES.index(name)
        return (pa.MARROW0 + b, pa.MODIC0 + b)


def _rng_streams(seed: int, split: str, index: int, n: int = 5) -> list[np.random.Generator]:
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(split.encode()), int(index)])
    return [np.random.default_rng(s) for s in ss.spawn(n)]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _rodrigues(v: np.ndarray, axis: np.ndarray, deg: float) -> np.ndarray:
    k = _unit(axis)
    t = math.radians(deg)
    return v * math.cos(t) + np.cross(k, v) * math.sin(t) + k * (k @ v) * (1 - math.cos(t))


def _sagittal_plane_x(anat: pa.Anatomy, plane: Plane, pts: np.ndarray) -> np.ndarray:
    rot_t = anat.rotation.T
    n_a = rot_t @ plane.normal
    o_a = rot_t @ (plane.centre - anat.translation)
    pts = np.atleast_2d(pts)
    return o_a[0] - (n_a[1] * (pts[:, 0] - o_a[1]) + n_a[2] * (pts[:, 1] - o_a[2])) / n_a[0]


def _project(anat: pa.Anatomy, plane: Plane, pts_as: np.ndarray) -> np.ndarray:
    """Mid-sagittal (a, s) points, lifted onto a sagittal plane, to pixel (column, row)."""
    pts_as = np.atleast_2d(pts_as)
    xyz = np.column_stack([_sagittal_plane_x(anat, plane, pts_as), pts_as])
    return plane.to_pixels(xyz @ anat.rotation.T + anat.translation)


def _annotated_points_as(anat: pa.Anatomy) -> np.ndarray:
    pts = []
    for name in POINT_NAMES:
        if "-" in name:
            pts.append(anat.disc_centre(pathology.DISC_NAMES.index(name)))
        else:
            pts.append(anat.bodies[pathology.VERTEBRA_NAMES.index(name)].centre)
    return np.array(pts)


def render_study(
    seed: int | np.random.SeedSequence = 0,
    split: str = "train",
    index: int = 0,
    vocab: str = "tianchi2020",
    size: int | None = None,
    difficulty: float = 1.0,
    labels_override: Mapping[str, str] | None = None,
    pixels: bool = True,
) -> PhantomStudy:
    """Render one study in memory (nothing is written).

    `labels_override` maps point names to internal states: discs to one of
    ``pathology.DISC_STATES`` (optionally ``"+schmorl"`` / ``"-schmorl"`` appended),
    vertebrae to ``"normal"`` or ``"degenerated"``; everything else in the study stays the same.
    With ``pixels=False`` only geometry, headers and ground truth are computed (fast).
    """
    get_vocabulary(vocab)
    r_labels, r_anat, r_lesion, r_layout, r_noise = _rng_streams(seed, split, index)
    labels = pathology.sample_labels(r_labels, vocab)
    for name, state in (labels_override or {}).items():
        if "-" in name:
            k = [n for n in POINT_NAMES if "-" in n].index(name)
            base, _, schm = state.partition("+")
            base = base.split("-schmorl")[0]
            if base not in pathology.DISC_STATES:
                raise ValueError(
                    f"unknown disc state {state!r}; choose from {pathology.DISC_STATES}"
                )
            labels.disc_states[k] = base
            if schm == "schmorl" or state.endswith("-schmorl"):
                labels.schmorl[k] = schm == "schmorl"
        else:
            k = [n for n in POINT_NAMES if "-" not in n].index(name)
            labels.vertebra_degenerated[k] = state == "degenerated"
    anat = pa.sample_anatomy(r_anat, labels, difficulty, lesion_rng=r_lesion)
    rng = r_layout
    v = float(np.clip(0.4 + 0.6 * difficulty, 0.2, 1.6))
    key = (seed if isinstance(seed, int) else seed.entropy, split, index, vocab, size, difficulty)

    # ---- study header values
    vendor = VENDORS[int(rng.integers(len(VENDORS)))]
    study = StudyInfo(
        uid=phantom_uid(*key, "study"),
        frame_uid=phantom_uid(*key, "frame"),
        patient_id=f"PH{zlib.crc32(repr(key).encode()):08X}",
        patient_name=f"PHANTOM^{split.upper()}{index:04d}",
        age=int(round(labels.age)),
        sex=str(rng.choice(["F", "M"])),
        date=f"20{int(rng.integers(15, 24)):02d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        time=f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        field_t=float(rng.choice([1.5, 3.0])),
        manufacturer=vendor[0],
    )

    # ---- sagittal geometry: size, spacing, slice stack, plane tilt, field-of-view position
    if size:
        rows = cols = int(size)
        spacing = float(rng.uniform(300, 360)) / rows
    else:
        rows, cols = SAGITTAL_SIZES[int(rng.choice(len(SAGITTAL_SIZES), p=SAGITTAL_SIZE_P))]
        spacing = float(np.clip(rng.uniform(300, 380) / rows, 0.55, 1.0))
    n_sag = int(rng.integers(11, 16))
    slice_gap = float(rng.uniform(3.3, 4.5))
    thickness = slice_gap - float(rng.uniform(0.0, 0.5))
    x_off = float(np.clip(rng.normal(0, 1.0), -2.5, 2.5))
    # The stack is planned on the spine (as a radiographer does on the localizers): relative
    # to the anatomy only a small coronal tilt remains, so the middle slice follows the canal
    # from T12 to the sacrum; the patient's own rotation still turns the spine in the image.
    q = anat.rotation @ (
        pa.rotation_matrix("z", rng.normal(0, 1.0 * v))
        @ pa.rotation_matrix("y", rng.normal(0, 0.6 * v))
        @ pa.rotation_matrix("x", rng.normal(0, 5.0 * v))
    )
    row_dir, col_dir = q @ np.array([0.0, 1.0, 0.0]), q @ np.array([0.0, 0.0, -1.0])
    l3 = anat.bodies[4]
    s_c = 0.5 * (anat.disc_centre(1)[1] + anat.disc_centre(6)[1]) + rng.normal(0, 8 * v)
    back_a = l3.centre[0] + 0.5 * l3.depth + anat.canal_depth[4] + anat.back_depth + 12
    width = cols * spacing
    a_c = back_a - (rng.uniform(0.74, 0.9) - 0.5) * width
    centre = anat.rotation @ np.array([x_off, a_c, s_c]) + anat.translation
    mid = Plane(centre, row_dir, col_dir, rows, cols, spacing, spacing)
    pts_as = _annotated_points_as(anat)
    # Keep every annotated point well inside the image (real protocols frame the lumbar spine).
    px = _project(anat, mid, pts_as)
    lo = np.array([0.1 * cols, 0.08 * rows])
    hi = np.array([0.9 * cols, 0.92 * rows])
    shift = np.minimum(px.min(0) - lo, 0) + np.maximum(px.max(0) - hi, 0)
    centre = centre + shift[0] * spacing * row_dir + shift[1] * spacing * col_dir
    normal = np.cross(row_dir, col_dir)
    m_idx = (n_sag - 1) // 2
    sag_planes = [
        Plane(
            centre + (k - m_idx) * slice_gap * normal,
            row_dir,
            col_dir,
            rows,
            cols,
            spacing,
            spacing,
        )
        for k in range(n_sag)
    ]
    mid = sag_planes[m_idx]
    # Focal lesions sit where the annotated slice cuts the disc, so the label is readable there.
    for d in range(7):
        lesion = anat.discs[d]
        xd = float(_sagittal_plane_x(anat, mid, anat.disc_centre(d))[0])
        lesion.x0 = xd + 0.5 * lesion.x0
        if lesion.fragment is not None:
            mig, ra, rs, _, wlf = lesion.fragment
            lesion.fragment = (mig, ra, rs, lesion.x0, wlf)
        if lesion.schmorl is not None:
            side, f, dep, w, xs_, wls = lesion.schmorl
            lesion.schmorl = (side, f, dep, w, xd + 0.4 * xs_, wls)
    points = _project(anat, mid, pts_as)
    corners = {}
    for d in range(1, 7):
        xd = float(_sagittal_plane_x(anat, mid, anat.disc_centre(d))[0])
        lp, _, up, _ = anat.disc_corners(d, xd)
        corners[pathology.DISC_NAMES[d]] = _project(anat, mid, np.array([lp, up]))

    # ---- axial geometry: planes parallel to the discs, tilt limited to 35 degrees
    pattern = AXIAL_PATTERNS[int(rng.integers(len(AXIAL_PATTERNS)))]
    ax_size = int(size) if size else int(rng.choice([256, 288, 320]))
    ax_spacing = float(rng.uniform(170, 230)) / ax_size
    ax_planes, ax_where = [], []
    ax_x, ax_p = rng.normal(0, 4.0), rng.normal(12, 5.0)
    for d, hf in pattern:
        u = anat.disc_u(d)
        n2 = pa.perp(u)
        lp, la, up, ua = anat.disc_corners(d)
        h_mid = 0.5 * float(np.linalg.norm(up - lp) + np.linalg.norm(ua - la))
        height = hf * h_mid
        c2 = anat.disc_centre(d) + height * n2
        rot = anat.rotation
        nrm = rot @ np.array([0.0, n2[0], n2[1]])
        row = rot @ np.array([1.0, 0.0, 0.0])
        tilt = math.degrees(math.acos(np.clip(nrm[2], -1, 1)))
        if tilt > 35:
            cands = [_rodrigues(nrm, row, s * (tilt - 35)) for s in (-1, 1)]
            nrm = max(cands, key=lambda c: c[2])
        row = _unit(row - (row @ nrm) * nrm)
        col = np.cross(nrm, row)
        cen_as = c2 - ax_p * u
        cen = rot @ np.array([ax_x, cen_as[0], cen_as[1]]) + anat.translation
        ax_planes.append(Plane(cen, row, col, ax_size, ax_size, ax_spacing, ax_spacing))
        ax_where.append((d, height))

    # ---- series headers
    has_fs = rng.random() < 0.3
    descriptions = {
        "T2": vendor[1],
        "T1": vendor[2],
        "T2FS": vendor[3][int(rng.integers(2))],
        "AX": vendor[4],
    }
    order = ["T1", "T2", "T2FS", "AX"] if rng.random() < 0.5 else ["T2", "T1", "AX", "T2FS"]
    if not has_fs:
        order.remove("T2FS")
    first_number = int(rng.choice([2, 3, 101, 201]))
    step = 1 if first_number < 100 else 100
    infos: dict[str, SeriesInfo] = {}
    for k, role in enumerate(order):
        seq = "T2" if role == "AX" else role
        te = {"T2": rng.uniform(85, 120), "T1": rng.uniform(8, 14), "T2FS": rng.uniform(60, 90)}[
            seq
        ]
        tr = {
            "T2": rng.uniform(2500, 4000),
            "T1": rng.uniform(400, 700),
            "T2FS": rng.uniform(3000, 4500),
        }[seq]
        photometric = (
            "MONOCHROME1" if role in ("T1", "AX") and rng.random() < 0.05 else "MONOCHROME2"
        )
        infos[role] = SeriesInfo(
            uid=phantom_uid(*key, "series", role),
            number=first_number + k * step,
            description=descriptions[role],
            sequence=seq,
            echo_ms=float(te),
            repetition_ms=float(tr),
            slice_thickness=thickness if role != "AX" else float(rng.uniform(3.0, 4.0)),
            spacing_between=slice_gap if role != "AX" else float(rng.uniform(3.5, 4.5)),
            photometric=photometric,
            rle=bool(rng.random() < 0.03),
        )
    roles_planes = {"T2": sag_planes, "T1": sag_planes, "T2FS": sag_planes, "AX": ax_planes}
    series = []
    for role in order:
        planes = roles_planes[role]
        uids = [phantom_uid(*key, "sop", role, j) for j in range(len(planes))]
        series.append(PhantomSeries(role, infos[role], planes, [], uids))
    t2_index = order.index("T2")

    # ---- annotation entry (with the rare real-data quirks)
    codes = labels.codes(vocab)
    quirk_keys, quirk_both = rng.random() < 0.02, rng.random() < 0.02
    point_items = []
    for i, name in enumerate(POINT_NAMES):
        kind = "disc" if "-" in name else "vertebra"
        tag = {"identification": name, kind: ",".join(codes[name])}
        if quirk_both:
            tag["vertebra" if kind == "disc" else "disc"] = ""
        point_items.append(
            {
                "coord": [round(float(points[i, 0]), 2), round(float(points[i, 1]), 2)],
                "tag": tag,
                "zIndex": m_idx,
            }
        )
    entry = {
        "studyUid": study.uid,
        "data": [
            {
                "seriesUid": series[t2_index].info.uid,
                "instanceUid": series[t2_index].sop_uids[m_idx],
                "annotation": [{"data": {"point": point_items}}],
            }
        ],
    }
    if quirk_keys:
        entry["data"][0]["annotation"][0].update({"annotator": "phantom", "version": 1})
    n_files = sum(len(s.planes) for s in series)
    perm = rng.permutation(n_files) + 1
    out = PhantomStudy(
        split,
        index,
        study,
        series,
        t2_index,
        m_idx,
        points,
        codes,
        labels,
        anat,
        disc_corners_px=corners,
        annotation=entry,
        file_names=[f"image{int(k)}.dcm" for k in perm],
    )
    if pixels:
        _render_pixels(out, ax_where, difficulty, r_noise)
    return out


def _render_pixels(st: PhantomStudy, ax_where, difficulty: float, rng: np.random.Generator) -> None:
    anat = st.anatomy
    d = float(np.clip(difficulty, 0.0, 3.0))
    noise = {s: (0.012 + 0.03 * d) * rng.uniform(0.7, 1.3) for s in pathology.SEQUENCES}
    # Supersampling already gives partial-volume edges; the blur adds the scanner's PSF.
    blur = (0.15 + 0.25 * d) * rng.uniform(0.8, 1.25)
    gamma = float(np.exp(rng.normal(0, 0.08 * d)))
    luts = {s: np.power(tissue_lut(anat, s), gamma).astype(np.float32) for s in pathology.SEQUENCES}
    by_role = {s.role: s for s in st.series}
    sag = by_role["T2"].planes
    tex_amp = 0.05 + 0.03 * d
    ss = SUPERSAMPLE
    # Tissue heterogeneity: blotchy marrow (fatty foci, trabecular pattern), mottled muscle
    # and fat; a 4-6 mm field applied per tissue on top of the smooth texture.
    het = np.zeros(256, np.float32)
    het[pa.MARROW0 : pa.MARROW0 + 10] = 0.13
    het[pa.MODIC0 : pa.MODIC0 + 10] = 0.10
    het[[pa.POST_MARROW, pa.SACRAL_MARROW]] = 0.12
    het[[pa.MUSCLE, pa.PSOAS]] = 0.07
    het[[pa.FAT, pa.VISCERA]] = 0.05
    het[pa.NUCLEUS0 : pa.NUCLEUS0 + 10] = 0.05

    def texture(tmap: np.ndarray, coarse: int, spacing: float) -> np.ndarray:
        shape = tmap.shape
        fine = smooth_field(rng, shape, max(coarse, int(max(shape) * spacing / 5.0)))
        out = het[tmap]
        out *= fine
        out += 1.0
        coarse_f = smooth_field(rng, shape, coarse)
        coarse_f *= np.float32(tex_amp)
        coarse_f += 1.0
        out *= coarse_f
        return out

    tissue_maps, textures, pv_maps = [], [], []
    for plane in sag:
        pv_maps.append(PVMap.from_supersampled(render_sagittal(anat, plane, ss)[0], ss))
        tissue_maps.append(pv_maps[-1].base)
        textures.append(texture(tissue_maps[-1], 24, plane.row_spacing))
    st.tissue_maps = tissue_maps
    float_images: dict[str, list[np.ndarray]] = {}
    for role, series in by_role.items():
        if role == "AX":
            maps = [
                PVMap.from_supersampled(render_axial(anat, p, disc, h, ss), ss)
                for p, (disc, h) in zip(series.planes, ax_where)
            ]
            texs = [texture(m.base, 16, p.row_spacing) for p, m in zip(series.planes, maps)]
            seq, post = "T2", "rows"
        else:
            maps, texs, seq, post = pv_maps, textures, role, "cols"
        bias = coil_bias(rng, texs[0].shape, 0.15 + 0.2 * d, post)
        float_images[role] = [
            acquire(m, luts[seq], t, bias, blur, noise[seq], rng) for m, t in zip(maps, texs)
        ]
    # Scanner-dependent intensity scale; fat-suppressed series stay darker than the T2 one.
    mid = st.annotated_slice
    t2_scale = float(rng.uniform(700, 3200))
    scales = {
        "T2": t2_scale,
        "T1": float(rng.uniform(600, 2800)),
        "T2FS": t2_scale * float(rng.uniform(0.55, 0.85)),
        "AX": float(rng.uniform(700, 3200)),
    }
    if "T2FS" in float_images:
        ratio = float(
            float_images["T2FS"][mid].mean()
            * scales["T2FS"]
            / (float_images["T2"][mid].mean() * t2_scale)
        )
        if ratio > 0.8:
            scales["T2FS"] *= 0.75 / ratio
    for role, series in by_role.items():
        info = series.info
        peak = float(max(im.max() for im in float_images[role])) * scales[role]
        info.bits_stored = 12 if peak < 4000 else 16
        arrays = [to_uint16(im, scales[role], info.bits_stored) for im in float_images[role]]
        ref = arrays[(len(arrays) - 1) // 2]
        p1, p99 = np.percentile(ref[::2, ::2], [1, 99.5])
        info.window = (
            float(round(0.5 * (p1 + p99) * rng.uniform(0.9, 1.1))),
            float(round(max(p99 - p1, 10) * rng.uniform(0.9, 1.3))),
        )
        if info.photometric == "MONOCHROME1":
            top = (1 << info.bits_stored) - 1
            arrays = [(top - a).astype(np.uint16) for a in arrays]
            info.window = (top - info.window[0], info.window[1])
        series.pixels = arrays


def write_study(st: PhantomStudy, folder: str | os.PathLike) -> None:
    """Write every slice of a rendered study into `folder` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = iter(st.file_names)
    for series in st.series:
        for j, (plane, arr, uid) in enumerate(zip(series.planes, series.pixels, series.sop_uids)):
            ds = build_dataset(st.study, series.info, plane, arr, uid, j + 1)
            write_dataset(ds, folder / next(names))
