"""The dense-transformer baseline: megatron-core's GPTModel at BlackMamba-340M's active size.

Hidden 1152 (18 heads of 64), 18 layers, GeLU MLP of 4 x hidden, RMSNorm, RoPE, untied vocab
50304: 18 x 15.9M + 58M embedding ~ 344M parameters, the active size of BlackMamba-340M/1.5B.
megatron's local spec computes attention with an explicit softmax over the full score matrix;
without Transformer Engine there is no flash attention in megatron-core, so the core attention
here is PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA),
plugged in through the spec like any other module. The loss is the same one BlackMamba trains
with (``model.fused_cross_entropy``), and so are the norms (``model/norm.py``, in bf16).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megatron_blackmamba.model.builder import transformer_config  # noqa: E402
from megatron_blackmamba.model.language_model import FusedCrossEntropyMixin  # noqa: E402
from megatron_blackmamba.model.norm import RMSNorm  # noqa: E402

LAYERS, HEADS, HEAD_DIM, FFN_MULT = 18, 18, 64, 4


class SDPAttention(MegatronModule):
    """megatron core-attention interface over torch SDPA: [s, b, heads, d] x3 -> [s, b, heads*d]."""

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def gpt_config(job):
    hidden = job.model.hidden_size
    return dataclasses.replace(
        transformer_config(job),
        num_layers=LAYERS,
        num_attention_heads=HEADS,
        num_query_groups=None,
        kv_channels=HEAD_DIM,
        ffn_hidden_size=FFN_MULT * hidden,
        num_moe_experts=None,
        moe_ffn_hidden_size=None,
        gated_linear_unit=False,
        activation_func=F.gelu,
    )


class FusedLossGPTModel(FusedCrossEntropyMixin, GPTModel):
    """GPTModel with BlackMamba's cross-entropy, so the comparison is of the models, not the
    losses."""


def build_gpt(job, pre_process: bool = True, post_process: bool = True) -> GPTModel:
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    # BlackMamba's norms, in the model's dtype. megatron's WrappedTorchNorm ignores params_dtype:
    # its fp32 weights put bf16 activations on torch's slow mixed-dtype RMSNorm path.
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    model_class = FusedLossGPTModel if job.model.fused_cross_entropy else GPTModel
    return model_class(
        config=gpt_config(job),
        transformer_layer_spec=TransformerBlockSubmodules(
            layer_specs=[spec] * LAYERS, layer_norm=RMSNorm
        ),
        vocab_size=job.model.vocab_size,
        max_sequence_length=job.training.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )


def train_flops_per_token(job) -> int:
    """3 x forward; forward = 2 x (layer + head) weights + causal attention 2*s*h per layer
    (QK^T and AV are 4*s*h per token over the full square, half of it under the causal mask)."""
    h, s, v = job.model.hidden_size, job.training.seq_length, job.model.vocab_size
    weights = LAYERS * (4 * h * h + 2 * h * FFN_MULT * h) + h * v
    return 3 * (2 * weights + LAYERS * 2 * s * h)


if __name__ == "__main__":  # quick CPU smoke: python bench/gpt_baseline.py
    from megatron_blackmamba.config import load_config
    from megatron_blackmamba.parallel.setup import destroy, init_distributed

    job = load_config(
        None, ["model.vocab_size=512", "model.hidden_size=128", "training.seq_length=32"]
    )
    init_distributed(job.parallel, 0)
    model = build_gpt(job)
    tokens = torch.randint(0, 512, (2, 32))
    loss = model(tokens, torch.arange(32).expand(2, 32), None, labels=tokens)
    loss.float().mean().backward()
    print("gpt baseline ok, loss", float(loss.float().mean()))
    destroy()
