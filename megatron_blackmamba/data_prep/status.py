"""``blackmamba-prep status PREFIX``: how far a build is, read from its manifests alone.

Works while tasks run (manifests are rewritten atomically every few seconds) and after; reads
no input and needs none of the build's arguments. Rates are measured from the manifests'
timestamps: tokens/s is tokens written over the wall time since the first task started, and the
ETA assumes the remaining input bytes go at the rate the finished ones went.
"""

from __future__ import annotations

import json
import os
import time
from typing import List

from .issues import InputError
from .shards import Manifest
from .stats import Stats, format_table
from .tasks import TaskSpec, TaskState, all_task_states, manifest_state, merged_intact


def status_report(prefix: str) -> str:
    output = os.path.abspath(prefix)
    work_dir = output + ".shards"
    plan_path = os.path.join(work_dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path, encoding="utf-8") as f:
            plan = json.load(f)
        states = all_task_states(work_dir, plan["config"], plan["num_tasks"])
        config = plan["config"]
    elif os.path.exists(os.path.join(work_dir, "manifest.json")):
        manifest = Manifest.load(os.path.join(work_dir, "manifest.json"))
        config = manifest.data["config"]
        states = [manifest_state(manifest, config, TaskSpec())]
    else:
        raise InputError(
            f"{work_dir} holds no build (no plan.json or manifest.json): nothing started at"
            f" {prefix}"
        )
    return _report(output, work_dir, config, states)


def _report(output: str, work_dir: str, config: dict, states: List[TaskState]) -> str:
    total_bytes = sum(f["size"] for f in config["inputs"])
    rows = []
    stats = Stats()
    for s in states:
        state = "complete" if s.complete else "running or stopped" if s.started else "not started"
        rows.append(
            (
                s.task.index,
                state,
                f"{s.files_done}/{s.files}",
                s.shards_done,
                f"{s.stats.tokens:,}",
                sum(s.stats.skipped.values()),
            )
        )
        stats.update(s.stats)
    started = [s.started_at for s in states if s.started_at]
    updated = [s.updated_at for s in states if s.updated_at]
    done_bytes = sum(s.bytes_done for s in states)
    finalized = merged_intact(work_dir, output) is not None
    lines = [
        (
            f"{output}: {sum(s.complete for s in states)} of {len(states)} task(s) complete, "
            f"{sum(s.files_done for s in states)} of {len(config['inputs'])} input files "
            f"({_size(done_bytes)} of {_size(total_bytes)}), "
            f"{sum(s.shards_done for s in states)} shards done, {stats.tokens:,} tokens, "
            f"{stats.documents:,} documents"
        ),
        format_table(("task", "state", "files", "shards", "tokens", "bad records"), rows),
    ]
    if started and updated:
        elapsed = max(max(updated) - min(started), 1e-9)
        line = (
            f"rate: {stats.tokens / elapsed:,.0f} tokens/s over {elapsed / 3600:.2f} h since the"
            " first task started"
        )
        if done_bytes and done_bytes < total_bytes and not finalized:
            eta = (total_bytes - done_bytes) / (done_bytes / elapsed)
            line += (
                f"; ETA {eta / 3600:.2f} h (as of"
                f" {time.strftime('%H:%M:%S', time.localtime(max(updated)))})"
            )
        lines.append(line)
    lines.append(
        "bad records (skipped, counted): "
        + (
            ", ".join(f"{reason} {count:,}" for reason, count in sorted(stats.skipped.items()))
            or "none"
        )
    )
    lines.append(f"finalized: {'yes, ' + output + '.bin/.idx' if finalized else 'no'}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"
