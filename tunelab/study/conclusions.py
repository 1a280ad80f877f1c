"""The 2023 study's four conclusions as precise tests on a study's rows. Pure.

Each check computes its conclusion's deciding margin (> 0 = the claim holds) from every trained row's
style gain and retention under one pair of measures, {role: measure} as in the spec's `decide_on`
(nll, kl, bleu_rouge; results.MEASURE_COLUMNS names the columns). With per-sample data (Study.paired)
the margin is computed in every bootstrap replicate on the same resampled eval samples (stats.py: one
resample per eval set shared by all rows, seeds pooled), which gives the margin its own percentile CI:
    supported      the CI lies above 0
    not supported  the CI lies below 0
    inconclusive   the CI contains 0 (the CI is shown)
Without per-sample data for every row compared (the published 2023 table, older studies) the margin
is a point estimate and its sign decides; the figures say so.

Method groups: freeze-first, freeze-last, lora-first, lora-last, lora-all, p_tuning (and full), from
the row labels (method + layers: first*/last*/all). A group's value is the mean over its rows.
Margins (computed the same way on the point estimate and inside each replicate):
    (a) lowest mean retention of the other groups - freeze-first's
    (b) min(p_tuning retention - highest other group's, lowest other group's style gain - p_tuning's):
        supported when the CI of that min is above 0 (both parts hold); not supported when either
        part's own CI is below 0
    (c) mean over LoRA (no aux, aux) twins of retention(aux) - retention(no aux), minus the largest
        effect (range of level means) of the weights and of the layers among LoRA rows
    (d) trade-off score z(style gain) + z(retention), z standardized over the trained rows: the best
        LoRA qkv last-layers row's score minus the best other row's
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tunelab.study import stats
from tunelab.study.results import MEASURE_COLUMNS, Row, Study

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
BLEU_ROUGE = {"style": "bleu_rouge", "retention": "bleu_rouge"}  # the 2023 reading
DIGITS = {"nll": 3, "kl": 3, "bleu_rouge": 2}                     # nats/token vs scores x100
NAMES = {"nll": "NLL", "kl": "KL", "bleu_rouge": "BLEU/ROUGE"}


@dataclass
class Verdict:
    key: str
    claim: str
    verdict: str
    test: str
    figures: list[str] = field(default_factory=list)
    measures: str = ""            # "style nll, retention nll"
    margin: float | None = None   # point estimate of the deciding margin (> 0 = claim holds)
    lo: float | None = None       # its CI; None when decided on point estimates
    hi: float | None = None
    digits: int = 2

    def margin_text(self) -> str:
        return "-" if self.margin is None else ci_text(self.margin, self.lo, self.hi, self.digits)


def ci_text(point: float, lo: float | None, hi: float | None, digits: int = 2) -> str:
    """'+0.123 [+0.010, +0.250]', or '+0.12 (point estimate, no CI)'."""
    text = f"{point:+.{digits}f}"
    if lo is None or hi is None:
        return text + " (point estimate, no CI)"
    return text + f" [{lo:+.{digits}f}, {hi:+.{digits}f}]"


@dataclass
class Measured:
    """Every trained row's style gain and retention under one pair of measures, as replicate arrays
    (stats.py layout: [point, replicate 1..B], or [point] alone without per-sample data)."""

    rows: list[Row]
    style: dict[int, np.ndarray]
    retention: dict[int, np.ndarray]
    measures: dict[str, str]
    bootstrapped: bool

    @property
    def label(self) -> str:
        style, retention = (NAMES[self.measures[role]] for role in ("style", "retention"))
        return style if style == retention else f"style {style}, retention {retention}"

    def digits(self, role: str) -> int:
        return DIGITS.get(self.measures[role], 2)


def measured(study: Study, measures: dict[str, str] | None = None) -> Measured:
    """The values the checks compare; bootstrapped only when every compared row has per-sample data
    for both columns (otherwise the whole comparison rests on point estimates)."""
    measures = {**BLEU_ROUGE, **(measures or {})}
    columns = {role: MEASURE_COLUMNS[(role, measures[role])] for role in ("style", "retention")}
    rows = [r for r in study.rows if r.id != 0 and all(c in r.mean for c in columns.values())]
    tables = {role: study.paired.get(column) for role, column in columns.items()}
    boot = bool(rows) and all(t is not None and all(r.id in t.diffs for r in rows) for t in tables.values())
    values = {}
    for role, column in columns.items():
        reps = tables[role].replicates() if boot else {r.id: stats.point_only(r.mean[column]) for r in rows}
        values[role] = {r.id: reps[r.id] for r in rows}
    return Measured(rows, values["style"], values["retention"], measures, boot)


def group_of(labels: dict) -> str | None:
    """'freeze-first', 'lora-last', 'p_tuning', ... from a row's labels; None for the base row."""
    method = labels.get("method")
    if method in (None, "none"):
        return None
    if method in ("freeze", "lora"):
        layers = str(labels.get("layers", "")).lower()
        for pos in ("first", "last", "all"):
            if layers.startswith(pos):
                return f"{method}-{pos}"
        return f"{method}-{layers or '?'}"
    return str(method)


# ---- replicate arithmetic (each value is (1 + B,) or (1,); numpy broadcasts between them) ----

def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return np.stack(np.broadcast_arrays(*arrays))


def group_values(rows: list[Row], values: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Method group -> mean over its rows."""
    groups: dict[str, list[np.ndarray]] = {}
    for row in rows:
        group = group_of(row.labels)
        if group is not None and row.id in values:
            groups.setdefault(group, []).append(values[row.id])
    return {g: _stack(v).mean(axis=0) for g, v in groups.items()}


def _extreme(target: str, values: dict[str, np.ndarray], highest: bool) -> np.ndarray:
    """Margin by which `target` is the highest (lowest) group: > 0 when it is."""
    others = _stack([v for g, v in values.items() if g != target])
    return values[target] - others.max(axis=0) if highest else others.min(axis=0) - values[target]


def _rule(point: float, lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None:
        return SUPPORTED if point > 0 else NOT_SUPPORTED if point < 0 else INCONCLUSIVE
    return SUPPORTED if lo > 0 else NOT_SUPPORTED if hi < 0 else INCONCLUSIVE


def _decide(v: Verdict, margin: np.ndarray, digits: int) -> None:
    """Set the verdict, the margin and its CI from the margin's replicates."""
    v.margin, v.lo, v.hi = stats.interval(margin)
    v.digits = digits
    v.verdict = _rule(v.margin, v.lo, v.hi)
    v.figures.append(f"margin {v.margin_text()}")


def _fmt_groups(values: dict[str, np.ndarray], digits: int) -> str:
    points = {g: float(v[0]) for g, v in values.items()}
    return ", ".join(f"{g} {p:+.{digits}f}" for g, p in sorted(points.items(), key=lambda kv: kv[1]))


def _start(key: str, claim: str, test: str, study: Study | Measured) -> tuple[Measured, Verdict]:
    """(the study's measured rows, an inconclusive verdict to fill in) for one check."""
    m = study if isinstance(study, Measured) else measured(study)
    return m, Verdict(key, claim, INCONCLUSIVE, test, measures=m.label)


# ---- the four checks ----

def check_freeze_first(study: Study | Measured) -> Verdict:
    m, v = _start("a", "Freeze on the first layers damages general scores most",
               "margin = lowest mean retention of the other method groups - freeze-first's", study)
    values = group_values(m.rows, m.retention)
    if _lacks_groups(v, values, "freeze-first"):
        return v
    v.figures.append(f"retention by group: {_fmt_groups(values, m.digits('retention'))}")
    _decide(v, _extreme("freeze-first", values, highest=False), m.digits("retention"))
    return v


def _lacks_groups(v: Verdict, values: dict, target: str) -> bool:
    """True (and the figures say so) unless `target` and at least one other method group have values."""
    if target in values and len(values) >= 2:
        return False
    v.figures.append(f"needs {target} rows and another method group")
    return True


def check_p_tuning(study: Study | Measured) -> Verdict:
    m, v = _start("b", "P-Tuning keeps knowledge but learns little style",
               "margin = min(p_tuning retention - highest other group's, lowest other group's style gain - "
               "p_tuning's); not supported when either part is below 0", study)
    ret, gain = group_values(m.rows, m.retention), group_values(m.rows, m.style)
    if _lacks_groups(v, ret, "p_tuning"):
        return v
    keep, little = _extreme("p_tuning", ret, highest=True), _extreme("p_tuning", gain, highest=False)
    parts = []
    for name, part, role, values in (("keeps knowledge", keep, "retention", ret),
                                     ("learns little style", little, "style", gain)):
        point, lo, hi = stats.interval(part)
        parts.append(_rule(point, lo, hi))
        v.figures.append(f"{'retention' if role == 'retention' else 'style gain'} by group: "
                         f"{_fmt_groups(values, m.digits(role))} (p_tuning {name}: "
                         f"{ci_text(point, lo, hi, m.digits(role))}: {parts[-1]})")
    digits = max(m.digits("style"), m.digits("retention"))
    _decide(v, np.minimum(*np.broadcast_arrays(keep, little)), digits)
    if NOT_SUPPORTED in parts:
        v.verdict = NOT_SUPPORTED
    return v


def check_aux_decides_lora(study: Study | Measured) -> Verdict:
    m, v = _start("c", "The auxiliary set decides LoRA's retention",
               "margin = mean retention(aux) - retention(no aux) over LoRA twins, minus the largest effect "
               "(range of level means) of the weights and of the layers", study)
    lora = [r for r in m.rows if r.labels.get("method") == "lora"]
    pairs = _aux_pairs(lora)
    if not pairs:
        v.figures.append("needs LoRA rows with and without aux")
        return v
    digits = m.digits("retention")
    effects = [m.retention[a.id] - m.retention[b.id] for b, a in pairs]
    aux_effect = _stack(effects).mean(axis=0)
    others = {label: _factor_range(lora, m.retention, label) for label in ("weights", "layers")}
    known = [x for x in others.values() if x is not None]
    max_other = _stack(known).max(axis=0) if known else np.zeros(1)
    per_pair = ", ".join(f"r{b.id}->r{a.id} {float(e[0]):+.{digits}f}" for (b, a), e in zip(pairs, effects))
    v.figures += [f"aux effect per pair: {per_pair}",
                  f"mean aux effect {float(aux_effect[0]):+.{digits}f}; effect of weights "
                  f"{_fmt_opt(others['weights'], digits)}, of layers {_fmt_opt(others['layers'], digits)}"]
    _decide(v, aux_effect - max_other, digits)
    return v


def _aux_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    def key(r: Row) -> tuple:
        return tuple((k, str(v)) for k, v in sorted(r.labels.items()) if k not in ("aux", "published"))

    with_aux = {key(r): r for r in rows if r.labels.get("aux")}
    return [(r, with_aux[key(r)]) for r in rows if not r.labels.get("aux") and key(r) in with_aux]


def _factor_range(rows: list[Row], values: dict[int, np.ndarray], label: str) -> np.ndarray | None:
    levels: dict[str, list[np.ndarray]] = {}
    for r in rows:
        levels.setdefault(str(r.labels.get(label)), []).append(values[r.id])
    if len(levels) < 2:
        return None
    means = _stack([_stack(v).mean(axis=0) for v in levels.values()])
    return means.max(axis=0) - means.min(axis=0)


def _fmt_opt(x: np.ndarray | None, digits: int) -> str:
    return "n/a" if x is None else f"{float(x[0]):.{digits}f}"


def check_qkv_last3(study: Study | Measured) -> Verdict:
    m, v = _start("d", "Last-3-layer QKV (LoRA) is the best trade-off",
               "margin = z(style gain) + z(retention) of the best LoRA qkv last-layers row minus the best "
               "other trained row's (z over the trained rows)", study)
    rows = m.rows
    cands = [i for i, r in enumerate(rows) if group_of(r.labels) == "lora-last" and r.labels.get("weights") == "qkv"]
    others = [i for i in range(len(rows)) if i not in cands]
    if not cands or not others:
        v.figures.append("needs LoRA qkv last-layers rows and other trained rows")
        return v
    score = _tradeoff(rows, m)
    point = {r.id: float(score[i, 0]) for i, r in enumerate(rows)}
    ranked = sorted(rows, key=lambda r: -point[r.id])
    best = max((rows[i] for i in cands), key=lambda r: point[r.id])
    front = pareto_front({r.id: (float(m.style[r.id][0]), float(m.retention[r.id][0])) for r in rows})
    v.figures += ["top rows by trade-off: " + ", ".join(f"r{r.id} {point[r.id]:+.2f}" for r in ranked[:4]),
                  f"best qkv last-layers row r{best.id}: rank {ranked.index(best) + 1} of {len(rows)}, "
                  f"style gain {float(m.style[best.id][0]):+.{m.digits('style')}f}, "
                  f"retention {float(m.retention[best.id][0]):+.{m.digits('retention')}f}, "
                  f"{'on' if best.id in front else 'off'} the Pareto front "
                  f"(front: {', '.join(f'r{i}' for i in sorted(front))}); margin in z units"]
    _decide(v, score[cands].max(axis=0) - score[others].max(axis=0), 2)
    return v


def _tradeoff(rows: list[Row], m: Measured) -> np.ndarray:
    """(rows, replicates) z(style gain) + z(retention), standardized over the rows in each replicate."""
    score = 0.0
    for values in (m.style, m.retention):
        x = _stack([values[r.id] for r in rows])
        sd = x.std(axis=0)
        score = score + (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return np.asarray(score)


def pareto_front(points: dict[int, tuple[float, float]]) -> set[int]:
    """Ids of rows no other row beats on both style gain and retention (>= on both, > on one)."""
    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] >= b[1] and a != b

    return {i for i, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != i)}


CHECKS = (check_freeze_first, check_p_tuning, check_aux_decides_lora, check_qkv_last3)


def check_conclusions(study: Study, measures: dict[str, str] | None = None) -> list[Verdict]:
    """The four verdicts, in the 2023 order (a)-(d), decided on `measures` ({role: measure}; default
    the 2023 reading, BLEU/ROUGE)."""
    m = measured(study, measures)
    return [check(m) for check in CHECKS]


def method_note(study: Study, measures: dict[str, str] | None = None) -> str:
    """How the verdicts on `measures` were reached, for the report."""
    m = measured(study, measures)
    if m.bootstrapped:
        n = {role: len(study.paired[MEASURE_COLUMNS[(role, m.measures[role])]].index) for role in m.measures}
        return (f"Decided on {m.label}: {stats.METHOD}; {n['style']} style and {n['retention']} retention "
                f"samples. Supported when the margin's CI lies above 0, not supported when below 0, "
                f"else inconclusive.")
    return (f"Decided on {m.label}: point estimates (no per-sample data for every row compared): the "
            f"margin's sign decides, without a CI.")


def missing_measures(study: Study, measures: dict[str, str]) -> str | None:
    """Why the study cannot be decided on `measures` (no trained row has their columns), else None."""
    trained = [r for r in study.rows if r.id != 0 and r.status == "done"]
    for role, measure in measures.items():
        column = MEASURE_COLUMNS[(role, measure)]
        if trained and not any(column in r.mean for r in trained):
            source = "generated_predictions.jsonl" if measure == "bleu_rouge" else "likelihood.jsonl"
            why = (" (kl needs the base model's log-probs)" if measure == "kl" else
                   " (rows made by a tunelab before per-sample likelihood)" if measure == "nll" else "")
            return f"decide_on {role}: {measure} needs {column} from each row's {source}, and no row has it{why}"
    return None
