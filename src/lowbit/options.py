"""Command-line options generated from dataclass fields: the one place flags become configs.

A config dataclass (``QuantConfig``, ``GPTQ``, ``TrainConfig``, ``SweepSpec``) describes each field
once, with its help text in the field's ``metadata``; :func:`add_options` turns the fields into
argparse options and :func:`options_from_args` turns the parsed values back into keyword
arguments. Every option defaults to ``None`` ("not given") so that a JSON ``--config`` file can
fill what the command line leaves out; the dataclass's own default applies last.

Field metadata keys: ``help``; ``flag`` (option name, default ``--field-name``); ``parse`` (a
function ``str -> value``); ``choices``; ``nargs`` ("+" for lists); ``append`` (repeatable option,
collected as a list or, with ``collect=dict``, a dict of ``(key, value)`` pairs); ``metavar``;
``cli=False`` to keep a field off the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

_SCALARS = {"int": int, "float": float, "str": str}


def parse_group_size(text: str) -> int | None:
    """``--group-size``: a positive integer, or ``channel`` for one scale per output channel."""
    if text in ("none", "channel", "per-channel", "0"):
        return None
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer or 'channel', got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer, got {value}")
    return value


def parse_override(text: str) -> tuple[str, dict]:
    """``--override PATTERN=BITS[:GROUP]`` -> ``(pattern, {"bits": ..., "group_size": ...})``."""
    pattern, sep, value = text.partition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"override must look like 'model.layers.0.*=8' or 'PATTERN=4:64', got {text!r}")
    bits, _, group = value.partition(":")
    spec: dict = {"bits": bits}
    if group:
        spec["group_size"] = parse_group_size(group)
    return pattern, spec


def parse_positive_int(text: str) -> int:
    """A positive integer, also written as 1e5."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(value)


def _scalar_type(annotation: str):
    base = annotation.replace(" ", "").split("|")
    base = [b for b in base if b != "None"]
    return _SCALARS.get(base[0]) if len(base) == 1 else None


def _cli_fields(cls, only=None, skip=()):
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False or f.name in skip or (only is not None and f.name not in only):
            continue
        yield f


def add_options(parser, cls, only=None, skip=(), help_overrides: dict | None = None, required=()) -> None:
    """Add one option per field of dataclass ``cls`` (``only``/``skip`` select fields) to ``parser``;
    the fields named in ``required`` must be given on the command line."""
    for f in _cli_fields(cls, only, skip):
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        if f.name in required:
            kwargs["required"] = True
        help_text = (help_overrides or {}).get(f.name, meta.get("help"))
        annotation = str(f.type)
        if annotation == "bool" and "parse" not in meta:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta.get("parse") or _scalar_type(annotation.removeprefix("list[").removesuffix("]")) or str
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            if meta.get("append"):
                kwargs["action"] = "append"
            elif meta.get("nargs") or annotation.startswith("list["):
                kwargs["nargs"] = meta.get("nargs", "+")
            if "metavar" in meta:
                kwargs["metavar"] = meta["metavar"]
        if help_text is not None:
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = meta.get("show_default", default not in (None, False, dataclasses.MISSING))
            kwargs["help"] = f"{help_text} (default {default})" if shown and "default" not in help_text else help_text
        parser.add_argument(flag, **kwargs)


def options_from_args(cls, args: argparse.Namespace, base: dict | None = None, only=None, skip=()) -> dict:
    """Keyword arguments for ``cls`` from ``base`` (e.g. a JSON config) overlaid with the given options."""
    values = dict(base or {})
    for f in _cli_fields(cls, only, skip):
        value = getattr(args, f.name, None)
        if value is None or value is False:
            continue
        if f.metadata.get("collect") is dict:
            value = {**values.get(f.name, {}), **dict(value)}
        values[f.name] = value
    return values


def read_json_config(path: str | None, what: str) -> dict:
    """The JSON object in ``path`` (``--config``), or {} without one; one-line errors otherwise."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LowbitError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise LowbitError(f"{what} {path} must hold a JSON object of field names and values")
    return data


def known_fields(cls, values: dict, what: str) -> dict:
    """``values`` checked against the fields of ``cls`` (unknown keys are a one-line error)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise LowbitError(f"unknown {what} setting(s) {sorted(unknown)}: use {', '.join(sorted(known))}")
    return values
