"""Host <-> GPU copies that never make the host wait for the GPU.

A plain ``tensor.to("cuda")`` from ordinary host memory, and ``torch.tensor(list, device="cuda")``,
wait until every kernel queued before them has finished. In the chunk loop that stalls the host
while the GPU drains its queue, and the GPU then idles until the host has queued enough new work.
These helpers go through pinned (page-locked) memory with non-blocking copies instead; PyTorch's
pinned-memory cache keeps each staging buffer until its copy has run. Without a CUDA device they
are plain copies.
"""

from __future__ import annotations

import torch


def upload(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``; a host tensor goes to a CUDA device without a host/GPU synchronisation."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def index_tensor(values: list[int], device: torch.device | str) -> torch.Tensor:
    """A long tensor of ``values`` on ``device`` (:func:`upload`)."""
    return upload(torch.tensor(values, dtype=torch.long), device)


def start_download(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Begin copying ``x`` to ``device``. A CUDA tensor bound for the host lands in pinned memory
    without waiting: read it only after the current stream has passed this point (an event)."""
    device = torch.device(device)
    if x.device.type != "cuda" or device.type != "cpu":
        return x.to(device)
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host
