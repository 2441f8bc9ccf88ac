"""The lm-eval adapter against the model's own forward in float64, through lm-eval's evaluator
and the blackmamba-eval command on a task the test writes, on two gloo ranks, and held-out
perplexity against the training loop's validation loss."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from megatron_blackmamba.evaluation.lm_eval_adapter import BlackMambaLM
from megatron_blackmamba.parallel.setup import destroy
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[2]
REQUESTS = [
    ("The quick brown", " fox jumps"),
    ("def main(", "):\n    return 0"),
    ("", "Hello world"),
    ("import os", "\nimport sys"),
    ("x", " = 1"),
    ("A long context " * 6, " and its end."),
]
DOCUMENTS = [
    "The standard library documentation describes every module in detail. " * 7,
    "short text",
]


@pytest.fixture(scope="module")
def lm(tiny_ckpt):
    model = BlackMambaLM(ckpt=str(tiny_ckpt), dtype="float64", batch_size=4, max_length=16)
    yield model
    destroy()


def _full_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log-softmax [len(tokens), V] of one unpadded forward, float64."""
    logits = model(torch.tensor([tokens]), None, None, runtime_gather_output=True)[0].double()
    return torch.log_softmax(logits, dim=-1)


def test_loglikelihood_matches_the_models_forward_in_float64(lm):
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)])
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, got):
        stripped = context.rstrip()  # lm-eval moves a context's trailing spaces to the continuation
        ctx = lm.tok_encode(stripped) if context else [lm.eot_token_id]
        whole = (
            lm.tok_encode(context + continuation) if context else ctx + lm.tok_encode(continuation)
        )
        cont = whole[
            len(ctx) :
        ]  # lm-eval's split: the model reads ctx + cont, whatever BPE does at the seam
        inputs = (ctx + cont)[:-1][-lm.max_length :]
        lp = _full_logprobs(lm.model, inputs)[-len(cont) :, : lm.vocab_size]
        target = torch.tensor(cont)
        assert logprob == pytest.approx(float(lp.gather(1, target[:, None]).sum()), abs=1e-9)
        assert greedy == bool((lp.argmax(-1) == target).all())


def test_rolling_carries_the_state_and_equals_one_pass(lm):
    text = DOCUMENTS[0]
    tokens = lm.tok_encode(text)
    assert len(tokens) > 3 * lm.max_length  # several windows
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    lp = _full_logprobs(lm.model, [lm.eot_token_id] + tokens[:-1])[:, : lm.vocab_size]
    want = float(lp.gather(1, torch.tensor(tokens)[:, None]).sum())
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_generate_until_stops_at_the_stop_sequence(lm):
    (free,) = lm.generate_until(
        [Instance("generate_until", {}, ("The", {"max_gen_toks": 12, "until": []}), 0)]
    )
    assert free
    stop = free[len(free) // 2 :][:2]
    (cut,) = lm.generate_until(
        [Instance("generate_until", {}, ("The", {"max_gen_toks": 12, "until": [stop]}), 0)]
    )
    assert cut == free[: free.index(stop)]


def _write_task(folder: Path, lm, prefer_best: bool) -> str:
    """A multiple-choice task whose gold answer is the choice the model itself ranks best (or
    worst): accuracy must then be exactly 1 (or 0), example by example."""
    items = [
        ("Python is a", ["programming language", "banana", "mountain range"]),
        ("The list", ["of modules", "swims", "purple"]),
        ("import", ["sys", "the cat", "seven"]),
    ]
    rows = []
    for (
        context,
        choices,
    ) in items:  # lm-eval joins context and choice with its target delimiter, " "
        scores = [
            s
            for s, _ in lm.loglikelihood(
                [
                    Instance("loglikelihood", {}, (context, " " + c), i)
                    for i, c in enumerate(choices)
                ]
            )
        ]
        pick = max if prefer_best else min
        rows.append({"context": context, "choices": choices, "gold": scores.index(pick(scores))})
    name = f"toy_choice_{'best' if prefer_best else 'worst'}"
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test:"
        f" {folder / (name + '.jsonl')}\ntest_split: test\noutput_type:"
        ' multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice:'
        ' "{{choices}}"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n'
    )
    return name


def test_a_local_task_through_lm_eval_and_blackmamba_eval(lm, tiny_ckpt, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    best, worst = _write_task(tmp_path, lm, True), _write_task(tmp_path, lm, False)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[best, worst], task_manager=TaskManager(include_path=str(tmp_path))
    )
    assert results["results"][best]["acc,none"] == 1.0
    assert results["results"][worst]["acc,none"] == 0.0

    out = tmp_path / "results.json"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_blackmamba.evaluation.cli",
            "--ckpt",
            str(tiny_ckpt),
            "--tasks",
            f"{best},{worst}",
            "--include-path",
            str(tmp_path),
            "--dtype",
            "float64",
            "--output",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert best in cli.stdout and "acc" in cli.stdout
    saved = json.loads(out.read_text())["results"]
    assert saved[best]["acc,none"] == 1.0 and saved[worst]["acc,none"] == 0.0


def test_the_paper_suite_is_a_known_group():
    from lm_eval.tasks import TaskManager

    from megatron_blackmamba.evaluation.cli import TASK_DIR

    manager = TaskManager(include_path=str(TASK_DIR))
    assert "paper" in manager.all_tasks
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_blackmamba.evaluation.cli",
            "--ckpt",
            "x",
            "--tasks",
            "hellaswagg",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "unknown task(s) hellaswagg" in missing.stderr


def test_two_ranks_give_the_results_of_one(tiny_ckpt, tmp_path):
    from tests.evaluation.workers import score

    outputs = []
    for world in (1, 2):
        out = tmp_path / f"w{world}.json"
        run_ranks(world, score, str(tiny_ckpt), REQUESTS, DOCUMENTS, str(out))
        outputs.append(json.loads(out.read_text()))
    assert outputs[1]["world"] == 2
    one, two = outputs[0]["loglikelihood"], outputs[1]["loglikelihood"]
    assert [g for _, g in one] == [g for _, g in two]
    assert [lp for lp, _ in one] == pytest.approx([lp for lp, _ in two], abs=1e-12)
    assert outputs[0]["rolling"] == pytest.approx(outputs[1]["rolling"], abs=1e-12)


def test_heldout_perplexity_is_exp_of_the_training_validation_loss(tiny_ckpt):
    from megatron_blackmamba.evaluation.heldout import heldout_loss
    from megatron_blackmamba.generation.cli import load_model_and_job
    from megatron_blackmamba.training.data import build_datasets, micro_batches
    from megatron_blackmamba.training.step import forward_backward

    model, job = load_model_and_job(tiny_ckpt, None, ["training.precision=fp32"])
    try:
        ours = heldout_loss(job, model, max_samples=8, batch_size=4)
        data = build_datasets(job, 1, 8)
        mbs = job.training.micro_batch_size
        training = forward_backward(
            [model],
            micro_batches(data.valid, 0, mbs),
            8 // mbs,
            job.training.seq_length,
            mbs,
            forward_only=True,
        )
    finally:
        destroy()
    assert ours["samples"] == 8 and ours["tokens"] == 8 * job.training.seq_length
    assert ours["perplexity"] == pytest.approx(math.exp(training), rel=1e-5)
