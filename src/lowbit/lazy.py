"""Objects named by ``"module:attribute"`` strings, imported on first use: the public API, the method
registry, the peers and the CLI's subcommands are listed by name so that ``import lowbit`` and
``lowbit --help`` stay fast and nothing imports what it does not run."""

from __future__ import annotations

import importlib


def load_object(target: str):
    """The object ``target`` (``"package.module:name"``) names, importing its module."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
