"""Forward+backward time of every droptune dropout kind against torch's own module, same run.

Run::

    python bench/layers.py [--device auto|cpu|cuda] [--repeats N] [--json out.json]
                           [--budget SECONDS_PER_ROW] [--threads N] [--only KIND,KIND]

Each row times ``y = module(x); y.backward(g)`` for a droptune module (A) and a torch yardstick
(B) on the same input. After a warm-up, A and B are timed in alternating pairs (ABAB..., the
order flipped every pair) so that changing machine load hits both alike; each timed block runs
enough calls to last a few milliseconds (``torch.cuda.synchronize()`` around it on GPU). The
table shows the median time per call of each and ``ratio``, the median over pairs of A/B (robust
to load drifting between pairs; ``spread`` is the inter-quartile range of those pair ratios).

Requirement checked (PASS/FAIL is printed, the exit code is always 0): droptune ``standard`` and
``spatial`` are within 10% of ``nn.Dropout`` / ``nn.Dropout2d`` (ratio <= 1.10). The yardstick of
the other kinds is informational: ``gaussian``, ``droppath``, ``embedding``, ``variational`` and
the population row are compared with ``nn.Dropout``, ``dropblock`` with ``nn.Dropout2d``,
``alpha`` with ``nn.AlphaDropout``. The ``overhead`` row uses a tiny tensor, so it measures the
per-call Python cost of the module rather than the kernel.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
import json
import math
import os
import platform
import statistics
import time

import torch
from torch import nn

from droptune.layers import make_dropout


LIMIT = 1.10  # droptune standard / spatial may be at most 10% slower than torch's modules


@dataclass
class Case:
    kind: str
    shape: tuple[int, ...]
    droptune: Callable[[], nn.Module]
    torch_name: str
    torch_module: Callable[[], nn.Module]
    checked: bool = False  # part of the PASS/FAIL requirement
    note: str = ""


@dataclass
class Row:
    kind: str
    shape: str
    torch_module: str
    droptune_ms: float
    torch_ms: float
    ratio: float
    spread: tuple[float, float]
    pairs: int
    calls_per_block: int
    checked: bool
    note: str


def cases() -> list[Case]:
    dense = (256, 1024)
    image = (64, 32, 32, 32)
    sequence = (64, 32, 1024)
    population = torch.full((8,), 0.3)
    return [
        Case("standard", dense, lambda: make_dropout("standard", 0.3), "nn.Dropout",
             lambda: nn.Dropout(0.3), checked=True),
        Case("spatial", image, lambda: make_dropout("spatial", 0.3), "nn.Dropout2d",
             lambda: nn.Dropout2d(0.3), checked=True),
        Case("dropblock", image, lambda: make_dropout("dropblock", 0.1, block_size=3),
             "nn.Dropout2d", lambda: nn.Dropout2d(0.1)),
        Case("variational", sequence, lambda: make_dropout("variational", 0.3), "nn.Dropout",
             lambda: nn.Dropout(0.3)),
        Case("alpha", dense, lambda: make_dropout("alpha", 0.1), "nn.AlphaDropout",
             lambda: nn.AlphaDropout(0.1)),
        Case("gaussian", dense, lambda: make_dropout("gaussian", 0.3), "nn.Dropout",
             lambda: nn.Dropout(0.3)),
        Case("droppath", dense, lambda: make_dropout("droppath", 0.3), "nn.Dropout",
             lambda: nn.Dropout(0.3)),
        Case("embedding", dense, lambda: make_dropout("embedding", 0.3), "nn.Dropout",
             lambda: nn.Dropout(0.3)),
        Case("standard[P=8]", (8, *dense), lambda: make_dropout("standard", population),
             "nn.Dropout", lambda: nn.Dropout(0.3), note="population of 8 rates"),
        Case("overhead", (16, 16), lambda: make_dropout("standard", 0.3), "nn.Dropout",
             lambda: nn.Dropout(0.3), note="tiny tensor: per-call Python cost"),
    ]  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _block(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, calls: int) -> float:
    """Seconds per call of forward+backward, over ``calls`` back-to-back calls."""
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(calls):
        x.grad = None
        module(x).backward(grad)
    _sync(x.device)
    return (time.perf_counter() - start) / calls


def measure(case: Case, device: torch.device, repeats: int, budget_s: float) -> Row:
    torch.manual_seed(0)
    x = torch.randn(case.shape, device=device, requires_grad=True)
    grad = torch.randn(case.shape, device=device)
    ours = case.droptune().to(device).train()
    theirs = case.torch_module().to(device).train()

    # Warm-up (allocator, kernels, lazy init), then size a block to about `block_s`.
    block_s = 0.005 if device.type == "cuda" else 0.003
    single = []
    for _ in range(3):
        single.append(_block(ours, x, grad, 1))
        single.append(_block(theirs, x, grad, 1))
    per_call = max(min(single), 1e-7)
    calls = max(1, math.ceil(block_s / per_call))

    # Up to `repeats` pairs, stopping early once the row's time budget is spent (never fewer
    # than 7 pairs).
    a_times: list[float] = []
    b_times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for i in range(repeats):
        if i >= 7 and time.perf_counter() > deadline:
            break
        if i % 2 == 0:
            a = _block(ours, x, grad, calls)
            b = _block(theirs, x, grad, calls)
        else:
            b = _block(theirs, x, grad, calls)
            a = _block(ours, x, grad, calls)
        a_times.append(a)
        b_times.append(b)
    ratios = sorted(a / b for a, b in zip(a_times, b_times, strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    return Row(
        kind=case.kind,
        shape="x".join(map(str, case.shape)),
        torch_module=case.torch_name,
        droptune_ms=statistics.median(a_times) * 1e3,
        torch_ms=statistics.median(b_times) * 1e3,
        ratio=statistics.median(ratios),
        spread=(quartiles[0], quartiles[2]),
        pairs=len(a_times),
        calls_per_block=calls,
        checked=case.checked,
        note=case.note,
    )


def table(rows: list[Row]) -> str:
    head = (
        f"{'kind':<14} {'shape':<15} {'droptune ms':>11} {'torch ms':>9} {'ratio':>6} "
        f"{'spread':>11}  {'vs':<15} {'pairs':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.kind:<14} {r.shape:<15} {r.droptune_ms:>11.4f} {r.torch_ms:>9.4f} "
            f"{r.ratio:>6.3f} {r.spread[0]:>5.2f}-{r.spread[1]:<5.2f}  {r.torch_module:<15} "
            f"{r.pairs:>5}" + (f"  ({r.note})" if r.note else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--repeats", type=int, default=41, help="timed A/B pairs per row (at most; default 41)"
    )
    parser.add_argument(
        "--budget", type=float, default=4.0, help="seconds of timing per row (default 4)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", default="", help="comma-separated kinds to run")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(name)
    where = torch.cuda.get_device_name(device) if name == "cuda" else platform.processor() or "cpu"
    print(
        f"droptune layer benchmark: forward+backward, device={name} ({where}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    if device.type == "cpu" and load > cores:
        print(
            f"note: load average {load:.1f} on {cores} cores: other processes compete for the "
            "CPU, absolute times are inflated (ratios stay comparable; try --threads 1)"
        )

    only = {k for k in args.only.split(",") if k}
    start = time.perf_counter()
    rows = [
        measure(case, device, args.repeats, args.budget)
        for case in cases()
        if not only or case.kind in only
    ]
    print(table(rows))
    print("ratio = median over pairs of droptune/torch time; spread = its inter-quartile range")

    results = []
    for row in rows:
        if row.checked:
            ok = row.ratio <= LIMIT
            results.append({"kind": row.kind, "ratio": row.ratio, "pass": ok})
            print(
                f"{'PASS' if ok else 'FAIL'}: droptune {row.kind} vs {row.torch_module}: "
                f"ratio {row.ratio:.3f} {'<=' if ok else '>'} {LIMIT:.2f}"
            )
    print(f"total {time.perf_counter() - start:.1f} s")

    if args.json_path:
        payload = {
            "device": name,
            "device_name": where,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "limit": LIMIT,
            "rows": [asdict(r) for r in rows],
            "requirements": results,
        }
        with open(args.json_path, "w") as handle:
            json.dump(payload, handle, indent=2)
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
