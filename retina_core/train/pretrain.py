"""Self-supervised pre-training of the RETFound-architecture ViTs as a masked autoencoder (MAE, He et al. 2022),
RETFound's own pre-training, on the unlabelled pixels of the training split of one or more image sets.

    python -m retina_core pretrain --model retfound_vit_tiny --data ../shared/realdata/eye_disease_4class \\
        --out runs/mae_4class --image-size 112 --split-fractions 0.7,0.15,0.15 --epochs 60
    python -m retina_core train --model retfound_vit_tiny ... --init runs/mae_4class/encoder.safetensors

What it does, as RETFound / MAE's `main_pretrain`: each image is cut into patches, 75% of them at random are
hidden, the ViT encoder sees only the visible quarter (plus its position embeddings: fixed 2-D sin-cos during
pre-training, learnt afterwards), and a small transformer decoder predicts the hidden patches' pixels, normalised
per patch (`norm_pix_loss`); the loss is the mean squared error on the hidden patches only. Labels are never read.

Which images: only the **training split** of each set, derived exactly as `train` derives it (same seed,
fractions and split method, patient level), so pre-training never sees a validation or test photograph's pixels
of a set split that way; the validation split's reconstruction loss (fixed masks) picks the best epoch. The
images are framed as the fine-tuned model will see them (`--framing`, fundus field of view by default).

Writes to `--out`: `encoder.safetensors` (the encoder's weights in RETFound's checkpoint layout: timm ViT names,
no head; `train --init` imports it through `import_retfound_checkpoint`), `pretrain.json` (model, sets with
their licence and attribution, per-split content hashes, command, settings, per-epoch losses, best epoch) and
`last.pt` (for `--resume`). `train` copies `pretrain.json`'s summary into the fine-tuned model's manifest entry.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.data import DataLoader

from ..errors import RetinaInputError
from ..models.loading import default_device
from .common import ENCODER_FILE, PRETRAIN_FILE, TrainConfig

log = logging.getLogger(__name__)



@dataclass
class MaeConfig:
    """The masked-autoencoder settings (`pretrain` flags)."""

    mask_ratio: float = 0.75        # share of patches hidden from the encoder (MAE / RETFound: 0.75)
    decoder_dim: int = 128          # width of the light decoder (MAE: 512 for ViT-L; scaled down with the encoder)
    decoder_depth: int = 2          # decoder blocks (MAE: 8)
    decoder_heads: int = 4
    norm_pix_loss: bool = True      # targets normalised per patch (MAE's better setting, used by RETFound)


def random_masking(tokens: torch.Tensor, ratio: float, generator: torch.Generator | None = None):
    """Keep a random (1 - ratio) share of each row's tokens (MAE's per-sample shuffling).
    Returns (kept [B, K, C], mask [B, N] with 1 = hidden, ids_restore [B, N])."""
    b, n, c = tokens.shape
    keep = max(1, int(round(n * (1.0 - ratio))))
    noise = torch.rand(b, n, generator=generator, device="cpu" if generator is not None else tokens.device)
    ids_shuffle = noise.to(tokens.device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, c))
    mask = torch.ones(b, n, device=tokens.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


class MaskedAutoencoder(nn.Module):
    """A timm VisionTransformer encoder (class token, patch embedding, blocks) with MAE's decoder around it.
    `encoder` keeps timm's names, so its state dict is a RETFound-layout checkpoint."""

    def __init__(self, encoder: nn.Module, mae: MaeConfig | None = None):
        super().__init__()
        mae = mae or MaeConfig()
        if not (hasattr(encoder, "patch_embed") and hasattr(encoder, "blocks") and hasattr(encoder, "pos_embed")):
            raise RetinaInputError("Masked-autoencoder pre-training needs a ViT (patch embedding, position "
                                   "embedding and transformer blocks), e.g. retfound_vit_tiny.")
        if getattr(encoder, "num_prefix_tokens", 1) != 1 or getattr(encoder, "no_embed_class", False):
            raise RetinaInputError("Masked-autoencoder pre-training expects a ViT with one class token.")
        self.encoder, self.mae = encoder, mae
        grid = tuple(encoder.patch_embed.grid_size)
        self.patch = int(encoder.patch_embed.patch_size[0])
        dim = encoder.embed_dim
        with torch.no_grad():           # fixed 2-D sin-cos positions while pre-training (learnt in fine-tuning)
            encoder.pos_embed[:, 1:] = build_sincos2d_pos_embed(list(grid), dim)[None]
            encoder.pos_embed[:, :1] = 0
        encoder.pos_embed.requires_grad_(False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.encoder_norm = norm(dim)   # MAE's encoder norm: dropped for fine-tuning (fc_norm is fresh there)
        self.decoder_embed = nn.Linear(dim, mae.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, mae.decoder_dim))
        pos = torch.cat([torch.zeros(1, mae.decoder_dim), build_sincos2d_pos_embed(list(grid), mae.decoder_dim)])
        self.register_buffer("decoder_pos_embed", pos[None], persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(mae.decoder_dim, mae.decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                                                    norm_layer=norm) for _ in range(mae.decoder_depth)])
        self.decoder_norm = norm(mae.decoder_dim)
        self.decoder_pred = nn.Linear(mae.decoder_dim, self.patch ** 2 * encoder.patch_embed.proj.in_channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, p*p*C], patches in the encoder's row-major token order."""
        p = self.patch
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(loss, predicted patches [B, N, p*p*C], mask [B, N]) for a batch of normalised images."""
        enc = self.encoder
        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]
        kept, mask, ids_restore = random_masking(tokens, self.mae.mask_ratio, generator)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        latent = self.encoder_norm(enc.blocks(torch.cat([cls, kept], dim=1)))
        y = self.decoder_embed(latent)
        n = ids_restore.shape[1]
        filled = torch.cat([y[:, 1:], self.mask_token.expand(y.shape[0], n + 1 - y.shape[1], -1)], dim=1)
        filled = torch.gather(filled, 1, ids_restore[:, :, None].expand(-1, -1, y.shape[2]))
        y = self.decoder_blocks(torch.cat([y[:, :1], filled], dim=1) + self.decoder_pos_embed)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        target = self.patchify(x)
        if self.mae.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, pred, mask

    def unpatchify(self, patches: torch.Tensor, channels: int = 3) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W] (square patch grid), the inverse of `patchify`."""
        p = self.patch
        b, n, _ = patches.shape
        side = int(round(n ** 0.5))
        x = patches.reshape(b, side, side, p, p, channels)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, side * p, side * p)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(masked input, reconstruction with the visible patches pasted back), both [B, C, H, W] in x's units:
        what a reader checks after pre-training. Normalised-pixel predictions are put back in each patch's own
        mean and spread."""
        _, pred, mask = self(x, generator)
        target = self.patchify(x)
        if self.mae.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        hidden = mask[..., None]
        fill = target.amin(dim=(1, 2), keepdim=True)     # hidden patches drawn dark in the masked input
        masked = self.unpatchify(target * (1 - hidden) + fill * hidden, x.shape[1])
        return masked, self.unpatchify(target * (1 - hidden) + pred * hidden, x.shape[1])

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The encoder's weights as `train --init` imports them: timm names, without the (untrained) head and
        fc_norm, float32."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.encoder.state_dict().items()
                if not k.startswith(("head.", "fc_norm."))}


def _pretrain_records(data: list[str], cfg_t: TrainConfig):
    """(records per split over every set, per-set summaries): each set's train and val splits as `train` derives
    them; the test split is left out entirely."""
    from ..io.datasets import load_dataset, training_splits
    from ..io.realsets import real_set_of

    per_split, sets = {"train": [], "val": []}, []
    for d in data:
        index = load_dataset(d, label_column=cfg_t.label_column, label_map=cfg_t.label_map)
        splits = training_splits(index.records, cfg_t.seed, cfg_t.split_fractions, cfg_t.split_by)
        real = real_set_of(d)
        sets.append({"data": str(d), "layout": index.layout,
                     **({"real_data": {k: real[k] for k in ("name", "title", "licence", "attribution")}}
                        if real else {}),
                     "used": {k: len(splits[k]) for k in ("train", "val")},
                     "left_out_test": len(splits.get("test", []))})
        for k in per_split:
            per_split[k].extend(splits[k])
    return per_split, sets


class _Unlabelled(torch.utils.data.Dataset):
    """CachedImages' items without their labels (the images of every class are one pool)."""

    def __init__(self, records, cfg, augment: bool, aug_strength: float):
        from .engine import CachedImages

        classes = tuple(sorted({r.label for r in records}))
        self.images = CachedImages(records, classes, cfg, augment=augment, aug_strength=aug_strength)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i][0]


def preview(model: MaskedAutoencoder, images: torch.Tensor, mean, std, path: str | Path, seed: int = 0) -> Path:
    """A PNG of rows original | masked | reconstruction for a few normalised validation images. These are the
    set's own images: write it only where asked and never commit it for a patient data set."""
    from PIL import Image

    model.eval()
    masked, rec = model.reconstruct(images, torch.Generator().manual_seed(seed))
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    rows = [torch.cat([t * s + m for t in (images[i:i + 1], masked[i:i + 1], rec[i:i + 1])], dim=3)
            for i in range(len(images))]
    grid = (torch.cat(rows, dim=2)[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(grid).save(path)
    return Path(path)


def pretrain(model_name: str, data: str | Path | list, out: str | Path, config: TrainConfig | None = None,
             mae: MaeConfig | None = None, preview_n: int = 0) -> dict:
    """Pre-train `model_name`'s ViT as a masked autoencoder on the training splits of `data` (one folder or a
    list); writes encoder.safetensors, pretrain.json and last.pt to `out` (and `reconstructions.png` of
    `preview_n` validation images when asked); returns pretrain.json's content."""
    from ..io.realsets import split_hashes
    from .engine import build_for_training
    from .loop import fit, start_run

    data = [str(d) for d in ([data] if isinstance(data, (str, Path)) else data)]
    cfg_t = replace(config or TrainConfig(), monitor="val_loss", recipe=None,
                    drop_path=(config.drop_path if config and config.drop_path is not None else 0.0))
    mae = mae or MaeConfig()
    if not 0.0 < mae.mask_ratio < 1.0:
        raise RetinaInputError("--mask-ratio must be between 0 and 1 (MAE: 0.75).")
    out = start_run(out, cfg_t, None)
    encoder = build_for_training(model_name, cfg_t)
    cfg = encoder.cfg
    model = MaskedAutoencoder(encoder, mae)
    device = default_device()
    model.to(device)
    records, sets = _pretrain_records(data, cfg_t)
    train_set = _Unlabelled(records["train"], cfg, augment=cfg_t.augment, aug_strength=cfg_t.aug_strength)
    val_loader = DataLoader(_Unlabelled(records["val"], cfg, augment=False, aug_strength=0.0), batch_size=64)
    log.info("pre-training on %d images, validating on %d", len(train_set), len(val_loader.dataset))

    def step(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x.to(device))[0]

    @torch.no_grad()
    def evaluate() -> tuple[dict, float]:
        model.eval()
        g = torch.Generator().manual_seed(cfg_t.seed)       # the same hidden patches every epoch
        total, n = 0.0, 0
        for x in val_loader:
            total += float(model(x.to(device), generator=g)[0]) * len(x)
            n += len(x)
        loss = total / max(n, 1)
        return {"val_loss": loss}, -loss

    fitted = fit(model, train_set, step, evaluate, cfg_t, None, device, amp=device.type == "cuda",
                 num_workers=cfg_t.num_workers, checkpoint=out / "last.pt")
    state = model.encoder_state()
    save_file(state, str(out / ENCODER_FILE), metadata={"model": model_name, "arch": cfg.arch,
                                                        "format": "retfound-mae-encoder"})
    summary, lists = split_hashes(records)
    best = fitted.history[fitted.best_epoch] if fitted.history else {}
    report = {
        "model": model_name, "arch": cfg.arch, "method": "masked autoencoder (MAE / RETFound pre-training)",
        "encoder": ENCODER_FILE, "input_size": list(cfg.input_size), "framing": cfg.framing,
        "sets": sets, "split_sha256": summary, "labels_used": False,
        "command": "python -m retina_core " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if Path(sys.argv[0]).name in ("__main__.py", "retina-core", "cli.py") else None,
        "mae": asdict(mae), "config": asdict(cfg_t),
        "best_epoch": fitted.best_epoch + 1, "epochs_run": len(fitted.history),
        "best_val_loss": best.get("val_loss"), "history": fitted.history,
        "date": _dt.date.today().isoformat(), "torch": torch.__version__,
    }
    if preview_n:
        x = torch.stack([val_loader.dataset[i] for i in range(min(preview_n, len(val_loader.dataset)))])
        report["preview"] = str(preview(model, x.to(device), cfg.mean, cfg.std, out / "reconstructions.png",
                                        cfg_t.seed))
    (out / PRETRAIN_FILE).write_text(json.dumps(report, indent=1) + "\n")
    (out / "splits.json").write_text(json.dumps({"model": model_name, "splits": summary, "files_sha256": lists},
                                                indent=1) + "\n")
    return report
