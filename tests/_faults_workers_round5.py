"""The process that tests/test_faults_round5.py starts: every writer that rounds one to four did not kill, each
through its public entry point, in children of this process forked after the imports (one import for the whole
matrix) and SIGKILLed by their own hand at a chosen point of the write, or racing a sibling for the same file.

    python tests/_faults_workers_round5.py matrix ROOT LIVE_PID [W...]   # every WRITER x POINT, repeated kills, modes
    python tests/_faults_workers_round5.py race ROOT N [W...]            # two children per writer, N writes each

(W...: only those writers; none named, all of them.)

POINT: ``mid-write`` (the temporary holds half its bytes), ``before-rename`` (the temporary is whole),
``after-rename`` (the new file is in place; the process dies before it returns). The kill is aimed at the one
file under test (its temporary's descriptor, its rename), so another file written first by the same entry point
(a report's PNG before its markdown) is written whole. For each case the child leaves, in ``ROOT/refs/<writer>/
<point>/``, ``old`` (the file before, or nothing) and ``new`` (the bytes the killed write was writing); the test
compares the file left against them. The JSON on stdout says how each child ended and which temporaries stayed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import types
import warnings
from pathlib import Path

POINTS = ["mid-write", "before-rename", "after-rename"]
LIVE_TMP = "live"           # (a marker in the report: the temporary named after a live process)


# ---- the writers, each through its public entry point -------------------------------------------------------------
def _ms(i: int) -> list:
    """Two measurements; version ``i`` in their latency (so every report of a version differs)."""
    from tilestack.perf.metrics import compute_metrics
    common = dict(flops=2e9, bytes_read=4e6, bytes_written=1e6, device="cpu-test", device_kind="cpu", dtype="fp32")
    return [compute_metrics(name=f"gemm{k}", latency_s=1e-3 * (i + 1) * (k + 1), config={"v": i}, **common)
            for k in range(2)]


def _cache(root: Path):
    from tilestack import config
    return config.override(cache_dir=root / "cache")


def w_roofline(root: Path, i: int) -> None:
    from tilestack.perf import report
    report.roofline_png(_ms(i), root / "roofline.png", title=f"v{i}")


def w_html(root: Path, i: int) -> None:
    from tilestack.perf import report
    report.html_report(_ms(i), root / "report.html", title=f"v{i}")


def _perf_cli(root: Path, i: int) -> None:
    """``tilestack report v<i> --out ROOT/out --db ROOT/db.sqlite``: a run labelled v<i> stored first."""
    from typer.testing import CliRunner

    from tilestack.cli import _register, app
    from tilestack.perf.store import Store
    _register()
    db = root / "db.sqlite"
    with Store(db) as st:
        if not any(r.label == f"v{i}" for r in st.runs()):
            run = st.start_run(device="cpu-test", label=f"v{i}")
            for m in _ms(i):
                st.append(run, m)
    res = CliRunner().invoke(app, ["report", f"v{i}", "--out", str(root / "out"), "--db", str(db),
                                   "--title", f"v{i}"])
    if res.exit_code != 0:
        raise RuntimeError(f"perf report: {res.output[-2000:]} {res.exception!r}")


def _suite(root: Path, i: int) -> None:
    """``run_suite(out_dir=ROOT/bench)``, its cases' timing left out (run_case gives version i's measurements) and
    its ceilings measured once (``_MEASURED``): what is under test is what it writes (roofline.png, report.html,
    bench.md, bench.json)."""
    from tilestack.bench import runner
    case = types.SimpleNamespace(name="gemm", shape="2x2", baseline_name="torch.mm")

    def run_case(c, dev, ceil, *a, **k):
        ours, base = _ms(i)
        return runner.BenchRow(c, {"vs_float64": 0.0, "vs_reference": 0.0, "tol": 1.0}, ours, base)

    def ceilings_once(dev, *a, **k):
        if "ceilings" not in _MEASURED:
            _MEASURED["ceilings"] = real_ceilings(dev, *a, **k)
        return _MEASURED["ceilings"]

    runner.cases, runner.run_case = (lambda *a, **k: [case]), run_case
    real_ceilings, runner.perf.ceilings = runner.perf.ceilings, ceilings_once
    try:
        with _cache(root), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner.run_suite(store=False, out_dir=root / "bench", console=None)
    finally:
        runner.perf.ceilings = real_ceilings


# The suite's ceilings, measured by the first write of this process (its forked children inherit them): a busy
# machine's spread can have the ceilings cache refuse its own file (perf.device.stale_reason), and each write of the
# suite measured them again (~12 s each on 2 busy cores). Not under test here: the "ceilings" writer writes them.
_MEASURED: dict = {}


def _plan_pred(i: int):
    """A small plan's Prediction; 1 to 4 blocks by version (consecutive versions draw different pictures)."""
    from tilestack.parallel.model import ModelConfig
    from tilestack.parallel.plan import Plan, RooflineCompute, describe_gpt, h200_nccl, predict
    desc = describe_gpt(ModelConfig(n_layer=1 + i % 4, d=32, n_head=4, vocab=64, max_seq=16), seq=16)
    return predict(Plan(dp=2, batch=4), desc, RooflineCompute(desc, "h200"), h200_nccl())


def w_timeline(root: Path, i: int) -> None:
    from tilestack.parallel.plan.pictures import timeline_png
    timeline_png(_plan_pred(i), root / "figures" / "timeline.png")


def w_memory(root: Path, i: int) -> None:
    from tilestack.parallel.plan.pictures import memory_png
    memory_png(_plan_pred(i), root / "figures" / "memory.png", limit=float((i % 4 + 1) << 20))


def _history(i: int, n: int = 5):
    from tilestack.federated.metrics import History, RoundMetrics
    return History([RoundMetrics(round=r, train_loss=float(i) + 1.0 / r, test_acc=0.1 * r) for r in range(1, n)])


def w_fl_plot(root: Path, i: int) -> None:
    from tilestack.federated.plots import plot_rounds
    plot_rounds({"FedAvg": _history(i)}, "train_loss", root / "fl" / "loss.png", title=f"v{i}")


USER_DOC = "# Federated learning\n\nThe user's own notes, kept whatever the bench writes.\n"


def w_fl_doc(root: Path, i: int) -> None:
    """``write_report`` of ``tilestack fl bench``: the table between its markers in a doc that holds the user's
    text (made with it at the first write)."""
    from tilestack.federated.bench import BenchSpec, Cell, write_report
    doc = root / "docs" / "federated.md"
    if not doc.exists():
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(USER_DOC)
    spec = BenchSpec(tasks=("blobs",), partitions=("iid",), profiles=(BenchSpec().profiles[0],),
                     methods=("fedavg",), seeds=(0,))
    cell = Cell("blobs", "iid", spec.profiles[0], "fedavg", 0, test_acc=0.5 + i / 100, worst10=0.25, bytes_up=100,
                seconds=1.0, accs=[0.5])
    write_report(spec, [cell], doc, root / "docs" / "img", seconds=float(i))


def w_deploy(root: Path, i: int) -> None:
    """The deployment ServerApp's ``main``, its Flower rounds left out (``run_rounds`` gives version i's history and
    model): what is under test is its result file."""
    import torch
    from flwr.app import Context, RecordDict

    from tilestack.federated import deploy
    from tilestack.federated.task import Task
    deploy.run_rounds = lambda *a, **k: types.SimpleNamespace(history=_history(i, 40),
                                                              arrays={"w": torch.full((64,), float(i))})
    deploy.ManagedGrid = lambda grid, task: None
    deploy.Evaluator = lambda task: None
    cfg = {"task": Task(dataset="synthetic", num_clients=4, max_samples=60).to_json(), "num-rounds": 1,
           "result-path": str(root / "result.json")}
    deploy.main(None, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))


def w_measure(root: Path, i: int) -> None:
    """``compile.measure.linear_epilogue`` at an M of its own per version, its timing left out."""
    import torch

    from tilestack.compile import measure
    measure._measure_linear_epilogue = lambda *a, **k: (1e-6 * (i + 1), 2e-6 * (i + 1), 1e-6)
    with _cache(root):
        measure.linear_epilogue(torch.empty(8 + i, 16), torch.empty(32, 16), None, None, None, False)


def w_ceilings(root: Path, i: int) -> None:
    from tilestack.perf import device
    with _cache(root), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        device.ceilings(device.detect("cpu"), remeasure=True, copy_bytes=1 << 14, matmul_n=16, dtypes=("fp32",),
                        budget_s=0.02)


TUNE_DEVICE = "sm90-132sm-227kb"


def w_tune(root: Path, i: int) -> None:
    from tilestack.tune.cache import ConfigCache
    from tilestack.tune.devices import DeviceKey
    dev = DeviceKey.parse(TUNE_DEVICE, name="NVIDIA H200")
    ConfigCache(root / "cache", tables_dir=None).put("gemm", f"sig{i}", dev, 1024, {"BM": 16 * (i + 1)}, options={})


def kernel_src(i: int) -> str:
    return ("import triton\n\n\n@triton.jit\ndef add_one(x, n, BLOCK: tl.constexpr = 8):\n"
            f"    pass  # version {i}\n" + "#" * 4000 + "\n").replace("tl.constexpr", "triton.language.constexpr")


def w_kernel_src(root: Path, i: int) -> None:
    from tilestack.backends.triton import launch
    with _cache(root):
        launch.compile_source(kernel_src(i), "add_one", True)


def kernel_src_path(root: Path, i: int) -> Path:
    digest = hashlib.sha256(kernel_src(i).encode()).hexdigest()[:16]
    return root / "cache" / "triton" / f"add_one_{digest}.py"


# writer -> (write(root, i), the file under test for version i)
WRITERS = {
    "roofline": (w_roofline, lambda r, i: r / "roofline.png"),
    "html": (w_html, lambda r, i: r / "report.html"),
    "perf-report-md": (_perf_cli, lambda r, i: r / "out" / "report.md"),
    "perf-report-png": (_perf_cli, lambda r, i: r / "out" / "roofline.png"),
    "bench-md": (_suite, lambda r, i: r / "bench" / "bench.md"),
    "bench-json": (_suite, lambda r, i: r / "bench" / "bench.json"),
    "timeline": (w_timeline, lambda r, i: r / "figures" / "timeline.png"),
    "memory": (w_memory, lambda r, i: r / "figures" / "memory.png"),
    "fl-plot": (w_fl_plot, lambda r, i: r / "fl" / "loss.png"),
    "fl-doc": (w_fl_doc, lambda r, i: r / "docs" / "federated.md"),
    "deploy": (w_deploy, lambda r, i: r / "result.json"),
    "measure": (w_measure, lambda r, i: r / "cache" / "compile_measure.json"),
    "ceilings": (w_ceilings, lambda r, i: next((r / "cache" / "perf").glob("ceilings-*.json"))),
    "tune": (w_tune, lambda r, i: r / "cache" / "tuned" / f"{TUNE_DEVICE}.json"),
    "kernel-src": (w_kernel_src, kernel_src_path),
}


# ---- the kill, aimed at one file ---------------------------------------------------------------------------------
def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _fd_path(fd: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _is_tmp_of(p: Path | None, target: Path) -> bool:
    """Whether ``p`` is a temporary of ``target``'s writer: beside it, ``<prefix><pid>.<random>.tmp`` with one of
    the prefixes tilestack names them by (``.<name>.``; ``<stem>.`` and ``.<stem>.`` kept from before
    tilestack.files; the kernel cache's one prefix), the pid right after it (``.report.html.<pid>`` is no
    temporary of ``report.md``)."""
    if p is None or p.parent != target.parent or not p.name.endswith(".tmp"):
        return False
    prefixes = (f".{target.name}.", f"{target.stem}.", f".{target.stem}.", ".tilestack-kernel.")
    return any(p.name.startswith(x) and p.name[len(x):].split(".", 1)[0].isdigit() for x in prefixes)


def aim(point: str, target_fn, refs: Path) -> None:
    """Patch os.write / os.replace so that this process SIGKILLs itself at ``point`` of the write of the file
    ``target_fn()`` names (looked up at the write: a ceilings file is named after the device), first keeping the
    bytes it writes in ``refs/new``."""
    real_write, real_replace = os.write, os.replace

    def write(fd, data):
        target = target_fn()
        if point == "mid-write" and _is_tmp_of(_fd_path(fd), target):
            (refs / "new").write_bytes(bytes(data))
            real_write(fd, bytes(data)[: max(1, len(data) // 2)])
            _die()
        return real_write(fd, data)

    def replace(src, dst, *a, **k):
        target = target_fn()
        if Path(dst) == target and point in ("before-rename", "after-rename"):
            (refs / "new").write_bytes(Path(src).read_bytes())
            if point == "after-rename":
                real_replace(src, dst, *a, **k)
            _die()
        return real_replace(src, dst, *a, **k)

    os.write, os.replace = write, replace


def in_child(fn) -> tuple[str, int]:
    """Run ``fn`` in a forked child; ("signal", n) or ("exit", code) of how it ended."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - said on stderr; the parent sees exit code 3
            import traceback
            traceback.print_exc()
            print(f"child error: {e!r}", file=sys.stderr, flush=True)
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)             # reaped: a dead writer's pid is gone, not a zombie
    return ("signal", os.WTERMSIG(status)) if os.WIFSIGNALED(status) else ("exit", os.WEXITSTATUS(status))


def tmps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.is_dir() else []


def _kill(write, target_of, base: Path, version: int, point: str, refs: Path) -> dict:
    """Write ``version`` in a child killed at ``point``; the file before in refs/old, after in refs/after."""
    def target_fn() -> Path:
        return target_of(base, version)

    refs.mkdir(parents=True)
    if target_fn().exists():
        (refs / "old").write_bytes(target_fn().read_bytes())
    how = in_child(lambda: (aim(point, target_fn, refs), write(base, version)))
    target = target_fn()
    if target.exists():
        (refs / "after").write_bytes(target.read_bytes())
    return {"how": how, "tmps": tmps(target.parent), "target": str(target)}


def matrix(root: Path, live_pid: int, only: list[str]) -> dict:
    """For each writer: version 0 written here; versions 1-3 each killed at one point in a child (the file left
    copied to refs/<writer>/<point>/after); two more mid-write kills in a row; a temporary named after the live
    process ``live_pid`` put beside them; version 4 written here (what is left); the file's mode under umask 022
    and 027."""
    out: dict = {}
    for name, (write, target_of) in WRITERS.items():
        if only and name not in only:
            continue
        base = root / name
        base.mkdir()
        res: dict = {"points": {}}
        write(base, 0)
        version = 0
        for point in POINTS:
            version += 1
            res["points"][point] = _kill(write, target_of, base, version, point, root / "refs" / name / point)
        for _ in range(2):          # repeated kills mid-write: each next write sweeps the one before it
            version += 1
            _kill(write, target_of, base, version, "mid-write", root / "refs" / name / f"again{version}")
        folder = target_of(base, version).parent
        res["after_repeats"] = tmps(folder)
        dead = res["after_repeats"][-1] if res["after_repeats"] else None
        if dead is not None:        # a live writer's temporary, named as the dead one's with the live pid
            parts = dead.split(".")
            pid_at = next(k for k, s in enumerate(parts) if s.isdigit() and len(s) >= 2)
            parts[pid_at] = str(live_pid)
            (folder / ".".join(parts)).write_text("half")
            res["live_tmp"] = ".".join(parts)
        old_umask = os.umask(0o022)
        try:
            write(base, 100)
            final = target_of(base, 100)
            res["mode_022"] = oct(final.stat().st_mode & 0o777)
            res["after_next_write"] = tmps(folder)
            os.umask(0o027)
            write(base, 101)
            res["mode_027"] = oct(target_of(base, 101).stat().st_mode & 0o777)
        finally:
            os.umask(old_umask)
        out[name] = res
    return out


# ---- two processes, one file ---------------------------------------------------------------------------------------
def _race_child(write, base: Path, target: Path, k: int, n: int, log: Path) -> None:
    """``n`` writes of versions 1000*k + j; the sha256 of each payload renamed over ``target`` and the errors, in
    ``log``."""
    real_replace = os.replace
    renamed, errors = [], []

    def replace(src, dst, *a, **kw):
        if Path(dst) == target:
            renamed.append(hashlib.sha256(Path(src).read_bytes()).hexdigest())
        return real_replace(src, dst, *a, **kw)

    os.replace = replace
    for j in range(n):
        try:
            write(base, 1000 * k + j)
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.append(f"{type(e).__name__}: {e}"[:400])
    log.write_text(json.dumps({"renamed": renamed, "errors": errors}))


def race(root: Path, n: int, only: list[str]) -> dict:
    """Per writer two children, released together through a pipe, write versions 1000*k + j (j < n); each
    keeps the sha256 of every payload it renamed over the file. What each child got, and the shas."""
    out: dict = {}
    for name, (write, target_of) in WRITERS.items():
        if name in ("kernel-src", "perf-report-png", "bench-json"):
            continue                  # (one source's file: both write the same bytes; the others: their siblings')
        if only and name not in only:
            continue
        base = root / name
        base.mkdir()
        write(base, 0)
        target = target_of(base, 0)
        r_fd, w_fd = os.pipe()
        kids = []
        for k in (1, 2):
            log = root / f"{name}-{k}.json"
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(w_fd)
                    os.read(r_fd, 1)                # released together
                    _race_child(write, base, target, k, n, log)
                finally:
                    os._exit(0)
            kids.append((pid, log))
        os.close(r_fd)
        os.write(w_fd, b"gg")
        os.close(w_fd)
        res = {"children": []}
        for pid, log in kids:
            os.waitpid(pid, 0)
            res["children"].append(json.loads(log.read_text()) if log.exists() else {"errors": ["no log"]})
            log.unlink(missing_ok=True)
        res["final"] = hashlib.sha256(target.read_bytes()).hexdigest()
        res["tmps"] = tmps(target.parent)
        res["target"] = str(target)
        out[name] = res
    return out


if __name__ == "__main__":
    import torch
    torch.set_num_threads(1)           # no thread pool before the forks
    import matplotlib
    matplotlib.use("Agg")
    what, root = sys.argv[1], Path(sys.argv[2])
    if what == "matrix":
        print(json.dumps(matrix(root, int(sys.argv[3]), sys.argv[4:])), flush=True)
    elif what == "race":
        print(json.dumps(race(root, int(sys.argv[3]), sys.argv[4:])), flush=True)
