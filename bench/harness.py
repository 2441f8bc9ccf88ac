"""What the GPU benchmarks share: the model variants they compare and one way to build and time
them.

A variant is a name, a scan backend and config overrides on top of the benchmark's base config:

  blackmamba-cuda   the model with the CUDA kernels (this project's scan where it builds, else
                    mamba-ssm's; causal-conv1d), experts one GEMM pair each
  blackmamba-grouped  the same with all experts in two grouped GEMMs (model.moe_grouped_gemm=true)
  blackmamba-eager  blackmamba-grouped without CUDA graphs for the Mamba layers
  (training.cuda_graphs=false;
                    the paper configs turn them on)
  blackmamba-mamba-ssm-scan  blackmamba-grouped with mamba-ssm's scan
  (BLACKMAMBA_SCAN_KERNEL=mamba_ssm)
  blackmamba-alltoall  blackmamba-grouped on megatron's alltoall dispatcher instead of the local one
  blackmamba-compiled-glu  blackmamba-grouped with megatron's torch.compile'd gated activation
  blackmamba-megatron-ce  blackmamba-grouped with megatron's cross-entropy (fp32 logits copy)
  blackmamba-unfused-wgrad  blackmamba-grouped with DDP adding bf16 expert weight gradients
  blackmamba-fp32-residual  blackmamba-grouped with the residual stream in fp32
                    (model.residual_in_fp32, as Zyphra's released models)
  blackmamba-fp8-rowwise, blackmamba-fp8-tensorwise  blackmamba-grouped with the experts' GEMMs
                    on fp8 operands (training.fp8, kernels/fp8.py)
  blackmamba-torch  the same model with the PyTorch scan and conv (BLACKMAMBA_KERNEL_BACKEND=torch)
  dense-mamba       an all-Mamba stack with about the same active parameters (no MoE)
  gpt-dense         megatron-core's GPTModel with about the same active parameters
  (bench/gpt_baseline.py)
  mamba-ssm-lm      mamba-ssm's own MambaLMHeadModel of dense-mamba's size in a plain PyTorch loop
                    (bench/mamba_ssm_peer.py): what a user would otherwise train

Every variant but mamba-ssm-lm trains through the project's own path (megatron DDP, optimizer,
pipeline schedule), so those numbers compare models, not training loops; mamba-ssm-lm compares
the whole system with its peer.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


@dataclass(frozen=True)
class Variant:
    kernels: str  # BLACKMAMBA_KERNEL_BACKEND
    overrides: tuple[str, ...] = ()
    scan: str = "auto"  # BLACKMAMBA_SCAN_KERNEL
    model: Literal["blackmamba", "gpt", "mamba-ssm"] = "blackmamba"  # what build_trainer builds


VARIANTS = {
    "blackmamba-cuda": Variant("cuda"),
    "blackmamba-grouped": Variant("cuda", ("model.moe_grouped_gemm=true",)),
    "blackmamba-eager": Variant(
        "cuda", ("model.moe_grouped_gemm=true", "training.cuda_graphs=false")
    ),
    # CUDA graphs for the Mamba layers only, the MoE layers eager.
    "blackmamba-graphed-mamba": Variant(
        "cuda", ("model.moe_grouped_gemm=true", "training.cuda_graph_layers=mamba")
    ),
    "blackmamba-mamba-ssm-scan": Variant(
        "cuda", ("model.moe_grouped_gemm=true",), scan="mamba_ssm"
    ),
    # megatron's alltoall dispatcher (a host sync per MoE layer) in place of the local one at ep=1.
    "blackmamba-alltoall": Variant(
        "cuda", ("model.moe_grouped_gemm=true", "parallel.moe_dispatcher=alltoall")
    ),
    # the experts' gated activation as megatron compiles it instead of kernels/glu.py's Triton
    # kernels.
    "blackmamba-compiled-glu": Variant(
        "cuda", ("model.moe_grouped_gemm=true", "model.fused_glu=false")
    ),
    # megatron's vocab-parallel cross-entropy instead of kernels/cross_entropy.py's.
    "blackmamba-megatron-ce": Variant(
        "cuda", ("model.moe_grouped_gemm=true", "model.fused_cross_entropy=false")
    ),
    # DDP adds bf16 expert weight gradients instead of the GEMMs summing into the fp32 main grads.
    "blackmamba-unfused-wgrad": Variant(
        "cuda", ("model.moe_grouped_gemm=true", "training.fused_wgrad_accumulation=false")
    ),
    "blackmamba-fp32-residual": Variant(
        "cuda", ("model.moe_grouped_gemm=true", "model.residual_in_fp32=true")
    ),
    "blackmamba-fp8-rowwise": Variant(
        "cuda", ("model.moe_grouped_gemm=true", "training.fp8=rowwise")
    ),
    "blackmamba-fp8-tensorwise": Variant(
        "cuda", ("model.moe_grouped_gemm=true", "training.fp8=tensorwise")
    ),
    "blackmamba-torch": Variant("torch"),
    # 34 Mamba layers at hidden 1152 ~ the 344M active of BlackMamba-340M/1.5B.
    "dense-mamba": Variant("cuda", ("model.layer_pattern=" + "M" * 34, "model.num_layers=34")),
    "gpt-dense": Variant("cuda", model="gpt"),
    "mamba-ssm-lm": Variant("cuda", model="mamba-ssm"),
}


def check_variants(names: list[str]) -> None:
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")


def synthetic_batches(vocab: int, mbs: int, seq: int, seed: int = 0) -> Iterator[dict]:
    """Random tokens (a fixed seed, so every variant sees the same stream), pinned as the training
    data loader pins them (training/data.py)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(mbs, seq),
        }
        yield {k: v.pin_memory() for k, v in batch.items()} if torch.cuda.is_available() else batch


@dataclass
class Trainer:
    """One variant, ready to step: ``step()`` runs one optimizer step and returns the loss."""

    name: str
    job: object
    model: list
    optimizer: object
    num_microbatches: int
    batches: Iterator[dict]
    flops_per_token: int

    def step(self) -> float:
        from megatron_blackmamba.training.step import train_step

        t = self.job.training
        loss, _, _ = train_step(
            self.model,
            self.optimizer,
            self.batches,
            self.num_microbatches,
            t.seq_length,
            t.micro_batch_size,
        )
        return loss

    @property
    def tokens_per_step(self) -> int:
        return self.job.training.global_batch_size * self.job.training.seq_length


def build_trainer(name: str, config: Optional[str], overrides: list[str]) -> Trainer:
    from megatron.core import parallel_state

    from megatron_blackmamba.config import load_config
    from megatron_blackmamba.parallel.setup import init_distributed
    from megatron_blackmamba.training.flops import train_flops_per_token
    from megatron_blackmamba.training.setup import (
        build_ddp_model,
        build_optimizer,
        num_microbatches,
    )

    variant = VARIANTS[name]
    os.environ["BLACKMAMBA_KERNEL_BACKEND"] = variant.kernels
    os.environ["BLACKMAMBA_SCAN_KERNEL"] = variant.scan
    job = load_config(config, list(overrides) + list(variant.overrides))
    t = job.training
    batches = synthetic_batches(job.model.vocab_size, t.micro_batch_size, t.seq_length)
    if variant.model == "mamba-ssm":
        import mamba_ssm_peer

        return mamba_ssm_peer.build_peer_trainer(name, job, batches)
    init_distributed(job.parallel, job.training.seed, cuda_graphs=job.training.cuda_graphs)
    if variant.model == "gpt":
        import gpt_baseline

        model = build_ddp_model(job, build=gpt_baseline.build_gpt)
        flops = gpt_baseline.train_flops_per_token(job)
    else:
        model = build_ddp_model(job)
        flops = train_flops_per_token(job.model)
    optimizer = build_optimizer(job, model)
    n_micro = num_microbatches(job, parallel_state.get_data_parallel_world_size())
    return Trainer(name, job, model, optimizer, n_micro, batches, flops)


def classified_modules(
    model: torch.nn.Module, kinds: dict[str, str]
) -> Iterator[tuple[torch.nn.Module, str]]:
    """(module, kind) for each module whose class, or a base class, is named in ``kinds`` (the
    spec's layers subclass megatron's, e.g. TrainingGraphedMambaLayer), outside the layers that
    megatron's per-layer CUDA graphs replay (training.cuda_graphs): hooks there would not run at
    replay, and megatron refuses forward pre-hooks there."""
    graphed = {
        id(m)
        for layer in model.modules()
        if getattr(layer, "cudagraph_manager", None) is not None
        for m in layer.modules()
    }
    for module in model.modules():
        kind = next((kinds[c.__name__] for c in type(module).__mro__ if c.__name__ in kinds), None)
        if kind is not None and id(module) not in graphed:
            yield module, kind


def release(trainer: Trainer) -> None:
    from megatron_blackmamba.parallel.setup import destroy

    trainer.model.clear()
    del trainer.optimizer
    destroy()
    gc.collect()  # model objects in reference cycles would otherwise hold their GPU memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, object]:
    """Median wall time of ``fn`` (device-synchronised) over ``repeats`` after ``warmup`` calls."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref||, in float64 (``ref`` is usually the float64 reference)."""
    return float(torch.linalg.norm(got.double() - ref) / torch.linalg.norm(ref))


def time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median of ``repeats`` CUDA-event timings after ``warmup`` untimed calls: one call's time on
    the GPU's clock, without a wall-clock timer's round trip, but with the host's launch time
    wherever launching takes longer than the kernels run (see ``device_ms``)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def device_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """GPU work per call: the profiler's kernel, memcpy and memset times summed over ``repeats``
    calls, divided by ``repeats``. What the op costs a GPU-bound training step, where the host
    runs ahead; ``time_ms`` of a short op measures its launch overhead as well."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    gpu = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in gpu) / repeats / 1e3


def graph_replay_us(run: Callable[[int], object], variants: int, calls: int = 16) -> float:
    """Microseconds per call of ``run(i)`` replayed from one CUDA graph of ``calls`` calls, i
    cycling through ``variants`` (copies of the operands, so that a call's weights come from HBM
    when the copies together overflow the L2): a decode step's kernels with their launch gaps."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(variants):
            run(i)  # compiles, and warms the allocator outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            run(i % variants)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = 20
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (replays * calls)


def kernel_totals(kernels: Iterable, name_width: int = 90) -> list[tuple[str, int, float]]:
    """(name cut to ``name_width``, calls, device us) per kernel name over profiler CUDA events,
    the longest total first: what a profile's top-kernels table lists."""
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        entry = totals[e.name[:name_width]]
        entry[0] += 1
        entry[1] += e.time_range.elapsed_us()
    return sorted(((name, n, us) for name, (n, us) in totals.items()), key=lambda r: -r[2])


def bench_parser(description: str) -> argparse.ArgumentParser:
    """The options every model benchmark takes: a base config with overrides, --out, --dry-run."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=None, help="base config (default: built-in defaults)")
    p.add_argument(
        "--out", default=os.environ.get("OUT", ""), help="folder for the tables (default: $OUT)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    return p


def publish_table(out_dir: str, filename: str, text: str) -> None:
    """Print a benchmark's table and append it to ``out_dir/filename`` (the GPU run's $OUT; no file
    without a folder)."""
    print(text, flush=True)
    if not out_dir:
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / filename, "a") as f:
        f.write(text + "\n\n")


def device_line() -> str:
    versions = [f"torch {torch.__version__}"]
    for package in ("megatron.core", "mamba_ssm", "causal_conv1d", "transformer_engine"):
        try:
            module = __import__(package, fromlist=["_"])
            versions.append(f"{package} {getattr(module, '__version__', '?')}")
        except Exception:
            versions.append(f"{package} absent")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"device: {device}; " + ", ".join(versions)
