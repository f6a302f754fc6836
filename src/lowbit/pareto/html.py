"""The self-contained HTML report (plot inlined as a data URI) and the writing of all report files."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from lowbit import __version__
from lowbit.pareto.plot import plot_pareto
from lowbit.pareto.report import (
    COLUMNS,
    PEER_COLUMNS,
    PEER_TEXT_COLUMNS,
    TEXT_COLUMNS,
    eval_description,
    is_peer,
    mark_frontier,
    markdown_report,
    peer_table_rows,
    summary_lines,
    table_rows,
)
from lowbit.pareto.spec import SweepSpec
from lowbit.pareto.store import RESULTS_FILE
from lowbit.store.fsio import atomic_write

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; }
td.text { text-align: left; }
tr.frontier td { background: #eef7ee; font-weight: 600; }
tr.fp td { background: #fff6e5; }
tr.peer td { background: #f3eef9; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
"""


def _rows(rows: list[dict[str, str]], records: list[dict], columns, text_columns) -> str:
    esc = html.escape
    body = []
    for row, r in zip(rows, records, strict=True):
        cls = "peer" if is_peer(r) else "fp" if r["method"] == "fp" else ("frontier" if r["frontier"] else "")
        cells = "".join(
            f'<td class="text">{esc(row[k])}</td>' if k in text_columns else f"<td>{esc(row[k])}</td>"
            for k, _ in columns
        )
        body.append(f'<tr class="{cls}" data-key="{esc(r["key"])}">{cells}</tr>')
    return "\n".join(body)


def _result_rows(records: list[dict]) -> str:
    own = [r for r in records if not is_peer(r)]
    return _rows(table_rows(own), own, COLUMNS, TEXT_COLUMNS)


def _peer_section(records: list[dict]) -> str:
    """The peers' table (empty without peer points)."""
    peers = [r for r in records if is_peer(r)]
    if not peers:
        return ""
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in PEER_COLUMNS)
    body = _rows(peer_table_rows(records), peers, PEER_COLUMNS, PEER_TEXT_COLUMNS)
    return f"""<h2>Peers: other tools on the same windows</h2>
<p class="note">Not part of lowbit's frontier; each is compared with lowbit's points of no more bytes.</p>
<table id="peers">
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
"""


def html_report(records: list[dict], spec: SweepSpec, png: bytes) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(title)}</th>" for _, title in COLUMNS)
    summary = "".join(f"<li>{esc(line)}</li>" for line in summary_lines(records))
    evaluation = "".join(f"<li>{esc(line)}</li>" for line in eval_description(records, spec))
    versions = records[0].get("versions", {}) if records else {}
    settings = "\n".join(
        f'<tr><td class="text">{esc(k)}</td><td class="text"><code>{esc(json.dumps(v))}</code></td></tr>'
        for k, v in spec.to_dict().items()
    )
    img = base64.b64encode(png).decode("ascii")
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>lowbit pareto report</title>
<style>{_CSS}</style>
</head>
<body>
<h1>lowbit pareto: size vs quality</h1>
<p class="note">Generated {esc(generated)} by lowbit {esc(__version__)} from {len(records)} points.
Size counts every byte needed to run the model (packed codes, scales, zero points and every tensor
left in high precision); MB = 10<sup>6</sup> bytes. Points are ranked by KL to the full-precision model
(mean over predicted tokens), the steadier yardstick on a small eval text; perplexity is shown beside it.
A point is on the frontier when no other point of the same model is as small or smaller with KL as low or lower.</p>
<h2>Summary</h2>
<ul id="summary">{summary}</ul>
<h2>Plot</h2>
<img id="pareto-plot" alt="KL to full precision and perplexity vs total model size" src="data:image/png;base64,{img}">
<h2>Results</h2>
<table id="results">
<thead><tr>{head}</tr></thead>
<tbody>
{_result_rows(records)}
</tbody>
</table>
{_peer_section(records)}<h2>Evaluation</h2>
<ul id="evaluation">{evaluation}</ul>
<h2>Settings</h2>
<table id="settings">
{settings}
</table>
<p class="note">Software: {esc(json.dumps(versions))}</p>
</body>
</html>
"""


def write_report(records: list[dict], spec: SweepSpec, out: str | os.PathLike[str]) -> dict:
    """Write ``results.md``, ``pareto.png`` and ``report.html`` into ``out``; returns their paths.

    Frontier flags are (re)computed on ``records``, which come back sorted by model then KL.
    """
    out = Path(out)
    records[:] = mark_frontier(records)
    png_path, html_path, md_path = out / "pareto.png", out / "report.html", out / "results.md"
    buffer = io.BytesIO()
    plot_pareto(records, buffer)
    png = buffer.getvalue()
    atomic_write(png_path, png)
    atomic_write(html_path, html_report(records, spec, png))
    atomic_write(md_path, markdown_report(records, spec))
    return {
        "results": str(out / RESULTS_FILE),
        "report": str(html_path),
        "plot": str(png_path),
        "markdown": str(md_path),
    }
