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

Both write `<out>/<model>.safetensors` (fp16) + `<out>/manifest.json` + history.json like the image engine, train
data-parallel under torchrun, and fit a calibration temperature on the validation split.
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
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import RetinaInputError
from ..evaluate.calibration import apply_temperature, fit_temperature
from ..evaluate.metrics import bootstrap_ci, classification_metrics
from ..io.datasets import training_splits
from ..models.loading import default_device, preprocess_image
from ..models.multimodal import FUSION_CLASSES, binary_label
from ..models.registry import create_model, get_cfg
from ..models.volume3d import POOL_TYPES, VOLUME_CLASSES
from . import distributed
from ..models.predict import decode_volumes, metadata_matrix
from .common import (EpochTracker, TrainConfig, architecture_kwargs, is_phantom_set, make_optimizer, make_scheduler,
                     monitor_score, result_from_rank0, seed_everything, volume_only_options, write_outputs)
from .guidance import VolumeAttentionMining, VolumeLesionCamGuidance
from .losses import FocalLoss

log = logging.getLogger(__name__)


def train_multimodal(model_name: str, data, out, cfg_t: TrainConfig, data_note: str | None = None,
                     ctx=None) -> dict:
    modality = get_cfg(model_name).modality
    if modality != "oct_volume" and (cfg_t.global_pool or cfg_t.output_stride):
        opt = "--global-pool" if cfg_t.global_pool else "--output-stride"
        raise RetinaInputError(f"{opt} does not apply to {model_name} (2-D CNNs and the volume models' 3D ResNet "
                               "only).")
    if cfg_t.global_pool and cfg_t.global_pool not in POOL_TYPES:
        raise RetinaInputError(f"--global-pool must be one of {', '.join(POOL_TYPES)} for {model_name}, got "
                               f"{cfg_t.global_pool!r}.")
    if cfg_t.healthy_cam_penalty:
        raise RetinaInputError(f"--healthy-cam-penalty is not implemented for {model_name} (2-D timm CNNs only).")
    if modality != "oct_volume" and (flags := volume_only_options(cfg_t)):
        raise RetinaInputError(f"{flags[0]} is not implemented for {model_name} (the OCT volume models only).")
    if not 0.0 <= cfg_t.meta_dropout < 1.0:
        raise RetinaInputError(f"--meta-dropout is a probability in [0, 1), got {cfg_t.meta_dropout:g}.")
    if cfg_t.lesion_only and not cfg_t.lesion_seg:
        raise RetinaInputError("--lesion-only makes the image branch the dense lesion read-out's evidence alone; it "
                               "needs the read-out trained: add --lesion-seg W (e.g. 1).")
    if cfg_t.lesion_cam_guidance and modality != "oct_volume":
        raise RetinaInputError(f"--lesion-cam-guidance is not implemented for {model_name} (2-D timm CNNs and the "
                               "OCT volume models only).")
    if modality == "fundus+oct":
        return train_fusion(model_name, data, out, cfg_t, data_note, ctx)
    if modality == "oct_volume":
        return train_volume(model_name, data, out, cfg_t, data_note, ctx)
    raise RetinaInputError(f"{model_name} is not a multimodal model.")


# ------------------------------------------------------------------------------------------------ shared loop
def _fit(module: nn.Module, train_ds: Dataset, step_fn, eval_fn, cfg_t: TrainConfig, ctx, out: Path):
    """Train `module` (its trainable parameters): step_fn(wrapped_module, batch) -> loss, or (loss, {name: float})
    whose named parts are logged per epoch (their mean) in the history; eval_fn() -> (metrics, score) on rank 0.
    Keeps the best validation epoch. Returns (best_epoch, history)."""
    main = ctx is None or ctx.is_main
    g = torch.Generator().manual_seed(cfg_t.seed)
    bs = cfg_t.batch_size
    if ctx is None:
        loader = DataLoader(train_ds, batch_size=bs, shuffle=True, generator=g, drop_last=len(train_ds) > bs)
    else:
        shard = distributed.sampler(train_ds, ctx, cfg_t.seed)
        loader = DataLoader(train_ds, batch_size=bs, sampler=shard, drop_last=len(shard) > bs)
    steps = len(loader) if not cfg_t.max_steps_per_epoch else min(len(loader), cfg_t.max_steps_per_epoch)
    opt = make_optimizer(module, cfg_t, cfg_t.lr)
    sched, per_step = make_scheduler(opt, cfg_t, max(steps, 1), cfg_t.epochs)
    model = distributed.wrap(module, ctx)
    tracker = EpochTracker(cfg_t)
    for epoch in range(cfg_t.epochs):
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        if ctx is not None:
            loader.sampler.set_epoch(epoch)
        model.train()
        losses, parts, t_ep = [], {}, time.time()
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            loss = step_fn(model, batch)
            if isinstance(loss, tuple):
                loss, logged = loss
                for k, v in logged.items():
                    parts.setdefault(k, []).append(float(v))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_step:
                sched.step()
            losses.append(loss.item())
        distributed.sync_buffers(module, ctx)
        m, score = eval_fn() if main else (None, None)
        score = distributed.broadcast(score, ctx)
        if not per_step:
            sched.step(score)
        extra = {k: float(np.mean(v)) for k, v in parts.items()}
        tracker.end_epoch(module, epoch, losses, m, score, time.time() - t_ep, main, extra or None)
        if tracker.should_stop:
            break
    module.load_state_dict(tracker.best_state)
    return tracker.best_epoch, tracker.history


def _finish(net, state, cfg, model_name, out, cfg_t, index, splits, data, data_note, val, test, history,
            best_epoch, extra, ctx, classes) -> dict:
    """Temperature on validation logits, metrics, weights + manifest (rank 0); other ranks read rank 0's entry."""
    digest = distributed.state_digest(net) if ctx is not None else None
    if ctx is not None and not ctx.is_main:
        return result_from_rank0(model_name, out, ctx, digest)
    (val_z, val_y), test_pair = val, test
    temperature = float(fit_temperature(val_z, val_y))
    result = {"val": classification_metrics(val_y, apply_temperature(val_z, temperature), list(classes))}
    if test_pair is not None and len(test_pair[1]):
        result["test"] = classification_metrics(test_pair[1], apply_temperature(test_pair[0], temperature),
                                                list(classes))
        test_recs = splits.get("test") or []
        groups = [r.patient_id or str(r.path) for r in test_recs] if len(test_recs) == len(test_pair[1]) else None
        result["ci95"] = bootstrap_ci(test_pair[1], apply_temperature(test_pair[0], temperature), list(classes),
                                      groups=groups)
    res = write_outputs(net, cfg, model_name, Path(out), cfg_t, index, splits, data, data_note, temperature, result,
                         history, best_epoch, extra=extra, state=state)
    if ctx is not None:
        res.update(rank=ctx.rank, world_size=ctx.world_size, replica_digest=digest)
        distributed.barrier(ctx)
    return res


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
    seed_everything(cfg_t.seed)
    out = Path(out)
    if ctx is None or ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    base = get_cfg(model_name)
    kw = dict(base.builder_kwargs)
    if cfg_t.encoders_dir:
        kw["encoders_dir"] = cfg_t.encoders_dir
    if cfg_t.image_size:
        kw["encoder_input_size"] = (3, cfg_t.image_size, cfg_t.image_size)
    net = create_model(model_name, builder_kwargs=kw)
    net.cfg = replace(net.cfg, input_size=tuple(net.fundus_cfg.input_size))
    device = ctx.device if ctx else default_device()
    net.to(device).eval()
    classes = tuple(net.cfg.classes)
    index, splits, per, oct_index, pairing = _fusion_sources(data, cfg_t, classes)
    cls = {c: i for i, c in enumerate(classes)}

    t0 = time.time()
    sets = {}
    for k, (fp, op, labels) in per.items():
        if not fp:
            continue
        f_emb = embed_images(net.embed_fundus, net.fundus_cfg, fp, device)
        o_emb = embed_images(net.embed_oct, net.oct_cfg, op, device)
        if pairing == "true pairs":
            y = torch.tensor([cls[c] for c in labels])
            sets[k] = TensorDataset(f_emb, o_emb, y)
        else:
            fy = torch.tensor([cls[c] for c in labels[0]])
            oy = torch.tensor([cls[c] for c in labels[1]])
            if len(oy) == 0:
                raise RetinaInputError(f"The OCT data set has no {k} split to pair with.")
            vp = VirtualPairs(f_emb, fy, o_emb, oy, seed=cfg_t.seed + {"train": 0, "val": 1, "test": 2}[k])
            sets[k] = vp if k == "train" else vp.fixed()
    log.info("embedded %s pairs in %.1fs", {k: len(v) for k, v in sets.items()}, time.time() - t0)
    if "train" not in sets or "val" not in sets:
        raise RetinaInputError("Training needs pairs in both a training and a validation split.")

    def head_logits(head, f, o):
        return head(torch.cat([f, o], dim=1).to(device))

    def step(head, batch):
        f, o, y = batch
        return F.cross_entropy(head_logits(head, f, o), y.to(device), label_smoothing=cfg_t.label_smoothing)

    @torch.no_grad()
    def logits_of(ds):
        net.eval()
        f, o, y = ds.tensors
        return head_logits(net.head, f, o).float().cpu().numpy(), y.numpy()

    def evaluate():
        z, y = logits_of(sets["val"])
        m = classification_metrics(y, torch.softmax(torch.from_numpy(z), 1).numpy(), list(classes))
        if cfg_t.monitor == "val_loss":   # the head's training loss on the validation pairs
            m["val_loss"] = float(F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y),
                                                  label_smoothing=cfg_t.label_smoothing))
        return m, monitor_score(m, cfg_t.monitor)

    best_epoch, history = _fit(net.head, sets["train"], step, evaluate, cfg_t, ctx, out)
    note = data_note
    if note is None and oct_index is not None:
        kind = "synthetic phantoms" if is_phantom_set(Path(data)) and is_phantom_set(Path(cfg_t.pair_with)) else "data"
        note = (f"{kind}, virtual pairs: fundus {index.layout} ({data}) x OCT {oct_index.layout} "
                f"({cfg_t.pair_with}), same binary label")
    extra = {"encoders": net.encoder_info(), "pairing": pairing, "head_only": True}
    return _finish(net, net.head_state_dict(), net.cfg, model_name, out, cfg_t, index, splits, data, note,
                   logits_of(sets["val"]), logits_of(sets["test"]) if "test" in sets else None, history,
                   best_epoch, extra, ctx, classes)


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
    seed_everything(cfg_t.seed)
    out = Path(out)
    if ctx is None or ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
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
    cfg = net.cfg
    device = ctx.device if ctx else default_device()
    index, recs = _volume_records(data)
    splits = training_splits(recs, cfg_t.seed, cfg_t.split_fractions, cfg_t.split_by)
    t0 = time.time()
    cls = {c: i for i, c in enumerate(VOLUME_CLASSES)}
    guided = bool(cfg_t.lesion_cam_guidance)
    seg = float(cfg_t.lesion_seg)
    sets, raw, masks, val_masks = {}, {}, None, None
    for k in ("train", "val", "test"):
        rs = splits.get(k, [])
        if (guided or seg) and (k == "train" or (k == "val" and cfg_t.monitor == "val_loss")):
            vols, mk = decode_volumes(rs, cfg, mask_root=index.root)
            if k == "train":
                masks = mk
            else:
                val_masks = mk      # the guidance term of the validation loss
        else:
            vols = decode_volumes(rs, cfg)
        raw[k] = (vols, metadata_matrix(rs, net.meta_features),
                  torch.tensor([cls[r.label] for r in rs], dtype=torch.long))
        sets[k] = VolumeSet(*raw[k], augment=(k == "train" and cfg_t.augment), strength=cfg_t.aug_strength,
                            masks=masks if k == "train" else None,
                            meta_dropout=cfg_t.meta_dropout if k == "train" else 0.0)
    log.info("decoded %s volumes in %.1fs", {k: len(v) for k, v in sets.items()}, time.time() - t0)
    if seg and not bool((masks.flatten(1) != 0).any()):
        raise RetinaInputError("--lesion-seg needs lesion masks: none of the training volumes has a non-empty mask "
                               "under masks/<volume path without .nii.gz>/*.nii.gz.")
    guide = None
    if guided:
        n_masked = int((((masks.flatten(1) != 0).any(1)) & (raw["train"][2] == cls["disease"])).sum()) \
            if len(masks) else 0
        if n_masked == 0:
            raise RetinaInputError("--lesion-cam-guidance needs lesion masks: none of the diseased training volumes "
                                   "has a non-empty mask under masks/<volume path without .nii.gz>/*.nii.gz.")
        log.info("lesion-CAM guidance on %d of %d training volumes (Grad-CAM of %s)", n_masked, len(masks),
                 cfg.target_layer)
        guide = VolumeLesionCamGuidance(net, cfg.target_layer or "net.layer4", cfg_t.lesion_cam_guidance,
                                        disease=cls["disease"])
    mining = VolumeAttentionMining(cfg_t.attention_mining, cls["disease"]) if cfg_t.attention_mining else None
    if mining is not None and guide is None:      # the mining term needs the map: the hook without a mask loss
        guide = VolumeLesionCamGuidance(net, cfg.target_layer or "net.layer4", 0.0, disease=cls["disease"])
    meta_train = raw["train"][1].numpy()
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        net.set_metadata_stats(np.nanmean(meta_train, axis=0), np.nanstd(meta_train, axis=0))
    net.to(device)
    focal = FocalLoss(gamma=2.0, label_smoothing=cfg_t.label_smoothing, dynamic_alpha=True)

    def map_terms(model, x, meta, y, logits, masks) -> dict:
        """The map losses of one batch: lesion-CAM guidance (volumes with masks) and attention mining (every
        diseased volume), from one differentiable Grad-CAM of the batch's forward."""
        if mining is None:
            return {"lesion_cam_loss": guide(logits, masks, y)}
        rows = y == cls["disease"]
        if not bool(rows.any()):
            guide.store.pop("a", None)
            zero = logits.new_zeros(()).float()
            return {"lesion_cam_loss": zero, "attention_mining_loss": zero}
        cam = guide.cam(logits, rows)
        terms = {"attention_mining_loss": mining(model, x[rows], meta[rows], cam, logits[rows])}
        guide.store.pop("a", None)                 # the mining forward's activations are not needed
        if guide.weight:
            terms["lesion_cam_loss"] = guide.loss_from_cam(cam, masks[rows])
        return terms

    def dense_terms(model, y, masks) -> dict:
        """The dense lesion read-out's loss on the latest forward (`--lesion-seg`)."""
        if not seg:
            return {}
        return {"lesion_seg_loss": lesion_seg_loss(model.lesion_logits(), masks, y, seg, cls["disease"])}

    def step(model, batch):
        x, meta, y = (b.to(device) for b in batch[:3])
        logits = model(x, meta).squeeze(1)
        loss = focal(logits, y.float())
        if guide is None and not seg:
            return loss
        mk = batch[3].to(device) if len(batch) > 3 else None
        terms = dense_terms(model, y, mk)           # before map_terms: attention mining runs another forward
        if guide is not None:
            terms.update(map_terms(model, x, meta, y, logits, mk))
        return loss + sum(terms.values()), {k: float(v.detach()) for k, v in terms.items()}

    @torch.no_grad()
    def logits_of(k):
        net.eval()
        vols, metas, ys = raw[k]
        z = [net(vols[i:i + 16].float().to(device), metas[i:i + 16].to(device)).float().cpu()
             for i in range(0, len(ys), 16)]
        return (torch.cat(z)[:, 0].numpy() if z else np.zeros(0, np.float32)), ys.numpy()

    def validation_loss() -> float:
        """The training objective on the validation volumes (`--monitor val_loss`): focal loss, plus the lesion-CAM
        guidance on those with masks. Eval mode; gradients on only for the guidance's Grad-CAM, nothing steps."""
        net.eval()
        vols, metas, ys = raw["val"]
        total = 0.0
        with torch.enable_grad():
            for i in range(0, len(ys), 8):
                x, meta, y = vols[i:i + 8].float().to(device), metas[i:i + 8].to(device), ys[i:i + 8].to(device)
                logits = net(x, meta).squeeze(1)
                loss = focal(logits, y.float())
                vm = val_masks[i:i + 8].to(device) if val_masks is not None else None
                if seg:
                    loss = loss + sum(dense_terms(net, y, vm).values())
                if guide is not None:
                    loss = loss + sum(map_terms(net, x, meta, y, logits, vm).values())
                total += float(loss.detach()) * len(y)
        return total / max(len(ys), 1)

    def evaluate():
        z, y = logits_of("val")
        m = classification_metrics(y, 1.0 / (1.0 + np.exp(-z)), list(VOLUME_CLASSES))
        if cfg_t.monitor == "val_loss":
            m["val_loss"] = validation_loss()
        return m, monitor_score(m, cfg_t.monitor)

    try:
        best_epoch, history = _fit(net, sets["train"], step, evaluate, cfg_t, ctx, out)
    finally:
        if guide is not None:
            guide.close()
    extra = {"fusion": net.fusion, "meta_features": list(net.meta_features), "output": "one logit, P(disease)",
             "loss": f"focal (gamma 2, dynamic alpha, label smoothing {cfg_t.label_smoothing})"
                     + (f" + lesion-CAM guidance {cfg_t.lesion_cam_guidance:g} on {cfg.target_layer}"
                        if cfg_t.lesion_cam_guidance else "")
                     + (f" + attention mining {cfg_t.attention_mining:g} (GAIN) on {cfg.target_layer}"
                        if mining is not None else "")
                     + (f" + dense lesion read-out {seg:g} (class-balanced BCE on the lesion masks' grid cells)"
                        if seg else "")}
    return _finish(net, None, cfg, model_name, out, cfg_t, index, splits, data, data_note, logits_of("val"),
                   logits_of("test") if len(raw["test"][2]) else None, history, best_epoch, extra, ctx,
                   VOLUME_CLASSES)


@contextlib.contextmanager
def _quiet_nan_warnings():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
