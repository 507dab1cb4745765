"""Write a packed model (from ``apply_plan(mode="packed")``) as safetensors + its plan.

Tensors shared by several modules (a tied embedding and LM head) are written once, under the
first name; ``__aliases__`` in the metadata maps the other names to it. The plan is stored in
the metadata too, so the file is self-describing. The tensor bytes equal the cost model's
``total_bytes`` for the plan (a test checks it against the file on disk).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from mpq.cost import tensor_key, unique_tensors
from mpq.errors import MpqError
from mpq.files import atomic_write
from mpq.plan import BitPlan


def save_packed(model: nn.Module, plan: BitPlan, path: str | os.PathLike[str]) -> Path:
    """Write the unique tensors of ``model``'s state dict and the plan; returns the path."""
    from safetensors.torch import save_file

    state = model.state_dict()
    unique = unique_tensors(state)
    first = {tensor_key(t): n for n, t in unique.items()}
    aliases = {n: first[tensor_key(t)] for n, t in state.items() if n not in unique}
    tensors = {n: t.detach().contiguous() for n, t in unique.items()}
    meta = {"mpq_plan": plan.to_json(), "__aliases__": json.dumps(aliases)}
    # a temp file of its own: two writers of one path never share a temporary name
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def tensor_bytes_in_file(path: str | os.PathLike[str]) -> int:
    """Bytes of tensor data in a safetensors file (file size minus its header)."""
    p = Path(path)
    with p.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise MpqError(f"{str(p)!r} is not a safetensors file")
        header_len = int.from_bytes(head, "little")
    return p.stat().st_size - 8 - header_len
