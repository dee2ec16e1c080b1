"""What every training recipe shares (the image engine, and the fundus + OCT and volume trainers in multimodal.py):
the run's configuration (`TrainConfig`, the named recipes, `config_from_args`), seeding, the optimiser and schedule,
the validation score that picks the best epoch (`monitor_score`, `EpochTracker`) and what a finished run writes
(`write_outputs`: weights, manifest entry, splits and history; `result_from_rank0` on the other ranks). The one
training loop that puts these together is train/loop.py.

It imports neither engine.py, multimodal.py nor loop.py, so they all import it and engine.py can dispatch to
multimodal.py.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import random
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import RetinaInputError
from ..io.realsets import real_set_of, split_hashes
from ..models.loading import MANIFEST, sha256_file
from . import distributed
from .schedules import EarlyStopping, param_groups_layer_decay, warmup_cosine

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
    monitor: str = "auc_macro"        # what picks the best epoch (MONITORS): a validation metric, or val_loss
    seed: int = 0
    num_workers: int = 0              # decoded images are cached in memory, so workers rarely pay off on CPU
    augment: bool = True
    label_smoothing: float = 0.0
    image_size: int | None = None     # override the cfg's input size (tiny runs in tests)
    max_steps_per_epoch: int | None = None
    init: str | None = None           # start from a checkpoint on disk (.safetensors, or timm/torch .pth)
    resume: bool = False              # continue from <out>/last.pt
    fp16_weights: bool = True         # store the final weights in float16 (half the size)
    # ---- additions (defaults keep the behaviour above) ----
    recipe: str | None = None         # a named set of defaults (RECIPES); flags you give still win; "none" = off
    layer_decay: float | None = None  # layer-wise lr decay (BEiT/MAE/RETFound), e.g. 0.65; ViTs (or net.layer_id)
    drop_path: float | None = None    # stochastic depth rate passed to the builder (timm drop_path_rate)
    mixup: float = 0.0                # mixup Beta(a, a) parameter; 0 = off
    aug_strength: float = 1.0         # scales the intensity/shift augmentation (0.5 gentle, 1.5 strong)
    freeze_epochs: int = 0            # two-phase training: epochs with only the head trainable (0 = one phase)
    unfreeze: str | None = None       # phase 2: comma-separated parameter-name prefixes made trainable (None = all)
    finetune_lr: float | None = None  # phase 2 learning rate (default lr / 100)
    plateau: bool = False             # ReduceLROnPlateau (x0.5 after 2 flat epochs) instead of warmup + cosine
    repeats: int = 1                  # train N times (seeds seed..seed+N-1) and report mean +- sd of the metrics
    pair_with: str | None = None      # fundus_oct_fusion: an OCT data set to draw virtual pairs from
    encoders_dir: str | None = None   # fundus_oct_fusion: comma-separated folders holding the encoders' weights
    fusion: str | None = None         # volume models: concat | add | multiply | image_only
    output_stride: int | None = None  # CNNs: 16 dilates the last stage (finer Grad-CAM grid, more compute)
    slice_stride: int | None = None   # volume models: total stride across slices (< in-plane: finer Grad-CAM in depth)
    global_pool: str | None = None    # timm CNNs: avg (default) | max | avgmax: how the last feature map is pooled
    healthy_cam_penalty: float = 0.0  # CNNs: weight of the flat-evidence penalty on healthy images (HealthyCamPenalty)
    lesion_cam_guidance: float = 0.0  # CNNs + lesion masks on disk: weight of the map-on-lesion loss (LesionCamGuidance)
    attention_mining: float = 0.0     # volume models: weight of GAIN's attention-mining loss (VolumeAttentionMining)
    meta_dropout: float = 0.0         # volume models: P(a training volume's clinical record is hidden; VolumeSet)
    lesion_seg: float = 0.0           # volume models: weight of the dense lesion read-out's loss (LesionEvidencePool)
    lesion_only: bool = False         # volume models + --lesion-seg: the image branch is the read-out's evidence alone
    split_fractions: str = "0.8,0.1,0.1"   # train,val,test shares of the patient-level split (sets with no split)
    split_by: str = "stratified"      # stratified (by label) | patient_hash (same patients -> same split in any set)
    framing: str = "auto"             # fundus: fov (field of view centred, letterboxed; auto) | stretch (whole frame)
    label_column: str | None = None   # labels from another labels.csv column, e.g. dr_grade (io.datasets.relabel)
    label_map: str | None = None      # with it: value=label pairs, e.g. "0=noDR,NPDR=DR,PDR=DR" (others left out)


# TrainConfig fields of the volume models
VOLUME_ONLY_OPTIONS = ("attention_mining", "slice_stride", "meta_dropout", "lesion_seg", "lesion_only")


def volume_only_options(cfg_t: TrainConfig) -> list[str]:
    """The volume-model options set in `cfg_t`, as their CLI flags (refused for every other model)."""
    return [f"--{k.replace('_', '-')}" for k in VOLUME_ONLY_OPTIONS if getattr(cfg_t, k)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Named training recipes: TrainConfig defaults per model family (docs/models.md). A recipe fills the fields a caller
# left at their dataclass default; on the command line every flag given wins (config_from_args).
RECIPES: dict[str, dict] = {
    "v3_specialist": {
        "doc": "RetinalFusionNet V3 'specialist': long schedule, low lr, gentle augmentation that keeps layer "
               "boundaries sharp for the edge branch, label smoothing 0.1.",
        "config": {"epochs": 30, "batch_size": 32, "lr": 4e-4, "weight_decay": 0.05, "warmup_epochs": 2.0,
                   "patience": 6, "label_smoothing": 0.1, "aug_strength": 0.5, "drop_path": 0.1},
    },
    "v4_sprint": {
        "doc": "RetinalFusionNet V4 'sprint': short schedule, high lr, strong augmentation and mixup 0.2 for "
               "global robustness.",
        "config": {"epochs": 12, "batch_size": 32, "lr": 1.5e-3, "weight_decay": 0.05, "warmup_epochs": 0.5,
                   "patience": 3, "label_smoothing": 0.05, "aug_strength": 1.5, "mixup": 0.2, "drop_path": 0.05},
    },
    "retfound_finetune": {
        "doc": "RETFound main_finetune: AdamW, lr = 5e-3 x 16 / 256, layer decay 0.65, weight decay 0.05, "
               "drop path 0.2, label smoothing 0.1, 10 warm-up epochs then cosine, 50 epochs, batch 16.",
        "config": {"epochs": 50, "batch_size": 16, "lr": 5e-3 * 16 / 256, "weight_decay": 0.05,
                   "warmup_epochs": 10.0, "patience": 10, "label_smoothing": 0.1, "layer_decay": 0.65,
                   "drop_path": 0.2},
    },
    "two_phase": {
        "doc": "ResNet50 source: phase 1 head only (backbone and its BatchNorm frozen) at lr 1e-3, phase 2 "
               "`net.layer4` unfrozen at lr 1e-5, reduce-on-plateau and early stopping.",
        "config": {"epochs": 30, "freeze_epochs": 10, "lr": 1e-3, "finetune_lr": 1e-5, "unfreeze": "net.layer4",
                   "plateau": True, "patience": 5, "weight_decay": 1e-4},
    },
    "learned_fusion3d": {
        "doc": "LearnedFusion3D: focal loss (dynamic alpha) with label smoothing 0.1, AdamW lr 3e-4, batch 8.",
        "config": {"epochs": 30, "batch_size": 8, "lr": 3e-4, "weight_decay": 1e-4, "patience": 6,
                   "label_smoothing": 0.1},
    },
    "fusion_head": {
        "doc": "Fundus + OCT fusion head on frozen encoders: AdamW lr 1e-3, batch 64, no image augmentation "
               "(embeddings are computed once).",
        "config": {"epochs": 30, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4, "patience": 6,
                   "augment": False},
    },
}


# The recipe a model trains with when none is named (models not listed: no recipe, the plain defaults).
DEFAULT_RECIPES = {
    "retinal_fusion_net": "v3_specialist", "retinal_fusion_net_atto": "v3_specialist",
    "retinal_fusion_net_atto_v4": "v4_sprint", "retfound_vit": "retfound_finetune",
    "retfound_vit_tiny": "retfound_finetune", "fundus_resnet50": "two_phase", "fundus_resnet18_head": "two_phase",
    "oct_volume_fusion3d": "learned_fusion3d", "oct_volume_fusion3d_tiny": "learned_fusion3d",
    "fundus_oct_fusion": "fusion_head",
}


def _recipe_name(model_name: str, requested: str | None) -> str | None:
    name = requested if requested is not None else DEFAULT_RECIPES.get(model_name)
    if name in (None, "", "none"):
        return None
    if name not in RECIPES:
        raise RetinaInputError(f"Unknown training recipe {name!r}. Available recipes: {', '.join(RECIPES)}, none.")
    return name


def _mark_resolved(cfg_t: "TrainConfig") -> "TrainConfig":
    cfg_t._recipe_resolved = True
    return cfg_t


def resolve_recipe(model_name: str, cfg_t: "TrainConfig") -> "TrainConfig":
    """Fill the fields still at their TrainConfig default from the recipe (named, or the model's default)."""
    if getattr(cfg_t, "_recipe_resolved", False):
        return cfg_t
    name = _recipe_name(model_name, cfg_t.recipe)
    if name is None:
        return _mark_resolved(replace(cfg_t, recipe=None))
    defaults = TrainConfig()
    updates = {k: v for k, v in RECIPES[name]["config"].items() if getattr(cfg_t, k) == getattr(defaults, k)}
    return _mark_resolved(replace(cfg_t, recipe=name, **updates))


def replace_resolved(cfg_t: "TrainConfig", **changes) -> "TrainConfig":
    """`cfg_t` with `changes`, its recipe already applied (not applied again by `resolve_recipe`)."""
    return _mark_resolved(replace(cfg_t, **changes))


def config_from_args(args, base: TrainConfig | None = None) -> TrainConfig:
    """Dataclass defaults, then the recipe (`--recipe`, or the model's default recipe), then the CLI flags given."""
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    if base is None:
        name = _recipe_name(getattr(args, "model", "") or "", given.get("recipe"))
        base = TrainConfig(**(RECIPES[name]["config"] if name else {}))
        given["recipe"] = name
        return _mark_resolved(replace(base, **given))
    return replace(base, **given)


# What can pick the best epoch (and drive early stopping): a validation metric (higher is better), or "val_loss", the
# whole training objective on the validation split - classification loss plus, when they are on, the healthy-CAM
# penalty and the lesion-CAM guidance on validation images (their masks) - lower is better. Unlike AUC, which on an
# easy (phantom) set reaches 1.0 in an epoch or two and then keeps the first such epoch, the loss goes on falling
# while the map converges onto the lesions.
MONITORS = ("auc_macro", "accuracy", "kappa_quadratic", "f1_macro", "val_loss")


def check_monitor(monitor: str) -> None:
    if monitor not in MONITORS:
        raise RetinaInputError(f"Unknown --monitor {monitor!r}; choose one of: {', '.join(MONITORS)}.")


def monitor_score(metrics: dict, monitor: str) -> float:
    """The tracked score, higher is better: the metric, or minus the validation loss (monitor val_loss). A metric
    that is undefined on this validation split (AUC with one class absent) falls back to accuracy."""
    if monitor == "val_loss":
        return -float(metrics["val_loss"])
    v = metrics.get(monitor)
    return float(v) if v is not None else float(metrics["accuracy"])


class EpochTracker:
    """End-of-epoch bookkeeping of the training loop (train/loop.py), for every recipe: early stopping on the
    validation score, the best weights, the history row and the progress line on stderr."""

    def __init__(self, cfg_t: TrainConfig, history: list | None = None, best_state: dict | None = None,
                 best_epoch: int = -1):
        self.cfg_t, self.history = cfg_t, list(history or [])
        self.best_state, self.best_epoch = best_state, best_epoch
        scores = [h["val_score"] for h in self.history if h["val_score"] is not None and not math.isnan(h["val_score"])]
        self.best_score = max(scores) if scores else None
        self.stopper = EarlyStopping(patience=cfg_t.patience, mode="max")

    def restart_patience(self, replay: list[float] | None = None) -> None:
        """A fresh early-stopping counter (a new training phase), optionally replaying that phase's scores."""
        self.stopper = EarlyStopping(patience=self.cfg_t.patience, mode="max")
        for v in replay or []:
            self.stopper.step(v)

    @property
    def should_stop(self) -> bool:
        return self.stopper.should_stop

    def end_epoch(self, module: nn.Module, epoch: int, losses: list[float], metrics: dict | None, score: float,
                  seconds: float, main: bool, extra: dict | None = None) -> bool:
        """Record one epoch; keeps a CPU copy of the weights when the score improved. Returns whether it did."""
        self.stopper.step(score)
        improved = not math.isnan(score) and (self.best_score is None or score > self.best_score)
        if improved:
            self.best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            self.best_epoch, self.best_score = epoch, score
        self.history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                             "val_accuracy": metrics.get("accuracy") if metrics else None, "val_score": score,
                             "seconds": round(seconds, 1),
                             **({"val_loss": metrics["val_loss"]} if metrics and "val_loss" in metrics else {}),
                             **(extra or {})})
        if main:
            h = self.history[-1]
            shown = -score if self.cfg_t.monitor == "val_loss" else score
            acc = f" acc {h['val_accuracy']:.4f}" if h["val_accuracy"] is not None else ""
            print(f"epoch {epoch + 1}/{self.cfg_t.epochs} loss {h['train_loss']:.4f} val {self.cfg_t.monitor} "
                  f"{shown:.4f}{acc}{' *' if improved else ''} ({h['seconds']}s)",
                  file=sys.stderr, flush=True)
        return improved


def architecture_kwargs(cfg_t: TrainConfig) -> dict:
    """Builder options that change the architecture the weights belong to (recorded in the manifest entry's
    `builder_kwargs`, so `load_model` rebuilds the same network)."""
    kw = {}
    if cfg_t.output_stride:
        kw["output_stride"] = cfg_t.output_stride
    if cfg_t.slice_stride:
        kw["slice_stride"] = cfg_t.slice_stride
    if cfg_t.global_pool:
        kw["global_pool"] = cfg_t.global_pool
    if cfg_t.lesion_seg:
        kw["lesion_head"] = "only" if cfg_t.lesion_only else True
    return kw


def _param_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in net.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(net: nn.Module, cfg_t: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; layer-wise lr decay groups when cfg_t.layer_decay is set."""
    if cfg_t.layer_decay:
        if hasattr(net, "blocks"):
            groups = param_groups_layer_decay(net, lr, cfg_t.weight_decay, cfg_t.layer_decay)
        elif hasattr(net, "layer_id"):
            groups = param_groups_layer_decay(net, lr, cfg_t.weight_decay, cfg_t.layer_decay,
                                              layer_id_fn=net.layer_id)
        else:
            log.warning("layer_decay ignored: %s has no transformer blocks or layer_id()", type(net).__name__)
            groups = _param_groups(net, cfg_t.weight_decay)
    else:
        groups = _param_groups(net, cfg_t.weight_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def make_scheduler(opt, cfg_t: TrainConfig, steps_per_epoch: int, epochs: int, warmup: bool = True):
    """(scheduler, per_step): warmup + cosine stepped every optimizer step, or ReduceLROnPlateau per epoch."""
    if cfg_t.plateau:
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=2), False
    total = max(1, epochs * steps_per_epoch)
    warm = min(int(cfg_t.warmup_epochs * steps_per_epoch) if warmup else 0, total - 1)
    return warmup_cosine(opt, warm, total), True


def result_from_rank0(model_name: str, out: Path, ctx, digest: str | None) -> dict:
    """What a non-main rank returns: rank 0's manifest entry (after it has written it) and its own digest."""
    distributed.barrier(ctx)
    entry = json.loads((Path(out) / MANIFEST).read_text())[model_name]
    return {"model": model_name, "out": str(out), "weights": str(Path(out) / entry["file"]), **entry,
            "metrics": None, "rank": ctx.rank, "world_size": ctx.world_size, "replica_digest": digest}


def is_phantom_set(root: Path) -> bool:
    """The data set at `root` was written by `data phantoms` (a phantom_meta.csv in it or one level down), or
    combines such a set (`data combine`)."""
    from ..io.datasets import combined_from

    return (root / "phantom_meta.csv").exists() or any(root.glob("*/phantom_meta.csv")) or \
        any(is_phantom_set(Path(p)) for p in combined_from(root))


PRETRAIN_FILE = "pretrain.json"          # written by `pretrain` (train/pretrain.py) beside its encoder
ENCODER_FILE = "encoder.safetensors"


def pretraining_of(init: str | Path | None) -> dict | None:
    """The provenance of an `--init` checkpoint written by `pretrain` (its pretrain.json, without the per-epoch
    history), for the fine-tuned model's manifest entry; None for any other checkpoint."""
    if not init:
        return None
    path = Path(init)
    meta = path.with_name(PRETRAIN_FILE)
    if path.name != ENCODER_FILE or not meta.exists():
        return None
    report = json.loads(meta.read_text())
    keep = ("method", "arch", "input_size", "framing", "sets", "split_sha256", "labels_used", "command", "mae",
            "best_epoch", "epochs_run", "best_val_loss", "date")
    return {k: report[k] for k in keep if k in report}


def write_outputs(net, cfg, model_name, out, cfg_t, index, splits, data, data_note, temperature, result,
                   history, best_epoch, extra: dict | None = None, state: dict | None = None) -> dict:
    """Write a finished run to `out`: the weights (<model>.safetensors, float16 unless cfg_t.fp16_weights is off),
    splits.json, the model's manifest entry and history.json; returns the run's summary (entry + metrics)."""
    state = {k: (v.half() if cfg_t.fp16_weights and v.is_floating_point() else v).contiguous()
             for k, v in (state if state is not None else net.state_dict()).items()}
    wfile = out / f"{model_name}.safetensors"
    save_file(state, str(wfile), metadata={"model": model_name, "arch": cfg.arch})
    split_summary, split_lists = split_hashes(splits)
    (out / "splits.json").write_text(json.dumps({"model": model_name, "splits": split_summary,
                                                 "files_sha256": split_lists}, indent=1) + "\n")
    phantom = is_phantom_set(Path(data))
    real = None if phantom else real_set_of(data)
    entry = {
        "file": wfile.name, "sha256": sha256_file(wfile), "arch": cfg.arch, "modality": cfg.modality,
        "classes": list(cfg.classes), "input_size": list(cfg.input_size), "temperature": round(temperature, 4),
        **({"framing": cfg.framing} if cfg.framing != "stretch" else {}),
        "dtype": "float16" if cfg_t.fp16_weights else "float32",
        "command": "python -m retina_core " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if Path(sys.argv[0]).name in ("__main__.py", "retina-core", "cli.py") else None,
        "data": data_note or (f"synthetic phantoms ({index.layout} layout)" if phantom else
                              f"real: {real['name']}" if real else f"{index.layout}: {data}"),
        "trained_on_phantoms": phantom,
        **({"real_data": {k: real[k] for k in ("name", "title", "licence", "attribution", "caveats")}}
           if real else {}),
        "splits": {k: len(v) for k, v in splits.items()},
        "split_sha256": split_summary,
        "metric_kind": "phantom" if phantom else "held-out",
        "heldout_split": "test" if result.get("test") else "val",
        "heldout_metrics": _brief(result.get("test") or result["val"]),
        **({"heldout_ci95": result["ci95"]} if result.get("ci95") else {}),
        "best_epoch": best_epoch + 1, "epochs_run": len(history),
        "config": asdict(cfg_t), "date": _dt.date.today().isoformat(), "torch": torch.__version__,
        **({"recipe": cfg_t.recipe} if cfg_t.recipe else {}),
        **({"builder_kwargs": architecture_kwargs(cfg_t)} if architecture_kwargs(cfg_t) else {}),
        **({"pretrained": pretrained} if (pretrained := pretraining_of(cfg_t.init)) else {}),
        **({"init_sha256": sha256_file(Path(cfg_t.init))} if cfg_t.init and Path(cfg_t.init).is_file() else {}),
        **(extra or {}),
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
