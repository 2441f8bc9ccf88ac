"""Does the GPU wait on the host? How far the host runs ahead of the GPU, layer by layer.

A profiler cannot answer this: it multiplies the host's per-op cost and then shows the GPU waiting
for launches that, unprofiled, would have come in time. This script marks the start of every
layer's forward (a module pre-hook) and backward (a hook on the gradient of the layer's output)
and the fetch of every micro-batch with the host clock and a CUDA event, unprofiled:

* host ms: the host's time from one layer's mark to the next (its Python and launch cost);
* GPU ms: the GPU's time between the same marks (its kernels, plus any wait for the host);
* lead ms: how far the GPU is behind the host at the mark. Near zero means the GPU has run out
  of queued work and waits for the next launch: the step is host-bound there.

Rows are per layer kind and phase (means over layers), plus the micro-batch's start and end.
Layers replayed from CUDA graphs (training.cuda_graphs) get no marks of their own: their time
counts to the mark before them.

    python bench/host_lead.py --config configs/blackmamba-340m-1.5b.yaml parallel.ep=1 \
        training.micro_batch_size=8
    python bench/host_lead.py --dry-run
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict

import torch
from harness import (
    VARIANTS,
    bench_parser,
    build_trainer,
    check_variants,
    classified_modules,
    device_line,
    publish_table,
    release,
    sync,
)

LAYER_KINDS = {"MambaLayer": "mamba", "TransformerLayer": "moe", "MoETransformerLayer": "moe"}


class Marks:
    """(label, host seconds, CUDA event) at points of one micro-batch."""

    def __init__(self) -> None:
        self.points: list[tuple[str, float, torch.cuda.Event]] = []

    def mark(self, label: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.points.append((label, time.perf_counter(), event))

    def timeline(self) -> list[tuple[str, float, float]]:
        """(label, host ms, GPU ms) since the first mark, which is taken on an idle GPU."""
        sync()
        _, h0, e0 = self.points[0]
        return [(label, 1e3 * (h - h0), e0.elapsed_time(e)) for label, h, e in self.points]


def attach(model: torch.nn.Module, marks: Marks) -> list:
    handles = []
    for module, kind in classified_modules(model, LAYER_KINDS):

        def pre(_m, _args, kind=kind):
            marks.mark(f"fwd {kind}")

        def post(_m, _args, out, kind=kind):
            out = out[0] if isinstance(out, tuple) else out
            if out.requires_grad:
                out.register_hook(lambda grad: marks.mark(f"bwd {kind}"))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def summarise(
    timeline: list[tuple[str, float, float]],
) -> list[tuple[str, int, float, float, float, int]]:
    """(label, n, mean host ms, mean GPU ms, mean lead ms, marks with lead < 50 us) per label."""
    rows: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for (label, h, g), (_, h_next, g_next) in zip(timeline, timeline[1:]):
        rows[label].append((h_next - h, g_next - g, g - h))
    out = []
    for label, xs in rows.items():
        host, gpu, lead = (statistics.mean(x[i] for x in xs) for i in range(3))
        out.append((label, len(xs), host, gpu, lead, sum(x[2] < 0.05 for x in xs)))
    return out


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--variant", default="blackmamba-grouped", help=f"one of {sorted(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=3, help="untimed micro-batches first")
    p.add_argument(
        "--micro-batches",
        type=int,
        default=2,
        help="micro-batches marked (the step's schedule runs them back to back)",
    )
    args = p.parse_args()
    check_variants([args.variant])
    if args.dry_run:
        print(
            f"{args.variant}: marks at each of {sorted(set(LAYER_KINDS.values()))} layers' forward"
            " and backward"
        )
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("host_lead.py measures CUDA events: it needs a GPU")

    trainer = build_trainer(args.variant, args.config, args.overrides)
    from megatron_blackmamba.training.step import forward_backward

    t = trainer.job.training
    marks = Marks()
    marking = False

    def batches():
        for batch in trainer.batches:
            if marking:
                marks.mark("next micro-batch")
            yield batch

    data = batches()

    def micro_batches(n: int) -> None:
        for chunk in trainer.model:
            chunk.zero_grad_buffer()
        forward_backward(trainer.model, data, n, t.seq_length, t.micro_batch_size)

    micro_batches(args.warmup)
    handles = attach(trainer.model[0], marks)
    sync()
    marks.mark("start (idle GPU)")
    marking = True
    micro_batches(args.micro_batches)
    marks.mark("end")
    for h in handles:
        h.remove()
    timeline = marks.timeline()
    total_host, total_gpu = timeline[-1][1], timeline[-1][2]

    lines = [
        device_line(),
        (
            f"variant {args.variant}: mbs {t.micro_batch_size}, seq {t.seq_length},"
            f" {args.micro_batches} micro-batches (forward+backward): host {total_host:.1f} ms, GPU"
            f" {total_gpu:.1f} ms"
        ),
        "",
        "| from mark | n | host ms | GPU ms | GPU behind host, ms | marks with the GPU idle |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {n} | {h:.3f} | {g:.3f} | {lead:.3f} | {idle} |"
        for label, n, h, g, lead, idle in summarise(timeline)
    ]
    text = "\n".join(lines)
    publish_table(args.out, f"host_lead_{args.variant}.md", text)
    release(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
