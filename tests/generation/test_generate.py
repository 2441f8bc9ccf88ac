"""Generation with the recurrent state: exact against full-sequence forwards, constant memory,
deterministic greedy decoding, correct batching of prompts of different lengths, and the CLI.

Tolerance: step-by-step logits against the full-sequence forward, fp32, atol = rtol = 1e-5
(observed 1e-7 to 4e-6 on logits of magnitude ~1-5: the chunked scan and the single-step
update sum in a different order).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_blackmamba.checkpointing import save_checkpoint
from megatron_blackmamba.generation import SamplingParams, cli, generate, prefill
from megatron_blackmamba.model.recurrent_state import RecurrentState
from tests.generation.conftest import GREEDY, TINY, VOCAB


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, None, None)


@pytest.mark.parametrize("prefill_len", [1, 10])
def test_decode_steps_match_full_forward(model, prefill_len):
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = full_logits(model, tokens)
    state = RecurrentState(2, 24, all_logits=True)
    steps = []
    with torch.no_grad():
        steps.append(
            model(
                tokens[:, :prefill_len],
                None,
                None,
                inference_context=state,
                runtime_gather_output=True,
            )
        )
        state.sequence_len_offset += prefill_len
        for t in range(prefill_len, 24):
            steps.append(
                model(
                    tokens[:, t : t + 1],
                    None,
                    None,
                    inference_context=state,
                    runtime_gather_output=True,
                )
            )
            state.sequence_len_offset += 1
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, atol=1e-5, rtol=1e-5)


def test_prefill_in_chunks_equals_one_pass(model):
    """Chunks that continue from the carried state leave the one-pass state and logits (fp32,
    1e-5), on a fresh random prompt whose length the chunks do not divide."""
    tokens = torch.randint(0, VOCAB, (3, 23), generator=torch.Generator().manual_seed(torch.seed()))
    with torch.no_grad():
        whole, whole_logits = prefill(model, tokens, 32)
        chunked, chunked_logits = prefill(model, tokens, 32, chunk_size=5)
    assert chunked.sequence_len_offset == whole.sequence_len_offset == 23
    torch.testing.assert_close(chunked_logits, whole_logits, atol=1e-5, rtol=1e-5)
    assert chunked.layers.keys() == whole.layers.keys()
    for layer, s in whole.layers.items():
        torch.testing.assert_close(chunked.layers[layer].ssm, s.ssm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked.layers[layer].conv, s.conv, atol=1e-5, rtol=1e-5)


def decode_step_footprint(model, context: int) -> tuple[int, int]:
    """(recurrent state bytes, bytes the torch allocator hands out during one decode step)."""
    tokens = torch.randint(0, VOCAB, (1, context), generator=torch.Generator().manual_seed(context))
    with torch.no_grad():
        state, last = prefill(model, tokens, context + 2)
        token = last.argmax(-1, keepdim=True)
        model(
            token, None, None, inference_context=state, runtime_gather_output=True
        )  # warm-up step
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(token, None, None, inference_context=state, runtime_gather_output=True)
    return state.state_bytes(), sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def test_decode_memory_does_not_grow_with_context(model):
    """Counted through the torch profiler: tracemalloc only sees Python's heap, not tensor
    storage."""
    state_16, step_16 = decode_step_footprint(model, 16)
    state_256, step_256 = decode_step_footprint(model, 256)
    assert state_16 == state_256 > 0
    assert step_16 == step_256 > 0


def greedy_by_full_forward(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation recomputing the whole sequence each step: no recurrent state involved."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(full_logits(model, torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_batched_greedy_is_deterministic_and_exact_for_mixed_lengths(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 5, 3)]
    batched = generate(model, prompts, 8, GREEDY)
    assert generate(model, prompts, 8, GREEDY) == batched
    for prompt, out in zip(prompts, batched):
        assert generate(model, [prompt], 8, GREEDY) == [out]
    assert batched[1] == greedy_by_full_forward(model, prompts[1], 8)
    assert batched[3] == greedy_by_full_forward(model, prompts[3], 8)


def test_stop_token_vocab_limit_and_seeded_sampling(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    first = generate(model, prompts, 1, GREEDY)[0][0]
    out = generate(model, prompts, 6, GREEDY, eos_id=first)
    assert out[0] == [first] and len(out[1]) <= 6
    limited = generate(
        model,
        prompts,
        6,
        SamplingParams(),
        vocab_size=50,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(t < 50 for seq in limited for t in seq)
    sampled = [
        generate(
            model, prompts, 6, SamplingParams(top_k=5), generator=torch.Generator().manual_seed(7)
        )
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_training_mode_and_empty_prompts_are_refused(model):
    with pytest.raises(ValueError, match="empty|at least one token"):
        generate(model, [[]], 4)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        generate(model, [[1]], 4)


def train_tokenizer(path) -> None:
    """A tiny byte-level BPE trained locally (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [
        "the quick brown fox jumps over the lazy dog",
        "state space models mix tokens recurrently",
    ] * 50
    tokenizer.train_from_iterator(text, trainer)
    tokenizer.save(str(path))


def test_cli_greedy_single_and_batch(model, tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", 3, [model])
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model:\n"
        + "".join(
            f"  {o.split('=')[0].split('.')[1]}: {o.split('=')[1]}\n"
            for o in TINY
            if o.startswith("model.")
        )
    )
    train_tokenizer(tmp_path / "tokenizer.json")
    common = [
        "--ckpt",
        str(tmp_path / "ckpt"),
        "--config",
        str(config),
        "--tokenizer",
        str(tmp_path / "tokenizer.json"),
        "--max-new-tokens",
        "6",
        "--greedy",
        "training.precision=fp32",
    ]
    assert cli.main(common + ["--prompt", "the quick brown"]) == 0
    single = capsys.readouterr().out.strip()
    assert single.startswith("the quick brown") and len(single) > len("the quick brown")
    assert cli.main(common + ["--prompt", "the quick brown"]) == 0
    assert capsys.readouterr().out.strip() == single
    (tmp_path / "prompts.txt").write_text("state space\n\nthe quick brown\n")
    assert cli.main(common + ["--batch-file", str(tmp_path / "prompts.txt")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["state space", "the quick brown"]
    assert "the quick brown" + rows[1]["completion"] == single
    assert cli.main(common + ["--prompt", "x", "--stop-token", "<nope>"]) == 2
