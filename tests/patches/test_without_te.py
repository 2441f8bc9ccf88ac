"""megatron's GroupedMLP on torch._grouped_mm where the grouped_gemm package is missing."""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_blackmamba import patches
from megatron_blackmamba.config import load_config
from megatron_blackmamba.model.builder import transformer_config


def _experts(grouped: bool, num_experts: int, hidden: int, ffn: int):
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP

    job = load_config(
        None,
        [
            f"model.hidden_size={hidden}",
            f"model.ffn_hidden_size={ffn}",
            f"model.num_experts={num_experts}",
            "model.activation=geglu",
            "training.precision=bf16",
        ],
    )
    config = transformer_config(job)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    if grouped:
        return GroupedMLP(num_experts, config, pg_collection=pgs)
    spec = get_moe_module_spec_for_backend(
        LocalSpecProvider(), num_experts=num_experts, moe_grouped_gemm=False
    )
    return SequentialMLP(num_experts, config, spec.submodules.experts.submodules, pg_collection=pgs)


def test_grouped_mlp_on_gmm_matches_sequential_mlp_and_float64(single_rank):
    """megatron's GroupedMLP (bf16 only) through kernels/grouped_gemm vs SequentialMLP, same
    weights."""
    patches.apply()
    E, h, f, T = 4, 32, 48, 40
    seq, grp = _experts(False, E, h, f), _experts(True, E, h, f)
    with (
        torch.no_grad()
    ):  # GroupedMLP stores expert e's fc1 as weight1.view(E, h, 2f)[e] = fc1.weight.T
        grp.weight1.view(E, h, 2 * f).copy_(
            torch.stack([e.linear_fc1.weight.t() for e in seq.local_experts])
        )
        grp.weight2.view(E, f, h).copy_(
            torch.stack([e.linear_fc2.weight.t() for e in seq.local_experts])
        )
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, h, generator=g).bfloat16()
    probs = torch.rand(T, generator=g)
    x, probs = (
        x.to(grp.weight1.device),
        probs.to(grp.weight1.device),
    )  # weights are on the GPU when there is one
    sizes = torch.tensor([12, 0, 20, 8])

    def ref64() -> torch.Tensor:
        out = []
        for e, rows in enumerate(torch.split(x.double(), sizes.tolist())):
            w1, w2 = (
                seq.local_experts[e].linear_fc1.weight.double(),
                seq.local_experts[e].linear_fc2.weight.double(),
            )
            gate, up = (rows @ w1.t()).chunk(2, dim=-1)
            out.append((torch.nn.functional.gelu(gate) * up) @ w2.t())
        return torch.cat(out) * probs.double()[:, None]

    want = ref64()
    got_seq, _ = seq(x, sizes, probs)
    got_grp, _ = grp(x, sizes, probs)
    for got in (got_seq, got_grp):
        assert torch.linalg.norm(got.double() - want) <= 2e-2 * torch.linalg.norm(want)
    assert torch.linalg.norm(got_grp.double() - got_seq.double()) <= 2e-2 * torch.linalg.norm(want)
