"""System heterogeneity: per-client compute speed and bandwidth, stragglers, dropouts and a round deadline.

    from tilestack.federated.system import SystemModel
    system = SystemModel(num_clients=1000, speed_sigma=1.0, deadline=30.0, dropout=0.05, seed=0)
    system = SystemModel.from_trace("devices.csv")       # columns: client,speed,bandwidth
    plan = system.plan(server_round=3, pid=17, full_steps=400, bytes_down=2440)
    plan.work, plan.reason                                # share of full local work; why it was cut or dropped
    system.duration(17, steps=plan.steps, bytes_down=2440, bytes_up=2440)   # simulated seconds

Speeds are in local SGD steps per second and bandwidths in bytes per second, drawn per client from
lognormal distributions (median ``speed`` / ``bandwidth``, log-std ``*_sigma``) or read from a trace.
Each round a client either drops out (``dropout`` probability), or is given the share of its full local
work it can finish before the ``deadline`` (partial work, counted honestly in steps), or, in the FedProx
paper's setting, ``straggler_fraction`` of the selected clients do a random k/E of their work, k in 1..E-1.
All draws are seeded by (seed, round, client), so a resumed run sees the same system.

Availability: ``availability`` (P, num_clients) holds each client's chance of being online in each round of a
pattern of P rounds that repeats (row (round - 1) % P: a diurnal cycle, clients joining from round k and leaving
after round l with 0s and 1s). A client offline in a round is not among the nodes the strategy samples from, as
a SuperNode that is not connected is not (``ManagedGrid.get_node_ids``); a round whose strategy needs more nodes
than are online (Flower's ``min_available_nodes``, ``min_train_nodes``) is skipped saying so, where Flower's
sampling would wait for them forever.

    system = SystemModel(6, availability=[[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1]])   # odd and even rounds
    system.online(server_round=2)                          # (6,) bool: clients 0, 1, 4, 5
"""

from __future__ import annotations

import csv
import dataclasses
import math
import numbers
from pathlib import Path

import numpy as np

MAX_CLIENTS = 1 << 24   # the simulation holds arrays (speeds, bandwidths) of one entry per client
# the least rate (steps/s, bytes/s) whose time per unit is a finite float: a subnormal speed (1e-310) passed as "> 0",
# and every duration was inf (an Oort selector's sampling odds NaN: "Probabilities contain NaN" in round 1)
MIN_RATE = 1.0 / np.finfo(np.float64).max


def _usable(rates: np.ndarray) -> np.ndarray:
    """Which of ``rates`` are finite numbers of at least ``MIN_RATE``."""
    return np.isfinite(rates) & (rates >= MIN_RATE)


@dataclasses.dataclass(frozen=True)
class ClientPlan:
    """One client's assignment for one round."""

    pid: int
    work: float
    """Share of the client's full local work it will do, in [0, 1]; 0 with ``reason`` set: not asked."""
    steps: int
    reason: str = ""
    """Why the client does less than full work or none: 'dropout', 'straggler', 'deadline', 'timeout'."""


@dataclasses.dataclass
class SystemModel:
    """Heterogeneous clients: speeds, bandwidths, dropouts, stragglers and a deadline (see module doc)."""

    num_clients: int
    speed: float = 100.0
    speed_sigma: float = 0.0
    bandwidth: float = 1e6
    bandwidth_sigma: float = 0.0
    dropout: float = 0.0
    straggler_fraction: float = 0.0
    straggler_epochs: int = 20
    deadline: float | None = None
    seed: int = 0
    speeds: np.ndarray | None = None
    bandwidths: np.ndarray | None = None
    availability: np.ndarray | None = None
    """(P, num_clients): each client's chance of being online in round r, row (r - 1) % P; None: always online."""

    def __post_init__(self) -> None:
        def number(v) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        checks = {  # name: (ok, expected)
            # (1 << 70 failed inside numpy: "Maximum allowed dimension exceeded")
            "num_clients": (integer(self.num_clients) and 1 <= self.num_clients <= MAX_CLIENTS,
                            f"an integer in [1, {MAX_CLIENTS}]"),
            "speed": (number(self.speed) and self.speed > 0, "a number > 0 (steps per second)"),
            "bandwidth": (number(self.bandwidth) and self.bandwidth > 0, "a number > 0 (bytes per second)"),
            "speed_sigma": (number(self.speed_sigma) and self.speed_sigma >= 0, "a number >= 0"),
            "bandwidth_sigma": (number(self.bandwidth_sigma) and self.bandwidth_sigma >= 0, "a number >= 0"),
            "dropout": (number(self.dropout) and 0.0 <= self.dropout < 1.0, "a probability in [0, 1)"),
            "straggler_fraction": (
                number(self.straggler_fraction) and 0.0 <= self.straggler_fraction <= 1.0,
                "a share in [0, 1]",
            ),
            "straggler_epochs": (integer(self.straggler_epochs) and self.straggler_epochs >= 2, "an integer >= 2"),
            "deadline": (
                self.deadline is None or (number(self.deadline) and self.deadline > 0),
                "None or a number of seconds > 0",
            ),
            "seed": (integer(self.seed) and self.seed >= 0, "an integer >= 0"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"SystemModel: {name}={getattr(self, name)!r}; expected {expected}")
        rng = np.random.default_rng([self.seed, 19])
        drawn = {}   # the arrays drawn here, by the arguments they were drawn from
        if self.speeds is None:
            self.speeds = self.speed * rng.lognormal(0.0, self.speed_sigma, self.num_clients)
            drawn["speeds"] = ("speed", "speed_sigma")
        if self.bandwidths is None:
            self.bandwidths = self.bandwidth * rng.lognormal(0.0, self.bandwidth_sigma, self.num_clients)
            drawn["bandwidths"] = ("bandwidth", "bandwidth_sigma")
        for name in ("speeds", "bandwidths"):
            arr = np.asarray(getattr(self, name), np.float64)
            if name in drawn and not np.all(_usable(arr)):
                # (speed_sigma=1e3 or speed=1e308 drew inf or 0 speeds: the error named "speeds", never given)
                mean, sigma = drawn[name]
                raise ValueError(
                    f"SystemModel: {mean}={getattr(self, mean)!r} with {sigma}={getattr(self, sigma)!r} draws "
                    f"{name} that are not finite numbers > 0; expected a smaller {sigma} (a lognormal's sigma, "
                    "about 0-3)"
                )
            if arr.shape == (self.num_clients,) and not np.all(_usable(arr)):
                # (a negative speed was reported as "speeds has shape (4,); expected (4,) ...": the shape it had)
                i = int(np.flatnonzero(~_usable(arr))[0])
                raise ValueError(f"SystemModel: {name}[{i}]={float(arr[i])!r} (client {i}); expected "
                                 f"({self.num_clients},) finite numbers > 0 (at least {MIN_RATE:.3g}, whose time "
                                 "per unit is finite)")  # fmt: skip
            if arr.shape != (self.num_clients,):
                raise ValueError(
                    f"SystemModel: {name} has shape {arr.shape}; expected ({self.num_clients},) finite numbers > 0"
                )
            setattr(self, name, arr)
        if self.availability is not None:
            self._check_availability()

    def _check_availability(self) -> None:
        try:
            arr = np.array(self.availability, np.float64)
        except (TypeError, ValueError) as ex:
            raise ValueError(
                f"SystemModel: availability is not an array of numbers ({ex}); expected (rounds of the pattern, "
                f"num_clients={self.num_clients}) chances in [0, 1]"
            ) from None
        if arr.ndim == 1 and arr.shape == (self.num_clients,):
            arr = arr[None, :]  # one row: the same every round
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != self.num_clients:
            raise ValueError(
                f"SystemModel: availability has shape {arr.shape}; expected (rounds of the pattern >= 1, "
                f"num_clients={self.num_clients}), row (round - 1) % rounds used in each round"
            )
        bad = np.argwhere(~((arr >= 0) & (arr <= 1)))  # NaN too
        if bad.size:
            row, pid = (int(i) for i in bad[0])
            raise ValueError(
                f"SystemModel: availability holds {float(arr[row, pid])!r} (row {row}, client {pid}); expected each "
                "client's chance of being online in [0, 1]"
            )
        if not arr.any():  # (every round was skipped as short of nodes, the run trained nothing and said so per round)
            raise ValueError(
                f"SystemModel: availability is 0 for every client in every round of its {arr.shape[0]}-round pattern; "
                "expected some client with a chance > 0 of being online (no round could train)"
            )
        self.availability = arr

    def online(self, server_round: int) -> np.ndarray:
        """(num_clients,) bool: which clients are online in ``server_round`` (every one without ``availability``;
        a chance strictly between 0 and 1 is drawn, seeded by (seed, round, client))."""
        if self.availability is None or server_round < 1:
            return np.ones(self.num_clients, bool)
        cached = self.__dict__.get("_online")  # (round, mask): the grid asks several times a round
        if cached is not None and cached[0] == server_round:
            return cached[1].copy()
        chance = self.availability[(server_round - 1) % len(self.availability)]  # (num_clients,)
        mask = chance >= 1.0
        for pid in np.flatnonzero((chance > 0.0) & (chance < 1.0)):  # a draw only where it is a chance
            mask[pid] = np.random.default_rng([self.seed, server_round, int(pid), 31]).random() < chance[pid]
        self.__dict__["_online"] = (server_round, mask)
        return mask.copy()

    @classmethod
    def from_trace(cls, path: str | Path, **kwargs) -> SystemModel:
        """Speeds and bandwidths from a CSV trace with columns ``client,speed,bandwidth`` (one row per client, in any
        order; other columns are ignored). Column names are read without case or surrounding spaces, and values
        without the spaces a hand-written ``client, speed, bandwidth`` puts after each comma."""
        try:
            # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") made the first column '\ufeffclient', "missing"
            with Path(path).open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, skipinitialspace=True)
                header = [name.strip().lower() for name in reader.fieldnames or []]
                rows = [dict(zip(header, row.values(), strict=False)) for row in reader]
        except (OSError, UnicodeDecodeError) as ex:
            raise ValueError(
                f"SystemModel.from_trace: path={str(path)!r} cannot be read ({ex}); expected a CSV file with "
                "columns client,speed,bandwidth"
            ) from ex
        missing = {"client", "speed", "bandwidth"} - set(header)
        if missing:
            raise ValueError(f"SystemModel.from_trace: path={str(path)!r} lacks columns {sorted(missing)}; expected a "
                             "header naming the columns client,speed,bandwidth")  # fmt: skip
        if not rows:
            raise ValueError(f"SystemModel.from_trace: path={str(path)!r} has no rows; expected one per client")
        try:
            rows.sort(key=lambda r: int(r["client"]))
            speeds = np.array([float(r["speed"]) for r in rows])
            bandwidths = np.array([float(r["bandwidth"]) for r in rows])
        except (TypeError, ValueError) as ex:
            raise ValueError(
                f"SystemModel.from_trace: path={str(path)!r} has a row that is not numbers ({ex}); expected "
                "an integer client and numeric speed and bandwidth"
            ) from ex
        if [int(r["client"]) for r in rows] != list(range(len(rows))):
            raise ValueError(
                f"SystemModel.from_trace: path={str(path)!r} lists clients {[r['client'] for r in rows][:5]}...; "
                f"expected each of 0..{len(rows) - 1} once"
            )
        for column, values in (("speed", speeds), ("bandwidth", bandwidths)):
            bad = np.flatnonzero(~_usable(values))
            if len(bad):  # (named "SystemModel: speeds has shape (4,)" before, neither the file nor the row)
                raise ValueError(f"SystemModel.from_trace: path={str(path)!r} gives client {int(bad[0])} "
                                 f"{column}={float(values[bad[0]])!r}; expected finite numbers > 0 (at least "
                                 f"{MIN_RATE:.3g})")  # fmt: skip
        return cls(num_clients=len(rows), speeds=speeds, bandwidths=bandwidths, **kwargs)

    def duration(self, pid: int, *, steps: int, bytes_down: int, bytes_up: int) -> float:
        """Simulated seconds for client ``pid``: download, ``steps`` local steps, upload."""
        assert self.speeds is not None and self.bandwidths is not None
        return (bytes_down + bytes_up) / self.bandwidths[pid] + steps / self.speeds[pid]

    def plan(self, server_round: int, pid: int, full_steps: int, bytes_down: int) -> ClientPlan:
        """How much of its ``full_steps`` client ``pid`` does this round, and why it does less."""
        rng = np.random.default_rng([self.seed, server_round, pid, 23])
        if self.dropout and rng.random() < self.dropout:
            return ClientPlan(pid, 0.0, 0, "dropout")
        work, reason = 1.0, ""
        if self.straggler_fraction and rng.random() < self.straggler_fraction:
            work, reason = rng.integers(1, self.straggler_epochs) / self.straggler_epochs, "straggler"
        if self.deadline is not None:
            assert self.speeds is not None and self.bandwidths is not None
            comm = 2 * bytes_down / self.bandwidths[pid]  # the reply is about as large as the model sent
            affordable = (self.deadline - comm) * self.speeds[pid] / max(1, full_steps)
            if affordable * full_steps < 1:
                return ClientPlan(pid, 0.0, 0, "timeout")
            if affordable < work:
                work, reason = affordable, "deadline"
        steps = max(1, int(np.ceil(work * full_steps)))
        return ClientPlan(pid, work, steps, reason)
