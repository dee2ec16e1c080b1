"""CNN classifiers built from timm architectures (random init: no pretrained download is possible here).

Users who have timm/ImageNet checkpoints on disk can start from them with `load_state_dict_file`.
"""
from __future__ import annotations

import timm
import torch
from torch import nn

from ..labels import DME2, DR_GRADES, OCT4
from ..modality import Modality
from .registry import ModelCfg, register_model


class TimmClassifier(nn.Module):
    """A timm network behind the common interface: forward_features -> [B, C, h, w], forward_head -> logits."""

    def __init__(self, cfg: ModelCfg):
        super().__init__()
        self.net = timm.create_model(cfg.arch, pretrained=False, num_classes=cfg.num_classes,
                                     in_chans=cfg.input_size[0], **cfg.builder_kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_PHANTOM_NOTE = ("Demo weights were trained on this project's synthetic retinal phantoms, not on patient images. "
                 "Their metrics are phantom metrics and say nothing about clinical accuracy.")

register_model(ModelCfg(
    name="fundus_dr_effnet_b0",
    arch="tf_efficientnet_b0",
    modality=Modality.FUNDUS,
    classes=DR_GRADES,
    task="Diabetic retinopathy grade (ICDR 0-4) from a colour fundus photograph",
    weights="fundus_dr_effnet_b0.safetensors",
    target_layer="net.bn2",
    fine_layer="net.blocks.4",
    referable=("Moderate", "Severe", "Proliferative DR"),
    ordinal=True,
    builder_kwargs={"drop_rate": 0.2},
    card=("EfficientNet-B0 (timm `tf_efficientnet_b0`) grading diabetic retinopathy on the 5-step ICDR scale, "
          "as in the APTOS 2019 set-up of the multimodal fundus + OCT source project. Input: RGB, ImageNet "
          "normalisation, 224x224 by default. The bundled demo weights run at 320x320 with output stride 16. They "
          "were trained at 160 px, fine-tuned at 320 px (microaneurysms 2-3 px wide instead of 1-2), then with the "
          "last stage dilated, two epochs with the healthy-CAM penalty (`train --healthy-cam-penalty`: No DR eyes "
          "give flat class maps, so anatomy does not shape the heatmap), then two with lesion-mask guidance as well "
          "(`train --lesion-cam-guidance`: on diseased phantoms, the map of the true and of the predicted grade was "
          "trained to peak on a lesion, using the phantoms' lesion masks). Their maps were therefore taught where "
          "lesions are; on new phantoms they point at one (docs/explanations.md), which says nothing about real "
          "photographs. The Grad-CAM target, the last 1x1 conv block (`bn2`), is a 20x20 grid. Referable: "
          "moderate or worse. " + _PHANTOM_NOTE),
), TimmClassifier)

register_model(ModelCfg(
    name="oct_resnet18",
    arch="resnet18",
    modality=Modality.OCT,
    classes=OCT4,
    task="OCT B-scan: choroidal neovascularisation, diabetic macular oedema, drusen or normal",
    weights="oct_resnet18.safetensors",
    target_layer="net.layer4",
    fine_layer="net.layer3",
    referable=("CNV", "DME"),
    card=("ResNet-18 (timm `resnet18`) classifying macular OCT B-scans into the Kermany OCT2017 classes "
          "(CNV, DME, DRUSEN, NORMAL). Input: greyscale replicated to 3 channels, resized to 224x224, ImageNet "
          "normalisation. Grad-CAM target: `layer4` (multi-scale Grad-CAM adds `layer3`). The bundled demo weights "
          "were trained at 128 px with output stride 16 (`--output-stride 16`: `layer4` dilated instead of "
          "strided, recorded in the manifest), so the Grad-CAM grid is 8x8 instead of 4x4: on held-out phantoms "
          "this lifted Grad-CAM's pointing game from ~0.66 to ~0.81 at the same cost relative to a forward. "
          "Then 3 epochs with lesion-mask guidance (`--lesion-cam-guidance 0.02 --healthy-cam-penalty 0.02`, the "
          "phantom lesion masks of the training images), as for the fundus grader: the label-only map often "
          "peaked on the retina lifted over a druse rather than on the druse; over 600 held-out lesion B-scans "
          "the pointing game rose from 0.81 (drusen 0.58-0.78) to 0.96 (each class >= 0.92), with the map still "
          "about twice as faithful as a random one (deletion AUC 0.34-0.37 against 0.66-0.68). "
          "Referable: CNV and DME (urgent / soon); drusen: monitor. "
          + _PHANTOM_NOTE),
), TimmClassifier)

_REAL_NOTE = ("Trained on real public images (the manifest names the set, its licence, the patient-level split and "
              "the held-out metrics with 95% bootstrap intervals; docs/real_data.md). One clinical source: figures "
              "on other cameras and populations will differ. Research software, not a medical device.")

register_model(ModelCfg(
    name="oct_dme_resnet18",
    arch="resnet18",
    modality=Modality.OCT,
    classes=DME2,
    task="OCT B-scan: diabetic macular oedema (DME) present or not",
    input_size=(3, 224, 224),
    weights="oct_dme_resnet18.safetensors",
    target_layer="net.layer4",
    fine_layer="net.layer3",
    referable=("DME",),
    card=("ResNet-18 (timm `resnet18`) answering DME yes/no on a macular OCT B-scan, trained on the real Mexico "
          "OCT set (Hughes-Cano et al.; macular B-scans, DME / no DME by retinal specialists). Input: the B-scan "
          "resized to 224x224 (greyscale replicated to 3 channels), ImageNet normalisation; Grad-CAM target "
          "`layer4`. Started from the phantom-trained `oct_resnet18` trunk (`--init`), the CPU's stand-in for "
          "pre-training. " + _REAL_NOTE),
), TimmClassifier)

register_model(ModelCfg(
    name="fundus_dme_resnet10t",
    arch="resnet10t",
    modality=Modality.FUNDUS,
    classes=DME2,
    task="Colour fundus photograph: diabetic macular oedema (DME) present or not",
    input_size=(3, 224, 224),
    weights="fundus_dme_resnet10t.safetensors",
    target_layer="net.layer4",
    fine_layer="net.layer3",
    referable=("DME",),
    card=("ResNet-10-T (timm `resnet10t`: a ResNet-D-style deep stem, 4.9M parameters, so the bundle stays under "
          "its 100 MB budget) answering DME yes/no on a colour fundus photograph (the photograph-based DME "
          "screening of hard exudates near the macula), trained from scratch on the real Mexico fundus set "
          "(Hughes-Cano et al.; DME / no DME by retinal specialists). Input: RGB, ImageNet normalisation, at the "
          "size the manifest records; Grad-CAM target `layer4`. " + _REAL_NOTE),
), TimmClassifier)
