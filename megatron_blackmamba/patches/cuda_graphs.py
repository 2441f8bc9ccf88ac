"""Two fixes to megatron-core 0.16.1's per-layer training graphs (``cuda_graph_impl="local"``).

Both only change code that runs while layers are captured or replayed, so they are installed on
every CUDA machine and change nothing for a model without graphs.
"""

from __future__ import annotations

import torch

from megatron_blackmamba.patches.registry import Patch, Target


def _keep_layer_graph_inputs() -> None:
    from megatron.core.transformer.cuda_graphs import TensorReusePool

    TensorReusePool.insert = lambda self, tensor: None


def _end_graph_warmup() -> None:
    from megatron.core.transformer import cuda_graphs

    def _set_warmup_end() -> None:
        cuda_graphs._IS_GRAPH_WARMUP = False

    cuda_graphs._set_warmup_end = _set_warmup_end


PATCHES = [
    Patch(
        name="TensorReusePool.insert->keep",
        kind="correctness",
        targets=(
            Target("megatron.core.transformer.cuda_graphs", "TensorReusePool.insert", own=True),
        ),
        when="CUDA is available (per-layer graphs exist only there)",
        why=(
            "once a graph is captured megatron hands its static input buffer to the next graph; a"
            " graphed layer fed by an eager one (a Mamba layer after an eager MoE layer) whose"
            " first op saves its input for backward (the RMSNorm) then finds it overwritten before"
            " its backward runs: wrong norm-weight gradients from the second micro-batch on."
            " Keeping every buffer costs one [s, b, h] activation per graphed layer"
        ),
        applies=torch.cuda.is_available,
        install=_keep_layer_graph_inputs,
        test="tests/training/test_cuda_graphs.py::test_graphed_layers_train_like_eager_ones",
    ),
    Patch(
        name="cuda_graphs._set_warmup_end->lowers the flag",
        kind="correctness",
        targets=(Target("megatron.core.transformer.cuda_graphs", "_set_warmup_end", own=True),),
        when="CUDA is available (per-layer graphs exist only there)",
        why=(
            "_set_warmup_end never lowers the flag that _set_warmup_start raises, so after the "
            "first capture every forward reads as a graph warm-up and the router stops counting "
            "routed tokens (model/router.py)"
        ),
        applies=torch.cuda.is_available,
        install=_end_graph_warmup,
        test="tests/training/test_cuda_graphs.py::test_graph_warmup_flag_falls_after_warmup",
    ),
]
