"""Zyphra's BlackMamba checkpoint layout and forward pass, written independently in plain PyTorch.

Everything here follows Zyphra's released inference code (github.com/Zyphra/BlackMamba:
mamba_model.py, mamba_block.py, mamba_layer.py, switch_mlp.py, mlp.py), not this project's model:
names and shapes of ``pytorch_model.bin``, pre-norm blocks that carry ``residual = hidden +
residual`` across layers, an RMSNorm per block and a biased final LayerNorm, the Mamba-1 mixer with
a plain sequential selective scan, and the eval-mode switch MoE (sigmoid gate, argmax expert,
expert output scaled by the gate). ``glu_activation`` is the gate function of ``swiglu: true``
(Zyphra's code: GELU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

EPS = 1e-5


def tiny_config(**changes) -> dict:
    cfg = {
        "num_layers": 4,
        "hidden_size": 32,
        "state_size": 4,
        "conv_dimension": 4,
        "vocab_size": 96,
        "expansion_factor": 2,
        "mamba_moe_layers": ["r", "8", "r", "8"],
        "ffn_hidden_size": 48,
        "add_bias_linear": False,
        "swiglu": True,
        "max_sequence_length": 64,
    }
    cfg.update(changes)
    return cfg


def zyphra_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, n, w = cfg["hidden_size"], cfg["state_size"], cfg["conv_dimension"]
    d, r, f = cfg["expansion_factor"] * h, math.ceil(h / 16), cfg["ffn_hidden_size"]
    shapes = {"embedding.word_embeddings.weight": (cfg["vocab_size"], h)}
    for i, code in enumerate(cfg["mamba_moe_layers"]):
        p = f"decoder.layers.{i}."
        shapes[p + "norm.weight"] = (h,)
        if code == "r":
            shapes.update(
                {
                    p + "mixer.in_proj.weight": (2 * d, h),
                    p + "mixer.conv1d.weight": (d, 1, w),
                    p + "mixer.conv1d.bias": (d,),
                    p + "mixer.x_proj.weight": (r + 2 * n, d),
                    p + "mixer.dt_proj.weight": (d, r),
                    p + "mixer.dt_proj.bias": (d,),
                    p + "mixer.A_log": (d, n),
                    p + "mixer.D": (d,),
                    p + "mixer.out_proj.weight": (h, d),
                }
            )
        else:
            experts = int(code[-1])
            shapes[p + "mixer.router.weight"] = (experts, h)
            shapes[p + "mixer.router.bias"] = (experts,)
            for e in range(experts):
                shapes[p + f"mixer.local_experts.{e}.linear_fc1.weight"] = (
                    (2 if cfg["swiglu"] else 1) * f,
                    h,
                )
                shapes[p + f"mixer.local_experts.{e}.linear_fc2.weight"] = (h, f)
    shapes["decoder.final_layernorm.weight"] = (h,)
    shapes["decoder.final_layernorm.bias"] = (h,)
    return shapes


def random_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights at scales that keep activations O(1) and spread tokens over the experts."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in zyphra_shapes(cfg).items():
        noise = torch.randn(shape, generator=g)
        if name.endswith("A_log"):
            value = torch.log(torch.arange(1, shape[1] + 1).float()).expand(shape) + 0.1 * noise
        elif name.endswith("dt_proj.bias"):
            value = -3.0 + 0.5 * noise  # softplus -> dt around 0.05
        elif name.endswith(("norm.weight", "layernorm.weight", "mixer.D")):
            value = 1.0 + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        else:  # linear (out, in) and conv (d, 1, width) weights: fan-in is the last dim
            value = noise / math.sqrt(shape[-1])
        state[name] = value.contiguous()
    return state


def write_checkpoint(directory: Path, cfg: dict, state: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS) * weight


def _mamba(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: dict) -> torch.Tensor:
    """Mamba-1 mixer on x [b, l, h] with the sequential selective scan."""
    seqlen, n = x.shape[1], cfg["state_size"]
    r = math.ceil(cfg["hidden_size"] / 16)
    xs, z = (x @ w["in_proj.weight"].T).chunk(2, dim=-1)  # [b, l, d] each
    width = w["conv1d.weight"].shape[-1]
    padded = F.pad(xs.transpose(1, 2), (width - 1, 0))  # [b, d, l + w - 1]
    conv = sum(
        padded[..., k : k + seqlen] * w["conv1d.weight"][:, 0, k : k + 1] for k in range(width)
    )
    xs = F.silu(conv + w["conv1d.bias"][:, None]).transpose(1, 2)  # [b, l, d]
    dt, B, C = torch.split(xs @ w["x_proj.weight"].T, [r, n, n], dim=-1)
    dt = F.softplus(dt @ w["dt_proj.weight"].T + w["dt_proj.bias"])  # [b, l, d]
    A = -torch.exp(w["A_log"])  # [d, n]
    h = x.new_zeros(x.shape[0], A.shape[0], n)
    ys = []
    for t in range(seqlen):
        h = (
            torch.exp(dt[:, t, :, None] * A) * h
            + (dt[:, t] * xs[:, t])[..., None] * B[:, t, None, :]
        )
        ys.append((h * C[:, t, None, :]).sum(-1) + w["D"] * xs[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return y @ w["out_proj.weight"].T


def _switch_moe(
    x: torch.Tensor, w: dict[str, torch.Tensor], cfg: dict, glu: str, used: list
) -> torch.Tensor:
    """Top-1 switch MoE in eval: sigmoid gate, argmax expert, output scaled by the gate value."""
    flat = x.reshape(-1, x.shape[-1])
    gate, expert = torch.sigmoid(flat @ w["router.weight"].T + w["router.bias"]).max(dim=-1)
    used.append(expert.unique().numel())
    out = torch.zeros_like(flat)
    act = {"gelu": F.gelu, "silu": F.silu}[glu]
    for e in range(w["router.weight"].shape[0]):
        rows = expert == e
        hidden = flat[rows] @ w[f"local_experts.{e}.linear_fc1.weight"].T
        if cfg["swiglu"]:
            a, b = hidden.chunk(2, dim=-1)
            hidden = act(a) * b
        else:
            hidden = F.gelu(hidden)
        out[rows] = hidden @ w[f"local_experts.{e}.linear_fc2.weight"].T
    return (out * gate[:, None]).reshape(x.shape)


def reference_logits(
    cfg: dict,
    state: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    glu: str = "gelu",
    experts_used: list | None = None,
) -> torch.Tensor:
    """logits [b, l, V] in float64 for tokens [b, l]."""
    sd = {k: v.double() for k, v in state.items()}
    used = experts_used if experts_used is not None else []
    embedding = sd["embedding.word_embeddings.weight"]
    hidden, residual = embedding[tokens], None
    for i, code in enumerate(cfg["mamba_moe_layers"]):
        p = f"decoder.layers.{i}."
        layer = {
            k[len(p) + len("mixer.") :]: v for k, v in sd.items() if k.startswith(p + "mixer.")
        }
        residual = hidden if residual is None else hidden + residual
        normed = _rms_norm(residual, sd[p + "norm.weight"])
        hidden = (
            _mamba(normed, layer, cfg)
            if code == "r"
            else _switch_moe(normed, layer, cfg, glu, used)
        )
    residual = hidden + residual
    out = F.layer_norm(
        residual,
        residual.shape[-1:],
        sd["decoder.final_layernorm.weight"],
        sd["decoder.final_layernorm.bias"],
        eps=EPS,
    )
    return out @ embedding.T
