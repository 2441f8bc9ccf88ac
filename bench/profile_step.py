"""Where a training step's time goes: phase timings, per-module forward time, kernel classes.

For one variant (bench/harness.py) it prints three tables, and writes a Chrome trace of one
profiled step to ``$OUT/trace_<variant>.json.gz`` (open in chrome://tracing or Perfetto):

1. phases: the whole optimizer step vs forward+backward alone vs the optimizer update alone
   (medians, device-synchronised), so fixed per-step costs show up separately from per-token ones;
2. forward time per module kind (Mamba mixer, router, experts, whole MoE layer, norms,
   embedding), from profiler ranges around each module's forward:
   the device time of the kernels that ran inside the range;
3. kernel classes over one whole step, forward and backward (scan, conv, GEMM, elementwise, ...),
   with GPU busy time vs wall time: a large gap means the GPU waits on the host (launch overhead,
   host syncs);
4. host syncs of one whole step by source line (``torch.cuda.set_sync_debug_mode``): each one
   drains the GPU queue, so the host can no longer run ahead of the kernels;
5. host vs device time per forward module and per backward autograd node: where the host takes
   longer to launch a range's kernels than the GPU takes to run them, the GPU waits there.

    python bench/profile_step.py --variant blackmamba-cuda --config
    configs/blackmamba-340m-1.5b.yaml \
        parallel.ep=1 training.micro_batch_size=4 training.global_batch_size=4
    python bench/profile_step.py --dry-run
"""

from __future__ import annotations

import bisect
import gzip
import re
import shutil
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import torch
from harness import (
    VARIANTS,
    bench_parser,
    build_trainer,
    check_variants,
    classified_modules,
    device_line,
    kernel_totals,
    median_seconds,
    publish_table,
    release,
    sync,
)

# First match wins; names are lower-cased kernel names.
KERNEL_CLASSES = [
    ("selective scan", r"selective_scan"),
    ("causal conv1d", r"causal_conv1d"),
    ("attention (flash/sdpa)", r"flash|fmha|attention|sdpa"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|wgmma|_grouped_mm"),
    ("optimizer", r"multi_tensor|adam|foreach|_amp_"),
    ("NCCL", r"nccl"),
    ("softmax / cross-entropy", r"softmax|cross_entropy|nll_loss|log_softmax"),
    (
        "routing / permutation",
        r"index|scatter|gather|sort|cumsum|nonzero|masked|topk|histc|bincount|unique|radix",
    ),
    ("norm", r"norm"),
    ("copy / cast / memset", r"memcpy|memset|copy|cast|fill"),
    ("reduction", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|triton"),
]

MODULE_KINDS = {
    "Mamba1Mixer": "mamba mixer",
    "BlackMambaRouter": "router (+sinkhorn)",
    "SequentialMLP": "experts",
    "GroupedMLP": "experts",
    "TEGroupedMLP": "experts",
    "MoELayer": "MoE layer (total)",
    "LocalDispatchMoELayer": "MoE layer (total)",
    "RMSNorm": "norm",
    "LayerNorm": "norm",
    "WrappedTorchNorm": "norm",
    "LanguageModelEmbedding": "embedding",
    "SelfAttention": "attention block",
    "MLP": "MLP (dense, or one expert)",
}


def classify(kernel: str) -> str:
    name = kernel.lower()
    for label, pattern in KERNEL_CLASSES:
        if re.search(pattern, name):
            return label
    return "other"


def add_module_ranges(model: torch.nn.Module) -> list:
    """record_function ranges named 'module:<kind>' around the forward of every module we classify
    (none inside layers replayed from CUDA graphs)."""
    handles = []
    for module, kind in classified_modules(model, MODULE_KINDS):
        ranges = []

        def pre(_m, _args, kind=kind, ranges=ranges):
            ranges.append(torch.profiler.record_function(f"module:{kind}"))
            ranges[-1].__enter__()

        def post(_m, _args, _out, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


def _is_annotation(event) -> bool:
    """Profiler ranges mirrored onto the GPU timeline (ours, the optimizer's): not kernels."""
    return (
        bool(getattr(event, "is_user_annotation", False))
        or event.name.startswith("module:")
        or "#" in event.name
    )


def host_vs_device(events) -> list[tuple[str, int, float, float]]:
    """(range, calls, host us, device us) for forward module ranges and backward autograd nodes."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        if e.name.startswith("module:"):
            name = "fwd " + e.name[7:]
        elif e.name.startswith("autograd::engine::evaluate_function: "):
            name = "bwd " + e.name.split(": ", 1)[1]
        else:
            continue
        row = totals[name]
        row[0] += 1
        row[1] += e.cpu_time_total
        row[2] += e.device_time_total
    return sorted(
        ((k, int(v[0]), v[1], v[2]) for k, v in totals.items()), key=lambda r: -(r[2] - r[3])
    )


def profile(trainer, out_dir: str, top_kernels: int = 15) -> tuple[list, list, float, list, list]:
    handles = add_module_ranges(trainer.model[0])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        sync()
        start = time.perf_counter()
        trainer.step()
        sync()
        wall = time.perf_counter() - start
    for h in handles:
        h.remove()
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        trace = Path(out_dir) / f"trace_{trainer.name}.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()

    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    annotations = [e for e in gpu if _is_annotation(e)]
    kernels = sorted((e for e in gpu if not _is_annotation(e)), key=lambda e: e.time_range.start)
    classes: dict[str, float] = defaultdict(float)
    for e in kernels:
        classes[classify(e.name)] += e.time_range.elapsed_us()
    # Forward time per module kind: kernels that ran inside that module's range on the GPU.
    starts = [e.time_range.start for e in kernels]
    modules: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for a in annotations:
        if not a.name.startswith("module:"):
            continue
        lo, hi = (
            bisect.bisect_left(starts, a.time_range.start),
            bisect.bisect_right(starts, a.time_range.end),
        )
        inside = sum(
            k.time_range.elapsed_us()
            for k in kernels[lo:hi]
            if k.time_range.end <= a.time_range.end
        )
        modules[a.name[7:]][0] += inside
        modules[a.name[7:]][1] += 1
    top = kernel_totals(kernels)[:top_kernels]
    ranked = (
        sorted(classes.items(), key=lambda kv: -kv[1]),
        sorted(modules.items(), key=lambda kv: -kv[1][0]),
    )
    return *ranked, wall, top, host_vs_device(prof.events())


def host_syncs(step: Callable[[], object]) -> Counter:
    """Synchronising CUDA calls made during ``step()``, counted by the Python line that made
    them."""
    if not torch.cuda.is_available():
        return Counter()
    sites: Counter = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            sync()
    for w in caught:
        if "synchroniz" in str(w.message):
            path = Path(w.filename)
            short = "/".join(path.parts[-3:]) if "site-packages" in path.parts else path.name
            sites[f"{short}:{w.lineno}"] += 1
    return sites


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--variant", default="blackmamba-cuda", help=f"one of {sorted(VARIANTS)}")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per phase (median reported)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument(
        "--top", type=int, default=15, help="rows of the top-kernels and host-vs-device tables"
    )
    args = p.parse_args()
    check_variants([args.variant])
    if args.dry_run:
        v = VARIANTS[args.variant]
        print(
            f"{args.variant}: kernels={v.kernels} scan={v.scan} config={args.config}"
            f" overrides={args.overrides + list(v.overrides)}"
        )
        print("kernel classes:", ", ".join(label for label, _ in KERNEL_CLASSES))
        return 0

    trainer = build_trainer(args.variant, args.config, args.overrides)
    from megatron_blackmamba.training.step import forward_backward

    t = trainer.job.training
    step_s, loss = median_seconds(trainer.step, args.repeats, args.warmup)

    def fwd_bwd():
        for chunk in trainer.model:
            chunk.zero_grad_buffer()
        return forward_backward(
            trainer.model,
            trainer.batches,
            trainer.num_microbatches,
            t.seq_length,
            t.micro_batch_size,
        )

    fb_s, _ = median_seconds(fwd_bwd, args.repeats, 1)
    opt_s, _ = median_seconds(lambda: trainer.optimizer.step(), args.repeats, 1)
    classes, modules, wall, top, host_rows = profile(trainer, args.out, args.top)
    syncs = host_syncs(trainer.step)

    lines = [
        device_line(),
        (
            f"variant {args.variant}: mbs {t.micro_batch_size}, gbs {t.global_batch_size}, "
            f"seq {t.seq_length}, {trainer.num_microbatches} micro-batches/step, loss {loss:.3f}"
        ),
        "",
    ]
    tok = trainer.tokens_per_step
    lines += [
        "| phase | ms | tokens/s |",
        "|---|---|---|",
        f"| optimizer step (all) | {1e3 * step_s:.1f} | {tok / step_s:,.0f} |",
        f"| forward+backward | {1e3 * fb_s:.1f} | {tok / fb_s:,.0f} |",
        f"| optimizer.step() | {1e3 * opt_s:.1f} | |",
        "",
    ]
    lines += ["| module (forward only) | device ms | calls |", "|---|---|---|"]
    lines += [f"| {k} | {v[0] / 1e3:.1f} | {v[1]} |" for k, v in modules]
    busy = sum(us for _, us in classes) / 1e3
    lines += [
        "",
        (
            f"profiled step: wall {1e3 * wall:.1f} ms, GPU busy {busy:.1f} ms"
            f" ({100 * busy / (1e3 * wall):.0f}%)"
        ),
        "",
        "| kernel class (fwd+bwd+optimizer) | device ms | share |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k} | {us / 1e3:.1f} | {100 * us / 1e3 / max(busy, 1e-9):.0f}% |" for k, us in classes
    ]
    lines += ["", "| top kernels | calls | device ms |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {us / 1e3:.1f} |" for name, n, us in top]
    lines += [
        "",
        "| range (host longer than device first) | calls | host ms | device ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name[:80]} | {n} | {h / 1e3:.1f} | {d / 1e3:.1f} |"
        for name, n, h, d in host_rows[: args.top]
    ]
    lines += [
        "",
        f"host syncs in one step: {sum(syncs.values())}",
        "",
        "| sync site | count |",
        "|---|---|",
    ]
    lines += [f"| {site} | {n} |" for site, n in syncs.most_common(12)]
    text = "\n".join(lines)
    publish_table(args.out, f"profile_{args.variant}.md", text)
    release(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
