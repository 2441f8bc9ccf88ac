"""Preflight: everything a job can check before it asks for GPUs, in seconds, on a login node.

``blackmamba-train --preflight --config CONFIG [overrides]`` (the sbatch script runs it before
srun starts any rank). The config itself was already validated by the loader; this adds what
needs files: the model on the meta device (total / active parameters), the blend's ``.bin`` and
``.idx`` files, the tokenizer against ``model.vocab_size``, the largest token id of each dataset
(read from the index's dtype and a sample of documents, not the whole file), and the checkpoint
folder (writable; an existing checkpoint must hold this model). Every problem is listed, not only
the first, and the exit status is 1 if there was any.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_blackmamba.config import JobConfig, ModelConfig, check_job

# Model fields that decide the checkpoint's tensors: a checkpoint saved under other values cannot
# be resumed with this model.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "d_state",
    "d_conv",
    "expand",
    "num_experts",
    "activation",
    "add_bias_linear",
    "router_bias",
    "final_norm",
    "tie_embeddings",
    "moe_grouped_gemm",
)
SAMPLED_DOCUMENTS = 64


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, line: str, problem: str) -> None:
        (self.lines.append(line) if ok else self.problems.append(problem))


def preflight(job: JobConfig, world_size: int) -> int:
    report = run_checks(job, world_size)
    for line in report.lines:
        print(f"ok      : {line}")
    for problem in report.problems:
        print(f"PROBLEM : {problem}")
    print(
        "preflight:"
        f" {'FAILED, ' + str(len(report.problems)) + ' problem(s)' if report.problems else 'ok'}"
    )
    return 1 if report.problems else 0


def run_checks(job: JobConfig, world_size: int) -> Report:
    report = Report()
    layout = check_job(job, world_size)
    report.lines.append(
        f"config and layout (world size {world_size}, dp {layout.info.get('dp', '?')})"
    )
    report.lines += [f"warning: {w}" for w in layout.warnings]
    _check_model(job, report)
    _check_tokenizer(job, report)
    _check_datasets(job, report)
    _check_checkpoint_dir(job, report)
    return report


def _check_model(job: JobConfig, report: Report) -> None:
    try:
        counts = count_model_parameters(job)
    except Exception as exc:  # the model cannot be built from this config
        report.problems.append(f"model: cannot be built ({type(exc).__name__}: {exc})")
        return
    report.lines.append(f"model: {counts.describe()}")


@contextlib.contextmanager
def _alone() -> Iterator[None]:
    """This process as a one-rank job, whatever launch variables it inherited (the batch shell
    of an sbatch job has SLURM_PROCID and SLURM_NTASKS set)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def count_model_parameters(job: JobConfig):
    """Unsharded total / active counts from the model built on the meta device in one gloo rank."""
    from megatron_blackmamba.model.param_count import count_parameters
    from megatron_blackmamba.parallel.setup import destroy, init_distributed

    single = copy.deepcopy(job)
    single.parallel.tp = single.parallel.pp = single.parallel.ep = 1
    single.parallel.etp = 0
    single.parallel.backend = "gloo"
    single.parallel.moe_dispatcher = "allgather"
    with _alone():
        init_distributed(single.parallel, single.training.seed)
        try:
            return count_parameters(single)
        finally:
            destroy()


def _check_tokenizer(job: JobConfig, report: Report) -> None:
    from megatron_blackmamba.data_prep.tokenizer import load_tokenizer
    from megatron_blackmamba.training.data import tokenizer_path

    path = tokenizer_path(job)
    if not Path(path).is_file():
        report.problems.append(f"data.tokenizer: {path} does not exist")
        return
    try:
        vocab = load_tokenizer(path).vocab_size
    except Exception as exc:
        report.problems.append(f"data.tokenizer: {path} cannot be loaded ({exc})")
        return
    report.check(
        vocab <= job.model.vocab_size,
        f"tokenizer {path}: {vocab} tokens <= model.vocab_size {job.model.vocab_size}",
        f"data.tokenizer: {path} has {vocab} tokens but model.vocab_size={job.model.vocab_size}: "
        "raise model.vocab_size (a multiple of 128)",
    )


def _blend_prefixes(job: JobConfig, report: Report) -> list[str]:
    from megatron_blackmamba.data_prep.issues import InputError
    from megatron_blackmamba.data_prep.mixture import read_megatron_blend

    prefixes: list[str] = []
    for name in ("blend", "valid_blend"):
        spec = getattr(job.data, name)
        if not spec or spec in ("sample", "mock"):
            continue
        if not Path(spec).is_file():
            report.problems.append(f"data.{name}: blend file {spec} does not exist")
            continue
        try:
            prefixes += read_megatron_blend(spec)[0]
        except (InputError, OSError, ValueError) as exc:
            report.problems.append(f"data.{name}: {exc}")
    if job.data.blend in ("sample", "mock"):
        report.lines.append(
            f"data.blend={job.data.blend}: built from the bundled corpus on first use"
        )
    return prefixes


def _check_datasets(job: JobConfig, report: Report) -> None:
    from megatron_blackmamba.data_prep.writer import bin_path, idx_path

    for prefix in _blend_prefixes(job, report):
        missing = [p for p in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(p)]
        if missing:
            report.problems.append(
                f"dataset {prefix}: missing {' and '.join(missing)} (build it with blackmamba-prep)"
            )
            continue
        try:
            largest, how = largest_token_id(prefix)
        except (OSError, ValueError) as exc:
            report.problems.append(f"dataset {prefix}: {exc}")
            continue
        report.check(
            largest < job.model.vocab_size,
            f"dataset {prefix}: largest token id {largest} < model.vocab_size ({how})",
            f"dataset {prefix}: token id {largest} >= model.vocab_size={job.model.vocab_size}"
            f" ({how}): the data was tokenised with a larger vocabulary than the model has",
        )


def largest_token_id(prefix: str, documents: int = SAMPLED_DOCUMENTS) -> tuple[int, str]:
    """(largest token id in ``documents`` evenly spaced sequences, how it was found): the index
    gives the sequences and the token dtype, a sample of the data the ids, not the whole file."""
    from megatron_blackmamba.data_prep.writer import read_sequences

    tokens, offsets = read_sequences(prefix)
    count = len(offsets) - 1
    if count == 0:
        return -1, "empty dataset"
    picks = np.unique(np.linspace(0, count - 1, min(documents, count)).astype(np.int64))
    largest = max(int(tokens[offsets[i] : offsets[i + 1]].max(initial=0)) for i in picks)
    return largest, f"{len(picks)} of {count} sequences sampled, {tokens.dtype.name} tokens"


def _check_checkpoint_dir(job: JobConfig, report: Report) -> None:
    from megatron_blackmamba.checkpointing.store import MANIFEST, find_resumable

    ck = job.checkpoint
    if ck.save:
        report.check(*_writable(Path(ck.save)))
    for name in ("load", "save"):
        folder = getattr(ck, name)
        if not folder or not Path(folder).is_dir():
            if name == "load" and folder:
                report.problems.append(f"checkpoint.load: {folder} does not exist")
            continue
        found = find_resumable(folder)
        if found is None:
            if name == "load":
                report.problems.append(f"checkpoint.load: no intact checkpoint under {folder}")
            continue
        saved = (json.loads((found / MANIFEST).read_text()).get("config") or {}).get("model", {})
        differences = _architecture_differences(job.model, saved)
        report.check(
            not differences,
            f"checkpoint.{name}: {found} holds this model",
            f"checkpoint.{name}: {found} holds another model ({'; '.join(differences)}): "
            "use a new checkpoint.save folder, or the config it was saved with",
        )
        if name == "load" or not ck.load:
            break


def _architecture(model: ModelConfig) -> dict:
    return {
        **{f: getattr(model, f) for f in ARCHITECTURE_FIELDS},
        "layer_pattern": model.resolved_layer_pattern(),
        "ffn_hidden_size": model.resolved_ffn_hidden_size(),
        "dt_rank": model.resolved_dt_rank(),
    }


def _architecture_differences(model: ModelConfig, saved: dict) -> list[str]:
    """The architecture fields in which ``model`` differs from a checkpoint's saved model
    section."""
    if not saved:
        return []
    before = _architecture(
        ModelConfig(**{k: v for k, v in saved.items() if k in ModelConfig.__dataclass_fields__})
    )
    current = _architecture(model)
    return [
        f"model.{k}: checkpoint {before[k]!r}, config {current[k]!r}"
        for k in current
        if before[k] != current[k]
    ]


def _writable(folder: Path) -> tuple[bool, str, str]:
    """(ok, line, problem) for creating files in ``folder`` (or the nearest parent that exists)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return False, "", f"checkpoint.save: {existing} is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".preflight-"):
            pass
    except OSError as exc:
        return (
            False,
            "",
            (
                f"checkpoint.save: cannot write in {existing} ({exc.strerror}): choose a writable"
                " folder"
            ),
        )
    return True, f"checkpoint.save: {folder} is writable", ""
