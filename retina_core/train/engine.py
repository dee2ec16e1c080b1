"""One training engine for every image classifier in the registry.

    python -m retina_core data phantoms --kind oct-kermany --n 1600 --seed 1 --out data/oct
    python -m retina_core train --model oct_resnet18 --data data/oct --out runs/oct_resnet18 --epochs 12

AdamW, linear warmup then cosine decay, early stopping on a validation metric with the best weights kept,
resumable checkpoints, seeds, AMP when CUDA is present. After training the calibration temperature is fitted on
the validation split, the held-out test split is scored, and `<out>/<model>.safetensors` + `<out>/manifest.json`
are written (the format `load_model(name, weights_dir=out)` reads).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import RetinaInputError
from ..evaluate.calibration import fit_temperature
from ..evaluate.metrics import classification_metrics
from ..models.loading import MANIFEST, default_device, sha256_file
from ..models.registry import ModelCfg, create_model, get_cfg
from .schedules import EarlyStopping, warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every field is a CLI flag of `retina_core train` (underscores become dashes)."""

    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    patience: int = 4                 # epochs without improvement before stopping
    monitor: str = "auc_macro"        # validation metric that picks the best epoch
    seed: int = 0
    num_workers: int = 0              # decoded images are cached in memory, so workers rarely pay off on CPU
    augment: bool = True
    label_smoothing: float = 0.0
    image_size: int | None = None     # override the cfg's input size (tiny runs in tests)
    max_steps_per_epoch: int | None = None
    init: str | None = None           # start from a checkpoint on disk (.safetensors, or timm/torch .pth)
    resume: bool = False              # continue from <out>/last.pt
    fp16_weights: bool = True         # store the final weights in float16 (half the size)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class CachedImages(Dataset):
    """Decodes every record once (through `read_image`), resized to the model's input size as uint8 in memory;
    augmentation and normalisation then run per item. Decoding never becomes the bottleneck on CPU."""

    def __init__(self, records, classes: tuple[str, ...], cfg: ModelCfg, augment: bool):
        from ..io.decode import read_image

        _, h, w = cfg.input_size
        self.cfg, self.augment = cfg, augment
        self.labels = torch.tensor([classes.index(r.label) for r in records])
        imgs = []
        for r in records:
            x = torch.tensor(read_image(r.path).pixels).permute(2, 0, 1)[None].float()
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            imgs.append(x.round().clamp(0, 255).to(torch.uint8)[0])
        self.images = torch.stack(imgs) if imgs else torch.empty(0, 3, h, w, dtype=torch.uint8)
        self.mean = torch.tensor(cfg.mean).view(-1, 1, 1)
        self.std = torch.tensor(cfg.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float() / 255.0
        if self.augment:
            x = augment_image(x, self.cfg.modality)
        return (x - self.mean) / self.std, self.labels[i]


def augment_image(x: torch.Tensor, modality: str) -> torch.Tensor:
    """Mild, label-preserving augmentation of a [3, H, W] image in [0, 1]: flip, brightness/contrast, shift."""
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    if modality == "fundus" and torch.rand(()) < 0.5:
        x = x.flip(-2)
    gain = 1.0 + 0.2 * (torch.rand(()) - 0.5)
    bias = 0.08 * (torch.rand(()) - 0.5)
    mean = x.mean()
    x = ((x - mean) * (1.0 + 0.3 * (torch.rand(()) - 0.5)) + mean) * gain + bias
    dy, dx = (int(v) for v in torch.randint(-8, 9, (2,)))
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return x.clamp(0, 1)


def _param_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in net.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def predict_logits(net: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    net.eval()
    out, ys = [], []
    for x, y in loader:
        out.append(net(x.to(device)).float().cpu())
        ys.append(y)
    if not out:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(out).numpy(), torch.cat(ys).numpy()


def _score(metrics: dict, monitor: str) -> float:
    v = metrics.get(monitor)
    return float(v) if v is not None else float(metrics["accuracy"])


def _splits(data: str | Path, classes: tuple[str, ...], seed: int):
    from ..io.datasets import load_dataset, patient_split

    index = load_dataset(data)
    unknown = sorted({r.label for r in index.records} - set(classes))
    if unknown:
        raise RetinaInputError(f"The data set has classes this model does not know: {', '.join(unknown)}. "
                               f"Expected a subset of: {', '.join(classes)}.")
    splits = patient_split(index.records, seed=seed)
    if not splits.get("val"):
        # e.g. Mendeley's Kermany (train/test only): carve a validation split from train, keep test untouched.
        carved = patient_split(splits.get("train", []), fractions=(0.9, 0.1, 0.0), seed=seed, force=True)
        splits = {"train": carved["train"], "val": carved["val"], "test": splits.get("test", [])}
    return index, splits


def train(model_name: str, data: str | Path, out: str | Path, config: TrainConfig | None = None,
          data_note: str | None = None) -> dict:
    """Train `model_name` on the data set at `data`; write weights, manifest and history to `out`."""
    cfg_t = config or TrainConfig()
    seed_everything(cfg_t.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {}
    if cfg_t.image_size:
        c = get_cfg(model_name).input_size[0]
        overrides["input_size"] = (c, cfg_t.image_size, cfg_t.image_size)
    net = create_model(model_name, **overrides)
    cfg: ModelCfg = net.cfg
    if cfg_t.init:
        from ..models.checkpoints import load_state_dict_file
        report = load_state_dict_file(net, cfg_t.init)
        log.info("initialised from %s: %s", cfg_t.init, report)
    index, splits = _splits(data, cfg.classes, cfg_t.seed)
    device = default_device()
    net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)

    t0 = time.time()
    sets = {k: CachedImages(splits.get(k, []), cfg.classes, cfg, augment=(k == "train" and cfg_t.augment))
            for k in ("train", "val", "test")}
    log.info("decoded %s images in %.1fs", {k: len(v) for k, v in sets.items()}, time.time() - t0)
    if len(sets["train"]) == 0 or len(sets["val"]) == 0:
        raise RetinaInputError("Training needs images in both a training and a validation split.")
    g = torch.Generator().manual_seed(cfg_t.seed)
    train_loader = DataLoader(sets["train"], batch_size=cfg_t.batch_size, shuffle=True, generator=g,
                              num_workers=cfg_t.num_workers, drop_last=len(sets["train"]) > cfg_t.batch_size)
    eval_loaders = {k: DataLoader(sets[k], batch_size=64) for k in ("val", "test")}

    steps_per_epoch = len(train_loader)
    if cfg_t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg_t.max_steps_per_epoch)
    opt = torch.optim.AdamW(_param_groups(net, cfg_t.weight_decay), lr=cfg_t.lr)
    sched = warmup_cosine(opt, int(cfg_t.warmup_epochs * steps_per_epoch), cfg_t.epochs * steps_per_epoch)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    stopper = EarlyStopping(patience=cfg_t.patience, mode="max")
    history, best_state, best_epoch, start_epoch = [], None, -1, 0
    ckpt = out / "last.pt"
    if cfg_t.resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        best_state, best_epoch, start_epoch = state["best_model"], int(state["best_epoch"]), int(state["epoch"]) + 1
        history = json.loads(state["history"])
        for h in history:
            stopper.step(h["val_score"])
        log.info("resumed from epoch %d", start_epoch)

    for epoch in range(start_epoch, cfg_t.epochs):
        net.train()
        losses, t_ep = [], time.time()
        for step, (x, y) in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, enabled=use_amp):
                loss = F.cross_entropy(net(x), y, label_smoothing=cfg_t.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
        logits, ys = predict_logits(net, eval_loaders["val"], device)
        m = classification_metrics(ys, torch.softmax(torch.from_numpy(logits), 1).numpy(), list(cfg.classes),
                                   ordinal=cfg.ordinal)
        score = _score(m, cfg_t.monitor)
        improved = stopper.step(score)
        if improved:
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            best_epoch = epoch
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                        "val_accuracy": m["accuracy"], "val_score": score, "seconds": round(time.time() - t_ep, 1)})
        print(f"epoch {epoch + 1}/{cfg_t.epochs} loss {history[-1]['train_loss']:.4f} "
              f"val {cfg_t.monitor} {score:.4f} acc {m['accuracy']:.4f}{' *' if improved else ''} "
              f"({history[-1]['seconds']}s)", file=sys.stderr, flush=True)
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "best_model": best_state, "best_epoch": best_epoch, "epoch": epoch,
                    "history": json.dumps(history)}, ckpt)
        if stopper.should_stop:
            break

    net.load_state_dict(best_state)
    val_logits, val_y = predict_logits(net, eval_loaders["val"], device)
    temperature = float(fit_temperature(val_logits, val_y))
    result = {"val": classification_metrics(val_y, _softmax(val_logits, temperature), list(cfg.classes),
                                            ordinal=cfg.ordinal)}
    if len(sets["test"]):
        test_logits, test_y = predict_logits(net, eval_loaders["test"], device)
        result["test"] = classification_metrics(test_y, _softmax(test_logits, temperature), list(cfg.classes),
                                                ordinal=cfg.ordinal)
    return _write_outputs(net, cfg, model_name, out, cfg_t, index, splits, data, data_note, temperature,
                          result, history, best_epoch)


def _softmax(logits: np.ndarray, t: float) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits) / t, 1).numpy()


def _is_phantom(root: Path) -> bool:
    return any((root / p).exists() for p in ("phantom_meta.csv",)) or any(root.glob("*/phantom_meta.csv"))


def _write_outputs(net, cfg, model_name, out, cfg_t, index, splits, data, data_note, temperature, result,
                   history, best_epoch) -> dict:
    state = {k: (v.half() if cfg_t.fp16_weights and v.is_floating_point() else v).contiguous()
             for k, v in net.state_dict().items()}
    wfile = out / f"{model_name}.safetensors"
    save_file(state, str(wfile), metadata={"model": model_name, "arch": cfg.arch})
    phantom = _is_phantom(Path(data))
    entry = {
        "file": wfile.name, "sha256": sha256_file(wfile), "arch": cfg.arch, "modality": cfg.modality,
        "classes": list(cfg.classes), "input_size": list(cfg.input_size), "temperature": round(temperature, 4),
        "dtype": "float16" if cfg_t.fp16_weights else "float32",
        "command": "python -m retina_core " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if Path(sys.argv[0]).name in ("__main__.py", "retina-core", "cli.py") else None,
        "data": data_note or (f"synthetic phantoms ({index.layout} layout)" if phantom else f"{index.layout}: {data}"),
        "trained_on_phantoms": phantom,
        "splits": {k: len(v) for k, v in splits.items()},
        "metric_kind": "phantom" if phantom else "held-out",
        "heldout_metrics": _brief(result.get("test") or result["val"]),
        "best_epoch": best_epoch + 1, "epochs_run": len(history),
        "config": asdict(cfg_t), "date": _dt.date.today().isoformat(), "torch": torch.__version__,
    }
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[model_name] = entry
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps({"history": history, "metrics": result}, indent=2) + "\n")
    return {"model": model_name, "out": str(out), "weights": str(wfile), **entry, "metrics": result}


def _brief(m: dict) -> dict:
    """The headline figures for a manifest entry (the full report stays in history.json)."""
    keys = ("n", "accuracy", "auc_macro", "sensitivity_macro", "specificity_macro", "f1_macro",
            "kappa_quadratic", "ece")
    return {k: (round(m[k], 4) if isinstance(m.get(k), float) else m.get(k)) for k in keys if k in m}


def config_from_args(args, base: TrainConfig | None = None) -> TrainConfig:
    """Dataclass defaults overridden by CLI flags that were given."""
    base = base or TrainConfig()
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    return replace(base, **given)
