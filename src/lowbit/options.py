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
import math
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError


def parse_group_size(text: str) -> int | None:
    """``--group-size``: a positive integer, or ``channel`` for one scale per output channel.

    ``0`` is refused: it used to mean per-channel here but means per-tensor to the quantizers."""
    if text in ("none", "channel", "per-channel"):
        return None
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer or 'channel', got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"group size must be a positive integer, got {value} (use 'channel' for one scale per output channel)"
        )
    return value


def _parse_int(text: str, minimum: int, what: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return int(value)


def option(default, help: str, **meta):
    """A method or config field that :func:`add_options` turns into a flag: its default, help text and
    metadata (``parse``, ``choices``, ``nargs``, ...)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``45m``, ``1h`` or ``1.5h``."""
    raw = str(text).strip().lower()
    unit = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(raw[-1:], None)
    number = raw[:-1] if unit else raw
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"time {text!r}: give a positive duration such as 90s, 45m or 1h")
    return seconds


def parse_positive_int(text: str) -> int:
    """A positive integer, also written as 1e5."""
    return _parse_int(text, 1, "a positive integer")


def parse_count(text: str) -> int:
    """A non-negative integer (0 allowed), also written as 1e5."""
    return _parse_int(text, 0, "an integer >= 0")


def parse_finite_float(text: str) -> float:
    """A float that is a real number: nan and inf are refused."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


_SCALARS = {"int": int, "float": parse_finite_float, "str": str}


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
        if annotation == "bool" and "parse" not in meta:  # on by default: --x / --no-x
            kwargs["action"] = argparse.BooleanOptionalAction if f.default is True else "store_true"
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
        if value is None:
            continue
        if f.metadata.get("collect") is dict:
            value = {**values.get(f.name, {}), **dict(value)}
        values[f.name] = value
    return values


def given_options(cls, args: argparse.Namespace, only=None, skip=()) -> list[str]:
    """The flags of ``cls``'s fields that were given on the command line (``only``/``skip``: field names)."""
    return [
        f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        for f in _cli_fields(cls, only, skip)
        if getattr(args, f.name, None) not in (None, False)
    ]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def read_json_config(path: str | None, what: str) -> dict:
    """The JSON object in ``path`` (``--config``), or {} without one; one-line errors otherwise
    (NaN and Infinity, which Python's json would accept, included)."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(), parse_constant=_reject_constant)
    except (OSError, ValueError) as exc:
        raise LowbitError(f"cannot read {what} {path}: {exc}: pass a JSON file of field names and values") from exc
    if not isinstance(data, dict):
        raise LowbitError(
            f"{what} {path} holds a JSON {type(data).__name__}, not an object: write {{\"field\": value, ...}}"
        )
    return data


def _json_scalar(f: dataclasses.Field, kind: str, value, where: str):
    """One JSON value of field ``f`` whose (element) annotation is ``kind``, checked and converted:
    a string goes through the field's ``parse``; numbers must be finite (and whole for ints)."""
    parse = f.metadata.get("parse")
    if isinstance(value, str) and parse is not None and parse is not str:
        try:
            return parse(value)
        except argparse.ArgumentTypeError as exc:
            raise LowbitError(f"{where}: {exc}") from exc
    types = set(kind.split("|"))
    if value is None and "None" in types:
        return value
    if types & {"int", "float"} and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or ("float" not in types and not float(value).is_integer()):
            raise LowbitError(f"{where} must be a finite {'number' if 'float' in types else 'integer'}, got {value!r}")
        return value if "float" in types else int(value)
    if isinstance(value, str) and ("str" in types or parse is str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if not types & {"int", "float", "str", "bool"}:
        return value  # a type this check does not know: the dataclass checks it
    raise LowbitError(f"{where} must be {' or '.join(sorted(types - {'None'}))}, got {json.dumps(value)}")


def _json_value(f: dataclasses.Field, value, what: str):
    kind = str(f.type).replace(" ", "")
    where = f"{what} setting {f.name!r}"
    if kind.startswith("list["):
        items = value if isinstance(value, list) else [value]  # {"bits": 4} means [4]
        return [_json_scalar(f, kind[5:-1], v, where) for v in items]
    if kind.startswith("dict"):
        if not isinstance(value, dict):
            raise LowbitError(f"{where} must be a JSON object, got {json.dumps(value)}")
        return value
    return _json_scalar(f, kind, value, where)


def known_fields(cls, values: dict, what: str) -> dict:
    """``values`` (e.g. a JSON ``--config``) checked against the fields of ``cls``: unknown keys and
    values of the wrong type are one-line errors; a single value where a list is expected is read
    as a list of one."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise LowbitError(f"unknown {what} setting(s) {sorted(unknown)}: use {', '.join(sorted(fields))}")
    return {name: _json_value(fields[name], value, what) for name, value in values.items()}
