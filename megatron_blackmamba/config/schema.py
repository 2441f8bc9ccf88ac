"""The fields of a job: one dataclass per section, each field with its type, default and help.

The annotations are the schema: ``Literal[...]`` fields accept only the listed values,
``Optional[...]`` fields also take ``null`` (empty strings mean the same for optional paths), and
the loader (``config.loader``) parses every value by its field's type, so a bad value fails when
the config is read, not hours into a job.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


def opt(default: Any, help: str) -> Any:
    """A dataclass field carrying its one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


Activation = Literal["gelu", "swiglu", "geglu"]
Routing = Literal["sinkhorn", "aux_loss", "none"]
# What megatron-core 0.16.1's OptimizerParamScheduler implements.
DecayStyle = Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"]
WsdDecayStyle = Literal["linear", "cosine", "exponential", "minus_sqrt"]


@dataclass
class ModelConfig:
    vocab_size: int = opt(
        50304, "vocabulary size, padded to a multiple of 128 (GPT-NeoX: 50277 -> 50304)"
    )
    hidden_size: int = opt(1152, "model width d_model")
    num_layers: int = opt(30, "total layers: Mamba + MoE (the paper's 30 = 15 Mamba + 15 MoE)")
    layer_pattern: str = opt(
        "", "megatron hybrid pattern, 'M' Mamba / 'E' MoE; empty = 'ME' repeated"
    )
    d_state: int = opt(16, "SSM state size N per channel")
    d_conv: int = opt(4, "depthwise causal conv width")
    expand: int = opt(2, "d_inner = expand * hidden_size")
    dt_rank: int = opt(0, "rank of the dt projection; 0 = ceil(hidden_size / 16)")
    dt_min: float = opt(0.001, "lower end of the initial dt range (Mamba-1 dt init)")
    dt_max: float = opt(0.1, "upper end of the initial dt range")
    dt_init_floor: float = opt(1e-4, "floor applied to the sampled initial dt")
    num_experts: int = opt(8, "experts per MoE layer")
    moe_topk: int = opt(1, "experts per token (BlackMamba: 1)")
    ffn_hidden_size: int = opt(0, "expert MLP width; 0 = 4 * hidden_size")
    activation: Activation = opt(
        "gelu",
        "expert MLP activation: gelu | swiglu | geglu (gelu-gated, as Zyphra's released code runs)",
    )
    add_bias_linear: bool = opt(
        False, "biases on linear layers (experts, router, mamba projections)"
    )
    router_bias: bool = opt(
        False, "bias on the router logits even without add_bias_linear (Zyphra's released models)"
    )
    routing: Routing = opt("sinkhorn", "router balancing: sinkhorn (paper) | aux_loss | none")
    sinkhorn_init: Literal["paper", "uniform"] = opt(
        "paper", "sinkhorn start point: paper (one-iteration init) | uniform"
    )
    sinkhorn_temperature: float = opt(2.0, "cost = exp(temperature * logits) inside sinkhorn")
    sinkhorn_tol: float = opt(
        1e-4,
        "sinkhorn stops when max_i |T * rowsum_i - 1| < tol (max relative token-marginal error)",
    )
    sinkhorn_max_iters: int = opt(20, "hard cap on sinkhorn iterations")
    aux_loss_coeff: float = opt(0.0, "load-balancing loss weight when routing=aux_loss")
    moe_grouped_gemm: bool = opt(
        False, "use megatron's GroupedMLP (needs grouped_gemm / TE on CUDA)"
    )
    fused_glu: bool = opt(
        True, "grouped experts' gated activation as Triton kernels on GPUs (false: megatron's)"
    )
    fused_cross_entropy: bool = opt(
        True, "LM loss in one pass each way, no fp32 logits copy (false: megatron's)"
    )
    norm_epsilon: float = opt(
        1e-5, "epsilon of every norm (RMSNorm, and the final LayerNorm when chosen)"
    )
    final_norm: Literal["rmsnorm", "layernorm"] = opt(
        "rmsnorm",
        "norm before the output layer: rmsnorm | layernorm (with bias, as in Zyphra's released"
        " models)",
    )
    residual_in_fp32: bool = opt(
        False,
        "keep the residual stream between layers in fp32 (Zyphra's released models do); every"
        " norm still reads it in the model's dtype, so only the additions gain precision",
    )
    tie_embeddings: bool = opt(True, "share input embedding and output layer weights")
    init_method_std: float = opt(0.02, "std of the normal init for linear weights")
    max_seq_length: int = opt(
        2048,
        "sequence length the model is described with (Zyphra's max_sequence_length); not a limit:"
        " a Mamba stack has no positional embedding, so training.seq_length may exceed it",
    )

    def resolved_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.hidden_size / 16)

    def resolved_ffn_hidden_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def resolved_layer_pattern(self) -> str:
        pattern = self.layer_pattern or (
            "ME" * (self.num_layers // 2) + "M" * (self.num_layers % 2)
        )
        if len(pattern) != self.num_layers or set(pattern) - {"M", "E"}:
            raise ValueError(
                f"model.layer_pattern={pattern!r} must be {self.num_layers} characters of 'M'/'E' "
                "(model.num_layers); leave it empty for the alternating BlackMamba stack"
            )
        return pattern


@dataclass
class ParallelConfig:
    tp: int = opt(1, "tensor-parallel size (splits d_inner, expert FFN, vocab)")
    pp: int = opt(1, "pipeline-parallel size (splits the layer list)")
    ep: int = opt(1, "expert-parallel size (experts spread over ranks)")
    etp: int = opt(0, "expert tensor-parallel size; 0 = same as tp (required when ep == 1)")
    sequence_parallel: bool = opt(
        False, "megatron sequence parallelism; always on when tp > 1 (megatron MoE needs it)"
    )
    moe_dispatcher: Literal["auto", "local", "allgather", "alltoall"] = opt(
        "auto",
        "token dispatcher: auto | local | allgather | alltoall (auto: local, sync-free, when"
        " ep=tp=1; else alltoall on CUDA, allgather on CPU)",
    )
    moe_capacity_factor: Optional[float] = opt(
        None,
        "expert capacity factor: null = dropless; else each expert takes at most"
        " ceil(factor x tokens / experts) of a rank's tokens per MoE layer, the rest skip the"
        " experts (kept by the residual; the dropped fraction is logged), and the alltoall"
        " dispatcher pads every expert to that capacity (static shapes, no host sync)",
    )
    distributed_optimizer: bool = opt(True, "shard optimizer state across data-parallel ranks")
    backend: Literal["auto", "nccl", "gloo"] = opt(
        "auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo"
    )

    def resolved_etp(self) -> int:
        etp = self.etp or self.tp
        if self.ep == 1 and etp != self.tp:
            # megatron only treats expert weights as expert-parallel params when ep > 1; with
            # ep == 1 their grads are reduced like dense ones, which is wrong unless etp == tp.
            raise ValueError(
                f"parallel.etp={self.etp} needs parallel.ep > 1; with ep=1 leave etp=0 (= tp)"
            )
        return etp


@dataclass
class TrainingConfig:
    seq_length: int = opt(2048, "tokens per training sequence")
    micro_batch_size: int = opt(1, "sequences per micro-batch per data-parallel rank")
    global_batch_size: int = opt(512, "sequences per optimizer step across all ranks")
    train_iters: int = opt(0, "optimizer steps; 0 = derive from train_tokens")
    train_tokens: float = opt(300e9, "token budget when train_iters is 0")
    lr: float = opt(2e-4, "peak learning rate")
    min_lr: float = opt(2e-5, "learning rate at the end of the decay")
    warmup_iters: int = opt(2000, "linear warmup steps")
    lr_decay_style: DecayStyle = opt(
        "cosine", "decay after warmup: cosine | linear | constant | inverse-square-root | WSD"
    )
    lr_wsd_decay_iters: int = opt(
        0, "with lr_decay_style=WSD: steps of the final anneal (the rest is stable at lr)"
    )
    lr_wsd_decay_style: WsdDecayStyle = opt(
        "linear", "with lr_decay_style=WSD: shape of the anneal"
    )
    weight_decay: float = opt(0.1, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.95, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    clip_grad: float = opt(1.0, "global gradient-norm clip")
    fused_wgrad_accumulation: bool = opt(
        True,
        "grouped experts' weight grads summed into fp32 main grads in the GEMM (false: DDP adds"
        " bf16 grads)",
    )
    cuda_graphs: bool = opt(
        False,
        "training: replay each layer's forward and backward from CUDA graphs (megatron's local"
        " impl), so the host's launch cost no longer bounds small micro-batches; CUDA only",
    )
    cuda_graph_layers: Literal["all", "mamba"] = opt(
        "all",
        "with cuda_graphs: all (MoE layers too, where they are graph-safe; else Mamba only, logged)"
        " | mamba",
    )
    precision: Literal["auto", "bf16", "fp32"] = opt(
        "auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32"
    )
    fp8: Literal["none", "tensorwise", "rowwise"] = opt(
        "none",
        "experts' GEMMs and input gradients on fp8 operands with dynamic scales per tensor or per"
        " row (Hopper only; weights, main grads and optimizer unchanged) | none",
    )
    seed: int = opt(1234, "random seed for init, data order and dropout")
    eval_interval: int = opt(1000, "steps between validation runs; 0 disables")
    eval_iters: int = opt(10, "micro-batches per validation run")
    eval_tasks: list[str] = opt(
        [], "lm-eval tasks scored during training, e.g. [piqa, arc_easy] or [paper]; empty = none"
    )
    eval_tasks_interval: int = opt(0, "steps between downstream evaluations; 0 = eval_interval")
    eval_tasks_limit: float = opt(0.0, "examples per downstream task (a fraction if < 1); 0 = all")
    eval_tasks_include: Optional[str] = opt(
        None, "folder of extra lm-eval task YAMLs for eval_tasks"
    )
    log_interval: int = opt(10, "steps between log lines (tokens/s is averaged over them)")
    stop_after: int = opt(
        0,
        "save and exit after this many steps in this invocation (time-sliced jobs); 0 = run to"
        " the end",
    )

    def resolved_train_iters(self) -> int:
        if self.train_iters:
            return self.train_iters
        return math.ceil(self.train_tokens / (self.global_batch_size * self.seq_length))


@dataclass
class DataConfig:
    blend: str = opt(
        "sample",
        "blend file from megatron_blackmamba.data_prep ('w prefix w prefix ...'), or 'sample' or"
        " 'mock'",
    )
    valid_blend: Optional[str] = opt(
        None, "separate validation blend; null = split the train blend"
    )
    split: str = opt("969,30,1", "train,valid,test split of each prefix when valid_blend is null")
    tokenizer: Optional[str] = opt(
        None, "path to tokenizer.json; null with blend=sample = bundled tokenizer"
    )
    cache_dir: str = opt("data/cache", "where sample data and dataset index caches are built")
    num_workers: int = opt(1, "DataLoader worker processes")


@dataclass
class CheckpointConfig:
    save: Optional[str] = opt(None, "directory for checkpoints; null disables saving")
    load: Optional[str] = opt(None, "directory to resume from; null = same as save")
    save_interval: int = opt(1000, "steps between checkpoints")
    keep_last: int = opt(
        3, "checkpoints kept; older ones are deleted after a save commits; 0 keeps all"
    )
    finetune: bool = opt(False, "load weights only, reset optimizer, scheduler and step")


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = opt(None, "tensorboard event dir; null disables")
    wandb_project: Optional[str] = opt(None, "wandb project; null disables wandb")
    wandb_mode: Literal["offline", "online", "disabled"] = opt(
        "offline", "wandb mode: offline (no network) | online | disabled"
    )
    wandb_dir: Optional[str] = opt(None, "wandb run dir; null = <checkpoint.save or runs>/wandb")
    run_name: str = opt("blackmamba", "run name for loggers")
    progress_bar: bool = opt(True, "tqdm progress bar on rank 0")
    metrics_jsonl: Optional[str] = opt(
        None, "append one JSON line of metrics per step to this file (rank 0); null disables"
    )
    verbose: bool = opt(False, "show megatron-core's INFO logs (dataset, DDP bucket details)")
    all_ranks: bool = opt(
        False, "every rank logs at INFO (default: rank 0 only; other ranks warnings and errors)"
    )
    expert_load_interval: int = opt(0, "steps between per-layer expert-load logs; 0 = log_interval")
    peak_tflops: float = opt(
        0.0, "per-device peak for MFU; 0 = GPU datasheet by name, or measured GEMM on CPU"
    )


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
