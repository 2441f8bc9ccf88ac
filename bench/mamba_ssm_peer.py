"""The peer: mamba-ssm's own ``MambaLMHeadModel``, trained the way its users train it.

What a user would train instead of this project: a dense Mamba-1 language model of
BlackMamba-340M's active size (34 layers of d_model 1152, ~344M parameters) built by mamba-ssm
itself, with its fused add + RMSNorm (Triton), the residual stream in fp32, fp32 weights under
bf16 autocast, PyTorch's fused AdamW, plain cross-entropy, gradient clipping at 1.0 and gradient
accumulation over micro-batches. No megatron: the ratio of BlackMamba's tokens/s to this one's is
the speed-up a user gets from the project, not from the model alone (``dense-mamba`` in
bench/harness.py is the same-size model trained through this project).

FLOPs per token are the project's count for the same dense stack (training/flops.py), so the MFU
columns compare like with like. Needs CUDA and mamba-ssm.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from harness import Trainer

from megatron_blackmamba.config import JobConfig
from megatron_blackmamba.training.flops import train_flops_per_token

LAYERS = 34  # 34 x ~8.0M + 58M embedding ~ 344M, as harness.py's dense-mamba


def peer_model_config(job: JobConfig):
    """mamba-ssm's MambaConfig for the job's hidden size, vocabulary and SSM shape."""
    from mamba_ssm.models.config_mamba import MambaConfig

    m = job.model
    return MambaConfig(
        d_model=m.hidden_size,
        d_intermediate=0,  # Mamba blocks only, no MLP
        n_layer=LAYERS,
        vocab_size=m.vocab_size,
        ssm_cfg={"layer": "Mamba1", "d_state": m.d_state, "d_conv": m.d_conv, "expand": m.expand},
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        pad_vocab_size_multiple=8,
        tie_embeddings=m.tie_embeddings,
    )


class PeerTrainer(Trainer):
    """harness.Trainer whose step is a plain PyTorch loop over ``model`` ([MambaLMHeadModel])
    and a torch optimizer."""

    def step(self) -> float:
        (model,) = self.model
        total = torch.zeros((), device="cuda")
        for _ in range(self.num_microbatches):
            batch = next(self.batches)
            tokens = batch["tokens"].cuda(non_blocking=True)
            labels = batch["labels"].cuda(non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens).logits
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
            (loss / self.num_microbatches).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.job.training.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total / self.num_microbatches)


def build_peer_trainer(name: str, job: JobConfig, batches: Iterator[dict]) -> PeerTrainer:
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("mamba-ssm-lm is a one-GPU loop: run it without torchrun")
    torch.manual_seed(job.training.seed)
    model = MambaLMHeadModel(peer_model_config(job), device="cuda", dtype=torch.float32)
    t = job.training
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.weight_decay,
        fused=True,
    )
    dense = dataclasses.replace(job.model, num_layers=LAYERS, layer_pattern="M" * LAYERS)
    return PeerTrainer(
        name,
        job,
        [model],
        optimizer,
        t.global_batch_size // t.micro_batch_size,
        batches,
        train_flops_per_token(dense),
    )
