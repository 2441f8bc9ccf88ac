"""Per-token decode latency and memory vs context length: BlackMamba's recurrent state against a
same-size transformer's KV cache, measured side by side in one run.

For each context length (default 1k, 4k, 16k, 64k tokens) and each model, a random prompt of
that length is prefilled, then single-token decode steps are timed (device-synchronised, median
of ``--steps`` after warm-up). Reported: ms/token, what the model carries between steps (SSM +
conv state, or KV cache) and peak memory during decoding.

* BlackMamba-340M/1.5B: this project's model and generation path (generation/generate.py):
  prefill = one full-sequence scan, decode = mamba-ssm's selective_state_update + causal_conv1d
  update per layer and top-1 routing of the one token.
* Transformer: a Hugging Face ``LlamaForCausalLM`` of the same active size (hidden 1152, 18
  layers of 18 heads, SwiGLU 3072 = the parameters of a 4 x hidden GeLU MLP, vocab 50304), SDPA
  attention, its standard dynamic KV cache; prefilled in chunks so no 64k x 64k mask is built.

Both run eager PyTorch (no CUDA graphs; ``--batch`` sequences at once, default 1), so per-step host overhead is part of both
numbers; the trend with context is the point (the paper's claim: flat for BlackMamba).

    python bench/generation_latency.py --config configs/blackmamba-340m-1.5b.yaml
    python bench/generation_latency.py --dry-run
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from harness import append_table, device_line, median_seconds, sync

CONTEXTS = (1024, 4096, 16384, 65536)
PREFILL_CHUNK = 4096


def blackmamba(config: str | None, overrides: list[str]):
    from megatron_blackmamba.config import load_config
    from megatron_blackmamba.generation.generate import advance, prefill
    from megatron_blackmamba.model.builder import build_model
    from megatron_blackmamba.parallel.setup import init_distributed

    job = load_config(config, overrides)
    init_distributed(job.parallel, job.training.seed)
    model = build_model(job).cuda().eval()

    def run(prompt: torch.Tensor, steps: int):
        state, logits = prefill(model, prompt, prompt.shape[1] + steps + 8)
        token = logits.argmax(-1, keepdim=True)

        def step():
            return advance(model, token, state)

        return step, state.state_bytes()

    return job, run


def transformer(vocab: int, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=1152, intermediate_size=3072, num_hidden_layers=18,
                         num_attention_heads=18, num_key_value_heads=18, max_position_embeddings=max_len,
                         attn_implementation="sdpa", tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()

    def run(prompt: torch.Tensor, steps: int):
        cache = None
        for start in range(0, prompt.shape[1], PREFILL_CHUNK):
            out = model(prompt[:, start:start + PREFILL_CHUNK], past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)

        def step():
            return model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

        kv_bytes = 2 * config.num_hidden_layers * prompt.numel() * config.hidden_size * 2
        return step, kv_bytes

    return run


def measure(run, context: int, vocab: int, steps: int, batch: int) -> tuple[float, int, float]:
    prompt = torch.randint(0, vocab, (batch, context), device="cuda")
    with torch.no_grad():
        step, carried = run(prompt, steps)
        sync()
        torch.cuda.reset_peak_memory_stats()
        seconds, _ = median_seconds(step, steps, warmup=4)
    return 1e3 * seconds, carried, torch.cuda.max_memory_allocated() / 2**30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="BlackMamba config (default: built-in defaults)")
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="comma-separated context lengths")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per point (median)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder to append the table to")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides for BlackMamba")
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.dry_run:
        print(f"contexts {contexts}, {args.steps} decode steps each; BlackMamba config {args.config} "
              f"{args.overrides}; transformer: HF Llama 1152x18, SDPA, KV cache")
        return 0
    job, bm = blackmamba(args.config, args.overrides + ["parallel.ep=1"])
    vocab = job.model.vocab_size
    tf = transformer(vocab, max(contexts) + args.steps + 64)
    rows = []
    for context in contexts:
        bm_ms, bm_bytes, bm_peak = measure(bm, context, vocab, args.steps, args.batch)
        tf_ms, tf_bytes, tf_peak = measure(tf, context, vocab, args.steps, args.batch)
        rows.append(f"| {context:,} | {bm_ms:.2f} | {bm_bytes / 2**20:.1f} | {bm_peak:.2f} | "
                    f"{tf_ms:.2f} | {tf_bytes / 2**20:,.0f} | {tf_peak:.2f} | {tf_ms / bm_ms:.2f}x |")
        print(rows[-1], flush=True)
    text = "\n".join([
        device_line(), f"batch {args.batch}, bf16, eager; ms = median per decode step after prefill",
        "| context | BlackMamba ms/token | state MiB | peak GiB | transformer ms/token | KV cache MiB | peak GiB | transformer/BlackMamba |",
        "|---|---|---|---|---|---|---|---|", *rows])
    print(text)
    append_table(args.out, "generation_latency.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
