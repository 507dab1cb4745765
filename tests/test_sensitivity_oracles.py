"""Sensitivity estimators against exact or independently computed oracles.

Hessian estimators vs ``torch.autograd.functional.hessian`` of the loss w.r.t. one layer's
flattened weight; Fisher / Taylor vs explicit gradient formulas of a 2-layer MLP; CCA vs the
covariance formula and vs data with known canonical correlations; pruning, activation
statistics, correlation and measured damage vs direct computations on copies of the model.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from torch import nn
from torch.func import functional_call

from mpq.formats import QuantFormat
from mpq.quant.quantize import fake_quantize
from mpq.sensitivity.activations import ActivationStats
from mpq.sensitivity.correlation import Correlation, cca
from mpq.sensitivity.gradient import Fisher, Taylor
from mpq.sensitivity.hessian import HessianEigen, HessianTrace
from mpq.sensitivity.measured import Measured
from mpq.sensitivity.pruning import Pruning, prune_smallest
from mpq.sensitivity.runner import run_estimator
from mpq.targets import discover
from mpq.tasks import Task, lm_head

torch.set_num_threads(1)


# ---------------------------------------------------------------- fixtures


class MLP(nn.Module):
    def __init__(self, d_in: int = 5, d_hidden: int = 7, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)[:, None, :]


def mlp_setup(
    *,
    labels: bool = True,
    train_steps: int = 0,
    n_batches: int = 3,
    batch: int = 8,
    dims: tuple[int, int, int] = (5, 7, 4),
    seed: int = 0,
) -> tuple[MLP, Task]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(*dims)
    xs = torch.randn(n_batches * batch, dims[0], generator=g)
    ys = torch.randint(0, dims[2], (n_batches * batch,), generator=g)
    if train_steps:
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        for _ in range(train_steps):
            loss = F.cross_entropy(model(xs), ys)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    batches = list(xs.split(batch))
    label_batches = [y[:, None] for y in ys.split(batch)] if labels else None
    return model, Task("mlp", "synthetic", "calib", batches, label_batches, mlp_head)


def tiny_transformer(train_steps: int = 30) -> tuple[nn.Module, Task]:
    """LLaMA with hidden 16 and one layer, trained a few steps on its calibration windows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=24,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 24, (8, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, Task("causal_lm", "synthetic", "calib", [ids], [ids[:, 1:]], lm_head)


def exact_block_hessian(model: nn.Module, task: Task, name: str) -> torch.Tensor:
    """The exact Hessian of the calibration loss w.r.t. ``name``'s flattened weight."""
    w0 = model.get_submodule(name).weight.detach().clone()
    assert task.labels is not None

    def loss(flat: torch.Tensor) -> torch.Tensor:
        total = flat.new_zeros(())
        for batch, labels in zip(task.batches, task.labels, strict=True):
            params = {f"{name}.weight": flat.view(w0.shape)}
            if task.family == "causal_lm":
                logits = functional_call(model, params, kwargs={"input_ids": batch}).logits[:, :-1]
            else:
                logits = functional_call(model, params, (batch,))[:, None, :]
            total = total + F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            )
        return total / len(task.batches)

    h = torch.autograd.functional.hessian(loss, w0.reshape(-1), vectorize=True)
    return h.double()


def _run(est, model, task, include=(), exclude=(), formats=()):  # type: ignore[no-untyped-def]
    targets = discover(model, include=include, exclude=exclude, tie_rules=())
    return run_estimator(
        est, model, targets, task, model_id="tiny", formats=formats, progress=False
    )


# ---------------------------------------------------------------- Hessian


@pytest.mark.parametrize("which", ["mlp", "transformer"])
def test_hessian_trace_and_top_eigenvalue_match_exact_block_hessian(which: str) -> None:
    if which == "mlp":
        model, task = mlp_setup(train_steps=30, n_batches=2, batch=128, dims=(12, 24, 10))
        include, tol = (), 0.01
    else:
        model, task = tiny_transformer()
        include, tol = (r"v_proj", r"down_proj"), 0.0125
    trace = _run(HessianTrace(tol=tol, max_samples=6000), model, task, include)
    eig = _run(HessianEigen(), model, task, include)  # default tol 1e-3
    assert set(trace.scores) == set(eig.scores) and len(trace.scores) >= 2
    for name in trace.scores:
        h = exact_block_hessian(model, task, name)
        exact_trace = float(torch.trace(h))
        extras = trace.params["extras"][name]
        # stopped because every layer reached the tolerance, not at the cap
        assert extras["samples"] < 6000
        assert trace.stderr[name] <= tol * abs(trace.scores[name]) + 1e-12
        assert trace.scores[name] == pytest.approx(exact_trace, rel=0.05), name
        # power iteration: the eigenvalue of largest magnitude
        evals = torch.linalg.eigvalsh(h)
        dominant = float(evals[evals.abs().argmax()])
        assert eig.scores[name] == pytest.approx(dominant, rel=0.01), name
        assert eig.params["extras"][name]["converged"] == 1.0


def test_power_iteration_finds_largest_magnitude_even_if_negative() -> None:
    # For this untrained MLP (seed found by a scan) fc1's block is indefinite and its dominant
    # eigenvalue is negative: power iteration must return it, sign included.
    model, task = mlp_setup(seed=16, n_batches=1, batch=32)
    name = "fc1"
    fmt = QuantFormat(bits=4)
    eig = _run(HessianEigen(tol=1e-6, max_iter=500), model, task, (name,), (), [fmt])
    h = exact_block_hessian(model, task, name)
    evals = torch.linalg.eigvalsh(h)
    dominant = float(evals[evals.abs().argmax()])
    assert dominant < 0 < float(evals.max())
    assert eig.scores[name] == pytest.approx(dominant, rel=0.01)
    # the distortion bound uses |lambda|
    w = model.get_submodule(name).weight.detach()
    dq = float((fake_quantize(w, fmt) - w).pow(2).sum())
    assert eig.distortion(name, "4") == pytest.approx(0.5 * abs(eig.scores[name]) * dq, rel=1e-9)


# ---------------------------------------------------------------- Fisher / Taylor


def _hand_gradients(model: MLP, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """dL/dW of the batch-mean cross-entropy by the explicit backprop formulas (numpy)."""
    w1 = model.fc1.weight.detach().double().numpy()
    b1 = model.fc1.bias.detach().double().numpy()
    w2 = model.fc2.weight.detach().double().numpy()
    b2 = model.fc2.bias.detach().double().numpy()
    xn = x.double().numpy()
    h = np.tanh(xn @ w1.T + b1)
    z = h @ w2.T + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(z.shape[1])[y.numpy()]
    dz = (p - onehot) / xn.shape[0]
    dh = dz @ w2
    da = dh * (1 - h**2)
    return {"fc1": da.T @ xn, "fc2": dz.T @ h}


def _hand_moments(
    model: MLP, task: Task, labels: list[torch.Tensor]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    per_batch = [
        _hand_gradients(model, x, y.reshape(-1)) for x, y in zip(task.batches, labels, strict=True)
    ]
    g = {k: np.mean([pb[k] for pb in per_batch], axis=0) for k in ("fc1", "fc2")}
    fisher = {k: np.mean([pb[k] ** 2 for pb in per_batch], axis=0) for k in ("fc1", "fc2")}
    return g, fisher


@pytest.mark.parametrize("labels", [True, False])
def test_fisher_and_gwq_outliers_match_hand_computation(labels: bool) -> None:
    model, task = mlp_setup(labels=labels)
    if labels:
        assert task.labels is not None
        label_list = list(task.labels)
    else:  # pseudo-labels: the fp model's own top-1
        label_list = [model(x).argmax(-1)[:, None] for x in task.batches]
    g, fisher = _hand_moments(model, task, label_list)
    q = 10.0
    table = _run(Fisher(outlier_pct=q), model, task)
    flat = np.concatenate([np.abs(g["fc1"]).ravel(), np.abs(g["fc2"]).ravel()])
    k = math.ceil(q / 100 * flat.size)
    thr = np.sort(flat)[::-1][k - 1]
    for name in ("fc1", "fc2"):
        extras = table.params["extras"][name]
        assert table.scores[name] == pytest.approx(fisher[name].sum(), rel=1e-5)
        share = ((np.abs(g[name]) >= thr) & (np.abs(g[name]) > 0)).sum() / g[name].size
        assert extras["outlier_share"] == pytest.approx(share, abs=1e-12)
    assert sum(table.params["extras"][n]["outliers"] for n in ("fc1", "fc2")) == k
    share_table = _run(Fisher(outlier_pct=q, quantity="outlier_share"), model, task)
    assert share_table.estimator == "gwq_outliers"
    assert share_table.scores["fc1"] == table.params["extras"]["fc1"]["outlier_share"]


def test_taylor_matches_hand_computation() -> None:
    model, task = mlp_setup()
    assert task.labels is not None
    g, fisher = _hand_moments(model, task, list(task.labels))
    formats = [QuantFormat(bits=2), QuantFormat(bits=4), QuantFormat(bits=3, symmetric=False)]
    table = _run(Taylor(), model, task, formats=formats)
    first_only = _run(Taylor(order="first"), model, task, formats=formats)
    second_only = _run(Taylor(order="second"), model, task, formats=formats)
    for name in ("fc1", "fc2"):
        w = model.get_submodule(name).weight
        for fmt in formats:
            dw = (fake_quantize(w, fmt).double() - w.double()).detach().numpy()
            first = float((g[name] * dw).sum())
            second = 0.5 * float((fisher[name] * dw**2).sum())
            spec = fmt.spec()
            assert table.distortion(name, spec) == pytest.approx(abs(first) + second, rel=1e-5)
            assert first_only.distortion(name, spec) == pytest.approx(abs(first), rel=1e-5)
            assert second_only.distortion(name, spec) == pytest.approx(second, rel=1e-5)
            if spec == "4":
                assert table.scores[name] == table.distortion(name, "4")
                assert table.params["extras"][name]["first_signed"] == pytest.approx(
                    first, rel=1e-5
                )


# ---------------------------------------------------------------- CCA


def _cca_direct(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Singular values of Cxx^-1/2 Cxy Cyy^-1/2 (covariance formula, numpy eigh)."""
    x = x - x.mean(0)
    y = y - y.mean(0)

    def inv_sqrt(c: np.ndarray) -> np.ndarray:
        vals, vecs = np.linalg.eigh(c)
        return (vecs / np.sqrt(vals)) @ vecs.T

    cxx, cyy, cxy = x.T @ x, y.T @ y, x.T @ y
    return np.linalg.svd(inv_sqrt(cxx) @ cxy @ inv_sqrt(cyy), compute_uv=False)


def _shared_latent(n: int, rhos: list[float], p: int, q: int, seed: int) -> tuple[np.ndarray, ...]:
    """Views with population canonical correlations ``rhos`` (then zeros), randomly rotated."""
    rng = np.random.default_rng(seed)
    k = len(rhos)
    z = rng.standard_normal((n, k))
    # x_i = z_i + a e_i, y_i = z_i + a f_i: corr = 1 / (1 + a^2); pick a from rho.
    a = np.sqrt(1 / np.asarray(rhos) - 1)
    x = np.concatenate([z + a * rng.standard_normal((n, k)), rng.standard_normal((n, p - k))], 1)
    y = np.concatenate([z + a * rng.standard_normal((n, k)), rng.standard_normal((n, q - k))], 1)
    qx, _ = np.linalg.qr(rng.standard_normal((p, p)))
    qy, _ = np.linalg.qr(rng.standard_normal((q, q)))
    return x @ qx * rng.uniform(0.5, 3, p), y @ qy * rng.uniform(0.5, 3, q)


def test_cca_matches_covariance_formula_and_known_correlations() -> None:
    rhos = [0.9, 0.6, 0.3]
    x, y = _shared_latent(20000, rhos, p=5, q=4, seed=0)
    got = cca(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    direct = _cca_direct(x, y)
    assert got.shape == (4,)
    np.testing.assert_allclose(got, direct[:4], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got[:3], rhos, atol=0.02)
    assert got[3] < 0.05
    # invariant to invertible linear maps of either view
    mix = np.random.default_rng(1).standard_normal((5, 5))
    again = cca(torch.from_numpy(x @ mix), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(again, got, atol=1e-8)


def test_cca_handles_rank_deficiency_and_ridge() -> None:
    x, y = _shared_latent(4000, [0.8, 0.4], p=3, q=3, seed=2)
    base = cca(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    # a duplicated column and a constant column add no direction
    x_bad = np.concatenate([x, x[:, :1] * 2.0, np.full((x.shape[0], 1), 7.0)], 1)
    got = cca(torch.from_numpy(x_bad), torch.from_numpy(y)).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, base, atol=1e-8)
    ridge = cca(torch.from_numpy(x), torch.from_numpy(y), reg=0.1).numpy()
    assert (ridge <= base + 1e-12).all() and (ridge > 0).all()
    # identical views: all ones; a constant view: nothing to correlate
    assert cca(torch.from_numpy(x), torch.from_numpy(x)).numpy() == pytest.approx([1, 1, 1])
    assert cca(torch.from_numpy(x), torch.ones(x.shape[0], 2)).numel() == 0


def test_correlation_estimator_matches_direct_computation() -> None:
    model, task = mlp_setup(n_batches=4)
    formats = [QuantFormat(bits=2), QuantFormat(bits=4), QuantFormat(bits=8)]
    table = _run(Correlation(max_dims=3), model, task, formats=formats)
    with torch.no_grad():  # the layer's input as the fp model computes it (float32)
        h = torch.tanh(model.fc1(torch.cat(task.batches))).double()
    w2, b2 = model.fc2.weight.detach(), model.fc2.bias.detach().double()
    y = (h @ w2.double().T + b2).numpy()
    k = min(4, 3, y.shape[0] // 4)
    yc = y - y.mean(0)
    proj = np.linalg.svd(yc, full_matrices=False)[2][:k].T
    for fmt in formats:
        yq = (h @ fake_quantize(w2, fmt).double().T + b2).numpy()
        rho = _cca_direct(yc @ proj, (yq - yq.mean(0)) @ proj)
        assert table.distortion("fc2", fmt.spec()) == pytest.approx(
            1 - rho.mean(), rel=1e-4, abs=1e-9
        )
    row = table.distortions["fc2"]
    assert row["2"] > row["4"] > row["8"] >= 0
    assert table.scores["fc2"] == row["4"]


# ---------------------------------------------------------------- pruning, activations, measured


def _direct_loss(model: nn.Module, task: Task) -> float:
    assert task.labels is not None
    with torch.no_grad():
        losses = [
            float(F.cross_entropy(model(x), y.reshape(-1)))
            for x, y in zip(task.batches, task.labels, strict=True)
        ]
    return sum(losses) / len(losses)


def test_pruning_matches_direct_zeroing() -> None:
    model, task = mlp_setup()
    formats = [QuantFormat(bits=3)]
    table = _run(Pruning(p=0.5), model, task, formats=formats)
    base = _direct_loss(model, task)
    for name in ("fc1", "fc2"):
        pruned = copy.deepcopy(model)
        w = pruned.get_submodule(name).weight
        flat = w.detach().reshape(-1).clone()
        k = math.ceil(0.5 * flat.numel())
        smallest = sorted(range(flat.numel()), key=lambda i: (abs(float(flat[i])), i))[:k]
        flat[smallest] = 0.0
        with torch.no_grad():
            w.copy_(flat.reshape(w.shape))
        delta = _direct_loss(pruned, task) - base
        assert table.scores[name] == pytest.approx(delta, rel=1e-5, abs=1e-7)
        orig = model.get_submodule(name).weight
        assert int((prune_smallest(orig, 0.5) == 0).sum()) == k
        dprune = float((orig.detach() - w.detach()).pow(2).sum())
        dq = float((fake_quantize(orig, formats[0]) - orig.detach()).pow(2).sum())
        expected = max(delta, 0.0) * dq / dprune
        assert table.distortion(name, "3") == pytest.approx(expected, rel=1e-5, abs=1e-12)
    # the model is untouched
    fresh, _ = mlp_setup()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_activation_statistics_match_direct_computation() -> None:
    model, task = mlp_setup(labels=False)
    task.batches[1][3, 2] = 40.0  # one input outlier
    task.batches[2][0, 0] = -35.0
    table = _run(ActivationStats(), model, task)
    x = torch.cat(task.batches).double().reshape(-1).numpy()
    h = torch.tanh(model.fc1(torch.cat(task.batches))).detach().double().reshape(-1).numpy()
    for name, data in (("fc1", x), ("fc2", h)):
        e = table.params["extras"][name]
        mu, sd = data.mean(), data.std()
        assert e["min"] == pytest.approx(data.min()) and e["max"] == pytest.approx(data.max())
        assert e["absmax"] == pytest.approx(np.abs(data).max())
        assert e["range"] == pytest.approx(data.max() - data.min())
        assert e["std"] == pytest.approx(sd, rel=1e-9)
        assert e["kurtosis"] == pytest.approx(((data - mu) ** 4).mean() / sd**4, rel=1e-9)
        assert e["outlier_ratio"] == pytest.approx((np.abs(data - mu) > 6 * sd).mean())
    assert table.params["extras"]["fc1"]["outlier_ratio"] == pytest.approx(2 / x.size)
    assert table.scores["fc1"] == table.params["extras"]["fc1"]["kurtosis"]
    ranged = _run(ActivationStats(stat="absmax"), model, task)
    assert ranged.scores["fc1"] == pytest.approx(40.0)


def test_measured_loss_matches_direct_and_damage_grows_as_bits_shrink() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    batches = list(ids.split(2))
    task = Task("causal_lm", "synthetic", "calib", batches, [b[:, 1:] for b in batches], lm_head)
    formats = [QuantFormat(bits=b) for b in (2, 4, 8)]
    include = (r"layers\.0\.mlp\.down_proj$", r"layers\.1\.self_attn\.o_proj$")
    kl = _run(Measured(), model, task, include, formats=formats)
    loss = _run(Measured(metric="loss"), model, task, include, formats=formats)
    assert kl.estimator == "measured_kl" and loss.estimator == "measured_loss"

    def mean_loss(m: nn.Module) -> float:
        with torch.no_grad():
            ce = [
                float(
                    F.cross_entropy(
                        m(input_ids=b).logits[:, :-1].reshape(-1, 96).double(),
                        b[:, 1:].reshape(-1),
                    )
                )
                for b in batches
            ]
        return sum(ce) / len(ce)

    base = mean_loss(model)
    for name in kl.scores:
        for fmt in formats:
            one = copy.deepcopy(model)
            w = one.get_submodule(name).weight
            w.data = fake_quantize(w.data, fmt)
            expected = max(mean_loss(one) - base, 0.0)
            assert loss.distortion(name, fmt.spec()) == pytest.approx(expected, rel=1e-6, abs=1e-12)
        row = kl.distortions[name]
        assert row["2"] > row["4"] > row["8"] >= 0
