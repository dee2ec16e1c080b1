"""Synthetic colour fundus photographs (45-degree field) with lesion masks.

Geometry in disc diameters (DD): field ~6.4 DD wide, fovea 2.65 DD temporal to the disc and slightly lower.
Convention (clinical photographs): a right eye (OD) shows its disc right of the fovea, a left eye (OS) left of it.
Random streams: anatomy, camera and lesions come from separate generators, so one seed gives the same eye and the same
camera look whatever the label; only the lesions change.
"""

from __future__ import annotations

import copy
import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..labels import DR_GRADES
from ..modality import Modality
from ._common import (Phantom, merge_patient, sample_patient, smooth_noise, smoothstep, streams, to_jsonable,
                      wrap_angle)

FUNDUS_LABELS = tuple(DR_GRADES) + ("normal", "glaucoma", "cataract", "amd", "diabetic_retinopathy")

_ALIASES = {
    "no_dr": "No DR", "nodr": "No DR", "0": "No DR", "1": "Mild", "2": "Moderate", "3": "Severe",
    "4": "Proliferative DR", "proliferative": "Proliferative DR", "proliferative_dr": "Proliferative DR",
    "dr": "diabetic_retinopathy", "healthy": "normal",
}


def canonical_fundus_label(label) -> str:
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < len(DR_GRADES):
            return DR_GRADES[int(label)]
        raise ValueError(f"DR grade out of range: {label}")
    s = str(label).strip()
    for cand in FUNDUS_LABELS:
        if s.lower() == cand.lower():
            return cand
    key = s.lower().replace(" ", "_")
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"unknown fundus phantom label {label!r}; expected one of {FUNDUS_LABELS}")


def _family(label: str) -> str:
    if label in ("No DR", "normal"):
        return "normal"
    if label in DR_GRADES or label == "diabetic_retinopathy":
        return "dr"
    return label


# --------------------------------------------------------------------------------------------------- vessel tree

class _Ctx:
    pass


def _grow_tree(rng: np.random.Generator, ctx: _Ctx, seeds: list[dict]) -> list[dict]:
    """Grow vessels by steered random walks with Murray-law bifurcations. Returns list of vessel dicts."""
    out = []
    stack = list(seeds)
    fx, fy = ctx.fovea
    dxd, dyd = ctx.disc
    cx, cy = ctx.centre
    DD = ctx.DD
    ux, uy = ctx.axis  # unit vector disc -> fovea
    nx, ny = -uy, ux
    dist_df = ctx.dist_df
    R2 = (ctx.R * 1.02) ** 2
    W = ctx.size
    while stack and len(out) < ctx.max_vessels:
        v = stack.pop()
        x, y = v["p"]
        th = v["theta"]
        w = v["w"]
        kind = v["kind"]
        mode = v["mode"]
        gen = v["gen"]
        step = ctx.step
        max_steps = int(v["length"] / step)
        if max_steps < 2:
            continue
        noise = rng.normal(0.0, 1.0, max_steps)
        murray = 2.6 if kind == "a" else 2.0
        spacing = ctx.branch_spacing * (1.45 ** gen)
        next_branch = spacing * rng.uniform(0.3, 1.3)
        since = 0.0
        kappa = 0.0
        side_b = 1.0 if rng.random() < 0.5 else -1.0
        wig = ctx.wiggle * (0.4 + 1.2 / (1.0 + w / ctx.s512 / 1.5))
        # side of the horizontal raphe this vessel starts on
        b0 = (x - dxd) * nx + (y - dyd) * ny
        raphe_side = 1.0 if b0 >= 0 else -1.0
        orient = v.get("orient", 1.0)
        r_arc = v.get("r_arc", 2.0 * DD)
        xs = [x]
        ys = [y]
        ws = [w]
        for i in range(max_steps):
            dxf, dyf = x - fx, y - fy
            rf = math.hypot(dxf, dyf) + 1e-6
            if rf < ctx.avoid:
                break
            ddx, ddy = 0.0, 0.0
            gain = 0.0
            if mode == "arcade":
                rx_, ry_ = dxf / rf, dyf / rf
                tx, ty = -ry_ * orient, rx_ * orient
                phi = abs(wrap_angle(math.atan2(dyf, dxf) - ctx.disc_angle))
                r_t = dist_df + (r_arc - dist_df) * min(1.0, phi / (0.5 * math.pi))
                k = 1.4 * (rf - r_t) / DD
                ddx, ddy = tx - k * rx_, ty - k * ry_
                gain = 0.35
            elif mode == "radial":
                ex, ey = x - dxd, y - dyd
                n = math.hypot(ex, ey) + 1e-6
                ddx, ddy = ex / n + 0.6 * math.cos(th), ey / n + 0.6 * math.sin(th)
                gain = 0.12
            else:  # free: keep heading, mild outward drift from the disc
                ex, ey = x - dxd, y - dyd
                n = math.hypot(ex, ey) + 1e-6
                ddx, ddy = math.cos(th) + 0.25 * ex / n, math.sin(th) + 0.25 * ey / n
                gain = 0.1
            if rf < 1.1 * DD:  # nothing large crosses the fovea
                rep = (1.1 * DD - rf) / DD * 3.0
                ddx += rep * dxf / rf
                ddy += rep * dyf / rf
                gain = max(gain, 0.25)
            if gain > 0.0:
                tth = math.atan2(ddy, ddx)
                th += gain * wrap_angle(tth - th)
            kappa = 0.75 * kappa + wig * noise[i]
            th += kappa
            x += step * math.cos(th)
            y += step * math.sin(th)
            w *= ctx.taper
            # temporal raphe: vessels beyond the fovea do not cross the disc-fovea line
            a = (x - dxd) * ux + (y - dyd) * uy
            if a > dist_df - 0.3 * DD:
                b = (x - dxd) * nx + (y - dyd) * ny
                if b * raphe_side < 0.15 * DD:
                    break
            xs.append(x)
            ys.append(y)
            ws.append(w)
            if (x - cx) ** 2 + (y - cy) ** 2 > R2 or x < -5 or y < -5 or x > W + 5 or y > W + 5:
                break
            if w < ctx.wmin:
                break
            since += step
            if since >= next_branch and gen < ctx.maxgen:
                since = 0.0
                next_branch = spacing * rng.uniform(0.6, 1.4)
                wc = w * rng.uniform(0.55, 0.85)
                if wc >= ctx.wmin:
                    side_b = -side_b if rng.random() < 0.75 else side_b
                    ang = math.radians(rng.uniform(40, 80))
                    wp = (w ** murray - wc ** murray) ** (1.0 / murray)
                    w = max(wp, wc)
                    th -= side_b * math.radians(rng.uniform(5, 18))
                    child_len = v["length"] * rng.uniform(0.35, 0.6)
                    stack.append({"p": (x, y), "theta": th + side_b * ang, "w": wc, "kind": kind,
                                  "mode": "free", "gen": gen + 1, "length": child_len})
        if len(xs) >= 2:
            out.append({"x": np.array(xs, np.float32), "y": np.array(ys, np.float32),
                        "w": np.array(ws, np.float32), "kind": kind, "gen": gen, "quadrant": v.get("quadrant")})
    return out


def _vessel_seeds(rng, ctx) -> list[dict]:
    DD = ctx.DD
    dxd, dyd = ctx.disc
    nasal = ctx.nasal
    seeds = []
    w_v = ctx.vein_w * rng.uniform(0.9, 1.1)
    w_a = w_v * rng.uniform(0.67, 0.78)
    base_len = 10.0 * DD
    for sup in (-1.0, 1.0):  # -1 = superior (up, smaller y)
        quad_t = ("ST" if sup < 0 else "IT")
        quad_n = ("SN" if sup < 0 else "IN")
        # orientation of the arcade around the fovea: start heading vertically away from the raphe
        for kind, w in (("v", w_v), ("a", w_a)):
            off = rng.normal(0, 0.08) * DD
            p = (dxd + off, dyd + sup * rng.uniform(0.05, 0.25) * ctx.rd)
            theta = math.atan2(sup, -nasal * rng.uniform(0.05, 0.35))
            # orient sign: tangent (-ry, rx)*orient should point towards sup at the disc
            rx_, ry_ = (dxd - ctx.fovea[0]), (dyd - ctx.fovea[1])
            n = math.hypot(rx_, ry_)
            rx_, ry_ = rx_ / n, ry_ / n
            # tangent (-ry, rx)*orient has y component rx*orient; want its sign == sup
            orient = 1.0 if rx_ * sup > 0 else -1.0
            r_arc = rng.uniform(1.75, 2.3) * DD + (0.12 * DD if kind == "v" else 0.0)
            seeds.append({"p": p, "theta": theta, "w": w * rng.uniform(0.93, 1.07), "kind": kind, "mode": "arcade",
                          "gen": 0, "length": base_len * rng.uniform(0.9, 1.1), "orient": orient, "r_arc": r_arc,
                          "quadrant": quad_t})
            # nasal trunk
            ang = math.radians(rng.uniform(35, 70))
            theta_n = math.atan2(sup * math.sin(ang), nasal * math.cos(ang))
            seeds.append({"p": (dxd + rng.normal(0, 0.05) * DD, dyd + sup * 0.1 * ctx.rd), "theta": theta_n,
                          "w": w * rng.uniform(0.6, 0.8), "kind": kind, "mode": "radial", "gen": 0,
                          "length": 5.0 * DD, "quadrant": quad_n})
    # small papillomacular and nasal vessels
    for _ in range(int(rng.integers(2, 5))):
        kind = "a" if rng.random() < 0.5 else "v"
        tgt = math.atan2(ctx.fovea[1] - dyd, ctx.fovea[0] - dxd) + rng.normal(0, 0.35)
        seeds.append({"p": (dxd - nasal * 0.4 * ctx.rd, dyd + rng.normal(0, 0.4) * ctx.rd), "theta": tgt,
                      "w": w_v * rng.uniform(0.25, 0.4), "kind": kind, "mode": "free", "gen": 2,
                      "length": 2.6 * DD, "quadrant": None})
    for _ in range(int(rng.integers(1, 3))):
        kind = "a" if rng.random() < 0.5 else "v"
        tgt = math.atan2(rng.normal(0, 0.5), nasal)
        seeds.append({"p": (dxd + nasal * 0.4 * ctx.rd, dyd), "theta": tgt, "w": w_v * rng.uniform(0.3, 0.45),
                      "kind": kind, "mode": "radial", "gen": 2, "length": 4.0 * DD, "quadrant": None})
    return seeds


def _draw_polylines(size: int, lines: list[tuple[np.ndarray, np.ndarray, np.ndarray]], ss: int = 2,
                    wscale: float = 1.0, wadd: float = 0.0) -> np.ndarray:
    """Rasterise polylines with per-point width (px at 1x) by supersampling; returns float32 coverage [0,1]."""
    im = Image.new("L", (size * ss, size * ss), 0)
    dr = ImageDraw.Draw(im)
    for line in lines:
        xs, ys, ws = line[:3]
        fill = int(255 * line[3]) if len(line) > 3 else 255
        n = len(xs)
        if n < 2:
            continue
        wpx = np.maximum(1, np.rint((ws * wscale + wadd) * ss)).astype(int)
        X = (xs * ss).tolist()
        Y = (ys * ss).tolist()
        start = 0
        while start < n - 1:
            wi = int(wpx[start])
            end = start + 1
            while end < n - 1 and wpx[end] == wi:
                end += 1
            pts = list(zip(X[start:end + 1], Y[start:end + 1]))
            dr.line(pts, fill=fill, width=wi, joint="curve")
            start = end
    if ss > 1:
        im = im.reduce(ss)
    return np.asarray(im, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------------------------------- lesions

class _Canvas:
    """Float RGB image plus lesion masks; lesion blobs are drawn in small local windows (fast)."""

    def __init__(self, img: np.ndarray):
        self.img = img
        self.h, self.w = img.shape[:2]
        self.masks: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def mask(self, name: str) -> np.ndarray:
        if name not in self.masks:
            self.masks[name] = np.zeros((self.h, self.w), bool)
        return self.masks[name]

    def blob(self, rng, name, x0, y0, rx, ry, ang=0.0, soft=0.8, irreg=0.0, mode="mult", colour=(1, 1, 1),
             strength=1.0, mask_thr=0.5, count=True):
        pad = max(rx, ry) * (1.0 + 2 * irreg) + 2.5 * soft + 2
        xl, xh = int(max(0, math.floor(x0 - pad))), int(min(self.w, math.ceil(x0 + pad) + 1))
        yl, yh = int(max(0, math.floor(y0 - pad))), int(min(self.h, math.ceil(y0 + pad) + 1))
        if xl >= xh or yl >= yh:
            return None
        yy, xx = np.mgrid[yl:yh, xl:xh].astype(np.float32)
        dx, dy = xx + 0.5 - x0, yy + 0.5 - y0
        c, s = math.cos(ang), math.sin(ang)
        u, v = c * dx + s * dy, -s * dx + c * dy
        d = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
        if irreg > 0:
            t = np.arctan2(v / ry, u / rx)
            mod = 1.0
            for k in (2, 3, 5):
                mod = mod + irreg / k * rng.uniform(0.3, 1.0) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
            d = d / np.maximum(mod, 0.3)
        rad = 0.5 * (rx + ry)
        dist_px = (d - 1.0) * rad
        alpha = np.clip(0.5 - dist_px / max(soft, 0.35), 0.0, 1.0)
        if soft > 1.5:  # fluffy: smooth profile
            alpha = alpha * alpha * (3 - 2 * alpha)
        alpha = (alpha * strength).astype(np.float32)
        sl = (slice(yl, yh), slice(xl, xh))
        self.apply(sl, alpha, mode, colour)
        if name:
            m = self.mask(name)
            m[sl] |= alpha >= mask_thr * strength
            if count:
                self.counts[name] = self.counts.get(name, 0) + 1
        return sl, alpha

    def apply(self, sl, alpha, mode, colour):
        a = alpha[..., None]
        col = np.asarray(colour, np.float32)
        patch = self.img[sl]
        if mode == "mult":  # absorbing (red lesions): multiply towards colour factors
            self.img[sl] = patch * (1.0 - a * (1.0 - col))
        else:  # blend towards an absolute colour (exudates, cotton wool, drusen)
            self.img[sl] = patch + a * (col - patch)


def _polar_point(rng, ctx, centre, r_lo, r_hi, ang=None):
    for _ in range(50):
        r = rng.uniform(r_lo, r_hi)
        a = rng.uniform(0, 2 * math.pi) if ang is None else ang + rng.normal(0, 0.5)
        x, y = centre[0] + r * math.cos(a), centre[1] + r * math.sin(a)
        if _valid(ctx, x, y):
            return x, y
    return None


def _valid(ctx, x, y, margin=0.92):
    if (x - ctx.centre[0]) ** 2 + (y - ctx.centre[1]) ** 2 > (ctx.R * margin) ** 2:
        return False
    if not (2 <= x < ctx.size - 2 and 2 <= y < ctx.size - 2):
        return False
    if (x - ctx.disc[0]) ** 2 + (y - ctx.disc[1]) ** 2 < (1.15 * ctx.rd) ** 2:
        return False
    return True


def _quadrant_point(rng, ctx, quad: str, r_lo=0.6, r_hi=4.0):
    """Point in a retinal quadrant (S/I by the disc-fovea line; T/N by the disc), r in DD from the disc-fovea
    midpoint."""
    mx, my = ctx.mid
    for _ in range(60):
        r = rng.uniform(r_lo, r_hi) * ctx.DD
        a = rng.uniform(0, 2 * math.pi)
        x, y = mx + r * math.cos(a), my + r * math.sin(a)
        if not _valid(ctx, x, y):
            continue
        if _quadrant(ctx, x, y) == quad:
            return x, y
    return None


def _quadrant(ctx, x, y) -> str:
    ux, uy = ctx.axis
    a = (x - ctx.disc[0]) * ux + (y - ctx.disc[1]) * uy
    b = (x - ctx.disc[0]) * (-uy) + (y - ctx.disc[1]) * ux
    # perpendicular (-uy, ux): its y-component is ux; superior = smaller y
    sup = (b * ux) < 0
    temporal = a > 0
    return ("S" if sup else "I") + ("T" if temporal else "N")


HAEM = (0.6, 0.3, 0.36)
MA = (0.6, 0.3, 0.36)


def _microaneurysm(cv, rng, ctx, x, y):
    r = max(0.9, rng.uniform(1.3, 2.4) * ctx.s512)
    cv.blob(rng, "microaneurysm", x, y, r, r * rng.uniform(0.85, 1.0), soft=0.6, colour=MA, mask_thr=0.4)


def _haemorrhage(cv, rng, ctx, x, y, big=False):
    DD = ctx.DD
    if rng.random() < 0.3:  # flame: elongated along the nerve fibres (radial from the disc)
        ang = math.atan2(y - ctx.disc[1], x - ctx.disc[0])
        L = rng.uniform(0.12, 0.3) * DD
        cv.blob(rng, "haemorrhage", x, y, L, L * rng.uniform(0.25, 0.45), ang=ang, soft=1.2, irreg=0.25,
                colour=HAEM, strength=rng.uniform(0.75, 0.95))
    else:  # dot / blot
        r = rng.uniform(0.04, 0.08 if not big else 0.15) * DD
        r = max(r, 1.6 * ctx.s512 + 0.6)
        cv.blob(rng, "haemorrhage", x, y, r, r * rng.uniform(0.7, 1.0), ang=rng.uniform(0, math.pi), soft=0.9,
                irreg=0.3, colour=HAEM, strength=rng.uniform(0.8, 0.97))


def _exudate_cluster(cv, rng, ctx, x, y, n, ring=False):
    DD = ctx.DD
    col = np.array([1.0, 0.9, 0.5]) * rng.uniform(0.9, 1.0)
    R0 = rng.uniform(0.25, 0.6) * DD
    for _ in range(n):
        if ring:
            a = rng.uniform(0, 2 * math.pi)
            rr = R0 * rng.uniform(0.8, 1.15)
        else:
            a = rng.uniform(0, 2 * math.pi)
            rr = R0 * 0.6 * math.sqrt(rng.random())
        px, py = x + rr * math.cos(a), y + rr * math.sin(a)
        if not _valid(ctx, px, py):
            continue
        r = max(1.1, rng.uniform(0.025, 0.07) * DD)
        cv.blob(rng, "exudate", px, py, r, r * rng.uniform(0.6, 1.0), ang=rng.uniform(0, math.pi), soft=0.5,
                irreg=0.35, mode="blend", colour=col, strength=rng.uniform(0.85, 1.0))


def _cotton_wool(cv, rng, ctx, x, y):
    r = rng.uniform(0.1, 0.14) * ctx.DD
    ang = math.atan2(y - ctx.disc[1], x - ctx.disc[0]) + math.pi / 2
    cv.blob(rng, "cotton_wool", x, y, r * rng.uniform(1.0, 1.5), r, ang=ang, soft=0.6 * r, irreg=0.3, mode="blend",
            colour=(0.95, 0.85, 0.72), strength=rng.uniform(0.55, 0.75), mask_thr=0.3)


def _tangle(rng, ctx, x0, y0, radius, n_loops, w):
    """Fine tortuous loops (neovascularisation / IRMA): irregular closed curves plus a few connecting sprouts."""
    lines = []
    for _ in range(n_loops):
        r0 = radius * rng.uniform(0.25, 0.6)
        a0 = rng.uniform(0, 2 * math.pi)
        d = radius * rng.uniform(0.0, 0.6)
        cx, cy = x0 + d * math.cos(a0), y0 + d * math.sin(a0)
        t = np.linspace(0, 2 * math.pi, 40)
        rr = np.ones_like(t)
        for k in (2, 3, 4, 6):
            rr += rng.uniform(0.05, 0.25) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
        rr = r0 * np.clip(rr, 0.3, None)
        sq, rot = rng.uniform(0.5, 1.0), rng.uniform(0, math.pi)
        u, v = rr * np.cos(t), rr * np.sin(t) * sq
        xs = (cx + u * math.cos(rot) - v * math.sin(rot)).astype(np.float32)
        ys = (cy + u * math.sin(rot) + v * math.cos(rot)).astype(np.float32)
        lines.append((xs, ys, np.full(xs.shape, w, np.float32)))
    for _ in range(max(1, n_loops // 2)):  # sprouts joining the loops
        a = rng.uniform(0, 2 * math.pi)
        steps = rng.normal(0, 0.5, 12).cumsum() + a
        seg = radius * 0.12
        xs = (x0 + np.concatenate([[0], np.cumsum(seg * np.cos(steps))])).astype(np.float32)
        ys = (y0 + np.concatenate([[0], np.cumsum(seg * np.sin(steps))])).astype(np.float32)
        lines.append((xs, ys, np.full(xs.shape, w, np.float32)))
    return lines


def _dr_lesions(cv, rng, ctx, grade: int, vessels: list[dict]) -> tuple[list, list]:
    """Draw DR lesions for an ICDR grade into the canvas. Returns (beaded vein segments, NV/IRMA lines)."""
    DD = ctx.DD
    fx, fy = ctx.fovea
    s = ctx.s512
    beads, extra_lines = [], []
    if grade <= 0:
        return beads, extra_lines
    n_ma = {1: rng.integers(4, 11), 2: rng.integers(8, 22), 3: rng.integers(14, 32), 4: rng.integers(10, 28)}[grade]
    for _ in range(int(n_ma)):
        # most often temporal to the fovea, within ~3 DD of it
        p = _polar_point(rng, ctx, ctx.fovea, 0.35 * DD, rng.choice([1.6, 2.6, 3.2]) * DD,
                         ang=ctx.temporal_angle if rng.random() < 0.45 else None)
        if p:
            _microaneurysm(cv, rng, ctx, *p)
    if grade == 1:
        return beads, extra_lines
    # haemorrhages
    if grade == 2:
        n_h = int(rng.integers(3, 11))
        for _ in range(n_h):
            p = _polar_point(rng, ctx, ctx.fovea, 0.4 * DD, 2.8 * DD)
            if p:
                _haemorrhage(cv, rng, ctx, *p)
    else:
        per_q = int(rng.integers(8, 16)) if grade == 3 else int(rng.integers(5, 14))
        for quad in ("ST", "IT", "SN", "IN"):
            for _ in range(per_q + int(rng.integers(-2, 3))):
                p = _quadrant_point(rng, ctx, quad, 0.5, 4.0)
                if p:
                    _haemorrhage(cv, rng, ctx, *p, big=rng.random() < 0.35)
    # hard exudates
    if rng.random() < (0.85 if grade == 2 else 0.9):
        n_cl = int(rng.integers(1, 3 if grade == 2 else 5))
        for _ in range(n_cl):
            ang = ctx.temporal_angle if rng.random() < 0.5 else None
            p = _polar_point(rng, ctx, ctx.fovea, 0.5 * DD, 2.2 * DD, ang=ang)
            if p:
                _exudate_cluster(cv, rng, ctx, *p, n=int(rng.integers(4, 12 if grade == 2 else 20)),
                                 ring=rng.random() < 0.4)
    # cotton wool spots along the arcades
    n_cw = int(rng.integers(0, 3)) if grade == 2 else int(rng.integers(2, 6))
    arcade = [v for v in vessels if v["gen"] == 0 and v["quadrant"] in ("ST", "IT")]
    for _ in range(n_cw):
        if not arcade:
            break
        v = arcade[int(rng.integers(len(arcade)))]
        i = int(rng.integers(min(len(v["x"]) - 1, 5), max(6, len(v["x"]) * 2 // 3)))
        i = min(i, len(v["x"]) - 1)
        x = float(v["x"][i]) + rng.normal(0, 0.25) * DD
        y = float(v["y"][i]) + rng.normal(0, 0.25) * DD
        if _valid(ctx, x, y):
            _cotton_wool(cv, rng, ctx, x, y)
    if grade >= 3:
        # venous beading in >= 2 quadrants
        veins = [v for v in vessels if v["kind"] == "v" and v["gen"] <= 1 and len(v["x"]) > 12]
        quads = {}
        for v in veins:
            q = _quadrant(ctx, float(v["x"][len(v["x"]) // 2]), float(v["y"][len(v["y"]) // 2]))
            quads.setdefault(q, []).append(v)
        keys = sorted(quads)
        rng.shuffle(keys)
        for q in keys[: int(rng.integers(2, 4))]:
            v = quads[q][int(rng.integers(len(quads[q])))]
            n = len(v["x"])
            L = int(min(n - 2, max(8, 1.8 * DD / ctx.step)))
            i0 = int(rng.integers(1, max(2, n - L)))
            seg = slice(i0, i0 + L)
            period = rng.uniform(2.5, 4.0) * float(v["w"][i0])
            arc = np.concatenate([[0], np.cumsum(np.hypot(np.diff(v["x"][seg]), np.diff(v["y"][seg])))])
            v["w"][seg] = v["w"][seg] * (1.0 + 0.7 * np.sin(math.pi * arc / max(period, 1.0)) ** 2)
            beads.append((v["x"][seg], v["y"][seg], v["w"][seg]))
        # IRMA: small tortuous intraretinal loops near haemorrhage areas
        for _ in range(int(rng.integers(1, 4))):
            p = _polar_point(rng, ctx, ctx.mid, 1.2 * DD, 3.0 * DD)
            if p:
                lines = _tangle(rng, ctx, p[0], p[1], 0.25 * DD, int(rng.integers(2, 4)), max(0.8, 1.0 * s))
                extra_lines.append(("irma", lines))
    if grade == 4:
        sites = []
        if rng.random() < 0.7:
            sites.append(("nvd", ctx.disc))
        for _ in range(int(rng.integers(0 if sites else 1, 3))):
            p = _polar_point(rng, ctx, ctx.fovea, 1.7 * DD, 2.6 * DD)
            if p:
                sites.append(("nve", p))
        for kind, (x, y) in sites:
            rad = (rng.uniform(0.5, 0.8) if kind == "nvd" else rng.uniform(0.3, 0.55)) * DD
            lines = _tangle(rng, ctx, x, y, rad, int(rng.integers(5, 10)), max(0.8, rng.uniform(1.0, 1.6) * s))
            extra_lines.append(("neovascularisation", lines))
        if rng.random() < 0.35:  # pre-retinal (boat-shaped) haemorrhage
            p = _polar_point(rng, ctx, ctx.fovea, 1.0 * DD, 2.5 * DD)
            if p:
                r = rng.uniform(0.35, 0.6) * DD
                cv.blob(rng, "haemorrhage", p[0], p[1], r, r * 0.6, soft=1.0, irreg=0.1,
                              colour=(0.45, 0.12, 0.15), strength=0.95)
    return beads, extra_lines


def _amd_lesions(cv, rng, ctx):
    DD = ctx.DD
    um = DD / 1800.0  # px per micrometre
    n = int(rng.integers(12, 60))
    for _ in range(n):
        p = _polar_point(rng, ctx, ctx.fovea, 0.0, rng.uniform(0.6, 1.4) * DD)
        if not p:
            continue
        d_um = rng.choice([rng.uniform(63, 125), rng.uniform(125, 260)], p=[0.45, 0.55])
        r = max(1.0, 0.5 * d_um * um * 1.3)
        soft = rng.random() < 0.6
        cv.blob(rng, "drusen", p[0], p[1], r, r * rng.uniform(0.8, 1.0), soft=(0.6 * r if soft else 0.6),
                irreg=0.15, mode="blend", colour=(0.98, 0.85, 0.45), strength=rng.uniform(0.55, 0.8), mask_thr=0.4)
    if rng.random() < 0.5:  # pigment clumps
        for _ in range(int(rng.integers(1, 6))):
            p = _polar_point(rng, ctx, ctx.fovea, 0.0, 1.0 * DD)
            if p:
                r = max(1.0, rng.uniform(0.02, 0.05) * DD)
                cv.blob(rng, "pigment", p[0], p[1], r, r, soft=0.8, irreg=0.4, colour=(0.35, 0.3, 0.3), strength=0.8)
    if rng.random() < 0.3:  # geographic atrophy: pale, sharp-edged
        p = _polar_point(rng, ctx, ctx.fovea, 0.0, 0.4 * DD)
        if p:
            r = rng.uniform(0.25, 0.5) * DD
            cv.blob(rng, "atrophy", p[0], p[1], r, r * rng.uniform(0.7, 1.0), soft=1.5, irreg=0.3, mode="blend",
                    colour=(0.95, 0.7, 0.5), strength=0.6, mask_thr=0.3)


# --------------------------------------------------------------------------------------------------- main

def fundus_phantom(label, seed: int, size: int = 512, *, patient_seed: int | None = None,
                   eye: str | None = None, patient: dict | None = None, without: tuple[str, ...] = ()) -> Phantom:
    """Colour fundus phantom. label: a DR grade name (DR_GRADES), "normal", "glaucoma", "cataract", "amd" or
    "diabetic_retinopathy" (a random grade 1-4, stored in meta["dr_grade"]).

    without=("masked",) re-renders the same eye without the lesions its masks mark (a counterfactual for
    explanation checks): the DR lesions (microaneurysms, haemorrhages, exudates, cotton-wool spots, venous beading,
    IRMA, new vessels) or the AMD ones (drusen, pigment, atrophy). Their random draws are still made, on a scratch
    canvas, so the anatomy, vessels and camera are exactly the original eye's. Glaucoma's marked 'lesion' is its
    cup, part of the disc, so it is refused there."""
    label = canonical_fundus_label(label)
    without = tuple(without)
    if any(w != "masked" for w in without):
        raise ValueError(f"without: unknown part {next(w for w in without if w != 'masked')!r}; fundus phantoms "
                         "can leave out 'masked'")
    if without and label == "glaucoma":
        raise ValueError("without=('masked',): a glaucoma phantom's masked 'lesion' is its optic cup, which cannot "
                         "be left out of the disc")
    size = int(size)
    if not 32 <= size <= 4096:
        raise ValueError("size must be in [32, 4096]")
    r_anat, r_cam, r_les, r_ves, r_pat = streams(seed, 5, tag=11)
    fam = _family(label)
    if patient_seed is not None:
        r_pat = streams(patient_seed, 1, tag=12)[0]
    patient = merge_patient(sample_patient(r_pat, fam, eye), patient)
    H = W = size
    s512 = size / 512.0

    # ---- geometry
    cx = W / 2 + r_cam.normal(0, 0.008) * W
    cy = H / 2 + r_cam.normal(0, 0.008) * H
    R = W * (r_cam.uniform(0.44, 0.495) if r_cam.random() < 0.75 else r_cam.uniform(0.5, 0.56))
    DD = 2 * R / r_anat.uniform(5.9, 7.0)
    rd = DD / 2
    rdy = rd * r_anat.uniform(1.03, 1.12)
    nasal = 1.0 if patient["eye"] == "OD" else -1.0
    dist = float(np.clip(r_anat.normal(2.65, 0.2), 2.25, 3.05)) * DD
    tilt = math.radians(r_anat.normal(5.6, 2.0))
    fov_off = r_cam.uniform(0.25, 0.85) * DD
    fx = cx - nasal * fov_off
    fy = cy + r_cam.uniform(-0.3, 0.3) * DD
    dx_, dy_ = fx + nasal * dist * math.cos(tilt), fy - dist * math.sin(tilt)
    # keep the disc inside the field and the frame
    lim = min(R - 1.3 * rd, W / 2 - 1.4 * rd)
    over = abs(dx_ - cx) - lim
    if over > 0:
        fx -= nasal * over
        dx_ -= nasal * over

    ctx = _Ctx()
    ctx.size, ctx.R, ctx.DD, ctx.rd, ctx.s512 = size, R, DD, rd, s512
    ctx.centre, ctx.fovea, ctx.disc, ctx.nasal = (cx, cy), (fx, fy), (dx_, dy_), nasal
    ctx.dist_df = dist
    ctx.axis = ((fx - dx_) / dist, (fy - dy_) / dist)
    ctx.mid = ((fx + dx_) / 2, (fy + dy_) / 2)
    ctx.disc_angle = math.atan2(dy_ - fy, dx_ - fx)
    ctx.temporal_angle = math.atan2(fy - dy_, fx - dx_)

    yy, xx = np.ogrid[0:H, 0:W]
    yy = yy.astype(np.float32) + 0.5
    xx = xx.astype(np.float32) + 0.5

    # ---- background: red-dominant orange with vignetting, colour variation and choroidal texture
    base_r = r_cam.uniform(0.68, 0.95)
    base = np.array([base_r, base_r * r_cam.uniform(0.36, 0.6), base_r * r_cam.uniform(0.15, 0.4)], np.float32)
    low1 = smooth_noise(r_cam, (H, W), 4)
    low2 = smooth_noise(r_anat, (H, W), 6)
    tex = smooth_noise(r_anat, (H, W), max(8, int(W / 6)))
    vcx = cx + r_cam.normal(0, 0.08) * R
    vcy = cy + r_cam.normal(0, 0.08) * R
    rv = np.sqrt((xx - vcx) ** 2 + (yy - vcy) ** 2) / R
    vign = 1.0 - r_cam.uniform(0.25, 0.5) * np.minimum(rv, 1.3) ** r_cam.uniform(2.0, 3.5)
    lum = vign * (1.0 + 0.07 * low1)
    img = np.empty((H, W, 3), np.float32)
    img[..., 0] = base[0] * lum * (1.0 + 0.025 * tex)
    img[..., 1] = base[1] * lum * (1.0 + 0.06 * low2 + 0.015 * tex)
    img[..., 2] = base[2] * lum * (1.0 + 0.08 * low2)

    # macula: darker, more pigmented; foveal reflex
    d2f = (xx - fx) ** 2 + (yy - fy) ** 2
    sig = r_anat.uniform(0.45, 0.7) * DD
    mac = np.exp(-d2f / (2 * sig * sig))
    m = r_anat.uniform(0.25, 0.42)
    mw = np.array([0.85, 1.0, 1.0], np.float32)  # red darkens a little less than green/blue
    img *= 1.0 - (m * mac)[..., None] * mw
    if r_cam.random() < 0.6:
        fr = max(0.8, 0.04 * DD)
        img += (0.12 * np.exp(-d2f / (2 * fr * fr)))[..., None] * np.array([1.0, 0.9, 0.7], np.float32)

    # ---- optic disc with cup
    glaucoma = label == "glaucoma"
    if glaucoma:
        cdr = r_les.uniform(0.62, 0.88)
        cup_w = cdr * r_les.uniform(0.7, 0.88)
    else:
        cdr = r_anat.uniform(0.2, 0.4)
        cup_w = cdr * r_anat.uniform(0.9, 1.1)
    ddn = np.sqrt(((xx - dx_) / rd) ** 2 + ((yy - dy_) / rdy) ** 2)
    disc_a = smoothstep(1.08, 0.9, ddn)
    db = r_anat.uniform(0.85, 1.05)
    disc_col = np.array([min(1.0, base[0] * 1.22 * db + 0.05), min(0.85, base[1] * 1.55 * db + 0.04),
                         min(0.6, base[2] * 1.45 * db + 0.03)], np.float32)
    halo = smoothstep(1.6, 1.0, ddn) * (1 - disc_a)
    img += (0.025 * halo)[..., None] * np.array([1.0, 0.7, 0.4], np.float32)
    shade = 0.9 + 0.1 * np.clip(1 - ddn, 0, 1)
    img += disc_a[..., None] * (disc_col[None, None, :] * shade[..., None] - img) * 0.9
    ccx = dx_ - nasal * 0.12 * rd * (1 if not glaucoma else 0.4)
    ccy = dy_ + r_anat.normal(0, 0.05) * rd
    ct = np.arctan2(yy - ccy, xx - ccx)
    cr = np.sqrt(((xx - ccx) / (cup_w * rd)) ** 2 + ((yy - ccy) / (cdr * rdy)) ** 2)
    notch_dir = None
    if glaucoma:
        notch_dir = math.pi / 2 if r_les.random() < 0.65 else -math.pi / 2  # inferior (y down) or superior
        amp = r_les.uniform(0.15, 0.4)
        dang = np.angle(np.exp(1j * (ct - notch_dir)))
        cr = cr / (1.0 + amp * np.exp(-(dang / 0.5) ** 2))
    cup_a = smoothstep(1.12, 0.8, cr) * disc_a
    cup_col = np.array([1.0, min(1.0, disc_col[1] * 1.15 + 0.08), min(1.0, disc_col[2] * 1.3 + 0.1)], np.float32)
    img += cup_a[..., None] * (cup_col - img) * 0.85

    cv = _Canvas(img)
    if glaucoma:
        cv.masks["cup"] = cup_a > 0.5
        cv.counts["cup"] = 1
        if r_les.random() < 0.15:  # splinter haemorrhage at the disc margin
            a = notch_dir + r_les.normal(0, 0.3)
            cv.blob(r_les, "haemorrhage", dx_ + 1.05 * rd * math.cos(a), dy_ + 1.05 * rdy * math.sin(a),
                    0.12 * DD, 0.04 * DD + 1, ang=a, soft=1.0, colour=HAEM, strength=0.85)

    # ---- vessels
    ctx.step = 0.085 * DD
    ctx.vein_w = 0.095 * DD * r_anat.uniform(0.9, 1.1)
    ctx.wmin = max(0.6, 0.55 * s512)
    ctx.taper = 0.995
    ctx.wiggle = 0.035
    ctx.branch_spacing = 1.05 * DD
    ctx.maxgen = 3
    ctx.avoid = r_anat.uniform(0.3, 0.45) * DD
    ctx.max_vessels = 400
    vessels = _grow_tree(r_ves, ctx, _vessel_seeds(r_ves, ctx))

    grade = None
    beads, extra = [], []
    if fam == "dr":
        if label in DR_GRADES:
            grade = DR_GRADES.index(label)
        else:  # "diabetic_retinopathy" (4-class data set): mostly visible DR
            grade = int(r_les.choice([1, 2, 3, 4], p=[0.1, 0.4, 0.3, 0.2]))
        if without:         # the same draws on a scratch canvas and copied vessels (beading widens them in place)
            _dr_lesions(_Canvas(cv.img.copy()), r_les, ctx, grade, copy.deepcopy(vessels))
        else:
            beads, extra = _dr_lesions(cv, r_les, ctx, grade, vessels)  # red/white lesions drawn under vessels

    def _c(v):  # thin vessels show less contrast
        return float(np.clip(0.35 + 0.65 * float(v["w"][0]) / (3.0 * s512), 0.35, 1.0))
    art = [(v["x"], v["y"], v["w"], _c(v)) for v in vessels if v["kind"] == "a"]
    ven = [(v["x"], v["y"], v["w"], _c(v)) for v in vessels if v["kind"] == "v"]
    ss = 2 if size <= 1024 else 1
    A = _draw_polylines(size, art, ss)
    V = _draw_polylines(size, ven, ss)
    if size >= 256:
        A = ndimage.gaussian_filter(A, 0.5 * s512 + 0.2)
        V = ndimage.gaussian_filter(V, 0.5 * s512 + 0.2)
    vc = r_anat.uniform(0.85, 1.1)
    ka = np.array([0.9, 0.64, 0.72], np.float32) ** vc
    kv = np.array([0.72, 0.42, 0.52], np.float32) ** vc
    img = cv.img
    img *= 1.0 - A[..., None] * (1.0 - ka)
    img *= 1.0 - V[..., None] * (1.0 - kv)
    big_art = [(x, y, w) for (x, y, w, _) in art if w[0] >= 2.2]
    if big_art and size >= 256:
        refl = _draw_polylines(size, big_art, ss, wscale=0.25)
        img += (0.1 * refl)[..., None] * np.array([1.0, 0.9, 0.8], np.float32)
    for name, lines in extra:  # NV / IRMA: fine red loops
        L = _draw_polylines(size, lines, ss)
        img *= 1.0 - L[..., None] * (1.0 - np.array([0.65, 0.4, 0.45], np.float32))
        mk = ndimage.binary_dilation(L > 0.25, iterations=max(1, int(round(2 * s512))))
        cv.mask(name)[:] |= mk
        cv.counts[name] = cv.counts.get(name, 0) + 1
    if beads:
        bm = _draw_polylines(size, beads, ss, wscale=1.7, wadd=2.0) > 0.3
        cv.mask("venous_beading")[:] |= bm
        cv.counts["venous_beading"] = len(beads)

    if label == "amd":
        _amd_lesions(_Canvas(img.copy()) if without else cv, r_les, ctx)
        img = cv.img

    # ---- camera: optional cataract haze, blur, exposure, noise, field of view
    if label == "cataract":
        sgm = r_les.uniform(2.0, 4.5) * s512
        img = ndimage.gaussian_filter(img, (sgm, sgm, 0))
        mean = img.reshape(-1, 3).mean(0)
        img = mean + (img - mean) * r_les.uniform(0.4, 0.65)
        veil = smoothstep(1.2, 0.0, np.sqrt((xx - cx - r_les.normal(0, 0.2) * R) ** 2 + (yy - cy) ** 2) / R)
        img += (r_les.uniform(0.05, 0.16) * veil)[..., None] * np.array([1.0, 0.92, 0.8], np.float32)
    blur = r_cam.uniform(0.0, 0.8) * s512
    if blur > 0.25:
        img = ndimage.gaussian_filter(img, (blur, blur, 0))
    gain = r_cam.uniform(0.85, 1.15)
    gamma = r_cam.uniform(0.85, 1.15)
    img = np.clip(img * gain, 0, 1) ** gamma
    img += r_cam.normal(0, 1.0, img.shape).astype(np.float32) * r_cam.uniform(0.004, 0.015)
    rf = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    fov = np.clip(R - rf + 0.5, 0, 1)
    img *= fov[..., None]
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

    masks = {k: (v & (fov > 0.5)) for k, v in cv.masks.items() if v.any()}
    counts = {k: int(cv.counts.get(k, 0)) for k in masks}
    meta = {
        "seed": int(seed), **patient,
        "disc_xy": [float(dx_), float(dy_)], "disc_radius": float(0.5 * (rd + rdy)),
        "fovea_xy": [float(fx), float(fy)], "fov_center": [float(cx), float(cy)], "fov_radius": float(R),
        "disc_diameter_px": float(DD), "cup_to_disc": float(cdr), "lesion_counts": counts,
        "size": size,
    }
    if grade is not None:
        meta["dr_grade"] = int(grade)
    return Phantom(image=out, masks=masks, label=label, modality=Modality.FUNDUS, meta=to_jsonable(meta))
