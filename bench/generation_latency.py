"""Per-token decode latency and memory vs context length: BlackMamba's recurrent state against a
same-size transformer's KV cache, measured side by side in one run.

For each context length (default 1k, 4k, 16k, 64k tokens) and each model, a random prompt of
that length is prefilled, then single-token decode steps are timed (device-synchronised, median
of ``--steps`` after warm-up). Reported: ms/token, what the model carries between steps (SSM +
conv state, or KV cache) and peak memory during decoding.

* BlackMamba-340M/1.5B: this project's model and generation path (generation/generate.py):
  prefill = full-sequence scans over chunks of the prompt, decode = mamba-ssm's
  selective_state_update + causal_conv1d update per Mamba layer and each token through its one
  expert per MoE layer.
* Transformer: a Hugging Face ``LlamaForCausalLM`` of the same active size (hidden 1152, 18
  layers of 18 heads, SwiGLU 3072 = the parameters of a 4 x hidden GeLU MLP, vocab 50304), SDPA
  attention, its standard dynamic KV cache; prefilled in chunks so no 64k x 64k mask is built.

Each model runs twice per context and batch size (``--batch``, default 1): eager, where the
host's per-kernel launch overhead is part of the number, and with the decode step replayed from
one CUDA graph, where the GPU's work is what remains. BlackMamba's graph runs a third time with
its MoE layers through the dispatcher rather than per token (kernels/top1_experts), so that
ratio comes from the same run. The trend with context is the point (the
paper's claim: flat for BlackMamba); a mode that fails to run is reported as nan.

    python bench/generation_latency.py --config configs/blackmamba-340m-1.5b.yaml
    python bench/generation_latency.py --dry-run
"""

from __future__ import annotations

import sys

import torch
from harness import bench_parser, device_line, kernel_totals, median_seconds, publish_table, sync

CONTEXTS = (1024, 4096, 16384, 65536)
PREFILL_CHUNK = 4096


def blackmamba(config: str | None, overrides: list[str]):
    """(job, run, set_per_token, set_fused_residual): ``run(prompt, steps, graph)`` prefills in
    chunks of PREFILL_CHUNK and returns one decode step; ``set_per_token(False)`` routes decode
    steps' MoE layers through the dispatcher instead of kernels/top1_experts;
    ``set_fused_residual(False)`` runs megatron's layers, the residual add and the next norm
    apart (model/stack.py)."""
    from functools import partial

    from megatron_blackmamba.config import load_config
    from megatron_blackmamba.generation import DecodeStep, prefill
    from megatron_blackmamba.model.builder import build_model
    from megatron_blackmamba.model.local_dispatcher import set_per_token_inference
    from megatron_blackmamba.model.stack import set_fused_residual
    from megatron_blackmamba.parallel.setup import init_distributed

    job = load_config(config, overrides)
    init_distributed(job.parallel, job.training.seed)
    model = build_model(job).cuda().eval()

    def run(prompt: torch.Tensor, steps: int, graph: bool):
        state, logits = prefill(model, prompt, prompt.shape[1] + steps + 8, PREFILL_CHUNK)
        token = logits.argmax(-1, keepdim=True)
        step = DecodeStep(model, state, use_graph=graph)
        assert step.backend == ("cuda-graph" if graph else "eager"), step.backend
        return (lambda: step(token)), state.state_bytes()

    return job, run, partial(set_per_token_inference, model), partial(set_fused_residual, model)


def _static_cache(config, batch: int, max_len: int):
    """transformers' StaticCache across its constructor changes (eager-allocated vs lazy)."""
    from transformers import StaticCache

    try:
        return StaticCache(
            config=config,
            max_batch_size=batch,
            max_cache_len=max_len,
            device="cuda",
            dtype=torch.bfloat16,
        )
    except TypeError:
        return StaticCache(config=config, max_cache_len=max_len)


def transformer(vocab: int, max_len: int):
    """Eager: the standard dynamic KV cache. Graph: a StaticCache sized to the context, one
    decode step captured as a CUDA graph (what transformers' compiled generation does, minus
    the compiler), attending over the whole static cache as it does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_blackmamba.cuda_graph import capture

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=1152,
        intermediate_size=3072,
        num_hidden_layers=18,
        num_attention_heads=18,
        num_key_value_heads=18,
        max_position_embeddings=max_len,
        attn_implementation="sdpa",
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()

    def run(prompt: torch.Tensor, steps: int, graph: bool):
        batch, context = prompt.shape
        cache = _static_cache(config, batch, context + steps + 8) if graph else None
        for start in range(0, context, PREFILL_CHUNK):
            chunk = prompt[:, start : start + PREFILL_CHUNK]
            position = torch.arange(start, start + chunk.shape[1], device="cuda")
            out = model(
                chunk,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                cache_position=position,
            )
            cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        position = torch.tensor([context], device="cuda")

        def step():
            return model(
                token,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                cache_position=position,
            ).logits

        kv_bytes = 2 * config.num_hidden_layers * prompt.numel() * config.hidden_size * 2
        if not graph:
            return step, kv_bytes
        captured, _ = capture(step, torch.device("cuda"), warmup=2)
        return captured.replay, kv_bytes

    return run


def measure(
    run, context: int, vocab: int, steps: int, batch: int, graph: bool
) -> tuple[float, int, float]:
    """(ms per decode step, bytes carried between steps, peak GiB); NaN ms where the mode fails."""
    prompt = torch.randint(0, vocab, (batch, context), device="cuda")
    torch.cuda.empty_cache()
    try:
        with torch.no_grad():
            step, carried = run(prompt, steps, graph)
            sync()
            torch.cuda.reset_peak_memory_stats()  # decoding's peak, not prefill's
            seconds, _ = median_seconds(step, steps, warmup=4)
    except Exception as error:  # noqa: BLE001 - a baseline mode that cannot run is reported, not fatal
        print(
            f"context {context} {'graph' if graph else 'eager'}: {type(error).__name__}: {error}"[
                :400
            ],
            flush=True,
        )
        return float("nan"), 0, float("nan")
    return 1e3 * seconds, carried, torch.cuda.max_memory_allocated() / 2**30


def decode_kernels(run, context: int, vocab: int, batch: int, top: int = 24) -> str:
    """One eager BlackMamba decode step under the profiler: how many kernels it launches and how
    long they run on the device (the graph replays the same kernels, so its time over this sum is
    the launch and idle time between them), with the kernels that take the most."""
    prompt = torch.randint(0, vocab, (batch, context), device="cuda")
    with torch.no_grad():
        step, _ = run(prompt, 8, False)
        step()
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            sync()
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memcpy")
    ]
    totals = kernel_totals(kernels, name_width=80)
    lines = [
        f"decode step, batch {batch}, context {context:,}: {len(kernels)} kernels,"
        f" {sum(us for _, _, us in totals) / 1e3:.3f} ms of device time",
        "| kernel | calls | device us |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {calls} | {us:.0f} |" for name, calls, us in totals[:top]]
    return "\n".join(lines)


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument(
        "--contexts", default=",".join(map(str, CONTEXTS)), help="comma-separated context lengths"
    )
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per point (median)")
    p.add_argument(
        "--batch", default="1", help="sequences decoded together; comma-separated for several"
    )
    p.add_argument(
        "--kernel-profile",
        action="store_true",
        help="also count and time the kernels of one BlackMamba decode step (first context, batch)",
    )
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    if args.dry_run:
        print(
            f"contexts {contexts}, batches {batches}, {args.steps} decode steps each; BlackMamba"
            f" config {args.config} {args.overrides}; transformer: HF Llama 1152x18, SDPA, KV cache"
        )
        return 0
    job, bm, set_per_token, set_fused_residual = blackmamba(
        args.config, args.overrides + ["parallel.ep=1"]
    )
    vocab = job.model.vocab_size
    tf = transformer(vocab, max(contexts) + args.steps + 64)
    rows = []
    for batch in batches:
        for context in contexts:
            point = (context, vocab, args.steps, batch)
            bm_eager, bm_bytes, bm_peak = measure(bm, *point, graph=False)
            bm_graph, _, _ = measure(bm, *point, graph=True)
            set_per_token(False)
            bm_dispatch, _, _ = measure(bm, *point, graph=True)
            set_per_token(True)
            set_fused_residual(False)
            bm_apart, _, _ = measure(bm, *point, graph=True)
            set_fused_residual(True)
            tf_eager, tf_bytes, tf_peak = measure(tf, *point, graph=False)
            tf_graph, _, _ = measure(tf, *point, graph=True)
            rows.append(
                f"| {batch} | {context:,} | {bm_eager:.2f} | {bm_graph:.2f} | {bm_apart:.2f} |"
                f" {bm_dispatch:.2f} |"
                f" {bm_bytes / 2**20:.1f} | {bm_peak:.2f} | {tf_eager:.2f} | {tf_graph:.2f} |"
                f" {tf_bytes / 2**20:,.0f} | {tf_peak:.2f} | {tf_eager / bm_eager:.2f}x |"
                f" {tf_graph / bm_graph:.2f}x |"
            )
            print(rows[-1], flush=True)
    import transformers

    text = "\n".join(
        [
            device_line(),
            (
                f"transformers {transformers.__version__}; bf16; ms = median per decode step after"
                " prefill; graph = the step replayed from one CUDA graph (BlackMamba:"
                " generation/decode_graph.py; transformer: StaticCache); BlackMamba's MoE layers"
                " decode per token (kernels/top1_experts), 'via dispatcher' = the same graph with"
                " them through the dispatcher and grouped GEMMs; 'add apart' = the same graph"
                " through megatron's layers, each residual add, cast and next norm a kernel of its"
                " own (model/stack.py adds in the norm); peak = peak memory of the eager run"
            ),
            (
                "| batch | context | BlackMamba eager ms | BlackMamba graph ms | graph add apart"
                " ms | graph via dispatcher ms | state MiB | peak GiB | transformer eager"
                " ms | transformer graph ms | KV cache MiB | peak GiB | transformer/BlackMamba"
                " eager | graph |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    publish_table(args.out, "generation_latency.md", text)
    if args.kernel_profile:
        publish_table(
            args.out,
            "generation_latency.md",
            decode_kernels(bm, contexts[0], vocab, batches[0]),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
