"""Generate text from a checkpoint: ``blackmamba-generate --ckpt DIR --prompt "..."``.

The model's config and the tokenizer come from the checkpoint (its ``config.yaml`` and
``tokenizer.json``) unless ``--config`` / ``--tokenizer`` name others. A sequence stops at the
data's end-of-document token (``<|endoftext|>``) by default.

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

from megatron_blackmamba.checkpointing import (
    CheckpointError,
    checkpoint_config,
    checkpoint_tokenizer,
    load_checkpoint,
)
from megatron_blackmamba.config import ConfigError, JobConfig, ParallelConfig, load_config
from megatron_blackmamba.data_prep.tokenizer import EOD_TOKEN
from megatron_blackmamba.generation.generate import generate
from megatron_blackmamba.generation.sampling import SamplingParams
from megatron_blackmamba.logging_setup import configure_logging
from megatron_blackmamba.model.builder import build_model
from megatron_blackmamba.parallel.setup import destroy, init_distributed
from megatron_blackmamba.training.data import tokenizer_path
from megatron_blackmamba.training.step import device


def load_model(
    ckpt: str | Path, config: Optional[str | Path] = None, overrides: Sequence[str] = ()
) -> MambaModel:
    """The checkpoint's model, in eval mode, on this machine's device (see load_model_and_job)."""
    return load_model_and_job(ckpt, config, overrides)[0]


def load_model_and_job(
    ckpt: str | Path, config: Optional[str | Path] = None, overrides: Sequence[str] = ()
) -> tuple[MambaModel, JobConfig]:
    """(model in eval mode, its job config): built from ``config``, else from the config the
    checkpoint was saved under, with TP=PP=EP=1 (one whole model per process; under torchrun
    the ranks are data-parallel copies), the checkpoint loaded at whatever layout it was saved."""
    job = (
        load_config(config, overrides) if config is not None else checkpoint_config(ckpt, overrides)
    )
    job.parallel = ParallelConfig()
    init_distributed(job.parallel, job.training.seed)
    model = build_model(job).to(device())
    load_checkpoint(ckpt, [model])
    return model.eval(), job


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ckpt", required=True, help="checkpoint directory (or one iter_* inside it)"
    )
    parser.add_argument(
        "--config",
        help="YAML config of the checkpoint's model (default: the checkpoint's config.yaml)",
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json (default: the checkpoint's, else its config's data.tokenizer)",
    )
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument(
        "--batch-file", help="text file, one prompt per line (empty lines skipped)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/top-p)"
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    stops = parser.add_mutually_exclusive_group()
    stops.add_argument(
        "--stop-token",
        default=EOD_TOKEN,
        help="stop a sequence after this token (default %(default)s)",
    )
    stops.add_argument(
        "--no-stop", action="store_true", help="always generate --max-new-tokens tokens"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="decode eagerly on a GPU instead of replaying each step from a CUDA graph",
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. training.precision=fp32"
    )
    return parser.parse_args(argv)


def resolve_tokenizer_path(ckpt: str | Path, given: Optional[str], config: Optional[str]) -> str:
    """--tokenizer, else the checkpoint's copy, else the data.tokenizer of its config."""
    if given:
        return given
    carried = checkpoint_tokenizer(ckpt)
    if carried is not None:
        return str(carried)
    job = load_config(config) if config else checkpoint_config(ckpt)
    return tokenizer_path(job)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    configure_logging(verbose=False)
    try:
        tokenizer_file = resolve_tokenizer_path(args.ckpt, args.tokenizer, args.config)
    except (CheckpointError, ConfigError, ValueError) as exc:
        print(f"error: {exc}; pass --tokenizer", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_file(tokenizer_file)
    eos_id = None
    if not args.no_stop:
        eos_id = tokenizer.token_to_id(args.stop_token)
        if eos_id is None:
            print(
                f"error: --stop-token {args.stop_token!r} is not in {tokenizer_file} (--no-stop"
                " disables stopping)",
                file=sys.stderr,
            )
            return 2
    if args.prompt is not None:
        texts = [args.prompt]
    else:
        texts = [line for line in Path(args.batch_file).read_text().splitlines() if line.strip()]
    params = SamplingParams(
        greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
    )
    try:
        model = load_model(args.ckpt, args.config, args.overrides)
        if tokenizer.get_vocab_size() > model.vocab_size:
            print(
                f"error: {tokenizer_file} has {tokenizer.get_vocab_size()} tokens, the model only "
                f"{model.vocab_size}",
                file=sys.stderr,
            )
            return 2
        generator = torch.Generator(device=device()).manual_seed(args.seed)
        completions = generate(
            model,
            [tokenizer.encode(t).ids for t in texts],
            args.max_new_tokens,
            params,
            eos_id=eos_id,
            vocab_size=tokenizer.get_vocab_size(),
            generator=generator,
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
