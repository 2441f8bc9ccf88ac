"""The package as users install it: a built wheel in a fresh virtual environment, run from a
folder that is not the checkout, finds its configs and sample corpus and runs the main job, the
converter and generation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.interop.zyphra_reference import random_state, tiny_config, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_listed():
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "megatron_blackmamba").rglob("__init__.py")
    }
    assert found == {name for name in listed if "._bundled." not in name}
    assert not (REPO / "data_prep").exists()  # no top-level module beside the package


def _run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"$ {' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(the venv's bin folder, its environment): the wheel built from a copy of the checkout,
    installed into a venv that sees this Python's dependencies but not the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "runs", "cache", "build", "*.egg-info", "__pycache__", ".whl", ".gpu", "tests"
        ),
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
        ],
        root,
        env,
    )
    (wheel,) = (root / "dist").glob("megatron_blackmamba-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")], root, env)
    bin_dir = root / "venv" / "bin"
    _run(
        [
            str(bin_dir / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        root,
        env,
    )
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    return bin_dir, env


def test_the_installed_package_is_the_wheel(installed, tmp_path):
    bin_dir, env = installed
    where = _run(
        [
            str(bin_dir / "python"),
            "-c",
            "import megatron_blackmamba; print(megatron_blackmamba.__file__)",
        ],
        tmp_path,
        env,
    ).stdout.strip()
    assert where.startswith(str(bin_dir.parent)), where
    listed = _run(
        [str(bin_dir / "blackmamba-train"), "--list-configs"], tmp_path, env
    ).stdout.split()
    assert {"tiny.yaml", "blackmamba-340m-1.5b.yaml", "data/blackmamba_paper_mixture.yaml"} <= set(
        listed
    )
    assert "build" in _run([str(bin_dir / "blackmamba-prep"), "--help"], tmp_path, env).stdout


def test_the_wheel_runs_the_main_job_converter_and_generation(installed, tmp_path):
    bin_dir, env = installed
    result = _run(
        [
            str(bin_dir / "blackmamba-train"),
            "training.train_iters=3",
            "training.eval_interval=0",
            "logging.progress_bar=false",
            "checkpoint.save=ckpt",
            "logging.metrics_jsonl=m.jsonl",
        ],
        tmp_path,
        env,
    )
    assert "done: step 3" in result.stderr
    assert (tmp_path / "ckpt" / "iter_0000003" / "tokenizer.json").is_file()
    assert (
        tmp_path / "data" / "cache"
    ).is_dir()  # the sample corpus, tokenised from the wheel's copy
    generated = _run(
        [
            str(bin_dir / "blackmamba-generate"),
            "--ckpt",
            "ckpt",
            "--prompt",
            "The",
            "--greedy",
            "--max-new-tokens",
            "4",
        ],
        tmp_path,
        env,
    )
    assert generated.stdout.startswith("The")

    zyphra = write_checkpoint(tmp_path / "zyphra", tiny_config(), random_state(tiny_config()))
    python = str(bin_dir / "python")
    _run(
        [
            python,
            "-m",
            "megatron_blackmamba.interop.zyphra",
            "import",
            "--zyphra-dir",
            str(zyphra),
            "--out",
            "z",
        ],
        tmp_path,
        env,
    )
    _run(
        [
            python,
            "-m",
            "megatron_blackmamba.interop.zyphra",
            "export",
            "--ckpt",
            "z",
            "--out",
            "back",
        ],
        tmp_path,
        env,
    )
    assert (tmp_path / "back" / "pytorch_model.bin").is_file()
