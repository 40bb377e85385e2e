"""``tilestack fl run``: a federated run with a progress bar and a report at the end.

    tilestack fl run --strategy fedprox --mu 1 --clients 30 --per-round 10 --rounds 50 --stragglers 0.5
    tilestack fl run --dataset blobs --partitioner dirichlet --partition-alpha 0.3 --strategy scaffold
    tilestack fl run --engine flower --clients 100 --per-round 10 --rounds 5 --out run.json --plot run.png
    tilestack fl run --malicious 0.2 --strategy fedmedian         # poisoned clients vs a robust rule
    tilestack fl run --checkpoint run.ckpt ...                     # resumes after the last completed round
    tilestack fl run --data mine.csv --partitioner dirichlet       # your own data (.csv, label last; or .npz x, y)
    tilestack fl run --faults 1:crash,2:nan --timeout 30 --workers 2

flwr and ray are imported inside the command, so ``tilestack --help`` works without them.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import typer

from tilestack.cli import app

fl = typer.Typer(help="Heterogeneous federated learning on Flower.", no_args_is_help=True)
app.add_typer(fl, name="fl")

SELECTIONS = ("flower", "random", "oort")
# Ray's workers print to this terminal unless told not to; their news is in the report's reasons.
FLOWER_BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                  "init_args": {"log_to_driver": False, "logging_level": "error"}}  # fmt: skip


@fl.command("run")
def run(
    strategy: str = typer.Option(
        "fedavg",
        help="fedavg, fedprox, fedadam, fedyogi, fedmedian, trimmedmean, krum, "
        "multikrum, bulyan, dp-fedavg, scaffold, fednova, fedbn, ifca, qfedavg, cfl",
    ),  # fmt: skip
    rounds: int = typer.Option(20, min=1),
    clients: int = typer.Option(30, min=1, help="number of clients (partitions)"),
    per_round: int = typer.Option(10, min=1, help="clients sampled per round"),
    engine: str = typer.Option("tilestack", help="tilestack (in-process) or flower (Flower's Ray simulation)"),
    dataset: str = typer.Option("synthetic", help="synthetic, blobs, clustered, digits (or file, see --data)"),
    data: Path = typer.Option(None, help="your own dataset: .npz with x (N, D) and y (N,), or .csv with the label "
                              "last; split by --partitioner"),
    alpha: float = typer.Option(1.0, help="Synthetic(alpha, beta): model heterogeneity"),
    beta: float = typer.Option(1.0, help="Synthetic(alpha, beta): data heterogeneity"),
    partitioner: str = typer.Option("iid", help="blobs: iid, dirichlet, shards, quantity"),
    partition_alpha: float = typer.Option(0.5, help="Dirichlet concentration"),
    model: str = typer.Option("logreg", help="logreg, mlp, or the PyTorch cnn or transformer (digits: 8x8 images)"),
    batch_size: int = typer.Option(10, min=1, help="local minibatch size"),
    q: float = typer.Option(1.0, help="qfedavg: fairness exponent q (0: the plain mean); L = 1 / (lr x local steps)"),
    compress: str = typer.Option("", help="compress client updates: topk:RATIO (with error feedback) or int8"),
    local_epochs: float = typer.Option(20.0, help="local epochs per round"),
    local_steps: int = typer.Option(0, help="fixed local SGD steps per round instead of epochs (0: use epochs)"),
    lr: float = typer.Option(0.01),
    mu: float = typer.Option(0.0, help="FedProx proximal mu"),
    server_lr: float = typer.Option(0.1, help="server learning rate (fedadam, fedyogi)"),
    clusters: int = typer.Option(2, help="IFCA cluster models"),
    stragglers: float = typer.Option(0.0, help="share of selected clients doing partial work"),
    straggler_policy: str = typer.Option(
        "partial", help="partial (keep partial work), drop, or stale (the whole work joins a later round, weighted)"
    ),
    staleness_exponent: float = typer.Option(0.5, help="stale: a late update's weight x (1 + rounds late)^-this"),
    max_staleness: int = typer.Option(4, help="stale: rounds late past which a client is left out"),
    dropout: float = typer.Option(0.0, help="per-round dropout probability"),
    deadline: float = typer.Option(0.0, help="round deadline in simulated seconds (0: none)"),
    speed_sigma: float = typer.Option(0.0, help="log-std of client speeds"),
    trace: Path = typer.Option(None, help="CSV trace client,speed,bandwidth"),
    selection: str = typer.Option("flower", help="flower (the strategy's own sampling), random or oort"),
    malicious: float = typer.Option(0.0, help="share of clients sending poisoned updates"),
    attack: str = typer.Option("signflip", help="signflip or noise"),
    noise: float = typer.Option(1.0, help="dp-fedavg noise multiplier"),
    clip: float = typer.Option(1.0, help="dp-fedavg clipping norm"),
    eval_fraction: float = typer.Option(0.0, help="share of clients in federated evaluation (0: the server scores "
                                        "each client's test split for the client accuracy distribution)"),
    faults: str = typer.Option("", help="faulty clients, e.g. 1:crash,2:nan (crash, nan, shape, slow, missing, "
                               "extra, nometrics)"),
    timeout: float = typer.Option(0.0, min=0.0, help="seconds to wait for a round's replies (0: no limit)"),
    workers: int = typer.Option(1, min=1, help="worker processes of the tilestack engine"),
    seed: int = typer.Option(0),
    checkpoint: Path = typer.Option(None, help="checkpoint file; an existing one is resumed"),
    out: Path = typer.Option(None, help="write the per-round history as JSON"),
    plot: Path = typer.Option(None, help="write a PNG of loss and accuracy per round"),
) -> None:
    """Run federated training and print a report."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import logging
    import warnings

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from tilestack.errors import FederatedError
    from tilestack.federated import SystemModel, Task, simulate
    from tilestack.federated.grid import STRAGGLER_POLICIES
    from tilestack.federated.metrics import History
    from tilestack.federated.simulation import ENGINES, check_arguments
    from tilestack.federated.strategies import OortSelector, RandomSelector, Selected, make_strategy

    # Flower's own notices (its deprecations, a faulty client's raw Ray traceback) would break the progress
    # bar; every client left out is reported below with a one-line reason.
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    if selection not in SELECTIONS:
        raise typer.BadParameter(f"selection={selection!r}; expected one of {SELECTIONS}", param_hint="--selection")
    if engine not in ENGINES:
        raise typer.BadParameter(f"engine={engine!r}; expected one of {ENGINES}", param_hint="--engine")
    if straggler_policy not in STRAGGLER_POLICIES:
        raise typer.BadParameter(f"straggler_policy={straggler_policy!r}; expected one of {STRAGGLER_POLICIES}",
                                 param_hint="--straggler-policy")  # fmt: skip
    from tilestack.cli.args import check_input, check_output, check_share
    from tilestack.federated.strategies import NAMES as STRATEGIES
    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"--strategy {strategy!r}; expected one of {STRATEGIES}", param_hint="--strategy")
    # a strategy's own knob given to another strategy was ignored without a word (--mu 1 with fedavg ran FedAvg);
    # the check is make_strategy's, here before any other work and naming the option
    from tilestack.federated.strategies import misplaced_setting

    options = {"proximal_mu": "--mu", "server_lr": "--server-lr", "q": "--q", "noise_multiplier": "--noise",
               "clipping_norm": "--clip"}  # fmt: skip
    misplaced = misplaced_setting(strategy, dict(proximal_mu=mu, server_lr=server_lr, q=q, noise_multiplier=noise,
                                                 clipping_norm=clip))  # fmt: skip
    if misplaced is not None:
        arg, value, users = misplaced
        opt = options[arg]
        raise typer.BadParameter(f"{opt} {value:g} is a setting of --strategy {' or '.join(users)}; got --strategy "
                                 f"{strategy}, which does not use it", param_hint=opt)
    check_share("--stragglers", stragglers)
    check_share("--dropout", dropout, one=False)
    check_share("--malicious", malicious, one=False)
    check_share("--eval-fraction", eval_fraction)
    check_input("--data", data)
    check_input("--trace", trace)
    check_output("--out", out)
    check_output("--plot", plot)
    # two outputs on one file: --out over --checkpoint left a JSON where the resume looked for its checkpoint, and
    # --plot over --out a PNG where the history was
    files = [(opt, p) for opt, p in (("--out", out), ("--plot", plot), ("--checkpoint", checkpoint)) if p is not None]
    for i, (opt_a, a) in enumerate(files):
        for opt_b, b in files[i + 1 :]:
            if a.resolve() == b.resolve():
                raise typer.BadParameter(f"{opt_b} {b} is also {opt_a}: each would overwrite the other; expected "
                                         "different files", param_hint=opt_b)  # fmt: skip
    check_output("--checkpoint", checkpoint)
    if per_round > clients:
        raise typer.BadParameter(f"per_round={per_round} > clients={clients}; expected at most --clients {clients} "
                                 "clients sampled per round", param_hint="--per-round")  # fmt: skip
    if data is not None:
        if dataset not in ("synthetic", "file"):  # (--dataset digits --data mine.csv trained on the file, without a
            # word about digits; synthetic is the option's default, which --data replaces)
            raise typer.BadParameter(f"--dataset {dataset} with --data {data}: the file is the dataset; expected "
                                     "--data alone (or --dataset file)", param_hint="--dataset")  # fmt: skip
        dataset = "file"
    if plot is not None:
        _check_plot_format(plot)
    # FedBN keeps the MLP's batch-norm layers on each client, and no option built the MLP with them: every
    # `--strategy fedbn` run was refused for a model without 'bn.' arrays, naming norm=True, which no option sets
    if strategy == "fedbn" and model != "mlp":
        raise typer.BadParameter(f"--strategy fedbn keeps the MLP's batch-norm layers on each client; got --model "
                                 f"{model}, expected --model mlp", param_hint="--model")  # fmt: skip
    # --clusters is also the clustered dataset's planted groups: `--dataset clustered --clients 1` (--clusters left at
    # its default 2) was refused as "Task: groups=2", an argument no option is called
    if dataset == "clustered" and not 1 <= clusters <= clients:
        raise typer.BadParameter(f"--clusters {clusters} plants that many groups of --dataset clustered among "
                                 f"--clients {clients}; expected 1 to {clients}", param_hint="--clusters")  # fmt: skip
    if malicious > 0 and round(malicious * clients) == 0:  # (Task's words name malicious_fraction, no option)
        raise typer.BadParameter(f"--malicious {malicious:g} of --clients {clients} rounds to no malicious client; "
                                 f"expected 0, or more than {0.5 / clients:.3g} (one client)", param_hint="--malicious")
    try:
        fault_list = _parse_faults(faults)
    except ValueError as ex:
        raise typer.BadParameter(str(ex), param_hint="--faults") from ex
    try:
        task = Task(
            dataset=dataset, num_clients=clients, data_path=str(data or ""), faults=fault_list,
            seed=seed, alpha=alpha, beta=beta, partitioner=partitioner,
            partition_alpha=partition_alpha, model=model, lr=lr, local_epochs=local_epochs,
            local_steps=local_steps or None, malicious_fraction=malicious, attack=attack, groups=clusters,
            batch_size=batch_size, norm=strategy == "fedbn",
        )  # fmt: skip
        if trace is not None:
            # the trace gives the speeds: a --speed-sigma beside it was ignored without a word
            if speed_sigma != 0.0:
                raise typer.BadParameter(f"--speed-sigma {speed_sigma:g} draws the clients' speeds, which --trace "
                                         f"{trace} gives; expected one of the two", param_hint="--speed-sigma")
            try:  # (a row that is no numbers, a speed <= 0: named "SystemModel.from_trace: path=..." or "speeds")
                system = SystemModel.from_trace(trace, dropout=dropout, straggler_fraction=stragglers,
                                                deadline=deadline or None, seed=seed)  # fmt: skip
            except ValueError as ex:
                raise typer.BadParameter(str(ex), param_hint=_option_for(str(ex), default="--trace")) from ex
            if system.num_clients != clients:  # (named "simulate: system.num_clients=3" before, no option)
                raise typer.BadParameter(f"--trace {trace} lists {system.num_clients} clients; expected one row per "
                                         f"client of --clients {clients}", param_hint="--trace")  # fmt: skip
        else:
            system = SystemModel(clients, speed_sigma=speed_sigma, dropout=dropout, straggler_fraction=stragglers,
                                 deadline=deadline or None, seed=seed)  # fmt: skip
        accountant = None
        if strategy == "dp-fedavg":
            from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
            from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

            accountant = RdpAccountant(PrivacyConfig(1.0 / clients, clients, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                     SamplingMethod.NO_AMPLIFICATION))  # fmt: skip
        # With a selector, the strategy sees only the selected nodes and takes them all.
        population = clients if selection == "flower" else per_round
        strat = make_strategy(strategy, clients_per_round=per_round, num_clients=population,
                              eval_fraction=eval_fraction,
                              proximal_mu=mu, server_lr=server_lr, num_malicious=int(malicious * per_round),
                              num_clusters=clusters, noise_multiplier=noise, clipping_norm=clip,
                              accountant=accountant, q=q,
                              client_lr=lr * (local_steps or task.steps_for(0)))  # fmt: skip
        if compress:
            from tilestack.federated.compression import Compressed, parse

            try:
                method, ratio = parse(compress)
            except ValueError as ex:
                raise typer.BadParameter(str(ex), param_hint="--compress") from ex
            strat = Compressed(strat, method, ratio)
        if selection == "random":
            strat = Selected(strat, RandomSelector(seed), per_round)
        elif selection == "oort":
            steps = [task.steps_for(p) for p in range(clients)]
            strat = Selected(strat, OortSelector(system, full_steps=steps, seed=seed), per_round)
        # everything simulate checks, before the progress bar and any round
        check_arguments(strat, task, rounds=rounds, engine=engine, system=system, stragglers=straggler_policy,
                        seed=seed, timeout=timeout or None, workers=workers, checkpoint=checkpoint,
                        staleness_exponent=staleness_exponent, max_staleness=max_staleness)  # fmt: skip
        # a strategy's or a mode's own option that this run does not read, given a value of its own, was ignored
        # without a word (--clusters 5 with --strategy fedavg, as --mu 1 was; --local-epochs 3 beside --local-steps
        # 2); judged after the values themselves
        unread = _unread_option(strategy=strategy, dataset=dataset, local_steps=local_steps,
                                given={"--clusters": clusters, "--local-epochs": local_epochs})  # fmt: skip
        if unread is not None:
            opt, message = unread
            raise typer.BadParameter(message, param_hint=opt)
    except ValueError as ex:  # FederatedError too: a bad strategy setting or checkpoint path
        # the library names its own argument (Task: lr=0.0, make_strategy: num_clusters=0); the option is named beside
        raise typer.BadParameter(str(ex), param_hint=_option_for(str(ex))) from ex
    initial = strat.initial_arrays(task) if hasattr(strat, "initial_arrays") else None

    def extra(s, arrays, r):
        spent = s.privacy_spent() if hasattr(s, "privacy_spent") else None
        out_ = {"epsilon": spent.epsilon} if spent is not None else {}
        if hasattr(s, "agreement") and dataset == "clustered":
            out_["ari"] = s.agreement(task)
        return out_

    console = Console()
    if engine == "flower":
        console.print("starting Flower's simulation engine (Ray): the first round waits for its workers ...")
    t_start = time.perf_counter()
    with Progress(
        TextColumn("[bold]fl run[/bold]"), BarColumn(), MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]:.3f}  loss {task.fields[loss]:.3f}"), TimeElapsedColumn(),
        console=console, transient=False,
    ) as progress:  # fmt: skip
        bar = progress.add_task("rounds", total=rounds, acc=0.0, loss=float("nan"))

        done: list = []  # the rounds completed so far, the resumed checkpoint's first

        def on_round(m) -> None:
            progress.update(bar, completed=m.round, acc=m.test_acc, loss=m.train_loss)
            if out is None:
                return
            if not done and m.round > 1 and checkpoint is not None:  # resumed: the checkpoint holds rounds 1..m
                from tilestack.federated.run_state import load_checkpoint

                done.extend(History.from_dict(load_checkpoint(checkpoint)["history"]).rounds[:-1])
            done.append(m)
            # after every round, whole or not at all: a run stopped by Ctrl-C, a crash or a kill in round 40 lost the
            # 39 rounds it had done (--out was written only at the end)
            History(list(done)).to_json(out)

        try:
            result = simulate(
                strat, task, rounds=rounds, engine=engine, system=system, stragglers=straggler_policy, seed=seed,
                staleness_exponent=staleness_exponent, max_staleness=max_staleness,
                checkpoint=checkpoint, on_round=on_round, extra_metrics=extra, initial=initial,
                timeout=timeout or None, workers=workers, flower_backend=FLOWER_BACKEND,
            )  # fmt: skip
        except FederatedError as ex:  # a checkpoint of another or a longer run, found once the nodes are known
            raise typer.BadParameter(str(ex), param_hint="--checkpoint") from ex
    wall = time.perf_counter() - t_start

    h = result.history
    if not h.rounds:
        console.print("no rounds to report (the checkpoint already holds every round)")
        return
    last = h.rounds[-1]
    reasons = Counter(v.split(":")[0] for r in h.rounds for v in r.excluded.values())
    examples = {v.split(":")[0]: v for r in h.rounds for v in r.excluded.values()}
    skipped = Counter(r.skipped for r in h.rounds if r.skipped)
    skipped_text = [f"{n} ({why})" for why, n in skipped.items()]
    table = Table(title=f"{strategy} on {dataset}: {clients} clients, {per_round} per round, engine {engine}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("rounds", f"{len(h.rounds)}"),
        ("test accuracy (last round)", f"{last.test_acc:.4f}"),
        ("test loss / train loss", f"{last.test_loss:.4f} / {last.train_loss:.4f}"),
        ("best test accuracy", f"{max(h.column('test_acc')):.4f}"),
        (
            "client accuracy p10 / worst / Jain",
            " / ".join(f"{last.client_acc.get(k, float('nan')):.3f}" for k in ("p10", "worst", "jain")),
        ),  # fmt: skip
        ("bytes down / up (total)", f"{sum(h.column('bytes_down')):,} / {sum(h.column('bytes_up')):,}"),
        ("local steps done / full", f"{sum(h.column('steps_done')):,} / {sum(h.column('steps_full')):,}"),
        ("simulated time (s)", f"{sum(h.column('sim_time')):.2f}"),
        ("wall time: rounds / whole run incl. start-up (s)", f"{sum(h.column('wall_time')):.2f} / {wall:.2f}"),
        ("clients left out", ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "none"),
        *[(f"  e.g. {kind}", why) for kind, why in sorted(examples.items())],
        ("rounds without aggregation", ", ".join(skipped_text) or "none"),
    ]
    rows += [(k, f"{v:.4f}") for k, v in last.extra.items()]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if out is not None:
        h.to_json(out)
        console.print(f"history written to {out}")
    if plot is not None:
        from tilestack.federated.plots import plot_grid

        plot_grid({f"{strategy}": {strategy: h}}, ["train_loss", "test_acc"], plot)
        console.print(f"plot written to {plot}")
    if len(skipped_text) and all(r.skipped for r in h.rounds):
        console.print(f"[red]no round aggregated a model[/red]: {'; '.join(skipped_text)}")
        raise typer.Exit(1)


# the library's argument names -> the option that sets them (Task, make_strategy, SystemModel, simulate)
ARGUMENT_OPTIONS = {
    "num_clients": "--clients", "clients_per_round": "--per-round", "dataset": "--dataset", "data_path": "--data",
    "alpha": "--alpha", "beta": "--beta", "partitioner": "--partitioner", "partition_alpha": "--partition-alpha",
    "model": "--model", "batch_size": "--batch-size", "q": "--q", "local_epochs": "--local-epochs",
    "local_steps": "--local-steps", "lr": "--lr", "client_lr": "--lr", "proximal_mu": "--mu",
    "server_lr": "--server-lr", "num_clusters": "--clusters", "groups": "--clusters",
    "straggler_fraction": "--stragglers", "stragglers": "--straggler-policy",
    "staleness_exponent": "--staleness-exponent", "max_staleness": "--max-staleness", "dropout": "--dropout",
    "deadline": "--deadline", "speed_sigma": "--speed-sigma", "malicious_fraction": "--malicious",
    "num_malicious": "--malicious", "num_malicious_nodes": "--malicious", "fraction_train": "--per-round",
    "min_train_nodes": "--per-round", "fraction_evaluate": "--eval-fraction", "min_evaluate_nodes": "--eval-fraction",
    "attack": "--attack", "noise_multiplier": "--noise", "clipping_norm": "--clip",
    "eval_fraction": "--eval-fraction", "faults": "--faults", "timeout": "--timeout", "workers": "--workers",
    "seed": "--seed", "checkpoint": "--checkpoint", "rounds": "--rounds",
    "inner": "--compress",  # Compressed(inner=IFCA): the strategy --compress cannot wrap
}  # fmt: skip
DEFAULTS = {"--clusters": 2, "--local-epochs": 20.0}


def _check_plot_format(plot: Path) -> None:
    """``--plot``'s suffix is a format matplotlib writes (none: PNG). ``--plot run.txt`` ran every round and then
    failed in matplotlib's savefig ("Format 'txt' is not supported"), the run's report cut short with a traceback."""
    suffix = plot.suffix.lower().lstrip(".")
    if not suffix:
        return
    from matplotlib.figure import Figure

    formats = sorted(Figure().canvas.get_supported_filetypes())
    if suffix not in formats:
        raise typer.BadParameter(f"--plot {plot}: matplotlib cannot write {plot.suffix!r} files; expected one of "
                                 f"{', '.join('.' + f for f in formats)} (e.g. run.png)", param_hint="--plot")


def _option_for(message: str, default: str | None = None) -> str | None:
    """The option behind the first library argument a refusal names (``Task: lr=0.0; ...`` -> ``--lr``), else
    ``default``."""
    import re

    # ("faults gives partition 1 two faults" named no option: typer said only "Invalid value")
    for name in re.findall(r"\b([a-z_]+)(?:=| entry\b| gives\b)", message):
        if name in ARGUMENT_OPTIONS:
            return ARGUMENT_OPTIONS[name]
    return default


def _unread_option(*, strategy: str, dataset: str, local_steps: int,
                   given: dict[str, object]) -> tuple[str, str] | None:
    """The first option of ``given`` set away from its default that this run does not read, as (option, message)."""
    readers = {
        "--clusters": (strategy == "ifca" or dataset == "clustered", "--strategy ifca or --dataset clustered",
                       f"--strategy {strategy} on --dataset {dataset}"),
        "--local-epochs": (not local_steps, "--local-steps 0", f"--local-steps {local_steps}"),
    }  # fmt: skip
    for opt, value in given.items():
        read, who, got = readers[opt]
        if value != DEFAULTS[opt] and not read:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            return opt, f"{opt} {shown} is read only with {who}; got {got}, which does not use it"
    return None


def _parse_faults(text: str) -> tuple[tuple[int, str], ...]:
    """``"1:crash,2:nan"`` -> ((1, "crash"), (2, "nan")); Task checks the ids and kinds."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        pid, sep, kind = item.partition(":")
        if not sep or not pid.strip().isdigit():
            raise ValueError(f"faults entry {item!r}; expected PARTITION:KIND, e.g. 1:crash")
        out.append((int(pid), kind.strip()))
    return tuple(out)


@fl.command("bench")
def bench(
    size: str = typer.Option("default", help="default (minutes on a 2-core CPU) or full (adds the PyTorch CNN)"),
    seeds: int = typer.Option(0, min=0, help="number of seeds (0: the size's own)"),
    rounds: int = typer.Option(0, min=0, help="rounds per run (0: the size's own)"),
    workers: int = typer.Option(0, min=0, help="processes (0: one per core)"),
    doc: Path = typer.Option(Path("docs/federated.md"), help="markdown file that gets the table"),
    img: Path = typer.Option(Path("docs/img"), help="folder for the plot"),
) -> None:
    """Methods by heterogeneity level over fixed tasks, partitions, system profiles and seeds: one table."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import dataclasses
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tilestack.federated.bench import BenchSpec, run_bench, write_report

    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    if size not in ("default", "full"):
        raise typer.BadParameter(f"size={size!r}; expected default or full", param_hint="--size")
    from tilestack.cli.args import check_output
    # before the bench's minutes of runs: a --doc that is a folder or in a read-only one, an --img that is a file,
    # failed only in write_report, with a traceback, the runs lost
    check_output("--doc", doc)
    check_output("--img", img, folder=True, files=("fl_bench.png",))
    spec = BenchSpec.default() if size == "default" else BenchSpec.full()
    if seeds:
        spec = dataclasses.replace(spec, seeds=tuple(range(seeds)))
    if rounds:
        spec = dataclasses.replace(spec, rounds=rounds)
    console = Console()
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]fl bench[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:  # fmt: skip
        bar = progress.add_task("cells", total=len(spec.cells()))
        cells = run_bench(spec, workers=workers or os.cpu_count() or 1, on_cell=lambda c: progress.advance(bar))
    seconds = time.perf_counter() - t0
    write_report(spec, cells, doc, img, seconds=seconds)
    console.print(f"{len(cells)} runs in {seconds:.0f} s; table written to {doc}, plot to {img / 'fl_bench.png'}")
