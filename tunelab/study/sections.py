"""Report sections read from the per-sample and efficiency files: each row's path along training
(trajectory.py), what each row forgot (forgotten.py) and the study's efficiency (efficiency.py).
Blocks are report.py's (kind, title, payload); "details" blocks are lists of (summary, header, body),
rendered collapsible in HTML. Pure over files, like the rest of the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.study import figures
from tunelab.study.efficiency import PARTS, read_efficiency
from tunelab.study.forgotten import RowForgotten, read_forgotten
from tunelab.study.results import Study
from tunelab.study.trajectory import read_trajectories, trajectory_measures

Block = tuple[str, str, Any]
TEXT_CHARS = 300
PART_NAMES = {"train": "train", "scoring": "likelihood scoring", "generation": "generation",
              "eval_unsplit": "eval (not split)", "other": "other (loading, tokenizing)"}
TRAJECTORY_NOTE = ("Each row's path along training: from the base model at (0, 0) through every checkpoint saved "
                   "every `eval_every` steps to its final weights, scored without generation. Each axis is the mean "
                   "over samples of the per-sample paired difference from the base row on the same samples "
                   "(nll: base NLL - row NLL in nats/token; kl: -KL(base || row) for retention).")
FORGOTTEN_NOTE = ("Per trained row, the general-set samples whose reference answer became least likely: the largest "
                  "per-sample rises of reference NLL (nats/token) against the base model, with the answers of the "
                  "base model and of the row where they were generated.")
EFFICIENCY_NOTE = ("Model FLOPs: training 2 N_body (forward) + 2 N_active (input gradients down to the lowest "
                   "trainable layer) + 2 N_trainable (weight gradients) per token, + 4 N_head (forward and input "
                   "gradients) per supervised position (rows that did not record them: head not counted); likelihood "
                   "scoring and generation 2 N_body per token through the model + 2 N_head per reference / "
                   "generated token; on cached layer-k inputs the layers below k count only for the tokens they "
                   "ran over, and the base model's pass counts where it ran (formula in "
                   "tunelab/study/efficiency.py). MFU = FLOPs / (wall time x the "
                   "matmul peak measured on this machine: the highest of its measures at the start and the end of "
                   "each session, as a slow moment of a shared host lowers one). Token counts are the ones the "
                   "stages recorded, else the planned ones from the tokenized data (generation: max_new_tokens "
                   "per answer, an upper bound).")


def entries(study: Study) -> list[dict[str, Any]]:
    """plan.json-like rows of the study: what the readers need of each (row, seed)."""
    return [{"id": run.id, "name": run.name, "seed": run.seed, "dir": run.dir, "labels": run.labels}
            for row in study.rows for run in row.runs]


def _short(text: str | None) -> str:
    if text is None:
        return "(not generated)"
    text = " ".join(str(text).split())
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…"


def forgotten_details(rows: list[RowForgotten]) -> list[tuple[str, list[str], list[list[str]]]]:
    header = ["sample", "prompt", "reference", "base answer", "row answer", "base NLL", "row NLL", "NLL rise"]
    out = []
    for r in rows:
        worst = f"largest rise +{r.samples[0].rise:.3f}" if r.samples else "no sample's NLL rose"
        summary = f"r{r.row_id} {r.name} (seed {r.seed}): top {len(r.samples)} of {r.scored} general samples, {worst}"
        body = [[str(s.index), _short(s.prompt) if s.prompt else "(not in the predictions file)",
                 _short(s.reference) if s.reference else "-", _short(s.base_answer), _short(s.row_answer),
                 f"{s.base_nll:.3f}", f"{s.row_nll:.3f}", f"+{s.rise:.3f}"] for s in r.samples]
        out.append((summary, header, body))
    return out


def efficiency_blocks(study_dir: Path, study: Study) -> list[Block]:
    eff = read_efficiency(study_dir, entries(study))
    if eff is None:
        return []
    header = ["row", *[PART_NAMES[p] + " (s)" for p in PARTS], "total (s)", "GFLOP"]
    body = [[d.split("/")[-1], *[f"{split[p]:.0f}" for p in PARTS], f"{sum(split.values()):.0f}",
             "-" if flops is None else f"{flops / 1e9:,.1f}"] for d, split, flops in eff.rows]
    totals = eff.totals()
    spent = sum(totals.values()) or 1.0
    shares = ", ".join(f"{PART_NAMES[p]} {totals[p] / spent:.0%}" for p in PARTS if totals[p] > 0)
    if eff.mfu is not None:
        head = (f"The study did {eff.flops / 1e12:.2f} TFLOP of model FLOPs in {eff.wall_seconds / 60:.1f} min of wall "
                f"time on a machine whose {eff.precision} matmul peak measured {eff.peak_gflops:.0f} GFLOP/s"
                f"{f' x {eff.devices} devices' if eff.devices > 1 else ''}{_peak_range(eff)}: study MFU {eff.mfu:.0%}.")
    else:
        head = (f"{eff.wall_seconds / 60:.1f} min of row time; MFU unknown (no calibration in efficiency.json, "
                "or a finished row whose token counts are unknown).")
    by_part = eff.part_mfu()
    if by_part:
        head += " MFU per part (its FLOPs over its time): " + ", ".join(
            f"{PART_NAMES[p]} {by_part[p]:.0%}" for p in PARTS if p in by_part) + "."
    return [("text", "Efficiency", f"{head} Time per part, all rows: {shares}."),
            ("table", "", (header, body)), ("note", "", EFFICIENCY_NOTE)]


def _peak_range(eff) -> str:
    low = min(eff.peak_measures, default=None)
    if low is None or len(eff.peak_measures) < 2 or low >= eff.peak_gflops:
        return ""
    return f" (the highest of {len(eff.peak_measures)} measures, the lowest {low:.0f})"


def add_sections(blocks: list[Block], study_dir: Path, study: Study, images: dict[str, bytes]) -> list[Block]:
    """The report's blocks with these sections added: the trajectory figure after the style-vs-retention
    figure, the rest at the end. Its figure goes into `images` and figures/."""
    middle, end, more = extra_sections(study_dir, study)
    for name, png in more.items():
        (study_dir / "figures" / f"{name}.png").write_bytes(png)
    images.update(more)
    at = next((i + 1 for i, b in enumerate(blocks) if b[2] == "style_vs_retention"), len(blocks))
    return blocks[:at] + middle + blocks[at:] + end


def extra_sections(study_dir: Path, study: Study) -> tuple[list[Block], list[Block], dict[str, bytes]]:
    """(blocks after the style-vs-retention figure, blocks at the end of the report, images)."""
    rows = entries(study)
    measures = trajectory_measures(study.meta.get("decide_on"))
    paths = read_trajectories(study_dir, {"rows": rows}, study.roles, study.meta.get("decide_on"))
    images = {}
    png = figures.trajectories(paths, measures, f"{study.name}: style vs retention along training")
    middle: list[Block] = []
    if png:
        images["trajectories"] = png
        middle = [("figure", "Style vs retention along training", "trajectories"), ("note", "", TRAJECTORY_NOTE)]
    end: list[Block] = []
    forgotten = read_forgotten(study_dir, rows, study.role_set("retention"))
    if forgotten:
        end += [("details", "What was forgotten", forgotten_details(forgotten)), ("note", "", FORGOTTEN_NOTE)]
    return middle, end + efficiency_blocks(study_dir, study), images
