"""``mpq bench-layers``: time every distinct layer shape of a model, per format, on one backend.

The command writes the :class:`~mpq.latency.LatencyTable` that ``mpq solve --latency-table``
reads (:func:`mpq.latency.load_latency_costs`). ``mpq.cli`` registers it with
:func:`add_bench_layers_parser`; importing this module imports neither torch nor the kernels.

``--backend auto`` is resolved before timing (CUDA: triton, else cupy, else reference; CPU:
cpu), and the table records the concrete backend, so ``--latency-backend`` names what ran.
Each row also records ``ran``: the backend the layer actually got (the ``cpu`` backend runs
formats its fused ops cannot take on the reference path).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.errors import MpqError

if TYPE_CHECKING:
    import torch

    from mpq.cost import CostModel
    from mpq.formats import QuantFormat
    from mpq.latency import LatencyTable

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def add_bench_layers_parser(
    sub: Any, model_args: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.ArgumentParser:
    """Add ``bench-layers`` to the ``mpq`` sub-command parsers ``sub``; returns its parser.

    ``model_args`` adds ``--model/--include/--exclude/--no-ties`` (default:
    :func:`mpq.cli.args.model_args`, the one every model command uses).
    """
    if model_args is None:
        from mpq.cli.args import model_args as default_model_args

        model_args = default_model_args
    p: argparse.ArgumentParser = sub.add_parser(
        "bench-layers",
        help="time each layer shape x format on one backend; write a latency table",
        description="Time every distinct layer shape of a model, per format, on one backend, "
        "and write the latency table `mpq solve --latency-table` reads.",
    )
    model_args(p)
    p.add_argument("--formats", default="3,4,5,6,8", help="formats to time, comma-separated")
    p.add_argument(
        "--backend",
        default="auto",
        help="reference | cpu | triton | cupy | auto (the best one here, resolved before timing)",
    )
    p.add_argument(
        "--batch", default="1", help="input rows per call (1 = decode); comma-separated for several"
    )
    p.add_argument("--repeats", type=int, default=20, help="timed calls per layer (median kept)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per layer first")
    p.add_argument(
        "--device",
        default="auto",
        help="cpu | cuda | auto (cuda when there is a GPU and the backend is not 'cpu')",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="input dtype: float32 | float16 | bfloat16 | auto (float16 on cuda, else float32)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="where to write the latency table JSON")
    p.set_defaults(func=cmd_bench_layers)
    return p


def choose_backend(request: str, device: str = "auto") -> tuple[str, str]:
    """(concrete backend, device) for a ``--backend`` / ``--device`` request on this machine.

    Raises :class:`MpqError` for an unknown name, a backend this machine cannot run (naming the
    ones it can), or a backend that does not run on the requested device.
    """
    import torch

    from mpq.kernels import backends as B
    from mpq.kernels.checks import device_problem

    if request not in B.REQUESTS:
        raise MpqError(f"--backend {request!r} is unknown; use one of {list(B.REQUESTS)}")
    if device not in DEVICES:
        raise MpqError(f"--device {device!r} is unknown; use one of {list(DEVICES)}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise MpqError("--device cuda: this machine has no CUDA GPU; use --device cpu")
    if request == "auto":
        dev = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
        return B.resolve("auto", dev), dev
    problem = B.machine_problem(request)
    if problem is not None:
        raise MpqError(
            f"--backend {request!r} is not available on this machine: {problem}; available "
            f"here: {', '.join(B.available_here())} (or auto)"
        )
    dev = device if device != "auto" else ("cuda" if cuda and request != "cpu" else "cpu")
    if request == "cpu" and dev == "cuda":
        raise MpqError(
            "--backend cpu runs CPU tensors; use --device cpu, or --backend triton, cupy or "
            "reference on cuda"
        )
    if request in ("triton", "cupy"):
        problem = device_problem(request, torch.device(dev))
        if problem is not None:
            raise MpqError(problem)
    return request, dev


def _dtype(name: str, device: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise MpqError(f"--dtype {name!r} is unknown; use one of {list(DTYPES)}")
    if name == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MpqError(
            f"{flag} {text!r}: write whole numbers, e.g. {flag} 1 or {flag} 1,16"
        ) from None
    if not values or min(values) < 1:
        raise MpqError(f"{flag} {text!r}: give batch sizes >= 1, e.g. {flag} 1")
    return values


def check_formats(
    layers: list[tuple[str, tuple[int, int]]], formats: list[QuantFormat], backend: str
) -> None:
    """Raise :class:`MpqError` for formats that fit none of the layers, or that ``backend`` cannot
    run on a layer they fit (listing every such case and the backends that can)."""
    from mpq.formats import fits
    from mpq.kernels.backends import check_layer

    problems = []
    for fmt in formats:
        if not any(fits(shape, fmt) for _, shape in layers):
            lengths = sorted({shape[1] for _, shape in layers})
            problems.append(
                f"format {fmt.spec()} fits none of the layers (row lengths {lengths}); use a group "
                f"size that divides them or per-channel"
            )
            continue
        for kind, (rows, cols) in layers:
            if not fits((rows, cols), fmt):
                continue
            try:
                check_layer(backend, f"{kind} {[rows, cols]}", kind, rows, cols, fmt)
            except MpqError as exc:
                problems.append(str(exc))
    if problems:
        raise MpqError(f"backend {backend!r} cannot run what was asked: " + "; ".join(problems))


def cmd_bench_layers(args: argparse.Namespace) -> int:
    """Run ``mpq bench-layers``: measure, write the table, print a short summary."""
    from mpq.formats import QuantFormat
    from mpq.latency import measure_table, target_layers
    from mpq.pipeline import prepare

    if Path(args.out).is_dir():
        raise MpqError(f"--out {args.out!r} is a folder; give the path of the table file to write")
    formats = [QuantFormat.parse(s) for s in str(args.formats).split(",") if s.strip()]
    if not formats:
        raise MpqError("--formats is empty; give at least one, e.g. --formats 4,8")
    if len({f.spec() for f in formats}) != len(formats):
        raise MpqError(f"--formats repeats a format: {[f.spec() for f in formats]}")
    batches = _ints(str(args.batch), "--batch")
    if args.repeats < 1 or args.warmup < 0:
        raise MpqError("--repeats must be >= 1 and --warmup >= 0")
    backend, device = choose_backend(args.backend, args.device)
    dtype = _dtype(args.dtype, device)
    from mpq.cli.args import ties_of

    prep = prepare(args.model, args.include, args.exclude, ties_of(args))
    layers = target_layers(prep.targets)
    check_formats(layers, formats, backend)
    t0 = time.perf_counter()
    table = measure_table(
        layers,
        formats,
        (backend,),
        batches,
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
        dtype=dtype,
        progress=not args.no_progress,
        meta={"model_id": prep.loaded.model_id, "requested_backend": args.backend},
    )
    seconds = time.perf_counter() - t0
    table.save(args.out)
    print(summary(table, prep.cost, formats, backend, args.backend, seconds, args.out))
    return 0


def summary(
    table: LatencyTable,
    cost_model: CostModel,
    formats: list[QuantFormat],
    backend: str,
    requested: str,
    seconds: float,
    out: str,
) -> str:
    """The lines ``bench-layers`` prints: setup, shapes, per format where it ran and what the
    model's target layers cost at that format (uniform plan), total time."""
    from mpq.formats import fits
    from mpq.latency import latency_costs

    shapes = sorted({(e.kind, e.shape) for e in table.entries})
    asked = f" (asked: {requested})" if requested != backend else ""
    lines = [
        f"bench-layers: {len(table.entries)} timings on backend {backend}{asked}, device "
        f"{table.device}, {table.dtype}, median of {table.repeats} after {table.warmup} warm-up",
        f"{len(shapes)} shapes: " + ", ".join(f"{k} {list(s)}" for k, s in shapes),
        f"{'format':<16} {'batch':>5} {'ran on':<28} {'target layers, uniform':>22}",
    ]
    for batch in table.batches():
        lat = latency_costs(table, cost_model, formats, backend=backend, batch=batch)
        for o, fmt in enumerate(formats):
            ran = Counter(
                e.ran for e in table.entries if e.format == fmt.spec() and e.batch == batch
            )
            unfit = sum(not fits(t.shape, fmt) for t in cost_model.targets)
            total = f"{lat[:, o].sum() * 1e3:.3f} ms" + (f" ({unfit} do not fit)" if unfit else "")
            where = ", ".join(f"{b} x{n}" for b, n in sorted(ran.items()))
            lines.append(f"{fmt.spec():<16} {batch:>5} {where:<28} {total:>22}")
    lines.append(f"measured in {seconds:.1f} s; table written to {out}")
    return "\n".join(lines)
