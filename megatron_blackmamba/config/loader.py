"""Read a job config: defaults, then a YAML file, then ``section.field=value`` overrides.

Every value, from the file or the command line, is parsed by its field's declared type (a small
type-directed parser over the dataclasses in ``schema``): ``logging.run_name=0418`` stays the
string ``"0418"``, ``training.lr=3e-4`` is a float, ``checkpoint.save=null`` clears an optional
path, and a ``Literal`` field takes only its listed values. The YAML file is read with PyYAML's
``BaseLoader``, which keeps every scalar as text, so the file and the command line go through the
same parser. Unknown sections and fields, bad values and impossible layouts are all collected and
reported together, each with the field's name, the offending value and the nearest valid name.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from megatron_blackmamba.config.checks import check_job, closest
from megatron_blackmamba.config.schema import JobConfig
from megatron_blackmamba.resources import bundled_config

_NULLS = ("", "null", "Null", "NULL", "~")
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")


class ConfigError(ValueError):
    """A config that cannot run; ``problems`` holds one line per problem found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            "\n".join(self.problems)
            if len(self.problems) == 1
            else f"{len(self.problems)} config problems:\n  " + "\n  ".join(self.problems)
        )


@functools.cache
def field_types(section_cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the schema's annotations are strings under PEP 563)."""
    return typing.get_type_hints(section_cls)


def sections() -> dict[str, type]:
    """Section name -> its dataclass."""
    return {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}


def _choice_text(choices: Sequence[Any]) -> str:
    return " | ".join(str(c) for c in choices)


def parse_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` (text from YAML or the command line, or a Python value) as ``annotation``.

    Raises ValueError naming ``where`` (``section.field``), the value and what was expected.
    """
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value in choices:
            return value
        shown = value if isinstance(value, str) else repr(value)
        raise ValueError(
            f"{where}: {shown!r} is not one of {_choice_text(choices)}"
            f"{closest(str(value), [str(c) for c in choices])}"
        )
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip() in _NULLS):
            return None
        return parse_value(value, inner[0], where)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [parse_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        number = _number(value, where, "an integer")
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    if annotation is float:
        return float(_number(value, where, "a number"))
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected text, got {value!r}")
    raise TypeError(f"{where}: the config schema uses an unsupported type {annotation!r}")


def _number(value: Any, where: str, expected: str) -> int | float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected {expected}, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        for convert in (int, float):
            try:
                return convert(text)
            except ValueError:
                continue
    raise ValueError(f"{where}: expected {expected}, got {value!r}")


def apply_dict(cfg: JobConfig, values: dict, where: str) -> JobConfig:
    """Set ``{section: {field: value}}`` on ``cfg``; every problem is collected into one
    ConfigError."""
    problems: list[str] = []
    known = sections()
    for section, body in values.items():
        if section not in known:
            problems.append(
                f"{where}: unknown section {section!r}{closest(str(section), list(known))}; "
                f"sections: {', '.join(known)}"
            )
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(
                f"{where}: section {section!r} must be a mapping of fields, got {body!r}"
            )
            continue
        target = getattr(cfg, section)
        types_ = field_types(type(target))
        for name, value in body.items():
            if name not in types_:
                problems.append(
                    f"{where}: unknown field {section}.{name}{_nearest_field(section, str(name))}"
                )
                continue
            try:
                setattr(target, name, parse_value(value, types_[name], f"{section}.{name}"))
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
    if problems:
        raise ConfigError(problems)
    return cfg


def _nearest_field(section: str, name: str) -> str:
    """The hint for an unknown field: the same name in another section, else the nearest name."""
    elsewhere = [s for s, cls in sections().items() if name in field_types(cls)]
    if elsewhere:
        return f" (it belongs to section {elsewhere[0]}: {elsewhere[0]}.{name})"
    hint = closest(name, list(field_types(sections()[section])))
    return (
        hint.replace("did you mean ", f"did you mean {section}.")
        if hint
        else f"; see --help-config for {section}.*"
    )


def parse_override(text: str) -> dict:
    """'training.lr=3e-4' -> {'training': {'lr': '3e-4'}}; the value is parsed later, by its field.

    A value that starts with a quote or '[' is read as YAML (``run_name="a b"``, ``[a, b]``)."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(
            [f"override {text!r} must look like section.field=value (e.g. parallel.tp=2)"]
        )
    section, name = key.strip().split(".", 1)
    value: Any = raw
    if raw[:1] in ("'", '"', "["):
        value = yaml.load(raw, Loader=yaml.BaseLoader)
    return {section: {name: value}}


def read_yaml(path: str | Path) -> dict:
    """A config file's sections with every scalar kept as text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {path} not found; `blackmamba-train --list-configs` lists the bundled"
            " ones"
        )
    try:
        raw = yaml.load(path.read_text(), Loader=yaml.BaseLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"{path}: the top level must be a mapping of sections ({', '.join(sections())})"]
        )
    return raw


def load_config(
    path: Optional[str | Path] = None,
    overrides: Sequence[str] = (),
    world_size: Optional[int] = None,
) -> JobConfig:
    """Defaults, then the YAML file, then command-line overrides (last wins), then the checks.

    ``world_size``, where the launch environment already tells it, adds the layout checks that
    depend on it (tp*pp*ep divides the world, the global batch divides over data parallelism).
    Raises ConfigError listing every problem, before any process group or model exists.
    """
    cfg = JobConfig()
    problems: list[str] = []
    if path is not None:
        path = resolve_config_path(path)
        try:
            apply_dict(cfg, read_yaml(path), str(path))
        except ConfigError as exc:
            problems += exc.problems
    for text in overrides:
        try:
            apply_dict(cfg, parse_override(text), f"override {text!r}")
        except ConfigError as exc:
            problems += exc.problems
    if not problems:
        problems += check_job(cfg, world_size).errors
    if problems:
        raise ConfigError(problems)
    return cfg


def resolve_config_path(path: str | Path) -> Path:
    """``path`` as given if it exists, else the bundled config of that name (``tiny``,
    ``configs/tiny.yaml`` and ``tiny.yaml`` all find the packaged ``tiny.yaml``)."""
    given = Path(path)
    if given.is_file():
        return given
    return bundled_config(str(path)) or given


def to_yaml(job: JobConfig) -> str:
    """The resolved config as YAML that ``load_config`` reads back to an equal JobConfig."""
    return yaml.safe_dump(job.to_dict(), sort_keys=False)


def describe() -> str:
    """Every field with its type, default and help text, for --help-config."""
    lines = []
    for name, cls in sections().items():
        lines.append(f"[{name}]")
        defaults = cls()
        for f in dataclasses.fields(cls):
            kind = field_types(cls)[f.name]
            shown = (
                _choice_text(typing.get_args(kind))
                if typing.get_origin(kind) is Literal
                else getattr(kind, "__name__", str(kind).replace("typing.", ""))
            )
            lines.append(
                f"  {name}.{f.name} = {getattr(defaults, f.name)!r}  ({shown})  #"
                f" {f.metadata.get('help', '')}"
            )
    return "\n".join(lines)
