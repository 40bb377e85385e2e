"""Figures of a plan (matplotlib, Agg; PNG files).

    timeline_png(pred, "timeline.png")        # each pipeline rank's forwards and backwards over the step, bubbles grey
    memory_png(pred, "memory.png")            # bytes per rank, stacked by component
    predicted_vs_measured_png(rows, "pvm.png")  # one point per measured plan, the diagonal and a +-15% band
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tilestack.files import write_figure
from tilestack.parallel.plan.predict import MEMORY_COMPONENTS, Prediction

MIB = 1 << 20
BAND = 0.15                 # the bar for step time, drawn around the diagonal
COLORS = {"F": "#4C72B0", "B": "#DD8452"}
MEMORY_COLORS = ("#4C72B0", "#937860", "#55A868", "#C44E52", "#8172B2", "#CCB974", "#64B5CD")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def timeline_png(pred: Prediction, path: str | Path) -> Path:
    """The simulated pipeline of ``pred``: a row per pipeline rank, a box per forward (F) and backward (B) of a
    micro-batch (labelled with its micro-batch, and its stage when a rank holds several), idle time shaded as the
    bubble; after the pipeline, the gradient reduction and the optimizer step."""
    plt = _plt()
    sim, plan = pred.sim, pred.plan
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.6 * plan.pp))
    scale = 1e3
    for e in sim.events:
        ax.broken_barh([(e.start * scale, (e.end - e.start) * scale)], (e.rank - 0.4, 0.8),
                       facecolors=COLORS[e.kind], edgecolors="white", linewidth=0.5)
        label = f"{e.kind}{e.micro}" + (f".{e.stage}" if plan.stages_per_rank > 1 else "")
        if (e.end - e.start) * scale > sim.makespan * scale / 60:
            ax.text((e.start + e.end) / 2 * scale, e.rank, label, ha="center", va="center", fontsize=6, color="white")
    for r in range(plan.pp):
        ax.broken_barh([(0, sim.makespan * scale)], (r - 0.4, 0.8), facecolors="#DDDDDD", zorder=0)
    tail = pred.terms["dp comm"] + pred.terms["optimizer"]
    if tail > 0:
        ax.broken_barh([(sim.makespan * scale, tail * scale)], (-0.45, plan.pp - 0.1), facecolors="#8C8C8C",
                       alpha=0.5)
        ax.text((sim.makespan + tail / 2) * scale, (plan.pp - 1) / 2, "grad sync\n+ optimizer", ha="center",
                va="center", fontsize=7)
    ax.set_yticks(range(plan.pp), [f"rank {r}" for r in range(plan.pp)])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"{plan.label()}: step {pred.step_s * scale:.1f} ms, bubble {sim.bubble:.0%} of the pipeline "
                 f"(F forward, B backward; grey idle)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def memory_png(pred: Prediction, path: str | Path, *, limit: float | None = None) -> Path:
    """Stacked bars: bytes per pipeline rank by component (parameters, gradients, optimizer, activations,
    transient buffers, what exists only after backward), the predicted peak as a black tick, the limit dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.8 + 1.0 * len(pred.memory), 3.6))
    bottom = [0.0] * len(pred.memory)
    for comp, color in zip(MEMORY_COMPONENTS, MEMORY_COLORS, strict=True):
        vals = [m[comp] / MIB for m in pred.memory]
        ax.bar(range(len(vals)), vals, bottom=bottom, color=color, label=comp)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    # the components never all live at once (activations are gone when ZeRO's slices appear): the peak
    ax.scatter(range(len(pred.peaks)), [p / MIB for p in pred.peaks], marker="_", s=900, color="black",
               label="predicted peak", zorder=3)
    if limit:
        ax.axhline(limit / MIB, color="black", linestyle="--", linewidth=1, label="limit")
    ax.set_xticks(range(len(pred.memory)), [f"pp rank {r}" for r in range(len(pred.memory))])
    ax.set_ylabel("MiB per rank")
    ax.set_title(f"{pred.plan.label()}: memory per rank", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def predicted_vs_measured_png(rows: Sequence[dict[str, Any]], path: str | Path, *, key: str = "step_s",
                              unit: float = 1e3, label: str = "step time (ms)") -> Path:
    """Measured against predicted ``key`` (rows with ``predicted_<key>`` and ``measured_<key>``), coloured by the
    model, the diagonal and a +-15% band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.6))
    models = sorted({r.get("model", "") for r in rows})
    hi = 0.0
    for mi, model in enumerate(models):
        pts = [(r[f"predicted_{key}"] * unit, r[f"measured_{key}"] * unit) for r in rows if r.get("model", "") == model]
        ax.scatter([p for p, _ in pts], [m for _, m in pts], s=18, label=model or None, color=f"C{mi}")
        hi = max([hi] + [max(p, m) for p, m in pts])
    xs = [0, hi * 1.05]
    ax.plot(xs, xs, color="black", linewidth=1)
    ax.fill_between(xs, [x * (1 - BAND) for x in xs], [x * (1 + BAND) for x in xs], color="grey", alpha=0.2,
                    label=f"+-{BAND:.0%}")
    ax.set_xlabel(f"predicted {label}")
    ax.set_ylabel(f"measured {label}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
