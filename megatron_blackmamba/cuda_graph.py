"""Capturing a callable as a CUDA graph: the one recipe the router, decoding and benchmarks share."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def capture(fn: Callable[[], T], device: torch.device, warmup: int = 1) -> tuple[torch.cuda.CUDAGraph, T]:
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


def fix_layer_graphs() -> None:
    """Two fixes to megatron-core 0.16.1's per-layer training graphs (cuda_graph_impl="local"),
    applied before a graphed model is built."""
    keep_layer_graph_inputs()
    end_graph_warmup()


def keep_layer_graph_inputs() -> None:
    """Give every graphed layer its own static input buffer (training.cuda_graphs).

    megatron's per-layer graphs (cuda_graph_impl="local") copy an eager input into a static buffer
    and, once a graph is captured, hand that buffer to the next graph captured. A layer whose input
    comes from an eager one (a Mamba layer after an eager MoE layer) and whose first op saves its
    input for backward (the RMSNorm) then finds it overwritten by the next graphed layer's forward
    before its own backward runs: wrong norm-weight gradients from the second micro-batch on
    (tests/training/test_cuda_graphs.py). Not returning buffers costs one [s, b, h] activation per
    graphed layer.
    """
    from megatron.core.transformer.cuda_graphs import TensorReusePool

    TensorReusePool.insert = lambda self, tensor: None


def end_graph_warmup() -> None:
    """Make megatron's ``is_graph_warmup()`` false again once a layer's warm-up runs are over.

    Before capturing a layer, megatron runs it a few times on all-zero inputs and raises a flag
    that code inside the layer can test; 0.16.1's ``_set_warmup_end`` never lowers it, so after the
    first capture every forward reads as a warm-up. The router tests the flag so that the warm-up
    runs do not count as routed tokens (model/router.py).
    """
    from megatron.core.transformer import cuda_graphs

    def _set_warmup_end() -> None:
        cuda_graphs._IS_GRAPH_WARMUP = False

    cuda_graphs._set_warmup_end = _set_warmup_end
