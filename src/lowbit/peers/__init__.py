"""Other tools to compare lowbit with, as optional plug-ins (each needs its own package; nothing in
lowbit's core imports them):

- :mod:`lowbit.peers.llamacpp`: llama.cpp through llama-cpp-python (GGUF files, logits, its quantizer);
- :mod:`lowbit.peers.llamacpp_peer`: llama.cpp's own types as points of a Pareto sweep;
- :mod:`lowbit.peers.llmcompressor`: llmcompressor's GPTQ as points of a Pareto sweep (in-process,
  or in the interpreter named by ``LOWBIT_PEERS_PYTHON`` when llmcompressor pins other packages).

A sweep plug-in (``lowbit pareto --peers NAME``, settings from ``SweepSpec.peer_settings[NAME]``)
has ``name``, ``check()`` (a one-line :class:`~lowbit.errors.LowbitError` when it cannot run),
``version()``, ``plan(spec)`` (per point: ``peer_type`` and the settings that change its numbers,
part of the point's key) and ``measure(ctx, todo, progress, log)``, yielding ``(settings, measured)``
per point as it finishes. ``measured`` is a dict: ``size`` (the bytes as stored, with
:func:`lowbit.eval.evaluation.size_account`'s fields), ``quality`` (:func:`lowbit.eval.evaluation.evaluate` on
the sweep's cached reference), ``quantize_seconds``, ``eval_seconds`` and ``details`` (kept as the
record's ``peer_details``).
"""

from __future__ import annotations

from lowbit.errors import LowbitError
from lowbit.lazy import load_object
from lowbit.options import known_fields

PEERS = {
    "llama.cpp": "lowbit.peers.llamacpp_peer:LlamaCppPeer",
    "llmcompressor": "lowbit.peers.llmcompressor:LLMCompressorPeer",
}
PEER_NAMES = tuple(PEERS)


def make_peer(name: str, settings: dict | None = None):
    """The sweep plug-in of peer ``name`` with ``settings`` (its dataclass fields)."""
    if name not in PEERS:
        raise LowbitError(f"unknown peer {name!r}: choose from {', '.join(PEER_NAMES)}")
    cls = load_object(PEERS[name])
    return cls(**known_fields(cls, dict(settings or {}), f"{name} peer"))
