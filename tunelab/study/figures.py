"""The report's two figures, as PNG bytes (matplotlib with the Agg backend: no display needed).

loss_curves:   training loss vs step of every row on one axis (colour = method group, dashed = aux).
style_scatter: style gain (x) vs retention (y) per row, this study next to the published 2023 rows;
               error bars show each row's noise (seed spread, or eval-sample standard error).
trajectories:  each row's path in the same plane along training (`eval_every`), from the base model at
               (0, 0) through every scored checkpoint to its final weights (arrow heads show the direction).
"""

from __future__ import annotations

import io

from tunelab.study.conclusions import group_of
from tunelab.study.results import Study
from tunelab.study.trajectory import Trajectory

GROUP_COLORS = {"freeze-first": "#d62728", "freeze-last": "#ff9896", "p_tuning": "#2ca02c", "lora-first": "#1f77b4",
                "lora-last": "#9467bd", "lora-all": "#17becf", "full": "#8c564b"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _color(labels: dict) -> str:
    return GROUP_COLORS.get(group_of(labels) or "", "#7f7f7f")


def loss_curves(study: Study) -> bytes | None:
    """All rows' loss curves (first seed of each row) on one figure; None when no row logged a loss."""
    plt = _plt()
    curves = [(row, next((r.loss_curve for r in row.runs if r.loss_curve), None)) for row in study.rows]
    curves = [(row, c) for row, c in curves if c]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for row, curve in curves:
        steps, losses = zip(*curve)
        ax.plot(steps, losses, color=_color(row.labels), linestyle="--" if row.labels.get("aux") else "-",
                marker="." if len(steps) < 12 else None, linewidth=1.2, label=f"r{row.id} {row.name}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{study.name}: training loss of every row (dashed = with aux data)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=1 + len(curves) // 12, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _scatter(ax, study: Study, title: str) -> bool:
    rows = [r for r in study.rows if r.id != 0 and "style_gain" in r.mean and "retention" in r.mean]
    for row in rows:
        x, y = row.mean["style_gain"], row.mean["retention"]
        xerr, yerr = row.noise("style_gain"), row.noise("retention")
        if xerr is not None or yerr is not None:
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, color=_color(row.labels), alpha=0.5, linewidth=0.8)
        ax.scatter(x, y, color=_color(row.labels), marker="^" if row.labels.get("aux") else "o", s=40, zorder=3)
        ax.annotate(str(row.id), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axhline(0, color="#999", linewidth=0.8)
    ax.axvline(0, color="#999", linewidth=0.8)
    ax.set_xlabel("style gain (persona score - base)")
    ax.set_ylabel("retention (general score - base)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return bool(rows)


def style_scatter(study: Study, reference: Study | None) -> bytes | None:
    """Style gain vs retention: this study (left) and the published 2023 rows (right)."""
    plt = _plt()
    panels = 2 if reference is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    has_rows = _scatter(axes[0][0], study, f"this study ({study.name})")
    if reference is not None:
        _scatter(axes[0][1], reference, "2023: ChatGLM-6B on other data (not comparable in absolute terms)")
    if not has_rows:
        plt.close(fig)
        return None
    present = {group_of(r.labels) for s in (study, reference) if s is not None for r in s.rows}
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=g)
               for g, c in GROUP_COLORS.items() if g in present]
    handles += [plt.Line2D([], [], color="#555", marker=m, linestyle="", label=lab)
                for m, lab in (("o", "no aux"), ("^", "with aux"))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, bbox_to_anchor=(0.5, -0.06))
    return _png(fig)


def trajectories(paths: list[Trajectory], measures: dict[str, str], title: str) -> bytes | None:
    """Every (row, seed)'s path, one colour per method group (dashed = aux), arrows along it, the final
    point labelled with the row id; None unless some path has a point between the base and the end."""
    if not any(len(t.points) > 2 for t in paths):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 6))
    for t in paths:
        steps, xs, ys = zip(*t.points)
        color = _color(t.labels)
        ax.plot(xs, ys, color=color, linestyle="--" if t.labels.get("aux") else "-", linewidth=1.0, alpha=0.8)
        for i in range(1, len(xs)):
            ax.annotate("", xy=(xs[i], ys[i]), xytext=(xs[i - 1], ys[i - 1]),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": 1.0})
        ax.scatter(xs[1:-1], ys[1:-1], color=color, s=10, zorder=3)
        ax.scatter(xs[-1:], ys[-1:], color=color, marker="^" if t.labels.get("aux") else "o", s=40, zorder=3)
        ax.annotate(f"{t.row_id} (step {steps[-1]})", (xs[-1], ys[-1]), textcoords="offset points",
                    xytext=(4, 3), fontsize=7)
    ax.axhline(0, color="#999", linewidth=0.8)
    ax.axvline(0, color="#999", linewidth=0.8)
    ax.set_xlabel(f"style gain ({measures['style']}, persona set, vs base)")
    ax.set_ylabel(f"retention ({measures['retention']}, general set, vs base)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    present = {group_of(t.labels) for t in paths}
    handles = [plt.Line2D([], [], color=c, label=g) for g, c in GROUP_COLORS.items() if g in present]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)
