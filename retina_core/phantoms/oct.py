"""Synthetic spectral-domain OCT B-scans and volumes (macular, horizontal scans) with lesion masks.

An "eye" is sampled once (anatomy + lesions in 3D, en-face coordinates in mm around the fovea, depth in um), then any
B-scan through it is rendered: layer stack -> reflectivity and attenuation maps -> cumulative attenuation (shadows,
hyper-transmission) -> multiplicative speckle -> log compression. Volumes render neighbouring slices of the same eye,
so lesions are 3D-consistent by construction.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ..labels import OCT8
from ..modality import Modality
from ._common import Phantom, merge_patient, sample_patient, streams, to_jsonable

OCT_LABELS = tuple(OCT8)

# name, reflectivity, attenuation (1/um); order = top (vitreous side) to bottom
# reflectivity is on a display scale: 0 = noise floor, 1 = RPE (converted to linear power with the dynamic range)
_LAYERS = [
    ("RNFL", 0.78, 0.0009),
    ("GCL", 0.42, 0.0005),
    ("IPL", 0.60, 0.0006),
    ("INL", 0.33, 0.0004),
    ("OPL", 0.58, 0.0006),
    ("ONL", 0.24, 0.0003),
    ("MZ", 0.34, 0.0004),
    ("EZ", 0.86, 0.0012),
    ("OS", 0.42, 0.0005),
    ("IZ", 0.74, 0.0010),
    ("SRF", 0.02, 0.0),
    ("SHRM", 0.82, 0.0055),
    ("RPE", 0.97, 0.0110),
    ("SUBRPE", 0.52, 0.0020),
    ("CHOROID", 0.58, 0.0030),
    ("SCLERA", 0.34, 0.0030),
]
_IDX = {n: i for i, (n, _, _) in enumerate(_LAYERS)}
# thickness (um) at the foveal centre / parafovea (~1 mm); inner layers vanish in the pit, ONL is thickest there
_THICK = {
    "RNFL": (2, 22), "GCL": (3, 50), "IPL": (5, 40), "INL": (6, 38), "OPL": (18, 30), "ONL": (82, 64),
    "MZ": (26, 20), "EZ": (12, 10), "OS": (34, 24), "IZ": (10, 9), "RPE": (17, 17),
}
_RETINA = ["RNFL", "GCL", "IPL", "INL", "OPL", "ONL", "MZ", "EZ", "OS", "IZ"]

KERMANY_SIZES = [(512, 496), (768, 496), (512, 512), (1024, 496), (1536, 496)]  # width x height
C8_SIZES = [(384, 496), (512, 496), (640, 496), (768, 496), (1024, 496), (1536, 496)]

# OCT class -> the disease family `sample_patient` draws a matching patient record for
FAMILY = {"AMD": "amd", "CNV": "cnv", "CSR": "csr", "DME": "dme", "DR": "dr", "DRUSEN": "drusen", "MH": "mh",
           "NORMAL": "normal"}


def canonical_oct_label(label) -> str:
    s = str(label).strip().upper()
    if s in OCT_LABELS:
        return s
    if s in ("HEALTHY", "NORMAL"):
        return "NORMAL"
    raise ValueError(f"unknown OCT phantom label {label!r}; expected one of {OCT_LABELS}")


# ------------------------------------------------------------------------------------------------ eye model

def _field(spec, x, y):
    """Evaluate an en-face shape (gauss / dome / box) on coordinates (mm); returns array like x."""
    kind, x0, y0, sx, sy = spec[:5]
    q = ((x - x0) / sx) ** 2 + ((y - y0) / sy) ** 2
    if kind == "gauss":
        return np.exp(-0.5 * q)
    if kind == "dome":  # smooth dome with zero slope at the rim
        t = np.clip(1.0 - q, 0.0, None)
        return t ** 0.6 * (1 - np.exp(-6 * t))
    if kind == "bump":  # drusen: convex with a rounded top
        t = np.clip(1.0 - q, 0.0, None)
        return np.sqrt(t) * t ** 0.3
    if kind == "soft":  # soft-edged plateau (atrophy)
        return 1.0 / (1.0 + np.exp((np.sqrt(q) - 1.0) * 12.0))
    raise ValueError(kind)


def sample_eye(label: str, rng_anat: np.random.Generator, rng_les: np.random.Generator, eye: str,
               y_spread: float = 1.0) -> dict:
    """Anatomy and lesions of one virtual eye, in mm (en-face) and um (depth).

    y_spread scales the en-face spread of lesions across scan lines: < 1 concentrates them near the foveal
    B-scan (single B-scans must show the disease), 1 spreads them over a volume."""
    ys = float(y_spread)
    e: dict = {"label": label, "eye": eye}
    e["nasal"] = 1.0 if eye == "OD" else -1.0
    e["pit_r"] = rng_anat.uniform(0.45, 0.62)
    e["pit_exp"] = rng_anat.uniform(1.8, 2.6)
    e["inner_scale"] = rng_anat.uniform(0.9, 1.1)
    e["outer_scale"] = rng_anat.uniform(0.93, 1.07)
    e["choroid_um"] = float(np.clip(rng_anat.normal(290, 55), 170, 420))
    e["refl_jitter"] = rng_anat.uniform(0.88, 1.12, len(_LAYERS))
    # en-face inner retinal vessels: lines x = x0 + slope*y, away from the foveal avascular zone
    vessels = []
    for _ in range(int(rng_anat.integers(3, 7))):
        x0 = rng_anat.uniform(0.5, 3.2) * (1 if rng_anat.random() < 0.5 else -1)
        vessels.append({"x0": x0, "slope": rng_anat.normal(0, 0.4), "r_um": rng_anat.uniform(30, 70),
                        "depth": rng_anat.uniform(0.2, 0.8)})
    e["vessels"] = vessels
    e["add"] = []  # (layer, amplitude um, shape spec)
    e["mult"] = []  # (layers, factor at centre (0..1), shape spec)
    e["ell"] = []  # ellipsoids
    e["ga"] = []
    e["hole"] = None
    e["subrpe_mask"] = "drusen"
    e["subrpe_refl"] = None
    e["srf_mask"] = "fluid"
    fam = FAMILY[label]
    r = rng_les

    def near(sd=0.35):
        return r.normal(0, sd), r.normal(0, sd) * ys

    def y_on_scan(sd, ry):  # volumes: spread over slices; single B-scans: make sure the lesion cuts the scan
        return r.normal(0, sd) if ys >= 1 else r.uniform(-0.6, 0.6) * ry

    def cysts(n, centre_sd, lo_um, hi_um, mask, layers=("INL", "ONL"), value=0.02):
        for _ in range(n):
            cx = r.normal(0, centre_sd)
            w = r.uniform(lo_um, hi_um)
            ry = w / 2000.0 * r.uniform(0.8, 1.6)
            lay = layers[int(r.integers(len(layers)))]
            e["ell"].append({"x0": cx, "y0": y_on_scan(centre_sd, ry), "layer": lay, "frac": r.uniform(0.3, 0.7),
                             "rx": w / 2000.0 * r.uniform(0.8, 1.6), "ry": ry,
                             "rz": w / 2 * r.uniform(0.7, 1.1), "value": value, "mu": 0.0, "mask": mask,
                             "fit": True})

    def foci(n, spread, layers, mask="foci", lo=14, hi=24, value=0.97, mu=0.0015):
        for _ in range(n):
            rz = r.uniform(lo, hi)
            ry = rz * 1.6 / 1000.0
            e["ell"].append({"x0": r.uniform(-spread, spread), "y0": y_on_scan(spread / 2, ry),
                             "layer": layers[int(r.integers(len(layers)))],
                             "frac": r.uniform(0.2, 0.8), "rx": rz * r.uniform(1.4, 2.2) / 1000.0,
                             "ry": ry, "rz": rz, "value": value, "mu": mu, "mask": mask})

    if fam == "dr":
        cx, cy = near(0.3)
        e["add"].append(("ONL", r.uniform(10, 30), ("gauss", cx, cy, 1.2, 1.2)))
        e["add"].append(("INL", r.uniform(5, 15), ("gauss", cx, cy, 1.4, 1.4)))
        foci(int(r.integers(14, 36)), 2.3, ("RNFL", "GCL", "IPL", "INL", "OPL"))
    elif fam == "dme":
        cx, cy = near(0.25)
        s = r.uniform(0.8, 1.4)
        e["add"].append(("ONL", r.uniform(80, 170), ("gauss", cx, cy, s, s * r.uniform(0.8, 1.2))))
        e["add"].append(("INL", r.uniform(30, 70), ("gauss", cx, cy, s * 1.2, s)))
        e["add"].append(("OPL", r.uniform(10, 40), ("gauss", cx, cy, s, s)))
        cysts(int(r.integers(3, 8)), 0.45, 90, 320, "cyst", layers=("ONL", "OPL"))
        cysts(int(r.integers(4, 12)), 0.8, 35, 110, "cyst", layers=("INL",))
        foci(int(r.integers(5, 18)), 1.8, ("INL", "OPL", "ONL", "IPL"))
        if r.random() < 0.5:
            foci(int(r.integers(1, 4)), 1.3, ("OPL",), mask="exudate", lo=25, hi=45, value=1.0, mu=0.012)
        if r.random() < 0.3:
            e["add"].append(("SRF", r.uniform(40, 120), ("dome", cx, cy, r.uniform(0.5, 1.0), r.uniform(0.5, 1.0))))
    elif fam == "cnv":
        cx, cy = near(0.35)
        typ = r.choice(["1", "2", "mixed"], p=[0.35, 0.35, 0.3])
        if typ in ("1", "mixed"):  # fibrovascular PED under the RPE
            w = r.uniform(0.6, 1.5)
            e["add"].append(("SUBRPE", r.uniform(80, 260), ("dome", cx, cy, w, w * r.uniform(0.7, 1.2))))
            e["subrpe_mask"] = "cnv"
            e["subrpe_refl"] = r.uniform(0.35, 0.55)
        if typ in ("2", "mixed"):  # subretinal hyper-reflective material above the RPE
            w = r.uniform(0.35, 0.9)
            e["add"].append(("SHRM", r.uniform(60, 220), ("bump", cx + r.normal(0, 0.15), cy, w, w * 0.9)))
        if r.random() < 0.85:
            w = r.uniform(0.7, 1.6)
            e["add"].append(("SRF", r.uniform(50, 200), ("dome", cx + r.normal(0, 0.3), cy, w, w * 0.8)))
        e["add"].append(("ONL", r.uniform(20, 60), ("gauss", cx, cy, 1.0, 1.0)))
        if r.random() < 0.45:
            cysts(int(r.integers(2, 7)), 0.5, 50, 180, "fluid", layers=("INL", "ONL"))
    elif fam in ("drusen", "amd"):
        n = int(r.integers(3, 9)) if fam == "drusen" else int(r.integers(2, 6))
        for _ in range(n):
            x0 = r.normal(0, 0.9)
            y0 = r.normal(0, 0.5) * ys
            base = r.uniform(250, 900) / 1000.0
            h = min(r.uniform(40, 120), 0.3 * base * 1000.0)
            e["add"].append(("SUBRPE", h, ("dome", x0, y0, base / 2, base / 2 * r.uniform(0.8, 1.3))))
        if fam == "amd":  # geographic atrophy: RPE loss, outer retinal thinning, hyper-transmission
            for k in range(int(r.integers(1, 3))):
                x0 = r.normal(0, 0.8) if k else r.normal(0, 0.4)
                spec = ("soft", x0, r.normal(0, 0.3), r.uniform(0.3, 0.8), r.uniform(0.3, 0.7))
                e["ga"].append(spec)
                e["mult"].append((("MZ", "EZ", "OS", "IZ"), 0.05, spec))
                e["mult"].append((("ONL",), r.uniform(0.35, 0.6), spec))
                e["mult"].append((("SUBRPE",), 0.0, spec))
    elif fam == "csr":
        cx, cy = near(0.3)
        h = r.uniform(190, 340)
        w = h / r.uniform(0.07, 0.11) / 2000.0
        e["add"].append(("SRF", h, ("dome", cx, cy, w, w * r.uniform(0.7, 1.0))))
        e["choroid_um"] = float(min(e["choroid_um"] + r.uniform(100, 180), 560))
        if r.random() < 0.5:  # small serous PED
            px = cx + r.uniform(-0.6, 0.6) * w
            e["add"].append(("SUBRPE", r.uniform(50, 150), ("dome", px, cy, r.uniform(0.15, 0.35), 0.25)))
            e["subrpe_mask"] = "fluid"
            e["subrpe_refl"] = 0.03
    elif fam == "mh":
        cx, cy = near(0.05)
        r_min = r.uniform(125, 350) / 1000.0
        r_base = max(r_min * 1.5, r.uniform(400, 700) / 1000.0)
        e["hole"] = {"x0": cx, "y0": cy, "r_min": r_min, "r_base": r_base,
                     "r_top": r_min * r.uniform(1.1, 1.6), "f_min": r.uniform(0.3, 0.55)}
        # elevated, thickened, cystic edges
        e["add"].append(("ONL", r.uniform(60, 140), ("gauss", cx, cy, r_base + 0.3, r_base + 0.3)))
        e["add"].append(("INL", r.uniform(40, 90), ("gauss", cx, cy, r_base + 0.4, r_base + 0.4)))
        e["add"].append(("OPL", r.uniform(20, 40), ("gauss", cx, cy, r_base + 0.3, r_base + 0.3)))
        for lay in ("RNFL", "GCL", "IPL"):  # no foveal pit: the hole replaces it
            e["add"].append((lay, 15, ("gauss", cx, cy, 0.6, 0.6)))
        for _ in range(int(r.integers(3, 9))):
            a = r.uniform(0, 2 * math.pi)
            rr = r_base * r.uniform(0.9, 1.5)
            w = r.uniform(60, 180)
            e["ell"].append({"x0": cx + rr * math.cos(a), "y0": cy + rr * math.sin(a) * 0.7,
                             "layer": ["INL", "ONL"][int(r.integers(2))], "frac": r.uniform(0.3, 0.7),
                             "rx": w / 2000 * 1.3, "ry": w / 2000 * 1.3, "rz": w / 2, "value": 0.02, "mu": 0.0,
                             "mask": "cyst", "fit": True})
        if r.random() < 0.5:
            e["operculum"] = {"x0": cx + r.normal(0, 0.05), "y0": cy, "h_um": r.uniform(120, 400),
                              "rx": r_min * r.uniform(0.6, 1.0), "rz": r.uniform(20, 45)}
    return e


# what `oct_phantom(without=...)` and `oct_volume(without=...)` can leave out of an eye (counterfactual phantoms,
# audit.counterfactual)
WITHOUT = ("ellipsoids", "thickening", "masked")
_NEURAL_LAYERS = ("RNFL", "GCL", "IPL", "INL", "OPL", "ONL")
_MASKED_LAYERS = ("SRF", "SUBRPE", "SHRM")   # lesion layers drawn into masks (fluid, drusen / PED, CNV)


def leave_out(e: dict, without) -> dict:
    """The eye `e` (from `sample_eye`) without some of its disease:

    - "ellipsoids": the ellipsoidal lesions (intraretinal cysts, hyper-reflective foci, hard exudates; all masked);
    - "thickening": the diffuse swelling of the neural retina (Gaussian thickness added to RNFL..ONL; no mask marks it);
    - "masked": every lesion drawn into a lesion mask: the ellipsoids, subretinal fluid, drusen and pigment-epithelium
      detachments, subretinal hyper-reflective material, geographic atrophy and a macular hole (with its
      operculum). What is left is the eye's unmasked disease (swelling, a thick choroid) and its anatomy.

    Everything else (anatomy, other lesions, speckle) is drawn from the same random streams, so the eye is otherwise
    the same."""
    bad = [w for w in without if w not in WITHOUT]
    if bad:
        raise ValueError(f"without: unknown part {bad[0]!r}; choose from {', '.join(WITHOUT)}")
    if "ellipsoids" in without or "masked" in without:
        e["ell"] = []
    if "thickening" in without:
        e["add"] = [a for a in e["add"] if not (a[0] in _NEURAL_LAYERS and a[2][0] == "gauss")]
    if "masked" in without:
        e["add"] = [a for a in e["add"] if a[0] not in _MASKED_LAYERS]
        ga = e["ga"]
        e["mult"] = [m for m in e["mult"] if m[2] not in ga]
        e["ga"], e["hole"] = [], None
        e.pop("operculum", None)
    return e


# ------------------------------------------------------------------------------------------------ rendering

def _thickness(e: dict, X: np.ndarray, Y: np.ndarray) -> dict[str, np.ndarray]:
    """Layer thickness (um) along a scan line at en-face positions X, Y (mm, fovea at 0,0)."""
    r = np.sqrt(X * X + Y * Y)
    P = 1.0 - np.exp(-((r / e["pit_r"]) ** e["pit_exp"]))
    far = 1.0 - 0.3 * np.clip((r - 1.3) / 2.2, 0, 1)
    xn = X * e["nasal"]
    t = {}
    for name, (c, p) in _THICK.items():
        v = c + (p - c) * P
        if name in ("GCL", "IPL", "INL"):
            v = v * far
        if name == "RNFL":
            v = v * (1.0 + 0.9 * np.clip(xn / 3.0, 0, 1)) * (1.0 - 0.35 * np.clip((-xn - 1.0) / 2.0, 0, 1))
        scale = e["inner_scale"] if name in ("RNFL", "GCL", "IPL", "INL", "OPL", "ONL") else e["outer_scale"]
        t[name] = v * scale
    for name in ("SRF", "SHRM", "SUBRPE"):
        t[name] = np.zeros_like(X)
    t["CHOROID"] = e["choroid_um"] * (1.0 - 0.12 * np.clip(r / 3.0, 0, 1)) * np.ones_like(X)
    for name, amp, spec in e["add"]:
        t[name] = t[name] + amp * _field(spec, X, Y)
    for names, fac, spec in e["mult"]:
        f = _field(spec, X, Y)
        for name in names:
            t[name] = t[name] * (1.0 - (1.0 - fac) * f)
    return t


def _line_noise(rng, n, knots, amp):
    k = rng.standard_normal(knots)
    return 1.0 + amp * np.interp(np.linspace(0, knots - 1, n), np.arange(knots), k)


def render_bscan(e: dict, geo: dict, y_mm: float, width: int, height: int, rng: np.random.Generator):
    """Render one B-scan of eye e at en-face offset y_mm.

    Returns (display reflectivity [H,W], transmission [H,W], masks, info); `compress` turns the first two into the
    speckled, log-compressed image."""
    H, W = int(height), int(width)
    dz = geo["depth_um"] / H  # um per pixel
    x_mm = (np.arange(W) + 0.5) / W * geo["span_mm"] - geo["span_mm"] / 2 - geo["fovea_x_mm"]
    X = x_mm.astype(np.float64)
    Yc = np.full_like(X, y_mm)
    t = _thickness(e, X, Yc)

    # Bruch's membrane depth (px): offset + tilt + curvature + gentle wobble (all per-eye geometry)
    u = x_mm / (geo["span_mm"] / 2)
    bm_um = geo["bm_um"] + geo["tilt_um"] * u + geo["curv_um"] * u * u + geo["wobble_um"] * np.sin(
        geo["wob_f"] * u + geo["wob_p"]) + geo["slice_tilt_um"] * y_mm
    bm = bm_um / dz
    names = [n for n, _, _ in _LAYERS]
    above = names[: _IDX["SUBRPE"] + 1]
    tops = {}
    z = bm.copy()
    for n in reversed(above):
        z = z - t[n] / dz
        tops[n] = z.copy()
    tops["CHOROID"] = bm
    tops["SCLERA"] = bm + t["CHOROID"] / dz
    bounds = np.stack([tops[n] for n in names] + [np.full(W, H + 10.0)])  # (K+1, W)

    rowc = np.arange(H, dtype=np.float32)[:, None]
    Rm = np.zeros((H, W), np.float32)
    Mu = np.zeros((H, W), np.float32)
    cover = {}
    jit = e["refl_jitter"]
    for k, (n, refl, mu) in enumerate(_LAYERS):
        lo = bounds[k].astype(np.float32)[None, :]
        hi = bounds[k + 1].astype(np.float32)[None, :]
        if float((bounds[k + 1] - bounds[k]).max()) <= 0.01:
            continue
        c = np.clip(np.minimum(rowc + 1, hi) - np.maximum(rowc, lo), 0.0, 1.0)
        if n in ("SRF", "SHRM", "SUBRPE"):
            cover[n] = c
        rv = refl * jit[k]
        if n == "SUBRPE" and e["subrpe_refl"] is not None:
            rv = e["subrpe_refl"]
        if n == "CHOROID":  # vessel lumens; fades towards the sclera (no hard choroid-sclera edge)
            ramp = 1.0 - 0.45 * np.clip((rowc - lo) / np.maximum(hi - lo, 1.0), 0.0, 1.0)
            Rm += c * geo["choroid_tex"][:H, :W] * jit[k] * ramp
        elif n == "SCLERA":
            Rm += c * rv * geo["sclera_fade"][:H, None]
        elif n in ("SHRM", "SUBRPE"):
            Rm += c * rv * geo["grain"][:H, :W]
        else:
            Rm += c * rv * _line_noise(rng, W, 6, 0.06)[None, :]
        Mu += c * mu
    # thin bright lines: ILM and ELM (external limiting membrane), Bruch's membrane
    ilm = tops["RNFL"]

    def line(z, s0):  # thin line that stays continuous on steep slopes
        sg = np.sqrt(s0 * s0 + (0.5 * np.abs(np.gradient(z))) ** 2).astype(np.float32)
        return np.exp(-0.5 * ((rowc - z[None, :].astype(np.float32)) / sg[None, :]) ** 2)

    Rm += 0.45 * line(ilm, 0.9)
    Rm += 0.28 * line(tops["MZ"], 0.7) * (t["MZ"] > 5)[None, :]

    masks: dict[str, np.ndarray] = {}

    def add_mask(name, m):
        if m.any():
            masks[name] = masks.get(name, np.zeros((H, W), bool)) | m

    # geographic atrophy: RPE loss (less reflection and attenuation) -> hyper-transmission into the choroid
    if e["ga"]:
        A = np.zeros(W)
        for spec in e["ga"]:
            A = np.maximum(A, _field(spec, X, Yc))
        rpe_c = np.clip(np.minimum(rowc + 1, tops["SUBRPE"][None, :]) - np.maximum(rowc, tops["RPE"][None, :]), 0, 1)
        Rm -= rpe_c * 0.65 * A[None, :].astype(np.float32)
        Mu -= rpe_c * 0.0105 * A[None, :].astype(np.float32)
        cho = (rowc >= tops["RPE"][None, :]) & (rowc < tops["SCLERA"][None, :])
        Rm += cho * (0.25 * A[None, :]).astype(np.float32)
        add_mask("atrophy", cho & (A[None, :] > 0.5))

    # ellipsoids: cysts / fluid pockets (dark), hyper-reflective foci and exudates (bright)
    for el in e["ell"]:
        q = ((y_mm - el["y0"]) / el["ry"]) ** 2
        if q >= 1.0:
            continue
        sc = math.sqrt(1.0 - q)
        rx = el["rx"] * sc
        j0 = int(np.searchsorted(X, el["x0"] - rx))
        j1 = int(np.searchsorted(X, el["x0"] + rx))
        if j1 <= j0 or j1 <= 0 or j0 >= W:
            continue
        jc = int(np.clip(np.searchsorted(X, el["x0"]), 0, W - 1))
        lay = el["layer"]
        top = tops[lay][jc]
        bot = bounds[_IDX[lay] + 1][jc]
        if el.get("fit"):  # cysts span their layer and may swell into neighbours
            zc = top + el["frac"] * (bot - top)
            rz = min(el["rz"] / dz, max(1.0, 0.55 * (tops["MZ"][jc] - tops["INL"][jc]))) * sc
        else:
            zc = top + el["frac"] * (bot - top)
            rz = el["rz"] / dz * sc
        rz = max(rz, 0.8)
        i0, i1 = int(max(0, math.floor(zc - rz - 2))), int(min(H, math.ceil(zc + rz + 2)))
        j0, j1 = max(0, j0 - 1), min(W, j1 + 1)
        if i1 <= i0:
            continue
        xx = X[j0:j1][None, :]
        zz = np.arange(i0, i1, dtype=np.float64)[:, None] + 0.5
        d = np.sqrt(((xx - el["x0"]) / max(rx, 1e-6)) ** 2 + ((zz - zc) / rz) ** 2)
        pxr = max(rx / (geo["span_mm"] / W), 0.5)
        a = np.clip((1.0 - d) * min(pxr, rz) + 0.5, 0, 1).astype(np.float32)
        sl = (slice(i0, i1), slice(j0, j1))
        Rm[sl] = Rm[sl] * (1 - a) + a * el["value"]
        Mu[sl] = Mu[sl] * (1 - a) + a * el["mu"]
        add_mask(el["mask"], _full(H, W, sl, a > 0.5))

    # inner retinal vessels: bright round section in the inner retina + strong shadow below
    for v in e["vessels"]:
        xv = v["x0"] + v["slope"] * y_mm
        j = int(np.searchsorted(X, xv))
        if not 2 <= j < W - 2:
            continue
        top, bot = ilm[j], tops["INL"][j]
        if bot - top < 3:
            continue
        zc = top + v["depth"] * (bot - top)
        rz = v["r_um"] / dz
        rx = v["r_um"] / 1000.0
        i0, i1 = int(max(0, zc - rz - 2)), int(min(H, zc + rz + 2))
        jj0, jj1 = int(np.searchsorted(X, xv - rx)) - 1, int(np.searchsorted(X, xv + rx)) + 1
        jj0, jj1 = max(0, jj0), min(W, jj1)
        if i1 <= i0 or jj1 <= jj0:
            continue
        xx = X[jj0:jj1][None, :]
        zz = np.arange(i0, i1)[:, None] + 0.5
        d = np.sqrt(((xx - xv) / rx) ** 2 + ((zz - zc) / rz) ** 2)
        a = np.clip((1 - d) * 3, 0, 1).astype(np.float32)
        sl = (slice(i0, i1), slice(jj0, jj1))
        Rm[sl] = Rm[sl] * (1 - a) + a * 0.8
        Mu[sl] = Mu[sl] * (1 - a) + a * 0.008

    # macular hole: full-thickness defect from the ILM to the RPE (tissue replaced by vitreous)
    h = e.get("hole")
    if h is not None:
        dxy = np.sqrt((X - h["x0"]) ** 2 + (y_mm - h["y0"]) ** 2)
        cols = np.nonzero(dxy < max(h["r_base"], h["r_top"]) * 1.05)[0]
        if cols.size:
            c0, c1 = cols[0], cols[-1] + 1
            top = ilm[c0:c1][None, :]
            bot = tops["RPE"][c0:c1][None, :]
            f = np.clip((rowc - top) / np.maximum(bot - top, 1.0), -1, 2)
            fm = h["f_min"]
            f = np.clip(f, -1.0, 1.0)
            rad = np.where(f < fm, h["r_min"] + (h["r_top"] - h["r_min"]) * ((fm - f) / fm) ** 2,
                           h["r_min"] + (h["r_base"] - h["r_min"]) * np.clip((f - fm) / (1 - fm), 0, None) ** 1.5)
            inside = (f >= -0.05) & (f <= 1.0) & (dxy[c0:c1][None, :] < rad) & (rowc < bot - 0.5)
            sl = (slice(0, H), slice(c0, c1))
            a = inside.astype(np.float32)
            Rm[sl] = Rm[sl] * (1 - a) + a * 0.008
            Mu[sl] = Mu[sl] * (1 - a)
            add_mask("hole", _full(H, W, sl, inside & (f >= 0.0)))
        op = e.get("operculum")
        if op is not None:
            xv = op["x0"]
            j = int(np.clip(np.searchsorted(X, xv), 0, W - 1))
            if abs(y_mm - h["y0"]) < op["rx"]:
                sc = math.sqrt(max(0.0, 1 - ((y_mm - h["y0"]) / op["rx"]) ** 2))
                zc = ilm[max(0, min(W - 1, j - int(0.6 * W / geo["span_mm"])))] - op["h_um"] / dz
                rz, rx = op["rz"] / dz * sc, op["rx"] * sc
                d = np.sqrt(((X[None, :] - xv) / max(rx, 1e-3)) ** 2 + ((rowc - zc) / max(rz, 0.8)) ** 2)
                Rm += np.clip((1 - d) * 2, 0, 1).astype(np.float32) * 0.5

    # lesion layers -> masks
    if "SRF" in cover:
        add_mask(e["srf_mask"], cover["SRF"] > 0.5)
    if "SHRM" in cover:
        add_mask("cnv", cover["SHRM"] > 0.5)
    if "SUBRPE" in cover:
        add_mask(e["subrpe_mask"], cover["SUBRPE"] > 0.5)

    # cumulative attenuation (double pass): shadows below vessels/exudates/SHRM, hyper-transmission in atrophy
    od = np.cumsum(Mu, axis=0) * dz
    od = np.vstack([np.zeros((1, W), np.float32), od[:-1]])
    T = np.exp(-2.0 * od) * geo["rolloff"][:H, None] * geo["lateral"][None, :W]
    info = {"ilm": ilm, "bm": bm, "rpe": tops["RPE"], "dz": dz, "x_mm": X,
            "central_thickness_um": float(np.mean((bm - ilm)[np.abs(X) < 0.5]) * dz) if np.any(np.abs(X) < 0.5)
            else float(np.mean(bm - ilm) * dz)}
    return np.clip(Rm, 0, 1.2).astype(np.float32), T.astype(np.float32), masks, info


def _full(H, W, sl, m):
    out = np.zeros((H, W), bool)
    out[sl] = m
    return out


def sample_geometry(rng: np.random.Generator, width: int, height: int) -> dict:
    """Camera/scan geometry, independent of the label (one per eye; shared by all slices of a volume)."""
    H, W = int(height), int(width)
    depth_um = 3.9 * 496 * rng.uniform(0.97, 1.03)
    g = {"span_mm": rng.uniform(5.6, 6.4), "depth_um": depth_um}
    g["fovea_x_mm"] = rng.normal(0, 0.2)
    g["bm_um"] = depth_um * rng.uniform(0.5, 0.7)
    g["tilt_um"] = rng.uniform(-160, 160)
    g["curv_um"] = rng.uniform(-40, 230)
    g["wobble_um"] = rng.uniform(0, 12)
    g["wob_f"] = rng.uniform(1, 4)
    g["wob_p"] = rng.uniform(0, 2 * math.pi)
    g["slice_tilt_um"] = rng.uniform(-30, 30)
    # keep the retina and the top of the choroid inside the frame
    edge = abs(g["tilt_um"]) + max(g["curv_um"], 0)
    lo = 420 + edge + 20 + max(-g["curv_um"], 0)
    hi = depth_um - 330 - edge
    g["bm_um"] = float(np.clip(g["bm_um"], lo, max(lo, hi)))
    g.update(slice_textures(rng, H, W))
    g["sclera_fade"] = np.linspace(1.0, 0.55, H).astype(np.float32)
    g["rolloff"] = np.exp(-np.linspace(0, 1, H) * rng.uniform(0.1, 0.5)).astype(np.float32)
    g["lateral"] = (1.0 - rng.uniform(0.0, 0.25) * np.abs(np.linspace(-1, 1, W)) ** 2).astype(np.float32)
    g["speckle_k"] = rng.uniform(1.0, 2.5)
    g["psf"] = (rng.uniform(0.5, 1.0) * H / 496.0, rng.uniform(0.5, 1.0) * W / 512.0)
    g["dyn_db"] = rng.uniform(30, 38)
    g["gamma"] = rng.uniform(0.85, 1.25)
    g["gain_db"] = rng.uniform(-2.0, 1.0)
    return g


def slice_textures(rng: np.random.Generator, H: int, W: int) -> dict:
    """Choroidal vessel pattern and material grain for one B-scan."""
    g = {}
    ch = rng.standard_normal((max(4, H // 5), max(4, W // 10)))
    lum = np.asarray(ndimage.zoom(ch, (H / ch.shape[0], W / ch.shape[1]), order=1), np.float32)[:H, :W]
    lum = np.pad(lum, ((0, max(0, H - lum.shape[0])), (0, max(0, W - lum.shape[1]))), mode="edge")
    lum = ndimage.gaussian_filter(lum, (H / 400.0, W / 300.0))
    g["choroid_tex"] = (0.64 * (1.0 - 0.5 / (1.0 + np.exp(-(lum - 0.3) * 2.5)))).astype(np.float32)
    gr = ndimage.gaussian_filter(rng.standard_normal((H, W)).astype(np.float32), 1.5)
    g["grain"] = (1.0 + 0.08 * gr / (gr.std() + 1e-6)).astype(np.float32)
    return g


def compress(I: np.ndarray, T: np.ndarray, geo: dict, rng: np.random.Generator) -> np.ndarray:
    """Display reflectivity I and transmission T -> linear power, multiplicative speckle + noise floor, then log
    compression to [0,1]."""
    H, W = I.shape
    k = geo["speckle_k"]
    S = rng.gamma(k, 1.0 / k, (H, W)).astype(np.float32)
    S = ndimage.gaussian_filter(S, (0.6, 1.1))
    S /= S.mean()
    dyn = geo["dyn_db"]
    floor = 10 ** (-dyn / 10)
    N = rng.exponential(1.0, (H, W)).astype(np.float32)
    N = ndimage.gaussian_filter(N, (0.5, 0.8))
    lin = np.power(10.0, (I - 1.0) * (dyn / 10.0), dtype=np.float32) * T
    lin = ndimage.gaussian_filter(lin, geo["psf"])
    Is = lin * S + floor * 0.6 * N
    D = 10.0 * np.log10(Is + 1e-9)
    hi = geo["gain_db"]
    lo = hi - geo["dyn_db"]
    out = np.clip((D - lo) / (hi - lo), 0, 1) ** geo["gamma"]
    return out.astype(np.float32)


def oct_phantom(label, seed: int, width: int = 512, height: int = 496, *, patient_seed: int | None = None,
                eye: str | None = None, patient: dict | None = None, without: tuple[str, ...] = ()) -> Phantom:
    """One macular OCT B-scan through the fovea. label in OCT8 (CNV, DME, DRUSEN, NORMAL are the OCT4 subset).
    `without` (see `leave_out`) re-renders the same B-scan with part of its disease removed (a counterfactual);
    meta["patient_seed"] records `patient_seed`, which with `seed` is all a re-render needs."""
    label = canonical_oct_label(label)
    W, H = int(width), int(height)
    if not (32 <= W <= 4096 and 32 <= H <= 4096):
        raise ValueError("width/height must be in [32, 4096]")
    r_anat, r_geo, r_les, r_noise, r_pat = streams(seed, 5, tag=21)
    if patient_seed is not None:
        r_pat, r_anat = streams(patient_seed, 2, tag=22)
    patient = merge_patient(sample_patient(r_pat, FAMILY[label], eye), patient)
    e = leave_out(sample_eye(label, r_anat, r_les, patient["eye"], y_spread=0.15), tuple(without))
    geo = sample_geometry(r_geo, W, H)
    I, T, masks, info = render_bscan(e, geo, 0.0, W, H, r_noise)
    img = compress(I, T, geo, r_noise)
    out = (img * 255 + 0.5).astype(np.uint8)
    fovea_x = float((geo["fovea_x_mm"] + geo["span_mm"] / 2) / geo["span_mm"] * W)
    jf = int(np.clip(fovea_x, 0, W - 1))
    meta = {"seed": int(seed), "patient_seed": None if patient_seed is None else int(patient_seed), **patient,
            "fovea_x": fovea_x, "width": W, "height": H,
            "ilm_y_fovea": float(info["ilm"][jf]), "rpe_y_fovea": float(info["rpe"][jf]),
            "bm_y_fovea": float(info["bm"][jf]),
            "span_mm": geo["span_mm"], "central_thickness_um": info["central_thickness_um"],
            "lesion_counts": {k: 1 for k in masks}}
    return Phantom(image=out, masks=masks, label=label, modality=Modality.OCT, meta=to_jsonable(meta))
