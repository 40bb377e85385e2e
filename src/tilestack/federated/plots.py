"""PNG plots of federated runs: one metric per round, one line per run.

    from tilestack.federated.plots import plot_rounds
    plot_rounds({"FedAvg": h1, "FedProx mu=1": h2}, "train_loss", "docs/federated/loss.png", title="...")
    plot_grid({"0%": {...}, "50%": {...}}, ["train_loss", "test_acc"], "docs/federated/stragglers.png")

Metric names are ``RoundMetrics`` fields (``test_acc``, ``train_loss``, ``sim_time``, ``bytes_up``...)
or ``client_acc.<stat>`` for the fairness summary (``client_acc.p10``), ``extra.<key>``, and the metrics the
strategy aggregated: ``eval_metrics.eval-acc`` (federated evaluation, weighted by examples),
``train_metrics.train-loss``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tilestack.federated.metrics import History, RoundMetrics
from tilestack.files import write_figure

LABELS = {
    "train_loss": "training loss (global model)",
    "test_loss": "test loss",
    "test_acc": "test accuracy",
    "sim_time": "simulated round time (s)",
    "bytes_up": "bytes up per round",
    "bytes_down": "bytes down per round",
    "extra.ari": "adjusted Rand index vs planted groups",
    "client_acc.worst10": "accuracy of the worst 10% of clients",
    "extra.epsilon": "epsilon (client-level DP)",
    "eval_metrics.eval-acc": "federated evaluation accuracy (weighted by examples)",
    "eval_metrics.eval-loss": "federated evaluation loss (weighted by examples)",
    "train_metrics.train-loss": "clients' training loss (weighted by examples)",
}


DICT_FIELDS = ("client_acc", "extra", "train_metrics", "eval_metrics")  # RoundMetrics fields plotted as <field>.<key>


NUMBER_FIELDS = tuple(f.name for f in dataclasses.fields(RoundMetrics) if f.type in ("int", "float"))


def _check(where: str, runs: dict, metrics: list[str], *, keys: bool = True) -> None:
    """Refuse what would fail inside matplotlib or plot nothing, naming the argument: a metric that is no number field
    of ``RoundMetrics`` ('accuracy' raised AttributeError, 'excluded' a TypeError from float() of a dict), a
    ``<field>.<key>`` that no round of these runs holds ('extra.epsilon' of a run without DP: an empty plot, without a
    word), runs that are no dict of Histories, and nothing to plot (matplotlib's "Number of rows must be a positive
    integer")."""
    if not isinstance(runs, dict) or not runs or not all(isinstance(h, History) for h in runs.values()):
        raise ValueError(f"{where}: runs={runs!r:.200}; expected a non-empty dict of label -> History")
    if not metrics:
        raise ValueError(f"{where}: metrics={metrics!r}; expected at least one metric name")
    for metric in metrics:
        field, dot, key = metric.partition(".") if isinstance(metric, str) else ("", "", "")
        if dot and field in DICT_FIELDS:
            held = sorted({k for h in runs.values() for r in h.rounds for k in getattr(r, field)})
            if keys and key not in held and any(h.rounds for h in runs.values()):
                raise ValueError(f"{where}: metric={metric!r}: no round of these runs has {field} {key!r}; expected "
                                 f"one of {[f'{field}.{k}' for k in held] or '(none: ' + field + ' is empty)'}")
        elif metric not in NUMBER_FIELDS:
            raise ValueError(f"{where}: metric={metric!r}; expected a number field of RoundMetrics {NUMBER_FIELDS} "
                             f"or <field>.<key> of {DICT_FIELDS} (e.g. 'client_acc.p10')")


def _values(history: History, metric: str) -> list[float]:
    field, _, key = metric.partition(".")
    if key and field in DICT_FIELDS:
        return [getattr(r, field).get(key, float("nan")) for r in history.rounds]
    return history.column(metric)


def _axes_plot(ax, runs: dict[str, History], metric: str, title: str) -> None:
    for label, h in runs.items():
        ax.plot([r.round for r in h.rounds], _values(h, metric), label=label, linewidth=1.4)
    ax.set_xlabel("round")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: str | Path) -> Path:
    """Lay out, write as PNG (making the folder), and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = write_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_rounds(runs: dict[str, History], metric: str, path: str | Path, *, title: str = "") -> Path:
    """One line per run of ``metric`` against the round; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _check("plot_rounds", runs, [metric])
    fig, ax = plt.subplots(figsize=(6, 4))
    _axes_plot(ax, runs, metric, title)
    return _save(fig, path)


def plot_grid(panels: dict[str, dict[str, History]], metrics: list[str], path: str | Path) -> Path:
    """A grid of plots: one row per metric, one column per panel (e.g. a straggler share)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(panels, dict) or not panels:
        raise ValueError(f"plot_grid: panels={panels!r:.200}; expected a non-empty dict of title -> runs")
    for runs in panels.values():
        _check("plot_grid", runs, metrics, keys=False)
    # a key held by some panel's runs only (IFCA's 'extra.ari' beside FedAvg) is a metric of this grid
    _check("plot_grid", {(t, label): h for t, runs in panels.items() for label, h in runs.items()}, metrics)
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(4.2 * len(panels), 3.3 * len(metrics)), squeeze=False)
    for j, (panel, runs) in enumerate(panels.items()):
        for i, metric in enumerate(metrics):
            _axes_plot(axes[i][j], runs, metric, panel)
    return _save(fig, path)
