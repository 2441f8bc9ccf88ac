"""Capturing a callable as a CUDA graph: the one recipe the router, decoding and benchmarks
share."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def capture(
    fn: Callable[[], T], device: torch.device, warmup: int = 1
) -> tuple[torch.cuda.CUDAGraph, T]:
    """(graph, static outputs) of one captured ``fn()``; replaying the graph refreshes the outputs.

    ``fn`` first runs ``warmup`` times on a side stream, so lazy one-time work (cuBLAS handles and
    workspaces, Triton compiles) happens outside the capture, as torch's graph docs require.
    """
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
