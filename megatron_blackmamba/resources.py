"""Files that ship with the package: the configs and the bundled sample corpus.

The rule, the same for every tool: in a source checkout they are read where they are edited
(``configs/`` and ``data/sample/`` beside the package); in an installed wheel they are package
data under ``megatron_blackmamba/_bundled/`` (``configs/``, ``sample/``), which the wheel build
copies from those same folders (``[tool.setuptools.package-dir]`` in pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent


def _bundled(in_checkout: str, in_wheel: str) -> Path:
    source = _CHECKOUT / in_checkout
    if source.is_dir() and (_CHECKOUT / "pyproject.toml").is_file():
        return source
    return _PACKAGE / "_bundled" / in_wheel


def config_dir() -> Path:
    """The bundled configs (tiny.yaml, the paper models, data/ mixtures)."""
    return _bundled("configs", "configs")


def sample_dir() -> Path:
    """The bundled sample corpus (jsonl.zst) and its tokenizer.json."""
    return _bundled("data/sample", "sample")


def bundled_config(name: str) -> Optional[Path]:
    """The bundled config called ``name`` (``tiny``, ``tiny.yaml`` or ``configs/tiny.yaml``), or
    None."""
    relative = Path(name)
    if relative.parts[:1] == ("configs",):
        relative = Path(*relative.parts[1:])
    for candidate in (relative, relative.with_name(relative.name + ".yaml")):
        path = config_dir() / candidate
        if str(candidate) not in ("", ".") and path.is_file():
            return path
    return None


def list_configs() -> list[str]:
    """Names of the bundled configs, relative to the config folder."""
    root = config_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
