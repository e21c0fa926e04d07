"""GoogLeNet (Szegedy et al., "Going Deeper with Convolutions", CVPR 2015), two variants.

- variant="paper": Table 1 of the paper as in the BVLC Caffe model (bvlc_googlenet/train_val.prototxt):
  7x7/2 conv, LRN after the first conv and after the 3x3 conv, real 5x5 branches, 3x3/2 max-pools with
  Caffe's ceil rounding, 7x7 average pool, dropout 0.4, two auxiliary classifiers (sec. 5) on 4a and 4d.
  Caffe initialisation: Xavier (uniform, fan-in) weights, bias 0.2 on convs and hidden FCs, 0 on the
  classifiers.
- variant="bn": layer-for-layer torchvision's `googlenet` (BatchNorm after every conv, its 3x3 conv
  in the "5x5" branch (pytorch/vision#906), a 2x2 max-pool before 5a, dropout 0.2, a 2048->1024->C
  aux head). Its state-dict keys are torchvision's, so `load_torchvision_state_dict` loads them as is.

In train() mode the forward returns `GoogLeNetOutputs(logits, aux1, aux2)` (aux None when absent); in
eval() mode the main logits only. `googlenet_loss` weights the auxiliary losses by 0.3 (sec. 5).

    python -m pipeline.model.googlenet --summary [--variant paper|bn] [--input-size 224]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import VARIANT_DROPOUT

# Table 1: (name, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) of the nine inception modules.
INCEPTION_SPECS = [
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
]
AUX_WEIGHT = 0.3  # sec. 5: "their loss is added to the total loss of the network with a discount weight"
VARIANTS = ("paper", "bn")


def fp32_linear(fc: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A classifier layer in float32 even under bf16/fp16 autocast: logits rounded to bf16 (8 bits of
    mantissa) would blur the softmax probabilities that evaluation averages over crops and models, and
    the layer is a negligible share of the compute."""
    with torch.autocast(x.device.type, enabled=False):
        return fc(x.float())


class GoogLeNetOutputs(NamedTuple):
    logits: torch.Tensor
    aux1: torch.Tensor | None  # on inception 4a
    aux2: torch.Tensor | None  # on inception 4d


class ConvReLU(nn.Sequential):
    """Paper variant: conv (with bias) + ReLU. Caffe: every conv is followed by a ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding)
        self.relu = nn.ReLU(inplace=True)


class BasicConv2d(nn.Module):
    """bn variant: torchvision's conv (no bias) + BatchNorm(eps=1e-3) + ReLU, same attribute names."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels (Figure 2b).

    branch1: 1x1; branch2: 1x1 reduce -> 3x3 (pad 1); branch3: 1x1 reduce -> 5x5 (pad 2) in the paper,
    3x3 (pad 1) in torchvision; branch4: 3x3/1 max-pool (pad 1) -> 1x1 pool projection.
    """

    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp, block, k5: int):
        super().__init__()
        self.branch1 = block(cin, c1, 1)
        self.branch2 = nn.Sequential(block(cin, c3r, 1), block(c3r, c3, 3, padding=1))
        self.branch3 = nn.Sequential(block(cin, c5r, 1), block(c5r, c5, k5, padding=k5 // 2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), block(cin, cp, 1))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier (sec. 5).

    Paper: 5x5/3 average pool (4x4 out at 14x14), 1x1 conv 128 + ReLU, FC 1024 + ReLU, dropout 0.7,
    linear. Where the input is not 14x14 (other input sizes) the pool becomes adaptive to 4x4, so the
    FC keeps its 2048 inputs. torchvision (bn) always pools adaptively; its 1x1 conv is a BasicConv2d.
    """

    def __init__(self, cin: int, num_classes: int, dropout: float, block, paper_pool: bool):
        super().__init__()
        self.paper_pool = paper_pool
        self.conv = block(cin, 128, 1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x):
        if self.paper_pool and x.shape[-2:] == (14, 14):
            x = F.avg_pool2d(x, 5, stride=3, ceil_mode=True)  # 14x14 -> 4x4, exactly the paper's
        else:
            x = F.adaptive_avg_pool2d(x, (4, 4))
        x = torch.flatten(self.conv(x), 1)
        x = self.dropout(F.relu(self.fc1(x), inplace=True))
        return fp32_linear(self.fc2, x)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 1000, variant: str = "paper", aux_logits: bool = True,
                 dropout: float | None = None, aux_dropout: float = 0.7, transform_input: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, not {num_classes}")
        self.variant = variant
        self.num_classes = num_classes
        self.aux_logits = aux_logits
        # torchvision's ImageNet weights expect inputs normalised to [-1, 1]; set this when using them.
        self.transform_input = transform_input
        paper = variant == "paper"
        dropout = VARIANT_DROPOUT[variant] if dropout is None else dropout
        block = ConvReLU if paper else BasicConv2d
        self.conv1 = block(3, 64, 7, stride=2, padding=3)  # 224 -> 112
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # 112 -> 56
        if paper:
            self.norm1 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        self.conv2 = block(64, 64, 1)  # the 3x3 reduce of Table 1's "convolution 3x3" row
        self.conv3 = block(64, 192, 3, padding=1)
        if paper:
            self.norm2 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # 56 -> 28
        cin = 192
        k5 = 5 if paper else 3
        for name, *spec in INCEPTION_SPECS:
            module = Inception(cin, *spec, block=block, k5=k5)
            setattr(self, name, module)
            cin = module.out_channels
            if name == "inception3b":
                self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # 28 -> 14
            if name == "inception4e":
                # paper: 3x3/2; torchvision: 2x2/2 (14 -> 7 either way)
                self.maxpool4 = nn.MaxPool2d(3 if paper else 2, stride=2, ceil_mode=True)
        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, aux_dropout, block, paper_pool=paper)
            self.aux2 = InceptionAux(528, num_classes, aux_dropout, block, paper_pool=paper)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the paper's 7x7/1 average pool at 224; global elsewhere
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Paper: Caffe's Xavier filler (uniform +-sqrt(3/fan_in)), conv/hidden-FC bias 0.2, classifier
        bias 0. bn: torchvision's init (truncated normal std 0.01, BN weight 1 / bias 0)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                if self.variant == "paper":
                    fan_in = m.weight[0].numel()
                    bound = math.sqrt(3.0 / fan_in)
                    nn.init.uniform_(m.weight, -bound, bound)
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0.2)
                else:
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.variant == "paper":
            classifiers = [self.fc] + ([self.aux1.fc2, self.aux2.fc2] if self.aux_logits else [])
            for fc in classifiers:
                nn.init.zeros_(fc.bias)

    def _transform_input(self, x):
        if not self.transform_input:
            return x
        mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return (x * std + mean - 0.5) / 0.5

    def forward(self, x):
        x = self.maxpool1(self.conv1(self._transform_input(x)))
        if self.variant == "paper":
            x = self.norm1(x)
        x = self.conv3(self.conv2(x))
        if self.variant == "paper":
            x = self.norm2(x)
        x = self.maxpool2(x)
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux_on = self.training and self.aux_logits
        aux1 = self.aux1(x) if aux_on else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if aux_on else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = fp32_linear(self.fc, self.dropout(torch.flatten(self.avgpool(x), 1)))
        if self.training:
            return GoogLeNetOutputs(x, aux1, aux2)
        return x

    def load_torchvision_state_dict(self, state_dict: dict, strict: bool = True):
        """Load a torchvision `GoogLeNet` state dict (variant="bn" only).

        Aux-head weights are dropped when this model has no aux heads; a torchvision dict without aux
        weights (its ImageNet release) leaves this model's aux heads at their initialisation.
        """
        if self.variant != "bn":
            raise ValueError("torchvision weights fit variant='bn' only (the paper variant has LRN and 5x5 convs)")
        sd = dict(state_dict)
        if not self.aux_logits:
            sd = {k: v for k, v in sd.items() if not k.startswith(("aux1.", "aux2."))}
        elif not any(k.startswith("aux1.") for k in sd):
            own = self.state_dict()
            sd.update({k: v for k, v in own.items() if k.startswith(("aux1.", "aux2."))})
        return self.load_state_dict(sd, strict=strict)


def without_aux(state_dict: dict) -> dict:
    """A state dict without the auxiliary heads (used for training only, paper sec. 5)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(("aux1.", "aux2."))}


def inference_model(state_dict: dict, num_classes: int, variant: str) -> GoogLeNet:
    """The network for inference (no auxiliary heads, eval mode) with a trained state dict."""
    m = GoogLeNet(num_classes, variant=variant, aux_logits=False)
    m.load_state_dict(without_aux(state_dict))
    return m.eval()


def googlenet_loss(outputs, target: torch.Tensor, aux_weight: float = AUX_WEIGHT,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the main head plus `aux_weight` x each auxiliary head's (sec. 5)."""
    if isinstance(outputs, torch.Tensor):
        return F.cross_entropy(outputs, target, label_smoothing=label_smoothing)
    loss = F.cross_entropy(outputs.logits, target, label_smoothing=label_smoothing)
    for aux in (outputs.aux1, outputs.aux2):
        if aux is not None:
            loss = loss + aux_weight * F.cross_entropy(aux, target, label_smoothing=label_smoothing)
    return loss
