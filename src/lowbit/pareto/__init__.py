"""Size-quality Pareto sweeps: quantize a model many ways, measure every point, report the frontier.

A sweep is, per model, one full-precision reference point and each method's points over its own
grid (RTN and GPTQ: bit-widths x granularities; the byte budget: bits per weight; each method
class's ``sweep_settings`` says), plus the peer tools' points (llama.cpp's own types by default
where llama-cpp-python is installed); every point of a model is measured against the same cached
reference log-probs and ranked by KL to the reference, perplexity beside it (docs/methods.md,
"Measuring").

- :mod:`~lowbit.pareto.spec`: :class:`SweepSpec`, the planned points and their keys;
- :mod:`~lowbit.pareto.store`: ``DIR/results.jsonl``, one fsync'd line per finished point, locked
  against a second writer, so a re-run skips stored points and a kill loses at most one;
- :mod:`~lowbit.pareto.sweep`: loading each model, measuring each point, :func:`run_sweep`;
- :mod:`~lowbit.pareto.report`, :mod:`~lowbit.pareto.plot`, :mod:`~lowbit.pareto.html`: the report
  (``results.md``, ``pareto.png``, ``report.html``), rebuilt from the stored points.
"""

from lowbit.pareto.html import html_report, write_report
from lowbit.pareto.plot import plot_pareto
from lowbit.pareto.report import mark_frontier, markdown_report, markdown_table, summary_lines, table_rows
from lowbit.pareto.spec import (
    DEFAULT_CALIB_TOKENS,
    DEFAULT_EVAL_TOKENS,
    KEY_VERSION,
    SweepSpec,
    method_points,
    model_ref,
    plan_points,
    point_key,
    point_label,
    text_fingerprint,
)
from lowbit.pareto.store import RESULTS_FILE, ResultStore
from lowbit.pareto.sweep import measure_point, run_sweep, sweep_methods

__all__ = [
    "DEFAULT_CALIB_TOKENS",
    "DEFAULT_EVAL_TOKENS",
    "KEY_VERSION",
    "RESULTS_FILE",
    "ResultStore",
    "SweepSpec",
    "html_report",
    "mark_frontier",
    "markdown_report",
    "markdown_table",
    "measure_point",
    "method_points",
    "model_ref",
    "plan_points",
    "plot_pareto",
    "point_key",
    "point_label",
    "run_sweep",
    "summary_lines",
    "sweep_methods",
    "table_rows",
    "text_fingerprint",
    "write_report",
]
