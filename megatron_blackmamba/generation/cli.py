"""Generate text from a checkpoint: ``blackmamba-generate --ckpt DIR --config X.yaml --tokenizer T.json --prompt "..."``.

The checkpoint may have been saved at any TP/PP/EP layout; generation runs in one process on one
device (CUDA when available, with mamba-ssm's decode kernels when installed; CPU otherwise).
``--prompt`` prints the prompt followed by its completion; ``--batch-file`` (one prompt per line)
generates all prompts as one batch and prints one JSON object per prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from megatron.core.models.mamba import MambaModel
from tokenizers import Tokenizer

from megatron_blackmamba.checkpointing import load_checkpoint
from megatron_blackmamba.config import ParallelConfig, load_config
from megatron_blackmamba.generation.generate import generate
from megatron_blackmamba.generation.sampling import SamplingParams
from megatron_blackmamba.model.builder import build_model
from megatron_blackmamba.parallel.setup import destroy, init_distributed
from megatron_blackmamba.train import configure_logging
from megatron_blackmamba.training.step import device


def load_model(ckpt: str | Path, config: str | Path, overrides: Sequence[str] = ()) -> MambaModel:
    """The checkpoint's model, in eval mode, as a single process (TP=PP=EP=1) on this machine's device."""
    job = load_config(config, overrides)
    job.parallel = ParallelConfig()
    init_distributed(job.parallel, job.training.seed)
    model = build_model(job).to(device())
    load_checkpoint(ckpt, [model])
    return model.eval()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (or one iter_* inside it)")
    parser.add_argument("--config", required=True, help="YAML config the checkpoint's model was built from")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json (HF tokenizers format)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--batch-file", help="text file, one prompt per line (empty lines skipped)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/top-p)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    parser.add_argument("--stop-token", help="stop a sequence after this token (e.g. '<|endoftext|>')")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="decode eagerly on a GPU instead of replaying each step from a CUDA graph")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. training.precision=fp32")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    configure_logging(verbose=False)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    eos_id = None
    if args.stop_token is not None:
        eos_id = tokenizer.token_to_id(args.stop_token)
        if eos_id is None:
            print(f"error: --stop-token {args.stop_token!r} is not in {args.tokenizer}", file=sys.stderr)
            return 2
    if args.prompt is not None:
        texts = [args.prompt]
    else:
        texts = [line for line in Path(args.batch_file).read_text().splitlines() if line.strip()]
    params = SamplingParams(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    try:
        model = load_model(args.ckpt, args.config, args.overrides)
        if tokenizer.get_vocab_size() > model.vocab_size:
            print(f"error: {args.tokenizer} has {tokenizer.get_vocab_size()} tokens, the model only "
                  f"{model.vocab_size}", file=sys.stderr)
            return 2
        generator = torch.Generator(device=device()).manual_seed(args.seed)
        completions = generate(
            model, [tokenizer.encode(t).ids for t in texts], args.max_new_tokens, params,
            eos_id=eos_id, vocab_size=tokenizer.get_vocab_size(), generator=generator,
            cuda_graph=False if args.no_cuda_graph else None,
        )
    finally:
        destroy()
    for text, ids in zip(texts, completions):
        completion = tokenizer.decode(ids)
        if args.prompt is not None:
            print(text + completion)
        else:
            print(json.dumps({"prompt": text, "completion": completion}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
