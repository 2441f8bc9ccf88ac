"""Rank bodies for multi-process evaluation tests (importable by spawned processes)."""

from __future__ import annotations

import json

import torch.distributed as dist

from megatron_blackmamba.parallel.setup import destroy


def score(ckpt: str, requests: list, documents: list, out: str) -> None:
    from lm_eval.api.instance import Instance

    from megatron_blackmamba.evaluation.lm_eval_adapter import BlackMambaLM

    try:
        lm = BlackMambaLM(ckpt=ckpt, dtype="float64", batch_size=3, max_length=8)
        ll = lm.loglikelihood(
            [Instance("loglikelihood", {}, tuple(r), i) for i, r in enumerate(requests)]
        )
        rolling = lm.loglikelihood_rolling(
            [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(documents)]
        )
        if dist.get_rank() == 0:
            with open(out, "w") as f:
                json.dump(
                    {"loglikelihood": ll, "rolling": rolling, "world": dist.get_world_size()}, f
                )
    finally:
        destroy()
