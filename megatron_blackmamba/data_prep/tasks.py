"""One build split into N tasks (a SLURM job array), then finalized into one output.

Task ``I`` of ``N`` builds the input files assigned to it (``assign_files``: sorted paths cut
into N contiguous runs of about equal bytes, so no task reads another's files) into its own
folder ``PREFIX.shards/task-IIIII-of-NNNNN/``, with the single-machine build's per-shard resume,
atomic writes, bad-record accounting and lock. ``finalize`` merges every task's shards in input
order into ``PREFIX.bin/.idx``: the shards depend on their file's content alone and are merged
in the same order, so the output is byte-identical to a one-task build for any N.

``PREFIX.shards/plan.json`` is written by the first task to start and read by every other and
by finalize: the same output path, task count and build settings, or a clear refusal. Every
task must see one shared output folder under one path (a parallel filesystem mounted at the same
place on every node); a task that finds a plan made under another path says so.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .issues import InputError
from .shards import FileLock, Manifest, output_intact, shard_id
from .stats import Stats

PLAN_FORMAT = "data_prep-plan/1"


@dataclass(frozen=True)
class TaskSpec:
    """Which part of a build this process does: task ``index`` of ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(
                f"--task-index {self.index} must be in 0..{self.count - 1} "
                f"(--num-tasks {self.count})"
            )

    @property
    def name(self) -> str:
        return f"task-{self.index:05d}-of-{self.count:05d}"


def task_from_env(
    num_tasks: Optional[int], task_index: Optional[int], env: Optional[Dict[str, str]] = None
) -> TaskSpec:
    """--num-tasks / --task-index, each defaulting to the SLURM array's count / index."""
    env = os.environ if env is None else env
    if num_tasks is None and "SLURM_ARRAY_TASK_COUNT" in env:
        num_tasks = int(env["SLURM_ARRAY_TASK_COUNT"])
    if task_index is None and "SLURM_ARRAY_TASK_ID" in env:
        task_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    return TaskSpec(index=task_index or 0, count=num_tasks or 1)


def assign_files(sizes: Sequence[int], count: int) -> List[int]:
    """The task of each input file: N contiguous runs of the sorted inputs, cut where the running
    byte count passes k/N of the total (a file goes where its middle byte falls)."""
    total = max(sum(sizes), 1)
    owners, before = [], 0
    for size in sizes:
        owners.append(min(count - 1, int((before + size / 2) * count // total)))
        before += size
    return owners


def task_files(config: Dict[str, Any], task: TaskSpec) -> List[int]:
    """Indices (into the sorted inputs) of the files ``task`` builds."""
    owners = assign_files([f["size"] for f in config["inputs"]], task.count)
    return [i for i, owner in enumerate(owners) if owner == task.index]


def _plan_path(work_dir: str) -> str:
    return os.path.join(work_dir, "plan.json")


def check_plan(
    work_dir: str, output: str, config: Dict[str, Any], count: Optional[int], create: bool
) -> Dict[str, Any]:
    """The build's plan, written now if ``create`` and none exists; refused if it was made for
    another output path, task count (None: whatever it was made for) or settings."""
    path = _plan_path(work_dir)
    plan = {
        "format": PLAN_FORMAT,
        "output": output,
        "num_tasks": count,
        "config": config,
        "created_by": socket.gethostname(),
    }
    if not os.path.exists(path):
        if not create:
            raise InputError(
                f"{path} does not exist: no task of this build has started (submit the "
                "task array first)"
            )
        # The first task to get here publishes it whole (a hard link fails if the name exists);
        # the others read that one.
        tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(plan, f, indent=1)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
    with open(path, encoding="utf-8") as f:
        found = json.load(f)
    if found.get("output") != output:
        raise InputError(
            f"{path} was written by a task (on {found.get('created_by')}) that saw the output at"
            f" {found.get('output')}, and this one sees it at {output}: every task must see one"
            " shared output folder under the same path (the same parallel-filesystem mount on"
            " every node)"
        )
    if count is not None and found.get("num_tasks") != count:
        raise InputError(
            f"{path}: this build was started with --num-tasks {found.get('num_tasks')}, not "
            f"{count}; use the same count, or --restart to discard it"
        )
    if found.get("config") != config:
        changed = sorted(
            k
            for k in set(config) | set(found.get("config", {}))
            if config.get(k) != found.get("config", {}).get(k)
        )
        raise InputError(
            f"{path}: the build's tasks were started with different {', '.join(changed)}; "
            "rerun the original command, or add --restart to discard it"
        )
    return found


@dataclass
class TaskState:
    """What one task's manifest says: its files, shards, tokens, bad records and timing."""

    task: TaskSpec
    started: bool
    complete: bool
    files_done: int
    files: int
    shards_done: int
    shards_seen: int
    stats: Stats
    bytes_done: int
    started_at: Optional[float]
    updated_at: Optional[float]
    unfinished: List[str]


def task_state(work_dir: str, config: Dict[str, Any], task: TaskSpec) -> TaskState:
    """``task``'s state from its manifest under ``work_dir`` (not started if it has none)."""
    path = os.path.join(work_dir, task.name, "manifest.json")
    if os.path.exists(path):
        return manifest_state(Manifest.load(path), config, task)
    indices = task_files(config, task)
    return TaskState(
        task,
        False,
        False,
        0,
        len(indices),
        0,
        0,
        Stats(),
        0,
        None,
        None,
        [config["inputs"][i]["path"] for i in indices],
    )


def manifest_state(manifest: Manifest, config: Dict[str, Any], task: TaskSpec) -> TaskState:
    """What ``manifest`` (of ``task``, or of a one-task build) says is done."""
    data = manifest.data
    indices = task_files(config, task)
    stats, shards_done, files_done, bytes_done, unfinished = Stats(), 0, 0, 0, []
    for entry in data["shards"].values():
        if entry["status"] == "done":
            shards_done += 1
            stats.update(Stats.from_json(entry["stats"]))
    for i in indices:
        record = data["files"].get(str(i))
        if record is not None:
            stats.update(Stats.from_json(record["stats"]))
        if record is not None and all(
            data["shards"].get(shard_id(i, s), {}).get("status") == "done"
            for s in range(record["shards"])
        ):
            files_done += 1
            bytes_done += config["inputs"][i]["size"]
        else:
            unfinished.append(config["inputs"][i]["path"])
    complete = bool(data.get("complete") or data.get("merged"))
    return TaskState(
        task,
        True,
        complete,
        files_done,
        len(indices),
        shards_done,
        len(data["shards"]),
        stats,
        bytes_done,
        data.get("started_at"),
        data.get("updated_at"),
        unfinished,
    )


def all_task_states(work_dir: str, config: Dict[str, Any], count: int) -> List[TaskState]:
    return [task_state(work_dir, config, TaskSpec(i, count)) for i in range(count)]


def finalize_problems(states: Sequence[TaskState]) -> List[str]:
    """Why the tasks' shards cannot be merged yet: one line per missing or incomplete task."""
    problems = []
    for state in states:
        if not state.started:
            problems.append(
                f"{state.task.name}: never started ({state.files} input file(s): "
                f"{_some(state.unfinished)})"
            )
        elif not state.complete:
            problems.append(
                f"{state.task.name}: incomplete, {state.files_done} of {state.files} input files"
                f" done; unfinished: {_some(state.unfinished)}"
            )
    return problems


def _some(paths: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(os.path.basename(p) for p in paths[:limit])
    return (
        shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
        if paths
        else "none"
    )


def ordered_shard_prefixes(work_dir: str, config: Dict[str, Any], count: int) -> List[str]:
    """Every task's shards, in input order (file, then shard), each checked present."""
    found: List[Tuple[str, str]] = []
    for index in range(count):
        task = TaskSpec(index, count)
        manifest = Manifest.load(os.path.join(work_dir, task.name, "manifest.json"))
        prefixes = manifest.complete_shard_prefixes(task_files(config, task))
        found += [(os.path.basename(p), p) for p in prefixes]
    return [p for _, p in sorted(found)]


def lock_task(work_dir: str, task: TaskSpec) -> Tuple[str, FileLock]:
    """(this task's folder, its lock): a second process on the same task is refused."""
    folder = os.path.join(work_dir, task.name)
    os.makedirs(folder, exist_ok=True)
    try:
        return folder, FileLock(os.path.join(folder, "lock"), wait=False)
    except InputError:
        raise InputError(
            f"{task.name} of {work_dir} is being built by another process (its lock "
            f"{os.path.join(folder, 'lock')} is held); each task runs once at a time"
        ) from None


def merged_intact(work_dir: str, output: str) -> Optional[Dict[str, Any]]:
    """The finalized build's record if its output is present and whole, else None."""
    path = os.path.join(work_dir, "manifest.json")
    if not os.path.exists(path):
        return None
    merged = Manifest.load(path).merged
    return merged if merged and output_intact(output, merged["output"]) else None
