"""OCT volumes (stacks of neighbouring B-scans through one virtual eye) and paired fundus + OCT phantoms."""

from __future__ import annotations

import numpy as np

from ..labels import OCT8
from ..modality import Modality
from ._common import Phantom, merge_patient, sample_patient, streams, to_jsonable
from .fundus import fundus_phantom
from .oct import (FAMILY, WITHOUT, canonical_oct_label, compress, leave_out, oct_phantom, render_bscan,  # noqa: F401
                  sample_eye, sample_geometry, slice_textures)

VOLUME_LABELS = ("normal", "disease") + tuple(OCT8)
DISEASE_CLASSES = tuple(c for c in OCT8 if c != "NORMAL")

# clinical values per OCT class: visual acuity (logMAR) mean shift, HbA1c mean (%) -- realistic direction, with noise
_VA_SHIFT = {"NORMAL": 0.0, "DR": 0.1, "DRUSEN": 0.1, "AMD": 0.45, "CNV": 0.6, "CSR": 0.3, "DME": 0.45, "MH": 0.7}
_HBA1C = {"DR": 8.0, "DME": 8.4}


def _volume_class(label: str, rng: np.random.Generator) -> tuple[str, str]:
    s = str(label).strip()
    if s.lower() == "normal":
        return "normal", "NORMAL"
    if s.lower() == "disease":
        return "disease", DISEASE_CLASSES[int(rng.integers(len(DISEASE_CLASSES)))]
    c = canonical_oct_label(s)
    return c, c


def clinical_values(oct_class: str, age: int, cst_um: float, rng: np.random.Generator) -> dict:
    """Metadata correlated with disease (noisy on purpose: the image must still matter)."""
    va = 0.0 + 0.004 * max(0, age - 50) + _VA_SHIFT.get(oct_class, 0.0) * rng.uniform(0.4, 1.3) + rng.normal(0, 0.1)
    hba1c = rng.normal(_HBA1C.get(oct_class, 5.7), 0.8)
    return {"va_logmar": round(float(np.clip(va, -0.2, 2.0)), 2), "cst_um": round(float(cst_um), 1),
            "hba1c": round(float(np.clip(hba1c, 4.3, 13.0)), 1)}


def oct_volume(label, seed: int, n_slices: int = 32, height: int = 128, width: int = 128, *,
               patient: dict | None = None, without: tuple[str, ...] = ()) -> Phantom:
    """OCT cube through the macula: float32 [D,H,W] in [0,1], fovea in the middle slice (index D//2).

    label: "normal", "disease" (a random OCT8 disease class, stored in meta["oct_class"]) or an OCT8 class.
    Lesions live in 3D (en-face mm x depth), so they are consistent across neighbouring slices. Slices are spaced
    evenly over a square scan (6 mm x ~6 mm). `without` (see `leave_out`) re-renders the same eye with part of its
    disease removed: a counterfactual that tells whether a model uses that part.
    """
    D, H, W = int(n_slices), int(height), int(width)
    if not (1 <= D <= 512 and 16 <= H <= 2048 and 16 <= W <= 2048):
        raise ValueError("volume dimensions out of range")
    r_anat, r_geo, r_les, r_noise, r_pat, r_cls, r_clin = streams(seed, 7, tag=31)
    label, oct_class = _volume_class(label, r_cls)
    pat = merge_patient(sample_patient(r_pat, FAMILY[oct_class]), patient)
    e = leave_out(sample_eye(oct_class, r_anat, r_les, pat["eye"], y_spread=1.0), tuple(without))
    geo = sample_geometry(r_geo, W, H)
    spacing = geo["span_mm"] / D
    vol = np.empty((D, H, W), np.float32)
    masks: dict[str, np.ndarray] = {}
    cst = None
    for i in range(D):
        y = (i - D // 2) * spacing
        g = dict(geo)
        if i:
            g.update(slice_textures(r_noise, H, W))
        I, T, m, info = render_bscan(e, g, y, W, H, r_noise)
        vol[i] = compress(I, T, g, r_noise)
        for k, v in m.items():
            if k not in masks:
                masks[k] = np.zeros((D, H, W), bool)
            masks[k][i] = v
        if i == D // 2:
            cst = info["central_thickness_um"]
    fovea_x = float((geo["fovea_x_mm"] + geo["span_mm"] / 2) / geo["span_mm"] * W)
    meta = {"seed": int(seed), **pat, "laterality": pat["eye"], "oct_class": oct_class, "fovea_x": fovea_x,
            "fovea_slice": D // 2, "slice_spacing_mm": spacing, "span_mm": geo["span_mm"],
            "axial_um_per_px": geo["depth_um"] / H, **clinical_values(oct_class, pat["age"], cst, r_clin),
            "lesion_counts": {k: int(v.any(axis=(1, 2)).sum()) for k, v in masks.items()}}
    return Phantom(image=vol, masks=masks, label=label, modality=Modality.OCT_VOLUME, meta=to_jsonable(meta))


# fundus / OCT classes of the same disease process
_PAIR_DISEASE = [
    ("diabetic", [("Moderate", 0.45), ("Severe", 0.3), ("Proliferative DR", 0.25)], [("DME", 0.6), ("DR", 0.4)]),
    ("macular_degeneration", [("amd", 1.0)], [("AMD", 0.4), ("DRUSEN", 0.35), ("CNV", 0.25)]),
]


def paired_phantoms(seed: int, *, fundus_size: int = 512, oct_width: int = 512, oct_height: int = 496,
                    disease: bool | None = None) -> tuple[Phantom, Phantom]:
    """Fundus + OCT B-scan of the same virtual eye (same patient_id, eye, age, sex) with consistent disease.

    Both phantoms carry label "normal" or "disease"; meta holds the specific classes ("fundus_class", "oct_class",
    "disease_process").
    """
    r_pick, r_pat = streams(seed, 2, tag=41)
    if disease is None:
        disease = bool(r_pick.random() < 0.5)
    if disease:
        proc, f_opts, o_opts = _PAIR_DISEASE[int(r_pick.random() < 0.45)]
        f_cls = f_opts[int(r_pick.choice(len(f_opts), p=[p for _, p in f_opts]))][0]
        o_cls = o_opts[int(r_pick.choice(len(o_opts), p=[p for _, p in o_opts]))][0]
        fam = "dr" if proc == "diabetic" else "amd"
    else:
        proc, f_cls, o_cls, fam = "none", "No DR", "NORMAL", "normal"
    pat = sample_patient(r_pat, fam)
    sub = np.random.SeedSequence([abs(int(seed)), 4242]).generate_state(2)
    f = fundus_phantom(f_cls, int(sub[0]), fundus_size, patient=pat)
    o = oct_phantom(o_cls, int(sub[1]), oct_width, oct_height, patient=pat)
    lab = "disease" if disease else "normal"
    extra = {"pair_seed": int(seed), "fundus_class": f_cls, "oct_class": o_cls, "disease_process": proc}
    f.label, o.label = lab, lab
    f.meta.update(extra)
    o.meta.update(extra)
    return f, o
