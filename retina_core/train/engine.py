"""One training engine for every image classifier in the registry.

    python -m retina_core data phantoms --kind oct-kermany --n 1600 --seed 1 --out data/oct
    python -m retina_core train --model oct_resnet18 --data data/oct --out runs/oct_resnet18 --epochs 12

AdamW, linear warmup then cosine decay, early stopping on a validation metric with the best weights kept,
resumable checkpoints, seeds, AMP when CUDA is present. After training the calibration temperature is fitted on
the validation split, the held-out test split is scored, and `<out>/<model>.safetensors` + `<out>/manifest.json`
are written (the format `load_model(name, weights_dir=out)` reads).

Optional, off by default: training recipes (`--recipe`, see RECIPES in train/common.py), layer-wise lr decay
(`--layer-decay`, ViTs), drop path, mixup, two-phase training (`--freeze-epochs`: head only, then `--unfreeze`
prefixes at `--finetune-lr`), reduce-on-plateau, N repeated trainings with a stability summary (`--repeats`), DDP under
`torchrun --nproc_per_node N -m retina_core train ...` (train/distributed.py), and routing of the fundus+OCT and
volume+metadata models to train/multimodal.py. `spawn_train` runs the DDP path with local processes (no torchrun).
The image recipe below gives the one training loop (`fit` and `finish`, train/loop.py) its step and its validation;
what every recipe shares (TrainConfig, optimiser and schedule, EpochTracker, write_outputs) is in train/common.py.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import RetinaInputError
from ..evaluate.metrics import classification_metrics
from ..io.datasets import SPLIT_METHODS, parse_fractions, split_patients  # noqa: F401  (re-exported: train's API)
from ..modality import Modality
from ..models.framing import FRAMINGS, FieldBox, frame_box, frame_tensor, local_contrast, uses_contrast, uses_fov
from ..models.loading import MANIFEST, default_device
from ..models.registry import ModelCfg, create_model, get_cfg
from . import distributed
from .common import (TrainConfig, architecture_kwargs, check_monitor, monitor_score, replace_resolved, resolve_recipe,
                     volume_only_options)
from .guidance import HealthyCamPenalty, LesionCamGuidance
from .loop import finish, fit, start_run
from .multimodal import train_multimodal

log = logging.getLogger(__name__)


MULTIMODAL_MODALITIES = (Modality.FUNDUS_OCT, Modality.OCT_VOLUME)


class CachedImages(Dataset):
    """Decodes every record once (through `read_image`), resized to the model's input size as uint8 in memory;
    augmentation and normalisation then run per item. Decoding never becomes the bottleneck on CPU.

    With `mask_root`, each item also carries the union of the image's lesion masks at the input size (uint8 [H, W],
    moved by the same flips and shift as the image; all zero for images without masks): `(x, y, mask)`."""

    def __init__(self, records, classes: tuple[str, ...], cfg: ModelCfg, augment: bool, aug_strength: float = 1.0,
                 mask_root: str | Path | None = None):
        from ..io.datasets import lesion_mask
        from ..io.decode import read_image

        _, h, w = cfg.input_size
        self.cfg, self.augment, self.aug_strength = cfg, augment, aug_strength
        self.labels = torch.tensor([classes.index(r.label) for r in records])
        imgs, masks = [], []
        framed = uses_fov(cfg)
        for r in records:
            pixels = read_image(r.path).pixels
            x = torch.tensor(pixels).permute(2, 0, 1)[None].float()
            # the frame as preprocess_image shapes it: a box around the field of view or the disc, or stretched
            box = frame_box(pixels, (h, w), cfg.framing) if framed else \
                FieldBox(0.0, 0.0, float(pixels.shape[1]), float(pixels.shape[0]))
            img = frame_tensor(x[0], box, (h, w), round_mask=framed).round().clamp(0, 255)
            imgs.append((local_contrast(img).round() if uses_contrast(cfg) else img).to(torch.uint8))
            if mask_root is not None:
                m = lesion_mask(mask_root, r.path, pixels.shape[:2])
                m = torch.zeros(1, h, w) if m is None else \
                    frame_tensor(torch.from_numpy(m)[None].float(), box, (h, w), mode="max", round_mask=framed)
                masks.append(m[0].to(torch.uint8))
        self.images = torch.stack(imgs) if imgs else torch.empty(0, 3, h, w, dtype=torch.uint8)
        self.masks = (torch.stack(masks) if masks else torch.empty(0, h, w, dtype=torch.uint8)) \
            if mask_root is not None else None
        self.mean = torch.tensor(cfg.mean).view(-1, 1, 1)
        self.std = torch.tensor(cfg.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float() / 255.0
        m = self.masks[i] if self.masks is not None else None
        if self.augment and m is not None:
            x, m = augment_image(x, self.cfg.modality, self.aug_strength, mask=m)
        elif self.augment:
            x = augment_image(x, self.cfg.modality, self.aug_strength)
        x = (x - self.mean) / self.std
        return (x, self.labels[i]) if m is None else (x, self.labels[i], m)


def augment_image(x: torch.Tensor, modality: str, strength: float = 1.0, mask: torch.Tensor | None = None):
    """Mild, label-preserving augmentation of a [3, H, W] image in [0, 1]: flip, brightness/contrast, shift.
    `strength` scales the intensity changes and the shift (1.0 = the default amounts). Returns the image, or
    (image, mask) when a [H, W] `mask` is given: it gets the same flips and shift."""
    flips = [-1] if torch.rand(()) < 0.5 else []
    if modality == Modality.FUNDUS and torch.rand(()) < 0.5:
        flips.append(-2)
    if flips:
        x = x.flip(flips)
    gain = 1.0 + 0.2 * strength * (torch.rand(()) - 0.5)
    bias = 0.08 * strength * (torch.rand(()) - 0.5)
    mean = x.mean()
    x = ((x - mean) * (1.0 + 0.3 * strength * (torch.rand(()) - 0.5)) + mean) * gain + bias
    shift = max(0, int(round(8 * strength)))
    dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,)))
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1)).clamp(0, 1)
    if mask is None:
        return x
    if flips:
        mask = mask.flip(flips)                           # [H, W]: the same last two axes as the image's
    return x, torch.roll(mask, shifts=(dy, dx), dims=(-2, -1))


@torch.no_grad()
def predict_logits(net: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    net.eval()
    out, ys = [], []
    for batch in loader:
        x, y = batch[0], batch[1]
        out.append(net(x.to(device)).float().cpu())
        ys.append(y)
    if not out:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(out).numpy(), torch.cat(ys).numpy()


def _splits(data: str | Path, classes: tuple[str, ...], seed: int, fractions: str | None = None,
            method: str | None = None, label_column: str | None = None, label_map: str | None = None):
    from ..io.datasets import load_dataset, patient_split

    index = load_dataset(data, label_column=label_column, label_map=label_map)
    unknown = sorted({r.label for r in index.records} - set(classes))
    if unknown:
        raise RetinaInputError(f"The data set has classes this model does not know: {', '.join(unknown)}. "
                               f"Expected a subset of: {', '.join(classes)}.")
    splits = split_patients(index.records, seed, fractions, method)
    if not splits.get("val"):
        # e.g. Mendeley's Kermany (train/test only): carve a validation split from train, keep test untouched.
        carved = patient_split(splits.get("train", []), fractions=(0.9, 0.1, 0.0), seed=seed, force=True)
        splits = {"train": carved["train"], "val": carved["val"], "test": splits.get("test", [])}
    return index, splits


def train(model_name: str, data: str | Path, out: str | Path, config: TrainConfig | None = None,
          data_note: str | None = None) -> dict:
    """Train `model_name` on the data set at `data`; write weights, manifest and history to `out`.

    Under torchrun (WORLD_SIZE > 1) the ranks train data-parallel and rank 0 alone writes; the other ranks return
    the same summary plus `replica_digest` (sha256 of their final weights), then, when started by torchrun, exit.
    """
    cfg_t = resolve_recipe(model_name, config or TrainConfig())
    check_monitor(cfg_t.monitor)
    ctx = distributed.setup()
    try:
        if cfg_t.repeats > 1:
            result = train_repeats(model_name, data, out, cfg_t, data_note, ctx)
        else:
            result = _train_single(model_name, data, out, cfg_t, data_note, ctx)
    finally:
        distributed.cleanup(ctx)
    if ctx is not None and not ctx.is_main and distributed.launched_by_torchrun():
        raise SystemExit(0)   # rank 0 alone reports (and installs, with --install)
    return result


def _train_single(model_name, data, out, cfg_t, data_note, ctx) -> dict:
    if get_cfg(model_name).modality in MULTIMODAL_MODALITIES:
        return train_multimodal(model_name, data, out, cfg_t, data_note, ctx)
    return _train_images(model_name, data, out, cfg_t, data_note, ctx)


def resolve_framing(framing: str, modality: str, registered: str = "stretch") -> str:
    """TrainConfig.framing -> the cfg's: "auto" keeps the framing a model is registered with (e.g. "disc"), else
    frames fundus photographs around their field of view (`models.framing`) and stretches everything else."""
    if framing == "auto":
        return registered if registered != "stretch" else ("fov" if modality == Modality.FUNDUS else "stretch")
    if framing not in FRAMINGS:
        raise RetinaInputError(f"Unknown framing {framing!r}; choose auto, {' or '.join(FRAMINGS)}.")
    if framing != "stretch" and modality != Modality.FUNDUS:
        raise RetinaInputError(f"--framing {framing} applies to fundus photographs only.")
    return framing


def build_for_training(model_name: str, cfg_t: TrainConfig) -> nn.Module:
    """create_model with the TrainConfig's input size and drop-path overrides, then `--init` weights if given."""
    base = get_cfg(model_name)
    overrides = {}
    if cfg_t.image_size:
        overrides["input_size"] = (base.input_size[0], *([cfg_t.image_size] * (len(base.input_size) - 1)))
    framing = resolve_framing(cfg_t.framing, base.modality, base.framing)
    if framing != base.framing:
        overrides["framing"] = framing
    kw = dict(base.builder_kwargs)
    if cfg_t.drop_path is not None:
        kw["drop_path_rate"] = cfg_t.drop_path
    kw.update(architecture_kwargs(cfg_t))
    if kw != base.builder_kwargs:
        overrides["builder_kwargs"] = kw
    net = create_model(model_name, **overrides)
    if cfg_t.init:
        if hasattr(net, "import_checkpoint"):        # e.g. RETFound's format for the ViTs
            report = net.import_checkpoint(cfg_t.init)
        else:
            from ..models.checkpoints import load_state_dict_file
            report = load_state_dict_file(net, cfg_t.init)
        log.info("initialised from %s: %s", cfg_t.init, report)
    return net


def mixup_batch(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """(mixed x, y, y[perm], lam): x' = lam x + (1 - lam) x[perm], lam ~ Beta(alpha, alpha)."""
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1.0 - lam) * x[perm], y, y[perm], lam


def validation_loss(net: nn.Module, loader: DataLoader, device: torch.device, cfg_t: TrainConfig,
                    cam_penalty: HealthyCamPenalty | None = None, guide: LesionCamGuidance | None = None) -> float:
    """The training objective on a held-out split (`--monitor val_loss`), image-weighted mean over batches:
    cross-entropy with the run's label smoothing, plus the healthy-CAM penalty and the lesion-CAM guidance when they
    are on (the loader then carries the split's lesion masks). Eval mode (no augmentation, running BN statistics);
    gradients are enabled only because the CAM terms read activations of grad-enabled forwards; nothing steps."""
    net.eval()
    total, n = 0.0, 0
    with torch.enable_grad():
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg_t.label_smoothing)
            if cam_penalty is not None:
                loss = loss + cam_penalty(y == cam_penalty.healthy)
            if guide is not None:
                loss = loss + guide(batch[2].to(device), y, logits)
            total += float(loss.detach()) * len(y)
            n += len(y)
    return total / max(n, 1)


def _train_images(model_name, data, out, cfg_t: TrainConfig, data_note, ctx) -> dict:
    """The image recipe: cross-entropy on cached, augmented images (`image_step`), scored on the validation split
    by `--monitor`; `train/loop.py` runs the epochs (AMP on CUDA, two-phase, `<out>/last.pt` for `--resume`)."""
    out = start_run(out, cfg_t, ctx)
    if flags := volume_only_options(cfg_t):
        raise RetinaInputError(f"{flags[0]} is not implemented for {model_name} (the OCT volume models only).")
    net = build_for_training(model_name, cfg_t)
    cfg: ModelCfg = net.cfg
    index, splits = _splits(data, cfg.classes, cfg_t.seed, cfg_t.split_fractions, cfg_t.split_by,
                            cfg_t.label_column, cfg_t.label_map)
    device = ctx.device if ctx else default_device()
    net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    guide = None
    if cfg_t.lesion_cam_guidance:
        if cfg_t.mixup > 0:
            raise RetinaInputError("--lesion-cam-guidance cannot be combined with --mixup: a mixed image's lesions "
                                   "belong to two eyes.")
        guide = LesionCamGuidance(net, cfg, cfg_t.lesion_cam_guidance)
    sets = _image_sets(splits, cfg, cfg_t, index.root, guide)
    eval_loaders = {k: DataLoader(sets[k], batch_size=64) for k in ("val", "test")}
    val_loss_loader = DataLoader(sets["val"], batch_size=16)   # small: this pass keeps activations for the CAM terms
    cam_penalty = HealthyCamPenalty(net, cfg, cfg_t.healthy_cam_penalty) if cfg_t.healthy_cam_penalty else None

    def evaluate() -> tuple[dict, float]:
        logits, ys = predict_logits(net, eval_loaders["val"], device)
        m = classification_metrics(ys, torch.softmax(torch.from_numpy(logits), 1).numpy(), list(cfg.classes),
                                   ordinal=cfg.ordinal)
        if cfg_t.monitor == "val_loss":
            m["val_loss"] = validation_loss(net, val_loss_loader, device, cfg_t, cam_penalty, guide)
        return m, monitor_score(m, cfg_t.monitor)

    fitted = fit(net, sets["train"], _image_step(device, cfg_t, cam_penalty, guide), evaluate, cfg_t, ctx, device,
                 amp=device.type == "cuda", num_workers=cfg_t.num_workers, phases=True, checkpoint=out / "last.pt",
                 hooks=(cam_penalty, guide))
    result = finish(net, model_name, out, cfg_t, ctx, fitted, index=index, splits=splits, data=data,
                    data_note=data_note, logits=lambda k: predict_logits(net, eval_loaders[k], device),
                    test=len(sets["test"]) > 0, probs=_softmax,
                    extra=net.training_report() if hasattr(net, "training_report") else None)
    if ctx is not None:
        result["replica_param_digest"] = distributed.state_digest(net, params_only=True)
    return result


def _image_sets(splits: dict, cfg: ModelCfg, cfg_t: TrainConfig, root: Path,
               guide: LesionCamGuidance | None = None) -> dict[str, CachedImages]:
    """The train/val/test splits decoded into `CachedImages` (training ones augmented). With lesion-CAM guidance the
    training images carry their lesion masks (and the validation images too under `--monitor val_loss`); refuses
    a run whose training images have none, or with an empty training or validation split."""
    t0 = time.time()
    masked = ("train", "val") if cfg_t.monitor == "val_loss" else ("train",)   # val masks: the val loss's guidance
    sets = {k: CachedImages(splits.get(k, []), cfg.classes, cfg, augment=(k == "train" and cfg_t.augment),
                            aug_strength=cfg_t.aug_strength,
                            mask_root=root if (guide is not None and k in masked) else None)
            for k in ("train", "val", "test")}
    if guide is not None:
        n_masked = int((sets["train"].masks.flatten(1).amax(1) > 0).sum())
        if n_masked == 0:
            guide.close()
            raise RetinaInputError("--lesion-cam-guidance needs lesion masks: none of the training images has a "
                                   "non-empty mask under masks/<image path without extension>/*.png.")
        log.info("lesion-CAM guidance on %d of %d training images", n_masked, len(sets["train"]))
    log.info("decoded %s images in %.1fs", {k: len(v) for k, v in sets.items()}, time.time() - t0)
    if len(sets["train"]) == 0 or len(sets["val"]) == 0:
        raise RetinaInputError("Training needs images in both a training and a validation split.")
    return sets


def _image_step(device: torch.device, cfg_t: TrainConfig, cam_penalty: HealthyCamPenalty | None = None,
               guide: LesionCamGuidance | None = None):
    """The image recipe's training step for `loop.fit`: (model, (x, y[, masks])) -> cross-entropy with the run's
    label smoothing (mixed pairs under `--mixup`), plus the healthy-CAM penalty and the lesion-CAM guidance when on;
    those two are also returned by name (healthy_cam_loss, lesion_cam_loss) for the epoch's history row."""

    def step(model: nn.Module, batch):
        x, y = batch[0].to(device), batch[1].to(device)
        if cfg_t.mixup > 0:
            x, ya, yb, lam = mixup_batch(x, y, cfg_t.mixup)
            logits = model(x)
            loss = lam * F.cross_entropy(logits, ya, label_smoothing=cfg_t.label_smoothing) + (1 - lam) * \
                F.cross_entropy(logits, yb, label_smoothing=cfg_t.label_smoothing)
            healthy_rows = (ya == yb) & (ya == cam_penalty.healthy) if cam_penalty else None
        else:
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg_t.label_smoothing)
            healthy_rows = y == cam_penalty.healthy if cam_penalty else None
        parts = {}
        if cam_penalty:
            cam_loss = cam_penalty(healthy_rows)
            parts["healthy_cam_loss"] = float(cam_loss.detach())
            loss = loss + cam_loss
        if guide is not None:
            guide_loss = guide(batch[2].to(device), y, logits)
            parts["lesion_cam_loss"] = float(guide_loss.detach())
            loss = loss + guide_loss
        return (loss, parts) if parts else loss

    return step


HEADLINE = ("accuracy", "auc_macro", "sensitivity_macro", "specificity_macro", "f1_macro", "kappa_quadratic", "ece")


def train_repeats(model_name: str, data, out, cfg_t: TrainConfig, data_note=None, ctx=None) -> dict:
    """Train `cfg_t.repeats` times (seeds seed, seed+1, ...; each seed also draws its own patient split where the
    data set has none) into <out>/seed<k>/, and summarise the held-out metrics as mean +- sd (stability_summary).
    <out>/ receives the first run's weights, a manifest entry with `stability`, and stability.json."""
    from ..evaluate.ensemble import stability_summary

    out = Path(out)
    main = ctx is None or ctx.is_main
    runs = []
    for i in range(cfg_t.repeats):
        seed = cfg_t.seed + i
        run_cfg = replace_resolved(cfg_t, seed=seed, repeats=1)
        runs.append(_train_single(model_name, data, out / f"seed{seed}", run_cfg, data_note, ctx))
    if not main:
        return runs[0]
    per_run = [r["metrics"].get("test") or r["metrics"]["val"] for r in runs]
    summary = stability_summary(per_run)
    headline = {k: summary[k] for k in HEADLINE if k in summary}
    first = runs[0]
    wfile = out / Path(first["weights"]).name
    shutil.copy2(first["weights"], wfile)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entry = json.loads((Path(first["out"]) / MANIFEST).read_text())[model_name]
    entry["stability"] = {"repeats": len(runs), "seeds": [cfg_t.seed + i for i in range(len(runs))],
                          "split": "test" if runs[0]["metrics"].get("test") else "val", **headline}
    entry["config"] = {**entry["config"], "repeats": len(runs)}
    manifest[model_name] = entry
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "stability.json").write_text(json.dumps(
        {"model": model_name, "summary": summary, "runs": [{"seed": cfg_t.seed + i, "out": r["out"],
                                                            "metrics": m} for i, (r, m) in
                                                           enumerate(zip(runs, per_run))]}, indent=2) + "\n")
    for k, v in headline.items():
        sd = f" +- {v['sd']:.4f}" if v["sd"] is not None else ""
        print(f"stability over {len(runs)} runs: {k} {v['mean']:.4f}{sd} (min {v['min']:.4f}, max {v['max']:.4f})",
              file=sys.stderr, flush=True)
    return {**first, "out": str(out), "weights": str(wfile), **entry, "stability": entry["stability"]}


def _softmax(logits: np.ndarray, t: float) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits) / t, 1).numpy()


# ------------------------------------------------------------------------------------------------ local processes
def _spawn_worker(rank: int, world: int, port: int, model: str, data: str, out: str, config: dict,
                  results: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    result = train(model, data, out, TrainConfig(**config))
    keep = {k: result.get(k) for k in ("model", "sha256", "replica_digest", "replica_param_digest", "rank",
                                       "world_size", "heldout_metrics")}
    Path(results, f"rank{rank}.json").write_text(json.dumps(keep, default=str))


def spawn_train(nprocs: int, model: str, data, out, config=None, port: int | None = None) -> list[dict]:
    """Train with `nprocs` local processes (torch.multiprocessing.spawn, 127.0.0.1) and return each rank's summary
    ({rank, replica_digest, ...}); rank 0's also has the written weights' sha256."""
    import torch.multiprocessing as mp

    cfg = asdict(config or TrainConfig())
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawn_worker, args=(nprocs, port or distributed.free_port(), model, str(data), str(out), cfg, tmp),
                 nprocs=nprocs, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(nprocs)]
