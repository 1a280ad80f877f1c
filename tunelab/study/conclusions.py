"""The 2023 study's four conclusions as precise tests on a study's rows. Pure.

Each test returns a Verdict: "supported", "not supported" or "inconclusive", the definition it applied
and the numbers behind it. Quantities (see results.py): style_gain (mean persona score minus base) and
retention (mean general score minus base; < 0 = knowledge lost), per row, averaged over seeds.

Method groups: freeze-first, freeze-last, lora-first, lora-last, lora-all, p_tuning (and full), from
the row labels (method + layers: first*/last*/all). A group's value is the mean over its rows.

Noise: the mean over rows of each row's noise of the quantity compared (Row.noise: the seed spread
with several seeds, else the standard error over eval samples of the difference from the base row).
A deciding gap smaller than the noise gives "inconclusive". Without any noise estimate (no predictions
files, one seed) verdicts rest on point estimates, and the figures say so.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from tunelab.study.results import Row, Study

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass
class Verdict:
    key: str
    claim: str
    verdict: str
    test: str
    figures: list[str] = field(default_factory=list)


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


def trained_rows(study: Study) -> list[Row]:
    """Finished trained rows that have both derived quantities."""
    return [r for r in study.rows if r.id != 0 and "style_gain" in r.mean and "retention" in r.mean]


def group_means(rows: list[Row], column: str) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for row in rows:
        group = group_of(row.labels)
        if group is not None and column in row.mean:
            groups.setdefault(group, []).append(row.mean[column])
    return {g: statistics.fmean(v) for g, v in groups.items()}


def noise(rows: list[Row], column: str) -> float | None:
    values = [n for r in rows if (n := r.noise(column)) is not None]
    return statistics.fmean(values) if values else None


def _decide(margin: float, tol: float | None) -> str:
    """margin > 0 means the claim holds; within the noise it is inconclusive."""
    tol = tol or 0.0
    if margin > tol:
        return SUPPORTED
    if margin < -tol:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def _noise_note(*noises: tuple[str, float | None]) -> str:
    known = [f"{name} {tol:.2f}" for name, tol in noises if tol is not None]
    if known:
        return "noise: " + ", ".join(known)
    return "no noise estimate (one seed, no predictions): verdict on point estimates"


def _fmt_groups(values: dict[str, float]) -> str:
    return ", ".join(f"{g} {v:+.2f}" for g, v in sorted(values.items(), key=lambda kv: kv[1]))


def _extreme(target: str, values: dict[str, float], highest: bool, tol: float | None) -> tuple[str, float]:
    """Is `target` the highest (lowest) group? Verdict and margin over the best other group."""
    others = [v for g, v in values.items() if g != target]
    best_other = max(others) if highest else min(others)
    margin = values[target] - best_other if highest else best_other - values[target]
    return _decide(margin, tol), margin


def check_freeze_first(study: Study) -> Verdict:
    # (a) Supported when the freeze-first group has the lowest mean retention of all method groups by more
    # than the noise; not supported when another group is lower by more than the noise.
    v = Verdict("a", "Freeze on the first layers damages general scores most", INCONCLUSIVE,
                "mean retention of the freeze-first rows is the lowest of all method groups")
    rows = trained_rows(study)
    values, tol = group_means(rows, "retention"), noise(rows, "retention")
    if "freeze-first" not in values or len(values) < 2:
        v.figures.append("needs freeze-first rows and another method group")
        return v
    v.verdict, margin = _extreme("freeze-first", values, highest=False, tol=tol)
    v.figures += [f"retention by group: {_fmt_groups(values)}",
                  f"freeze-first vs the next-lowest group: {margin:+.2f}", _noise_note(("retention", tol))]
    return v


def check_p_tuning(study: Study) -> Verdict:
    # (b) Two parts, both needed: the p_tuning group has the highest mean retention of all groups (keeps
    # knowledge) and the lowest mean style gain (learns little style). Either part failing by more than
    # the noise -> not supported; both holding by more than the noise -> supported.
    v = Verdict("b", "P-Tuning keeps knowledge but learns little style", INCONCLUSIVE,
                "the p_tuning group has the highest mean retention and the lowest mean style gain of all groups")
    rows = trained_rows(study)
    ret, gain = group_means(rows, "retention"), group_means(rows, "style_gain")
    if "p_tuning" not in ret or len(ret) < 2:
        v.figures.append("needs p_tuning rows and another method group")
        return v
    tol_r, tol_s = noise(rows, "retention"), noise(rows, "style_gain")
    keeps, m_keep = _extreme("p_tuning", ret, highest=True, tol=tol_r)
    little, m_little = _extreme("p_tuning", gain, highest=False, tol=tol_s)
    parts = {keeps, little}
    v.verdict = NOT_SUPPORTED if NOT_SUPPORTED in parts else SUPPORTED if parts == {SUPPORTED} else INCONCLUSIVE
    v.figures += [f"retention by group: {_fmt_groups(ret)} (p_tuning margin {m_keep:+.2f}: {keeps})",
                  f"style gain by group: {_fmt_groups(gain)} (p_tuning margin {m_little:+.2f}: {little})",
                  _noise_note(("retention", tol_r), ("style gain", tol_s))]
    return v


def check_aux_decides_lora(study: Study) -> Verdict:
    # (c) Among LoRA rows, pair each row without aux with its twin with aux (same other labels).
    # aux effect = mean over pairs of retention(aux) - retention(no aux). A factor's effect = the range
    # (max - min) of mean retention over its levels (weights: mlp/qkv; layers: first/last/all).
    # Supported when every pair gains retention with aux and the aux effect exceeds every other factor's
    # effect by more than the noise; not supported when the aux effect is <= 0 or falls below another
    # factor's effect by more than the noise.
    v = Verdict("c", "The auxiliary set decides LoRA's retention", INCONCLUSIVE,
                "retention(aux) - retention(no aux) is > 0 in every LoRA pair, and its mean exceeds the effect "
                "(range of level means) of the weights and of the layers")
    lora = [r for r in trained_rows(study) if r.labels.get("method") == "lora"]
    pairs = _aux_pairs(lora)
    if not pairs:
        v.figures.append("needs LoRA rows with and without aux")
        return v
    effects = [a.mean["retention"] - b.mean["retention"] for b, a in pairs]
    aux_effect = statistics.fmean(effects)
    others = {label: _factor_range(lora, label) for label in ("weights", "layers")}
    max_other = max([x for x in others.values() if x is not None], default=0.0)
    tol = noise(lora, "retention")
    if aux_effect <= 0:
        v.verdict = NOT_SUPPORTED
    else:
        v.verdict = _decide(aux_effect - max_other, tol)
        if v.verdict == SUPPORTED and min(effects) <= 0:
            v.verdict = INCONCLUSIVE
    per_pair = ", ".join(f"r{b.id}->r{a.id} {e:+.2f}" for (b, a), e in zip(pairs, effects))
    v.figures += [f"aux effect per pair: {per_pair}",
                  f"mean aux effect {aux_effect:+.2f}; effect of weights {_fmt_opt(others['weights'])}, "
                  f"of layers {_fmt_opt(others['layers'])}", _noise_note(("retention", tol))]
    return v


def _aux_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    def key(r: Row) -> tuple:
        return tuple((k, str(v)) for k, v in sorted(r.labels.items()) if k not in ("aux", "published"))

    with_aux = {key(r): r for r in rows if r.labels.get("aux")}
    return [(r, with_aux[key(r)]) for r in rows if not r.labels.get("aux") and key(r) in with_aux]


def _factor_range(rows: list[Row], label: str) -> float | None:
    levels: dict[str, list[float]] = {}
    for r in rows:
        levels.setdefault(str(r.labels.get(label)), []).append(r.mean["retention"])
    means = [statistics.fmean(v) for v in levels.values()]
    return max(means) - min(means) if len(means) >= 2 else None


def _fmt_opt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def check_qkv_last3(study: Study) -> Verdict:
    # (d) Trade-off score per trained row = z(style_gain) + z(retention), z standardized over the trained
    # rows (population std), so both axes weigh the same whatever their scales. Supported when the best
    # LoRA qkv last-layers row scores above every other row by more than the noise (in z units: noise of
    # each quantity divided by its std, summed); not supported when another row is above it by more.
    v = Verdict("d", "Last-3-layer QKV (LoRA) is the best trade-off", INCONCLUSIVE,
                "the best LoRA qkv last-layers row has the highest z(style gain) + z(retention) of all trained rows")
    rows = trained_rows(study)
    cands = [r for r in rows if group_of(r.labels) == "lora-last" and r.labels.get("weights") == "qkv"]
    if not cands or len(rows) < 2:
        v.figures.append("needs LoRA qkv last-layers rows and other trained rows")
        return v
    score, sds = _tradeoff(rows)
    ranked = sorted(rows, key=lambda r: -score[r.id])
    best_c = max(cands, key=lambda r: score[r.id])
    best_o = max((r for r in rows if r not in cands), key=lambda r: score[r.id], default=None)
    tol_s, tol_r = noise(rows, "style_gain"), noise(rows, "retention")
    tol = None if tol_s is None or tol_r is None else tol_s / sds[0] + tol_r / sds[1]
    margin = score[best_c.id] - (score[best_o.id] if best_o else float("-inf"))
    v.verdict = _decide(margin, tol)
    front = pareto_front(rows)
    v.figures += ["top rows by trade-off: " + ", ".join(f"r{r.id} {score[r.id]:+.2f}" for r in ranked[:4]),
                  f"best qkv last-layers row r{best_c.id}: rank {ranked.index(best_c) + 1} of {len(rows)}, "
                  f"style gain {best_c.mean['style_gain']:+.2f}, retention {best_c.mean['retention']:+.2f}, "
                  f"{'on' if best_c.id in front else 'off'} the Pareto front "
                  f"(front: {', '.join(f'r{i}' for i in sorted(front))})",
                  f"margin over the best other row: {margin:+.2f} z", _noise_note(("trade-off z", tol))]
    return v


def _tradeoff(rows: list[Row]) -> tuple[dict[int, float], tuple[float, float]]:
    score = {r.id: 0.0 for r in rows}
    sds = []
    for column in ("style_gain", "retention"):
        values = [r.mean[column] for r in rows]
        mu, sd = statistics.fmean(values), statistics.pstdev(values) or 1.0
        sds.append(sd)
        for r in rows:
            score[r.id] += (r.mean[column] - mu) / sd
    return score, (sds[0], sds[1])


def pareto_front(rows: list[Row]) -> set[int]:
    """Ids of rows no other row beats on both style gain and retention (>= on both, > on one)."""
    def dominates(a: Row, b: Row) -> bool:
        ge = all(a.mean[c] >= b.mean[c] for c in ("style_gain", "retention"))
        return ge and any(a.mean[c] > b.mean[c] for c in ("style_gain", "retention"))

    return {r.id for r in rows if not any(dominates(o, r) for o in rows if o is not r)}


CHECKS = (check_freeze_first, check_p_tuning, check_aux_decides_lora, check_qkv_last3)


def check_conclusions(study: Study) -> list[Verdict]:
    """The four verdicts, in the 2023 order (a)-(d)."""
    return [check(study) for check in CHECKS]
