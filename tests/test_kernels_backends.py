"""Backend choice and bad input: unknown or missing backends, layers a backend cannot run,
packed files that were edited or belong to another plan."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

from mpq.errors import MpqError
from mpq.executor import apply_plan, backends, load_packed, resident_bytes, set_backend
from mpq.export.safetensors import save_packed
from mpq.formats import QuantFormat
from mpq.kernels import backends as B
from mpq.kernels.modules import PackedWeight, QuantLinear
from mpq.plan import BitPlan, uniform_plan
from mpq.targets import discover


def test_unknown_backend_is_refused() -> None:
    model = tiny_llama()
    targets = discover(model)
    plan = uniform_plan(targets, QuantFormat(bits=4), "t")
    with pytest.raises(MpqError, match="backend 'cuda' is unknown; use one of"):
        apply_plan(model, plan, targets, backend="cuda")


def test_missing_triton_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    p = PackedWeight(torch.randn(8, 32), QuantFormat(bits=4))
    with pytest.raises(MpqError, match="'triton' was asked for but is unavailable: Triton is not"):
        QuantLinear(p, None, backend="triton")


def test_conv2d_on_triton_names_the_backends_that_can(convnet: nn.Module) -> None:
    targets = discover(convnet)
    plan = uniform_plan(targets, QuantFormat(bits=4), "c")
    with pytest.raises(MpqError, match=r"conv1 \(conv2d .*no conv2d kernel.*can run it: ref"):
        apply_plan(convnet, plan, targets, backend="triton")
    mixed = apply_plan(convnet, plan, targets, backend="cpu")
    assert backends(mixed) == {"conv1": "reference", "conv2": "reference", "fc": "reference"}


def test_shape_the_kernels_cannot_index_is_refused() -> None:
    fmt = QuantFormat(bits=8)
    with pytest.raises(MpqError, match="offsets beyond int32; backends that can run it: ref"):
        B.check_layer("triton", "huge", "linear", 2**20, 2**13, fmt)
    assert B.capable("linear", 2**20, 2**13, fmt) == ["reference", "cpu"]
    assert B.capable("linear", 64, 64, fmt) == ["reference", "cpu", "triton", "cupy"]


def test_fake_mode_takes_no_backend() -> None:
    model = tiny_llama()
    targets = discover(model)
    with pytest.raises(MpqError, match="applies to mode='packed'"):
        apply_plan(
            model,
            uniform_plan(targets, QuantFormat(bits=4), "t"),
            targets,
            mode="fake",
            backend="cpu",
        )


def test_keep_layers_and_set_backend() -> None:
    model = tiny_llama()
    targets = discover(model)
    plan = uniform_plan(targets, QuantFormat(bits=16), "t")
    q = apply_plan(model, plan, targets, backend="cpu")
    assert set(backends(q).values()) == {"reference"}
    plan8 = uniform_plan(targets, QuantFormat(bits=8), "t")
    q8 = apply_plan(model, plan8, targets)
    assert set(backends(q8).values()) == {"reference"}
    got = set_backend(q8, "auto")
    assert got["lm_head"] == "cpu" and got["model.embed_tokens"] == "reference"


def _saved(tmp_path: Path, spec: str = "3:g32:asym") -> tuple[nn.Module, list, BitPlan, Path]:
    model = tiny_llama()
    targets = discover(model)
    plan = uniform_plan(targets, QuantFormat.parse(spec), "tiny")
    packed = apply_plan(model, plan, targets)
    return model, targets, plan, save_packed(packed, plan, tmp_path / "m.safetensors")


def test_load_packed_round_trips_a_saved_model(tmp_path: Path) -> None:
    model, targets, plan, path = _saved(tmp_path, "4:g32")
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    original = apply_plan(model, plan, targets)
    loaded = load_packed(model, targets, path, backend="cpu")
    assert backends(loaded)["lm_head"] == "cpu"
    assert (
        loaded.get_submodule("lm_head").packed is loaded.get_submodule("model.embed_tokens").packed
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)
    assert resident_bytes(loaded)[0] == resident_bytes(original)[0]
    from_state = load_packed(model, targets, original.state_dict(), plan)
    with torch.no_grad():
        torch.testing.assert_close(from_state(ids).logits, original(ids).logits, rtol=0, atol=0)


def _edit(path: Path, name: str, fn) -> Path:  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    state = load_file(str(path))
    state[name] = fn(state[name])
    out = path.with_name("edited.safetensors")
    save_file(state, str(out), metadata=meta)
    return out


KEY = "model.layers.0.mlp.down_proj.packed"


@pytest.mark.parametrize(
    "tensor,edit,message",
    [
        ("qweight", lambda t: t[:, :-1].contiguous(), r"qweight: expected torch.int32 \[64, 12\]"),
        ("scales", lambda t: t.float(), r"scales: expected torch.float16"),
        ("scales", lambda t: -t, "non-positive scales"),
        ("qzeros", lambda t: t[:, :1].contiguous(), r"qzeros: expected"),
    ],
)
def test_edited_packed_tensors_are_refused(
    tmp_path: Path,
    tensor: str,
    edit,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    model, targets, plan, path = _saved(tmp_path)
    with pytest.raises(MpqError, match=message):
        load_packed(model, targets, _edit(path, f"{KEY}.{tensor}", edit))


def test_missing_tensor_and_foreign_plan_are_refused(tmp_path: Path) -> None:
    model, targets, plan, path = _saved(tmp_path)
    state = load_file(str(path))
    del state[f"{KEY}.qzeros"]
    with pytest.raises(MpqError, match="missing .*down_proj.packed.qzeros"):
        load_packed(model, targets, state, plan)
    other = uniform_plan(targets, QuantFormat(bits=4), "tiny")
    with pytest.raises(MpqError, match="packed with another plan"):
        load_packed(model, targets, path, other)
    with pytest.raises(MpqError, match="needs the plan"):
        load_packed(model, targets, load_file(str(path)))
    with pytest.raises(MpqError, match="does not exist"):
        load_packed(model, targets, tmp_path / "nope.safetensors")


def test_set_padding_bits_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16))  # 10 codes x 3 bits: 2 padding bits per row
    targets = discover(model)
    plan = uniform_plan(targets, QuantFormat(bits=3), "m")
    path = save_packed(apply_plan(model, plan, targets), plan, tmp_path / "m.safetensors")
    assert load_packed(model, targets, path) is not None
    edited = _edit(path, "0.packed.qweight", lambda t: t | (1 << 31))
    with pytest.raises(MpqError, match="padding bits are set; the packed codes were edited"):
        load_packed(model, targets, edited)
