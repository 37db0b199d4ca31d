"""Anatomy of the lumbar-spine phantom: sampled labels and geometry, drawn as tissue label maps.

A study's anatomy lives in an *anatomy frame* of millimetres: ``x`` lateral (patient left +),
``a`` antero-posterior (posterior +), ``s`` inferior-superior (superior +). The mid-sagittal
plane ``x = 0`` holds the vertebral bodies as quadrilaterals built from the sacrum upwards
(disc and body wedges add up to the sampled lordosis); everything lateral is derived from
simple cross-section profiles (kidney-shaped bodies and discs, a round thecal sac, pedicles
and foramina beside the canal). A slice is drawn with Pillow polygons, painter's order, into
a uint8 map of tissue ids (at 2x by default, so the signal gets partial-volume edges); the
thecal sac, cord and roots follow the slice's lateral offset level by level; `tissue_lut`
turns ids into T2 / T1 / fat-suppressed T2 signal.
Sizes and signal levels are typical adult values (listed in ``docs/phantom.md``).

Disease labels are sampled first (`sample_labels`, priors of ``docs/data-format.md``) and
then *cause* what is drawn: nucleus signal and height loss, posterior bulges, focal bumps,
extruded fragments, endplate notches, osteophytes, Modic bands and sclerosis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from lit_spine.data.labels import DISC_POINTS, POINT_NAMES, VERTEBRA_POINTS, get_vocabulary

# ----------------------------------------------------------------------------- tissue ids
AIR, FAT, MUSCLE, VISCERA, BOWEL_FLUID, VESSEL, EPIDURAL_FAT, CSF, NERVE, LIGAMENT = range(10)
CORTEX, POST_MARROW, SACRAL_MARROW, PSOAS, BOWEL_GAS = range(10, 15)
MARROW0, MODIC0, ANNULUS0, NUCLEUS0, FRAGMENT0 = 20, 30, 40, 50, 60  # + vertebra / disc index

# Bodies from T11 down to L5 (index 0..6), then the sacral segments; disc i lies below body i.
VERTEBRA_NAMES = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")
DISC_NAMES = ("T11-T12", "T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
DISC_STATES = (
    "normal",
    "degenerated",
    "diffuse_bulge",
    "asymmetric_bulge",
    "protrusion",
    "extrusion",
)
SEQUENCES = ("T2", "T1", "T2FS")

# ----------------------------------------------------------------------------- label priors
# Disc state marginals per vocabulary. tianchi2020: v1 = normal + degenerated (48 %),
# v2 = bulges (25 %), v3 = protrusion (24 %), v4 = extrusion (4 %); seed7 is analogous.
DISC_STATE_TARGETS = {
    "tianchi2020": (0.355, 0.12, 0.17, 0.08, 0.235, 0.04),
    "seed7": (0.40, 0.20, 0.15, 0.07, 0.14, 0.04),
}
SCHMORL_RATE = 0.05  # discs that also carry an intravertebral herniation
VERTEBRA_DEGEN_RATE = 0.81
# Pathology risk by annotated disc level (T12-L1 .. L5-S1): most at L4-L5 and L5-S1.
DISC_LEVEL_RISK = np.array([0.35, 0.5, 0.7, 0.95, 1.7, 1.6])
STATE_LEVEL_POWER = np.array([0.0, 1.0, 0.8, 0.8, 1.3, 1.5])
STATE_AGE_BETA = np.array([0.0, 0.9, 0.6, 0.5, 0.35, 0.25])  # per standard deviation of age
STATE_Z_BETA = np.array([0.0, 0.7, 0.5, 0.5, 0.5, 0.5])  # per unit of study degeneration
VERTEBRA_LEVEL_LOGIT = np.array([-0.5, -0.25, 0.0, 0.25, 0.5])  # L1 .. L5
SCHMORL_LEVEL_LOGIT = np.array([0.6, 0.4, 0.1, -0.1, -0.3, -0.4])
AGE_MEAN, AGE_SD = 48.0, 14.0


def _population(n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """A fixed sample of (age z-score, study degeneration) used to calibrate the priors."""
    rng = np.random.default_rng(20200)
    age = np.clip(rng.normal(AGE_MEAN, AGE_SD, n), 18, 88)
    return (age - AGE_MEAN) / AGE_SD, rng.standard_normal(n)


def _disc_state_weights(
    base: np.ndarray, level: np.ndarray, age_z: np.ndarray, z: np.ndarray
) -> np.ndarray:
    logw = (
        np.log(base)
        + np.log(DISC_LEVEL_RISK[level])[..., None] * STATE_LEVEL_POWER
        + age_z[..., None] * STATE_AGE_BETA
        + z[..., None] * STATE_Z_BETA
    )
    w = np.exp(logw - logw.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


@lru_cache(maxsize=4)
def _calibration(vocab: str) -> tuple[np.ndarray, float, float]:
    """Base weights / logit offsets that make the population marginals hit the targets."""
    age_z, z = _population()
    target = np.array(DISC_STATE_TARGETS[vocab])
    target = target / target.sum()
    levels = np.repeat(np.arange(6)[None], len(z), 0)
    az, zz = np.repeat(age_z[:, None], 6, 1), np.repeat(z[:, None], 6, 1)
    base = target.copy()
    for _ in range(60):
        marg = _disc_state_weights(base, levels, az, zz).reshape(-1, 6).mean(0)
        base = base * target / marg
    p_path = 1.0 - _disc_state_weights(base, levels, az, zz)[..., 0]

    def solve(fn, goal):
        lo, hi = -12.0, 12.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fn(mid) < goal else (lo, mid)
        return 0.5 * (lo + hi)

    vlev = np.arange(5)[None]
    vert_b = solve(
        lambda b: _sigmoid(
            b + age_z[:, None] + 0.7 * z[:, None] + VERTEBRA_LEVEL_LOGIT[vlev]
        ).mean(),
        VERTEBRA_DEGEN_RATE,
    )
    schm_c = solve(
        lambda c: _sigmoid(c + 0.5 * zz + SCHMORL_LEVEL_LOGIT[levels] + 1.0 * p_path).mean(),
        SCHMORL_RATE,
    )
    return base, vert_b, schm_c


@dataclass
class StudyLabels:
    """Sampled ground truth: age, per-disc state and Schmorl flag, per-vertebra degeneration."""

    age: float
    disc_states: list[str]  # the 6 annotated discs, T12-L1 .. L5-S1
    schmorl: list[bool]
    vertebra_degenerated: list[bool]  # L1 .. L5
    degeneration: float  # the study's latent degeneration (standard normal)

    def codes(self, vocab: str) -> dict[str, tuple[str, ...]]:
        """Disease codes per point name in a vocabulary (the annotation's tag values)."""
        get_vocabulary(vocab)
        out: dict[str, tuple[str, ...]] = {}
        for k, i in enumerate(VERTEBRA_POINTS):
            out[POINT_NAMES[i]] = ("v2",) if self.vertebra_degenerated[k] else ("v1",)
        for k, i in enumerate(DISC_POINTS):
            out[POINT_NAMES[i]] = disc_codes(self.disc_states[k], self.schmorl[k], vocab)
        return out


def disc_codes(state: str, schmorl: bool, vocab: str) -> tuple[str, ...]:
    """The disease codes of a disc state (plus Schmorl's node) in a vocabulary."""
    if vocab == "tianchi2020":
        main = {
            "normal": "v1",
            "degenerated": "v1",
            "diffuse_bulge": "v2",
            "asymmetric_bulge": "v2",
            "protrusion": "v3",
            "extrusion": "v4",
        }[state]
        extra = "v5"
    else:
        main = f"v{DISC_STATES.index(state) + 1}"
        extra = "v7"
    if not schmorl:
        return (main,)
    return (extra,) if main == "v1" else (main, extra)


def sample_labels(rng: np.random.Generator, vocab: str = "tianchi2020") -> StudyLabels:
    """Sample one study's labels from the calibrated priors (level, age and study effects)."""
    base, vert_b, schm_c = _calibration(vocab)
    age = float(np.clip(rng.normal(AGE_MEAN, AGE_SD), 18, 88))
    age_z = (age - AGE_MEAN) / AGE_SD
    z = float(rng.standard_normal())
    levels = np.arange(6)
    p = _disc_state_weights(base, levels, np.full(6, age_z), np.full(6, z))
    u = rng.random(6)
    states_i = [min(int(np.searchsorted(np.cumsum(p[k]), u[k])), 5) for k in range(6)]
    p_schm = _sigmoid(schm_c + 0.5 * z + SCHMORL_LEVEL_LOGIT + 1.0 * (1.0 - p[:, 0]))
    schmorl = list(rng.random(6) < p_schm)
    p_vert = _sigmoid(vert_b + age_z + 0.7 * z + VERTEBRA_LEVEL_LOGIT)
    vert = list(rng.random(5) < p_vert)
    return StudyLabels(
        age,
        [DISC_STATES[i] for i in states_i],
        [bool(s) for s in schmorl],
        [bool(v) for v in vert],
        z,
    )


# ----------------------------------------------------------------------------- geometry


def _perp(u: np.ndarray) -> np.ndarray:
    """Superior normal of an anterior-pointing endplate direction."""
    return np.array([u[1], -u[0]])


def _unit(v: np.ndarray) -> np.ndarray:
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
        return _unit((self.ai - self.pi) + (self.as_ - self.ps))

    @property
    def depth(self) -> float:
        return 0.5 * float(np.linalg.norm(self.ai - self.pi) + np.linalg.norm(self.as_ - self.ps))

    def endplate(
        self, which: str, f0: float, f1: float, n: int = 9, concavity: float | None = None
    ) -> np.ndarray:
        """Endplate polyline from fraction f0 (posterior) to f1 (anterior), concave into the body."""
        p, a = (self.ps, self.as_) if which == "sup" else (self.pi, self.ai)
        inward = -_perp(_unit(a - p)) if which == "sup" else _perp(_unit(a - p))
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
        return _unit(self.bodies[d].u + self.bodies[d + 1].u)

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


def _rot(axis: str, deg: float) -> np.ndarray:
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
        n = _perp(_unit(lower_as - lower_ps))
        dwedge = wedge[seg] if b >= 2 else (thor_wedge[0] if b == 1 else thor_wedge[2])
        seg += 1 if b >= 2 else 0
        dd = depth[b]
        dh = disc_h[b]
        diff = dd * math.tan(math.radians(dwedge))
        ant_h, post_h = dh + 0.5 * diff, max(dh - 0.5 * diff, 1.5)
        c0 = 0.5 * (lower_ps + lower_as)
        pi = c0 - 0.5 * dd * _unit(lower_as - lower_ps) + post_h * n
        ai = c0 + 0.5 * dd * _unit(lower_as - lower_ps) + ant_h * n
        # Rotate the new inferior endplate to the disc wedge: anterior corner moved up already.
        ub = _unit(ai - pi)
        nb = _perp(ub)
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
        ub2 = _unit(as_b - ps_b)
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
        uu = _unit(top_as - top_ps)
        nn = _perp(uu)
        kyph = 10.0 + 4.0 * rng.random()
        diff = seg_d[k] * math.tan(math.radians(kyph))
        pi = top_ps - (seg_h[k] + 0.5 * diff) * nn
        ai = top_ps + seg_d[k] * uu - (seg_h[k] - 0.5 * diff) * nn
        c = 0.5 * (pi + ai)
        ui = _unit(ai - pi)
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
    rotation = _rot("z", yaw) @ _rot("y", roll) @ _rot("x", pitch)
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


# ----------------------------------------------------------------------------- signal

_BASE_SIGNAL = {  # tissue: (T2, T1, fat-suppressed T2), CSF on T2 = 1
    AIR: (0.0, 0.0, 0.0),
    FAT: (0.78, 0.95, 0.10),
    MUSCLE: (0.20, 0.34, 0.22),
    VISCERA: (0.34, 0.38, 0.32),
    BOWEL_FLUID: (0.85, 0.12, 0.85),
    VESSEL: (0.05, 0.07, 0.05),
    EPIDURAL_FAT: (0.70, 0.90, 0.10),
    CSF: (1.0, 0.12, 1.0),
    NERVE: (0.24, 0.32, 0.26),
    LIGAMENT: (0.06, 0.08, 0.06),
    CORTEX: (0.045, 0.06, 0.045),
    POST_MARROW: (0.40, 0.58, 0.16),
    SACRAL_MARROW: (0.42, 0.62, 0.16),
    PSOAS: (0.20, 0.34, 0.22),
    BOWEL_GAS: (0.02, 0.02, 0.02),
}
_MODIC_SIGNAL = {1: (0.66, 0.28, 0.60), 2: (0.58, 0.82, 0.13), 3: (0.12, 0.12, 0.09)}


def tissue_lut(anat: Anatomy, sequence: str) -> np.ndarray:
    """Relative signal per tissue id (256 entries) for 'T2', 'T1' or 'T2FS'."""
    k = SEQUENCES.index(sequence)
    lut = np.zeros(256, np.float32)
    for tissue, values in _BASE_SIGNAL.items():
        lut[tissue] = values[k]
    for b, body in enumerate(anat.bodies):
        if body.marrow_id == SACRAL_MARROW:
            continue
        lut[body.marrow_id] = (anat.marrow_t2[b], anat.marrow_t1[b], 0.16)[k]
        mt = body.signs.modic_type
        lut[body.modic_id] = _MODIC_SIGNAL[mt][k] if mt else lut[body.marrow_id]
    for d, lesion in enumerate(anat.discs):
        lut[ANNULUS0 + d] = (0.12, 0.20, 0.12)[k]
        deg = (0.9 - lesion.nucleus_t2) / 0.8
        lut[NUCLEUS0 + d] = (lesion.nucleus_t2, 0.34 - 0.12 * deg, 0.95 * lesion.nucleus_t2)[k]
        lut[FRAGMENT0 + d] = (
            max(lesion.nucleus_t2, 0.35) * 0.85,
            0.32,
            0.8 * max(lesion.nucleus_t2, 0.35),
        )[k]
    return lut * anat.contrast_jitter[k].astype(np.float32)


# ----------------------------------------------------------------------------- drawing


def ellipse(centre, ax1, r1: float, r2: float, n: int = 28) -> np.ndarray:
    """Polygon of an ellipse with semi-axis r1 along unit vector ax1 and r2 perpendicular."""
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ax1 = _unit(np.asarray(ax1, float))
    ax2 = np.array([-ax1[1], ax1[0]])
    return np.asarray(centre) + np.outer(r1 * np.cos(th), ax1) + np.outer(r2 * np.sin(th), ax2)


def inset(poly: np.ndarray, d: float) -> np.ndarray:
    """Move each vertex `d` mm towards the centroid (a cheap inner offset of a convex-ish shape)."""
    c = poly.mean(0)
    vec = c - poly
    dist = np.linalg.norm(vec, axis=1, keepdims=True) + 1e-9
    return poly + vec / dist * np.minimum(d, 0.8 * dist)


class Canvas:
    """A slice being drawn: maps 2-D local mm coordinates to pixels and paints tissue ids.

    `to_anatomy(points, x_hint)` lifts (N, 2) local points to (N, 3) anatomy points; the plane
    (origin, row and column directions, spacings) projects them to (column, row) pixels.
    """

    def __init__(self, anat: Anatomy, plane, to_anatomy, supersample: int = 1):
        self.plane = plane
        self.to_anatomy = to_anatomy
        self.ss = int(supersample)
        rot = anat.rotation
        self.r = rot.T @ plane.row_dir / plane.col_spacing * self.ss
        self.c = rot.T @ plane.col_dir / plane.row_spacing * self.ss
        self.origin = rot.T @ (plane.origin - anat.translation)
        # Sub-pixel centres sit symmetrically inside each output pixel.
        self.shift = 0.5 * (self.ss - 1)
        # Both lifts (sagittal and axial) are affine in the local 2-D points, so the whole
        # local -> pixel map is one 2x2 matrix and an offset.
        basis = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        pix = self._px_slow(basis)
        self.t0 = pix[0]
        self.m = pix[1:] - pix[0]
        self.image = Image.new("L", (plane.cols * self.ss, plane.rows * self.ss), AIR)
        self.draw = ImageDraw.Draw(self.image)

    def _px_slow(self, pts: np.ndarray) -> np.ndarray:
        a = self.to_anatomy(np.asarray(pts, float)) - self.origin
        return np.column_stack([a @ self.r, a @ self.c]) + self.shift

    def px(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) local points to (N, 2) pixel (column, row) of the (supersampled) canvas."""
        return np.atleast_2d(np.asarray(pts, float)) @ self.m + self.t0

    def poly(self, pts, tissue: int) -> None:
        if pts is None or len(pts) < 3:
            return
        self.draw.polygon(self.px(pts).ravel().tolist(), fill=int(tissue))

    def line(self, pts, tissue: int, width_mm: float = 1.0) -> None:
        w = max(1, int(round(width_mm * self.ss / self.plane.col_spacing)))
        self.draw.line(self.px(pts).ravel().tolist(), fill=int(tissue), width=w)

    def labels(self) -> np.ndarray:
        return np.asarray(self.image)


def _offset_line(points: np.ndarray, dirs: np.ndarray, dist) -> np.ndarray:
    return points + np.asarray(dist, float).reshape(-1, 1) * dirs


def _spine_lines(anat: Anatomy):
    """Posterior corner chain (bottom up) with posterior directions, extended beyond the ends."""
    pts, dirs, canal = [], [], []
    for b in range(len(anat.bodies) - 1, -1, -1):
        body = anat.bodies[b]
        for p in (body.pi, body.ps):
            pts.append(p)
            dirs.append(-body.u)
            canal.append(anat.canal_depth[b])
    pts, dirs, canal = np.array(pts), np.array(dirs), np.array(canal)
    return pts, dirs, canal


def _process(
    top: np.ndarray, bot: np.ndarray, tip_c: np.ndarray, tip_h: float, nb: np.ndarray, club: bool
) -> np.ndarray:
    """Outline of a lamina + spinous process (or facet pillar) from its base on the canal.

    The base (top..bot) narrows into a waist and ends in a rounded (club-shaped) tip, instead
    of a flat quadrilateral.
    """
    base_c = 0.5 * (top + bot)
    axis = tip_c - base_c
    length = float(np.linalg.norm(axis)) + 1e-9
    ax_u = axis / length
    t = np.array([0.0, 0.18, 0.42, 0.68, 0.86])
    waist = 0.62 if club else 0.8
    # Half-heights along the process: base, lamina, waist, shaft, tip.
    h0 = 0.5 * float(np.linalg.norm(top - bot))
    prof = np.array(
        [
            h0,
            0.8 * h0 + 0.2 * tip_h,
            waist * tip_h + (1 - waist) * 0.5 * h0,
            (0.9 if club else 0.85) * tip_h,
            tip_h,
        ]
    )
    sign = 1.0 if float((top - bot) @ nb) >= 0 else -1.0
    side = sign * nb
    upper = base_c + np.outer(t * length, ax_u) + prof[:, None] * side
    lower = base_c + np.outer(t * length, ax_u) - prof[:, None] * side
    upper[0], lower[0] = top, bot
    th = np.linspace(0.5 * np.pi, -0.5 * np.pi, 7)[1:-1]
    end_c = base_c + t[-1] * length * ax_u
    r_len = (1.0 - t[-1]) * length
    cap = end_c + np.outer(np.cos(th) * r_len, ax_u) + np.outer(np.sin(th) * tip_h, side)
    return np.vstack([upper, cap, lower[::-1]])


def _runs(mask: np.ndarray) -> list[slice]:
    """Slices of the consecutive True runs of a boolean vector."""
    idx = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [slice(int(i), int(j)) for i, j in zip(idx[::2], idx[1::2])]


def _extend(pts: np.ndarray, dist: float = 160.0) -> np.ndarray:
    lo = pts[0] + _unit(pts[0] - pts[2]) * dist
    hi = pts[-1] + _unit(pts[-1] - pts[-3]) * dist
    return np.vstack([lo, pts, hi])


def render_sagittal(anat: Anatomy, plane, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Tissue-id map of a sagittal slice, and the lateral x at each body centre.

    The map has (rows, cols) x `supersample` pixels (sub-pixel centres symmetric inside each
    output pixel), so that averaging the signal of s x s blocks gives partial-volume edges.
    """
    rot_r = anat.rotation.T
    n_a = rot_r @ np.cross(plane.row_dir, plane.col_dir)
    o_a = rot_r @ (plane.centre - anat.translation)

    def x_at(pts):
        pts = np.atleast_2d(pts)
        return o_a[0] - (n_a[1] * (pts[:, 0] - o_a[1]) + n_a[2] * (pts[:, 1] - o_a[2])) / n_a[0]

    def lift(pts):
        return np.column_stack([x_at(pts), pts])

    cv = Canvas(anat, plane, lift, supersample)
    bodies = anat.bodies
    xs = x_at(np.array([b.centre for b in bodies]))

    # Torso: fat envelope, muscle / abdominal wall, viscera.
    post, pdir, canal = _spine_lines(anat)
    centres = np.array([b.centre for b in bodies[::-1]])
    cdir = np.array([-b.u for b in bodies[::-1]])
    depths = np.array([b.depth for b in bodies[::-1]])
    cext, dext = _extend(centres), np.vstack([cdir[:1], cdir, cdir[-1:]])
    dep = np.concatenate([[depths[0]], depths, [depths[-1]]])
    can = np.concatenate([[canal[0]], canal[::2], [canal[-1]]])
    back = _offset_line(cext, dext, 0.5 * dep + can + anat.back_depth + 12)
    front = _offset_line(cext, dext, -(0.5 * dep + anat.abdomen_depth))
    cv.poly(np.vstack([back, front[::-1]]), FAT)
    # Subcutaneous fat thickness varies smoothly along the back (thicker low down).
    k = np.linspace(0.0, 1.0, len(cext))
    wave = 1.0 + 0.18 * np.sin(2.5 * np.pi * k + anat.back_depth) + 0.15 * (k - 0.5)
    back_in = _offset_line(
        cext, dext, 0.5 * dep + can + anat.back_depth + 12 - anat.back_fat * wave
    )
    front_in = _offset_line(
        cext, dext, -(0.5 * dep + anat.abdomen_depth - anat.front_fat * wave[::-1])
    )
    cv.poly(np.vstack([back_in, front_in[::-1]]), MUSCLE)
    # Fasciae: thin dark lines at the fat / muscle interfaces.
    cv.line(back_in, LIGAMENT, 0.8)
    cv.line(front_in, LIGAMENT, 0.8)
    cv.line(
        _offset_line(
            cext, dext, 0.5 * dep + can + anat.back_depth + 12 - 0.45 * anat.back_fat * wave
        ),
        LIGAMENT,
        0.5,
    )
    front_v = _offset_line(cext, dext, -(0.5 * dep + anat.abdomen_depth - anat.front_fat - 12))
    ant_spine = _offset_line(cext, dext, -(0.5 * dep + 1.5))
    cv.poly(np.vstack([ant_spine, front_v[::-1]]), VISCERA)
    for bx, ba, bs, br, bt in anat.bowel:
        xm = float(x_at(np.array([[ba, bs]]))[0])
        rr = br * br - (xm - bx) ** 2
        if rr > 4:
            cv.poly(ellipse((ba, bs), (1, 0), math.sqrt(rr), math.sqrt(rr) * 1.3, 20), int(bt))
    # Great vessels in front of the bodies (aorta down to L4, IVC to L5).
    for (vx, vr), last in ((anat.aorta, 5), (anat.ivc, 6)):
        xm = float(xs[3])
        w = vr * vr - (xm - vx) ** 2
        if w > 1:
            half = math.sqrt(w)
            cen = np.array([b.centre for b in bodies[: last + 1]])
            dd = np.array([-b.u for b in bodies[: last + 1]])
            dpt = np.array([b.depth for b in bodies[: last + 1]])
            near = _offset_line(cen, dd, -(0.5 * dpt + 3 + vr - half))
            far = _offset_line(cen, dd, -(0.5 * dpt + 3 + vr + half))
            top = near[0] - 80 * _unit(cen[1] - cen[0])
            near = np.vstack([top, near])
            far = np.vstack([far[0] - 80 * _unit(cen[1] - cen[0]), far])
            cv.poly(np.vstack([near, far[::-1]]), VESSEL)

    # Canal (epidural fat; neural foramina laterally), thecal sac, cord, roots.
    post_ext = _extend(post, 40)
    pdir_e = np.vstack([pdir[:1], pdir, pdir[-1:]])
    canal_e = np.concatenate([[canal[0]], canal, [canal[-1]]])
    # Epidural fat starts 2 mm inside the bodies so that the concave posterior body walls
    # (drawn later) leave no gap of muscle between body and canal.
    cv.poly(
        np.vstack(
            [_offset_line(post_ext, pdir_e, -2.0), _offset_line(post_ext, pdir_e, canal_e)[::-1]]
        ),
        EPIDURAL_FAT,
    )
    # `post` holds (pi, ps) pairs bottom-up from S4; the dural sac ends at S2 (pairs from 4).
    # An oblique slice cuts the round sac (and the cord) off-centre by a different lateral x
    # at every level, so their sagittal width follows the plane's x point by point.
    sac_from = 4
    sp = _extend(post[sac_from:], 40)[1:]
    sd = np.vstack([pdir[sac_from:], pdir[-1:]])
    sc = np.concatenate([canal[sac_from:], canal[-1:]])
    sac_q = np.clip(1.0 - (x_at(sp) / anat.sac_half_width) ** 2, 0.0, 1.0)
    if sac_q.max() > 0.02:
        mid = 0.5 * sc * 0.92
        half = 0.5 * (sc - 3.0) * np.sqrt(sac_q)
        front_s = _offset_line(sp, sd, mid - half + 0.5 * np.sqrt(sac_q))
        back_s = _offset_line(sp, sd, mid + half - 1.0 * np.sqrt(sac_q))
        tip = 0.5 * (front_s[1] + back_s[1]) - 6.0 * _unit(front_s[2] - front_s[1])
        cv.poly(np.vstack([tip, front_s[1:], back_s[1:][::-1]]), LIGAMENT)
        inner = np.maximum(half - 1.1, 0.0)
        cv.poly(
            np.vstack(
                [
                    tip,
                    _offset_line(sp, sd, mid - inner)[1:],
                    _offset_line(sp, sd, mid + inner - 0.3)[1:][::-1],
                ]
            ),
            CSF,
        )
        # Spinal cord tapering into the conus (L1 / L1-L2); below it the cauda equina: thin
        # roots gathered dorsally in the sac, spreading out towards the sacrum.
        l1 = bodies[2]
        conus = l1.pi - (anat.cord_end * 8.0) * _unit(l1.ps - l1.pi)
        upper, up_d = _extend(post[-6:], 40)[1:], np.vstack([pdir[-6:], pdir[-1:]])
        up_c = np.concatenate([canal[-6:], canal[-1:]])
        cord_q = np.clip(1.0 - (x_at(upper) / 5.5) ** 2, 0.0, 1.0)
        if cord_q.max() > 0.05:
            cmid = _offset_line(upper, up_d, 0.48 * up_c)
            cw = 3.6 * np.sqrt(cord_q)
            cw[:2] *= 0.75  # the conus medullaris narrows
            tip_c = conus + 0.5 * canal[-6] * pdir[-6]
            cv.poly(
                np.vstack(
                    [
                        tip_c,
                        _offset_line(cmid[1:], up_d[1:], -cw[1:] + 0.3),
                        _offset_line(cmid[1:], up_d[1:], cw[1:])[::-1],
                    ]
                ),
                NERVE,
            )
        n_roots = len(post) - 5 - (sac_from + 1)
        if n_roots > 1:
            sl = slice(sac_from + 1, sac_from + 1 + n_roots)
            rp, rd = post[sl], pdir[sl]
            r_mid, r_half = mid[1 : n_roots + 1], half[1 : n_roots + 1]
            ok = np.abs(x_at(rp)) < anat.sac_half_width * 0.85
            for fr in anat.root_fracs:
                line = _offset_line(rp, rd, r_mid - r_half + 2 * fr * r_half)
                for run in _runs(ok):
                    if run.stop - run.start > 1:
                        cv.line(line[run], NERVE, 0.7)

    # Posterior elements per vertebra: spinous process in the midline, laminae / facets lateral.
    for b, body in enumerate(bodies[:9]):
        x = float(xs[b])
        ax = abs(x)
        pd = -body.u
        nb = _unit(body.ps - body.pi)
        cd = anat.canal_depth[b]
        top = body.ps - 0.25 * (body.ps - body.pi) + cd * pd
        bot = body.pi - 0.45 * (anat.canal_depth[b] * 0.5) * nb + cd * pd
        if b >= 7:  # fused sacral arch: a low plate
            length = 9.0
        elif ax < 4.5:
            length = anat.spinous_length[b]
        elif ax < anat.canal_half_width + 8:
            length = 13.0
        elif ax < 30:
            length = 10.0
        else:
            continue
        down = _unit(pd - 0.35 * nb)
        tip_h = 0.35 * float(np.linalg.norm(top - bot))
        tip_c = 0.5 * (top + bot) + length * down
        if ax >= 4.5 and b < 7:  # facet pillar spans into the disc level below
            bot = bot - 6.0 * nb
            tip_c = 0.5 * (top + bot) + length * pd
            tip_h = 0.45 * float(np.linalg.norm(top - bot))
        poly = _process(top, bot, tip_c, tip_h, nb, club=ax < 4.5 and b < 7)
        cv.poly(poly, CORTEX)
        cv.poly(inset(poly, 1.5), POST_MARROW)
        if ax >= anat.canal_half_width - 1 and b < 7:  # pedicle bridging body and arch
            ped_top = body.ps - 0.15 * (body.ps - body.pi)
            ped_bot = body.ps - 0.6 * (body.ps - body.pi)
            ped = np.array(
                [
                    ped_top + 1 * body.u,
                    ped_top + (cd + 2) * pd,
                    ped_bot + (cd + 2) * pd,
                    ped_bot + 1 * body.u,
                ]
            )
            cv.poly(ped, CORTEX)
            cv.poly(inset(ped, 1.3), POST_MARROW)
            root_c = body.pi - 3.5 * nb + 0.45 * cd * pd
            cv.poly(ellipse(root_c, nb, 3.0, 2.5, 14), NERVE)

    # Vertebral bodies with degenerative signs.
    for b, body in enumerate(bodies):
        x = float(xs[b])
        out = body.outline(x)
        if out is None:
            continue
        cv.poly(out, CORTEX)
        marrow = inset(out, 1.6 + body.signs.sclerosis)
        cv.poly(marrow, body.marrow_id)
        s = body.signs
        fr = lateral_fractions(x, body.half_width)
        if s.modic_type and fr is not None:
            for which, thick in (("sup", s.modic_sup), ("inf", s.modic_inf)):
                if thick <= 0:
                    continue
                ep = body.endplate(which, fr[0] + 0.08, fr[1] - 0.06, n=7)
                inward = -_perp(body.u) if which == "sup" else _perp(body.u)
                band = np.vstack(
                    [
                        _offset_line(ep, np.repeat(inward[None], 7, 0), 1.6 + s.sclerosis),
                        _offset_line(ep, np.repeat(inward[None], 7, 0), thick)[::-1],
                    ]
                )
                cv.poly(band, body.modic_id)
        if any(o > 0.3 for o in s.osteophytes) and fr is not None:
            nb = _unit(body.ps - body.pi)
            lat = math.sqrt(max(0.0, 1.0 - (x / body.half_width) ** 2))
            corners = (
                (body.endplate("sup", fr[1], fr[1], 1)[0], body.u, nb),
                (body.endplate("inf", fr[1], fr[1], 1)[0], body.u, -nb),
                (body.endplate("sup", fr[0], fr[0], 1)[0], -body.u, nb),
                (body.endplate("inf", fr[0], fr[0], 1)[0], -body.u, -nb),
            )
            for size, (corner, outward, vert) in zip(s.osteophytes, corners):
                size = size * lat
                if size <= 0.3:
                    continue
                # A beak from the corner, pointing outwards and towards the disc.
                beak = np.array(
                    [
                        corner - 0.4 * size * outward - 1.2 * size * vert,
                        corner + size * outward + 0.5 * size * vert,
                        corner + 0.3 * size * outward - 0.2 * size * vert,
                    ]
                )
                cv.poly(beak, CORTEX)
                if size > 2.5:
                    cv.poly(inset(beak, 1.0), body.marrow_id)

    # Schmorl's nodes: notches in the endplate, drawn before the discs so the disc covers
    # the part of the rim outside the body and the notch opens into it.
    for d in range(7):
        lesion = anat.discs[d]
        x = 0.5 * float(xs[d] + xs[d + 1])
        if lesion.schmorl is not None:
            side, f, dep, w, xs_, wls = lesion.schmorl
            g = 1.0 - ((x - xs_) / wls) ** 2
            body = bodies[d] if side == "up" else bodies[d + 1]
            frb = lateral_fractions(x, body.half_width)
            if g > 0 and frb is not None:
                which = "inf" if side == "up" else "sup"
                ep = body.endplate(which, f, f, n=1)[0]
                inward = _perp(body.u) if which == "inf" else -_perp(body.u)
                c = ep + 0.15 * dep * inward
                cv.poly(
                    ellipse(c, inward, dep * math.sqrt(g) + 1.2, 0.5 * w * math.sqrt(g) + 1.0, 20),
                    CORTEX,
                )
                cv.poly(
                    ellipse(c, inward, dep * math.sqrt(g), 0.5 * w * math.sqrt(g), 20), NUCLEUS0 + d
                )
                cv.poly(
                    ellipse(c - 1.5 * inward, inward, dep * 0.5, 0.5 * w * math.sqrt(g) + 0.3, 16),
                    ANNULUS0 + d if lesion.nucleus_t2 < 0.4 else NUCLEUS0 + d,
                )
    # Discs: annulus, nucleus, cleft; extruded fragments.
    for d in range(7):
        lesion = anat.discs[d]
        x = 0.5 * float(xs[d] + xs[d + 1])
        out = anat.disc_outline(d, x)
        if out is None:
            continue
        cv.poly(out, ANNULUS0 + d)
        lp, la, up, ua = anat.disc_corners(d, x)
        u = anat.disc_u(d)
        n = _perp(u)
        h = 0.5 * float(np.linalg.norm(up - lp) + np.linalg.norm(ua - la))
        depth = 0.5 * float(np.linalg.norm(la - lp) + np.linalg.norm(ua - up))
        centre = (lp + la + up + ua) / 4.0 - 0.06 * depth * u
        nuc = ellipse(centre, u, 0.36 * depth, 0.34 * h, 24)
        if lesion.irregular:
            jit = 1 + lesion.irregular * np.sin(np.arange(24) * 2.3 + d) * 0.35
            nuc = centre + (nuc - centre) * jit[:, None]
        cv.poly(nuc, NUCLEUS0 + d)
        if lesion.cleft:
            cv.line(
                np.array([centre - 0.25 * depth * u, centre + 0.28 * depth * u]), ANNULUS0 + d, 0.7
            )
        if lesion.fragment is not None:
            mig, ra, rs, xf, wlf = lesion.fragment
            g = 1.0 - ((x - xf) / wlf) ** 2
            if g > 0:
                base = lp + lesion.t0 * (up - lp)
                fc = base - (lesion.amp * 0.7 + ra) * u + mig * n
                # A narrow neck through the annulus, then the wider dome (possibly migrated).
                neck = np.array(
                    [
                        base + 1.0 * u - 1.6 * n,
                        base - (lesion.amp + 0.5) * u - 1.6 * n,
                        fc + 0.5 * u,
                        base - (lesion.amp + 0.5) * u + 1.6 * n,
                        base + 1.0 * u + 1.6 * n,
                    ]
                )
                cv.poly(neck, FRAGMENT0 + d)
                cv.poly(ellipse(fc, u, ra * math.sqrt(g), rs * math.sqrt(g), 22), FRAGMENT0 + d)
    # Rudimentary sacral discs: thin dark gaps between the fused segments.
    for k in range(7, len(bodies) - 1):
        up, lo = bodies[k], bodies[k + 1]
        cv.line(np.array([0.5 * (up.pi + lo.ps), 0.5 * (up.ai + lo.as_)]), LIGAMENT, 1.5)
    return cv.labels(), xs


def render_axial(
    anat: Anatomy, plane, disc: int, height: float, supersample: int = 1
) -> np.ndarray:
    """Tissue-id map of an axial slice through disc `disc`, `height` mm above its centre.

    Local coordinates (x lateral, p posterior of the disc centre) in the disc's frame.
    """
    u = anat.disc_u(disc)
    n = _perp(u)
    c = anat.disc_centre(disc)

    def lift(pts):
        pts = np.atleast_2d(pts)
        as_ = c + height * n - pts[:, 1:2] * u
        return np.column_stack([pts[:, 0], as_])

    cv = Canvas(anat, plane, lift, supersample)
    lo, up = anat.bodies[disc + 1], anat.bodies[disc]
    lp, la, upp, ua = anat.disc_corners(disc)
    h_mid = 0.5 * float(np.linalg.norm(upp - lp) + np.linalg.norm(ua - la))
    t = 0.5 + height / max(h_mid, 1.0)
    in_disc = 0.08 < t < 0.92
    body = up if t >= 0.5 else lo
    depth = 0.5 * (lo.depth + up.depth)
    p_post = depth / 2.0
    hw = anat.disc_half_width(disc)
    b_index = disc if t >= 0.5 else disc + 1
    cd = anat.canal_depth[min(b_index, len(anat.canal_depth) - 1)]

    # Torso, muscles, viscera.
    p_back = p_post + cd + anat.back_depth + 12
    p_front = -(p_post + anat.abdomen_depth)
    tw = 150.0 + 0.35 * anat.abdomen_depth
    pc, pr = 0.5 * (p_back + p_front), 0.5 * (p_back - p_front)
    th = np.linspace(0, 2 * np.pi, 64, endpoint=False)

    def torso(shrink):
        ct, st = np.cos(th), np.sin(th)
        rx = (tw - shrink) * np.sign(ct) * np.abs(ct) ** 0.8
        rp = (pr - shrink) * np.sign(st) * np.abs(st) ** 0.8
        return np.column_stack([rx, pc + rp])

    cv.poly(torso(0), FAT)
    cv.poly(torso(min(anat.back_fat, anat.front_fat) + 2), MUSCLE)
    cv.poly(torso(min(anat.back_fat, anat.front_fat) + 14), VISCERA)
    for bx, ba, bs, br, bt in anat.bowel:
        rel = np.array([ba, bs]) - c
        rr = br * br - (float(rel @ n) - height) ** 2
        if rr > 4:
            cv.poly(
                ellipse((bx, -float(rel @ u)), (1, 0), math.sqrt(rr) * 1.2, math.sqrt(rr), 20),
                int(bt),
            )
    # Paraspinal muscles and psoas.
    for sgn in (-1, 1):
        m_front, m_back = p_post + cd - 6.0, p_back - anat.back_fat - 2.0
        cv.poly(
            ellipse(
                (sgn * 27, 0.5 * (m_front + m_back)),
                (1, 0),
                22,
                max(0.5 * (m_back - m_front), 8.0),
                28,
            ),
            MUSCLE,
        )
        ps_r = 6.0 + 3.2 * max(0, disc - 1)
        cv.poly(
            ellipse((sgn * (hw + ps_r * 0.7), -0.1 * depth), (1, 0), ps_r, ps_r * 0.9, 24), PSOAS
        )
    # Vessels in front of the spine (iliac vessels below the bifurcation).
    for (vx, vr), last in ((anat.aorta, 4), (anat.ivc, 5)):
        if disc <= last:
            cv.poly(
                ellipse((vx, -(p_post + 3 + vr)), (1, 0), vr, vr * (0.75 if vx < 0 else 1.0), 24),
                VESSEL,
            )
        else:
            for sgn in (-1, 1):
                cv.poly(
                    ellipse((sgn * 18 + vx * 0.2, -(p_post + 8)), (1, 0), vr * 0.6, vr * 0.6, 18),
                    VESSEL,
                )

    # Vertebral outline: disc (with its lesion at this height) or body.
    xg = np.linspace(-hw * 0.96, hw * 0.96, 33)
    lesion = anat.discs[disc]
    fr = [lateral_fractions(x, hw) for x in xg]
    if in_disc:
        post = np.array(
            [
                p_post - f[0] * depth + float(lesion.bump(x, np.array([t]), hw)[0])
                for x, f in zip(xg, fr)
            ]
        )
    else:
        post = np.array([p_post - f[0] * depth for f in fr])
    ant = np.array([p_post - f[1] * depth - (0.8 if in_disc else 0) for f in fr])
    outline = np.vstack([np.column_stack([xg, post]), np.column_stack([xg, ant])[::-1]])
    # Canal: epidural fat, thecal sac with dorsal roots, ligamenta flava, facets, arch.
    cw = anat.canal_half_width
    canal = np.array(
        [
            [-cw - 2, p_post - 1],
            [cw + 2, p_post - 1],
            [cw * 0.55, p_post + cd],
            [-cw * 0.55, p_post + cd],
        ]
    )
    cv.poly(canal, EPIDURAL_FAT)
    sac_c = np.array([0.0, p_post + 0.45 * cd])
    cv.poly(ellipse(sac_c, (1, 0), anat.sac_half_width + 0.8, 0.36 * cd + 0.8, 28), LIGAMENT)
    cv.poly(ellipse(sac_c, (1, 0), anat.sac_half_width, 0.36 * cd, 28), CSF)
    for k, fr_r in enumerate(anat.root_fracs):
        for sgn in (-1, 1):
            rx = sgn * (1.5 + 1.6 * k)
            cv.poly(ellipse((rx, sac_c[1] + (fr_r - 0.4) * 0.5 * cd), (1, 0), 1.0, 1.0, 8), NERVE)
    for sgn in (-1, 1):
        fc = np.array([sgn * (cw + 5), p_post + 0.7 * cd])
        if in_disc:
            cv.poly(ellipse(fc, (1, 0.6 * sgn), 8, 6, 20), CORTEX)
            cv.poly(ellipse(fc, (1, 0.6 * sgn), 6.5, 4.5, 20), POST_MARROW)
            cv.line(np.array([fc - (2.0, 5.0 * sgn), fc + (2.0, 5.0 * sgn)]), LIGAMENT, 1.0)
            cv.line(
                np.array([[sgn * cw * 0.6, p_post + cd], [sgn * (cw + 1), p_post + 0.5 * cd]]),
                LIGAMENT,
                2.5,
            )
        else:  # pedicle
            ped = np.array(
                [
                    [sgn * (cw - 1), p_post - 4],
                    [sgn * (cw + 7), p_post - 4],
                    [sgn * (cw + 8), p_post + cd],
                    [sgn * (cw), p_post + cd],
                ]
            )
            cv.poly(ped, CORTEX)
            cv.poly(inset(ped, 1.5), POST_MARROW)
    arch = np.array(
        [
            [-cw - 4, p_post + cd - 1],
            [cw + 4, p_post + cd - 1],
            [3.5, p_post + cd + 10],
            [-3.5, p_post + cd + 10],
        ]
    )
    cv.poly(arch, CORTEX)
    cv.poly(inset(arch, 1.4), POST_MARROW)
    if not in_disc or t > 0.7:
        sp = np.array(
            [
                [-3.5, p_post + cd + 5],
                [3.5, p_post + cd + 5],
                [3.0, p_post + cd + 5 + anat.spinous_length[b_index]],
                [-3.0, p_post + cd + 5 + anat.spinous_length[b_index]],
            ]
        )
        cv.poly(sp, CORTEX)
        cv.poly(inset(sp, 1.3), POST_MARROW)
    cv.poly(outline, CORTEX if not in_disc else ANNULUS0 + disc)
    if in_disc:
        nuc = ellipse((0.0, p_post - 0.45 * depth), (1, 0), 0.45 * hw, 0.28 * depth, 28)
        cv.poly(nuc, NUCLEUS0 + disc)
        if lesion.fragment is not None:
            mig, ra, rs, xf, wlf = lesion.fragment
            dh = (t - lesion.t0) * h_mid - mig
            g = 1.0 - (dh / rs) ** 2
            if g > 0:
                cv.poly(
                    ellipse(
                        (xf, p_post + lesion.amp * 0.7 + ra),
                        (1, 0),
                        wlf * math.sqrt(g),
                        ra * math.sqrt(g),
                        22,
                    ),
                    FRAGMENT0 + disc,
                )
    else:
        cv.poly(inset(outline, 1.6), body.marrow_id)
    return cv.labels()
