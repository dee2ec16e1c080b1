"""OCT volume + metadata (capability 7), after LearnedFeatureFusion3D:

    volume [B,1,D,H,W] -> 3D ResNet (MONAI, spatial_dims=3) -> pooled -> Linear 512, ReLU --------+
    metadata [B, M]    -> standardise -> Linear M->h, ReLU, Linear h->512, ReLU (not in image_only) +-> fusion
    fusion: concat (1024) | add (512) | multiply (512) | image_only (512) -> Linear 256, ReLU, Dropout -> 1 logit

Trained with the binary FocalLoss (dynamic alpha, label smoothing); P(disease) = sigmoid(logit / T).
Metadata columns (age, sex, eye, visual acuity, central subfield thickness, HbA1c) are standardised with the
training split's mean/std, stored as buffers; a missing value becomes the training mean. The phantom metadata's
`oct_class` column names the disease, so it is never a feature. The 3D ResNet is named `net` (MONAI / MedicalNet
layout: conv1, bn1, layer1..4), so a MedicalNet checkpoint loads with `train --init`.
`explain.volume_methods.volume_cam` gives a 3D Grad-CAM (per-slice maps) from the single-pass Grad-CAM of `explain/cam.py`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RetinaInputError
from ..modality import Modality
from .loading import LoadedModel, register_model_class
from .registry import ModelCfg, register_model

VOLUME_CLASSES = ("normal", "disease")
FUSION_MODES = ("concat", "add", "multiply", "image_only")
META_FEATURES = ("age", "sex", "eye", "va_logmar", "cst_um", "hba1c")
EMBED_DIM = 512

_SEX = {"m": 1.0, "male": 1.0, "1": 1.0, "f": 0.0, "female": 0.0, "0": 0.0}
_EYE = {"od": 1.0, "right": 1.0, "r": 1.0, "os": 0.0, "left": 0.0, "l": 0.0}


def encode_metadata(meta: dict, eye: str | None = None, features=META_FEATURES) -> np.ndarray:
    """One record's metadata -> float32 [M] (NaN where missing). sex: M 1 / F 0; eye: OD 1 / OS 0."""
    out = np.full(len(features), np.nan, np.float32)
    for i, f in enumerate(features):
        v = eye if f == "eye" and eye is not None else meta.get(f)
        if v is None:
            continue
        if f in ("sex", "eye", "laterality"):
            out[i] = (_SEX if f == "sex" else _EYE).get(str(v).strip().lower(), np.nan)
        else:
            try:
                x = float(v)
            except (TypeError, ValueError):
                continue
            out[i] = x if math.isfinite(x) else np.nan
    return out


def _monai_resnet(depth: str, in_ch: int, widen: float, stride: int) -> nn.Module:
    from monai.networks.nets import resnet as monai_resnet

    builder = getattr(monai_resnet, depth)
    return builder(spatial_dims=3, n_input_channels=in_ch, widen_factor=widen, conv1_t_stride=stride,
                   feed_forward=False, shortcut_type="B", bias_downsample=False)


def dilate_last_stages(net: nn.Module, output_stride: int, stem_stride: int) -> int:
    """Lower a MONAI 3D ResNet's output stride (as timm's `output_stride`): from layer4 down, a stage's stride-2
    first block becomes stride 1 and its 3x3x3 convolutions are dilated instead, until the total stride (stem x 2 per
    strided stage, layer2-4) is `output_stride`. Weights keep their shapes, so a checkpoint of the undilated network
    loads (and is fine-tuned). A finer last stage gives the 3-D Grad-CAM a finer grid. Returns the dilation of layer4.
    """
    total = stem_stride * 8
    allowed = [total >> k for k in range(4)]          # layer4, 3, 2 dilated in turn: total / 2, / 4, / 8
    if output_stride not in allowed:
        raise ValueError(f"output_stride must be one of {allowed} (stem stride {stem_stride}), got {output_stride}")
    n_dilated = int(math.log2(total // output_stride))
    dilation = 1
    for name in ("layer2", "layer3", "layer4")[3 - n_dilated:]:
        layer = getattr(net, name)
        first = dilation                      # the first conv of a stage keeps the previous stage's dilation
        dilation *= 2
        for i, block in enumerate(layer):
            for conv_name in ("conv1", "conv2"):
                conv = getattr(block, conv_name, None)
                if conv is None or conv.kernel_size[0] != 3:
                    continue
                d = first if (i == 0 and conv_name == "conv1") else dilation
                conv.stride, conv.dilation, conv.padding = (1,) * 3, (d,) * 3, (d,) * 3
            if block.downsample is not None:
                block.downsample[0].stride = (1,) * 3
            block.stride = 1
    return dilation


def keep_slices(net: nn.Module, slice_stride: int) -> int:
    """Stride less across slices than in-plane, as OCT volumes are sampled: B-scans lie several times further apart
    than the pixels within one (about 190 um against 50-95 um here), so an isotropic 3D ResNet merges slices long
    before it merges pixels and its Grad-CAM can only point at a group of slices (8 slices per cell at stride 8).
    From the last strided module back (layer4, layer3, layer2 first blocks, then the max pool, then the first conv)
    each loses its stride across slices (stride (1, s, s)) until the total stride across slices is `slice_stride`.
    In-plane strides, dilations and weight shapes are unchanged, so checkpoints load either way; compute grows with
    the finer grid. Call after `dilate_last_stages`. Returns the total stride across slices."""
    def stride3(mod) -> tuple[int, int, int]:
        s = mod.stride
        return tuple(int(v) for v in s) if isinstance(s, tuple) else (int(s),) * 3

    strided = []                     # in forward order: the modules whose stride changes together (conv + shortcut)
    if net.conv1.stride[0] > 1:
        strided.append([net.conv1])
    if not getattr(net, "no_max_pool", False) and isinstance(net.maxpool, nn.MaxPool3d):
        strided.append([net.maxpool])
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(net, name)[0]
        if block.conv1.stride[0] > 1:
            strided.append([block.conv1] + ([block.downsample[0]] if block.downsample is not None else []))
    total = math.prod(stride3(mods[0])[0] for mods in strided)
    allowed = [total >> k for k in range(len(strided) + 1)]
    if slice_stride not in allowed:
        raise ValueError(f"slice_stride must be one of {allowed} (the stride across slices before), got {slice_stride}")
    for mods in reversed(strided):
        if total == slice_stride:
            break
        for mod in mods:
            mod.stride = (1, *stride3(mod)[1:])
        total //= 2
    return total


POOL_TYPES = ("avg", "max", "avgmax")


class VolumePool(nn.Module):
    """How the 3D ResNet's last feature map becomes one vector: "avg" (MONAI's AdaptiveAvgPool3d(1), the default),
    "max", or "avgmax" (the mean of both, as timm's `global_pool="avgmax"`). Average pooling dilutes a lesion a few
    voxels across (a diabetic-retinopathy focus) over the whole volume; the max path lets one strongly responding
    cell carry evidence. Parameter-free, so weights trained with one pooling load with another (`train --init`)."""

    def __init__(self, pool_type: str = "avg"):
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {pool_type!r}")
        self.pool_type = pool_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "avg":
            return x.mean(dim=(2, 3, 4), keepdim=True)
        mx = x.amax(dim=(2, 3, 4), keepdim=True)
        return mx if self.pool_type == "max" else 0.5 * (x.mean(dim=(2, 3, 4), keepdim=True) + mx)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


class LesionEvidencePool(nn.Module):
    """The global pool plus a dense lesion read-out (`train --lesion-seg W`): a 1x1x1 convolution maps each cell of
    the last feature map to a lesion logit s(p) (trained against the lesion masks pooled to the grid), and the
    volume's lesion evidence is their log-mean-exp, e = log mean_p exp(s(p)), a smooth maximum: one cell holding a
    lesion raises it, a volume without any keeps it low. Returns [B, C + 1, 1, 1, 1] (the pooled features, then e),
    so MONAI's forward flattens both; `last_logits` keeps s [B, d, h, w] of the latest forward for the training loss.

    Why: the layer4 features of a model trained on labels alone already tell cells holding a cyst from lesion-free
    cells near them (a linear read-out on the bundled weights: held-out cell AUC 0.87), but average pooling dilutes a
    few cells among 4096 and the swelling around them already decides, so the call never used them and a faithful
    map could not point at them. With e in the image embedding the decision can rest on the lesions themselves.
    Measured on the phantoms (docs/explanations.md, section 5): the read-out learns cysts, fluid, CNV, holes, drusen
    and atrophy, not diabetic-retinopathy foci, and the bundled recipe with it did not localise better, so the
    bundled weights do not use it."""

    def __init__(self, pool: nn.Module, channels: int):
        super().__init__()
        self.pool = pool
        self.head = nn.Conv3d(channels, 1, kernel_size=1)
        self.last_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.head(x)[:, 0]                                        # [B, d, h, w]
        self.last_logits = s
        e = torch.logsumexp(s.flatten(1).float(), dim=1) - math.log(s[0].numel())
        return torch.cat([self.pool(x), e.to(x.dtype).view(-1, 1, 1, 1, 1)], dim=1)


class VolumeFusion3D(nn.Module):
    """forward(volume, meta=None) -> logit [B, 1]; forward_features -> fused [B, classifier_in];
    forward_head -> logit. meta: raw metadata [B, M] (NaN = missing), standardised inside; None = all missing."""

    def __init__(self, cfg: ModelCfg):
        super().__init__()
        kw = dict(cfg.builder_kwargs)
        self.fusion = kw.get("fusion", "concat")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {self.fusion!r}")
        self.meta_features = tuple(kw.get("meta_features", META_FEATURES))
        self.net = _monai_resnet(kw.get("resnet", "resnet18"), cfg.input_size[0], float(kw.get("widen_factor", 1.0)),
                                 int(kw.get("conv1_stride", 1)))
        if kw.get("output_stride"):
            dilate_last_stages(self.net, int(kw["output_stride"]), stem_stride=2 * int(kw.get("conv1_stride", 1)))
        if kw.get("slice_stride"):
            keep_slices(self.net, int(kw["slice_stride"]))
        self.global_pool = kw.get("global_pool", "avg")
        feat = int(self.net.in_planes)   # channels after layer4 (x block expansion)
        lh = kw.get("lesion_head", False)
        if lh not in (False, True, "only"):
            raise ValueError(f"lesion_head must be False, True or 'only', got {lh!r}")
        self.lesion_head = bool(lh)
        self.lesion_only = lh == "only"   # the image branch is the read-out's evidence alone (`train --lesion-only`)
        self.net.avgpool = (LesionEvidencePool(VolumePool(self.global_pool), feat) if self.lesion_head
                            else VolumePool(self.global_pool))
        self.image_proj = nn.Sequential(nn.Linear(feat, EMBED_DIM), nn.ReLU(inplace=True))
        if self.lesion_head:
            # e enters the image embedding beside the pooled features; zero at first, so weights trained without
            # the head load (`train --init`) and start from the same outputs
            self.lesion_proj = nn.Linear(1, EMBED_DIM)
            if not self.lesion_only:     # alone, a zero start would sit at the ReLU's kink with no gradient
                nn.init.zeros_(self.lesion_proj.weight)
                nn.init.zeros_(self.lesion_proj.bias)
        m, hidden = len(self.meta_features), int(kw.get("meta_hidden", 128))
        if self.fusion != "image_only":
            self.meta_mlp = nn.Sequential(nn.Linear(m, hidden), nn.ReLU(inplace=True),
                                          nn.Linear(hidden, EMBED_DIM), nn.ReLU(inplace=True))
        self.classifier_in = 2 * EMBED_DIM if self.fusion == "concat" else EMBED_DIM
        ch = int(kw.get("classifier_hidden", 256))
        self.classifier = nn.Sequential(nn.Linear(self.classifier_in, ch), nn.ReLU(inplace=True),
                                        nn.Dropout(float(kw.get("dropout", 0.3))), nn.Linear(ch, 1))
        self.register_buffer("meta_mean", torch.zeros(m))
        self.register_buffer("meta_std", torch.ones(m))

    def set_metadata_stats(self, mean, std) -> None:
        """Standardisation of the metadata (from the training split); std 0 or NaN -> 1, NaN mean -> 0."""
        mean = torch.nan_to_num(torch.as_tensor(mean, dtype=torch.float32), nan=0.0)
        std = torch.as_tensor(std, dtype=torch.float32)
        std = torch.where(torch.isfinite(std) & (std > 1e-6), std, torch.ones_like(std))
        self.meta_mean.copy_(mean)
        self.meta_std.copy_(std)

    def standardise(self, meta: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        if meta is None:
            return torch.zeros(batch, len(self.meta_features), device=like.device, dtype=like.dtype)
        z = (meta.to(like.dtype) - self.meta_mean.to(like.dtype)) / self.meta_std.to(like.dtype)
        return torch.nan_to_num(z, nan=0.0).clamp(-6, 6)

    def embed_image(self, volume: torch.Tensor) -> torch.Tensor:
        """The image branch alone: [B, 1, D, H, W] -> [B, 512]."""
        if not self.lesion_head:
            return self.image_proj(self.net(volume))
        out = self.net(volume)                                   # [B, C + 1]: pooled features, lesion evidence
        if self.lesion_only:       # the pooled features are not used: the image says only where lesions are
            return self.image_proj[1](self.lesion_proj(out[:, -1:]))
        return self.image_proj[1](self.image_proj[0](out[:, :-1]) + self.lesion_proj(out[:, -1:]))

    def lesion_logits(self) -> torch.Tensor | None:
        """s [B, d, h, w]: the per-cell lesion logits of the latest forward (models built with `lesion_head`)."""
        return self.net.avgpool.last_logits if self.lesion_head else None

    def fuse(self, img: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        """Image embeddings [B, 512] + raw metadata [B, M] (NaN = not recorded) -> the classifier's input."""
        if self.fusion == "image_only":
            return img
        m = self.meta_mlp(self.standardise(meta, img.shape[0], img))
        if self.fusion == "concat":
            return torch.cat([img, m], dim=1)
        return img + m if self.fusion == "add" else img * m

    def forward_features(self, volume: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        return self.fuse(self.embed_image(volume), meta)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(feats)

    def forward(self, volume: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(volume, meta))


def preprocess_volume(vol: np.ndarray, cfg: ModelCfg, device="cpu") -> torch.Tensor:
    """float32 [D, H, W] in [0, 1] -> [1, 1, D', H', W'] resized (trilinear) to cfg.input_size, normalised."""
    x = torch.as_tensor(np.ascontiguousarray(vol), dtype=torch.float32, device=device)[None, None]
    size = tuple(cfg.input_size[1:])
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return (x - cfg.mean[0]) / cfg.std[0]


def volume_sample(sample, meta: dict | None = None, eye: str | None = None
                  ) -> tuple[np.ndarray, dict | None, str | None]:
    """(float32 [D, H, W] in [0, 1], meta, eye) of a volume sample: a float array in [0, 1] (NaN read as 0, clipped),
    a uint8 array (intensity / 255) or a RetinalImage of kind "volume", alone or as (volume, meta[, eye]) (the
    arguments win over the tuple's meta / eye where given). RetinaInputError for anything but one [D, H, W]."""
    if isinstance(sample, tuple):
        sample, t_meta, t_eye = (*sample, None, None)[:3]
        meta = meta if meta is not None else t_meta
        eye = eye if eye is not None else t_eye
    vol = np.asarray(getattr(sample, "pixels", sample))
    if vol.ndim != 3:
        raise RetinaInputError(f"Expected an OCT volume [D, H, W] (B-scans x rows x columns), got shape "
                               f"{tuple(vol.shape)}.")
    if vol.dtype == np.uint8:
        vol = vol.astype(np.float32) / 255.0
    return np.clip(np.nan_to_num(vol.astype(np.float32)), 0.0, 1.0), meta, eye


def metadata_tensor(net: nn.Module, meta: dict | None, eye: str | None, device="cpu") -> torch.Tensor:
    """One clinical record as `net` reads it: raw values [1, M] in the order of its `meta_features` (NaN = not
    recorded, standardised to the training mean inside the network)."""
    m = encode_metadata(meta or {}, eye, getattr(net, "meta_features", None) or META_FEATURES)
    return torch.from_numpy(m)[None].to(device)


@register_model_class(Modality.OCT_VOLUME)
class VolumeModel(LoadedModel):
    """A loaded OCT volume + clinical record model (`VolumeFusion3D`): `preprocess(volume, meta, eye)` ->
    (volume [1, 1, D', H', W'], record [1, M]); `predict_proba` -> [1, 2] (normal, disease); `explain` -> [D, H, W]."""

    def preprocess(self, sample, meta: dict | None = None, eye: str | None = None) -> tuple[torch.Tensor, ...]:
        """One volume (`volume_sample`: [D, H, W] float in [0, 1] or uint8, a RetinalImage, or (volume, meta[, eye]))
        and its record ({age, sex, va_logmar, cst_um, hba1c}; missing values become the training means; eye "OD" /
        "OS") -> (x [1, 1, D', H', W'] resized to cfg.input_size and normalised, record [1, M]) on the device."""
        vol, meta, eye = volume_sample(sample, meta, eye)
        return preprocess_volume(vol, self.cfg, self.device), metadata_tensor(self.net, meta, eye, self.device)


class WithMeta(nn.Module):
    """The volume model with its clinical record fixed: forward(x) = net(x, meta), for one-input tools (CAMs)."""

    def __init__(self, net: nn.Module, meta: torch.Tensor | None):
        super().__init__()
        self.net, self.meta = net, meta

    def forward(self, x):
        return self.net(x, self.meta)


_PHANTOM_NOTE = ("Demo weights were trained on this project's synthetic retinal phantoms, not on patient images. "
                 "Their metrics are phantom metrics and say nothing about clinical accuracy.")
_DESIGN = ("Image branch: a 3D ResNet (MONAI `resnet`, spatial_dims=3, one input channel) pooled and projected to "
           "512 (Linear + ReLU). Metadata branch (skipped in image_only): age, sex, eye, visual acuity (logMAR), "
           "central subfield thickness and HbA1c, standardised with training statistics (stored in the weights), "
           "two-layer MLP to 512. Fusion `concat` (1024 into the classifier), `add`, `multiply` or `image_only` "
           "(512); choose with `train --fusion`. Classifier: Linear 256, ReLU, dropout 0.3, one logit "
           "(P(disease) = sigmoid(logit / T)). Loss: binary focal loss with per-batch dynamic alpha (fraction of "
           "negatives) and label smoothing (`--recipe learned_fusion3d`). 3D Grad-CAM on `net.layer4` gives per-slice "
           "maps (`explain.volume_methods.volume_cam`). Input: NIfTI volume resized to D x H x W, intensities in [0, 1] "
           "normalised with mean 0.15, std 0.2. ")

register_model(ModelCfg(
    name="oct_volume_fusion3d",
    arch="monai_resnet18_3d+meta",
    modality=Modality.OCT_VOLUME,
    classes=VOLUME_CLASSES,
    task="OCT volume + clinical metadata: normal vs disease",
    input_size=(1, 32, 128, 128),
    mean=(0.15,), std=(0.2,),
    weights="oct_volume_fusion3d.safetensors",
    target_layer="net.layer4",
    referable=("disease",),
    builder_kwargs={"resnet": "resnet18", "widen_factor": 1.0, "conv1_stride": 1, "fusion": "concat",
                    "meta_hidden": 128, "classifier_hidden": 256, "dropout": 0.3},
    card=("LearnedFeatureFusion3D on OCT volumes with a full-width 3D ResNet-18 (33M; the source used a 3D "
          "ResNet-50), 32 x 128 x 128 input. " + _DESIGN + "No demo weights (66 MB in fp16); train with "
          "`python -m retina_core train --model oct_volume_fusion3d --data volumes/`."),
), VolumeFusion3D)

register_model(ModelCfg(
    name="oct_volume_fusion3d_tiny",
    arch="monai_resnet10_3d_w0.25+meta",
    modality=Modality.OCT_VOLUME,
    classes=VOLUME_CLASSES,
    task="OCT volume + clinical metadata: normal vs disease",
    input_size=(1, 32, 64, 64),
    mean=(0.15,), std=(0.2,),
    weights="oct_volume_fusion3d_tiny.safetensors",
    target_layer="net.layer4",
    referable=("disease",),
    builder_kwargs={"resnet": "resnet10", "widen_factor": 0.25, "conv1_stride": 2, "fusion": "concat",
                    "meta_hidden": 128, "classifier_hidden": 256, "dropout": 0.3},
    card=("Demo variant for CPU: 3D ResNet-10 at quarter width (16-32-64-128 channels, stride-2 first conv), "
          "32 x 64 x 64 input by default, the same 512-d branches, fusion and classifier. " + _DESIGN + "The "
          "bundled demo weights take 32 x 128 x 128 volumes and run with the last two stages dilated and less "
          "stride across slices than in-plane (`train --output-stride 8 --slice-stride 2`: a 16 x 16 x 16 Grad-CAM "
          "grid, two B-scans per cell). They were trained with lesion-mask guidance (`train --lesion-cam-guidance "
          "1`: on diseased phantoms with a lesion mask, the 3D Grad-CAM was trained to peak on a lesion), so their "
          "maps were taught where lesions are, and with the clinical record hidden on half the training volumes "
          "(`train --meta-dropout 0.5`), so the volume carries evidence on its own. Counterfactual phantoms "
          "(`explain-eval --counterfactual`) show that they do not use the DR phantoms' hyper-reflective foci "
          "(1-2 px specks at 128 px; a dense lesion read-out trained on the masks cannot tell a focus cell from "
          "its neighbours, so at this input size the network does not see them) or the DME phantoms' cysts "
          "(which its features do see): DME calls rest on the retinal "
          "swelling (and, where it is absent, on subretinal fluid) and DR calls mostly on HbA1c, so their maps "
          "point at the swollen macula, not at those lesions. On AMD, CNV, CSR, drusen and MH eyes the lesions "
          "the maps point at are what the calls rest on (left out, P(disease) falls). " + _PHANTOM_NOTE),
), VolumeFusion3D)
