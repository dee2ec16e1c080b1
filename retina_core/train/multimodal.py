"""Training for the two-input models; `engine.train` routes them here (same CLI, same outputs).

- fundus_oct_fusion (modality "fundus+oct"): the encoders are frozen, so each image is embedded once (no
  augmentation) and only the MLP head trains on the cached embeddings. True pairs come from a `pairs.csv` data set;
  virtual pairs from a fundus data set (`--data`) and an OCT data set (`--pair-with`): every epoch each fundus image
  is paired with a random OCT image of the same binary label (normal vs disease) from the same split; validation
  and test pairs are drawn once with the seed.

      python -m retina_core train --model fundus_oct_fusion --data data/paired --out runs/fusion
      python -m retina_core train --model fundus_oct_fusion --data data/fundus_dr --pair-with data/oct --out runs/f

- oct_volume_fusion3d[_tiny] (modality "oct_volume"): NIfTI volumes + metadata.csv; binary focal loss (dynamic
  alpha, label smoothing); flips, intensity jitter and small shifts; metadata standardised with training statistics.
  `--lesion-cam-guidance W` adds the lesion-mask guidance of the 3-D Grad-CAM (VolumeLesionCamGuidance; lesion
  masks as ``masks/<volume path without .nii.gz>/*.nii.gz``, the layout `explain-eval` reads).

      python -m retina_core train --model oct_volume_fusion3d_tiny --data data/volumes --out runs/vol --fusion concat

Both recipes give the one training loop (`fit` and `finish`, train/loop.py) their step and validation, so they write
`<out>/<model>.safetensors` (fp16) + `<out>/manifest.json` + history.json like the image recipe, train data-parallel
under torchrun, and fit a calibration temperature on the validation split.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ..errors import RetinaInputError
from ..evaluate.metrics import classification_metrics
from ..io.datasets import training_splits
from ..modality import Modality
from ..models.loading import default_device, preprocess_image
from ..models.multimodal import FUSION_CLASSES, binary_label
from ..models.predict import decode_volumes, metadata_matrix
from ..models.registry import create_model, get_cfg
from ..models.volume3d import POOL_TYPES, VOLUME_CLASSES
from .common import TrainConfig, architecture_kwargs, is_phantom_set, monitor_score, volume_only_options
from .guidance import VolumeAttentionMining, VolumeLesionCamGuidance
from .loop import finish, fit, start_run
from .losses import FocalLoss

log = logging.getLogger(__name__)


def train_multimodal(model_name: str, data, out, cfg_t: TrainConfig, data_note: str | None = None,
                     ctx=None) -> dict:
    modality = get_cfg(model_name).modality
    if modality != Modality.OCT_VOLUME and (cfg_t.global_pool or cfg_t.output_stride):
        opt = "--global-pool" if cfg_t.global_pool else "--output-stride"
        raise RetinaInputError(f"{opt} does not apply to {model_name} (2-D CNNs and the volume models' 3D ResNet "
                               "only).")
    if cfg_t.global_pool and cfg_t.global_pool not in POOL_TYPES:
        raise RetinaInputError(f"--global-pool must be one of {', '.join(POOL_TYPES)} for {model_name}, got "
                               f"{cfg_t.global_pool!r}.")
    if cfg_t.healthy_cam_penalty:
        raise RetinaInputError(f"--healthy-cam-penalty is not implemented for {model_name} (2-D timm CNNs only).")
    if modality != Modality.OCT_VOLUME and (flags := volume_only_options(cfg_t)):
        raise RetinaInputError(f"{flags[0]} is not implemented for {model_name} (the OCT volume models only).")
    if not 0.0 <= cfg_t.meta_dropout < 1.0:
        raise RetinaInputError(f"--meta-dropout is a probability in [0, 1), got {cfg_t.meta_dropout:g}.")
    if cfg_t.lesion_only and not cfg_t.lesion_seg:
        raise RetinaInputError("--lesion-only makes the image branch the dense lesion read-out's evidence alone; it "
                               "needs the read-out trained: add --lesion-seg W (e.g. 1).")
    if cfg_t.lesion_cam_guidance and modality != Modality.OCT_VOLUME:
        raise RetinaInputError(f"--lesion-cam-guidance is not implemented for {model_name} (2-D timm CNNs and the "
                               "OCT volume models only).")
    if modality == Modality.FUNDUS_OCT:
        return train_fusion(model_name, data, out, cfg_t, data_note, ctx)
    if modality == Modality.OCT_VOLUME:
        return train_volume(model_name, data, out, cfg_t, data_note, ctx)
    raise RetinaInputError(f"{model_name} is not a multimodal model.")


# ------------------------------------------------------------------------------------------------ fundus + OCT
@torch.no_grad()
def embed_images(encode, enc_cfg, paths, device, batch_size: int = 32) -> torch.Tensor:
    """Pooled embeddings [N, d] of image files (decoded by read_image, preprocessed with the encoder's cfg)."""
    from ..io.decode import read_image

    out = []
    for i in range(0, len(paths), batch_size):
        x = torch.cat([preprocess_image(read_image(p).pixels, enc_cfg, device) for p in paths[i:i + batch_size]])
        out.append(encode(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


class VirtualPairs(Dataset):
    """Each item pairs fundus i with an OCT embedding of the same label, re-drawn every epoch (set_epoch); the
    epoch length is the larger of the two sets (the smaller one is cycled)."""

    def __init__(self, f_emb, f_y, o_emb, o_y, seed: int):
        self.f_emb, self.f_y, self.o_emb, self.o_y, self.seed = f_emb, f_y, o_emb, o_y, seed
        self.pools = {int(c): torch.nonzero(o_y == c).flatten() for c in torch.unique(f_y)}
        missing = [int(c) for c, pool in self.pools.items() if len(pool) == 0]
        if missing:
            raise RetinaInputError(f"The OCT data set has no {FUSION_CLASSES[missing[0]]} image to pair with.")
        self.n = max(len(f_y), len(o_y))
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        fi = torch.randperm(self.n, generator=g) % len(self.f_y)
        oi = torch.empty_like(fi)
        for c, pool in self.pools.items():
            sel = self.f_y[fi] == c
            oi[sel] = pool[torch.randint(len(pool), (int(sel.sum()),), generator=g)]
        self.fi, self.oi = fi, oi

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.f_emb[self.fi[i]], self.o_emb[self.oi[i]], self.f_y[self.fi[i]]

    def fixed(self) -> TensorDataset:
        return TensorDataset(self.f_emb[self.fi], self.o_emb[self.oi], self.f_y[self.fi])


def _fusion_sources(data, cfg_t: TrainConfig, classes=FUSION_CLASSES):
    """(index, splits, {split: (fundus paths, oct paths or None, labels)}, oct index or None, pairing). Labels
    that are among `classes` are kept (e.g. DME / noDME); others map to normal vs disease (`binary_label`)."""
    from ..io.datasets import load_dataset

    index = load_dataset(data)
    if index.layout == "paired":
        splits = training_splits([replace(r, label=r.label if r.label in classes else binary_label(r.label))
                         for r in index.records], cfg_t.seed, cfg_t.split_fractions, cfg_t.split_by)
        per = {k: ([r.path for r in v], [Path(r.meta["oct"]) for r in v], [r.label for r in v])
               for k, v in splits.items()}
        return index, splits, per, None, "true pairs"
    if not cfg_t.pair_with:
        raise RetinaInputError(f"{data} is a {index.layout} data set. fundus_oct_fusion trains on pairs.csv (true "
                               f"pairs), or on a fundus data set plus an OCT data set given with --pair-with "
                               f"(virtual pairs of the same label).")
    oct_index = load_dataset(cfg_t.pair_with)
    fs = training_splits([replace(r, label=binary_label(r.label)) for r in index.records], cfg_t.seed)
    os_ = training_splits([replace(r, label=binary_label(r.label)) for r in oct_index.records], cfg_t.seed)
    per = {k: ([r.path for r in fs.get(k, [])], [r.path for r in os_.get(k, [])],
               ([r.label for r in fs.get(k, [])], [r.label for r in os_.get(k, [])])) for k in ("train", "val", "test")}
    splits = {k: fs.get(k, []) for k in ("train", "val", "test")}
    return index, splits, per, oct_index, "virtual pairs"


def train_fusion(model_name, data, out, cfg_t: TrainConfig, data_note=None, ctx=None) -> dict:
    """The fusion recipe: the MLP head on cached embeddings of frozen encoders, cross-entropy with the run's label
    smoothing; only the head is trained, stored and tied to its encoders' sha256 in the manifest entry."""
    out = start_run(out, cfg_t, ctx)
    net = _fusion_net(model_name, cfg_t)
    device = ctx.device if ctx else default_device()
    net.to(device).eval()
    classes = tuple(net.cfg.classes)
    index, splits, per, oct_index, pairing = _fusion_sources(data, cfg_t, classes)
    sets = _fusion_sets(net, per, pairing, classes, cfg_t.seed, device)

    def head_logits(head, f, o):
        return head(torch.cat([f, o], dim=1).to(device))

    def step(head, batch):
        f, o, y = batch
        return F.cross_entropy(head_logits(head, f, o), y.to(device), label_smoothing=cfg_t.label_smoothing)

    @torch.no_grad()
    def logits_of(split: str) -> tuple[np.ndarray, np.ndarray]:
        net.eval()
        f, o, y = sets[split].tensors
        return head_logits(net.head, f, o).float().cpu().numpy(), y.numpy()

    def evaluate() -> tuple[dict, float]:
        z, y = logits_of("val")
        m = classification_metrics(y, torch.softmax(torch.from_numpy(z), 1).numpy(), list(classes))
        if cfg_t.monitor == "val_loss":   # the head's training loss on the validation pairs
            m["val_loss"] = float(F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y),
                                                  label_smoothing=cfg_t.label_smoothing))
        return m, monitor_score(m, cfg_t.monitor)

    fitted = fit(net.head, sets["train"], step, evaluate, cfg_t, ctx, device)
    note = data_note
    if note is None and oct_index is not None:
        kind = "synthetic phantoms" if is_phantom_set(Path(data)) and is_phantom_set(Path(cfg_t.pair_with)) else "data"
        note = (f"{kind}, virtual pairs: fundus {index.layout} ({data}) x OCT {oct_index.layout} "
                f"({cfg_t.pair_with}), same binary label")
    return finish(net, model_name, out, cfg_t, ctx, fitted, index=index, splits=splits, data=data, data_note=note,
                  logits=logits_of, test="test" in sets, state=net.head_state_dict(),
                  extra={"encoders": net.encoder_info(), "pairing": pairing, "head_only": True})


def _fusion_net(model_name: str, cfg_t: TrainConfig) -> nn.Module:
    """The fusion model with its encoders from cfg_t.encoders_dir (at cfg_t.image_size when given); its cfg takes
    the fundus encoder's input size."""
    kw = dict(get_cfg(model_name).builder_kwargs)
    if cfg_t.encoders_dir:
        kw["encoders_dir"] = cfg_t.encoders_dir
    if cfg_t.image_size:
        kw["encoder_input_size"] = (3, cfg_t.image_size, cfg_t.image_size)
    net = create_model(model_name, builder_kwargs=kw)
    net.cfg = replace(net.cfg, input_size=tuple(net.fundus_cfg.input_size))
    return net


def _fusion_sets(net: nn.Module, per: dict, pairing: str, classes: tuple[str, ...], seed: int,
                 device: torch.device) -> dict[str, Dataset]:
    """{split: (fundus embedding, OCT embedding, label) pairs}: true pairs as they are; virtual pairs re-drawn every
    epoch for training (`VirtualPairs`) and drawn once, seeded, for validation and test. Splits without fundus
    images are left out; refuses a run without training and validation pairs."""
    t0 = time.time()
    cls = {c: i for i, c in enumerate(classes)}
    sets = {}
    for k, (fp, op, labels) in per.items():
        if not fp:
            continue
        f_emb = embed_images(net.embed_fundus, net.fundus_cfg, fp, device)
        o_emb = embed_images(net.embed_oct, net.oct_cfg, op, device)
        if pairing == "true pairs":
            sets[k] = TensorDataset(f_emb, o_emb, torch.tensor([cls[c] for c in labels]))
            continue
        fy = torch.tensor([cls[c] for c in labels[0]])
        oy = torch.tensor([cls[c] for c in labels[1]])
        if len(oy) == 0:
            raise RetinaInputError(f"The OCT data set has no {k} split to pair with.")
        vp = VirtualPairs(f_emb, fy, o_emb, oy, seed=seed + {"train": 0, "val": 1, "test": 2}[k])
        sets[k] = vp if k == "train" else vp.fixed()
    log.info("embedded %s pairs in %.1fs", {k: len(v) for k, v in sets.items()}, time.time() - t0)
    if "train" not in sets or "val" not in sets:
        raise RetinaInputError("Training needs pairs in both a training and a validation split.")
    return sets


# ------------------------------------------------------------------------------------------------ volumes
class VolumeSet(Dataset):
    """(volume [1, D, H, W] normalised, metadata [M] raw with NaN, label) with optional augmentation. With `masks`
    (bool [N, D, H, W], union lesion masks at the input size) each item also carries its mask, moved by the same
    flip and shift as the volume: (volume, metadata, label, mask). `meta_dropout` p (training only): the whole
    clinical record is hidden (read as not recorded) with probability p, otherwise each value with probability p / 2,
    so the image branch must carry the evidence on its own, as it must for a volume uploaded without its record."""

    def __init__(self, vols: torch.Tensor, metas: torch.Tensor, ys: torch.Tensor, augment: bool, strength: float,
                 masks: torch.Tensor | None = None, meta_dropout: float = 0.0):
        self.vols, self.metas, self.ys, self.augment, self.strength = vols, metas, ys, augment, strength
        self.masks, self.meta_dropout = masks, float(meta_dropout)

    def __len__(self) -> int:
        return len(self.ys)

    def __getitem__(self, i):
        x = self.vols[i].float()
        m = self.masks[i] if self.masks is not None else None
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
                m = m.flip(-1) if m is not None else None
            x = x * (1.0 + 0.2 * self.strength * (torch.rand(()) - 0.5)) + 0.2 * self.strength * (torch.rand(()) - 0.5)
            s = max(0, int(round(3 * self.strength)))
            dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,)))
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            m = torch.roll(m, shifts=(dy, dx), dims=(-2, -1)) if m is not None else None
        meta = self.metas[i]
        if self.meta_dropout > 0:
            p = self.meta_dropout
            hide = torch.ones(len(meta), dtype=torch.bool) if torch.rand(()) < p else torch.rand(len(meta)) < p / 2
            meta = meta.masked_fill(hide, float("nan"))
        return (x, meta, self.ys[i]) if m is None else (x, meta, self.ys[i], m)


def _volume_records(data):
    from ..io.datasets import load_dataset

    index = load_dataset(data)
    if index.layout != "volumes":
        raise RetinaInputError(f"{data} is a {index.layout} data set; volume models read NIfTI volumes with a "
                               f"metadata.csv (layout 'volumes').")
    labels = {r.label for r in index.records}
    if not labels <= set(VOLUME_CLASSES):
        log.warning("labels %s mapped to normal vs disease", sorted(labels))
    recs = [replace(r, label=r.label if r.label in VOLUME_CLASSES else binary_label(r.label))
            for r in index.records]
    return index, recs


def lesion_seg_loss(logits: torch.Tensor, masks: torch.Tensor, y: torch.Tensor, weight: float,
                    disease: int = 1) -> torch.Tensor:
    """The dense lesion read-out's loss (`--lesion-seg W`): logits s [B, d, h, w] of `LesionEvidencePool`, masks
    [B, D, H, W] at the input size (a cell is positive when it holds any lesion voxel: adaptive max pooling), y [B].
    Normal volumes count as lesion-free everywhere; diseased volumes with an empty mask (lesions not marked) are left
    out. Class-balanced binary cross-entropy: W x (mean over lesion cells + mean over the other cells) / 2, so a
    few lesion cells among thousands still weigh half."""
    rows = (y != disease) | (masks.flatten(1) != 0).any(1)
    if not bool(rows.any()):
        return logits.new_zeros(()).float()
    s = logits[rows].float()
    cells = F.adaptive_max_pool3d(masks[rows][:, None].float(), tuple(s.shape[1:]))[:, 0] > 0
    bce = F.binary_cross_entropy_with_logits(s, cells.float(), reduction="none")
    neg = bce[~cells].mean()
    return weight * (0.5 * (bce[cells].mean() + neg) if bool(cells.any()) else neg)


def train_volume(model_name, data, out, cfg_t: TrainConfig, data_note=None, ctx=None) -> dict:
    """The volume recipe: `VolumeObjective` (focal loss plus the map and read-out terms that are on) on augmented
    volumes with their clinical records standardised by training statistics; the validation score per `--monitor`."""
    out = start_run(out, cfg_t, ctx)
    net = _volume_net(model_name, cfg_t)
    cfg = net.cfg
    device = ctx.device if ctx else default_device()
    index, recs = _volume_records(data)
    splits = training_splits(recs, cfg_t.seed, cfg_t.split_fractions, cfg_t.split_by)
    sets, raw, val_masks = _volume_sets(net, splits, cfg_t, index.root)
    guide, mining = _volume_map_terms(net, cfg_t, sets["train"].masks, raw["train"][2])
    meta_train = raw["train"][1].numpy()
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        net.set_metadata_stats(np.nanmean(meta_train, axis=0), np.nanstd(meta_train, axis=0))
    net.to(device)
    objective = VolumeObjective(cfg_t, guide, mining, device)

    @torch.no_grad()
    def logits_of(split: str) -> tuple[np.ndarray, np.ndarray]:
        net.eval()
        vols, metas, ys = raw[split]
        z = [net(vols[i:i + 16].float().to(device), metas[i:i + 16].to(device)).float().cpu()
             for i in range(0, len(ys), 16)]
        return (torch.cat(z)[:, 0].numpy() if z else np.zeros(0, np.float32)), ys.numpy()

    def evaluate() -> tuple[dict, float]:
        z, y = logits_of("val")
        m = classification_metrics(y, 1.0 / (1.0 + np.exp(-z)), list(VOLUME_CLASSES))
        if cfg_t.monitor == "val_loss":
            m["val_loss"] = objective.validation_loss(net, *raw["val"], val_masks)
        return m, monitor_score(m, cfg_t.monitor)

    fitted = fit(net, sets["train"], objective, evaluate, cfg_t, ctx, device, hooks=(guide,))
    loss = (f"focal (gamma 2, dynamic alpha, label smoothing {cfg_t.label_smoothing})"
            + (f" + lesion-CAM guidance {cfg_t.lesion_cam_guidance:g} on {cfg.target_layer}"
               if cfg_t.lesion_cam_guidance else "")
            + (f" + attention mining {cfg_t.attention_mining:g} (GAIN) on {cfg.target_layer}"
               if mining is not None else "")
            + (f" + dense lesion read-out {objective.seg:g} (class-balanced BCE on the lesion masks' grid cells)"
               if objective.seg else ""))
    return finish(net, model_name, out, cfg_t, ctx, fitted, index=index, splits=splits, data=data,
                  data_note=data_note, logits=logits_of, test=len(raw["test"][2]) > 0,
                  extra={"fusion": net.fusion, "meta_features": list(net.meta_features),
                         "output": "one logit, P(disease)", "loss": loss})


def _volume_net(model_name: str, cfg_t: TrainConfig) -> nn.Module:
    """The volume model at cfg_t.image_size, with the `--fusion` and architecture options, from `--init` if given."""
    base = get_cfg(model_name)
    overrides = {}
    if cfg_t.image_size:
        overrides["input_size"] = (base.input_size[0], base.input_size[1], cfg_t.image_size, cfg_t.image_size)
    kw = dict(base.builder_kwargs)
    if cfg_t.fusion:
        kw["fusion"] = cfg_t.fusion
    kw.update(architecture_kwargs(cfg_t))      # --output-stride: dilated last stages (finer 3-D Grad-CAM grid)
    if cfg_t.drop_path is not None:
        log.info("drop_path is not used by the 3D ResNet")
    net = create_model(model_name, builder_kwargs=kw, **overrides)
    if cfg_t.init:
        from ..models.checkpoints import load_state_dict_file
        log.info("initialised from %s: %s", cfg_t.init, load_state_dict_file(net, cfg_t.init))
    return net


def _volume_sets(net: nn.Module, splits: dict, cfg_t: TrainConfig, root: Path):
    """(sets, raw, val_masks): a `VolumeSet` per split (training: augmented, with meta dropout, and carrying its
    lesion masks when a mask term is on), raw (volumes, metadata, labels) per split, and the validation masks when
    `--monitor val_loss` includes a mask term (else None)."""
    t0 = time.time()
    cls = {c: i for i, c in enumerate(VOLUME_CLASSES)}
    masked = bool(cfg_t.lesion_cam_guidance) or bool(float(cfg_t.lesion_seg))
    sets, raw, masks, val_masks = {}, {}, None, None
    for k in ("train", "val", "test"):
        rs = splits.get(k, [])
        if masked and (k == "train" or (k == "val" and cfg_t.monitor == "val_loss")):
            vols, mk = decode_volumes(rs, net.cfg, mask_root=root)
            if k == "train":
                masks = mk
            else:
                val_masks = mk      # the guidance term of the validation loss
        else:
            vols = decode_volumes(rs, net.cfg)
        raw[k] = (vols, metadata_matrix(rs, net.meta_features),
                  torch.tensor([cls[r.label] for r in rs], dtype=torch.long))
        sets[k] = VolumeSet(*raw[k], augment=(k == "train" and cfg_t.augment), strength=cfg_t.aug_strength,
                            masks=masks if k == "train" else None,
                            meta_dropout=cfg_t.meta_dropout if k == "train" else 0.0)
    log.info("decoded %s volumes in %.1fs", {k: len(v) for k, v in sets.items()}, time.time() - t0)
    return sets, raw, val_masks


def _volume_map_terms(net: nn.Module, cfg_t: TrainConfig, masks: torch.Tensor | None, ys: torch.Tensor):
    """(guide, mining): the lesion-CAM guidance (`VolumeLesionCamGuidance`; also, at weight 0, the Grad-CAM hook that
    attention mining needs) and `VolumeAttentionMining`, each None when off. Refuses `--lesion-seg` and
    `--lesion-cam-guidance` when the training volumes (the diseased ones, for guidance) have no lesion mask."""
    disease = VOLUME_CLASSES.index("disease")
    target = net.cfg.target_layer or "net.layer4"
    if float(cfg_t.lesion_seg) and not bool((masks.flatten(1) != 0).any()):
        raise RetinaInputError("--lesion-seg needs lesion masks: none of the training volumes has a non-empty mask "
                               "under masks/<volume path without .nii.gz>/*.nii.gz.")
    guide = None
    if cfg_t.lesion_cam_guidance:
        n_masked = int((((masks.flatten(1) != 0).any(1)) & (ys == disease)).sum()) if len(masks) else 0
        if n_masked == 0:
            raise RetinaInputError("--lesion-cam-guidance needs lesion masks: none of the diseased training volumes "
                                   "has a non-empty mask under masks/<volume path without .nii.gz>/*.nii.gz.")
        log.info("lesion-CAM guidance on %d of %d training volumes (Grad-CAM of %s)", n_masked, len(masks),
                 net.cfg.target_layer)
        guide = VolumeLesionCamGuidance(net, target, cfg_t.lesion_cam_guidance, disease=disease)
    mining = VolumeAttentionMining(cfg_t.attention_mining, disease) if cfg_t.attention_mining else None
    if mining is not None and guide is None:      # the mining term needs the map: the hook without a mask loss
        guide = VolumeLesionCamGuidance(net, target, 0.0, disease=disease)
    return guide, mining


class VolumeObjective:
    """The volume recipe's training objective, and its training step for `loop.fit` (call it with (model, batch)):
    binary focal loss (gamma 2, dynamic alpha, the run's label smoothing) on the one logit, plus, when they are on,
    the dense lesion read-out's loss (`--lesion-seg`), the lesion-CAM guidance and GAIN's attention mining, both from
    one differentiable Grad-CAM of the batch's forward. The extra terms are returned by name for the history."""

    def __init__(self, cfg_t: TrainConfig, guide: VolumeLesionCamGuidance | None,
                 mining: VolumeAttentionMining | None, device: torch.device):
        self.focal = FocalLoss(gamma=2.0, label_smoothing=cfg_t.label_smoothing, dynamic_alpha=True)
        self.guide, self.mining, self.seg, self.device = guide, mining, float(cfg_t.lesion_seg), device
        self.disease = VOLUME_CLASSES.index("disease")

    def map_terms(self, model, x, meta, y, logits, masks) -> dict:
        """The map losses of one batch: lesion-CAM guidance (volumes with masks) and attention mining (every
        diseased volume), from one differentiable Grad-CAM of the batch's forward."""
        guide = self.guide
        if self.mining is None:
            return {"lesion_cam_loss": guide(logits, masks, y)}
        rows = y == self.disease
        if not bool(rows.any()):
            guide.store.pop("a", None)
            zero = logits.new_zeros(()).float()
            return {"lesion_cam_loss": zero, "attention_mining_loss": zero}
        cam = guide.cam(logits, rows)
        terms = {"attention_mining_loss": self.mining(model, x[rows], meta[rows], cam, logits[rows])}
        guide.store.pop("a", None)                 # the mining forward's activations are not needed
        if guide.weight:
            terms["lesion_cam_loss"] = guide.loss_from_cam(cam, masks[rows])
        return terms

    def dense_terms(self, model, y, masks) -> dict:
        """The dense lesion read-out's loss on the latest forward (`--lesion-seg`)."""
        if not self.seg:
            return {}
        return {"lesion_seg_loss": lesion_seg_loss(model.lesion_logits(), masks, y, self.seg, self.disease)}

    def __call__(self, model: nn.Module, batch):
        x, meta, y = (b.to(self.device) for b in batch[:3])
        logits = model(x, meta).squeeze(1)
        loss = self.focal(logits, y.float())
        if self.guide is None and not self.seg:
            return loss
        mk = batch[3].to(self.device) if len(batch) > 3 else None
        terms = self.dense_terms(model, y, mk)      # before map_terms: attention mining runs another forward
        if self.guide is not None:
            terms.update(self.map_terms(model, x, meta, y, logits, mk))
        return loss + sum(terms.values()), {k: float(v.detach()) for k, v in terms.items()}

    def validation_loss(self, net: nn.Module, vols: torch.Tensor, metas: torch.Tensor, ys: torch.Tensor,
                        masks: torch.Tensor | None = None) -> float:
        """The training objective on held-out volumes (`--monitor val_loss`), volume-weighted: focal loss, plus the
        read-out and map terms (on those with masks). Eval mode; gradients on only for the Grad-CAM, nothing steps."""
        net.eval()
        device, total = self.device, 0.0
        with torch.enable_grad():
            for i in range(0, len(ys), 8):
                x, meta, y = vols[i:i + 8].float().to(device), metas[i:i + 8].to(device), ys[i:i + 8].to(device)
                logits = net(x, meta).squeeze(1)
                loss = self.focal(logits, y.float())
                vm = masks[i:i + 8].to(device) if masks is not None else None
                if self.seg:
                    loss = loss + sum(self.dense_terms(net, y, vm).values())
                if self.guide is not None:
                    loss = loss + sum(self.map_terms(net, x, meta, y, logits, vm).values())
                total += float(loss.detach()) * len(y)
        return total / max(len(ys), 1)


@contextlib.contextmanager
def _quiet_nan_warnings():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
