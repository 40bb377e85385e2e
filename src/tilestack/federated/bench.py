"""``tilestack fl bench``: methods by heterogeneity level over fixed tasks, partitions, system profiles and seeds.

    from tilestack.federated.bench import BenchSpec, run_bench, write_report
    spec = BenchSpec.default()                      # the size `tilestack fl bench` runs (a few minutes, 2 cores)
    cells = run_bench(spec, workers=2)              # one Cell per (task, partition, profile, method, seed)
    write_report(spec, cells, "docs/federated.md", "docs/img")   # the table and the plots, between markers

In the spirit of LEAF and FedScale: one fixed grid, every method run on every cell with the same seeds,
one comparison table. Tasks are generated or shipped locally (``blobs``: a Gaussian mixture; ``digits``:
scikit-learn's 8x8 digits), partitions go from IID through Dirichlet(1.0, 0.5, 0.1) to two-class shards,
system profiles are ``uniform`` (every client does its full work) and ``stragglers`` (half of the selected
clients do a random share of it, speeds log-normal). q-FedAvg runs with q = 1 and L = 1 / (lr K), K the
local steps (the local run read as one step of the mean gradient). Each cell reports the final global test accuracy and
the mean test accuracy of the worst 10% of clients (fairness), as mean +- std over seeds. Runs are
independent and go to ``workers`` processes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from tilestack.files import write_atomic

PARTITIONS = {  # name -> Task fields
    "iid": dict(partitioner="iid"),
    "dir1.0": dict(partitioner="dirichlet", partition_alpha=1.0),
    "dir0.5": dict(partitioner="dirichlet", partition_alpha=0.5),
    "dir0.1": dict(partitioner="dirichlet", partition_alpha=0.1),
    "shards2": dict(partitioner="shards", classes_per_client=2),
}
TASKS = {  # name -> Task fields (each small enough for a CPU run of a second or two)
    "blobs": dict(dataset="blobs", num_samples=3000, num_features=30, num_classes=10, separation=0.6, model="mlp",
                  hidden=32, lr=0.05, batch_size=16),
    "digits": dict(dataset="digits", model="logreg", lr=0.1, batch_size=16),
    "digits-cnn": dict(dataset="digits", model="cnn", lr=0.3, batch_size=32),
}  # fmt: skip
PROFILES = {  # name -> SystemModel fields
    "uniform": dict(),
    "stragglers": dict(straggler_fraction=0.5, speed_sigma=0.5),
}
METHODS = ("fedavg", "fedprox", "scaffold", "fedadam", "qfedavg")
START_MARK = "<!-- fl-bench:start -->"
END_MARK = "<!-- fl-bench:end -->"


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """The grid: every combination of these is one cell."""

    tasks: tuple[str, ...] = ("blobs", "digits")
    partitions: tuple[str, ...] = tuple(PARTITIONS)
    profiles: tuple[str, ...] = tuple(PROFILES)
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1)
    clients: int = 20
    per_round: int = 10
    rounds: int = 20
    local_steps: int = 10

    def __post_init__(self) -> None:
        checks = (("tasks", self.tasks, TASKS), ("partitions", self.partitions, PARTITIONS),
                  ("profiles", self.profiles, PROFILES), ("methods", self.methods, METHODS))  # fmt: skip
        for name, given, known in checks:
            bad = [g for g in given if g not in known]
            if bad or not given:
                raise ValueError(f"BenchSpec: {name}={given!r}; expected a non-empty subset of {tuple(known)}")
        # counts and seeds before any cell: clients=2.5 or seeds=(-1,) failed in the first cell's Task (in a worker
        # process), naming Task's num_clients or seed; seeds=(0, 0) ran one seed twice and reported its std 0 "over
        # seeds"
        from tilestack.federated.checks import require_int

        for name in ("clients", "per_round", "rounds", "local_steps"):
            require_int("BenchSpec", name, getattr(self, name), low=1)
        if not isinstance(self.seeds, (tuple, list)) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"BenchSpec: seeds={self.seeds!r}; expected a non-empty tuple of distinct integers >= 0")
        for seed in self.seeds:
            require_int("BenchSpec", "a seed of seeds", seed, low=0)
        if not 1 <= self.per_round <= self.clients or self.rounds < 1 or self.local_steps < 1 or not self.seeds:
            raise ValueError(
                f"BenchSpec: clients={self.clients}, per_round={self.per_round}, rounds={self.rounds}, "
                f"local_steps={self.local_steps}, seeds={self.seeds}; expected 1 <= per_round <= clients, "
                "rounds >= 1, local_steps >= 1, at least one seed"
            )

    @classmethod
    def default(cls) -> BenchSpec:
        return cls()

    @classmethod
    def full(cls) -> BenchSpec:
        """Adds the PyTorch CNN on digits and a third seed (tens of minutes on a 2-core CPU)."""
        return cls(tasks=("blobs", "digits", "digits-cnn"), seeds=(0, 1, 2), rounds=30)

    def cells(self) -> list[tuple[str, str, str, str, int]]:
        return [(t, p, s, m, seed) for t in self.tasks for p in self.partitions for s in self.profiles
                for m in self.methods for seed in self.seeds]  # fmt: skip


@dataclasses.dataclass
class Cell:
    task: str
    partition: str
    profile: str
    method: str
    seed: int
    test_acc: float
    worst10: float
    bytes_up: int
    seconds: float
    accs: list[float]


def run_cell(spec: BenchSpec, cell: tuple[str, str, str, str, int]) -> Cell:
    """One federated run of ``cell``; the in-process engine, seeded."""
    from tilestack.federated import SystemModel, Task, simulate
    from tilestack.federated.strategies import STRATEGY_SETTINGS, make_strategy

    task_name, part, profile, method, seed = cell
    task = Task(**TASKS[task_name], **PARTITIONS[part], num_clients=spec.clients, seed=seed,
                local_steps=spec.local_steps)  # fmt: skip
    system = SystemModel(spec.clients, seed=seed, **PROFILES[profile])
    # each method gets only the settings it reads (make_strategy refuses another's)
    own = {k: v for k, v in dict(proximal_mu=0.1, server_lr=0.03, q=1.0).items() if method in STRATEGY_SETTINGS[k][1]}
    strategy = make_strategy(method, clients_per_round=spec.per_round, num_clients=spec.clients,
                             client_lr=task.lr * spec.local_steps, **own)  # fmt: skip
    t0 = time.perf_counter()
    res = simulate(strategy, task, rounds=spec.rounds, system=system, seed=seed)
    last = res.history.rounds[-1]
    worst10 = last.client_acc.get("worst10", float("nan"))
    return Cell(task_name, part, profile, method, seed, last.test_acc, worst10, sum(res.history.column("bytes_up")),
                time.perf_counter() - t0, res.history.column("test_acc"))  # fmt: skip


def _run_cell_args(args: tuple[BenchSpec, tuple]) -> Cell:
    return run_cell(*args)


def _quiet_worker(parent: int | None = None) -> None:
    """A worker process: one BLAS thread, and Flower's per-round notices off (they would break the bar). It ends
    when ``parent`` is gone: a `tilestack fl bench` SIGKILLed left its spawned workers waiting for cells forever."""
    import logging
    import threading

    import torch

    from tilestack.federated.engine import _exit_with

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="tilestack-parent-watch").start()


def run_bench(spec: BenchSpec, *, workers: int = 1, on_cell=None) -> list[Cell]:
    """Every cell of ``spec``, in ``workers`` processes; ``on_cell(cell)`` after each."""
    if workers < 1:
        raise ValueError(f"run_bench: workers={workers!r}; expected >= 1")
    jobs = [(spec, c) for c in spec.cells()]
    out: list[Cell] = []
    if workers == 1:
        for j in jobs:
            out.append(run_cell(*j))
            if on_cell:
                on_cell(out[-1])
        return out
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_quiet_worker,
                             initargs=(os.getpid(),)) as pool:
        for cell in pool.map(_run_cell_args, jobs, chunksize=1):
            out.append(cell)
            if on_cell:
                on_cell(cell)
    return out


def _stat(values: list[float]) -> str:
    v = np.asarray(values, np.float64)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def table(spec: BenchSpec, cells: list[Cell], field: str = "test_acc") -> str:
    """Markdown: one block per (task, profile), methods as rows, partitions as columns, the best in bold."""
    lines = []
    for t in spec.tasks:
        for s in spec.profiles:
            lines += [f"**{t}, {s}** ({field})", "", "| method | " + " | ".join(spec.partitions) + " |",
                      "|---|" + "---|" * len(spec.partitions)]  # fmt: skip
            vals = {(m, p): [getattr(c, field) for c in cells
                             if (c.task, c.profile, c.method, c.partition) == (t, s, m, p)]
                    for m in spec.methods for p in spec.partitions}  # fmt: skip
            means = {key: float(np.mean(v)) if v else float("nan") for key, v in vals.items()}
            for m in spec.methods:
                row = []
                for p in spec.partitions:
                    text = _stat(vals[(m, p)])
                    # the best of the numbers: max() over a NaN first (a run without client scores: worst10 NaN)
                    # was NaN, and no method of the column was bold
                    best = max((means[(mm, p)] for mm in spec.methods if not np.isnan(means[(mm, p)])),
                               default=float("nan"))  # fmt: skip
                    row.append(f"**{text}**" if means[(m, p)] == best else text)
                lines.append(f"| {m} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(spec: BenchSpec, cells: list[Cell], path: str | Path) -> Path:
    """Accuracy (solid) and worst-10% client accuracy (dashed) against the partition, one panel per task
    and profile, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tilestack.federated.plots import _save

    panels = [(t, s) for t in spec.tasks for s in spec.profiles]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    x = np.arange(len(spec.partitions))
    for ax, (t, s) in zip(axes[0], panels, strict=True):
        for i, m in enumerate(spec.methods):
            sel = [[c for c in cells if (c.task, c.profile, c.method, c.partition) == (t, s, m, p)]
                   for p in spec.partitions]  # fmt: skip
            acc = [np.mean([c.test_acc for c in cs]) for cs in sel]
            worst = [np.mean([c.worst10 for c in cs]) for cs in sel]
            ax.plot(x, acc, "-o", color=f"C{i}", label=m, markersize=3)
            ax.plot(x, worst, "--", color=f"C{i}", linewidth=0.9)
        ax.set_xticks(x, spec.partitions, fontsize=8)
        ax.set_title(f"{t}, {s}", fontsize=10)
        ax.set_ylabel("test accuracy (dashed: worst 10% of clients)", fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def write_report(spec: BenchSpec, cells: list[Cell], doc: str | Path, img_dir: str | Path, *,
                 seconds: float = 0.0) -> Path:  # fmt: skip
    """Write the plot to ``img_dir`` and the tables between the bench markers of ``doc`` (appended if absent)."""
    doc, img_dir = Path(doc), Path(img_dir)
    png = plot(spec, cells, img_dir / "fl_bench.png")
    rel = os.path.relpath(png, doc.parent)
    section = "\n".join([
        START_MARK,
        f"`tilestack fl bench`: {len(cells)} runs ({len(spec.tasks)} tasks x {len(spec.partitions)} partitions x "
        f"{len(spec.profiles)} system profiles x {len(spec.methods)} methods x {len(spec.seeds)} seeds), "
        f"{spec.clients} clients, {spec.per_round} per round, {spec.rounds} rounds of {spec.local_steps} local "
        f"steps; {seconds:.0f} s on {os.cpu_count()} cores. Final global test accuracy, mean ± std over seeds "
        "(best per column in bold), then the worst 10% of clients' mean accuracy.",
        "",
        f"![fl bench]({rel})",
        "",
        table(spec, cells, "test_acc"),
        table(spec, cells, "worst10"),
        END_MARK,
    ])  # fmt: skip
    text = doc.read_text() if doc.exists() else ""
    if START_MARK in text and END_MARK in text:
        head, rest = text.split(START_MARK, 1)
        text = head + section + rest.split(END_MARK, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Benchmark (`tilestack fl bench`)\n\n" + section + "\n"
    write_atomic(doc, text)
    return doc
