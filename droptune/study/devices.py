"""Where a study's local workers run: GPU ids checked against the host, workers planned per
device (``CUDA_VISIBLE_DEVICES`` and overrides per worker), and a cap on local workers."""

from __future__ import annotations

import os
import sys
from typing import Any

from droptune.exceptions import SpecError


__all__ = ["check_gpu_ids", "max_local_workers", "plan_workers"]


#: Device nodes of NVIDIA's driver and of ROCm: a Linux host with none of them has no GPU torch
#: could use.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def _gpu_count() -> int:
    """``torch.cuda.device_count()``, without importing torch (over a second of start-up)
    on a Linux host that has no GPU driver's device node."""
    if sys.platform.startswith("linux") and not any(map(os.path.exists, _GPU_NODES)):
        return 0
    import torch

    return int(torch.cuda.device_count())


def check_gpu_ids(ids: list[int], field: str) -> None:
    """SpecError naming ``field`` unless every GPU id exists on this machine (checked before
    anything is created: otherwise every trial fails)."""
    count = _gpu_count()
    missing = [i for i in ids if i >= count]
    if missing:
        have = f"GPUs 0-{count - 1}" if count else "no GPU"
        raise SpecError(
            f"{field}: GPU {', '.join(map(str, missing))} requested, but this machine has "
            f"{have} (as CUDA_VISIBLE_DEVICES shows them); use cpu or auto"
        )


def max_local_workers() -> int:
    """The most worker processes one ``run`` starts on this machine: each imports torch and
    Lightning (~0.5 GiB), so hundreds exhaust the memory of any host (seen: 400 workers on a
    24 GiB machine, killed by the kernel). More workers belong on more machines."""
    return max(8, 4 * (os.cpu_count() or 1))


def _check_worker_count(count: int) -> None:
    limit = max_local_workers()
    if count > limit:
        raise SpecError(
            f"--workers: {count} local workers is more than this machine can hold (at most "
            f"{limit}: 4 per CPU core); start `droptune worker` on more machines instead"
        )


def plan_workers(devices: str, workers: int | None, per_device: int) -> list[dict[str, Any]]:
    """One entry per worker: its ``CUDA_VISIBLE_DEVICES`` and config overrides.

    ``devices``: ``auto`` (every visible GPU, else CPU), ``cpu``, or GPU ids ``0,1``.
    """
    ids: list[str]
    if devices == "cpu":
        ids = []
    elif devices == "auto":
        ids = [str(i) for i in range(_gpu_count())]
    else:
        ids = [part.strip() for part in devices.split(",") if part.strip()]
        if not ids or not all(part.isdigit() for part in ids):
            raise SpecError(f"--devices: must be auto, cpu or GPU ids like 0,1; got {devices!r}")
        check_gpu_ids([int(i) for i in ids], "--devices")
    if not ids:
        count = workers if workers is not None else 1
        _check_worker_count(count)
        threads = max(1, (os.cpu_count() or 1) // max(count, 1))
        return [
            {
                "env": {"CUDA_VISIBLE_DEVICES": ""},
                "overrides": {
                    "train.accelerator": "cpu",
                    "train.devices": 1,
                    "train.num_threads": threads,
                },
            }
            for _ in range(count)
        ]
    count = workers if workers is not None else len(ids) * per_device
    _check_worker_count(count)
    return [
        {
            "env": {"CUDA_VISIBLE_DEVICES": ids[i % len(ids)]},
            "overrides": {"train.accelerator": "gpu", "train.devices": 1},
        }
        for i in range(count)
    ]
