"""Axial slices of the phantom: a tissue-id map through a disc (or just above / below it).

`render_axial` draws in the disc's frame (x lateral, p posterior of the disc centre): the
torso, psoas and paraspinal muscles, vessels, the disc or the body it cuts, the canal with
thecal sac and roots, facets and laminae, from the same anatomy as the sagittal slices.
"""

from __future__ import annotations

import math

import numpy as np

from lit_spine.phantom.anatomy import (
    ANNULUS0,
    CORTEX,
    CSF,
    EPIDURAL_FAT,
    FAT,
    FRAGMENT0,
    LIGAMENT,
    MUSCLE,
    NERVE,
    NUCLEUS0,
    POST_MARROW,
    PSOAS,
    VESSEL,
    VISCERA,
    Anatomy,
    lateral_fractions,
    perp,
)
from lit_spine.phantom.canvas import (
    Canvas,
    ellipse,
    inset,
)


def render_axial(
    anat: Anatomy, plane, disc: int, height: float, supersample: int = 1
) -> np.ndarray:
    """Tissue-id map of an axial slice through disc `disc`, `height` mm above its centre.

    Local coordinates (x lateral, p posterior of the disc centre) in the disc's frame.
    """
    u = anat.disc_u(disc)
    n = perp(u)
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
