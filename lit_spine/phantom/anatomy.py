"""Geometry of the lumbar-spine phantom, sampled from its disease labels, and its tissue ids.

A study's anatomy lives in an *anatomy frame* of millimetres: ``x`` lateral (patient left +),
``a`` antero-posterior (posterior +), ``s`` inferior-superior (superior +). The mid-sagittal
plane ``x = 0`` holds the vertebral bodies as quadrilaterals built from the sacrum upwards
(disc and body wedges add up to the sampled lordosis); everything lateral is derived from
simple cross-section profiles (kidney-shaped bodies and discs, a round thecal sac, pedicles
and foramina beside the canal). The labels of `pathology` *cause* what is drawn: nucleus
signal and height loss, posterior bulges, focal bumps, extruded fragments, endplate notches,
osteophytes, Modic bands and sclerosis. Sizes are typical adult values (``docs/phantom.md``).
Drawing is in `sagittal` / `axial`, signal in `signal`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from lit_spine.phantom.pathology import (
    VERTEBRA_NAMES,
    StudyLabels,
)

# ----------------------------------------------------------------------------- tissue ids
AIR, FAT, MUSCLE, VISCERA, BOWEL_FLUID, VESSEL, EPIDURAL_FAT, CSF, NERVE, LIGAMENT = range(10)
CORTEX, POST_MARROW, SACRAL_MARROW, PSOAS, BOWEL_GAS = range(10, 15)
MARROW0, MODIC0, ANNULUS0, NUCLEUS0, FRAGMENT0 = 20, 30, 40, 50, 60  # + vertebra / disc index

# ----------------------------------------------------------------------------- geometry


def perp(u: np.ndarray) -> np.ndarray:
    """Superior normal of an anterior-pointing endplate direction."""
    return np.array([u[1], -u[0]])


def unit(v: np.ndarray) -> np.ndarray:
    return v / (math.sqrt(float(v @ v)) + 1e-12)


@lru_cache(maxsize=64)
def _lin01(n: int) -> np.ndarray:
    """np.linspace(0, 1, n), cached (the endplate sampler is called thousands of times)."""
    out = np.linspace(0.0, 1.0, n)
    out.flags.writeable = False
    return out


def lateral_fractions(x: float, half_width: float) -> tuple[float, float] | None:
    """(posterior, anterior) fractions of the mid-sagittal endplate present at lateral `x`.

    Kidney-shaped cross-section: the anterior wall is round, the posterior wall flat until
    the postero-lateral corners; None beyond the lateral edge.
    """
    q = abs(x) / half_width
    if q >= 0.97:
        return None
    f_ant = 0.5 + 0.5 * math.sqrt(1.0 - q * q)
    k = max(0.0, q - 0.6) / 0.4
    f_post = 0.5 * (1.0 - math.sqrt(max(0.0, 1.0 - k * k)))
    return f_post, f_ant


@dataclass
class VertebraSigns:
    """Drawn degenerative change of one vertebra (all zero for a normal one)."""

    osteophytes: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # AS, AI, PS, PI mm
    modic_type: int = 0  # 0 none, 1, 2, 3
    modic_sup: float = 0.0  # band thickness under the superior endplate, mm
    modic_inf: float = 0.0
    sclerosis: float = 0.0  # extra endplate thickness, mm
    irregularity: float = 0.0  # endplate jitter, mm


@dataclass
class Body:
    """A vertebral body (or sacral segment) in the mid-sagittal plane, corners in (a, s) mm."""

    name: str
    pi: np.ndarray
    ai: np.ndarray
    ps: np.ndarray
    as_: np.ndarray
    half_width: float
    concavity: float
    marrow_id: int
    modic_id: int
    signs: VertebraSigns = field(default_factory=VertebraSigns)
    jitter: np.ndarray | None = None  # (2, 9) endplate irregularity offsets, mm

    @property
    def centre(self) -> np.ndarray:
        return (self.pi + self.ai + self.ps + self.as_) / 4.0

    @property
    def u(self) -> np.ndarray:
        return unit((self.ai - self.pi) + (self.as_ - self.ps))

    @property
    def depth(self) -> float:
        return 0.5 * float(np.linalg.norm(self.ai - self.pi) + np.linalg.norm(self.as_ - self.ps))

    def endplate(
        self, which: str, f0: float, f1: float, n: int = 9, concavity: float | None = None
    ) -> np.ndarray:
        """Endplate polyline from fraction f0 (posterior) to f1 (anterior), concave into the body."""
        p, a = (self.ps, self.as_) if which == "sup" else (self.pi, self.ai)
        inward = -perp(unit(a - p)) if which == "sup" else perp(unit(a - p))
        f = f0 + (f1 - f0) * _lin01(n)
        conc = self.concavity if concavity is None else concavity
        pts = p + f[:, None] * (a - p) + (conc * 4.0 * f * (1.0 - f))[:, None] * inward
        if self.jitter is not None and self.signs.irregularity > 0:
            j = self.jitter[0 if which == "sup" else 1]
            pts = (
                pts
                + (np.interp(f, np.linspace(0, 1, j.size), j) * 4 * f * (1 - f))[:, None] * inward
            )
        return pts

    def outline(self, x: float, waist: float = 1.2) -> np.ndarray | None:
        """Body outline polygon in (a, s) at lateral offset x."""
        fr = lateral_fractions(x, self.half_width)
        if fr is None:
            return None
        lower = self.endplate("inf", *fr)
        upper = self.endplate("sup", *fr)
        u = self.u
        ant_mid = 0.5 * (lower[-1] + upper[-1]) - waist * u
        post_mid = 0.5 * (lower[0] + upper[0]) + 0.8 * u
        return np.vstack([lower, ant_mid[None], upper[::-1], post_mid[None]])


@dataclass
class DiscLesion:
    """What is drawn for one disc: nucleus, height, contour change, fragment, endplate notch."""

    state: str = "normal"
    nucleus_t2: float = 0.85  # relative T2 signal of the nucleus (CSF = 1)
    height_factor: float = 1.0
    amp: float = 0.0  # outward displacement at the peak, mm
    x0: float = 0.0  # lateral centre of a focal lesion, mm
    wl: float = 6.0  # lateral sigma, mm
    side: float = 1.0  # stronger side of an asymmetric bulge
    t0: float = 0.5  # height fraction of a focal lesion
    ts: float = 0.2
    fragment: tuple[float, float, float, float, float] | None = None  # mig, ra, rs, xf, wlf
    schmorl: tuple[str, float, float, float, float, float] | None = (
        None  # side, f, depth, w, xs, wl
    )
    cleft: bool = True
    irregular: float = 0.0

    def bump(self, x: float, t: np.ndarray, half_width: float) -> np.ndarray:
        """Outward (posterior) displacement of the disc contour beyond the corner line, mm."""
        t = np.asarray(t, dtype=float)
        broad = np.sin(np.pi * np.clip(t, 0, 1)) ** 0.7
        edge = max(0.0, 1.0 - (x / half_width) ** 4)
        out = -0.3 * broad
        if self.state == "diffuse_bulge":
            out = out + self.amp * broad * edge
        elif self.state == "asymmetric_bulge":
            side = min(1.0, max(0.2, 0.4 + 0.6 * self.side * x / (0.45 * half_width)))
            out = out + self.amp * broad * side * edge
        elif self.state in ("protrusion", "extrusion"):
            lat = math.exp(-0.5 * ((x - self.x0) / self.wl) ** 2)
            out = (
                out
                + 0.4 * broad * edge
                + self.amp * lat * np.exp(-0.5 * ((t - self.t0) / self.ts) ** 2)
            )
        return out


@dataclass
class Anatomy:
    """All sampled geometry and signal parameters of one study, in the anatomy frame."""

    bodies: list[Body]  # T11..L5, then S1..S4
    discs: list[DiscLesion]  # T11-T12 .. L5-S1
    labels: StudyLabels
    canal_depth: np.ndarray  # per body, mm
    sac_half_width: float
    canal_half_width: float
    cord_end: float  # fraction along L1 .. L1-L2 where the conus ends
    root_fracs: np.ndarray  # AP fractions of cauda equina roots inside the sac
    back_depth: float  # posterior canal wall to back skin, mm
    back_fat: float
    abdomen_depth: float
    front_fat: float
    spinous_length: np.ndarray
    aorta: tuple[float, float]  # lateral centre, radius
    ivc: tuple[float, float]
    bowel: np.ndarray  # (n, 5): x, a, s, radius, tissue id
    marrow_t2: np.ndarray  # per body
    marrow_t1: np.ndarray
    contrast_jitter: np.ndarray  # (3, 256) multiplicative per tissue and sequence
    rotation: np.ndarray  # (3, 3) anatomy -> patient
    translation: np.ndarray  # (3,)

    @property
    def lumbar(self) -> list[Body]:
        return self.bodies[2:7]

    def disc_corners(self, d: int, x: float = 0.0):
        """(lower P, lower A, upper P, upper A) corners of disc d at lateral x, or None."""
        lo, up = self.bodies[d + 1], self.bodies[d]
        hw = 0.5 * (lo.half_width + up.half_width)
        fr = lateral_fractions(x, hw)
        if fr is None:
            return None
        bottom = lo.endplate("sup", *fr, n=2, concavity=0.0)
        top = up.endplate("inf", *fr, n=2, concavity=0.0)
        return bottom[0], bottom[1], top[0], top[1]

    def disc_centre(self, d: int) -> np.ndarray:
        lp, la, up, ua = self.disc_corners(d)
        return (lp + la + up + ua) / 4.0

    def disc_u(self, d: int) -> np.ndarray:
        return unit(self.bodies[d].u + self.bodies[d + 1].u)

    def disc_half_width(self, d: int) -> float:
        return 0.5 * (self.bodies[d].half_width + self.bodies[d + 1].half_width)

    def disc_outline(self, d: int, x: float) -> np.ndarray | None:
        """Disc outline polygon in (a, s) at lateral x (pathology included)."""
        lo, up = self.bodies[d + 1], self.bodies[d]
        hw = self.disc_half_width(d)
        fr = lateral_fractions(x, hw)
        if fr is None:
            return None
        bottom = lo.endplate("sup", *fr)
        top = up.endplate("inf", *fr)
        u = self.disc_u(d)
        t = np.linspace(0.0, 1.0, 13)[1:-1]
        ant = bottom[-1] + t[:, None] * (top[-1] - bottom[-1])
        ant = ant + (0.8 * np.sin(np.pi * t))[:, None] * u
        tp = t[::-1]
        post = bottom[0] + tp[:, None] * (top[0] - bottom[0])
        post = post - self.discs[d].bump(x, tp, hw)[:, None] * u
        return np.vstack([bottom, ant, top[::-1], post])


def rotation_matrix(axis: str, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def sample_anatomy(
    rng: np.random.Generator,
    labels: StudyLabels,
    difficulty: float = 1.0,
    lesion_rng: np.random.Generator | None = None,
) -> Anatomy:
    """Sample geometry and lesion shapes for given labels.

    `difficulty` widens anatomical variability and makes lesions subtler (see `phantom.py`).
    Lesion shape parameters come from `lesion_rng` and are drawn for every disc whatever its
    state, so forcing a label changes that lesion only, never the rest of the study.
    """
    lrng = lesion_rng if lesion_rng is not None else rng
    v = float(np.clip(0.4 + 0.6 * difficulty, 0.2, 1.6))  # spread of anatomical variation
    m = float(np.clip(1.3 - 0.3 * difficulty, 0.6, 1.4))  # lesion magnitude
    age = labels.age

    def spread(lo, hi, size=None):
        mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo) * min(v, 1.3)
        return rng.uniform(mid - half, mid + half, size)

    # Sizes top (T11) to bottom (L5), then sacral segments S1..S4.
    scale = rng.normal(1.0, 0.05 * v)
    body_h = np.array([22.0, 23.5, 26.0, 27.0, 27.5, 27.5, 26.5]) * scale + rng.normal(
        0, 0.7 * v, 7
    )
    depth = np.array([28.0, 29.5, 31.0, 32.5, 34.0, 35.0, 35.5]) * scale + rng.normal(0, 0.8 * v, 7)
    half_w = depth * 0.68 + rng.normal(0, 0.8, 7)
    disc_h = np.array([5.0, 6.0, 8.0, 9.0, 10.0, 11.0, 10.5]) * scale + rng.normal(0, 0.6 * v, 7)
    sacral_slope = spread(30, 48)
    lordosis = float(np.clip(sacral_slope + rng.normal(8, 6 * v), 20, 60))
    # Share of the lordosis per segment, bottom up: L5-S1 disc, L5, L4-L5, L4, ..., L1-L2, L1.
    share = np.array([0.30, 0.10, 0.20, 0.04, 0.14, 0.02, 0.10, 0.0, 0.07, 0.0])
    share = np.clip(share * rng.lognormal(0, 0.25 * v, share.size), 0, None)
    wedge = lordosis * share / share.sum()  # degrees
    thor_wedge = np.array([-3.0, -2.0, -1.0]) + rng.normal(0, 1.0, 3)  # T12-L1 disc, T12, T11-T12

    # Lesions: shapes drawn for every disc (fixed rng use), applied by state.
    discs: list[DiscLesion] = []
    states = ["normal"] + list(labels.disc_states)  # T11-T12 is never annotated: normal
    schm_flags = [False] + list(labels.schmorl)
    for d in range(7):
        st = states[d]
        r = lrng.random(24)
        young = float(np.clip((age - 20) / 60, 0, 1))
        lesion = DiscLesion(state=st)
        normal_nucleus = 0.9 - 0.25 * young * r[0]
        degen_nucleus = 0.12 + 0.33 * r[1] * (0.5 + 0.5 * min(difficulty, 2) / 2)
        if st == "normal":
            lesion.nucleus_t2 = normal_nucleus
            lesion.height_factor = 1.0 - 0.05 * r[2]
        elif st == "degenerated":
            lesion.nucleus_t2 = degen_nucleus
            lesion.height_factor = 1.0 - (0.12 + 0.3 * r[2]) * m / 1.3 * 1.1
        else:
            lesion.nucleus_t2 = degen_nucleus + (normal_nucleus - degen_nucleus) * 0.5 * r[3]
            lesion.height_factor = 1.0 - (0.04 + 0.2 * r[2])
        if st == "diffuse_bulge":
            lesion.amp = (1.3 + 1.7 * r[4]) * m
        elif st == "asymmetric_bulge":
            lesion.amp = (2.2 + 2.0 * r[4]) * m
            lesion.side = 1.0 if r[5] < 0.5 else -1.0
        elif st == "protrusion":
            lesion.amp = (3.5 + 2.5 * r[4]) * m
        elif st == "extrusion":
            lesion.amp = (2.5 + 1.0 * r[4]) * m
        lesion.x0 = (r[6] - 0.5) * 6.0
        lesion.wl = 4.5 + 3.0 * r[7]
        lesion.t0 = 0.5 + (r[8] - 0.5) * 0.2
        lesion.ts = (0.2 + 0.08 * r[9]) if st == "protrusion" else 0.14
        if st == "extrusion":
            mig = (r[10] - 0.5) * 2.0  # fraction of rs, - caudal, + cranial
            ra = (2.5 + 1.8 * r[11]) * m
            rs = 4.5 + 3.5 * r[12]
            lesion.fragment = (mig * rs * 0.8, ra, rs, lesion.x0, 5.5 + 3.0 * r[13])
        if schm_flags[d]:
            lesion.schmorl = (
                "up" if r[14] < 0.5 else "low",
                0.3 + 0.4 * r[15],
                (2.5 + 3.0 * r[16]) * m,
                5.0 + 4.0 * r[17],
                (r[18] - 0.5) * 8.0,
                4.0 + 3.0 * r[19],
            )
        lesion.cleft = age > 28 and r[20] < 0.7 and st == "normal"
        lesion.irregular = 0.0 if st == "normal" else 0.6 * r[21]
        discs.append(lesion)
    disc_h = disc_h * np.array([lesion.height_factor for lesion in discs])

    # Vertebral degeneration signs (T11, T12 follow age only; L1..L5 follow their labels).
    signs: list[VertebraSigns] = []
    degen_flags = [age > 55 and rng.random() < 0.5, age > 50 and rng.random() < 0.5]
    degen_flags += list(labels.vertebra_degenerated)
    for b in range(7):
        r = lrng.random(12)
        if not degen_flags[b]:
            signs.append(VertebraSigns())
            continue
        sev = m * (0.6 + 0.8 * r[0])
        # At least one clearly visible sign: osteophyte or Modic band, others optional.
        main = r[1]
        ost = np.where(r[2:6] < [0.75, 0.6, 0.3, 0.25], (1.5 + 3.0 * r[6:10]) * sev, 0.0)
        if main < 0.55 and ost.max() < 2.0:
            ost[0] = max(2.0, (2.5 + 2.0 * r[6]) * sev)
        modic = 0
        if main >= 0.55 or r[10] < 0.3:
            modic = 1 + int(r[11] * 2.99)
        signs.append(
            VertebraSigns(
                osteophytes=tuple(float(o) for o in ost),
                modic_type=modic,
                modic_sup=(3.0 + 5.0 * r[3]) * min(sev, 1.3) if modic and r[4] < 0.7 else 0.0,
                modic_inf=(3.0 + 5.0 * r[5]) * min(sev, 1.3) if modic and (r[4] >= 0.4) else 0.0,
                sclerosis=0.8 * sev * r[7] if r[8] < 0.5 else 0.0,
                irregularity=0.7 * sev * r[9] if r[10] < 0.5 else 0.0,
            )
        )
        if modic and signs[-1].modic_sup == 0 and signs[-1].modic_inf == 0:
            signs[-1].modic_sup = 4.0 * min(sev, 1.3)
        body_h[b] *= 1.0 - 0.3 * (0.04 + 0.08 * r[11]) * sev  # mild wedging / height loss

    # Build the chain from the S1 superior endplate upwards: corners ps/as of each body.
    sig = math.radians(sacral_slope)
    u = np.array([-math.cos(sig), -math.sin(sig)])
    s1_depth = depth[6] - 2.0 + rng.normal(0, 0.8)
    ps = -0.5 * s1_depth * u
    as_ = 0.5 * s1_depth * u
    bodies_up: list[Body] = []
    seg = 0  # index into wedge, bottom up
    lower_ps, lower_as = ps, as_
    for b in range(6, -1, -1):  # L5 .. T11
        # Disc below body b (disc index b).
        n = perp(unit(lower_as - lower_ps))
        dwedge = wedge[seg] if b >= 2 else (thor_wedge[0] if b == 1 else thor_wedge[2])
        seg += 1 if b >= 2 else 0
        dd = depth[b]
        dh = disc_h[b]
        diff = dd * math.tan(math.radians(dwedge))
        ant_h, post_h = dh + 0.5 * diff, max(dh - 0.5 * diff, 1.5)
        c0 = 0.5 * (lower_ps + lower_as)
        pi = c0 - 0.5 * dd * unit(lower_as - lower_ps) + post_h * n
        ai = c0 + 0.5 * dd * unit(lower_as - lower_ps) + ant_h * n
        # Rotate the new inferior endplate to the disc wedge: anterior corner moved up already.
        ub = unit(ai - pi)
        nb = perp(ub)
        bwedge = wedge[seg] if b >= 2 else thor_wedge[1]
        seg += 1 if b >= 2 else 0
        if b == 6:  # L5 is often wedge-shaped
            bwedge += abs(rng.normal(1.5, 1.5))
        hb = body_h[b]
        bdiff = dd * math.tan(math.radians(bwedge))
        ps_b = pi + (hb - 0.5 * bdiff) * nb
        as_b = ai + (hb + 0.5 * bdiff) * nb
        # Keep the endplate length equal to the depth.
        cb = 0.5 * (ps_b + as_b)
        ub2 = unit(as_b - ps_b)
        ps_b, as_b = cb - 0.5 * dd * ub2, cb + 0.5 * dd * ub2
        bodies_up.append(
            Body(
                VERTEBRA_NAMES[b],
                pi,
                ai,
                ps_b,
                as_b,
                float(half_w[b]),
                float(1.0 + 0.8 * rng.random()),
                MARROW0 + b,
                MODIC0 + b,
                signs[b],
                rng.normal(0, 1, (2, 9)) * signs[b].irregularity,
            )
        )
        lower_ps, lower_as = ps_b, as_b
    bodies = bodies_up[::-1]  # T11 .. L5

    # Sacral segments downwards from the S1 superior endplate, curving (kyphotic).
    sac = []
    top_ps, top_as = ps, as_
    seg_h = [27.0, 21.0, 16.0, 12.0]
    seg_d = [s1_depth, s1_depth * 0.75, s1_depth * 0.58, s1_depth * 0.45]
    for k in range(4):
        uu = unit(top_as - top_ps)
        nn = perp(uu)
        kyph = 10.0 + 4.0 * rng.random()
        diff = seg_d[k] * math.tan(math.radians(kyph))
        pi = top_ps - (seg_h[k] + 0.5 * diff) * nn
        ai = top_ps + seg_d[k] * uu - (seg_h[k] - 0.5 * diff) * nn
        c = 0.5 * (pi + ai)
        ui = unit(ai - pi)
        pi, ai = c - 0.5 * seg_d[k] * ui, c + 0.5 * seg_d[k] * ui
        if k == 0:
            ps_k, as_k = top_ps, top_as
        else:
            ps_k, as_k = top_ps - 2.0 * nn, top_ps - 2.0 * nn + seg_d[k] * uu
        sac.append(
            Body(
                f"S{k + 1}",
                pi,
                ai,
                ps_k,
                as_k,
                22.0 * (1 - 0.15 * k),
                0.8,
                SACRAL_MARROW,
                SACRAL_MARROW,
            )
        )
        top_ps, top_as = pi, ai
    bodies = bodies + sac

    n_b = len(bodies)
    canal = np.clip(rng.normal(17.0, 1.5 * v), 13.5, 21.0) + np.zeros(n_b)
    canal[7:] = canal[0] * np.array([0.8, 0.65, 0.55, 0.45])
    canal[:2] *= 0.92
    jitter = rng.normal(1.0, 0.03 * v, (3, 256))
    jitter[:, AIR] = 1.0
    n_bowel = rng.integers(6, 14)
    bowel = np.column_stack(
        [
            rng.uniform(-60, 60, n_bowel),
            rng.uniform(-150, -45, n_bowel),
            rng.uniform(-120, 140, n_bowel),
            rng.uniform(8, 22, n_bowel),
            rng.choice([BOWEL_FLUID, BOWEL_GAS, VISCERA, BOWEL_FLUID, FAT], n_bowel),
        ]
    )
    yaw, roll = rng.normal(0, 1.5 * v, 2)
    pitch = rng.normal(0, 4.0 * v)
    rotation = rotation_matrix("z", yaw) @ rotation_matrix("y", roll) @ rotation_matrix("x", pitch)
    translation = np.array([rng.uniform(-15, 15), rng.uniform(-40, 30), rng.uniform(-60, 60)])
    fat_age = float(np.clip((age - 20) / 60, 0, 1))
    return Anatomy(
        bodies=bodies,
        discs=discs,
        labels=labels,
        canal_depth=canal,
        sac_half_width=float(rng.uniform(7.5, 10.5)),
        canal_half_width=float(rng.uniform(11.0, 13.5)),
        cord_end=float(rng.uniform(0.2, 1.3)),
        root_fracs=np.sort(rng.uniform(0.55, 0.9, 3)),
        back_depth=float(rng.uniform(45, 80)),
        back_fat=float(rng.uniform(8, 40)),
        abdomen_depth=float(rng.uniform(110, 200)),
        front_fat=float(rng.uniform(10, 45)),
        spinous_length=rng.uniform(24, 34, n_b),
        aorta=(float(rng.uniform(8, 20)), float(rng.uniform(8, 12))),
        ivc=(float(rng.uniform(-28, -16)), float(rng.uniform(9, 13))),
        bowel=bowel,
        marrow_t2=np.clip(0.36 + 0.08 * fat_age + rng.normal(0, 0.03, n_b), 0.25, 0.6),
        marrow_t1=np.clip(0.52 + 0.2 * fat_age + rng.normal(0, 0.04, n_b), 0.35, 0.85),
        contrast_jitter=jitter,
        rotation=rotation,
        translation=translation,
    )
