"""One config object for a whole job: model, parallelism, training, data, checkpoints, logging.

Configs are plain YAML files whose top-level keys are the sections below; any field can be
overridden on the command line as ``section.field=value`` (the value is parsed as YAML, so
``training.lr=3e-4`` and ``parallel.tp=2`` do what they look like). Every field has a default and
a one-line help string, which ``python -m megatron_blackmamba.train --help-config`` prints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    vocab_size: int = opt(50304, "vocabulary size, padded to a multiple of 128 (GPT-NeoX: 50277 -> 50304)")
    hidden_size: int = opt(1152, "model width d_model")
    num_layers: int = opt(30, "total layers: Mamba + MoE (the paper's 30 = 15 Mamba + 15 MoE)")
    layer_pattern: str = opt("", "megatron hybrid pattern, 'M' Mamba / 'E' MoE; empty = 'ME' repeated")
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
    activation: str = opt("gelu", "expert MLP activation: gelu | swiglu | geglu (gelu-gated, as Zyphra's released code runs)")
    add_bias_linear: bool = opt(False, "biases on linear layers (experts, router, mamba projections)")
    router_bias: bool = opt(False, "bias on the router logits even without add_bias_linear (Zyphra's released models)")
    routing: str = opt("sinkhorn", "router balancing: sinkhorn (paper) | aux_loss | none")
    sinkhorn_init: str = opt("paper", "sinkhorn start point: paper (one-iteration init) | uniform")
    sinkhorn_temperature: float = opt(2.0, "cost = exp(temperature * logits) inside sinkhorn")
    sinkhorn_tol: float = opt(1e-4, "sinkhorn stops when max_i |T * rowsum_i - 1| < tol (max relative token-marginal error)")
    sinkhorn_max_iters: int = opt(20, "hard cap on sinkhorn iterations")
    aux_loss_coeff: float = opt(0.0, "load-balancing loss weight when routing=aux_loss")
    moe_grouped_gemm: bool = opt(False, "use megatron's GroupedMLP (needs grouped_gemm / TE on CUDA)")
    fused_glu: bool = opt(True, "grouped experts' gated activation as Triton kernels on GPUs (false: megatron's)")
    fused_cross_entropy: bool = opt(True, "LM loss in one pass each way, no fp32 logits copy (false: megatron's)")
    norm_epsilon: float = opt(1e-5, "epsilon of every norm (RMSNorm, and the final LayerNorm when chosen)")
    final_norm: str = opt("rmsnorm", "norm before the output layer: rmsnorm | layernorm (with bias, as in Zyphra's released models)")
    tie_embeddings: bool = opt(True, "share input embedding and output layer weights")
    init_method_std: float = opt(0.02, "std of the normal init for linear weights")
    max_seq_length: int = opt(2048, "longest training sequence")

    def resolved_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.hidden_size / 16)

    def resolved_ffn_hidden_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def resolved_layer_pattern(self) -> str:
        pattern = self.layer_pattern or ("ME" * (self.num_layers // 2) + "M" * (self.num_layers % 2))
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
    sequence_parallel: bool = opt(False, "megatron sequence parallelism; always on when tp > 1 (megatron MoE needs it)")
    moe_dispatcher: str = opt(
        "auto", "token dispatcher: auto | local | allgather | alltoall (auto: local, sync-free, when ep=tp=1; "
        "else alltoall on CUDA, allgather on CPU)")
    distributed_optimizer: bool = opt(True, "shard optimizer state across data-parallel ranks")
    backend: str = opt("auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo")


    def resolved_etp(self) -> int:
        etp = self.etp or self.tp
        if self.ep == 1 and etp != self.tp:
            # megatron only treats expert weights as expert-parallel params when ep > 1; with
            # ep == 1 their grads are reduced like dense ones, which is wrong unless etp == tp.
            raise ValueError(f"parallel.etp={self.etp} needs parallel.ep > 1; with ep=1 leave etp=0 (= tp)")
        return etp


@dataclass
class TrainingConfig:
    seq_length: int = opt(2048, "tokens per training sequence")
    micro_batch_size: int = opt(1, "sequences per micro-batch per data-parallel rank")
    global_batch_size: int = opt(512, "sequences per optimizer step across all ranks")
    train_iters: int = opt(0, "optimizer steps; 0 = derive from train_tokens")
    train_tokens: float = opt(300e9, "token budget when train_iters is 0")
    lr: float = opt(2e-4, "peak learning rate")
    min_lr: float = opt(2e-5, "learning rate at the end of cosine decay")
    warmup_iters: int = opt(2000, "linear warmup steps")
    lr_decay_style: str = opt("cosine", "decay after warmup: cosine | linear | constant")
    weight_decay: float = opt(0.1, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.95, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    clip_grad: float = opt(1.0, "global gradient-norm clip")
    fused_wgrad_accumulation: bool = opt(True, "grouped experts' weight grads summed into fp32 main grads in the GEMM (false: DDP adds bf16 grads)")
    cuda_graphs: bool = opt(False, "training: replay each layer's forward and backward from CUDA graphs (megatron's local impl), so the host's launch cost no longer bounds small micro-batches; CUDA only")
    cuda_graph_layers: str = opt("all", "with cuda_graphs: all (MoE layers too, where they are graph-safe; else Mamba only, logged) | mamba")
    precision: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32")
    seed: int = opt(1234, "random seed for init, data order and dropout")
    eval_interval: int = opt(1000, "steps between validation runs; 0 disables")
    eval_iters: int = opt(10, "micro-batches per validation run")
    log_interval: int = opt(10, "steps between log lines")
    stop_after: int = opt(0, "save and exit after this many steps in this invocation (time-sliced jobs); 0 = run to the end")

    def resolved_train_iters(self) -> int:
        if self.train_iters:
            return self.train_iters
        return math.ceil(self.train_tokens / (self.global_batch_size * self.seq_length))


@dataclass
class DataConfig:
    blend: str = opt("sample", "blend file from data_prep ('w prefix w prefix ...'), or 'sample' or 'mock'")
    valid_blend: str = opt("", "separate validation blend; empty = split train blend")
    split: str = opt("969,30,1", "train,valid,test split of each prefix when valid_blend is empty")
    tokenizer: str = opt("", "path to tokenizer.json; empty with blend=sample = bundled tokenizer")
    cache_dir: str = opt("data/cache", "where sample data and dataset index caches are built")
    num_workers: int = opt(1, "DataLoader worker processes")


@dataclass
class CheckpointConfig:
    save: str = opt("", "directory for checkpoints; empty disables saving")
    load: str = opt("", "directory to resume from; empty = same as save")
    save_interval: int = opt(1000, "steps between checkpoints")
    keep_last: int = opt(3, "checkpoints kept; older ones are deleted after a save commits")
    finetune: bool = opt(False, "load weights only, reset optimizer, scheduler and step")


@dataclass
class LoggingConfig:
    tensorboard_dir: str = opt("", "tensorboard event dir; empty disables")
    wandb_project: str = opt("", "wandb project; empty disables wandb")
    wandb_mode: str = opt("offline", "wandb mode: offline (no network) | online | disabled")
    wandb_dir: str = opt("", "wandb run dir; empty = <checkpoint.save or runs>/wandb")
    run_name: str = opt("blackmamba", "run name for loggers")
    progress_bar: bool = opt(True, "tqdm progress bar on rank 0")
    metrics_jsonl: str = opt("", "append one JSON line of metrics per step to this file (rank 0); empty disables")
    verbose: bool = opt(False, "show megatron-core's INFO logs (dataset, DDP bucket details)")
    expert_load_interval: int = opt(0, "steps between per-layer expert-load logs; 0 = log_interval")
    peak_tflops: float = opt(0.0, "per-device peak for MFU; 0 = GPU datasheet by name, or measured GEMM on CPU")


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


def _apply(section_obj: Any, values: dict, where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown field {key!r}; valid fields: {', '.join(sorted(fields))}")
        current = getattr(section_obj, key)
        if isinstance(current, bool) and not isinstance(value, bool):
            raise ValueError(f"{where}.{key}: expected true/false, got {value!r}")
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{where}.{key}: expected an integer, got {value!r}")
            value = int(value)
        if type(current) is not type(value):
            raise ValueError(f"{where}.{key}: expected {type(current).__name__}, got {value!r}")
        setattr(section_obj, key, value)


def apply_dict(cfg: JobConfig, values: dict, where: str) -> JobConfig:
    for section, body in values.items():
        if not hasattr(cfg, section) or not dataclasses.is_dataclass(getattr(cfg, section)):
            names = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise ValueError(f"{where}: unknown section {section!r}; valid sections: {names}")
        if not isinstance(body, dict):
            raise ValueError(f"{where}: section {section!r} must be a mapping, got {body!r}")
        _apply(getattr(cfg, section), body, f"{where}: {section}")
    return cfg


def parse_override(text: str) -> dict:
    """'training.lr=3e-4' -> {'training': {'lr': 0.0003}}."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"override {text!r} must look like section.field=value (e.g. parallel.tp=2)")
    key, raw = text.split("=", 1)
    section, name = key.split(".", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)
    return {section: {name: value}}


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Defaults, then the YAML file, then command-line overrides (last wins)."""
    cfg = JobConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found; configs/ lists the shipped ones")
        with path.open() as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections")
        apply_dict(cfg, _float_strings(raw), str(path))
    for text in overrides:
        apply_dict(cfg, parse_override(text), f"override {text!r}")
    cfg.model.resolved_layer_pattern()
    return cfg


def _float_strings(raw: dict) -> dict:
    """YAML 1.1 reads '3e-4' as a string; treat numeric-looking strings as floats."""
    out = {}
    for section, body in raw.items():
        if isinstance(body, dict):
            body = {k: float(v) if isinstance(v, str) and _looks_like_float(v) else v for k, v in body.items()}
        out[section] = body
    return out


def describe() -> str:
    """Every field with its default and help text, for --help-config."""
    lines = []
    for section in dataclasses.fields(JobConfig):
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(section.default_factory()):
            default = getattr(section.default_factory(), f.name)
            lines.append(f"  {section.name}.{f.name} = {default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
