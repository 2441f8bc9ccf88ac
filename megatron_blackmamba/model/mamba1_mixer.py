"""Mamba-1 selective-SSM mixer as a megatron-core module (megatron ships only Mamba-2).

Layout follows state-spaces/mamba's ``Mamba`` block: in_proj -> (x, z); depthwise causal conv on
x; x_proj -> (dt, B, C); dt_proj; selective scan with SiLU(z) gating; out_proj.

Tensor parallelism splits d_inner across ranks. Everything per-channel (conv, dt_proj rows, A_log,
D) is sharded the same way, so the scan runs locally per rank. The one cross-channel op is x_proj:
it reads all d_inner channels to produce the shared (dt, B, C), so each rank multiplies its
channel slice and the partial products are all-reduced (``TPReducedLinear``). dt_proj then fans the
replicated dt back out to the local channels (column-parallel, whose backward all-reduces grad(dt)).

Checkpoints store in_proj as two logical tensors ``in_proj.weight.x`` / ``.z``, so a checkpoint
saved at one TP size loads at another (each rank's local in_proj rows are [x_r; z_r], which is not
a contiguous slice of [x; z]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from torch import nn

from megatron_blackmamba import kernels
from megatron_blackmamba.model.channels_major import (
    channels_major_linear,
    linear_from_sequence_major,
    linear_to_sequence_major,
)
from megatron_blackmamba.model.recurrent_state import RecurrentState
from megatron_blackmamba.model.sharding import split_into_logical_parts


@dataclass
class Mamba1MixerSubmodules:
    in_proj: Union[ModuleSpec, type, None] = None  # column-parallel: d_model -> [x; z]
    dt_proj: Union[ModuleSpec, type, None] = None  # column-parallel: dt_rank -> d_inner
    out_proj: Union[ModuleSpec, type, None] = None  # row-parallel: d_inner -> d_model


def _mark_tp_sharded(param: nn.Parameter, partition_dim: int) -> None:
    """Tell megatron (grad-norm, optimizer, checkpoint helpers) this tensor is split across TP."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1


class TPReducedLinear(nn.Module):
    """y = x_local @ W_local^T, summed over TP ranks: a linear whose *input* dim is TP-sharded.

    Unlike megatron's RowParallelLinear this always all-reduces (never reduce-scatters under
    sequence parallelism), because every rank needs the full (dt, B, C) for all tokens.
    """

    def __init__(self, in_features_local: int, out_features: int, tp_group, dtype: torch.dtype):
        super().__init__()
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.empty(out_features, in_features_local, dtype=dtype))
        _mark_tp_sharded(self.weight, partition_dim=1)

    def channels_major(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, in_local, s] -> [b, out, s]."""
        return self._sum_over_tp(channels_major_linear(self.weight, x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_local] -> [..., out] (token-major: the decode step)."""
        return self._sum_over_tp(F.linear(x, self.weight))

    def _sum_over_tp(self, partial: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size() == 1:
            return partial
        return reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)


class Mamba1Mixer(MegatronModule):
    """Mamba-1 mixer: [s, b, h] -> ([s, b, h], out_proj bias or None)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Mamba1MixerSubmodules,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        pp_layer_offset: int = 0,
    ) -> None:
        super().__init__(config)
        assert pg_collection is not None, "Mamba1Mixer needs the model's process groups"
        self.tp_group = pg_collection.tp
        tp_size = self.tp_group.size()
        self.layer_number = layer_number
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        if self.d_inner % tp_size:
            raise ValueError(
                f"d_inner={self.d_inner} must divide by tensor-parallel size {tp_size}"
            )
        self.d_inner_local = self.d_inner // tp_size
        dtype = config.params_dtype

        self.in_proj = build_module(
            submodules.in_proj,
            d_model,
            2 * self.d_inner,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=self.tp_group,
        )

        with get_cuda_rng_tracker().fork():
            self.conv1d = nn.Conv1d(
                self.d_inner_local,
                self.d_inner_local,
                kernel_size=d_conv,
                groups=self.d_inner_local,
                bias=conv_bias,
                padding=d_conv - 1,
                dtype=dtype,
            )
        for p in self.conv1d.parameters():
            _mark_tp_sharded(p, partition_dim=0)

        self.x_proj = TPReducedLinear(
            self.d_inner_local, self.dt_rank + 2 * d_state, self.tp_group, dtype
        )
        with get_cuda_rng_tracker().fork():
            nn.init.kaiming_uniform_(self.x_proj.weight, a=math.sqrt(5))

        dt_std = self.dt_rank**-0.5
        self.dt_proj = build_module(
            submodules.dt_proj,
            self.dt_rank,
            self.d_inner,
            config=config,
            init_method=lambda w: nn.init.uniform_(w, -dt_std, dt_std),
            gather_output=False,
            bias=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name=None,
            tp_group=self.tp_group,
        )
        with torch.no_grad(), get_cuda_rng_tracker().fork():
            # softplus(bias) log-uniform in [dt_min, dt_max]: Mamba-1's dt initialisation. Drawn on
            # the CPU explicitly, so a meta-device build (param_count) can copy it to a GPU bias.
            u = torch.rand(self.d_inner_local, device="cpu")
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(
                min=dt_init_floor
            )
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

        # S4D-real init, kept in fp32: A = -[1..N] for every channel.
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner_local, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(self.d_inner_local, dtype=torch.float32))
        for p in (self.A_log, self.D):
            _mark_tp_sharded(p, partition_dim=0)
            p._no_weight_decay = True

        self.out_proj = build_module(
            submodules.out_proj,
            self.d_inner,
            d_model,
            config=config,
            init_method=config.output_layer_init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=self.tp_group,
        )

    # ------------------------------------------------------------------ forward
    # The scan and conv kernels want channels-major [b, d, s] tensors with the sequence
    # contiguous, while megatron's stack passes [s, b, h]. Running the projections as batched
    # GEMMs whose *outputs* are channels-major (as mamba-ssm's mamba_inner_fn does) avoids
    # transposing the wide d_inner activations, and the [s, b, h] ends are strided GEMM operands
    # and results (model/channels_major.py), so nothing is transposed in memory.
    # megatron's linear modules still own the weights, their init and TP metadata; their
    # communication (sequence-parallel gather / reduce-scatter, TP copy / all-reduce) is applied
    # here with the same megatron primitives they use.
    def forward(
        self,
        hidden_states: torch.Tensor,
        inference_context: Optional[RecurrentState] = None,
        **unused,
    ):
        """hidden_states [s, b, h]; with a RecurrentState, runs prefill (offset 0), a chunk that
        continues from the carried state (offset > 0, s > 1: rolling evaluation of long documents)
        or a single-token decode step."""
        carried = (
            isinstance(inference_context, RecurrentState) and inference_context.seqlen_offset > 0
        )
        if carried and hidden_states.shape[0] == 1:
            return self._decode(hidden_states, inference_context)

        x, z = self._in_proj(hidden_states)  # [b, d_local, s] each

        state, initial_state, history = None, None, 0
        if isinstance(inference_context, RecurrentState):
            state = inference_context.layer_state(self, batch_size=x.shape[0], dtype=x.dtype)
            if (
                carried
            ):  # the conv sees the previous chunk's last inputs; the scan starts from its state
                history = self.d_conv - 1
                x = torch.cat([state.conv[..., 1:], x], dim=-1)
                initial_state = state.ssm.clone()
            keep = min(self.d_conv, x.shape[-1])
            state.conv.zero_()
            state.conv[..., -keep:] = x[..., -keep:]

        x = kernels.causal_conv1d(
            x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu"
        )
        x = x[..., history:]
        dt, B, C = self._project_dt_B_C(x)
        A, D, dt_bias = self._scan_constants()
        y = kernels.selective_scan(
            x,
            dt,
            A,
            B,
            C,
            D,
            z=z,
            delta_bias=dt_bias,
            delta_softplus=True,
            return_last_state=state is not None,
            **({"initial_state": initial_state} if initial_state is not None else {}),
        )
        if state is not None:
            y, last = y
            state.ssm.copy_(last)
        return self._out_proj(y)

    def _in_proj(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[s, b, h] (sequence-parallel shard under SP) -> x, z [b, d_local, s_full], sequence
        contiguous.

        Two GEMMs on in_proj's [x_r; z_r] row blocks rather than one split afterwards: the backward
        then sums their input gradients in the GEMMs instead of concatenating grad x and grad z."""
        proj = self.in_proj
        x, z = linear_from_sequence_major(proj.weight, self._in_proj_input(hidden_states), parts=2)
        if getattr(proj, "bias", None) is not None and not getattr(proj, "skip_bias_add", False):
            bias_x, bias_z = proj.bias.chunk(2)
            x, z = x + bias_x[:, None], z + bias_z[:, None]
        return x, z

    def _in_proj_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """in_proj's input across TP: gathered over the sequence under SP, else copied into the
        TP region (identity forward, all-reduced gradient)."""
        if getattr(self.in_proj, "sequence_parallel", self.config.sequence_parallel):
            return gather_from_sequence_parallel_region(hidden_states, group=self.tp_group)
        if self.tp_group.size() > 1:
            return copy_to_tensor_model_parallel_region(hidden_states, group=self.tp_group)
        return hidden_states

    def _out_proj_reduce(self, out: torch.Tensor) -> torch.Tensor:
        """out_proj's partial sums [s, b, h] summed over TP (reduce-scattered under SP)."""
        if getattr(self.out_proj, "sequence_parallel", self.config.sequence_parallel):
            return reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
        if self.tp_group.size() > 1:
            return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out

    def _out_proj(self, y: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """y [b, d_local, s] -> ([s, b, h] summed over TP (reduce-scattered under SP), bias or
        None)."""
        proj = self.out_proj
        # The GEMM writes [s, b, h] itself and its backward hands the scan a contiguous dy: no
        # transposing copy either way (model/channels_major.py; bench/PERF_NOTES.md).
        out = linear_to_sequence_major(proj.weight, y)
        return self._out_proj_reduce(out), getattr(proj, "bias", None)

    def _project_dt_B_C(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [b, d_local, s] -> dt [b, d_local, s] (pre-bias), B and C [b, N, s], replicated over
        TP.

        Backward: every rank's channels consume the shared B and C, so their gradients are
        partial sums that copy_to_tensor_model_parallel_region all-reduces; so is dt's, which
        fans out to this rank's channels through dt_proj (column-parallel on a replicated input).
        """
        x_dbl = self.x_proj.channels_major(x)  # summed over TP
        dt, BC = torch.split(x_dbl, [self.dt_rank, 2 * self.d_state], dim=1)
        if self.tp_group.size() > 1:
            BC = copy_to_tensor_model_parallel_region(BC, group=self.tp_group)
            dt = copy_to_tensor_model_parallel_region(dt, group=self.tp_group)
        B, C = BC.chunk(2, dim=1)
        dt = channels_major_linear(self.dt_proj.weight, dt)  # bias goes into the scan's softplus
        return dt, B, C

    def _decode(self, hidden_states: torch.Tensor, ctx: RecurrentState):
        """One token per sequence: O(1) work and memory in the context length.

        Token-major [b, .] GEMMs throughout: each weight is read once per step for the whole
        batch (the sequence path's channels-major batched GEMMs would read it once per sequence,
        and in_proj would take two of them). Decode runs without autograd, so dt, B and C skip
        the TP region copies (identity forward, they only all-reduce gradients)."""
        assert hidden_states.shape[0] == 1, "decode steps take one token at a time"
        proj = self.in_proj
        xz = F.linear(
            self._in_proj_input(hidden_states)[0], proj.weight, getattr(proj, "bias", None)
        )
        x, z = xz.chunk(2, dim=-1)  # [b, d_local] each (in_proj's rows are [x_r; z_r])
        state = ctx.layer_state(self, batch_size=x.shape[0], dtype=x.dtype)
        A, D, dt_bias = ctx.derived(self, self._scan_constants)
        x = kernels.causal_conv1d_update(
            x, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu"
        )
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = kernels.selective_state_update(
            state.ssm,
            x,
            F.linear(dt, self.dt_proj.weight),
            A,
            B,
            C,
            D,
            z=z,
            dt_bias=dt_bias,
            dt_softplus=True,
        )
        out = self._out_proj_reduce(F.linear(y, self.out_proj.weight).unsqueeze(0))
        return out, getattr(self.out_proj, "bias", None)

    def _scan_constants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The scan's fp32 (A = -exp(A_log) [d_local, N], D [d_local], dt bias [d_local])."""
        return -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float()

    def state_shapes(self, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(conv_state, ssm_state) shapes for this rank: constant in the context length."""
        return (batch_size, self.d_inner_local, self.d_conv), (
            batch_size,
            self.d_inner_local,
            self.d_state,
        )

    # ------------------------------------------------------------ checkpoints
    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own: dict = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            own,
            prefix,
            {"A_log": 0, "D": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        axis_maps = {"conv1d": {"weight": 0, "bias": 0}, "x_proj": {"weight": 1}}
        for name, module in self.named_children():
            if name in axis_maps:
                sharded.update(
                    make_sharded_tensors_for_checkpoint(
                        module.state_dict(prefix="", keep_vars=True),
                        f"{prefix}{name}.",
                        axis_maps[name],
                        sharded_offsets,
                        tp_group=self.tp_group,
                        dp_cp_group=metadata["dp_cp_group"],
                    )
                )
            else:
                sharded.update(
                    sharded_state_dict_default(
                        module,
                        f"{prefix}{name}.",
                        sharded_offsets,
                        metadata,
                        tp_group=self.tp_group,
                    )
                )
        for key in ("weight", "bias"):
            full = f"{prefix}in_proj.{key}"
            if full in sharded:
                sharded[full] = split_into_logical_parts(
                    sharded[full], [self.d_inner_local, self.d_inner_local], ["x", "z"]
                )
        return sharded
