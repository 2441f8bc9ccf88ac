"""BlackMamba as an lm-evaluation-harness model: ``--model blackmamba --model_args ckpt=DIR,...``.

Importing this module registers the model with lm-eval (``megatron_blackmamba.evaluation`` does;
lm-eval 0.4 has no plugin discovery, so ``blackmamba-eval`` and ``python -m
megatron_blackmamba.evaluation.lm_eval_main`` import it before handing over to lm-eval). It
loads a checkpoint saved at any layout into one process (config and tokenizer from the
checkpoint unless given) and implements:

* ``loglikelihood`` (lm-eval's ``TemplateLM`` encodes the pairs): batched full forwards;
* ``loglikelihood_rolling``: documents longer than ``max_length`` are scored window by window
  with the recurrent state carried, not re-encoded (``scoring.score_rolling``);
* ``generate_until``: the project's recurrent generator, cut at the first stop sequence.

Under torchrun every rank scores a disjoint slice of the requests and the results are gathered,
so each rank hands lm-eval the complete, ordered list (identical to one process); lm-eval sees
one rank and only rank 0 reports.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tokenizers import Tokenizer

from megatron_blackmamba.data_prep.tokenizer import EOD_TOKEN
from megatron_blackmamba.evaluation.scoring import score_continuations, score_rolling
from megatron_blackmamba.generation.generate import generate
from megatron_blackmamba.generation.sampling import SamplingParams

T = TypeVar("T")
DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
}


def _ranks() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shard_map(fn, items: Sequence[Any]) -> list:
    """``[fn(x) for x in items]`` with the items split over the data-parallel ranks (rank r takes
    items r, r + world, ...) and the results gathered back into order on every rank."""
    rank, world = _ranks()
    return gather_in_order([fn(x) for x in items[rank::world]], len(items))


def gather_in_order(mine: list[T], total: int) -> list[T]:
    """The inverse of each rank taking items ``rank::world``: every rank gets all, in order."""
    rank, world = _ranks()
    if world == 1:
        return mine
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    out: list = [None] * total
    for r, part in enumerate(gathered):
        out[r::world] = part
    return out


@register_model("blackmamba")
class BlackMambaLM(TemplateLM):
    """``ckpt``: checkpoint folder (or one iter_*); ``config``, ``tokenizer``: override the
    checkpoint's; ``batch_size``; ``max_length`` (default the config's training.seq_length);
    ``dtype``: auto | float32 | float64 | bfloat16; ``max_gen_toks`` default 256."""

    def __init__(
        self,
        ckpt: str,
        config: Optional[str] = None,
        tokenizer: Optional[str] = None,
        batch_size: int | str = 8,
        max_length: Optional[int] = None,
        dtype: str = "auto",
        max_gen_toks: int = 256,
        **unused: Any,
    ) -> None:
        super().__init__()
        from megatron_blackmamba.generation.cli import load_model_and_job, resolve_tokenizer_path

        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        model, job = load_model_and_job(ckpt, config)
        if DTYPES[dtype] is not None:
            model = model.to(DTYPES[dtype])
            model.config.params_dtype = DTYPES[dtype]  # megatron's Mamba layers cast inputs to it
        self._attach(
            model,
            resolve_tokenizer_path(ckpt, tokenizer, config),
            int(max_length or job.training.seq_length),
            batch_size,
            max_gen_toks,
        )

    @classmethod
    def from_model(
        cls,
        model,
        tokenizer: str,
        max_length: int,
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
    ) -> "BlackMambaLM":
        """An adapter around a model already in memory (downstream evaluation during training)."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._attach(model, tokenizer, max_length, batch_size, max_gen_toks)
        return lm

    def _attach(
        self, model, tokenizer: str, max_length: int, batch_size: int | str, max_gen_toks: int
    ) -> None:
        self.model = model
        self.hf = Tokenizer.from_file(tokenizer)
        eod = self.hf.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(
                f"{tokenizer} has no {EOD_TOKEN!r} token: the adapter needs the data's"
                " end-of-document token"
            )
        self._eod = eod
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(self.model.parameters()).device

    # -------------------------------------------------------------- what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self._eod

    def tok_encode(
        self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any
    ) -> list[int]:
        return self.hf.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.hf.decode(list(tokens))

    @property
    def tokenizer_name(self) -> str:
        return "blackmamba-checkpoint-tokenizer"

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        rank, world = _ranks()
        mine = score_continuations(
            self.model, pairs[rank::world], self.batch_size, self.max_length, self.vocab_size
        )
        scored = gather_in_order(mine, len(pairs))
        results = [(s.logprob, s.is_greedy) for s in scored]
        for (request, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        def one(text: str) -> float:
            return score_rolling(
                self.model,
                self.tok_encode(text),
                self.prefix_token_id,
                self.max_length,
                self.vocab_size,
            ).logprob

        results = shard_map(one, [request.args[0] for request in requests])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        def one(args: tuple[str, dict]) -> str:
            context, gen_kwargs = args
            gen_kwargs = dict(gen_kwargs or {})
            stops = gen_kwargs.pop("until", None) or []
            stops = [stops] if isinstance(stops, str) else list(stops)
            limit = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            greedy = (
                not gen_kwargs.pop("do_sample", False)
                or float(gen_kwargs.get("temperature", 0.0)) == 0.0
            )
            params = SamplingParams(
                greedy=greedy, temperature=float(gen_kwargs.get("temperature", 1.0)) or 1.0
            )
            prompt = (self.tok_encode(context) or [self.prefix_token_id])[-self.max_length :]
            ids = generate(
                self.model, [prompt], limit, params, eos_id=self._eod, vocab_size=self.vocab_size
            )[0]
            text = self.tok_decode([t for t in ids if t != self._eod])
            for stop in stops:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            return text

        results = shard_map(one, [request.args for request in requests])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("generate_until", request.args, result)
        return results
