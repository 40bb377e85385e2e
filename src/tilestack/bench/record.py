"""A bench run as one JSON file, so a run from another machine can be compared with one here.

    rec = record_of_run(store, "latest")         # a run of the SQLite result store
    rec.write("out/bench/bench.json")            # `tilestack bench --out DIR` writes DIR/bench.json
    rec = Record.read("docs/results/bench_h100.json")
    rec = load_side("H100", db=None)             # a record file, a run (id, prefix, label, latest~N) or a device

The file holds the device, the versions that change what a time means, and every measurement as
:meth:`tilestack.perf.Measurement.to_row` writes it (the store's own row format).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from pathlib import Path
from typing import Any

from tilestack.errors import TilestackError
from tilestack.files import write_atomic
from tilestack.perf.metrics import Measurement

FORMAT = 1
KIND = "tilestack bench record"
BENCH_COMMAND = "tilestack bench"


class RecordError(TilestackError, ValueError):
    """A record file or store side that cannot be read as a bench run."""


@dataclasses.dataclass
class Record:
    device: str                                 # as the driver names it: "NVIDIA H100 80GB HBM3"
    measurements: list[Measurement]
    versions: dict[str, Any] = dataclasses.field(default_factory=dict)
    device_info: dict[str, Any] | None = None
    started_at: str = ""
    command: str = BENCH_COMMAND
    source: str = ""                            # where it came from: "run <id>", a file and how it was made

    @property
    def label(self) -> str:
        return f"{self.source or 'record'} ({self.device})"

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": KIND, "device": self.device, "device_info": self.device_info,
                "versions": self.versions, "started_at": self.started_at, "command": self.command,
                "source": self.source, "results": [m.to_row() for m in self.measurements]}

    def write(self, path: str | Path) -> Path:
        """Write the record to ``path`` whole or not at all (a temporary file of this writer's own, renamed over
        it): an interrupted write leaves the previous file and no temporary."""
        return write_atomic(path, json.dumps(self.to_json(), indent=1, default=str) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> Record:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RecordError(f"record={str(path)!r} cannot be read as JSON: {e}") from None
        if not isinstance(data, dict) or data.get("kind") != KIND or data.get("format") != FORMAT:
            raise RecordError(f"record={str(path)!r} is not a {KIND} of format {FORMAT} "
                              f"(kind={data.get('kind') if isinstance(data, dict) else None!r})")
        if not isinstance(data.get("results"), list):
            raise RecordError(f"record={str(path)!r}: results is {type(data.get('results')).__name__}; expected a "
                              "list of result rows")
        for i, r in enumerate(data["results"]):
            _check_row(path, i, r)
        try:
            ms = [Measurement.from_row(r) for r in data["results"]]
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise RecordError(f"record={str(path)!r}: a result row is malformed ({type(e).__name__}: {e})") from None
        if not isinstance(data.get("device"), str):
            raise RecordError(f"record={str(path)!r}: no device name (device={data.get('device')!r}); expected a "
                              f"file written by `{BENCH_COMMAND} --out`")
        # A hand-edited or foreign record (versions as a list, a source as a number) failed later, inside the
        # comparison, with an AttributeError traceback: every field the comparison reads is checked here.
        for key, kinds in (("versions", dict), ("device_info", dict), ("started_at", str), ("command", str),
                           ("source", str)):
            if data.get(key) is not None and not isinstance(data[key], kinds):
                raise RecordError(f"record={str(path)!r}: {key} is {type(data[key]).__name__} {data[key]!r}; "
                                  f"expected {'an object' if kinds is dict else 'a string'} or null")
        return cls(data["device"], ms, data.get("versions") or {}, data.get("device_info"),
                   data.get("started_at") or "", data.get("command") or BENCH_COMMAND,
                   data.get("source") or str(path))


_ROW_STRINGS = ("name", "device", "dtype")
_ROW_OPTIONAL_STRINGS = ("device_kind", "item_name", "timing_method", "energy_note", "time")
_ROW_COUNTS = ("flops", "bytes_read", "bytes_written")
_ROW_OPTIONAL = ("items", "latency_p10_s", "latency_p90_s", "latency_rel_ci", "measured_peak_flops",
                 "measured_bandwidth", "published_peak_flops", "published_bandwidth", "joules_per_call",
                 "avg_power_w", "idle_power_w")


def _check_row(path: Path, i: int, row: Any) -> None:
    """RecordError naming the file, the row and the field where result row ``i`` holds what no measurement can (a
    latency that is a string, 0, negative or NaN; a config that is no object; a name that is no string): such a
    row was taken, then failed inside the comparison with a bare TypeError or AttributeError, or as "seconds=None"
    naming neither the file nor the row."""
    from tilestack.perf.metrics import is_number

    where = f"record={str(path)!r}: result {i}"
    if not isinstance(row, dict):
        raise RecordError(f"{where} is {type(row).__name__}; expected an object (a row as Measurement.to_row "
                          "writes it)")
    name = row.get("name")
    where += f" ({name!r})" if isinstance(name, str) else ""
    for key in _ROW_STRINGS:
        if not isinstance(row.get(key), str):
            raise RecordError(f"{where}: {key}={row.get(key)!r}; expected a string")
    for key in _ROW_OPTIONAL_STRINGS:
        if row.get(key) is not None and not isinstance(row[key], str):
            raise RecordError(f"{where}: {key}={row[key]!r}; expected a string (or null)")
    if row.get("config") is not None and not isinstance(row["config"], dict):
        raise RecordError(f"{where}: config={row['config']!r}; expected an object (or null)")
    lat = row.get("latency_s")
    if not (is_number(lat) and math.isfinite(lat) and lat > 0):
        raise RecordError(f"{where}: latency_s={lat!r}; expected a positive, finite time in seconds")
    for key in _ROW_COUNTS:
        v = row.get(key)
        if not (is_number(v) and math.isfinite(v) and v >= 0):
            raise RecordError(f"{where}: {key}={v!r}; expected a finite count >= 0")
    for key in _ROW_OPTIONAL:
        v = row.get(key)
        if v is not None and not (is_number(v) and (math.isfinite(v) or math.isnan(v)) and not v < 0):
            raise RecordError(f"{where}: {key}={v!r}; expected a finite number >= 0 or null")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def open_store(db: str | Path | None = None):
    """The result store (``tilestack.perf.Store``) at ``db`` (default its own); a store that cannot be opened (a
    file that is not a SQLite database, a read-only folder) is a RecordError that names it and says what to do."""
    import sqlite3

    from tilestack.perf.store import Store, StoreError, default_path

    try:
        return Store(db)
    except (sqlite3.DatabaseError, StoreError) as e:     # Store names a file that is not a database itself
        raise RecordError(f"result store {str(db or default_path())!r} cannot be opened ({type(e).__name__}: {e}): "
                          "a file that is not a SQLite database (garbage, a truncated copy) is to be moved aside (a "
                          "new store is started there); a read-only folder wants another --db or TILESTACK_CACHE_DIR"
                          ) from None


def record_of_run(store, ref: str) -> Record:
    """The run ``ref`` of ``store`` (a :class:`tilestack.perf.Store`) as a record."""
    run = store.run(ref)
    return Record(run.device, store.measurements(run.id), run.versions or {}, run.device_info, run.started_at,
                  run.command or "", f"run {run.id}")


def latest_bench_run_on(store, device: str) -> str:
    """The id of the newest ``tilestack bench`` run on the device whose name contains ``device``."""
    runs = [r for r in store.runs() if r.command == BENCH_COMMAND and device.lower() in r.device.lower()]
    if not runs:
        known = sorted({r.device for r in store.runs() if r.command == BENCH_COMMAND})
        raise RecordError(f"device={device!r} matches no device with a `tilestack bench` run in {store.path} "
                          f"(devices with one: {', '.join(known) or 'none'})")
    names = sorted({r.device for r in runs})
    if len(names) > 1 and device not in names:
        raise RecordError(f"device={device!r} matches {len(names)} devices ({', '.join(names)}); expected one")
    return runs[0].id


def load_side(ref: str, db: str | Path | None = None, *, latest_bench: bool = True) -> Record:
    """One side of a comparison: a record file (``*.json``), else a run of the result store (id, unique prefix,
    label, ``latest``, ``latest~N``: with ``latest_bench``, counted among bench runs only), else the newest bench
    run on a device whose name contains ``ref``."""
    if not isinstance(ref, str) or not ref.strip():   # ('' is part of every device name: it named the newest run)
        raise RecordError(f"side={ref!r}; expected a record file (*.json), a run (id, prefix, label, latest, "
                          "latest~N) or a device name")
    if ref.endswith(".json"):
        try:
            is_dir, is_file = Path(ref).is_dir(), Path(ref).is_file()
        except OSError as e:     # (a folder on its way this user cannot enter, a name too long: a bare traceback)
            raise RecordError(f"record={ref!r} cannot be looked up ({e.strerror or e}); expected a record file "
                              "(*.json) this user can read") from None
        if is_dir:   # (it was "no such file", for a folder that is there)
            raise RecordError(f"record={ref!r} is a folder; expected a record file (*.json) that `tilestack bench "
                              "--out` wrote")
        if not is_file:
            raise RecordError(f"record={ref!r}: no such file")
        return Record.read(ref)
    from tilestack.perf.store import StoreError

    with open_store(db) as st:
        if latest_bench and (ref == "latest" or ref.startswith("latest~")):
            back = ref.partition("~")[2] or "0"
            runs = [r for r in st.runs() if r.command == BENCH_COMMAND]
            if not back.isdigit() or int(back) >= len(runs):
                raise RecordError(f"run={ref!r}; expected latest or latest~N with N below the {len(runs)} "
                                  f"`tilestack bench` runs in {st.path}")
            return record_of_run(st, runs[int(back)].id)
        try:
            return record_of_run(st, ref)
        except StoreError as run_error:
            try:
                return record_of_run(st, latest_bench_run_on(st, ref))
            except RecordError as device_error:
                raise RecordError(f"{ref!r} is no record file (*.json); as a run: {run_error}; as a device: "
                                  f"{device_error}") from None


# ---- bench.md, as `tilestack bench` wrote it before it wrote bench.json -------------------------------------------
_PREFIX = {"P": 1e15, "T": 1e12, "G": 1e9, "M": 1e6, "k": 1e3, "": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_PERCENT = 100.0


def _number(text: str, unit: str) -> float | None:
    """``_number("2.11 TB/s", "B/s") == 2.11e12``; "-" is None."""
    text = text.strip()
    if text in ("-", ""):
        return None
    value, _, rest = text.partition(" ")
    if not rest.endswith(unit):
        raise RecordError(f"{text!r}: expected a number with unit {unit!r}")
    prefix = rest[: -len(unit)].strip() if unit else rest.strip()
    if prefix not in _PREFIX:
        raise RecordError(f"{text!r}: unknown prefix {prefix!r}")
    return float(value) * _PREFIX[prefix]


def _config(text: str) -> dict[str, Any]:
    """``"shape=4096x4096x4096 bf16, BM=128, ONE_TILE=True"`` -> ``{"shape": "...", "BM": 128, "ONE_TILE": True}``."""
    out: dict[str, Any] = {}
    for part in text.split(", "):
        key, _, value = part.partition("=")
        out[key] = (int(value) if value.lstrip("-").isdigit() else
                    {"True": True, "False": False}.get(value, value)) if key != "shape" else value
    return out


def _roof(rate: float, pct_text: str, which: int) -> float | None:
    """The roof a rate was reported against: rate / its share in a "measured % / published %" column."""
    parts = pct_text.split("/")
    share = parts[which].strip().rstrip("%") if which < len(parts) else "-"
    return rate / (float(share) / _PERCENT) if share not in ("-", "") and float(share) > 0 else None


def from_bench_markdown(text: str, *, device: str, versions: dict[str, Any], started_at: str,
                        source: str) -> Record:
    """A record from the bench.md table of an older run (the table of :func:`tilestack.perf.report.
    measurements_markdown`). What the table keeps is what comes back: three significant digits; FLOPs and bytes
    from the rates times the latency, all bytes counted as read (the table does not split them); the roofs from the
    rates and their utilisation columns; energy per call and power."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    if len(lines) < 3:
        raise RecordError(f"{source}: no markdown table")
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    ms = []
    for line in lines[2:]:
        row = dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True))
        lat = _number(row["latency"], "s")
        flops_s, bytes_s = _number(row["FLOP/s"], "FLOP/s") or 0.0, _number(row["bytes/s"], "B/s") or 0.0
        items_s = row["items/s"].split(" ")
        item_name = items_s[-1].removesuffix("/s") if len(items_s) > 2 else "items"
        items = _number(" ".join(items_s[:2]) + " ", "") if len(items_s) > 2 else None
        ms.append(Measurement(
            name=row["kernel"], config=_config(row["config"]), device=device, dtype=row["dtype"], latency_s=lat,
            flops=flops_s * lat, bytes_read=bytes_s * lat, bytes_written=0.0,
            items=items * lat if items is not None else None, item_name=item_name, timing_method="from bench.md",
            device_kind="cuda" if not device.lower().startswith("cpu") else "cpu",
            measured_peak_flops=_roof(flops_s, row["compute % meas/pub"], 0),
            measured_bandwidth=_roof(bytes_s, row["memory % meas/pub"], 0),
            published_peak_flops=_roof(flops_s, row["compute % meas/pub"], 1),
            published_bandwidth=_roof(bytes_s, row["memory % meas/pub"], 1),
            joules_per_call=_number(row["J/op"], "J"), avg_power_w=_number(row["power"], "W"), time=started_at))
    return Record(device, ms, versions, None, started_at, BENCH_COMMAND, source)


def bench_sides(a: str, b: str, db: str | Path | None = None) -> tuple[Record, Record] | None:
    """Both sides as records when each is a bench record file or names a ``tilestack bench`` run (or a device with
    one); None otherwise, so that ``tilestack compare`` treats other runs (profiles) its own way."""
    sides = []
    for ref in (a, b):
        try:
            rec = load_side(ref, db, latest_bench=False)     # "latest" means what it means to the store
        except RecordError:
            return None
        if rec.command != BENCH_COMMAND:
            return None
        sides.append(rec)
    return sides[0], sides[1]
