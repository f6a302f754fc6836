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


def is_peer(r: dict) -> bool:
    """A point measured with another tool (:mod:`lowbit.peers`), not one of lowbit's."""
    return r["method"] == "peer"


def dominates(o: dict, r: dict) -> bool:
    """``o`` has <= bytes and <= KL than ``r``, one of them strictly less."""
    return (
        o["total_bytes"] <= r["total_bytes"]
        and o["kl_to_reference"] <= r["kl_to_reference"]
        and (o["total_bytes"] < r["total_bytes"] or o["kl_to_reference"] < r["kl_to_reference"])
    )


def mark_frontier(records: list[dict]) -> list[dict]:
    """Set ``record["frontier"]``: True when no other lowbit point of the same model has <= bytes and
    <= KL with one of them strictly less (the frontier is lowbit's own: peer points are never on it
    and never push a lowbit point off it). Returns the records sorted by model, then KL."""
    for r in records:
        r["frontier"] = not is_peer(r) and not any(
            o is not r and not is_peer(o) and o["model"] == r["model"] and dominates(o, r) for o in records
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


# How each peer made its points, for the summary's line naming them.
_PEER_HOW = {"llama.cpp": "llama.cpp's own quantizer, its default parameters, no importance matrix"}


def peer_lines(model: str, own: list[dict], peers: list[dict]) -> list[str]:
    """Which points each peer measured, then for each peer point: the lowbit points that dominate it,
    or that it dominates."""
    lines = []
    for peer in dict.fromkeys(p["peer"] for p in peers):
        types = ", ".join(p["peer_type"] for p in sorted(peers, key=lambda r: r["total_bytes"]) if p["peer"] == peer)
        how = f" ({_PEER_HOW[peer]})" if peer in _PEER_HOW else ""
        lines.append(f"{model}: {peer} points: {types}{how}.")
    for p in sorted(peers, key=lambda r: r["total_bytes"]):
        head = (
            f"{model}: {point_label(p)} ({fmt_mb(p['total_bytes'])} MB, {_fmt_bpw(p)} bits/weight over the linears): "
            f"KL {p['kl_to_reference']:.4g}, perplexity {_fmt_ppl(p['perplexity'])}"
        )
        better, worse = versus(p, own)
        if better:
            lines.append(f"{head} - dominated by lowbit's {_names(better)} (no larger, no higher KL).")
        elif worse:
            lines.append(f"{head} - dominates lowbit's {_names(worse)} (no larger, no higher KL).")
        else:
            lines.append(f"{head} - neither dominates nor is dominated by any lowbit point.")
    return lines


def versus(p: dict, own: list[dict]) -> tuple[list[dict], list[dict]]:
    """The lowbit points ``own`` that dominate peer point ``p`` (by KL), and those ``p`` dominates (by size)."""
    better = sorted((r for r in own if dominates(r, p)), key=lambda r: r["kl_to_reference"])
    worse = sorted((r for r in own if dominates(p, r)), key=lambda r: r["total_bytes"])
    return better, worse


def _names(rows: list[dict]) -> str:
    return ", ".join(f"{point_label(r)} ({fmt_mb(r['total_bytes'])} MB, KL {r['kl_to_reference']:.4g})" for r in rows)


def _fmt_bpw(r: dict) -> str:
    bpwl = r.get("bits_per_weight_linear")
    return "-" if bpwl is None else f"{bpwl:.3f}"


def summary_lines(records: list[dict]) -> list[str]:
    """Plain-language reading of the sweep: the best point under each size, method match-ups, and
    where each peer point stands against lowbit's."""
    lines: list[str] = []
    for model in models_of(records):
        peers = [r for r in records if r["model"] == model and is_peer(r)]
        rows = [r for r in records if r["model"] == model and not is_peer(r)]
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
        lines.extend(peer_lines(model, quant, peers))
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
        rows.append(
            {
                "rank": str(rank[r["model"]]),
                "model": r["model"],
                "label": point_label(r),
                "quantizer": r["quantizer"] or ("per-layer plan" if r.get("budget_bpw") is not None else "-"),
                "size_mb": fmt_mb(r["total_bytes"]),
                "total_bytes": f"{r['total_bytes']:,}",
                "bits_per_weight": f"{r['bits_per_weight']:.3f}",
                "bits_per_weight_linear": _fmt_bpw(r),
                "kl_to_reference": f"{r['kl_to_reference']:.4g}",
                "top1_agreement": f"{100 * r['top1_agreement']:.2f}%",
                "perplexity": f"{r['perplexity']:.3f}" if r["perplexity"] < 1e4 else f"{r['perplexity']:.4g}",
                "seconds": f"{r['seconds']:.1f}",
                "frontier": "yes" if r["frontier"] else "",
            }
        )
    return rows


# The peers' table: lowbit's columns but the frontier flag, what each stored, and how it compares.
PEER_COLUMNS = [c for c in COLUMNS if c[0] not in ("quantizer", "frontier")] + [
    ("stored", "Stored as (decoder linears)"),
    ("versus", "Against lowbit's points"),
]
PEER_TEXT_COLUMNS = ("model", "label", "stored", "versus")


def _stored(r: dict) -> str:
    details = r.get("peer_details", {})
    if "gguf_linear_types" in details:
        return ", ".join(f"{t} x{n}" for t, n in details["gguf_linear_types"].items())
    if r.get("bits") is not None:
        sym = "symmetric" if r["settings"].get("symmetric") else "asymmetric"
        return f"int{r['bits']} g{r['group_size']} {sym}"
    return "-"


def peer_table_rows(records: list[dict]) -> list[dict[str, str]]:
    """Formatted cells of the peer points of ``records`` (ranked by KL within each model)."""
    peers = [r for r in records if is_peer(r)]
    rows = table_rows(peers)
    for row, p in zip(rows, peers, strict=True):
        own = [r for r in records if r["model"] == p["model"] and not is_peer(r) and r["method"] != "fp"]
        better, worse = versus(p, own)
        row["stored"] = _stored(p)
        shown = better or worse
        row["versus"] = (
            f"{'dominated by' if better else 'dominates'} {len(shown)} lowbit point{'' if len(shown) == 1 else 's'}"
            if shown
            else "neither dominates nor is dominated"
        )
    return rows


def _markdown(rows: list[dict[str, str]], columns, text_columns) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" if key in text_columns else "---:" for key, _ in columns) + "|"
    body = ["| " + " | ".join(row[key] for key, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def markdown_table(records: list[dict]) -> str:
    """lowbit's points (peer points are in :func:`peer_table_rows`)."""
    return _markdown(table_rows([r for r in records if not is_peer(r)]), COLUMNS, TEXT_COLUMNS)


def eval_description(records: list[dict], spec: SweepSpec) -> list[str]:
    """What the points were measured on: eval text and windows, calibration and training texts."""
    from lowbit.eval.data import describe_text

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
        g = spec.gptq_settings
        sampled = (
            f"{spec.calib_tokens // spec.seq_len} random windows of {spec.seq_len} tokens (seed {g.get('seed', 0)})"
            if g.get("sample") == "random"
            else f"first {spec.calib_tokens:,} tokens in windows of {spec.seq_len}"
        )
        extra = {k: v for k, v in g.items() if k not in ("sample", "seed")}
        text.append(
            f"GPTQ calibration text: {spec.calib} - {describe(spec.calib)}; {sampled}"
            f"{f' (further settings: {json.dumps(extra)})' if extra else ''}."
        )
    if "qat" in spec.quantized_methods():
        text.append(
            f"QAT training text: {spec.qat_data}; {spec.qat_steps} steps in windows of {spec.seq_len} "
            f"(further settings: {json.dumps(spec.qat_settings) if spec.qat_settings else 'lowbit.train defaults'})."
        )
    if "auto" in spec.quantized_methods():
        text.append(budget_description(records, spec))
    return text + peer_description(records, spec)


def budget_description(records: list[dict], spec: SweepSpec) -> str:
    """How the byte-budget points were made: ``lowbit quantize --budget-bpw X`` without a time budget."""
    budgets = ", ".join(f"{b:g}" for b in spec.budget_bpw)
    settings = next((r["settings"] for r in records if r.get("budget_bpw") is not None), {})
    fisher = settings.get("fisher_tokens")
    return (
        f"Byte-budget points (budget {budgets} bits/weight over the decoder linears as stored; method auto, as "
        "lowbit quantize --budget-bpw X runs without --time-budget): rotated (Hadamard, QuaRot-style) where the "
        "architecture allows, each linear's bits, group and grid planned from measured sensitivities"
        + (f" (Fisher on {fisher:,} tokens of {spec.calib})" if fisher else "")
        + f", then GPTQ on the plan with the first {spec.calib_tokens:,} tokens of {spec.calib}; no Block-AP or "
        "end-to-end training (those need a time budget)."
    )


def peer_description(records: list[dict], spec: SweepSpec) -> list[str]:
    """How the peer points were made and measured."""
    peers = [r for r in records if is_peer(r)]
    text = []
    if any(r["peer"] == "llama.cpp" for r in peers):
        version = next(r["versions"].get("llama.cpp", "?") for r in peers if r["peer"] == "llama.cpp")
        types = ", ".join(dict.fromkeys(r["peer_type"] for r in peers if r["peer"] == "llama.cpp"))
        text.append(
            f"llama.cpp points (llama-cpp-python {version}): llama.cpp's own types ({types}), made by its quantizer "
            "(llama_model_quantize, default parameters, no importance matrix) from an F32 GGUF of the model, run "
            "by llama.cpp on the same windows (each from an empty context) with its weight-repacking buffer types "
            "off (plain CPU kernels; they segfault on AMX CPUs with llama-cpp-python 0.3.36). Where a tensor's rows "
            "do not fit a type's blocks llama.cpp stores it in another type: sizes are the tensor bytes the GGUF "
            "file stores (its header and tokenizer excluded, as for lowbit's points)."
        )
    lc = [r for r in peers if r["peer"] == "llmcompressor"]
    if lc:
        s = lc[0]["settings"]
        text.append(
            f"llmcompressor points ({lc[0]['versions'].get('llmcompressor', '?')}): oneshot + GPTQModifier with its "
            f"defaults on every Linear but lm_head, calibrated on {s['calib_windows']} random windows of "
            f"{s['calib_seq_len']} tokens of {s['calib']}; scored on the same windows by lowbit's evaluator; sizes "
            f"are the tensor bytes of its compressed checkpoint (save_compressed=True, saved in {s['save_dtype']})."
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
    if any(is_peer(r) for r in records):
        parts += [
            "## Peers: other tools on the same windows",
            "",
            "Not part of lowbit's frontier; each is compared with lowbit's points of no more bytes.",
            "",
            _markdown(peer_table_rows(records), PEER_COLUMNS, PEER_TEXT_COLUMNS),
            "",
        ]
    return "\n".join(parts)
