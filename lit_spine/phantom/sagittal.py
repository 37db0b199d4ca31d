"""Sagittal slices of the phantom: a tissue-id map drawn one structure at a time.

`render_sagittal` lifts the slice's 2-D (a, s) points to the anatomy frame (an oblique slice
has a different lateral x at every point) and draws, in painter's order, one function per
structure: the torso (fat, muscle, fasciae, viscera, bowel), the great vessels, the canal
(epidural fat), the thecal sac with CSF, cord and cauda equina roots, the posterior elements
(spinous processes, laminae, facets, pedicles, exiting roots), the vertebral bodies with
their degenerative signs, Schmorl's nodes, the discs with their lesions and the rudimentary
sacral discs. The thecal sac, cord and roots follow the slice's lateral offset level by level.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from lit_spine.phantom import anatomy as pa
from lit_spine.phantom.anatomy import Anatomy, lateral_fractions, perp, unit
from lit_spine.phantom.canvas import (
    Canvas,
    ellipse,
    extend_chain,
    inset,
    offset_line,
    process_outline,
    spine_lines,
    true_runs,
)


def _lateral_x(n_a: np.ndarray, o_a: np.ndarray, pts) -> np.ndarray:
    """Lateral x of the slice (normal `n_a`, centre `o_a`, anatomy frame) at (a, s) points."""
    pts = np.atleast_2d(pts)
    return o_a[0] - (n_a[1] * (pts[:, 0] - o_a[1]) + n_a[2] * (pts[:, 1] - o_a[2])) / n_a[0]


@dataclass
class _Slice:
    """What every structure's drawing needs: the canvas, the lateral x of any (a, s) point,
    and the posterior-corner chain of the bodies (bottom up, from S4) with its directions."""

    anat: Anatomy
    cv: Canvas
    x_at: Callable[[np.ndarray], np.ndarray]  # lateral x of the slice at (a, s) points
    xs: np.ndarray  # lateral x at each body centre
    post: np.ndarray  # posterior corners (pi, ps) per body, bottom up
    pdir: np.ndarray  # posterior direction at each corner
    canal: np.ndarray  # canal depth at each corner


def render_sagittal(anat: Anatomy, plane, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Tissue-id map of a sagittal slice, and the lateral x at each body centre.

    The map has (rows, cols) x `supersample` pixels (sub-pixel centres symmetric inside each
    output pixel), so that averaging the signal of s x s blocks gives partial-volume edges.
    Structures are drawn in painter's order: later ones cover earlier ones.
    """
    rot_r = anat.rotation.T
    x_at = partial(
        _lateral_x,
        rot_r @ np.cross(plane.row_dir, plane.col_dir),
        rot_r @ (plane.centre - anat.translation),
    )
    cv = Canvas(anat, plane, lambda pts: np.column_stack([x_at(pts), pts]), supersample)
    xs = x_at(np.array([b.centre for b in anat.bodies]))
    s = _Slice(anat, cv, x_at, xs, *spine_lines(anat))
    _torso(s)
    _great_vessels(s)
    _epidural_fat(s)
    sac = _thecal_sac(s)
    if sac is not None:
        _cord(s)
        _cauda_equina(s, *sac)
    _posterior_elements(s)
    for b, body in enumerate(anat.bodies):
        _vertebral_body(s, body, float(s.xs[b]))
    _schmorl_nodes(s)
    for d in range(7):
        _disc(s, d)
    _sacral_discs(s)
    return s.cv.labels(), s.xs


def _torso(s: _Slice) -> None:
    """Fat envelope, muscle / abdominal wall with fasciae, viscera and bowel loops."""
    anat, cv, bodies, canal = s.anat, s.cv, s.anat.bodies, s.canal
    centres = np.array([b.centre for b in bodies[::-1]])
    cdir = np.array([-b.u for b in bodies[::-1]])
    depths = np.array([b.depth for b in bodies[::-1]])
    cext, dext = extend_chain(centres), np.vstack([cdir[:1], cdir, cdir[-1:]])
    dep = np.concatenate([[depths[0]], depths, [depths[-1]]])
    can = np.concatenate([[canal[0]], canal[::2], [canal[-1]]])
    back = offset_line(cext, dext, 0.5 * dep + can + anat.back_depth + 12)
    front = offset_line(cext, dext, -(0.5 * dep + anat.abdomen_depth))
    cv.poly(np.vstack([back, front[::-1]]), pa.FAT)
    # Subcutaneous fat thickness varies smoothly along the back (thicker low down).
    k = np.linspace(0.0, 1.0, len(cext))
    wave = 1.0 + 0.18 * np.sin(2.5 * np.pi * k + anat.back_depth) + 0.15 * (k - 0.5)
    back_in = offset_line(cext, dext, 0.5 * dep + can + anat.back_depth + 12 - anat.back_fat * wave)
    front_in = offset_line(
        cext, dext, -(0.5 * dep + anat.abdomen_depth - anat.front_fat * wave[::-1])
    )
    cv.poly(np.vstack([back_in, front_in[::-1]]), pa.MUSCLE)
    # Fasciae: thin dark lines at the fat / muscle interfaces.
    cv.line(back_in, pa.LIGAMENT, 0.8)
    cv.line(front_in, pa.LIGAMENT, 0.8)
    cv.line(
        offset_line(
            cext, dext, 0.5 * dep + can + anat.back_depth + 12 - 0.45 * anat.back_fat * wave
        ),
        pa.LIGAMENT,
        0.5,
    )
    front_v = offset_line(cext, dext, -(0.5 * dep + anat.abdomen_depth - anat.front_fat - 12))
    ant_spine = offset_line(cext, dext, -(0.5 * dep + 1.5))
    cv.poly(np.vstack([ant_spine, front_v[::-1]]), pa.VISCERA)
    for bx, ba, bs, br, bt in anat.bowel:
        xm = float(s.x_at(np.array([[ba, bs]]))[0])
        rr = br * br - (xm - bx) ** 2
        if rr > 4:
            cv.poly(ellipse((ba, bs), (1, 0), math.sqrt(rr), math.sqrt(rr) * 1.3, 20), int(bt))


def _great_vessels(s: _Slice) -> None:
    """Aorta (down to L4) and inferior vena cava (to L5) in front of the bodies."""
    anat, bodies = s.anat, s.anat.bodies
    for (vx, vr), last in ((anat.aorta, 5), (anat.ivc, 6)):
        xm = float(s.xs[3])
        w = vr * vr - (xm - vx) ** 2
        if w > 1:
            half = math.sqrt(w)
            cen = np.array([b.centre for b in bodies[: last + 1]])
            dd = np.array([-b.u for b in bodies[: last + 1]])
            dpt = np.array([b.depth for b in bodies[: last + 1]])
            near = offset_line(cen, dd, -(0.5 * dpt + 3 + vr - half))
            far = offset_line(cen, dd, -(0.5 * dpt + 3 + vr + half))
            top = near[0] - 80 * unit(cen[1] - cen[0])
            near = np.vstack([top, near])
            far = np.vstack([far[0] - 80 * unit(cen[1] - cen[0]), far])
            s.cv.poly(np.vstack([near, far[::-1]]), pa.VESSEL)


def _epidural_fat(s: _Slice) -> None:
    """The canal filled with epidural fat (neural foramina laterally)."""
    post, pdir, canal = s.post, s.pdir, s.canal
    post_ext = extend_chain(post, 40)
    pdir_e = np.vstack([pdir[:1], pdir, pdir[-1:]])
    canal_e = np.concatenate([[canal[0]], canal, [canal[-1]]])
    # Epidural fat starts 2 mm inside the bodies so that the concave posterior body walls
    # (drawn later) leave no gap of muscle between body and canal.
    s.cv.poly(
        np.vstack(
            [offset_line(post_ext, pdir_e, -2.0), offset_line(post_ext, pdir_e, canal_e)[::-1]]
        ),
        pa.EPIDURAL_FAT,
    )


# `post` holds (pi, ps) pairs bottom-up from S4; the dural sac ends at S2 (pairs from 4).
_SAC_FROM = 4


def _thecal_sac(s: _Slice) -> tuple[np.ndarray, np.ndarray] | None:
    """Dura and CSF of the thecal sac; its (mid, half) depths per level, None if not cut.

    An oblique slice cuts the round sac (and the cord) off-centre by a different lateral x
    at every level, so their sagittal width follows the plane's x point by point.
    """
    post, pdir, canal = s.post, s.pdir, s.canal
    sp = extend_chain(post[_SAC_FROM:], 40)[1:]
    sd = np.vstack([pdir[_SAC_FROM:], pdir[-1:]])
    sc = np.concatenate([canal[_SAC_FROM:], canal[-1:]])
    sac_q = np.clip(1.0 - (s.x_at(sp) / s.anat.sac_half_width) ** 2, 0.0, 1.0)
    if sac_q.max() <= 0.02:
        return None
    mid = 0.5 * sc * 0.92
    half = 0.5 * (sc - 3.0) * np.sqrt(sac_q)
    front_s = offset_line(sp, sd, mid - half + 0.5 * np.sqrt(sac_q))
    back_s = offset_line(sp, sd, mid + half - 1.0 * np.sqrt(sac_q))
    tip = 0.5 * (front_s[1] + back_s[1]) - 6.0 * unit(front_s[2] - front_s[1])
    s.cv.poly(np.vstack([tip, front_s[1:], back_s[1:][::-1]]), pa.LIGAMENT)
    inner = np.maximum(half - 1.1, 0.0)
    s.cv.poly(
        np.vstack(
            [
                tip,
                offset_line(sp, sd, mid - inner)[1:],
                offset_line(sp, sd, mid + inner - 0.3)[1:][::-1],
            ]
        ),
        pa.CSF,
    )
    return mid, half


def _cord(s: _Slice) -> None:
    """Spinal cord tapering into the conus medullaris (at L1 / L1-L2)."""
    post, pdir, canal = s.post, s.pdir, s.canal
    l1 = s.anat.bodies[2]
    conus = l1.pi - (s.anat.cord_end * 8.0) * unit(l1.ps - l1.pi)
    upper, up_d = extend_chain(post[-6:], 40)[1:], np.vstack([pdir[-6:], pdir[-1:]])
    up_c = np.concatenate([canal[-6:], canal[-1:]])
    cord_q = np.clip(1.0 - (s.x_at(upper) / 5.5) ** 2, 0.0, 1.0)
    if cord_q.max() > 0.05:
        cmid = offset_line(upper, up_d, 0.48 * up_c)
        cw = 3.6 * np.sqrt(cord_q)
        cw[:2] *= 0.75  # the conus medullaris narrows
        tip_c = conus + 0.5 * canal[-6] * pdir[-6]
        s.cv.poly(
            np.vstack(
                [
                    tip_c,
                    offset_line(cmid[1:], up_d[1:], -cw[1:] + 0.3),
                    offset_line(cmid[1:], up_d[1:], cw[1:])[::-1],
                ]
            ),
            pa.NERVE,
        )


def _cauda_equina(s: _Slice, mid: np.ndarray, half: np.ndarray) -> None:
    """Below the conus: thin roots gathered dorsally in the sac, spreading towards the sacrum."""
    post, pdir = s.post, s.pdir
    n_roots = len(post) - 5 - (_SAC_FROM + 1)
    if n_roots > 1:
        sl = slice(_SAC_FROM + 1, _SAC_FROM + 1 + n_roots)
        rp, rd = post[sl], pdir[sl]
        r_mid, r_half = mid[1 : n_roots + 1], half[1 : n_roots + 1]
        ok = np.abs(s.x_at(rp)) < s.anat.sac_half_width * 0.85
        for fr in s.anat.root_fracs:
            line = offset_line(rp, rd, r_mid - r_half + 2 * fr * r_half)
            for run in true_runs(ok):
                if run.stop - run.start > 1:
                    s.cv.line(line[run], pa.NERVE, 0.7)


def _posterior_elements(s: _Slice) -> None:
    """Per vertebra: spinous process in the midline, laminae / facets and pedicles lateral."""
    anat, cv = s.anat, s.cv
    for b, body in enumerate(anat.bodies[:9]):
        x = float(s.xs[b])
        ax = abs(x)
        pd = -body.u
        nb = unit(body.ps - body.pi)
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
        down = unit(pd - 0.35 * nb)
        tip_h = 0.35 * float(np.linalg.norm(top - bot))
        tip_c = 0.5 * (top + bot) + length * down
        if ax >= 4.5 and b < 7:  # facet pillar spans into the disc level below
            bot = bot - 6.0 * nb
            tip_c = 0.5 * (top + bot) + length * pd
            tip_h = 0.45 * float(np.linalg.norm(top - bot))
        poly = process_outline(top, bot, tip_c, tip_h, nb, club=ax < 4.5 and b < 7)
        cv.poly(poly, pa.CORTEX)
        cv.poly(inset(poly, 1.5), pa.POST_MARROW)
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
            cv.poly(ped, pa.CORTEX)
            cv.poly(inset(ped, 1.3), pa.POST_MARROW)
            root_c = body.pi - 3.5 * nb + 0.45 * cd * pd
            cv.poly(ellipse(root_c, nb, 3.0, 2.5, 14), pa.NERVE)


def _vertebral_body(s: _Slice, body, x: float) -> None:
    """Cortex and marrow of one body at lateral `x`, with its Modic bands and osteophytes."""
    out = body.outline(x)
    if out is None:
        return
    s.cv.poly(out, pa.CORTEX)
    marrow = inset(out, 1.6 + body.signs.sclerosis)
    s.cv.poly(marrow, body.marrow_id)
    fr = lateral_fractions(x, body.half_width)
    if fr is None:
        return
    if body.signs.modic_type:
        _modic_bands(s.cv, body, fr)
    if any(o > 0.3 for o in body.signs.osteophytes):
        _osteophytes(s.cv, body, x, fr)


def _modic_bands(cv: Canvas, body, fr: tuple[float, float]) -> None:
    """Bands of Modic signal under the superior and / or inferior endplate."""
    sg = body.signs
    for which, thick in (("sup", sg.modic_sup), ("inf", sg.modic_inf)):
        if thick <= 0:
            continue
        ep = body.endplate(which, fr[0] + 0.08, fr[1] - 0.06, n=7)
        inward = -perp(body.u) if which == "sup" else perp(body.u)
        band = np.vstack(
            [
                offset_line(ep, np.repeat(inward[None], 7, 0), 1.6 + sg.sclerosis),
                offset_line(ep, np.repeat(inward[None], 7, 0), thick)[::-1],
            ]
        )
        cv.poly(band, body.modic_id)


def _osteophytes(cv: Canvas, body, x: float, fr: tuple[float, float]) -> None:
    """Beaks at the body's four corners, smaller off the midline."""
    nb = unit(body.ps - body.pi)
    lat = math.sqrt(max(0.0, 1.0 - (x / body.half_width) ** 2))
    corners = (
        (body.endplate("sup", fr[1], fr[1], 1)[0], body.u, nb),
        (body.endplate("inf", fr[1], fr[1], 1)[0], body.u, -nb),
        (body.endplate("sup", fr[0], fr[0], 1)[0], -body.u, nb),
        (body.endplate("inf", fr[0], fr[0], 1)[0], -body.u, -nb),
    )
    for size, (corner, outward, vert) in zip(body.signs.osteophytes, corners):
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
        cv.poly(beak, pa.CORTEX)
        if size > 2.5:
            cv.poly(inset(beak, 1.0), body.marrow_id)


def _schmorl_nodes(s: _Slice) -> None:
    """Notches in the endplates, drawn before the discs so the disc covers the part of the
    rim outside the body and the notch opens into it."""
    anat, cv, bodies = s.anat, s.cv, s.anat.bodies
    for d in range(7):
        lesion = anat.discs[d]
        x = 0.5 * float(s.xs[d] + s.xs[d + 1])
        if lesion.schmorl is None:
            continue
        side, f, dep, w, xs_, wls = lesion.schmorl
        g = 1.0 - ((x - xs_) / wls) ** 2
        body = bodies[d] if side == "up" else bodies[d + 1]
        frb = lateral_fractions(x, body.half_width)
        if g > 0 and frb is not None:
            which = "inf" if side == "up" else "sup"
            ep = body.endplate(which, f, f, n=1)[0]
            inward = perp(body.u) if which == "inf" else -perp(body.u)
            c = ep + 0.15 * dep * inward
            cv.poly(
                ellipse(c, inward, dep * math.sqrt(g) + 1.2, 0.5 * w * math.sqrt(g) + 1.0, 20),
                pa.CORTEX,
            )
            cv.poly(
                ellipse(c, inward, dep * math.sqrt(g), 0.5 * w * math.sqrt(g), 20), pa.NUCLEUS0 + d
            )
            cv.poly(
                ellipse(c - 1.5 * inward, inward, dep * 0.5, 0.5 * w * math.sqrt(g) + 0.3, 16),
                pa.ANNULUS0 + d if lesion.nucleus_t2 < 0.4 else pa.NUCLEUS0 + d,
            )


def _disc(s: _Slice, d: int) -> None:
    """Disc `d`: annulus, nucleus (irregular when degenerated), cleft, extruded fragment."""
    anat, cv = s.anat, s.cv
    lesion = anat.discs[d]
    x = 0.5 * float(s.xs[d] + s.xs[d + 1])
    out = anat.disc_outline(d, x)
    if out is None:
        return
    cv.poly(out, pa.ANNULUS0 + d)
    lp, la, up, ua = anat.disc_corners(d, x)
    u = anat.disc_u(d)
    h = 0.5 * float(np.linalg.norm(up - lp) + np.linalg.norm(ua - la))
    depth = 0.5 * float(np.linalg.norm(la - lp) + np.linalg.norm(ua - up))
    centre = (lp + la + up + ua) / 4.0 - 0.06 * depth * u
    nuc = ellipse(centre, u, 0.36 * depth, 0.34 * h, 24)
    if lesion.irregular:
        jit = 1 + lesion.irregular * np.sin(np.arange(24) * 2.3 + d) * 0.35
        nuc = centre + (nuc - centre) * jit[:, None]
    cv.poly(nuc, pa.NUCLEUS0 + d)
    if lesion.cleft:
        cv.line(
            np.array([centre - 0.25 * depth * u, centre + 0.28 * depth * u]), pa.ANNULUS0 + d, 0.7
        )
    if lesion.fragment is not None:
        _fragment(cv, lesion, d, x, lp, up, u)


def _fragment(cv: Canvas, lesion, d: int, x: float, lp, up, u) -> None:
    """An extruded fragment: a narrow neck through the annulus, then the wider dome (possibly
    migrated up or down)."""
    n = perp(u)
    mig, ra, rs, xf, wlf = lesion.fragment
    g = 1.0 - ((x - xf) / wlf) ** 2
    if g <= 0:
        return
    base = lp + lesion.t0 * (up - lp)
    fc = base - (lesion.amp * 0.7 + ra) * u + mig * n
    neck = np.array(
        [
            base + 1.0 * u - 1.6 * n,
            base - (lesion.amp + 0.5) * u - 1.6 * n,
            fc + 0.5 * u,
            base - (lesion.amp + 0.5) * u + 1.6 * n,
            base + 1.0 * u + 1.6 * n,
        ]
    )
    cv.poly(neck, pa.FRAGMENT0 + d)
    cv.poly(ellipse(fc, u, ra * math.sqrt(g), rs * math.sqrt(g), 22), pa.FRAGMENT0 + d)


def _sacral_discs(s: _Slice) -> None:
    """Rudimentary sacral discs: thin dark gaps between the fused segments."""
    bodies = s.anat.bodies
    for k in range(7, len(bodies) - 1):
        up, lo = bodies[k], bodies[k + 1]
        s.cv.line(np.array([0.5 * (up.pi + lo.ps), 0.5 * (up.ai + lo.as_)]), pa.LIGAMENT, 1.5)
