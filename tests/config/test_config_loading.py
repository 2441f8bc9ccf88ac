"""The config loader: values parsed by their field's type, every choice field checked, unknown
keys named with the nearest one, impossible layouts refused before anything is started."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from megatron_blackmamba.config import ConfigError, JobConfig, load_config, to_yaml
from megatron_blackmamba.config.loader import field_types, read_yaml, sections
from megatron_blackmamba.resources import config_dir, list_configs

REPO = Path(__file__).resolve().parents[2]


def _choice_fields() -> list[tuple[str, tuple[str, ...]]]:
    """Every ``Literal`` field of the schema as ("section.field", allowed values)."""
    found = []
    for section, cls in sections().items():
        for name, kind in field_types(cls).items():
            if typing.get_origin(kind) is typing.Literal:
                found.append((f"{section}.{name}", typing.get_args(kind)))
    return found


def test_the_schema_declares_the_choice_fields_the_issue_lists():
    names = {name for name, _ in _choice_fields()}
    assert {
        "model.activation",
        "model.routing",
        "model.final_norm",
        "model.sinkhorn_init",
        "parallel.moe_dispatcher",
        "parallel.backend",
        "training.lr_decay_style",
        "training.precision",
        "training.cuda_graph_layers",
        "logging.wandb_mode",
    } <= names


@pytest.mark.parametrize("name, allowed", _choice_fields(), ids=[n for n, _ in _choice_fields()])
def test_every_choice_field_refuses_a_near_miss_and_names_the_fix(name, allowed):
    good = allowed[-1]
    typo = good[:-1] if len(good) > 3 else good + "x"
    # What lr_decay_style=WSD and training.fp8 need besides their names.
    extra = ["training.lr_wsd_decay_iters=10", "model.moe_grouped_gemm=true"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{name}={typo}", *extra])
    message = str(err.value)
    assert name in message and repr(typo) in message
    assert all(str(a) in message for a in allowed)
    assert f"did you mean {good}?" in message
    section, field = name.split(".")
    assert getattr(getattr(load_config(None, [f"{name}={good}", *extra]), section), field) == good


def test_lr_decay_styles_are_megatrons():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    source = Path(sys.modules[OptimizerParamScheduler.__module__].__file__).read_text()
    for style in typing.get_args(field_types(type(JobConfig().training))["lr_decay_style"]):
        assert f"'{style}'" in source or f'"{style}"' in source


def test_overrides_are_parsed_by_the_fields_type():
    job = load_config(
        None,
        [
            "logging.run_name=0418",
            "logging.wandb_project=2024",
            "logging.wandb_mode=disabled",
            "checkpoint.save=null",
            "training.lr=3e-4",
            "training.train_tokens=300e9",
            "parallel.tp=1",
            "training.cuda_graphs=yes",
            "data.tokenizer=~",
            "logging.run_name=0418",
        ],
    )
    assert job.logging.run_name == "0418" and job.logging.wandb_project == "2024"
    assert job.checkpoint.save is None and job.data.tokenizer is None
    assert (
        job.training.lr == 3e-4
        and job.training.train_tokens == 300e9
        and job.training.cuda_graphs is True
    )
    assert load_config(None, ['logging.run_name="a b"']).logging.run_name == "a b"
    assert load_config(None, ["checkpoint.save="]).checkpoint.save is None


def test_yaml_files_are_parsed_by_the_fields_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "logging:\n  run_name: 0418\n  wandb_project: 2024\n  wandb_mode: disabled\ntraining:\n "
        " lr: 3e-4\ncheckpoint:\n  save: null\n"
    )
    job = load_config(path)
    assert (
        job.logging.run_name,
        job.logging.wandb_project,
        job.training.lr,
        job.checkpoint.save,
    ) == ("0418", "2024", 3e-4, None)


@pytest.mark.parametrize(
    "override, hint",
    [
        ("training.lr_decay_stlye=cosine", "did you mean training.lr_decay_style?"),
        ("modle.hidden_size=8", "did you mean model?"),
        ("training.tp=2", "it belongs to section parallel: parallel.tp"),
        ("training.seed=abc", "training.seed: expected an integer, got 'abc'"),
        ("training.warmup_iters=2.5", "training.warmup_iters: expected an integer"),
        ("training.cuda_graphs=maybe", "training.cuda_graphs: expected true or false"),
        ("training.lr", "must look like section.field=value"),
    ],
)
def test_bad_keys_and_values_name_the_fix(override, hint):
    with pytest.raises(ConfigError, match=hint.replace("?", r"\?").replace(".", r"\.")):
        load_config(None, [override])


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.precision=fp16", "model.routing=sinkorn", "logging.nope=1"])
    assert len(err.value.problems) == 3


@pytest.mark.parametrize(
    "overrides, world, problem",
    [
        (["parallel.ep=3"], None, "parallel.ep=3 must divide model.num_experts=8"),
        (
            ["training.global_batch_size=10", "training.micro_batch_size=4"],
            None,
            "must be a multiple of training.micro_batch_size",
        ),
        (["parallel.tp=2", "parallel.ep=2"], 6, "ep*etp = 4 must divide world/pp = 6"),
        (
            ["training.global_batch_size=8", "training.micro_batch_size=4"],
            4,
            "micro_batch_size*dp = 4*4 = 16",
        ),
        (["parallel.tp=3"], 4, "world size 4 is not divisible by parallel.tp*pp = 3"),
        (["data.split=100,0,0"], None, "holds out no validation data"),
        (["training.eval_iters=0"], None, "needs training.eval_iters >= 1"),
        (["training.lr_decay_style=WSD"], None, "lr_wsd_decay_iters"),
        (["data.blend=/data/blend.txt"], None, "needs data.tokenizer"),
        (["training.min_lr=1", "training.lr=0.1"], None, "is above training.lr"),
    ],
)
def test_cross_field_checks(overrides, world, problem):
    with pytest.raises(ConfigError, match=problem.replace("*", r"\*").replace(".", r"\.")):
        load_config(None, overrides, world_size=world)


def test_bad_kernel_environment_variable_is_refused(monkeypatch):
    monkeypatch.setenv("BLACKMAMBA_SCAN_KERNEL", "blackmambaa")
    with pytest.raises(ConfigError, match="did you mean blackmamba"):
        load_config(None)


@pytest.mark.parametrize(
    "name", [n for n in list_configs() if not n.startswith("data/")]
)  # data/: mixtures
def test_bundled_configs_load_and_round_trip(name, tmp_path):
    job = load_config(config_dir() / name)
    (tmp_path / "resolved.yaml").write_text(to_yaml(job))
    assert load_config(tmp_path / "resolved.yaml") == job
    assert load_config(Path(name).stem) == job  # found by name too


def test_every_field_has_help():
    for section, cls in sections().items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{section}.{f.name} has no help text"
    assert read_yaml(config_dir() / "tiny.yaml")["model"]["hidden_size"] == "128"  # kept as text


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_blackmamba.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_the_trainer_refuses_before_starting_anything():
    """A typo in a choice field ends the job before torch.distributed or a model exists."""
    result = _cli("--config", "configs/tiny.yaml", "training.lr_decay_style=cosin")
    assert result.returncode == 2
    assert (
        "training.lr_decay_style: 'cosin' is not one of" in result.stderr
        and "did you mean cosine?" in result.stderr
    )
    assert "torch.distributed" not in result.stderr and "megatron" not in result.stderr.replace(
        "megatron_blackmamba", ""
    )
    # an impossible layout for the launch's world size (as torchrun would set it)
    result = _cli("parallel.ep=8", env={"WORLD_SIZE": "4", "RANK": "0"})
    assert (
        result.returncode == 2 and "parallel.ep*etp = 8 must divide world/pp = 4" in result.stderr
    )


def test_print_config_prints_the_resolved_yaml():
    result = _cli("--print-config", "logging.run_name=0418")
    assert result.returncode == 0
    assert "run_name: '0418'" in result.stdout or "run_name: 0418" in result.stdout
    assert "lr_decay_style: cosine" in result.stdout


def test_sequences_may_exceed_max_seq_length():
    """A Mamba stack has no positional limit: 32k-token training loads against a 2k model."""
    job = load_config(None, ["training.seq_length=32768", "training.micro_batch_size=1"])
    assert job.training.seq_length == 32768 > job.model.max_seq_length
