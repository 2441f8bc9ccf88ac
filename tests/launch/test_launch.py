"""Launch scripts, layout helper and shipped configs: CPU only, nothing is really launched.

SLURM is simulated with environment variables and fake ``srun`` / ``scontrol`` executables that
only record how they were called, so the tests see exactly what the batch script would run,
including the SIGUSR1 -> save -> requeue path.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_blackmamba.config import load_config

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SBATCH = LAUNCH / "blackmamba.sbatch"
LOCAL = LAUNCH / "local.sh"
PAPER_CONFIGS = {
    "configs/blackmamba-340m-1.5b.yaml": dict(
        hidden=1152, layers=30, ffn=3072, total=1.5e9, active=340e6
    ),
    "configs/blackmamba-630m-2.8b.yaml": dict(
        hidden=1472, layers=36, ffn=3872, total=2.8e9, active=630e6
    ),
}
PAPER_1B5 = "configs/blackmamba-340m-1.5b.yaml"
SHIPPED_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml"))


def _load_print_layout():
    spec = importlib.util.spec_from_file_location("print_layout", LAUNCH / "print_layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


print_layout = _load_print_layout()


# ---------------------------------------------------------------------------------------------
# fixtures: a simulated 2-node x 8-GPU allocation with recording srun / scontrol
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_slurm(tmp_path):
    """(env, log path): SLURM variables for job 4242 on gpu-a[01-02], fake tools first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "scontrol").write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        echo "scontrol $*" >> "{log}"
        if [[ "$1" == show && "$2" == hostnames ]]; then
            exec {sys.executable} "{LAUNCH / "print_layout.py"}" --hostnames "$3"
        fi
        """)
    )
    # srun: records its arguments and environment; then exits / fails / waits for a signal.
    (bin_dir / "srun").write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        echo "srun $*" >> "{log}"
        echo "srun-env MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT" \
            "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE RANK=${{RANK:-unset}}" >> "{log}"
        case "${{FAKE_SRUN:-wait}}" in
            ok) exit 0 ;;
            fail) exit 3 ;;
        esac
        trap 'echo "srun got USR1" >> "{log}"; exit 0' USR1
        echo "srun ready" >> "{log}"
        for _ in $(seq 1 300); do sleep 0.1; done
        echo "srun was never signalled" >> "{log}"
        exit 9
        """)
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = print_layout.slurm_env(2, 8, 4242, "gpu-a[01-02]", cpus_per_task=8)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHON"] = sys.executable
    env["LOG_DIR"] = str(tmp_path / "slurm-logs")
    env["RANK"] = "5"  # a stale torchrun variable the script must drop
    env["PREFLIGHT"] = (
        "0"  # the paper configs' data paths are placeholders; preflight has its own tests
    )
    for key in (
        "DRY_RUN",
        "CONFIG",
        "OVERRIDES",
        "CKPT_DIR",
        "TB_DIR",
        "NCCL_NVLS_ENABLE",
        "NCCL_SOCKET_IFNAME",
        "OMP_NUM_THREADS",
        "MAX_RESTARTS",
        "REQUEUE_ON_FAILURE",
        "SRUN_EXTRA_ARGS",
        "RDZV_PORT",
    ):
        env.pop(key, None)
    return env, log


def _calls(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def _run_sbatch(env, *args, timeout=60):
    return subprocess.run(
        ["bash", str(SBATCH), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------
# shell syntax
# ---------------------------------------------------------------------------------------------


def test_every_launch_script_passes_bash_n():
    scripts = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
    assert {p.name for p in scripts} >= {
        "local.sh",
        "blackmamba.sbatch",
        "prep.sbatch",
        "prep_submit.sh",
    }
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


def test_sbatch_header_has_requeue_signal_and_one_task_per_gpu():
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    options = {line.split()[1].split("=")[0]: line.split()[1] for line in header}
    assert options["--signal"] == "--signal=B:USR1@300"
    assert "--requeue" in options
    tasks = int(options["--ntasks-per-node"].split("=")[1])
    gpus = int(options["--gpus-per-node"].split("=")[1])
    assert tasks == gpus == 8  # one rank per GPU, started by srun
    # #SBATCH lines are only read before the first command
    first_command = next(
        i
        for i, line in enumerate(SBATCH.read_text().splitlines())
        if line and not line.startswith("#")
    )
    last_directive = max(
        i for i, line in enumerate(SBATCH.read_text().splitlines()) if line.startswith("#SBATCH")
    )
    assert last_directive < first_command


# ---------------------------------------------------------------------------------------------
# sbatch dry run on a simulated 2 x 8 allocation
# ---------------------------------------------------------------------------------------------


def test_sbatch_dry_run_prints_every_node_and_runs_nothing(fake_slurm):
    env, log = fake_slurm
    config = "configs/blackmamba-340m-1.5b.yaml"
    result = _run_sbatch(env, "--dry-run", config, "training.lr=3e-4")
    out = result.stdout
    assert result.returncode == 0, result.stderr + out
    assert "DRY RUN" in out
    # rendezvous from `scontrol show hostnames`, port from the job id
    assert "MASTER_ADDR=gpu-a01 MASTER_PORT=24242" in out
    assert "export MASTER_ADDR=gpu-a01" in out
    assert "nnodes=2 nproc_per_node=8 world_size=16" in out
    assert "node 0 (gpu-a01): node_rank=0 nnodes=2 nproc_per_node=8 ranks 0-7" in out
    assert "node 1 (gpu-a02): node_rank=1 nnodes=2 nproc_per_node=8 ranks 8-15" in out
    ranks = re.findall(
        r"\[rank (\d+)\] SLURM_NODEID=(\d) SLURM_PROCID=\1 SLURM_LOCALID=(\d) SLURM_NTASKS=16", out
    )
    assert [int(r) for r, _, _ in ranks] == list(range(16))
    assert all(int(node) == int(r) // 8 and int(local) == int(r) % 8 for r, node, local in ranks)
    srun_line = next(line for line in out.splitlines() if line.startswith("srun "))
    assert (
        "--nodes=2" in srun_line
        and "--ntasks-per-node=8" in srun_line
        and "--kill-on-bad-exit=1" in srun_line
    )
    assert f"-m megatron_blackmamba.train --config {config} training.lr=3e-4" in srun_line
    assert "export NCCL_NVLS_ENABLE=0" in out
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in out
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in out
    assert "layout     : ok" in out and "dp=16, expert dp=2" in out
    assert "scontrol requeue 4242" in out  # described, not run
    calls = _calls(log)
    assert "srun" not in calls, calls
    assert "requeue" not in calls, calls
    assert calls.strip() == "scontrol show hostnames gpu-a[01-02]"
    assert not Path(env["LOG_DIR"]).exists()


def test_dry_run_env_var_and_overrides(fake_slurm):
    env, log = fake_slurm
    env.update(
        DRY_RUN="1",
        NCCL_NVLS_ENABLE="1",
        NCCL_SOCKET_IFNAME="ib0",
        CKPT_DIR="/ckpt/bm",
        OVERRIDES="training.lr=1e-4 parallel.ep=4",
        CONFIG="configs/blackmamba-630m-2.8b.yaml",
    )
    result = _run_sbatch(env, "configs/blackmamba-630m-2.8b.yaml", "parallel.ep=8")
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    assert "export NCCL_NVLS_ENABLE=1" in out and "export NCCL_SOCKET_IFNAME=ib0" in out
    # CKPT_DIR first, then OVERRIDES, then the arguments (last wins in load_config)
    assert (
        "--config configs/blackmamba-630m-2.8b.yaml checkpoint.save=/ckpt/bm training.lr=1e-4 "
        "parallel.ep=4 parallel.ep=8" in out
    )
    assert "parallel   : tp=1 pp=1 ep=8" in out
    assert "srun" not in _calls(log)


def test_print_layout_simulates_the_allocation():
    result = subprocess.run(
        [
            sys.executable,
            str(LAUNCH / "print_layout.py"),
            "--nnodes",
            "2",
            "--gpus-per-node",
            "8",
            "configs/blackmamba-630m-2.8b.yaml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "MASTER_ADDR=node001" in out
    assert (
        "node_rank=0 nnodes=2 nproc_per_node=8" in out
        and "node_rank=1 nnodes=2 nproc_per_node=8" in out
    )
    assert "--config configs/blackmamba-630m-2.8b.yaml" in out
    assert "export NCCL_NVLS_ENABLE=0" in out


@pytest.mark.parametrize(
    "override, message",
    [
        ("parallel.ep=3", "must divide model.num_experts=8"),
        ("training.global_batch_size=1000", "must be a multiple of micro_batch_size*dp"),
        ("parallel.tp=3", "not divisible by parallel.tp*pp"),
    ],
)
def test_bad_layout_is_refused_before_anything_runs(fake_slurm, override, message):
    env, log = fake_slurm
    result = _run_sbatch(env, "--dry-run", "configs/blackmamba-340m-1.5b.yaml", override)
    assert result.returncode != 0
    assert message in result.stderr
    assert "srun" not in _calls(log)


def test_sbatch_outside_slurm_points_to_the_simulator():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", str(SBATCH), "--dry-run", "configs/tiny.yaml"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "not inside a SLURM allocation" in result.stderr and "print_layout.py" in result.stderr


# ---------------------------------------------------------------------------------------------
# real mode with a fake srun: the time-limit signal, checkpoint-and-exit, requeue
# ---------------------------------------------------------------------------------------------


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in _calls(log):
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=5)
            raise AssertionError(
                f"never saw {text!r}; rc={proc.returncode}\n{out}\n{err}\n{_calls(log)}"
            )
        time.sleep(0.05)


def test_usr1_is_forwarded_to_the_ranks_then_the_job_requeues(fake_slurm):
    env, log = fake_slurm
    proc = subprocess.Popen(
        ["bash", str(SBATCH), PAPER_1B5, "training.train_iters=10"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(log, "srun ready", proc)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    calls = _calls(log).splitlines()
    srun = next(line for line in calls if line.startswith("srun "))
    assert "--nodes=2 --ntasks-per-node=8" in srun
    assert srun.endswith(
        f"-m megatron_blackmamba.train --config {PAPER_1B5} training.train_iters=10"
    )
    assert "srun-env MASTER_ADDR=gpu-a01 MASTER_PORT=24242 NCCL_NVLS_ENABLE=0 RANK=unset" in calls
    # the ranks got the signal (and saved) before the requeue
    assert calls.index("srun got USR1") < calls.index("scontrol requeue 4242")
    assert "requeueing job 4242" in out
    launch_log = Path(env["LOG_DIR"]) / "launch-restart0.txt"
    assert "MASTER_ADDR=gpu-a01" in launch_log.read_text()


def test_preflight_runs_before_srun_and_stops_a_job_that_would_fail(fake_slurm):
    env, log = fake_slurm
    env["PREFLIGHT"] = "1"
    dry = _run_sbatch(env, "--dry-run", PAPER_1B5)
    assert dry.returncode == 0
    assert (
        f"-m megatron_blackmamba.train --preflight --world-size 16 --config {PAPER_1B5}"
        in dry.stdout
    )
    result = _run_sbatch(env, PAPER_1B5)  # its blend and tokenizer are placeholders
    assert result.returncode != 0 and "preflight found problems" in result.stderr
    assert (
        "PROBLEM : data.blend: blend file /path/to/processed/blend.txt does not exist"
        in result.stdout
    )
    assert "srun " not in _calls(log)


def test_usr1_after_max_restarts_does_not_requeue(fake_slurm):
    env, log = fake_slurm
    env.update(SLURM_RESTART_COUNT="3", MAX_RESTARTS="3")
    proc = subprocess.Popen(
        ["bash", str(SBATCH), PAPER_1B5],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(log, "srun ready", proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert "srun got USR1" in _calls(log)
    assert "requeue" not in _calls(log)
    assert "not requeueing" in out


@pytest.mark.parametrize("requeue_on_failure", ["0", "1"])
def test_failed_ranks_pass_their_status_through(fake_slurm, requeue_on_failure):
    env, log = fake_slurm
    env.update(FAKE_SRUN="fail", REQUEUE_ON_FAILURE=requeue_on_failure)
    result = _run_sbatch(env, PAPER_1B5)
    assert result.returncode == 3, result.stdout + result.stderr
    assert ("scontrol requeue 4242" in _calls(log)) == (requeue_on_failure == "1")


def test_finished_training_exits_zero_without_requeue(fake_slurm):
    env, log = fake_slurm
    env["FAKE_SRUN"] = "ok"
    result = _run_sbatch(env, PAPER_1B5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "requeue" not in _calls(log)


# ---------------------------------------------------------------------------------------------
# local.sh
# ---------------------------------------------------------------------------------------------


def _local(*args, **env_extra):
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE")
    }
    env.update(DRY_RUN="1", **env_extra)
    return subprocess.run(
        ["bash", str(LOCAL), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=30
    )


def test_local_sh_multi_process_uses_torchrun_standalone():
    result = _local("2", "configs/tiny.yaml", "training.train_iters=5")
    assert result.returncode == 0, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert re.search(
        r"(torchrun|-m torch\.distributed\.run) --standalone --nproc_per_node=2 "
        r"-m megatron_blackmamba\.train --config configs/tiny\.yaml training\.train_iters=5",
        line,
    ), line
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # what `nproc` reports
    assert f"OMP_NUM_THREADS={threads} " in line


def test_local_sh_single_process_is_plain_python():
    result = _local("configs/tiny.yaml", OMP_NUM_THREADS="3")
    assert result.returncode == 0, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "torchrun" not in line and "torch.distributed.run" not in line
    assert line.endswith("-m megatron_blackmamba.train --config configs/tiny.yaml")
    assert "OMP_NUM_THREADS=3 " in line


def test_local_sh_rejects_a_missing_config():
    result = _local("2", "configs/nope.yaml")
    assert result.returncode != 0 and "not found" in result.stderr


# ---------------------------------------------------------------------------------------------
# host lists
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node001", ["node001"]),
        ("node[001-003]", ["node001", "node002", "node003"]),
        ("gpu-a[08-10,12],login2", ["gpu-a08", "gpu-a09", "gpu-a10", "gpu-a12", "login2"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ],
)
def test_hostlist_expansion_matches_scontrol(nodelist, hosts):
    assert print_layout.expand_hostlist(nodelist) == hosts


# ---------------------------------------------------------------------------------------------
# shipped configs
# ---------------------------------------------------------------------------------------------


def test_configs_are_shipped():
    assert set(SHIPPED_CONFIGS) >= {"configs/tiny.yaml", *PAPER_CONFIGS}


@pytest.mark.parametrize("path", SHIPPED_CONFIGS)
def test_every_shipped_config_loads(path):
    job = load_config(REPO / path)
    assert job.model.vocab_size % 128 == 0
    assert job.training.seq_length <= job.model.max_seq_length
    assert job.checkpoint.save, (
        "every shipped config saves checkpoints (resume/requeue relies on it)"
    )


@pytest.mark.parametrize("path", sorted(PAPER_CONFIGS))
def test_paper_configs_match_the_released_models(path):
    want = PAPER_CONFIGS[path]
    job = load_config(REPO / path)
    m, p, t = job.model, job.parallel, job.training
    assert (m.hidden_size, m.num_layers, m.resolved_ffn_hidden_size()) == (
        want["hidden"],
        want["layers"],
        want["ffn"],
    )
    assert m.resolved_layer_pattern() == "ME" * (want["layers"] // 2)
    assert (m.num_experts, m.moe_topk, m.routing) == (8, 1, "sinkhorn")
    assert (m.d_state, m.d_conv, m.expand, m.vocab_size, m.max_seq_length) == (
        16,
        4,
        2,
        50304,
        2048,
    )
    assert m.tie_embeddings and not m.add_bias_linear
    assert m.num_experts % p.ep == 0 and p.ep == 8 and p.tp == 1 and p.pp == 1
    assert p.distributed_optimizer
    assert t.seq_length == 2048 and t.precision == "bf16"
    assert t.global_batch_size * t.seq_length == 1024 * 2048  # ~2M tokens per step
    assert t.train_tokens == 300e9 and t.train_iters == 0 and t.resolved_train_iters() == 143_052
    assert t.min_lr == pytest.approx(0.1 * t.lr)
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    assert t.lr_decay_style == "cosine" and t.warmup_iters == 2000
    assert "/path/to/gpt-neox-20b/tokenizer.json" == job.data.tokenizer
    assert job.data.blend.endswith("blend.txt")


@pytest.mark.parametrize("path", sorted(PAPER_CONFIGS))
@pytest.mark.parametrize("nnodes", [1, 2, 4, 16])
def test_paper_layouts_are_valid_on_8_gpu_nodes(path, nnodes):
    job = load_config(REPO / path)
    errors, warnings, info = print_layout.check_layout(job, nnodes, 8)
    assert errors == [] and warnings == []
    assert info["dp"] == 8 * nnodes and info["expert_dp"] == nnodes and info["local_experts"] == 1
    assert info["microbatches"] == 1024 // (job.training.micro_batch_size * 8 * nnodes)


def test_layout_check_catches_what_the_trainer_would_reject():
    job = load_config(REPO / "configs/blackmamba-340m-1.5b.yaml")
    errors, _, _ = print_layout.check_layout(job, 1, 6)  # 6 ranks: ep=8 cannot fit
    assert any("ep*etp = 8 must divide" in e for e in errors)


def test_tiny_config_fits_the_sample_tokenizer_and_one_or_two_ranks():
    import json

    job = load_config(REPO / "configs/tiny.yaml")
    vocab = json.loads((REPO / "data/sample/tokenizer.json").read_text())
    n_tokens = len(vocab["model"]["vocab"]) + sum(
        t["id"] >= len(vocab["model"]["vocab"]) for t in vocab["added_tokens"]
    )
    assert n_tokens <= job.model.vocab_size < n_tokens + 128
    assert job.data.blend == "sample" and job.checkpoint.save == "runs/tiny/ckpt"
    assert job.logging.metrics_jsonl == "runs/tiny/metrics.jsonl"
    assert 4 <= job.model.num_layers <= 6 and 64 <= job.model.hidden_size <= 128
    assert 128 <= job.training.seq_length <= 256 and 200 <= job.training.train_iters <= 300
    for world in (1, 2):
        errors, _, _ = print_layout.check_layout(job, 1, world)
        assert errors == [], errors


def _count_params(m) -> tuple[int, int]:
    """(total, active) parameters of the unsharded model, by hand.

    Agrees exactly with megatron_blackmamba.model.param_count.count_parameters (which builds the
    model: 1,458,462,072 / 343,694,712 and 2,783,213,584 / 628,770,832 for the two paper configs;
    `python launch/print_layout.py --check-only --params CONFIG` prints it) but costs no megatron
    import, which would take most of this file's time budget.
    """
    d, di, n, k, r = (
        m.hidden_size,
        m.expand * m.hidden_size,
        m.d_state,
        m.d_conv,
        m.resolved_dt_rank(),
    )
    f, e = m.resolved_ffn_hidden_size(), m.num_experts
    mamba = (
        d  # pre-norm
        + 2 * di * d  # in_proj (x and z)
        + di * k
        + di  # depthwise conv + bias
        + (r + 2 * n) * di  # x_proj -> dt, B, C
        + r * di
        + di  # dt_proj + bias
        + di * n
        + di  # A_log, D
        + d * di
    )  # out_proj
    expert = d * f * (1 if m.activation == "gelu" else 2) + f * d
    moe_shared = d + e * d + (e if m.router_bias else 0)  # pre-norm, router (+ bias)
    pattern = m.resolved_layer_pattern()
    total = (
        m.vocab_size * d * (1 if m.tie_embeddings else 2)
        + pattern.count("M") * mamba
        + pattern.count("E") * (moe_shared + e * expert)
        + d * (2 if m.final_norm == "layernorm" else 1)
    )
    return total, total - pattern.count("E") * (e - m.moe_topk) * expert


@pytest.mark.parametrize("path", sorted(PAPER_CONFIGS))
def test_paper_configs_have_the_published_parameter_counts(path):
    want = PAPER_CONFIGS[path]
    total, active = _count_params(load_config(REPO / path).model)
    assert total == pytest.approx(want["total"], rel=0.05), total
    assert active == pytest.approx(want["active"], rel=0.05), active
