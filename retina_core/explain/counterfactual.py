"""Counterfactual phantoms: does the model use the lesions its map is asked to point at?

The pointing game scores a map against the lesion masks. It presumes the model's decision rests on those lesions.
On phantoms that can be checked directly: each held-out volume is re-rendered from its seed as the same eye with
part of its disease left out (`phantoms.volume.leave_out`), and P(disease) is compared:

- "without_ellipsoids": no intraretinal cysts, hyper-reflective foci or hard exudates (the masked lesions of the
  DR and DME phantoms, and the cysts around a macular hole);
- "without_thickening": no diffuse swelling of the neural retina (drawn by the DR, DME, CNV and MH phantoms; no
  mask marks it).

If leaving the masked lesions out does not lower P(disease), the model does not use them, and a map that pointed at
them would not be faithful to it. Each figure is reported with the clinical record as given and with no record (the
app's common case: a NIfTI uploaded alone). The record is the original eye's in every variant (its central subfield
thickness included), so the no-record figures are the clean comparison of the images. Only phantom volume sets can be re-rendered: the data set must carry
`phantom_meta.csv` (as `data phantoms --kind oct-volume` writes), and every re-rendered original must match the
stored volume, or the data set is refused (made by another version of the generator).
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..errors import RetinaInputError
from . import trust
from .evaluate_nd import (_records, _resize_mask_3d, _resize_volume, _resolve, _union, _volume_predict,
                          meta_tensor_of, pick_round_robin, volume_map)

VARIANTS = {"original": (), "without_ellipsoids": ("ellipsoids",), "without_thickening": ("thickening",)}
MATCH_TOLERANCE = 0.02   # max |stored - re-rendered| (intensity in [0, 1]); NIfTI storage rounds a little


def _phantom_rows(root: Path) -> dict[str, dict]:
    path = root / "phantom_meta.csv"
    if not path.is_file():
        raise RetinaInputError(f"{root} has no phantom_meta.csv: counterfactuals re-render phantom volumes from their "
                               "seeds, so they need a set made with `python -m retina_core data phantoms --kind "
                               "oct-volume`.")
    with path.open(newline="") as fh:
        rows = {Path(r.get("path", "")).name: r for r in csv.DictReader(fh)}
    if not rows or not {"seed", "oct_class"} <= set(next(iter(rows.values()))):
        raise RetinaInputError(f"{path} has no seed / oct_class columns: it was not written by `data phantoms --kind "
                               "oct-volume`.")
    return rows


def volume_lesion_reliance(model, data_path, n: int | None = None, split: str | None = "all", seed: int = 0,
                           weights_dir=None) -> dict:
    """Per disease class of a phantom volume set: how P(disease) changes when the same eyes are re-rendered without
    their ellipsoidal lesions or without their diffuse thickening, with and without the clinical record, next to
    the pointing game of the model's 3-D Grad-CAM on the originals. n: volumes drawn round-robin over the labels
    (None: all); split as in explain-eval ("all" for a set the model never saw)."""
    from ..io.decode import read_image
    from ..phantoms.volume import oct_volume

    m = _resolve(model, weights_dir)
    if m.cfg.modality != "oct_volume":
        raise RetinaInputError(f"Counterfactual phantoms are implemented for the OCT volume models; {m.name} is a "
                               f"{m.cfg.modality} model.")
    root = Path(data_path).expanduser()
    recs, used = _records(m, root, split)
    rows = _phantom_rows(root)
    size = tuple(m.cfg.input_size[1:])
    tol = trust.default_tolerance(size[1:])
    per: dict[str, list[dict]] = defaultdict(list)
    picked = pick_round_robin(recs, len(recs) if n is None else int(n), seed)
    for r in picked:
        row = rows.get(Path(r.path).name)
        if row is None:
            raise RetinaInputError(f"{Path(r.path).name} is not in {root / 'phantom_meta.csv'}.")
        cls = row["oct_class"]
        if cls == "NORMAL":
            continue
        stored = np.asarray(read_image(r.path).pixels, np.float32)
        meta_t = meta_tensor_of(m, r.meta, r.eye)
        no_record = torch.full_like(meta_t, float("nan"))
        out: dict = {}
        original = None
        for name, without in VARIANTS.items():
            vol = oct_volume(cls, int(row["seed"]), *stored.shape, without=without)
            v = vol.image.astype(np.float32)
            if name == "original":
                err = float(np.abs(v - stored).max())
                if err > MATCH_TOLERANCE:
                    raise RetinaInputError(f"{Path(r.path).name} does not re-render from its seed (max difference "
                                           f"{err:.3f}): the set was made by another version of the phantom "
                                           "generator, so no counterfactual can be drawn from it.")
                original, mask = v, _union(vol.masks, v.shape)
            elif np.array_equal(v, original):
                out[name] = None                     # nothing of that kind in this eye
                continue
            x = _resize_volume(v, size)
            p, hm = volume_map(m, m.net, x, meta_t, "gradcam")
            p0 = float(_volume_predict(m, no_record)(x[None])[0])
            out[name] = {"p": float(p), "p_no_record": p0}
            if name == "original" and mask.any():
                out["pointing_game"] = float(trust.pointing_game_3d(hm, _resize_mask_3d(mask, size), tol))
        per[cls].append(out)
    if not per:
        raise RetinaInputError(f"No diseased volume among the {len(picked)} drawn from {data_path} ({used}).")
    return {"data": str(data_path), "split": used, "n_volumes": sum(len(v) for v in per.values()),
            "per_class": {c: _summarise(v) for c, v in sorted(per.items())},
            "note": ("P(disease) of the same phantom eyes re-rendered without part of their disease (means over the "
                     "class; with the record as given and with none). A lesion the model uses lowers P when it is "
                     "left out; where it does not, a map pointing at it would not be faithful to the model.")}


def _summarise(items: list[dict]) -> dict:
    res: dict = {"n": len(items)}
    pg = [o["pointing_game"] for o in items if "pointing_game" in o]
    res["pointing_game"] = float(np.mean(pg)) if pg else None
    for name in VARIANTS:
        got = [o[name] for o in items if o.get(name)]
        res[name] = None if not got else {
            "n": len(got),
            "p_disease": float(np.mean([g["p"] for g in got])),
            "called": int(sum(g["p"] >= 0.5 for g in got)),
            "p_disease_no_record": float(np.mean([g["p_no_record"] for g in got])),
            "called_no_record": int(sum(g["p_no_record"] >= 0.5 for g in got)),
        }
        if name != "original" and got:               # the change on the same eyes, not two different means
            pairs = [(o["original"], o[name]) for o in items if o.get(name)]
            res[name]["drop"] = float(np.mean([a["p"] - b["p"] for a, b in pairs]))
            res[name]["drop_no_record"] = float(np.mean([a["p_no_record"] - b["p_no_record"] for a, b in pairs]))
    return res


def table_rows(rep: dict) -> list[dict]:
    """One row per phantom class of `volume_lesion_reliance` (the app's table): eyes, pointing game, mean P(disease)
    with / without the record for the originals and each variant, and the paired drop (None: no such lesion)."""
    rows = []
    for c, s in rep["per_class"].items():
        row = {"class": c, "eyes": s["n"], "pointing game": s["pointing_game"],
               "P original": s["original"]["p_disease"], "P original, no record": s["original"]["p_disease_no_record"]}
        for name, what in (("without_ellipsoids", "no cysts/foci"), ("without_thickening", "no swelling")):
            v = s.get(name)
            row[f"P {what}"] = v["p_disease"] if v else None
            row[f"P {what}, no record"] = v["p_disease_no_record"] if v else None
            row[f"drop {what}, no record"] = v["drop_no_record"] if v else None
        rows.append(row)
    return rows


def format_lines(rep: dict) -> list[str]:
    """A readable table of `volume_lesion_reliance`."""
    lines = [f"Counterfactual phantoms ({rep['n_volumes']} diseased volumes, {rep['data']}, split {rep['split']}): "
             "mean P(disease) with record / without record",
             f"{'class':8s} {'n':>3s} {'PG':>5s}  {'original':>13s}  {'no ellipsoids':>13s}  {'no thickening':>13s}"]

    def cell(v):
        return f"{v['p_disease']:.2f} / {v['p_disease_no_record']:.2f}" if v else "-"

    for c, s in rep["per_class"].items():
        pg = "-" if s["pointing_game"] is None else f"{s['pointing_game']:.2f}"
        lines.append(f"{c:8s} {s['n']:3d} {pg:>5s}  {cell(s['original']):>13s}  {cell(s['without_ellipsoids']):>13s}  "
                     f"{cell(s['without_thickening']):>13s}")
    lines.append(rep["note"])
    return lines
