"""The calibration loss and its derivatives: what every gradient / Hessian estimator differentiates.

**The loss.** For calibration batch ``i`` the task head gives logits ``[units, positions,
classes]``; the loss is the mean cross-entropy over every (unit, position) of the batch against

- the task's labels when it has them (causal LM: the next tokens; encoder: the BBC classes);
- otherwise the fp model's own top-1 predictions (*pseudo-labels*, CNN photos), computed once on
  the unmodified model by :class:`Calibration` and reused for every later forward, so a
  quantized or pruned model is scored against what the fp model predicted.

The calibration loss ``L`` is the mean over batches of these batch means (equal to the mean over
all positions when the batches have equal size, which :func:`mpq.tasks.lm_task` makes them).
Gradients, Hessian-vector products and Fisher information are those of ``L``.

A NaN/inf loss is an :class:`~mpq.errors.MpqError` naming the batch. Empty calibration data or
batches that leave no position to score (text windows of one token) are errors too.

**Attention.** Hessian-vector products differentiate twice through the model. PyTorch's fused
scaled-dot-product attention has no double backward on CPU, so :func:`check_double_backward`
refuses transformers models configured with ``sdpa`` (or any attention other than ``eager``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpq.errors import MpqError
from mpq.tasks import Task


def check_calibration(task: Task) -> None:
    """Refuse calibration data that cannot give a loss: no batches, or empty batches."""
    if not task.batches:
        raise MpqError(
            "the calibration data is empty (no batches); give at least one window / document / "
            "image (e.g. --n 2)"
        )
    for i, batch in enumerate(task.batches):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        if not isinstance(ids, torch.Tensor) or ids.numel() == 0 or ids.shape[0] == 0:
            raise MpqError(f"calibration batch {i} is empty; give non-empty calibration data")
        if task.family == "causal_lm" and ids.shape[-1] < 2:
            raise MpqError(
                f"calibration batch {i} has windows of {ids.shape[-1]} token(s): a causal LM "
                f"window needs at least 2 tokens to score a next token; use --seq-len >= 2"
            )
    if task.labels is not None and len(task.labels) != len(task.batches):
        raise MpqError(
            f"the task has {len(task.batches)} batches but {len(task.labels)} label batches"
        )


def check_double_backward(model: nn.Module) -> None:
    """Refuse a transformers model whose attention cannot be differentiated twice (SDPA, flash)."""
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is None:
            continue
        impl = None
        for attr in ("_attn_implementation", "attn_implementation"):
            try:
                impl = getattr(cfg, attr, None)
            except Exception:  # noqa: BLE001 - a config property may raise on odd configs
                impl = None
            if impl is not None:
                break
        if impl is not None and str(impl) != "eager":
            raise MpqError(
                f"the model uses attn_implementation={str(impl)!r}, which has no double "
                f"backward on CPU, so Hessian-vector products fail; load it with "
                f'attn_implementation="eager" (e.g. from_pretrained(..., '
                f'attn_implementation="eager"))'
            )


def task_loss(
    task: Task, model: nn.Module, batch_index: int, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of ``task.head(model, batch)`` on calibration batch ``batch_index``.

    ``labels`` default to the task's labels; a task without labels is scored against the
    model's own top-1 predictions of this very forward (pass the fp model's pseudo-labels,
    e.g. from :meth:`Calibration.labels`, when ``model`` is modified). The graph is kept when
    gradients are enabled.
    """
    logits = task.head(model, task.batches[batch_index])
    if labels is None and task.labels is not None:
        labels = task.labels[batch_index]
    return logits_loss(logits, labels, batch_index)


def logits_loss(
    logits: torch.Tensor, labels: torch.Tensor | None, batch_index: int
) -> torch.Tensor:
    """Mean cross-entropy of logits ``[units, positions, classes]`` against ``labels``
    ``[units, positions]`` (None: the logits' own top-1); MpqError when not finite."""
    if logits.ndim != 3 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise MpqError(
            f"calibration batch {batch_index} leaves no position to score (logits of shape "
            f"{tuple(logits.shape)}); the calibration data is too short"
        )
    if labels is None:
        labels = logits.detach().argmax(-1)
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise MpqError(
            f"calibration batch {batch_index}: labels of shape {tuple(labels.shape)} do not "
            f"match the logits' [units, positions] {tuple(logits.shape[:2])}"
        )
    # Without a graph (measured Δloss) in float64: Δloss of an 8-bit layer is below float32's
    # summation noise on a small model. With a graph (gradients, HVPs) float32 as the model.
    dtype = torch.float32 if logits.requires_grad else torch.float64
    flat = logits.reshape(-1, logits.shape[-1]).to(dtype)
    loss = F.cross_entropy(flat, labels.reshape(-1).long())
    value = float(loss.detach())
    if not math.isfinite(value):
        raise MpqError(
            f"the loss on calibration batch {batch_index} is {value}; the model's outputs are "
            f"not finite there (check the weights, the data and the dtype)"
        )
    return loss


class Calibration:
    """Calibration batches of one task and the derivatives of their mean loss ``L``.

    Pseudo-labels (tasks without labels) and the fp loss are computed on first use; call them
    before modifying the model (the runner and estimators restore every weight they change).
    """

    def __init__(self, task: Task, model: nn.Module) -> None:
        check_calibration(task)
        self.task = task
        self.model = model
        self._labels: list[torch.Tensor] | None = None
        self._base_loss: float | None = None

    @property
    def n_batches(self) -> int:
        return len(self.task.batches)

    def labels(self) -> list[torch.Tensor]:
        """The task's labels, or the fp model's top-1 predictions (computed once)."""
        if self._labels is None:
            if self.task.labels is not None:
                self._labels = list(self.task.labels)
            else:
                with torch.no_grad():
                    self._labels = [
                        self.task.head(self.model, b).argmax(-1) for b in self.task.batches
                    ]
        return self._labels

    def loss(self, i: int) -> torch.Tensor:
        """Loss of batch ``i`` (with a graph when gradients are enabled)."""
        return task_loss(self.task, self.model, i, self.labels()[i])

    def mean_loss(self) -> float:
        """``L`` of the model as it is now (no gradients)."""
        labels = self.labels()
        with torch.no_grad():
            total = sum(
                float(task_loss(self.task, self.model, i, labels[i])) for i in range(self.n_batches)
            )
        return total / self.n_batches

    def base_loss(self) -> float:
        """``L`` of the fp model, computed once (call before changing any weight)."""
        if self._base_loss is None:
            self._base_loss = self.mean_loss()
        return self._base_loss

    def forward_all(self) -> None:
        """Run the head on every batch without gradients (for hooks that record activations)."""
        with torch.no_grad():
            for b in self.task.batches:
                self.task.head(self.model, b)

    def gradients(self, params: Sequence[torch.Tensor]) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Per batch ``i``: the gradient of the batch loss ``L_i`` w.r.t. each of ``params``."""
        for i in range(self.n_batches):
            with torch.enable_grad():
                loss = self.loss(i)
                grads = torch.autograd.grad(
                    loss, list(params), allow_unused=True, materialize_grads=True
                )
            yield i, [g.detach() for g in grads]

    def hvp(
        self, params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``H v`` of ``L`` restricted to ``params`` (full Hessian of those parameters)."""
        out = [torch.zeros_like(p) for p in params]
        for i in range(self.n_batches):
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    self.loss(i), list(params), create_graph=True, allow_unused=True
                )
                dot = _dot(grads, vectors)
                if dot is None:
                    continue
                hv = torch.autograd.grad(
                    dot, list(params), allow_unused=True, materialize_grads=True
                )
            for o, h in zip(out, hv, strict=True):
                o.add_(h.detach(), alpha=1.0 / self.n_batches)
        return out

    def block_hvp(
        self, params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``H_jj v_j`` for each parameter ``j``: the product with its own diagonal block only.

        One forward and first backward per batch are shared by every block; each block costs
        one more backward.
        """
        out = [torch.zeros_like(p) for p in params]
        for i in range(self.n_batches):
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    self.loss(i), list(params), create_graph=True, allow_unused=True
                )
                for j, (g, v, p) in enumerate(zip(grads, vectors, params, strict=True)):
                    dot = _dot([g], [v])
                    if dot is None:
                        continue
                    (h,) = torch.autograd.grad(
                        dot, [p], retain_graph=True, allow_unused=True, materialize_grads=True
                    )
                    out[j].add_(h.detach(), alpha=1.0 / self.n_batches)
        return out


def _dot(
    grads: Sequence[torch.Tensor | None], vectors: Sequence[torch.Tensor]
) -> torch.Tensor | None:
    """``sum_j g_j . v_j`` over the gradients that depend on the parameters (None: none do)."""
    terms = [
        (g * v).sum()
        for g, v in zip(grads, vectors, strict=True)
        if g is not None and g.requires_grad
    ]
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total
