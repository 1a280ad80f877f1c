"""Write a study's report from its run directories: report.md, results.csv, report.html, figures/.

    from tunelab.study.report import build_report
    build_report("runs/study_2023_04_24")        # = tunelab study runs/study_2023_04_24 --report-only

report.html is one self-contained file (inline CSS, figures as base64 PNG, no external URL) that opens
offline; links to each row's predictions are relative to the study dir. results.csv has one line per
(row, seed) with every column, derived ones included. Reads only files (results.py); no model.
"""

from __future__ import annotations

import base64
import csv
import html
import time
from pathlib import Path
from typing import Any

from tunelab.study import figures, sections
from tunelab.study.conclusions import Verdict, check_conclusions
from tunelab.study.results import METRICS, REFERENCE_LABEL, Row, Study, load_reference, read_study

Cell = str | list[tuple[str, str]]  # text, or links as (text, relative href)
SHORT = {"bleu-4": "B-4", "rouge-1": "R-1", "rouge-2": "R-2", "rouge-l": "R-L"}
SPREAD_NOTE = ("Values are means over seeds; ± on scores is the sample standard deviation over seeds. On style gain "
               "and retention, ± is their noise: that standard deviation with several seeds, or with one seed the "
               "standard error over eval samples of the per-sample difference from the base row. A style gain or "
               "retention within its ± is marked (n.s.): not significant (a lenient one-noise-unit screen, "
               "not a test).")
DERIVED_NOTE = ("style gain = mean of the 4 persona scores minus the base row's; retention = mean of the 4 general "
                "scores minus the base row's (negative = knowledge lost). Scores are BLEU-4 and ROUGE-1/2/L x100.")


def _num(row: Row, column: str, digits: int = 2, signed: bool = False, ns: bool = False) -> str:
    """mean, ± its seed spread (or, for differences from base, its noise), (n.s.) when within it."""
    if column not in row.mean:
        return "-"
    if ns and row.id == 0:
        return "(base)"
    text = f"{row.mean[column]:{'+' if signed else ''}.{digits}f}"
    spread = row.noise(column) if ns else row.spread.get(column)
    if spread is not None:
        text += f" ± {spread:.{digits}f}"
    if ns and row.not_significant(column):
        text += " (n.s.)"
    return text


def _int(row: Row, column: str) -> str:
    return f"{int(row.mean[column]):,}" if column in row.mean else "-"


def _labels(row: Row, published: bool = False) -> list[str]:
    labels = row.labels.get("published", row.labels) if published else row.labels
    aux = labels.get("aux")
    return [str(row.id), str(labels.get("method", "-")), str(labels.get("weights", "-")),
            str(labels.get("layers", "-")), "-" if aux is None else ("yes" if aux else "no")]


def _score_header(study: Study) -> list[str]:
    return [f"{s} {SHORT[m]}" for s in study.eval_sets for m in METRICS]


def results_table(study: Study) -> tuple[list[str], list[list[Cell]]]:
    """The seed's layout plus derived columns, status and prediction links."""
    header = ["id", "method", "weights", "layers", "aux", "trainable params", "train loss", "runtime (s)",
              *_score_header(study), "style gain", "retention", "status", "predictions"]
    body = []
    for row in study.rows:
        links = [(name, path) for name, path in row.runs[0].predictions.items()] if row.runs else []
        body.append([*_labels(row), _int(row, "trainable_params"), _num(row, "train_loss", 4),
                     _num(row, "train_runtime", 1),
                     *[_num(row, f"{s}_{m}") for s in study.eval_sets for m in METRICS],
                     _num(row, "style_gain", signed=True, ns=True), _num(row, "retention", signed=True, ns=True),
                     row.status, links])
    return header, body


def reference_table(reference: Study) -> tuple[list[str], list[list[Cell]]]:
    header = ["id", "method", "weights", "layers", "aux", *_score_header(reference), "style gain", "retention"]
    body = [[*_labels(row, published=True), *[_num(row, f"{s}_{m}") for s in reference.eval_sets for m in METRICS],
             _num(row, "style_gain", signed=True), _num(row, "retention", signed=True)] for row in reference.rows]
    return header, body


def verdict_table(verdicts: list[Verdict]) -> tuple[list[str], list[list[Cell]]]:
    return ["", "2023 conclusion", "verdict", "test", "figures"], [
        [f"({v.key})", v.claim, v.verdict, v.test, "; ".join(v.figures)] for v in verdicts]


# ---- rendering ----

def _md_cell(cell: Cell) -> str:
    if isinstance(cell, list):
        return " ".join(f"[{text}]({href})" for text, href in cell) or "-"
    return cell.replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], body: list[list[Cell]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, list):
        return " ".join(f'<a href="{html.escape(href)}">{html.escape(text)}</a>' for text, href in cell) or "-"
    css = {"supported": "ok", "not supported": "bad", "inconclusive": "meh", "failed": "bad"}.get(cell, "")
    text = html.escape(cell)
    return f'<span class="{css}">{text}</span>' if css else text


def html_table(header: list[str], body: list[list[Cell]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td:nth-child(-n+5){text-align:left}.ok{color:#1a7f37;font-weight:600}
.bad{color:#c62828;font-weight:600}.meh{color:#9a6700;font-weight:600}img{max-width:100%}
.note{color:#555;font-size:13px}pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap;font-size:11px}"""


# ---- the report ----

def _sections(study: Study, reference: Study | None, ref_meta: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(kind, title, payload) blocks shared by the Markdown and HTML writers."""
    counts = {s: sum(r.status == s for r in study.rows) for s in ("done", "failed")}
    scale = study.meta.get("scale_description") or ""
    intro = (f"Study {study.name}, scale {study.scale or '-'}: {len(study.rows)} rows, {counts['done']} done, "
             f"{counts['failed']} failed, {len(study.rows) - sum(counts.values())} not finished. "
             f"Model: {study.meta.get('model', '-')}. Written {time.strftime('%Y-%m-%d %H:%M')}. {scale}")
    blocks: list[tuple[str, str, Any]] = [("text", "", intro), ("table", "Results", results_table(study)),
                                          ("note", "", DERIVED_NOTE + " " + SPREAD_NOTE)]
    blocks.append(("figure", "Training loss", "loss_curves"))
    blocks.append(("figure", "Style learned vs knowledge kept", "style_vs_retention"))
    blocks.append(("table", "Conclusions of the 2023 study, checked on this study",
                   verdict_table(check_conclusions(study))))
    if reference is not None:
        blocks.append(("table", "Calibration: the same checks on the published 2023 numbers",
                       verdict_table(check_conclusions(reference))))
        blocks.append(("table", f"Published 2023 results: {REFERENCE_LABEL}", reference_table(reference)))
        keys = ("source", "model", "train", "eval")
        facts = ". ".join(f"{k.capitalize()}: {ref_meta[k]}" for k in keys if k in ref_meta)
        blocks.append(("note", "", f"{facts}. {ref_meta.get('note', '')}"))
    failed = [run for row in study.rows for run in row.runs if run.status == "failed"]
    if failed:
        errors = "\n".join(f"{run.dir}: {run.error}" for run in failed)
        blocks.append(("pre", "Failed rows (details and tracebacks in each row.json)", errors))
    return blocks


def render_md(blocks: list[tuple[str, str, Any]], study: Study, images: dict[str, bytes]) -> str:
    out = [f"# Study report: {study.name}", ""]
    for kind, title, payload in blocks:
        if title:
            out += [f"## {title}", ""]
        if kind == "table":
            out.append(md_table(*payload))
        elif kind == "figure":
            out.append(f"![{title}](figures/{payload}.png)" if payload in images else "(no data yet)")
        elif kind == "pre":
            out.append("```\n" + payload + "\n```")
        elif kind == "details":  # (summary, header, body) per entry: collapsible in HTML
            out.append("\n\n".join(f"**{summary}**\n\n{md_table(h, b)}" for summary, h, b in payload))
        else:
            out.append(payload)
        out.append("")
    return "\n".join(out)


def render_html(blocks: list[tuple[str, str, Any]], study: Study, images: dict[str, bytes]) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.name)} report</title>",
           f"<style>{CSS}</style></head><body><h1>Study report: {html.escape(study.name)}</h1>"]
    for kind, title, payload in blocks:
        if title:
            out.append(f"<h2>{html.escape(title)}</h2>")
        if kind == "table":
            out.append(html_table(*payload))
        elif kind == "figure":
            data = images.get(payload)
            out.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                       if data else "<p>(no data yet)</p>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(payload)}</pre>")
        elif kind == "details":
            out.append("".join(f"<details><summary>{html.escape(summary)}</summary>{html_table(h, b)}</details>"
                               for summary, h, b in payload))
        else:
            out.append(f"<p class='{'note' if kind == 'note' else ''}'>{html.escape(payload)}</p>")
    out.append("</body></html>")
    return "\n".join(out)


def write_csv(path: Path, study: Study) -> None:
    """One line per (row, seed): labels, status, every column (derived included), prediction paths."""
    runs = [run for row in study.rows for run in row.runs]
    columns = sorted({c for run in runs for c in run.values})
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name", "seed", "method", "weights", "layers", "aux", "status", *columns,
                         *[f"{s}_predictions" for s in study.eval_sets], "dir"])
        for run in runs:
            labels = [run.labels.get(k, "") for k in ("method", "weights", "layers", "aux")]
            writer.writerow([run.id, run.name, run.seed, *labels, run.status,
                             *[("" if c not in run.values else round(run.values[c], 6)) for c in columns],
                             *[run.predictions.get(s, "") for s in study.eval_sets], run.dir])


def build_report(study_dir: str | Path, reference: bool = True) -> dict[str, Path]:
    """Write report.md, report.html, results.csv and figures/*.png into the study dir; returns their paths."""
    study_dir = Path(study_dir)
    study = read_study(study_dir)
    ref_meta, ref = load_reference() if reference else ({}, None)
    images = {name: png for name, png in (("loss_curves", figures.loss_curves(study)),
                                           ("style_vs_retention", figures.style_scatter(study, ref))) if png}
    (study_dir / "figures").mkdir(exist_ok=True)
    for name, png in images.items():
        (study_dir / "figures" / f"{name}.png").write_bytes(png)
    blocks = _sections(study, ref, ref_meta)
    blocks = sections.add_sections(blocks, study_dir, study, images)  # trajectories, forgotten, efficiency
    paths = {"md": study_dir / "report.md", "html": study_dir / "report.html", "csv": study_dir / "results.csv"}
    paths["md"].write_text(render_md(blocks, study, images), encoding="utf-8")
    paths["html"].write_text(render_html(blocks, study, images), encoding="utf-8")
    write_csv(paths["csv"], study)
    return paths
