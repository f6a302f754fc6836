"""The frontier plot: KL to full precision and perplexity against total size, one row per model;
peer tools' points (:mod:`lowbit.peers`) as separate markers beside lowbit's frontier."""

from __future__ import annotations

import math
import os

from lowbit.pareto.report import MB, is_peer, models_of
from lowbit.pareto.spec import point_label

_METHOD_STYLE = {
    "rtn": {"marker": "o", "color": "#1f77b4"},
    "gptq": {"marker": "s", "color": "#d62728"},
    "qat": {"marker": "^", "color": "#2ca02c"},
    "auto": {"marker": "D", "color": "#e377c2"},
}
_OTHER_STYLE = {"marker": "D", "color": "#555555"}
# Peer tools: unfilled markers, not joined by lines, labelled with their type.
_PEER_STYLE = {
    "llama.cpp": {"marker": "X", "color": "#9467bd"},
    "llmcompressor": {"marker": "P", "color": "#8c564b"},
}
_OTHER_PEER_STYLE = {"marker": "h", "color": "#17becf"}
_LINESTYLES = ["-", "--", ":", "-."]
_KL = "kl_to_reference"


def _shown(r: dict, metric: str) -> bool:
    """KL 0 cannot sit on a log axis."""
    return metric != _KL or r[metric] > 0


def _series(r: dict) -> tuple[str, str]:
    """The line a point is drawn on and how the point is tagged: uniform points by method and
    granularity (tagged with their bit-width), byte-budget points by method and rotation (tagged
    with their budget)."""
    if r.get("budget_bpw") is not None:
        return f"budget{' (rotated)' if r.get('rotated') else ''}", f"{r['budget_bpw']:g} b/w"
    gran = "per-channel" if r["group_size"] is None else f"g{r['group_size']}"
    return f"{r['method'].upper()} {gran}", f"{r['bits']:g}b"


def _plot_methods(ax, quant: list[dict], metric: str) -> None:
    """One line per method and granularity (a byte budget: per method), each point tagged."""
    granularities = list(dict.fromkeys(r["group_size"] for r in quant if r.get("budget_bpw") is None))
    for method, label in dict.fromkeys((r["method"], _series(r)[0]) for r in quant):
        style = _METHOD_STYLE.get(method, _OTHER_STYLE)
        pts = sorted(
            (r for r in quant if r["method"] == method and _series(r)[0] == label and _shown(r, metric)),
            key=lambda r: r["total_bytes"],
        )
        if not pts:
            continue
        # one line style per granularity across methods (a byte budget's line: solid)
        gi = 0 if pts[0].get("budget_bpw") is not None else granularities.index(pts[0]["group_size"])
        ax.plot(
            [r["total_bytes"] / MB for r in pts],
            [r[metric] for r in pts],
            linestyle=_LINESTYLES[gi % len(_LINESTYLES)],
            marker=style["marker"],
            color=style["color"],
            markersize=7,
            alpha=0.85,
            label=label,
        )
        for r in pts:
            ax.annotate(
                _series(r)[1],
                (r["total_bytes"] / MB, r[metric]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )


def _plot_peers(ax, peers: list[dict], metric: str) -> None:
    """Peer points as distinct markers, one legend entry per tool, each labelled with its type."""
    for peer in dict.fromkeys(r["peer"] for r in peers):
        style = _PEER_STYLE.get(peer, _OTHER_PEER_STYLE)
        pts = [r for r in peers if r["peer"] == peer and _shown(r, metric)]
        if not pts:
            continue
        ax.plot(
            [r["total_bytes"] / MB for r in pts],
            [r[metric] for r in pts],
            linestyle="none",
            marker=style["marker"],
            color=style["color"],
            markersize=9,
            markeredgecolor="black",
            markeredgewidth=0.6,
            label=f"{peer} (peer)",
        )
        for r in pts:
            ax.annotate(
                r["peer_type"],
                (r["total_bytes"] / MB, r[metric]),
                textcoords="offset points",
                xytext=(5, -10),
                fontsize=7,
                color=style["color"],
            )


def _plot_frontier(ax, quant: list[dict], metric: str) -> None:
    """Ring the frontier points; on the KL axis also draw the frontier as a step line."""
    front = sorted((r for r in quant if r["frontier"] and _shown(r, metric)), key=lambda r: r["total_bytes"])
    if not front:
        return
    xs, ys = [r["total_bytes"] / MB for r in front], [r[metric] for r in front]
    ax.plot(
        xs,
        ys,
        linestyle="none",
        marker="o",
        markersize=15,
        markerfacecolor="none",
        markeredgecolor="black",
        markeredgewidth=1.6,
        label="Pareto frontier (by KL)",
    )
    if metric == _KL:
        ax.step(xs, ys, where="post", color="black", linewidth=1, alpha=0.5)


def _plot_reference(ax, fp: dict, metric: str) -> None:
    """The full-precision point: a star on the perplexity axis, its size as a line on the KL axis."""
    if metric == "perplexity":
        ax.plot(
            [fp["total_bytes"] / MB],
            [fp["perplexity"]],
            marker="*",
            markersize=16,
            color="#ff9900",
            markeredgecolor="black",
            linestyle="none",
            label=f"{point_label(fp)} reference",
        )
        ax.axhline(fp["perplexity"], color="#ff9900", linestyle=":", linewidth=1)
    else:
        ax.axvline(
            fp["total_bytes"] / MB,
            color="#ff9900",
            linestyle=":",
            linewidth=1.5,
            label=f"{point_label(fp)} reference size (KL 0)",
        )


def _label_axes(ax_kl, ax_ppl, model: str, rows: list[dict], ticks, null_formatter) -> None:
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("KL to full precision (nats/token, log scale)")
    ppl = [r["perplexity"] for r in rows]
    if max(ppl) > 3 * min(ppl):  # wide range (e.g. a collapsed 2-bit point): log scale
        ax_ppl.set_yscale("log")
        ax_ppl.yaxis.set_major_formatter(ticks)
        ax_ppl.yaxis.set_minor_formatter(ticks if max(ppl) < 30 * min(ppl) else null_formatter)
        ax_ppl.set_ylabel("perplexity (log scale)")
    else:
        ax_ppl.set_ylabel("perplexity")
    tokens = rows[0]["tokens"]
    ax_kl.set_title(f"{model}: KL to full precision vs size ({tokens:,} tokens)")
    ax_ppl.set_title(f"{model}: perplexity vs size ({tokens:,} tokens)")
    ax_kl.legend(fontsize=8, loc="best")
    ax_ppl.legend(fontsize=8, loc="best")


def plot_pareto(records: list[dict], path: str | os.PathLike[str]) -> None:
    """Quality vs size, one row per model: KL (log) and perplexity against total MB (log)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ticks = FuncFormatter(_log_tick)
    models = models_of(records)
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.8 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        rows = [r for r in records if r["model"] == model]
        quant = [r for r in rows if r["method"] != "fp" and not is_peer(r)]
        peers = [r for r in rows if is_peer(r)]
        fp = next((r for r in rows if r["method"] == "fp"), None)
        ax_kl, ax_ppl = axes[row]
        for ax, metric in ((ax_kl, _KL), (ax_ppl, "perplexity")):
            _plot_methods(ax, quant, metric)
            _plot_peers(ax, peers, metric)
            _plot_frontier(ax, quant, metric)
            if fp is not None:
                _plot_reference(ax, fp, metric)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticks)
            ax.xaxis.set_minor_formatter(ticks)
            ax.set_xlabel("total model size (MB, all bytes needed to run; log scale)")
            ax.grid(True, which="both", alpha=0.3)
        _label_axes(ax_kl, ax_ppl, model, rows, ticks, NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_tick(value: float, _pos=None) -> str:
    """Plain numbers on a log axis, labelled only at 1, 2, 3 and 5 times a power of ten."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if any(abs(mantissa - m) < 1e-6 for m in (1, 2, 3, 5)) else ""
