"""The text of a sweep's report: frontier flags, plain-language summary, markdown table and report."""

from __future__ import annotations

import json

from lowbit.errors import LowbitError
from lowbit.pareto.spec import SweepSpec, point_label

MB = 1e6

_MODEL_NOTES = {
    "smollm2-135m": (
        "SmolLM2-135M's weights were de-quantized from a Q4_1 GGUF (blocks of 32, scale + min), so 4-bit "
        "settings on a matching grid (group 32, asymmetric) are flattered by construction; per-channel and "
        "group-128 points are the fairer method comparison."
    ),
}


def mark_frontier(records: list[dict]) -> list[dict]:
    """Set ``record["frontier"]``: True when no other point of the same model has <= bytes and
    <= KL with one of them strictly less. Returns the records sorted by model, then KL."""
    for r in records:
        r["frontier"] = not any(
            o is not r
            and o["model"] == r["model"]
            and o["total_bytes"] <= r["total_bytes"]
            and o["kl_to_reference"] <= r["kl_to_reference"]
            and (o["total_bytes"] < r["total_bytes"] or o["kl_to_reference"] < r["kl_to_reference"])
            for o in records
        )
    order = list(dict.fromkeys(r["model"] for r in records))
    return sorted(records, key=lambda r: (order.index(r["model"]), r["kl_to_reference"], r["total_bytes"]))


def models_of(records: list[dict]) -> list[str]:
    """The models of ``records``, in order of first appearance."""
    return list(dict.fromkeys(r["model"] for r in records))


def fmt_mb(n_bytes: int) -> str:
    return f"{n_bytes / MB:.4g}"


def _fmt_ppl(ppl: float) -> str:
    return f"{ppl:.2f}" if ppl < 1e4 else f"{ppl:.3g}"


# ---------------------------------------------------------------- summary


def _reference_line(model: str, fp: dict, quant: list[dict]) -> str:
    hp = sorted({r["settings"].get("hp_dtype", "?") for r in quant if "settings" in r})
    kept = f" (the quantized points keep their high-precision tensors in {', '.join(hp)})" if hp else ""
    return (
        f"{model}: the full-precision reference ({point_label(fp)}, as loaded) takes "
        f"{fmt_mb(fp['total_bytes'])} MB and has perplexity {_fmt_ppl(fp['perplexity'])}{kept}."
    )


def _frontier_lines(model: str, fp: dict | None, quant: list[dict]) -> list[str]:
    lines = []
    for r in sorted((r for r in quant if r["frontier"]), key=lambda r: r["total_bytes"]):
        collapsed = fp is not None and r["perplexity"] > 10 * fp["perplexity"]
        lines.append(
            f"{model}: at <= {fmt_mb(r['total_bytes'])} MB the best point is {point_label(r)} "
            f"({r['bits_per_weight']:.2f} bits/weight): KL {r['kl_to_reference']:.4g}, "
            f"perplexity {_fmt_ppl(r['perplexity'])}, top-1 agreement {100 * r['top1_agreement']:.1f}%"
            + (" - but the model has collapsed (perplexity over 10x the reference)." if collapsed else ".")
        )
    return lines


def _matched(quant: list[dict], a: str, b: str) -> list[tuple[dict, dict]]:
    """Pairs of points of methods ``a`` and ``b`` with the same bits and granularity."""
    pairs = []
    for ra in (r for r in quant if r["method"] == a):
        rb = next(
            (r for r in quant if r["method"] == b and r["bits"] == ra["bits"] and r["group_size"] == ra["group_size"]),
            None,
        )
        if rb is not None:
            pairs.append((ra, rb))
    return pairs


def _matchup_lines(model: str, quant: list[dict]) -> list[str]:
    lines = []
    methods = list(dict.fromkeys(r["method"] for r in quant))
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            pairs = _matched(quant, a, b)
            if not pairs:
                continue
            wins = sum(ra["kl_to_reference"] < rb["kl_to_reference"] for ra, rb in pairs)
            lead, n = (a, wins) if wins * 2 >= len(pairs) else (b, len(pairs) - wins)
            other = b if lead == a else a
            lines.append(
                f"{model}: {lead.upper()} has lower KL than {other.upper()} in {n} of {len(pairs)} matched "
                "settings (same bits and granularity, hence about the same size)."
            )
    return lines


def summary_lines(records: list[dict]) -> list[str]:
    """Plain-language reading of the sweep: the best point under each size, and method match-ups."""
    lines: list[str] = []
    for model in models_of(records):
        rows = [r for r in records if r["model"] == model]
        fp = next((r for r in rows if r["method"] == "fp"), None)
        quant = [r for r in rows if r["method"] != "fp"]
        if fp is not None:
            lines.append(_reference_line(model, fp, quant))
        lines.extend(_frontier_lines(model, fp, quant))
        lines.extend(_matchup_lines(model, quant))
        dominated = [r for r in quant if not r["frontier"]]
        if dominated:
            names = ", ".join(point_label(r) for r in sorted(dominated, key=lambda r: r["total_bytes"]))
            lines.append(
                f"{model}: {len(dominated)} of {len(quant)} quantized points are dominated (another point is no "
                f"larger and has no higher KL): {names}."
            )
        if model in _MODEL_NOTES:
            lines.append(f"{model}: note: {_MODEL_NOTES[model]}")
    return lines


# ---------------------------------------------------------------- table and markdown

COLUMNS = [
    ("rank", "Rank"),
    ("model", "Model"),
    ("label", "Setting"),
    ("quantizer", "Quantizer"),
    ("size_mb", "Size (MB)"),
    ("total_bytes", "Bytes"),
    ("bits_per_weight", "Bits/weight"),
    ("bits_per_weight_linear", "Bits/weight (linears)"),
    ("kl_to_reference", "KL to FP"),
    ("top1_agreement", "Top-1 agreement"),
    ("perplexity", "Perplexity"),
    ("seconds", "Seconds"),
    ("frontier", "Frontier"),
]
# Columns holding text (left-aligned); the others hold numbers.
TEXT_COLUMNS = ("model", "label", "quantizer", "frontier")


def table_rows(records: list[dict]) -> list[dict[str, str]]:
    """Formatted table cells, ranked by KL within each model (records from :func:`mark_frontier`)."""
    rows, rank = [], {}
    for r in records:
        rank[r["model"]] = rank.get(r["model"], 0) + 1
        bpwl = r.get("bits_per_weight_linear")
        rows.append(
            {
                "rank": str(rank[r["model"]]),
                "model": r["model"],
                "label": point_label(r),
                "quantizer": r["quantizer"] or "-",
                "size_mb": fmt_mb(r["total_bytes"]),
                "total_bytes": f"{r['total_bytes']:,}",
                "bits_per_weight": f"{r['bits_per_weight']:.3f}",
                "bits_per_weight_linear": "-" if bpwl is None else f"{bpwl:.3f}",
                "kl_to_reference": f"{r['kl_to_reference']:.4g}",
                "top1_agreement": f"{100 * r['top1_agreement']:.2f}%",
                "perplexity": f"{r['perplexity']:.3f}" if r["perplexity"] < 1e4 else f"{r['perplexity']:.4g}",
                "seconds": f"{r['seconds']:.1f}",
                "frontier": "yes" if r["frontier"] else "",
            }
        )
    return rows


def markdown_table(records: list[dict]) -> str:
    rows = table_rows(records)
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" if key in TEXT_COLUMNS else "---:" for key, _ in COLUMNS) + "|"
    body = ["| " + " | ".join(row[key] for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def eval_description(records: list[dict], spec: SweepSpec) -> list[str]:
    """What the points were measured on: eval text and windows, calibration and training texts."""
    from lowbit.data import describe_text

    def describe(name: str) -> str:
        try:
            return describe_text(name)
        except LowbitError as exc:
            return f"{name} ({exc})"

    lines = []
    for model in models_of(records):
        fp = next((r for r in records if r["model"] == model), None)
        lines.append(
            f"{model}: {fp['tokens']:,} predicted tokens in {fp['windows']} non-overlapping windows of "
            f"{fp['seq_len']} tokens{' (each starting with BOS)' if fp.get('eval_bos') else ''} "
            f"(eval token hash {fp['eval_tokens_sha256']})."
        )
    text = [f"Eval text: {spec.data} - {describe(spec.data)}.", *lines]
    if "gptq" in spec.quantized_methods():
        text.append(
            f"GPTQ calibration text: {spec.calib} - {describe(spec.calib)}; first {spec.calib_tokens:,} tokens "
            f"in windows of {spec.seq_len}."
        )
    if "qat" in spec.quantized_methods():
        text.append(
            f"QAT training text: {spec.qat_data}; {spec.qat_steps} steps in windows of {spec.seq_len} "
            f"(further settings: {json.dumps(spec.qat_settings) if spec.qat_settings else 'lowbit.qat defaults'})."
        )
    return text


def markdown_report(records: list[dict], spec: SweepSpec) -> str:
    parts = [
        "# lowbit pareto results",
        "",
        "Ranked by KL to the full-precision model (mean over predicted tokens); perplexity beside it. "
        "Size: every byte needed to run the model (packed codes, scales, zero points, high-precision tensors). "
        "MB = 10^6 bytes.",
        "",
        *[f"- {line}" for line in eval_description(records, spec)],
        "",
        markdown_table(records),
        "",
        *[f"- {line}" for line in summary_lines(records)],
        "",
    ]
    return "\n".join(parts)
