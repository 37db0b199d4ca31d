"""Disease labels of a phantom study, sampled before anything is drawn.

The level names (T11 .. L5 bodies, T11-T12 .. L5-S1 discs) and the disc states the phantom
draws; the priors of ``docs/data-format.md`` (disc state marginals per vocabulary, level
risk, age and a per-study degeneration factor, Schmorl's nodes, vertebral degeneration),
calibrated once per vocabulary so that the sampled marginals match the targets; and the
mapping from a drawn disc state to the vocabulary's codes (`disc_codes`). The anatomy
(`anatomy.sample_anatomy`) then draws what these labels say.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lit_spine.data.labels import DISC_POINTS, POINT_NAMES, VERTEBRA_POINTS, get_vocabulary

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
