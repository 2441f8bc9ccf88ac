#!/usr/bin/env python3
"""Check a parallel layout against a config and show exactly what a SLURM launch would run.

    # what `sbatch launch/blackmamba.sbatch CONFIG [overrides]` runs on a 2-node x 8-GPU
    # allocation: simulated SLURM variables, the batch script in dry-run mode, nothing executed
    python launch/print_layout.py --nnodes 2 --gpus-per-node 8 configs/blackmamba-340m-1.5b.yaml

    # only the layout arithmetic (the batch script calls this before it starts srun)
    python launch/print_layout.py --check-only --nnodes 2 --gpus-per-node 8 CONFIG [overrides]

    # add total / active parameter counts (builds the model on the meta device; imports megatron)
    python launch/print_layout.py --check-only --params CONFIG

    # expand a SLURM host list without scontrol
    python launch/print_layout.py --hostnames 'gpu-[001-002,010]'

Only ``megatron_blackmamba.config`` is imported unless ``--params`` is given, so this runs in a
second on a login node. Exit status: 0 layout valid, 2 layout or config invalid.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "launch" / "blackmamba.sbatch"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------
# SLURM host lists
# ---------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """'a[1-2],b,c[3,5]' -> ['a[1-2]', 'b', 'c[3,5]'] (commas inside brackets do not split)."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_range_set(body: str) -> list[str]:
    """'001-003,7' -> ['001', '002', '003', '7'] (zero padding kept from the range start)."""
    out = []
    for item in body.split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {item!r} in host list")
            width = len(lo) if lo.startswith("0") else 0
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        elif item:
            out.append(item)
    return out


def expand_hostlist(text: str) -> list[str]:
    """What ``scontrol show hostnames`` prints for a SLURM node list, in order."""
    hosts: list[str] = []
    for entry in _split_top_level(text.strip()):
        pieces = re.split(r"(\[[^\]]*\])", entry)
        choices = [_expand_range_set(p[1:-1]) if p.startswith("[") else [p] for p in pieces if p]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def compact_hostlist(prefix: str, count: int, width: int = 3) -> str:
    """'node', 2 -> 'node[001-002]' (the form SLURM_JOB_NODELIST takes)."""
    if count == 1:
        return f"{prefix}{1:0{width}d}"
    return f"{prefix}[{1:0{width}d}-{count:0{width}d}]"


# ---------------------------------------------------------------------------------------------
# Layout arithmetic
# ---------------------------------------------------------------------------------------------


def check_layout(job, nnodes: int, gpus_per_node: int) -> tuple[list[str], list[str], dict]:
    """(errors, warnings, derived numbers) for running ``job`` on nnodes x gpus_per_node ranks:
    the trainer's own config checks (megatron_blackmamba.config.checks) at that world size."""
    from megatron_blackmamba.config import check_job

    world = nnodes * gpus_per_node
    result = check_job(job, world, gpus_per_node)
    info = {
        "world": world,
        "nnodes": nnodes,
        "gpus_per_node": gpus_per_node,
        **result.info,
        "tokens_per_step": job.training.global_batch_size * job.training.seq_length,
        "train_iters": job.training.resolved_train_iters(),
    }
    return result.errors, result.warnings, info


def layout_report(
    config: str,
    overrides: Sequence[str],
    nnodes: int,
    gpus_per_node: int,
    with_params: bool = False,
) -> tuple[int, str]:
    """(exit status, text) for --check-only."""
    from megatron_blackmamba.config import load_config

    try:
        job = load_config(config, list(overrides))
    except (ValueError, FileNotFoundError) as exc:
        return 2, f"config error: {exc}"
    errors, warnings, info = check_layout(job, nnodes, gpus_per_node)
    m, t, p = job.model, job.training, job.parallel
    lines = [
        f"config     : {config}" + (f"  overrides: {' '.join(overrides)}" if overrides else ""),
        f"ranks      : {nnodes} node(s) x {gpus_per_node} = {info['world']}",
        (
            f"parallel   : tp={p.tp} pp={p.pp} ep={p.ep} etp={info['etp']} ->"
            f" dp={info.get('dp') or '?'}, expert dp={info.get('expert_dp') or '?'},"
            f" {info.get('local_experts', '?')} expert(s) per rank per MoE layer,"
            f" distributed_optimizer={str(p.distributed_optimizer).lower()}"
        ),
        (
            f"model      : {m.num_layers} layers"
            f" '{info['pattern'][:12]}{'...' if len(info['pattern']) > 12 else ''}', hidden"
            f" {m.hidden_size}, {m.num_experts} experts top-{m.moe_topk} ({m.routing}), ffn"
            f" {m.resolved_ffn_hidden_size()} {m.activation}, vocab {m.vocab_size}"
        ),
        (
            f"batch      : global {t.global_batch_size} x seq {t.seq_length} ="
            f" {info['tokens_per_step']:,} tokens/step; micro {t.micro_batch_size} ->"
            f" {info.get('microbatches', '?')} micro-batch(es) per rank per step"
        ),
        f"schedule   : {info['train_iters']:,} steps"
        + ("" if t.train_iters else f" (train_tokens {t.train_tokens:.3g})")
        + f", warmup {t.warmup_iters}, lr {t.lr:g} -> {t.min_lr:g} {t.lr_decay_style}, precision"
        f" {t.precision}",
        (
            f"checkpoint : {job.checkpoint.save or '(saving disabled)'} every"
            f" {job.checkpoint.save_interval} steps"
        ),
    ]
    if with_params:
        lines.append(f"parameters : {_count_parameters(job)}")
    lines += [f"WARNING    : {w}" for w in warnings]
    lines += [f"ERROR      : {e}" for e in errors]
    lines.append("layout     : " + ("INVALID" if errors else "ok"))
    return (2 if errors else 0), "\n".join(lines)


def _count_parameters(job) -> str:
    """Unsharded counts via the model's own counter (meta device, one local gloo rank)."""
    from megatron_blackmamba.training.preflight import count_model_parameters

    return count_model_parameters(job).describe()


# ---------------------------------------------------------------------------------------------
# Simulated SLURM allocation -> the batch script's dry run
# ---------------------------------------------------------------------------------------------


def slurm_env(
    nnodes: int,
    gpus_per_node: int,
    job_id: int,
    nodelist: str,
    cpus_per_task: int,
    job_name: str = "blackmamba",
    base: dict | None = None,
) -> dict:
    """The variables sbatch sets in the batch shell for --nodes=N --ntasks-per-node=G
    --gpus-per-node=G."""
    env = dict(os.environ if base is None else base)
    # A clean allocation: nothing inherited from an outer torchrun/srun.
    for key in list(env):
        if key.startswith("SLURM_") or key in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        ):
            del env[key]
    env.update(
        {
            "SLURM_JOB_ID": str(job_id),
            "SLURM_JOBID": str(job_id),
            "SLURM_JOB_NAME": job_name,
            "SLURM_JOB_NODELIST": nodelist,
            "SLURM_NODELIST": nodelist,
            "SLURM_JOB_NUM_NODES": str(nnodes),
            "SLURM_NNODES": str(nnodes),
            "SLURM_NTASKS": str(nnodes * gpus_per_node),
            "SLURM_NPROCS": str(nnodes * gpus_per_node),
            "SLURM_NTASKS_PER_NODE": str(gpus_per_node),
            "SLURM_TASKS_PER_NODE": (
                f"{gpus_per_node}(x{nnodes})" if nnodes > 1 else str(gpus_per_node)
            ),
            "SLURM_GPUS_ON_NODE": str(gpus_per_node),
            "SLURM_GPUS_PER_NODE": str(gpus_per_node),
            "SLURM_CPUS_PER_TASK": str(cpus_per_task),
            "SLURM_SUBMIT_DIR": str(REPO),
            "SLURM_SUBMIT_HOST": "login01",
        }
    )
    return env


def simulate(
    config: str,
    overrides: Sequence[str],
    nnodes: int,
    gpus_per_node: int,
    job_id: int,
    nodelist: str,
    cpus_per_task: int,
) -> int:
    env = slurm_env(nnodes, gpus_per_node, job_id, nodelist, cpus_per_task)
    env["DRY_RUN"] = "1"
    cmd = ["bash", str(SBATCH), "--dry-run", config, *overrides]
    return subprocess.run(cmd, env=env, cwd=REPO).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", help="configs/X.yaml")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    parser.add_argument("--nnodes", type=int, default=2, help="nodes (default 2)")
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs = ranks per node (default 8)"
    )
    parser.add_argument(
        "--cpus-per-task", type=int, default=8, help="simulated SLURM_CPUS_PER_TASK (default 8)"
    )
    parser.add_argument(
        "--job-id", type=int, default=4242, help="simulated SLURM_JOB_ID (default 4242)"
    )
    parser.add_argument(
        "--nodelist", default="", help="simulated SLURM_JOB_NODELIST (default node[001-NNN])"
    )
    parser.add_argument(
        "--check-only", action="store_true", help="layout arithmetic only; no batch-script dry run"
    )
    parser.add_argument(
        "--params",
        action="store_true",
        help="also count total/active parameters (imports megatron)",
    )
    parser.add_argument(
        "--hostnames",
        metavar="NODELIST",
        help="print the expanded host list, one per line, and exit",
    )
    args = parser.parse_intermixed_args(argv)

    if args.hostnames is not None:
        try:
            print("\n".join(expand_hostlist(args.hostnames)))
        except ValueError as exc:
            print(f"print_layout: {exc}", file=sys.stderr)
            return 2
        return 0
    if not args.config:
        parser.error("a config file is required (e.g. configs/blackmamba-340m-1.5b.yaml)")
    if args.nnodes < 1 or args.gpus_per_node < 1:
        parser.error("--nnodes and --gpus-per-node must be >= 1")

    rc, text = layout_report(
        args.config, args.overrides, args.nnodes, args.gpus_per_node, args.params
    )
    if args.check_only or rc:
        print(text, file=sys.stdout if rc == 0 else sys.stderr)
        return rc
    nodelist = args.nodelist or compact_hostlist("node", args.nnodes)
    if len(expand_hostlist(nodelist)) != args.nnodes:
        parser.error(f"--nodelist {nodelist!r} does not name {args.nnodes} hosts")
    if args.params:
        print(text)
    sys.stdout.flush()
    return simulate(
        args.config,
        args.overrides,
        args.nnodes,
        args.gpus_per_node,
        args.job_id,
        nodelist,
        args.cpus_per_task,
    )


if __name__ == "__main__":
    sys.exit(main())
