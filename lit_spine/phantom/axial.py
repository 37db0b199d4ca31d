"""Axial slices of the phantom: a tissue-id map through a disc (or just above / below it).

`render_axial` draws in the disc's frame (x lateral, p posterior of the disc centre), from
the same anatomy as the sagittal slices, one function per structure in painter's order: the
torso (fat, muscle wall, viscera, bowel), paraspinal muscles and psoas, the great (or iliac)
vessels, the canal with thecal sac and roots, facets and ligamenta flava (disc level) or
pedicles (body level), the laminar arch and spinous process, and last the disc with its
nucleus and fragment, or the body with its marrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lit_spine.phantom import anatomy as pa
from lit_spine.phantom.anatomy import Anatomy, Body, lateral_fractions, perp
from lit_spine.phantom.canvas import (
    Canvas,
    ellipse,
    inset,
)


@dataclass
class _Axial:
    """An axial slice through disc `disc` at `height` mm above its centre, and what each
    structure's drawing needs: in the local frame, x is lateral and p posterior of the
    disc centre; `t` is the slice's height as a fraction of the disc (0 lower, 1 upper
    endplate)."""

    anat: Anatomy
    cv: Canvas
    disc: int
    height: float
    t: float
    in_disc: bool  # the slice cuts the disc, not an adjacent body
    h_mid: float  # disc height, mm
    body: Body  # the body cut (or nearest) above or below the disc
    b_index: int
    depth: float  # mean depth of the two bodies, mm
    p_post: float  # p of the posterior body wall
    hw: float  # disc half-width, mm
    cd: float  # canal depth at this level, mm


def render_axial(
    anat: Anatomy, plane, disc: int, height: float, supersample: int = 1
) -> np.ndarray:
    """Tissue-id map of an axial slice through disc `disc`, `height` mm above its centre.

    Local coordinates (x lateral, p posterior of the disc centre) in the disc's frame.
    Structures are drawn in painter's order: later ones cover earlier ones.
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
    depth = 0.5 * (lo.depth + up.depth)
    b_index = disc if t >= 0.5 else disc + 1
    a = _Axial(
        anat,
        cv,
        disc,
        height,
        t,
        in_disc=0.08 < t < 0.92,
        h_mid=h_mid,
        body=up if t >= 0.5 else lo,
        b_index=b_index,
        depth=depth,
        p_post=depth / 2.0,
        hw=anat.disc_half_width(disc),
        cd=anat.canal_depth[min(b_index, len(anat.canal_depth) - 1)],
    )
    _torso(a, c, u, n)
    _muscles(a)
    _vessels(a)
    _canal(a)
    _facets_or_pedicles(a)
    _arch(a)
    _disc_or_body(a)
    return cv.labels()


def _torso(a: _Axial, c: np.ndarray, u: np.ndarray, n: np.ndarray) -> None:
    """Fat, muscle wall and viscera as nested rounded rectangles; bowel loops cut here."""
    anat, cv = a.anat, a.cv
    p_back = a.p_post + a.cd + anat.back_depth + 12
    p_front = -(a.p_post + anat.abdomen_depth)
    tw = 150.0 + 0.35 * anat.abdomen_depth
    pc, pr = 0.5 * (p_back + p_front), 0.5 * (p_back - p_front)
    th = np.linspace(0, 2 * np.pi, 64, endpoint=False)

    def torso(shrink):
        ct, st = np.cos(th), np.sin(th)
        rx = (tw - shrink) * np.sign(ct) * np.abs(ct) ** 0.8
        rp = (pr - shrink) * np.sign(st) * np.abs(st) ** 0.8
        return np.column_stack([rx, pc + rp])

    cv.poly(torso(0), pa.FAT)
    cv.poly(torso(min(anat.back_fat, anat.front_fat) + 2), pa.MUSCLE)
    cv.poly(torso(min(anat.back_fat, anat.front_fat) + 14), pa.VISCERA)
    for bx, ba, bs, br, bt in anat.bowel:
        rel = np.array([ba, bs]) - c
        rr = br * br - (float(rel @ n) - a.height) ** 2
        if rr > 4:
            cv.poly(
                ellipse((bx, -float(rel @ u)), (1, 0), math.sqrt(rr) * 1.2, math.sqrt(rr), 20),
                int(bt),
            )


def _muscles(a: _Axial) -> None:
    """Paraspinal muscles behind the canal and the psoas beside the body, both sides."""
    anat, cv = a.anat, a.cv
    p_back = a.p_post + a.cd + anat.back_depth + 12
    for sgn in (-1, 1):
        m_front, m_back = a.p_post + a.cd - 6.0, p_back - anat.back_fat - 2.0
        cv.poly(
            ellipse(
                (sgn * 27, 0.5 * (m_front + m_back)),
                (1, 0),
                22,
                max(0.5 * (m_back - m_front), 8.0),
                28,
            ),
            pa.MUSCLE,
        )
        ps_r = 6.0 + 3.2 * max(0, a.disc - 1)
        cv.poly(
            ellipse((sgn * (a.hw + ps_r * 0.7), -0.1 * a.depth), (1, 0), ps_r, ps_r * 0.9, 24),
            pa.PSOAS,
        )


def _vessels(a: _Axial) -> None:
    """Aorta and IVC in front of the spine, or the iliac vessels below the bifurcation."""
    for (vx, vr), last in ((a.anat.aorta, 4), (a.anat.ivc, 5)):
        if a.disc <= last:
            a.cv.poly(
                ellipse((vx, -(a.p_post + 3 + vr)), (1, 0), vr, vr * (0.75 if vx < 0 else 1.0), 24),
                pa.VESSEL,
            )
        else:
            for sgn in (-1, 1):
                a.cv.poly(
                    ellipse((sgn * 18 + vx * 0.2, -(a.p_post + 8)), (1, 0), vr * 0.6, vr * 0.6, 18),
                    pa.VESSEL,
                )


def _canal(a: _Axial) -> None:
    """Epidural fat, the thecal sac (dura, CSF) and the roots gathered dorsally in it."""
    anat, cv, p_post, cd = a.anat, a.cv, a.p_post, a.cd
    cw = anat.canal_half_width
    canal = np.array(
        [
            [-cw - 2, p_post - 1],
            [cw + 2, p_post - 1],
            [cw * 0.55, p_post + cd],
            [-cw * 0.55, p_post + cd],
        ]
    )
    cv.poly(canal, pa.EPIDURAL_FAT)
    sac_c = np.array([0.0, p_post + 0.45 * cd])
    cv.poly(ellipse(sac_c, (1, 0), anat.sac_half_width + 0.8, 0.36 * cd + 0.8, 28), pa.LIGAMENT)
    cv.poly(ellipse(sac_c, (1, 0), anat.sac_half_width, 0.36 * cd, 28), pa.CSF)
    for k, fr_r in enumerate(anat.root_fracs):
        for sgn in (-1, 1):
            rx = sgn * (1.5 + 1.6 * k)
            cv.poly(
                ellipse((rx, sac_c[1] + (fr_r - 0.4) * 0.5 * cd), (1, 0), 1.0, 1.0, 8), pa.NERVE
            )


def _facets_or_pedicles(a: _Axial) -> None:
    """At disc level the facet joints and ligamenta flava; at body level the pedicles."""
    cv, p_post, cd = a.cv, a.p_post, a.cd
    cw = a.anat.canal_half_width
    for sgn in (-1, 1):
        fc = np.array([sgn * (cw + 5), p_post + 0.7 * cd])
        if a.in_disc:
            cv.poly(ellipse(fc, (1, 0.6 * sgn), 8, 6, 20), pa.CORTEX)
            cv.poly(ellipse(fc, (1, 0.6 * sgn), 6.5, 4.5, 20), pa.POST_MARROW)
            cv.line(np.array([fc - (2.0, 5.0 * sgn), fc + (2.0, 5.0 * sgn)]), pa.LIGAMENT, 1.0)
            cv.line(
                np.array([[sgn * cw * 0.6, p_post + cd], [sgn * (cw + 1), p_post + 0.5 * cd]]),
                pa.LIGAMENT,
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
            cv.poly(ped, pa.CORTEX)
            cv.poly(inset(ped, 1.5), pa.POST_MARROW)


def _arch(a: _Axial) -> None:
    """The laminar arch behind the canal and, unless low in the disc, the spinous process."""
    anat, cv, p_post, cd = a.anat, a.cv, a.p_post, a.cd
    cw = anat.canal_half_width
    arch = np.array(
        [
            [-cw - 4, p_post + cd - 1],
            [cw + 4, p_post + cd - 1],
            [3.5, p_post + cd + 10],
            [-3.5, p_post + cd + 10],
        ]
    )
    cv.poly(arch, pa.CORTEX)
    cv.poly(inset(arch, 1.4), pa.POST_MARROW)
    if not a.in_disc or a.t > 0.7:
        sp = np.array(
            [
                [-3.5, p_post + cd + 5],
                [3.5, p_post + cd + 5],
                [3.0, p_post + cd + 5 + anat.spinous_length[a.b_index]],
                [-3.0, p_post + cd + 5 + anat.spinous_length[a.b_index]],
            ]
        )
        cv.poly(sp, pa.CORTEX)
        cv.poly(inset(sp, 1.3), pa.POST_MARROW)


def _disc_or_body(a: _Axial) -> None:
    """The disc (annulus, nucleus, a fragment at this height, its posterior bump) or the
    body's cortex and marrow, from the kidney-shaped cross-section."""
    anat, cv, disc, t, depth, p_post, hw = a.anat, a.cv, a.disc, a.t, a.depth, a.p_post, a.hw
    xg = np.linspace(-hw * 0.96, hw * 0.96, 33)
    lesion = anat.discs[disc]
    fr = [lateral_fractions(x, hw) for x in xg]
    if a.in_disc:
        post = np.array(
            [
                p_post - f[0] * depth + float(lesion.bump(x, np.array([t]), hw)[0])
                for x, f in zip(xg, fr)
            ]
        )
    else:
        post = np.array([p_post - f[0] * depth for f in fr])
    ant = np.array([p_post - f[1] * depth - (0.8 if a.in_disc else 0) for f in fr])
    outline = np.vstack([np.column_stack([xg, post]), np.column_stack([xg, ant])[::-1]])
    cv.poly(outline, pa.CORTEX if not a.in_disc else pa.ANNULUS0 + disc)
    if not a.in_disc:
        cv.poly(inset(outline, 1.6), a.body.marrow_id)
        return
    nuc = ellipse((0.0, p_post - 0.45 * depth), (1, 0), 0.45 * hw, 0.28 * depth, 28)
    cv.poly(nuc, pa.NUCLEUS0 + disc)
    if lesion.fragment is not None:
        mig, ra, rs, xf, wlf = lesion.fragment
        dh = (t - lesion.t0) * a.h_mid - mig
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
                pa.FRAGMENT0 + disc,
            )
