"""The one training loop every recipe plugs into: the image classifiers (train/engine.py), the OCT volume model and
the fundus + OCT fusion head (train/multimodal.py).

A recipe builds its network and data, then hands the loop two functions:

    step_fn(model, batch) -> loss, or (loss, {name: float})   one training batch; named parts are logged per epoch
    eval_fn() -> (metrics, score)                              validation on rank 0; score: higher is better

    fitted = fit(net, train_set, step_fn, eval_fn, cfg_t, ctx, device)
    return finish(net, model_name, out, cfg_t, ctx, fitted, index=..., splits=..., data=..., data_note=...,
                  logits=lambda split: (z, y), test=has_test_split)

`fit` owns the epochs: the shuffled (or DDP-sharded) training loader, AdamW with warm-up + cosine or
reduce-on-plateau (`make_optimizer`, `make_scheduler`), AMP when asked, early stopping and the best weights
(`EpochTracker`), the progress lines, and, where the recipe asks for them, two-phase training (`--freeze-epochs`) and
resumable checkpoints (`--resume`). `finish` fits the calibration temperature on the validation logits, scores the
held-out split and writes the run (`write_outputs`); under DDP the other ranks return rank 0's entry.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import RetinaInputError
from ..evaluate.calibration import apply_temperature, fit_temperature
from ..evaluate.metrics import bootstrap_ci, classification_metrics
from . import distributed
from .common import (EpochTracker, TrainConfig, make_optimizer, make_scheduler, result_from_rank0, seed_everything,
                     write_outputs)

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]
EvalFn = Callable[[], "tuple[dict, float]"]
LogitsFn = Callable[[str], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class Fitted:
    """What `fit` leaves for `finish`: the best epoch (0-based; its weights are loaded) and the per-epoch history."""

    best_epoch: int
    history: list[dict]


def start_run(out: str | Path, cfg_t: TrainConfig, ctx) -> Path:
    """Seed every generator with cfg_t.seed and create `out` (rank 0). The first thing every recipe does."""
    seed_everything(cfg_t.seed)
    out = Path(out)
    if ctx is None or ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def fit(module: nn.Module, train_set: Dataset, step_fn: StepFn, eval_fn: EvalFn, cfg_t: TrainConfig, ctx,
        device: torch.device, *, amp: bool = False, num_workers: int = 0, phases: bool = False,
        checkpoint: Path | None = None, hooks: Sequence[Any] = ()) -> Fitted:
    """Train `module`'s trainable parameters for cfg_t.epochs and load the best validation epoch's weights.

    step_fn(model, batch) gets the DDP-wrapped module (or `module` itself) in train mode, under autocast when `amp`;
    eval_fn() runs on rank 0 after every epoch and its score (broadcast to every rank) drives early stopping, the
    best weights and reduce-on-plateau. The train set's `set_epoch(epoch)` is called when it has one.
    `phases`: two-phase training per cfg_t.freeze_epochs (head only, then cfg_t.unfreeze at cfg_t.finetune_lr).
    `checkpoint`: saved after every epoch (rank 0), and resumed from when cfg_t.resume is set.
    `hooks`: objects with close() (None skipped), closed when training ends."""
    main = ctx is None or ctx.is_main
    try:
        loader = _train_loader(train_set, cfg_t, ctx, num_workers)
        steps = len(loader) if not cfg_t.max_steps_per_epoch else min(len(loader), cfg_t.max_steps_per_epoch)
        phase_of = (lambda e: _phase_of(e, cfg_t)) if phases else (lambda e: 0)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        tracker, epoch, state = _resume(checkpoint, module, cfg_t, device)
        phase = phase_of(epoch)
        opt, sched, per_step, model = _start_phase(module, phase, cfg_t, steps, ctx)
        tracker.restart_patience([h["val_score"] for h in tracker.history if phase_of(h["epoch"]) == phase])
        if state is not None and int(state.get("phase", 0)) == phase:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        while epoch < cfg_t.epochs:
            if phase_of(epoch) != phase:   # two-phase: unfreeze, new optimizer, fresh patience
                phase = phase_of(epoch)
                opt, sched, per_step, model = _start_phase(module, phase, cfg_t, steps, ctx)
                tracker.restart_patience()
                if main:
                    print(f"phase {phase}: trainable {sum(p.numel() for p in module.parameters() if p.requires_grad)}"
                          f" parameters", file=sys.stderr, flush=True)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            if ctx is not None:
                loader.sampler.set_epoch(epoch)
            model.train()
            _frozen_bn_eval(module)
            t_ep = time.time()
            losses, parts = _train_epoch(model, loader, steps, step_fn, opt, sched if per_step else None, scaler,
                                         device if amp else None)
            distributed.sync_buffers(module, ctx)
            m, score = eval_fn() if main else (None, None)
            score = distributed.broadcast(score, ctx)
            if not per_step:
                sched.step(score)
            extra = {**({"phase": phase} if phase else {}), **{k: float(np.mean(v)) for k, v in parts.items()}}
            tracker.end_epoch(module, epoch, losses, m, score, time.time() - t_ep, main, extra or None)
            if main and checkpoint is not None:
                torch.save({"model": module.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "best_model": tracker.best_state,
                            "best_epoch": tracker.best_epoch, "epoch": epoch, "phase": phase,
                            "history": json.dumps(tracker.history)}, checkpoint)
            epoch += 1
            if tracker.should_stop:
                if phase == 1 and cfg_t.epochs > cfg_t.freeze_epochs:
                    epoch = max(epoch, cfg_t.freeze_epochs)   # phase 1 has converged: go on to fine-tuning
                else:
                    break
    finally:
        for hook in hooks:
            if hook is not None:
                hook.close()
    module.load_state_dict(tracker.best_state)
    if phases:
        for p in module.parameters():
            p.requires_grad_(True)
    return Fitted(tracker.best_epoch, tracker.history)


def finish(net: nn.Module, model_name: str, out: Path, cfg_t: TrainConfig, ctx, fitted: Fitted, *, index, splits,
           data, data_note: str | None, logits: LogitsFn, test: bool, extra: dict | None = None,
           state: dict | None = None,
           probs: Callable[[np.ndarray, float], np.ndarray] = apply_temperature) -> dict:
    """Write the trained run (rank 0) and return its summary; the other ranks return rank 0's manifest entry.

    logits(split) -> (logits, labels) of "val" (and "test" when `test`), computed on rank 0 only; probs(logits, T)
    turns them into calibrated probabilities. The temperature is fitted on the validation logits; a non-empty test
    split is scored too, with a patient-level bootstrap CI (the manifest's held-out metrics; else validation's).
    `state` replaces net.state_dict() as the stored weights (e.g. a head without its frozen encoders); `extra` joins
    the manifest entry."""
    digest = distributed.state_digest(net) if ctx is not None else None
    if ctx is not None and not ctx.is_main:
        return result_from_rank0(model_name, out, ctx, digest)
    cfg = net.cfg
    classes, ordinal = list(cfg.classes), cfg.ordinal
    val_z, val_y = logits("val")
    temperature = float(fit_temperature(val_z, val_y))
    result = {"val": classification_metrics(val_y, probs(val_z, temperature), classes, ordinal=ordinal)}
    test_z, test_y = logits("test") if test else (None, [])
    if len(test_y):
        result["test"] = classification_metrics(test_y, probs(test_z, temperature), classes, ordinal=ordinal)
        recs = splits.get("test") or []
        groups = [r.patient_id or str(r.path) for r in recs] if len(recs) == len(test_y) else None
        result["ci95"] = bootstrap_ci(test_y, probs(test_z, temperature), classes, groups=groups)
    res = write_outputs(net, cfg, model_name, out, cfg_t, index, splits, data, data_note, temperature, result,
                        fitted.history, fitted.best_epoch, extra=extra, state=state)
    if ctx is not None:
        res.update(rank=ctx.rank, world_size=ctx.world_size, replica_digest=digest)
        distributed.barrier(ctx)   # the other ranks read the manifest written above
    return res


def _train_loader(ds: Dataset, cfg_t: TrainConfig, ctx, num_workers: int) -> DataLoader:
    """Shuffled batches seeded by cfg_t.seed; under DDP each rank's shard (every rank takes the same number of
    steps: equal shards, whole batches only)."""
    bs = cfg_t.batch_size
    if ctx is None:
        g = torch.Generator().manual_seed(cfg_t.seed)
        return DataLoader(ds, batch_size=bs, shuffle=True, generator=g, num_workers=num_workers,
                          drop_last=len(ds) > bs)
    shard = distributed.sampler(ds, ctx, cfg_t.seed)
    return DataLoader(ds, batch_size=bs, sampler=shard, num_workers=num_workers, drop_last=len(shard) > bs)


def _resume(checkpoint: Path | None, module: nn.Module, cfg_t: TrainConfig, device: torch.device):
    """(tracker, first epoch, checkpoint state): `module`'s weights and the tracker from `checkpoint` when
    cfg_t.resume is set and it exists, else a fresh tracker from epoch 0 (state None)."""
    if checkpoint is None or not cfg_t.resume or not checkpoint.exists():
        return EpochTracker(cfg_t), 0, None
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    module.load_state_dict(state["model"])
    epoch = int(state["epoch"]) + 1
    tracker = EpochTracker(cfg_t, json.loads(state["history"]), state["best_model"], int(state["best_epoch"]))
    log.info("resumed from epoch %d", epoch)
    return tracker, epoch, state


def _train_epoch(model: nn.Module, loader: DataLoader, steps: int, step_fn: StepFn, opt, sched, scaler,
                 amp_device: torch.device | None) -> tuple[list[float], dict[str, list[float]]]:
    """One pass over at most `steps` batches: step_fn, backward (scaled under AMP), optimizer step, and the
    per-step schedule (`sched`, None when it steps per epoch). Returns the losses and the step's named parts."""
    losses, parts = [], {}
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        with torch.autocast(amp_device.type) if amp_device is not None else contextlib.nullcontext():
            loss = step_fn(model, batch)
        if isinstance(loss, tuple):
            loss, logged = loss
            for k, v in logged.items():
                parts.setdefault(k, []).append(float(v))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses, parts


def _start_phase(module: nn.Module, phase: int, cfg_t: TrainConfig, steps: int, ctx):
    """(optimizer, scheduler, per_step, wrapped module) for a training phase: phase 2 at the fine-tuning lr, without
    warm-up, its cosine spanning its own epochs."""
    _set_phase(module, phase, cfg_t)
    lr = cfg_t.lr if phase < 2 else (cfg_t.finetune_lr or cfg_t.lr / 100.0)
    first, last = _phase_bounds(phase, cfg_t)
    opt = make_optimizer(module, cfg_t, lr)
    sched, per_step = make_scheduler(opt, cfg_t, max(steps, 1), last - first, warmup=phase < 2)
    return opt, sched, per_step, distributed.wrap(module, ctx)


# ------------------------------------------------------------------------------------------------ two-phase training
def _is_head_fn(net: nn.Module):
    """name -> whether the parameter belongs to the classification head (phase 1 of two-phase training)."""
    prefixes = getattr(net, "head_param_prefixes", None)
    if prefixes:
        return lambda n: n.startswith(tuple(prefixes))
    for owner, path in ((net, ""), (getattr(net, "net", None), "net.")):
        if owner is not None and hasattr(owner, "get_classifier"):
            ids = {id(p) for p in owner.get_classifier().parameters()}
            names = {path + n for n, p in owner.named_parameters() if id(p) in ids}
            if names:
                return lambda n: n in names
    raise RetinaInputError(f"{type(net).__name__} does not say which parameters form its head, so it cannot be "
                           f"trained in two phases (--freeze-epochs).")


def _set_phase(net: nn.Module, phase: int, cfg_t: TrainConfig) -> None:
    """phase 0: leave every parameter as built; 1: head only; 2: head + the `unfreeze` prefixes (None = all)."""
    if phase == 0:
        return
    is_head = _is_head_fn(net)
    prefixes = tuple(p.strip() for p in (cfg_t.unfreeze or "").split(",") if p.strip())
    for n, p in net.named_parameters():
        p.requires_grad_(is_head(n) or (phase == 2 and (not prefixes or n.startswith(prefixes))))


def _frozen_bn_eval(net: nn.Module) -> None:
    """BatchNorm layers whose parameters are all frozen keep their running statistics (Keras trainable=False)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            ps = list(m.parameters(recurse=False))
            if ps and not any(p.requires_grad for p in ps):
                m.eval()


def _phase_of(epoch: int, cfg_t: TrainConfig) -> int:
    if cfg_t.freeze_epochs <= 0:
        return 0
    return 1 if epoch < cfg_t.freeze_epochs else 2


def _phase_bounds(phase: int, cfg_t: TrainConfig) -> tuple[int, int]:
    if phase == 0:
        return 0, cfg_t.epochs
    if phase == 1:
        return 0, min(cfg_t.freeze_epochs, cfg_t.epochs)
    return cfg_t.freeze_epochs, cfg_t.epochs
