"""training.eval_tasks: downstream lm-eval tasks scored on the model being trained."""

from __future__ import annotations

import json

import pytest

from megatron_blackmamba.config import ConfigError, load_config
from tests.training.conftest import run_train, tiny_overrides


def test_downstream_tasks_are_scored_at_their_interval(sample_cache, tmp_path):
    rows = [
        {"context": "import", "choices": ["sys", "the cat"], "gold": 0},
        {"context": "The list", "choices": ["of modules", "swims"], "gold": 0},
    ]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks" / "toy.yaml").write_text(
        "task: toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test:"
        f" {tmp_path / 'tasks' / 'toy.jsonl'}\ntest_split: test\noutput_type:"
        ' multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice:'
        ' "{{choices}}"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n'
    )
    result = run_train(
        tiny_overrides(
            sample_cache,
            tmp_path,
            "training.train_iters=4",
            "training.eval_tasks=[toy]",
            "training.eval_tasks_interval=2",
            f"training.eval_tasks_include={tmp_path / 'tasks'}",
        )
    )
    lines = [line for line in result.stderr.splitlines() if "| downstream toy/acc " in line]
    assert [line.split("step ")[1].split(" ")[0] for line in lines] == ["2", "4"]


def test_downstream_tasks_need_a_whole_model_per_rank():
    with pytest.raises(ConfigError, match="needs parallel.tp=pp=ep=1"):
        load_config(None, ["training.eval_tasks=piqa", "parallel.ep=2"])
    assert load_config(None, ["training.eval_tasks=piqa,arc_easy"]).training.eval_tasks == [
        "piqa",
        "arc_easy",
    ]
