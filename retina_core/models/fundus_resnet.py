"""Fundus 4-class ResNet with the source's Keras head (capability 5):

    ResNet -> global average pool -> BatchNorm -> Dense 256 (ReLU) -> Dropout 0.5 -> Dense 4

Two-phase training (`--recipe two_phase`): phase 1 trains the head with the backbone frozen (its BatchNorm statistics
too, as Keras' `trainable=False`), phase 2 unfreezes the last stage (`net.layer4`) at a low learning rate with
early stopping and reduce-on-plateau. The backbone is named `net` so a timm / torchvision ResNet checkpoint loads
with `train --init resnet50.pth` (its `fc` is reported as unexpected).

    python -m retina_core train --model fundus_resnet50 --data dataset/ --init resnet50_a1_in1k.pth --recipe two_phase
"""
from __future__ import annotations

import timm
import torch
from torch import nn

from ..labels import FUNDUS4
from ..modality import Modality
from .registry import ModelCfg, register_model


class FundusResNet(nn.Module):
    """forward_features -> [B, C, h, w] (last stage), forward_head -> logits. Target layer `net.layer4`."""

    head_param_prefixes = ("head.",)     # phase 1 trains only these

    def __init__(self, cfg: ModelCfg):
        super().__init__()
        kw = dict(cfg.builder_kwargs)
        hidden = int(kw.pop("hidden", 256))
        drop = float(kw.pop("head_dropout", 0.5))
        self.net = timm.create_model(cfg.arch, pretrained=False, num_classes=0, global_pool="",
                                     in_chans=cfg.input_size[0], **kw)
        c = self.net.num_features
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.BatchNorm1d(c),
            nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Dropout(drop), nn.Linear(hidden, cfg.num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_PHANTOM_NOTE = ("Demo weights were trained on this project's synthetic retinal phantoms, not on patient images. "
                 "Their metrics are phantom metrics and say nothing about clinical accuracy.")
_RECIPE = ("Training (`--recipe two_phase`, from the XAI ResNet50 source): phase 1, backbone frozen (BatchNorm "
           "statistics included), head trained with Adam-style AdamW at lr 1e-3; phase 2, `layer4` unfrozen and the "
           "whole trainable set at lr 1e-5, reduce-on-plateau (x0.5 after 2 flat epochs) and early stopping; the "
           "best validation epoch is kept. Grad-CAM target: `layer4`. Input: RGB 224x224, ImageNet normalisation. ")

register_model(ModelCfg(
    name="fundus_resnet50",
    arch="resnet50",
    modality=Modality.FUNDUS,
    classes=FUNDUS4,
    task="Fundus photograph, 4 classes: cataract, diabetic retinopathy, glaucoma, normal",
    weights="fundus_resnet50.safetensors",
    target_layer="net.layer4",
    fine_layer="net.layer3",
    referable=("cataract", "diabetic_retinopathy", "glaucoma"),
    card=("ResNet-50 (timm `resnet50`, 23.5M backbone) + GAP + BatchNorm + Dense 256 ReLU + Dropout 0.5 + Dense 4, "
          "as the Keras model of the explainable ResNet50 source. " + _RECIPE + "No demo weights (50 MB in fp16, "
          "beyond the bundle budget): start from an ImageNet ResNet-50 you have (`--init`)."),
), FundusResNet)

# The half-width ResNet-18 layout with the source's head, shared by the CPU-sized fundus models below.
_HALF_WIDTH = dict(arch="resnet18", modality=Modality.FUNDUS, target_layer="net.layer4", fine_layer="net.layer3",
                   builder_kwargs={"channels": (32, 64, 128, 256), "stem_width": 32})

register_model(ModelCfg(
    name="fundus_resnet18_head",
    **_HALF_WIDTH,
    classes=FUNDUS4,
    task="Fundus photograph, 4 classes: cataract, diabetic retinopathy, glaucoma, normal",
    input_size=(3, 96, 96),
    weights="fundus_resnet18_head.safetensors",
    referable=("cataract", "diabetic_retinopathy", "glaucoma"),
    card=("Demo variant of `fundus_resnet50` for CPU and the weights budget: the same head (GAP + BatchNorm + Dense "
          "256 ReLU + Dropout 0.5 + Dense 4) on a ResNet-18 layout at half width (32-64-128-256 channels, 2.8M), "
          "built at 96x96; the bundled weights read 160x160 with the field of view cut out (framing `fov`). With no "
          "ImageNet weights available, the backbone was first trained end to end on phantoms (a stand-in for "
          "pre-training). The bundled weights were then trained end to end on the real 4-class eye disease set (the "
          "Kaggle set of the source projects; patient-level split), not in two phases: their held-out figures with "
          "95% intervals, their confident level and the checks on other sets are below (the manifest) and in "
          "docs/real_data.md, below the sources' ~92% with pre-trained trunks. Its classes come from different "
          "cameras and sources, so part of what it learnt may be the source. The source's recipe, for "
          "`fundus_resnet50`: " + _RECIPE),
), FundusResNet)

register_model(ModelCfg(
    name="fundus_anydr_resnet18_head",
    **_HALF_WIDTH,
    classes=("noDR", "DR"),
    task="Colour fundus photograph: any diabetic retinopathy (non-proliferative or proliferative) or none",
    input_size=(3, 160, 160),
    weights="fundus_anydr_resnet18_head.safetensors",
    referable=("DR",),
    card=("`fundus_resnet18_head`'s design (half-width ResNet-18 layout + GAP/BatchNorm/Dense head) answering 'any "
          "diabetic retinopathy' (NPDR or PDR) against none on a colour fundus photograph. Trained on the part of the "
          "real Mexico fundus set (Hughes-Cano et al.) that retinal specialists graded for DR (`--label-column "
          "dr_grade --label-map 0=noDR,NPDR=DR,PDR=DR`; the set grades none / non-proliferative / proliferative, so "
          "mild NPDR counts as DR), patients split by a keyed hash as the other Mexico models. Input: the field of "
          "view cut out and centred (fov framing), ImageNet normalisation, at the size the manifest records; "
          "Grad-CAM target `layer4`. The manifest's command says what it started from and its held-out metrics "
          "with 95% intervals; one clinical source, so read it on other cameras as unvalidated (docs/real_data.md)."),
), FundusResNet)

register_model(ModelCfg(
    name="fundus_disc_resnet18_head",
    **_HALF_WIDTH,
    classes=FUNDUS4,
    task="Fundus photograph, 4 classes, read at the optic disc: cataract, diabetic retinopathy, glaucoma, normal",
    input_size=(3, 128, 128),
    framing="disc",
    weights="fundus_disc_resnet18_head.safetensors",
    referable=("cataract", "diabetic_retinopathy", "glaucoma"),
    card=("`fundus_resnet18_head`'s network reading the optic disc instead of the whole field: the input is a square "
          "of three disc diameters around the disc that `landmarks.locate_fovea_and_disc` finds (framing \"disc\", "
          "`models.framing`), so the cup, the rim and the peripapillary retina reach the network at several times "
          "the resolution a whole-field input gives them; glaucoma is judged there. Meant to vote with the "
          "whole-field model (`ensemble`), not alone: lesions away from the disc are outside its view. Grad-CAM "
          "target `layer4`; the heatmap is drawn back onto the disc region of the photograph. No bundled weights: "
          "trained on the real 4-class set it read glaucoma no better than the whole field, and its vote with "
          "`fundus_resnet18_head` gained nothing measurable (docs/real_data.md gives the command and figures)."),
), FundusResNet)
