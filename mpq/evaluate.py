"""What a quantized model lost, against its own fp32 outputs and, where there are labels, the truth.

One evaluation loop serves every model family through a :class:`~mpq.tasks.Task`, whose head
turns a batch into logits ``[units, positions, classes]`` (units: text windows, documents or
images). Per unit we record the mean KL(fp || quantized), top-1 agreement with fp, and (with
labels) the mean NLL and accuracy. Standard errors are over units; perplexity's 95% interval is
``exp(mean NLL +- 1.96 se)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from mpq.errors import MpqError
from mpq.tasks import Task

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Reference:
    """The fp model's logits on every batch of one task, computed once (float32).

    Stored as logits, not log-probabilities: :func:`batch_stats` normalizes the reference and
    the compared logits with the same float64 ``log_softmax``, so identical logits give a KL of
    exactly 0 and a KL far below float32's resolution is still resolved.
    """

    logits: tuple[torch.Tensor, ...]


def reference(task: Task, model: nn.Module, progress: bool = False) -> Reference:
    """The fp model's logits on ``task``; MpqError when any is NaN or infinite (broken
    weights: every comparison against them would be meaningless)."""
    out = []
    with torch.no_grad():
        for batch in tqdm(task.batches, desc="fp reference", disable=not progress, leave=False):
            logits = task.head(model, batch).float()
            if not bool(torch.isfinite(logits).all()):
                raise MpqError(
                    f"the fp model gives non-finite logits (NaN or inf) on {task.key}: its "
                    f"weights are damaged or overflow; check the model folder (a bundled model "
                    f"is rebuilt when its checksum fails: delete $MPQ_CACHE/models to force it)"
                )
            out.append(logits)
    return Reference(tuple(out))


@dataclass(frozen=True)
class UnitStats:
    """Per-unit measurements of one evaluation (one row per window / document / image)."""

    kl: torch.Tensor
    agree: torch.Tensor
    nll: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    positions: int = 1


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    mean = float(x.mean())
    se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")
    return mean, se


@dataclass(frozen=True)
class EvalResult:
    """Summary metrics, and the per-unit values they came from (so results can be pooled)."""

    metrics: dict[str, float] = field(default_factory=dict)
    units: dict[str, list[float]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]


def pool(results: Sequence[EvalResult]) -> EvalResult:
    """One result over the units of several (e.g. one per seed): CIs over units and seeds."""
    keys = set.intersection(*(set(r.units) for r in results)) if results else set()
    if not keys:
        raise MpqError("cannot pool evaluations without per-unit values; re-run them")
    positions = sum(r.metrics.get("n_positions", 0.0) for r in results)
    units = {k: [x for r in results for x in r.units[k]] for k in sorted(keys)}
    stats = UnitStats(
        kl=torch.tensor(units["kl"], dtype=torch.float64),
        agree=torch.tensor(units["agree"], dtype=torch.float64),
        nll=torch.tensor(units["nll"], dtype=torch.float64) if "nll" in units else None,
        correct=torch.tensor(units["correct"], dtype=torch.float64) if "correct" in units else None,
    )
    out = summarize([stats])
    out.metrics["n_positions"] = positions
    return out


def batch_stats(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor | None
) -> UnitStats:
    """Per-unit KL, agreement, NLL and accuracy from logits ``[U, P, C]``.

    ``ref_logits`` are the fp model's logits (or log-probabilities: normalizing again changes
    nothing). Everything is computed in float64: a float32 KL carries summation noise at the
    1e-7 level, which is the size of an 8-bit layer's true damage on a small model.
    """
    kls, agrees, nlls, corrects = [], [], [], []
    for u in range(logits.shape[0]):  # one unit at a time: float64 [P, C] stays small
        logp = torch.log_softmax(logits[u].double(), dim=-1)
        ref_logprobs = torch.log_softmax(ref_logits[u].double(), dim=-1)
        p_ref = ref_logprobs.exp()
        # 0 * log 0 = 0: classes the reference gives no mass add nothing (and never NaN).
        kls.append(torch.where(p_ref > 0, p_ref * (ref_logprobs - logp), 0.0).sum(-1).mean(-1))
        pred = logp.argmax(-1)
        agrees.append((pred == ref_logprobs.argmax(-1)).double().mean(-1))
        if labels is not None:
            nlls.append(-logp.gather(-1, labels[u][..., None]).squeeze(-1).mean(-1))
            corrects.append((pred == labels[u]).double().mean(-1))
    kl, agree = torch.stack(kls), torch.stack(agrees)
    nll = correct = None
    if labels is not None:
        nll, correct = torch.stack(nlls), torch.stack(corrects)
    return UnitStats(kl=kl, agree=agree, nll=nll, correct=correct, positions=logits.shape[1])


def summarize(stats: Sequence[UnitStats]) -> EvalResult:
    kl = torch.cat([s.kl for s in stats])
    agree = torch.cat([s.agree for s in stats])
    m: dict[str, float] = {"n_units": float(kl.numel())}
    m["n_positions"] = float(sum(s.kl.numel() * s.positions for s in stats))
    m["kl"], m["kl_se"] = _mean_se(kl)
    m["agree"], m["agree_se"] = _mean_se(agree)
    if all(s.nll is not None for s in stats):
        nll = torch.cat([s.nll for s in stats if s.nll is not None])
        m["nll"], m["nll_se"] = _mean_se(nll)
        se = m["nll_se"] if math.isfinite(m["nll_se"]) else 0.0
        m["ppl"] = math.exp(m["nll"])
        m["ppl_lo"] = math.exp(m["nll"] - Z95 * se)
        m["ppl_hi"] = math.exp(m["nll"] + Z95 * se)
    units = {"kl": kl.tolist(), "agree": agree.tolist()}
    if all(s.correct is not None for s in stats):
        correct = torch.cat([s.correct for s in stats if s.correct is not None])
        m["acc"], m["acc_se"] = _mean_se(correct)
        units["correct"] = correct.tolist()
    if "nll" in m:
        units["nll"] = torch.cat([s.nll for s in stats if s.nll is not None]).tolist()
    return EvalResult(m, units)


def evaluate(
    task: Task,
    model: nn.Module,
    ref: Reference,
    *,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Evaluate ``model`` on ``task`` against the fp reference ``ref``."""
    if len(ref.logits) != len(task.batches):
        raise MpqError("reference and task have different batches; recompute the reference")
    stats = []
    with torch.no_grad():
        for i, batch in enumerate(tqdm(task.batches, desc=desc, disable=not progress, leave=False)):
            labels = task.labels[i] if task.labels is not None else None
            stats.append(batch_stats(task.head(model, batch), ref.logits[i], labels))
    return summarize(stats)
