"""Save, find and load training checkpoints.

Layout on disk::

    SAVE_DIR/iter_0001000/   one megatron dist_checkpointing (torch_dist) checkpoint
        config.yaml                  the resolved job config it was saved under
        tokenizer.json               a copy of the tokenizer its data was prepared with
        blackmamba_checkpoint.json   written last: iteration, layout, every file and its size
    SAVE_DIR/latest          text: the newest committed iteration directory name

Atomicity: ranks write into ``iter_XXXXXXX.tmp``; only after every rank has finished does rank 0
write the manifest and ``os.replace`` the directory into place, then repoint ``latest`` the same
way. A crash at any moment leaves either the previous checkpoint as the newest committed one or
the new one complete. On load, a checkpoint whose manifest is missing or whose files do not
match it (truncated, deleted) is refused with the reason logged, and the next older one is used.

Model weights and optimizer state are saved as layout-free sharded tensors (the optimizer in
megatron's ``fully_reshardable`` form), so a checkpoint saved at one TP/PP/EP/DP layout loads at
another. RNG states are per rank and only restored when the layout is unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_blackmamba.config import JobConfig, apply_dict, load_config, parse_override, to_yaml

logger = logging.getLogger(__name__)

MANIFEST = "blackmamba_checkpoint.json"
LATEST = "latest"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
# Layout-free optimizer state: "fully_reshardable" for the distributed optimizer, and no
# "chained_N." prefix (dense and expert optimizers are chained only when EP > 1).
OPTIMIZER_FORMAT = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}


class CheckpointError(RuntimeError):
    pass


def _unwrap(model: list[torch.nn.Module]) -> torch.nn.Module:
    if len(model) != 1:
        raise CheckpointError(
            "BlackMamba checkpoints hold one model chunk per rank (no virtual pipeline)"
        )
    chunk = model[0]
    return getattr(chunk, "module", chunk)


def _layout() -> dict[str, int]:
    return {
        "world": dist.get_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_object() -> ShardedObject:
    """This rank's RNG states, addressed by (pp, tp, dp) rank so each rank gets its own back."""
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _sharded_state(model, optimizer, scheduler, is_loading: bool, with_rng: bool) -> dict[str, Any]:
    module = _unwrap(model)
    model_sd = module.sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=OPTIMIZER_FORMAT
        )
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng"] = _rng_object()
    return state


def _manifest_files(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all (written beside it, synced, renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    model: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    job=None,
    consumed_samples: int = 0,
    keep_last: int = 0,
    tokenizer: Optional[str | Path] = None,
) -> Path:
    """Collective: every rank calls it. Returns the committed directory.

    With ``job`` the checkpoint carries its ``config.yaml``, with ``tokenizer`` a copy of that
    file, so generation, evaluation and conversion need nothing but the checkpoint."""
    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(model, optimizer, scheduler, is_loading=False, with_rng=True)
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if rank0:
        if job is not None:
            write_text_atomic(tmp / CONFIG, to_yaml(job))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        manifest = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "layout": _layout(),
            "has_optimizer": optimizer is not None,
            "config": job.to_dict() if job is not None else None,
            "files": _manifest_files(tmp),
        }
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(save_dir / LATEST, final.name)
        if keep_last:
            _prune(save_dir, keep_last)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def _committed(save_dir: Path) -> list[Path]:
    return sorted(
        (p for p in save_dir.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")),
        reverse=True,
    )


def _prune(save_dir: Path, keep_last: int) -> None:
    for old in _committed(save_dir)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)


def verify(directory: Path) -> Optional[str]:
    """None if the checkpoint is complete and intact, else why not."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (the save never committed)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        return f"{manifest_path} is not valid JSON ({e})"
    for name, size in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return (
                f"{path} has {path.stat().st_size} bytes, the manifest says {size} (truncated or"
                " overwritten)"
            )
    return None


def find_resumable(load_dir: str | Path) -> Optional[Path]:
    """Newest intact checkpoint under ``load_dir`` (``latest`` first), or None. Rank-local, no I/O
    writes."""
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        return None
    candidates: list[Path] = []
    pointer = load_dir / LATEST
    if pointer.is_file():
        candidates.append(load_dir / pointer.read_text().strip())
    candidates += [p for p in _committed(load_dir) if p not in candidates]
    for candidate in candidates:
        problem = verify(candidate)
        if problem is None:
            return candidate
        logger.warning("skipping checkpoint %s: %s", candidate, problem)
    return None


def load_checkpoint(
    load_dir: str | Path,
    model: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    required: bool = True,
) -> Optional[dict[str, Any]]:
    """Collective. Loads the newest intact checkpoint; returns {"iteration", "consumed_samples",
    "path"}.

    ``load_dir`` may also name one ``iter_*`` directory. Model-only when ``optimizer`` is None.
    With ``required=False`` an empty or missing ``load_dir`` returns None (a fresh start).
    Rank 0 alone chooses the checkpoint, so skipped ones are reported once, not by every rank.
    """
    load_dir = Path(load_dir)
    chosen = [None]
    if dist.get_rank() == 0:
        found = _choose(load_dir)
        chosen[0] = str(found) if found else None
    dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        if not required:
            return None
        raise CheckpointError(f"no intact checkpoint under {load_dir}")
    path = Path(chosen[0])
    manifest = json.loads((path / MANIFEST).read_text())
    if optimizer is not None and not manifest["has_optimizer"]:
        raise CheckpointError(
            f"{path} holds model weights only; resume with checkpoint.finetune=true"
        )
    same_layout = manifest["layout"] == _layout()
    state = _sharded_state(
        model, optimizer, scheduler, is_loading=True, with_rng=same_layout and optimizer is not None
    )
    if scheduler is None:
        state.pop("scheduler", None)
    loaded = dist_checkpointing.load(state, str(path))
    _unwrap(model).load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        torch.set_rng_state(loaded["rng"]["torch"])
        if loaded["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(loaded["rng"]["cuda"])
    if not same_layout:
        logger.info("resharded %s from layout %s to %s", path, manifest["layout"], _layout())
    logger.info("loaded checkpoint %s (iteration %d)", path, manifest["iteration"])
    return {
        "iteration": manifest["iteration"],
        "consumed_samples": manifest["consumed_samples"],
        "path": path,
    }


def _choose(path: Path) -> Optional[Path]:
    """The ``iter_*`` folder ``path`` names (refused if not intact), or the newest intact one
    under a save folder, or None when there is none."""
    if (path / MANIFEST).is_file() or path.name.startswith("iter_"):
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
        return path
    return find_resumable(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """Like ``_choose``, but a save folder without an intact checkpoint is an error."""
    found = _choose(Path(path))
    if found is None:
        raise CheckpointError(f"no intact checkpoint under {path}")
    return found


def checkpoint_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> JobConfig:
    """The job config a checkpoint was saved under (its ``config.yaml``, else its manifest's copy),
    with ``overrides`` applied on top."""
    directory = resolve_checkpoint(path)
    if (directory / CONFIG).is_file():
        return load_config(directory / CONFIG, overrides)
    saved = json.loads((directory / MANIFEST).read_text()).get("config")
    if saved is None:
        raise CheckpointError(f"{directory} holds no config (saved without one): pass --config")
    job = apply_dict(JobConfig(), saved, str(directory / MANIFEST))
    for text in overrides:
        apply_dict(job, parse_override(text), f"override {text!r}")
    return job


def checkpoint_tokenizer(path: str | Path) -> Optional[Path]:
    """The tokenizer.json a checkpoint carries, or None (saved without one)."""
    found = resolve_checkpoint(path) / TOKENIZER
    return found if found.is_file() else None
