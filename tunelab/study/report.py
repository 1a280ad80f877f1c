"""Write a study's report from its run directories: report.md, results.csv, report.html, figures/.

    from tunelab.study.report import build_report
    build_report("runs/study_2023_04_24")        # = tunelab study runs/study_2023_04_24 --report_only

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

from tunelab.names import METRIC_LABELS
from tunelab.study import figures, sections
from tunelab.study.conclusions import BLEU_ROUGE, DIGITS, Verdict, check_conclusions, method_note, missing_measures
from tunelab.study.results import METRICS, REFERENCE_LABEL, Row, Study, load_reference, read_study
from tunelab.study.spec import DEFAULT_DECIDE_ON

Cell = str | list[tuple[str, str]]  # text, or links as (text, relative href)
SHORT = METRIC_LABELS
SPREAD_NOTE = ("Values are means over seeds; ± is the sample standard deviation over seeds. On style gain and "
               "retention, [lo, hi] is the 95% paired-bootstrap interval over eval samples (seeds pooled) when the "
               "rows have per-sample predictions; without one, ± is their noise: that standard deviation with "
               "several seeds, or with one seed the standard error over eval samples of the per-sample difference "
               "from the base row. (n.s.) marks a difference whose interval contains 0 (without an interval: one "
               "within its ±, a lenient one-noise-unit screen, not a test).")
DERIVED_NOTE = ("style gain = mean of the 4 persona scores minus the base row's; retention = mean of the 4 general "
                "scores minus the base row's (negative = knowledge lost). Scores are BLEU-4 and ROUGE-1/2/L x100.")
# per-sample columns (results.py): header, digits
SAMPLE_COLUMNS = {"style_gain_nll": "style gain (nll)", "retention_nll": "retention (nll)",
                  "retention_kl": "retention (-kl)", "style_kl": "style drift (kl)"}
SAMPLE_NOTE = ("Per-sample columns, each the mean over eval samples of a paired difference from the base row on the "
               "same sample: style gain (nll) = base NLL - row NLL of the persona references (nats/token, > 0 = the "
               "persona's replies became more likely); retention (nll) = the same on the general references (< 0 = "
               "knowledge lost); retention (-kl) = -KL(base || row) over the general reference tokens (label-free "
               "forgetting); style drift (kl) = KL(base || row) on the persona set (how far the model moved, not "
               "whether toward the persona). [lo, hi] is the 95% paired-bootstrap interval over eval samples "
               "(seeds pooled); a difference whose interval contains 0 is marked (n.s.).")


def _num(row: Row, column: str, digits: int = 2, signed: bool = False, ns: bool = False) -> str:
    """mean, [its bootstrap CI] when known, ± its seed spread (or, for a difference from base without a
    CI, its noise); (n.s.) when the CI contains 0 (without a CI: when the mean is within its noise)."""
    if column not in row.mean:
        return "-"
    if ns and row.id == 0:
        return "(base)"
    text = f"{row.mean[column]:{'+' if signed else ''}.{digits}f}"
    ci = row.ci.get(column) if ns else None
    if ci is not None:
        text += f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
    spread = row.spread.get(column) if ci is not None or not ns else row.noise(column)
    if spread is not None:
        text += f" ± {spread:.{digits}f}"
    if ns and (ci[0] <= 0 <= ci[1] if ci is not None else row.not_significant(column)):
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
    sample = [c for c in SAMPLE_COLUMNS if any(c in row.mean for row in study.rows)]
    header = ["id", "method", "weights", "layers", "aux", "trainable params", "train loss", "runtime (s)",
              *_score_header(study), "style gain", "retention", *[SAMPLE_COLUMNS[c] for c in sample],
              "status", "predictions"]
    body = []
    for row in study.rows:
        links = [(name, path) for name, path in row.runs[0].predictions.items()] if row.runs else []
        body.append([*_labels(row), _int(row, "trainable_params"), _num(row, "train_loss", 4),
                     _num(row, "train_runtime", 1),
                     *[_num(row, f"{s}_{m}") for s in study.eval_sets for m in METRICS],
                     _num(row, "style_gain", signed=True, ns=True), _num(row, "retention", signed=True, ns=True),
                     *[_num(row, c, DIGITS["nll"], signed=True, ns=True) for c in sample],
                     row.status, links])
    return header, body


def results_note(study: Study) -> str:
    """What the results table's columns mean; the per-sample note only when the table has those columns."""
    sample = any(c in row.mean for c in SAMPLE_COLUMNS for row in study.rows)
    return " ".join([DERIVED_NOTE, SPREAD_NOTE] + ([SAMPLE_NOTE] if sample else []))


def reference_table(reference: Study) -> tuple[list[str], list[list[Cell]]]:
    header = ["id", "method", "weights", "layers", "aux", *_score_header(reference), "style gain", "retention"]
    body = [[*_labels(row, published=True), *[_num(row, f"{s}_{m}") for s in reference.eval_sets for m in METRICS],
             _num(row, "style_gain", signed=True), _num(row, "retention", signed=True)] for row in reference.rows]
    return header, body


def verdict_table(verdicts: list[Verdict], beside: list[Verdict] | None = None) -> tuple[list[str], list[list[Cell]]]:
    """Verdict, deciding margin and its CI per conclusion; `beside`: the same checks on other measures
    (the BLEU/ROUGE reading), in two more columns."""
    label = verdicts[0].measures if verdicts else ""
    header = ["", "2023 conclusion", f"verdict ({label})", "margin [95% CI]"]
    if beside:
        header += [f"verdict ({beside[0].measures})", "margin [95% CI]"]
    header += ["test", "figures"]
    body: list[list[Cell]] = []
    for i, v in enumerate(verdicts):
        cells: list[Cell] = [f"({v.key})", v.claim, v.verdict, v.margin_text()]
        figures = "; ".join(v.figures)
        if beside:
            cells += [beside[i].verdict, beside[i].margin_text()]
            figures += f"; on {beside[i].measures}: " + "; ".join(beside[i].figures)
        body.append([*cells, v.test, figures])
    return header, body


def verdict_blocks(study: Study) -> list[tuple[str, str, Any]]:
    """The verdict table on the spec's decide_on measures with the BLEU/ROUGE verdicts beside them, and
    how they were reached; BLEU/ROUGE alone (saying why) when the study lacks the decide_on measures."""
    decide_on = {**DEFAULT_DECIDE_ON, **(study.meta.get("decide_on") or {})}
    title = "Conclusions of the 2023 study, checked on this study"
    bleu = check_conclusions(study, BLEU_ROUGE)
    if decide_on == BLEU_ROUGE:
        return [("table", title, verdict_table(bleu)), ("note", "", method_note(study, BLEU_ROUGE))]
    missing = missing_measures(study, decide_on)
    if missing:
        return [("table", title, verdict_table(bleu)),
                ("note", "", f"Verdicts on BLEU/ROUGE only: {missing}. " + method_note(study, BLEU_ROUGE))]
    return [("table", title, verdict_table(check_conclusions(study, decide_on), bleu)),
            ("note", "", method_note(study, decide_on) + " Beside them, the 2023 reading: "
             + method_note(study, BLEU_ROUGE))]


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
                                          ("note", "", results_note(study))]
    blocks.append(("figure", "Training loss", "loss_curves"))
    blocks.append(("figure", "Style learned vs knowledge kept", "style_vs_retention"))
    blocks += verdict_blocks(study)
    if reference is not None:
        blocks.append(("table", "Calibration: the same checks on the published 2023 numbers (BLEU/ROUGE only, "
                       "no per-sample data: point estimates)", verdict_table(check_conclusions(reference))))
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
    runs = [(row, run) for row in study.rows for run in row.runs]
    columns = sorted({c for _, run in runs for c in run.values})
    intervals = sorted({c for row in study.rows for c in row.ci})  # a row's CI (seeds pooled), on each seed's line
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name", "seed", "method", "weights", "layers", "aux", "status", *columns,
                         *[f"{c}_{end}" for c in intervals for end in ("lo", "hi")],
                         *[f"{s}_predictions" for s in study.eval_sets], "dir"])
        for row, run in runs:
            labels = [run.labels.get(k, "") for k in ("method", "weights", "layers", "aux")]
            ci = [("" if c not in row.ci else round(row.ci[c][end], 6)) for c in intervals for end in (0, 1)]
            writer.writerow([run.id, run.name, run.seed, *labels, run.status,
                             *[("" if c not in run.values else round(run.values[c], 6)) for c in columns],
                             *ci, *[run.predictions.get(s, "") for s in study.eval_sets], run.dir])


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
