"""MuseTalk's face-parsing net (BiSeNet on a ResNet18, 19 CelebAMask-HQ classes) and its three mask modes.

The net is the published `face-parse-bisent/79999_iter.pth` (state dict with `cp.resnet.*`, `cp.arm16.*`, ...,
`ffm.*`, `conv_out*.*` keys); the backbone's keys are torchvision's ResNet18 names, so the net is written
here as plain torch modules under those names (torchvision is not a dependency). 79999_iter.pth holds every
backbone value too, so `resnet18-5c106cde.pth` (the ImageNet backbone the original code reads first and then
overwrites) is not needed to compute anything.

Modes (what MuseTalk pastes back over the original frame):
    raw    skin, lips and mouth (classes 1, 11, 12, 13)
    neck   raw + neck (14)
    jaw    (v1.5) the skin dilated downwards by a cone-shaped kernel (covers the jaw line when the new
           mouth opens wider), eroded at the cheeks outside a central band of cheek widths, minus the
           nose (10), plus lips and mouth
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PARSING_SIZE = 512          # the net's input: the crop is resized to 512x512 (bilinear) first
MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation the net was trained with
STD = (0.229, 0.224, 0.225)
SKIN, NOSE, LIPS, NECK = 1, 10, (11, 12, 13), 14
MODES = ("raw", "neck", "jaw")


# ---- ResNet18 backbone (torchvision key names) -----------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18Features(nn.Module):
    """torchvision's resnet18 without avgpool/fc; returns the 1/8, 1/16 and 1/32 feature maps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for i, (cin, cout, stride) in enumerate(widths, 1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))

    def forward(self, x: torch.Tensor):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


# ---- BiSeNet head ------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, 1, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        gate = torch.sigmoid(self.bn_atten(self.conv_atten(F.avg_pool2d(feat, feat.shape[2:]))))
        return feat * gate


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = ResNet18Features()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, k=1, padding=0)

    def forward(self, x: torch.Tensor):
        f8, f16, f32 = self.resnet(x)
        glob = self.conv_avg(F.avg_pool2d(f32, f32.shape[2:]))
        s32 = self.arm32(f32) + F.interpolate(glob, f32.shape[2:], mode="nearest")
        up32 = self.conv_head32(F.interpolate(s32, f16.shape[2:], mode="nearest"))
        s16 = self.arm16(f16) + up32
        up16 = self.conv_head16(F.interpolate(s16, f8.shape[2:], mode="nearest"))
        return f8, up16


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, k=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([a, b], dim=1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(F.avg_pool2d(feat, feat.shape[2:])))))
        return feat * gate + feat


class OutputHead(nn.Module):
    def __init__(self, cin: int, mid: int, classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """The parsing net; forward returns the full-resolution class logits (the main head only: the two
    auxiliary heads, conv_out16/conv_out32, are training losses and exist here for their keys)."""

    def __init__(self, classes: int = 19):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = OutputHead(256, 256, classes)
        self.conv_out16 = OutputHead(128, 64, classes)
        self.conv_out32 = OutputHead(128, 64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f8, cp8 = self.cp(x)
        logits = self.conv_out(self.ffm(f8, cp8))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)


# ---- masks --------------------------------------------------------------------------------------------------
def jaw_kernel(cone: int = 21, tail: int = 12) -> np.ndarray:
    """The jaw mode's dilation kernel: a downward-opening triangle in the lower half of the top `cone` rows,
    then `tail` rows as wide as its base (so skin grows down over the jaw, not up)."""
    n = cone + tail
    k = np.zeros((n, n), np.uint8)
    c = n // 2
    for row in range(cone // 2, cone):
        half = row - cone // 2
        k[row, c - half:c + half + 1] = 1
    base = int(k[cone - 1].sum())
    k[cone:, max(0, c - base // 2):min(n, c + base // 2 + 1)] = 1
    return k


def cheek_band(left: int, right: int, size: int = PARSING_SIZE) -> np.ndarray:
    """255 outside the central band [size/2 - left, size/2 + right] (the cheeks, where jaw mode erodes)."""
    import cv2

    m = np.zeros((size, size), np.uint8)
    c = size // 2
    cv2.rectangle(m, (0, 0), (c - left, size), 255, -1)
    cv2.rectangle(m, (c + right, 0), (size, size), 255, -1)
    return m


@dataclass
class MaskRule:
    """How class maps become the 0/255 paste mask (MuseTalk's FaceParsing(left_cheek_width, right_cheek_width))."""

    left_cheek_width: int = 90
    right_cheek_width: int = 90

    def __post_init__(self):
        import cv2

        self.kernel = jaw_kernel()
        self.cheek_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
        self.cheeks = cheek_band(self.left_cheek_width, self.right_cheek_width)

    def apply(self, classes: np.ndarray, mode: str) -> np.ndarray:
        """(512, 512) int class map -> (512, 512) uint8 mask in {0, 255}."""
        import cv2

        if mode not in MODES:
            raise ValueError(f"face parsing mode must be one of {', '.join(MODES)}: got {mode!r}")
        if mode == "raw":
            return np.where(np.isin(classes, (SKIN, *LIPS)), 255, 0).astype(np.uint8)
        if mode == "neck":
            return np.where(np.isin(classes, (SKIN, *LIPS, NECK)), 255, 0).astype(np.uint8)
        skin = np.where(classes == SKIN, 255, 0).astype(np.uint8)
        grown = cv2.dilate(skin, self.kernel, iterations=1)
        eroded = cv2.erode(grown, self.cheek_kernel, iterations=2)
        region = cv2.bitwise_or(cv2.bitwise_and(eroded, self.cheeks), cv2.bitwise_and(grown, ~self.cheeks))
        keep = ((region == 255) & (classes != NOSE)) | np.isin(classes, LIPS)
        return np.where(keep, 255, 0).astype(np.uint8)


class FaceParser:
    """BiSeNet + the mask rule: PIL RGB image of any size -> (512, 512) uint8 mask (MuseTalk's FaceParsing)."""

    def __init__(self, net: BiSeNet, rule: MaskRule | None = None):
        self.net = net.eval()
        self.rule = rule or MaskRule()

    @torch.no_grad()
    def classes(self, image) -> np.ndarray:
        """PIL RGB image -> (512, 512) int64 class map."""
        from PIL import Image

        small = image.resize((PARSING_SIZE, PARSING_SIZE), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(small, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(MEAN).view(3, 1, 1)
        std = torch.tensor(STD).view(3, 1, 1)
        x = ((x - mean) / std)[None]
        p = next(self.net.parameters())
        logits = self.net(x.to(device=p.device, dtype=p.dtype))
        return logits[0].float().cpu().numpy().argmax(0)

    def __call__(self, image, mode: str = "jaw") -> np.ndarray:
        return self.rule.apply(self.classes(image), mode)


def load_bisenet(state: dict[str, torch.Tensor]) -> BiSeNet:
    """A BiSeNet (fp32, eval) from 79999_iter.pth's state dict; raises ValueError naming the first bad key."""
    net = BiSeNet()
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        k = (missing or extra or bad)[0]
        what = "missing" if missing else "unexpected" if extra else f"shape {tuple(state[k].shape)}"
        raise ValueError(f"not MuseTalk's BiSeNet ({what} key {k})")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return net.eval()
