"""Mixtures: a YAML list of sources -> one indexed dataset per source, a blend file, a summary.

The blend is what the training side consumes, in two equivalent files:
``blend.txt`` holds ``weight prefix weight prefix ...`` (megatron's ``--data-path`` syntax) and
``blend.json`` holds ``{"blend": [[weight, prefix], ...]}``. Weights are relative sampling
shares (megatron normalises them). The summary shows, per source, its tokens, its share of
the mixture and how many epochs of it a token budget (default 300e9) implies.

Config format (see ``configs/data/blackmamba_paper_mixture.yaml``)::

    token_budget: 300e9          # optional
    tokenizer: path/to/tokenizer.json   # optional; --tokenizer overrides
    sources:
      - name: pile               # [A-Za-z0-9_.-]+, unique; output is DIR/pile/pile_text_document
        reader: pile             # blackmamba-prep readers
        inputs: ["${DATA_ROOT}/pile/train/*.jsonl.zst"]   # globs, ~ and $VARS expanded
        weight: 0.3
        filters: {include_subsets: [], exclude_subsets: [Books3]}   # optional
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .build import DEFAULT_SHARD_BYTES, BuildResult, BuildSpec, build
from .fileio import AtomicFile, write_json_atomic
from .issues import InputError
from .readers import READERS
from .stats import format_table
from .tokenizer import EOD_TOKEN
from .writer import idx_path, read_index

DEFAULT_TOKEN_BUDGET = 300e9
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_SOURCE_KEYS = {"name", "reader", "inputs", "weight", "filters"}
_FILTER_KEYS = {"include_subsets", "exclude_subsets"}


@dataclass(frozen=True)
class Source:
    name: str
    reader: str
    inputs: Tuple[str, ...]
    weight: float
    include_subsets: Tuple[str, ...] = ()
    exclude_subsets: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Mixture:
    sources: Tuple[Source, ...]
    token_budget: float = DEFAULT_TOKEN_BUDGET
    tokenizer: Optional[str] = None


def load_mixture(path: str) -> Mixture:
    """Parse and validate a mixture YAML; every mistake is reported with the source it is in."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"cannot read mixture config {path}: {error}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("sources"), list)
        or not data["sources"]
    ):
        raise InputError(f"{path}: expected a mapping with a non-empty 'sources' list")
    unknown = set(data) - {"sources", "token_budget", "tokenizer"}
    if unknown:
        raise InputError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    sources = [_source(path, i, raw) for i, raw in enumerate(data["sources"])]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise InputError(f"{path}: source names must be unique, got {names}")
    budget = _number(path, "token_budget", data.get("token_budget", DEFAULT_TOKEN_BUDGET))
    tokenizer = data.get("tokenizer")
    return Mixture(
        tuple(sources),
        budget,
        os.path.expandvars(tokenizer) if isinstance(tokenizer, str) else None,
    )


def _source(path: str, index: int, raw: Any) -> Source:
    where = f"{path}: sources[{index}]"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a mapping")
    unknown = set(raw) - _SOURCE_KEYS
    missing = {"name", "reader", "inputs", "weight"} - set(raw)
    if unknown or missing:
        raise InputError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    name = str(raw["name"])
    if not _NAME.match(name):
        raise InputError(f"{where}: name {name!r} must match {_NAME.pattern}")
    if raw["reader"] not in READERS:
        raise InputError(f"{where}: unknown reader {raw['reader']!r}; known: {', '.join(READERS)}")
    inputs = raw["inputs"] if isinstance(raw["inputs"], list) else [raw["inputs"]]
    weight = _number(where, "weight", raw["weight"])
    if weight <= 0:
        raise InputError(f"{where}: weight must be > 0, got {weight}")
    filters = raw.get("filters") or {}
    if not isinstance(filters, dict) or set(filters) - _FILTER_KEYS:
        raise InputError(f"{where}: filters may only hold {sorted(_FILTER_KEYS)}")
    return Source(
        name,
        raw["reader"],
        tuple(str(i) for i in inputs),
        weight,
        tuple(filters.get("include_subsets") or ()),
        tuple(filters.get("exclude_subsets") or ()),
    )


def _number(where: str, key: str, value: Any) -> float:
    try:
        number = float(value)  # YAML reads 300e9 (no dot) as a string
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise InputError(f"{where}: {key} must be a finite number, got {value!r}")
    return number


def build_arguments(
    mixture: Mixture,
    output_dir: str,
    tokenizer: Optional[str] = None,
    eod_token: str = EOD_TOKEN,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> List[Tuple[str, List[str]]]:
    """(source name, ``blackmamba-prep build`` arguments) per source: what ``run_mixture``
    builds, for running each source as its own job array (launch/prep_submit.sh)."""
    tokenizer = tokenizer or mixture.tokenizer
    if not tokenizer:
        raise InputError("no tokenizer: pass --tokenizer or set 'tokenizer' in the mixture config")
    builds = []
    for source in mixture.sources:
        args = [
            "--reader",
            source.reader,
            "--input",
            *source.inputs,
            "--tokenizer",
            tokenizer,
            "--output",
            source_prefix(output_dir, source.name),
            "--eod-token",
            eod_token,
            "--shard-size-mb",
            f"{shard_bytes / (1 << 20):g}",
        ]
        for name in source.include_subsets:
            args += ["--include-subset", name]
        for name in source.exclude_subsets:
            args += ["--exclude-subset", name]
        builds.append((source.name, args))
    return builds


def source_prefix(output_dir: str, name: str) -> str:
    return os.path.join(os.path.abspath(output_dir), name, f"{name}_text_document")


def write_blend(pairs: Sequence[Tuple[float, str]], output_dir: str) -> Tuple[str, str]:
    """Write ``blend.txt`` and ``blend.json`` (absolute prefixes) into ``output_dir``."""
    text_path = os.path.join(output_dir, "blend.txt")
    json_path = os.path.join(output_dir, "blend.json")
    with_abs = [(float(w), os.path.abspath(p)) for w, p in pairs]
    for _, prefix in with_abs:
        if any(c.isspace() for c in prefix):
            raise InputError(
                f"prefix {prefix!r} contains whitespace, which the blend format "
                "(and megatron's --data-path) cannot carry"
            )
    with AtomicFile(text_path) as f:
        f.write((" ".join(f"{w!r} {p}" for w, p in with_abs) + "\n").encode("utf-8"))
    write_json_atomic(json_path, {"blend": [[w, p] for w, p in with_abs]})
    return text_path, json_path


def read_blend(path: str) -> List[Tuple[float, str]]:
    """Read a blend file (text ``w p w p ...`` or JSON ``{"blend": [[w, p], ...]}``).

    Relative prefixes are taken relative to the blend file's folder.
    """
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if content.lstrip().startswith("{"):
        try:
            entries = json.loads(content).get("blend")
        except ValueError:
            entries = None
        if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 2 for e in entries
        ):
            raise InputError(f'{path}: expected {{"blend": [[weight, prefix], ...]}}')
        raw = [(e[0], e[1]) for e in entries]
    else:
        words = content.split()
        if len(words) % 2:
            raise InputError(f"{path}: expected 'weight prefix' pairs, got {len(words)} words")
        raw = list(zip(words[0::2], words[1::2]))
    folder = os.path.dirname(os.path.abspath(path))
    pairs = []
    for weight, prefix in raw:
        value = _number(path, f"weight of {prefix}", weight)
        if value <= 0:
            raise InputError(f"{path}: weight of {prefix} must be > 0")
        pairs.append((value, os.path.join(folder, str(prefix))))
    if not pairs:
        raise InputError(f"{path}: empty blend")
    return pairs


def read_megatron_blend(path: str) -> Tuple[List[str], List[float]]:
    """A blend file as megatron's ``BlendedMegatronDatasetConfig.blend``: (prefixes, weights)."""
    pairs = read_blend(path)
    return [p for _, p in pairs], [w for w, _ in pairs]


def summary_table(sources: Sequence[Tuple[str, float, str]], token_budget: float) -> str:
    """Per source (name, weight, prefix): documents, tokens, share, epochs at ``token_budget``."""
    total_weight = sum(weight for _, weight, _ in sources)
    rows: List[Tuple[object, ...]] = []
    for name, weight, prefix in sources:
        share = weight / total_weight
        drawn = share * token_budget
        if not os.path.exists(idx_path(prefix)):
            rows.append((name, "-", "not built", f"{100 * share:.2f}%", f"{drawn:.3g}", "-"))
            continue
        _, lengths, documents = read_index(prefix)
        tokens = int(lengths.sum(dtype=np.int64))
        epochs = f"{drawn / tokens:,.2f}" if tokens else "inf"
        rows.append(
            (name, len(documents) - 1, tokens, f"{100 * share:.2f}%", f"{drawn:.3g}", epochs)
        )
    table = format_table(("source", "documents", "tokens", "share", "tokens drawn", "epochs"), rows)
    return f"token budget {token_budget:.4g} tokens\n{table}"


@dataclass
class MixtureResult:
    blend: List[Tuple[float, str]]
    blend_files: Tuple[str, str]
    builds: List[BuildResult]
    summary: str


def run_mixture(
    mixture: Mixture,
    output_dir: str,
    tokenizer: Optional[str] = None,
    eod_token: str = EOD_TOKEN,
    workers: int = 1,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    strict: bool = False,
    progress: bool = True,
    build_sources: bool = True,
    token_budget: Optional[float] = None,
) -> MixtureResult:
    """Build every source (resumably) unless ``build_sources`` is false, then write the blend
    files and ``summary.txt`` into ``output_dir``."""
    tokenizer = tokenizer or mixture.tokenizer
    if build_sources and not tokenizer:
        raise InputError("no tokenizer: pass --tokenizer or set 'tokenizer' in the mixture config")
    os.makedirs(output_dir, exist_ok=True)
    builds = []
    for source in mixture.sources:
        prefix = source_prefix(output_dir, source.name)
        if build_sources:
            assert tokenizer is not None
            builds.append(
                build(
                    BuildSpec(
                        reader=source.reader,
                        inputs=source.inputs,
                        tokenizer=tokenizer,
                        output=prefix,
                        eod_token=eod_token,
                        workers=workers,
                        shard_bytes=shard_bytes,
                        include_subsets=source.include_subsets,
                        exclude_subsets=source.exclude_subsets,
                        strict=strict,
                        progress=progress,
                    )
                )
            )
        elif not os.path.exists(idx_path(prefix)):
            raise InputError(
                f"source {source.name!r} is not built yet ({prefix}); "
                "run without --summary-only first"
            )
    blend = [(source.weight, source_prefix(output_dir, source.name)) for source in mixture.sources]
    files = write_blend(blend, output_dir)
    summary = summary_table(
        [(s.name, w, p) for s, (w, p) in zip(mixture.sources, blend)],
        token_budget or mixture.token_budget,
    )
    with AtomicFile(os.path.join(output_dir, "summary.txt")) as f:
        f.write((summary + "\n").encode("utf-8"))
    return MixtureResult(blend, files, builds, summary)
