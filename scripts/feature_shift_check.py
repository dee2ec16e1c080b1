"""Can a fundus model's own features tell photographs of another set from its own? (numbers only)

    python scripts/feature_shift_check.py                                   # the bundled fundus_resnet18_head
    python scripts/feature_shift_check.py fundus_disc_resnet18_head runs/real/fundus_disc_resnet18_head

The model's trunk features (`net.forward_features`, averaged over space) of its training split give a mean and a
Ledoit-Wolf covariance; each photograph's Mahalanobis distance to them is its "unfamiliarity". The AUROC of that
distance separating the model's own test split (in) from another set's photographs (out: every Mexico fundus
photograph, the IDRiD photographs) says whether a "this photograph is unlike the training set" warning built on
these features could fire where the model's answers stop holding (its DR output on the Mexico photographs,
docs/real_data.md). Also: the share of each set above the 95th and 99th percentile of the validation split's
distances (the thresholds such a warning would use). Photographs are read as the app reads them (long side
SCREEN_SIDE) and framed as the weights were trained. Splits as `evaluate` re-derives them from the manifest.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from retina_core.evaluate.run import load_member, split_records
from retina_core.io.datasets import load_dataset
from retina_core.io.decode import SCREEN_SIDE, read_image
from retina_core.io.realsets import realdata_root


def features(model, paths, batch: int = 32) -> np.ndarray:
    dtype = next(model.net.parameters()).dtype
    out = []
    for i in range(0, len(paths), batch):
        x = torch.cat([model.preprocess(read_image(p, max_side=SCREEN_SIDE).pixels) for p in paths[i:i + batch]])
        with torch.no_grad():
            f = model.net.forward_features(x.to(model.device, dtype))
        out.append(f.float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(out)


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "fundus_resnet18_head"
    weights_dir = argv[1] if len(argv) > 1 else None
    root = realdata_root()
    if root is None:
        print("../shared/realdata is absent (or set RETINA_REALDATA): nothing to check.")
        return 2
    model = load_member(name, weights_dir)
    seed = (model.entry.get("config") or {}).get("seed", 0)
    own = root / "eye_disease_4class"
    feats = {s: features(model, [r.path for r in split_records(model, own, s, seed)[0]])
             for s in ("train", "val", "test")}
    for other in ("mexico_fundus_dme_dr", "idrid_lesions"):
        feats[other] = features(model, [r.path for r in load_dataset(root / other).records])
    lw = LedoitWolf().fit(feats["train"])

    def dist(a):
        z = a - lw.location_
        return np.sqrt(np.einsum("ij,jk,ik->i", z, lw.precision_, z))

    d = {k: dist(v) for k, v in feats.items()}
    t95, t99 = np.percentile(d["val"], 95), np.percentile(d["val"], 99)
    print(f"{name}: Mahalanobis distance of trunk features to its training split (n = {len(d['train'])})")
    print(f"{'set':<24}{'n':>6}{'median':>9}{'> val p95':>11}{'> val p99':>11}{'AUROC vs own test':>19}")
    for k, v in d.items():
        auc = "" if k in ("train", "val", "test") else \
            f"{roc_auc_score(np.r_[np.zeros(len(d['test'])), np.ones(len(v))], np.r_[d['test'], v]):.3f}"
        print(f"{k:<24}{len(v):>6}{np.median(v):>9.1f}{np.mean(v > t95):>11.3f}{np.mean(v > t99):>11.3f}{auc:>19}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
