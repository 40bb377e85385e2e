"""Processes that tests/test_faults_round4.py and tests/test_faults_round4_more.py start: writers SIGKILLed at a
chosen point of a write, writers racing another process for one store, one-process training groups.

    python tests/_faults_workers_round4.py killed STORE TARGET POINT    # write STORE twice, SIGKILL at POINT of the 2nd
    python tests/_faults_workers_round4.py race all ROOT TAG N          # "ready", a line on stdin, N writes per store
    python tests/_faults_workers_round4.py ckpt-race TARGET TAG N       # "ready", a line, N checkpoint.save (1 rank)
    python tests/_faults_workers_round4.py half-written TARGET WHERE    # save, then a save SIGKILLed at WHERE
    python tests/_faults_workers_round4.py load OUT JSON                # checkpoint.load of each [target, change, how]
    python tests/_faults_workers_round4.py cache-file CACHE             # every cache under a cache dir (JSON out)

POINT: ``mid-write`` (the temporary holds half its bytes), ``before-rename`` (the temporary is whole),
``after-rename`` (the new file is in place; the process dies before it returns). The kill is the process's own
SIGKILL at that point (a real kill: no handler, no flush, no cleanup), so where it lands is not left to timing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path

CFG_KW = dict(n_layer=2, d=32, n_head=4, vocab=64, max_seq=16)
BATCH, SEQ = 4, 16


# ---- the stores that rounds 1-3 did not kill: plan files, comm fits, federated histories, a run's train.json ------
def plan_pair(batch: int):
    """(Prediction, ModelDesc) of a small plan, ``batch`` sequences a step (two writes differ by it)."""
    from tilestack.parallel.model import ModelConfig
    from tilestack.parallel.plan import Plan, RooflineCompute, describe_gpt, h200_nccl, predict
    desc = describe_gpt(ModelConfig(**CFG_KW), seq=SEQ)
    return predict(Plan(dp=2, batch=batch), desc, RooflineCompute(desc, "h200"), h200_nccl()), desc


STORES = ["plan", "comm", "history", "train-json"]


def target_of(store: str, root: Path) -> Path:
    """Where ``write_store`` writes ``store`` in ``root`` (comm: the cache dir; its file is plan/comm-x.json)."""
    return root / {"plan": "plan.json", "comm": "cache", "history": "history.json", "train-json": "train.json"}[store]


def write_store(store: str, target: Path, i: int) -> None:
    """Write version ``i`` of ``store`` at ``target`` (its content says ``i``; see ``version_of``)."""
    if store == "plan":
        from tilestack.parallel.plan.planfile import write_plan
        pred, desc = plan_pair(batch=2 * (i + 1))
        write_plan(pred, desc, target, device=f"cpu-{i}")
    elif store == "comm":
        from tilestack import config
        from tilestack.parallel.plan.comm import CommModel, comm_path
        model = CommModel(fits={"all_reduce": {2: (1e-5 * (i + 1), 1e-9)}}, source=f"v{i}",
                          points={"all_reduce": {2: [(1024.0, 1e-5)] * 200}})
        with config.override(cache_dir=target):
            _store_comm(model, comm_path("x"))
    elif store == "history":
        from tilestack.federated.metrics import History, RoundMetrics
        History([RoundMetrics(round=r, train_loss=float(i)) for r in range(1, 200)]).to_json(target)
    elif store == "train-json":
        from tilestack.cli.train_state import _write_atomically
        _write_atomically(target, json.dumps({"seed": i, "pad": ["x" * 50] * 200}))
    else:
        raise SystemExit(f"unknown store {store!r}")


def _store_comm(model, path: Path) -> None:
    """measure_gloo's store step (the measurement itself is a gloo run; its write is what is killed here)."""
    from tilestack.parallel.plan import comm
    comm.store_comm(model, path)


def version_of(store: str, target: Path) -> int:
    """Which version ``write_store`` wrote at ``target``, read back the way tilestack reads it."""
    if store == "plan":
        from tilestack.parallel.plan.planfile import read_plan
        return read_plan(target)["batch"] // 2 - 1
    if store == "comm":
        from tilestack import config
        from tilestack.parallel.plan.comm import load_comm
        with config.override(cache_dir=target):
            return int(load_comm("x").source[1:])
    if store == "history":
        from tilestack.federated.metrics import History
        return int(History.from_dict(json.loads(target.read_text())).rounds[-1].train_loss)
    if store == "train-json":
        from tilestack.cli.train_state import _read_settings
        return _read_settings(target)["seed"]
    raise SystemExit(f"unknown store {store!r}")


def _die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)


def killed(store: str, target: str, point: str) -> None:
    """Write version 0 whole, then version 1 with this process SIGKILLed at ``point``."""
    target_p = Path(target)
    write_store(store, target_p, 0)
    print("0", flush=True)
    real_write_text, real_os_replace, real_path_replace = Path.write_text, os.replace, Path.replace
    real_os_write = os.write
    if point == "mid-write":
        def half(self, text, *a, **k):
            with open(self, "w") as f:
                f.write(text[: len(text) // 2])
                f.flush()
            _die()
        Path.write_text = half

        def half_write(fd, data):     # tilestack.files.write_atomic writes through os.write
            real_os_write(fd, bytes(data)[: max(1, len(data) // 2)])
            _die()
        os.write = half_write
    elif point == "before-rename":
        os.replace = Path.replace = _die
    elif point == "after-rename":
        os.replace = lambda a, b, *r, **k: (real_os_replace(a, b), _die())
        Path.replace = lambda self, b: (real_path_replace(self, b), _die())
    write_store(store, target_p, 1)
    del real_write_text
    print("survived", flush=True)   # (a point the writer never reached: the test fails on this)


def race(store: str, target: str, tag: str, n: int) -> dict:
    """``n`` writes of ``store`` at ``target`` (versions tag*1000 + k); the errors met."""
    errors = []
    base = {"a": 0, "b": 1000}[tag]
    for k in range(n):
        try:
            write_store(store, Path(target), base + k)
        except Exception as e:  # noqa: BLE001 - what the other writer did to this one's write, reported
            errors.append(f"{type(e).__name__}: {e}")
    return {"errors": errors}


# ---- checkpoints in a one-process group --------------------------------------------------------------------------
def one_rank_group(init_file: str) -> None:
    import torch.distributed as dist
    Path(init_file).parent.mkdir(parents=True, exist_ok=True)     # (file:// init in a missing folder waits forever)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)


def trainer(seed: int, **change):
    from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer
    pc = ParallelConfig()
    return Trainer(GPT(ModelConfig(**{**CFG_KW, **change}), seed=seed), pc, pc.build_mesh("cpu"), lr=1e-3)


def ckpt_race(target: str, tag: str, n: int) -> dict:
    """Save a one-rank trainer whose parameters all equal ``seed`` (a: 1.0, b: 2.0) to ``target`` ``n`` times."""
    import torch

    from tilestack.parallel import checkpoint
    one_rank_group(str(Path(target).parent / f"init-{tag}"))
    t = trainer(seed=0)
    value = {"a": 1.0, "b": 2.0}[tag]
    with torch.no_grad():
        for p in t.parts[0].parameters():
            p.fill_(value)
    print("ready", flush=True)
    sys.stdin.readline()
    errors = []
    for _ in range(n):
        try:
            checkpoint.save(t, target)
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.append(f"{type(e).__name__}: {e}"[:500])
    return {"errors": errors}


def _params(t) -> dict:
    return {k: v.clone() for k, v in t.full_params().items()}


def half_written(target: str, where: str) -> None:
    """One rank: train 2 steps, save to ``target`` (the parameters then to ``target``.pt), train 2 more and save
    again, SIGKILLed ``where``: ``in-shards`` (torch writes the shards: no .metadata), ``before-swap`` (the new
    checkpoint whole in ``.<name>.partial``, the old one not yet moved aside)."""
    import torch
    from torch.distributed.checkpoint import FileSystemWriter

    from tilestack.parallel import checkpoint, make_batch
    from tilestack.parallel import checkpoint as ck_mod
    from tilestack.parallel.model import ModelConfig
    one_rank_group(target + ".init")
    t = trainer(seed=0)
    cfg = ModelConfig(**CFG_KW)
    for s in range(4):
        t.step(*make_batch(cfg, BATCH, SEQ, seed=s))
        if s == 1:
            checkpoint.save(t, target)
            torch.save(_params(t), target + ".pt")
    if where == "in-shards":
        FileSystemWriter.write_data = lambda *a, **k: _die()
    else:
        ck_mod.os = type(os)("os_dying")
        ck_mod.os.__dict__.update(os.__dict__)
        ck_mod.os.replace = _die
    checkpoint.save(t, target)
    print("survived", flush=True)


def load_many(out: str, loads: list) -> None:
    """One rank: each of ``loads`` ([target, model changes, "fresh" or "again"]) loaded into a trainer (a fresh one,
    or the previous load's again); its steps or error, the checkpoint warnings, parameters before and after (.pt)."""
    import torch

    from tilestack.parallel import ParallelConfigError, checkpoint
    one_rank_group(out + ".init")
    results, t = [], None
    for target, change, how in loads:
        if how == "fresh" or t is None:
            t = trainer(seed=7, **change)
        res: dict = {"before": _params(t)}
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                res["steps"] = checkpoint.load(t, target)
            except ParallelConfigError as e:
                res["error"] = str(e)
        res["warnings"] = [str(w.message) for w in seen if "checkpoint" in str(w.message)]
        res["params"] = _params(t)
        results.append(res)
    torch.save(results, out)


def save_two_ranks(rank: int, world_size: int, target: str) -> dict:
    """(run_local, dp=2) Train 3 steps and save to ``target``; the whole parameters."""
    from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, checkpoint, make_batch
    pc = ParallelConfig(dp=2)
    cfg = ModelConfig(**CFG_KW)
    t = Trainer(GPT(cfg, seed=0), pc, pc.build_mesh("cpu"), lr=1e-3)
    for s in range(3):
        t.step(*make_batch(cfg, BATCH, SEQ, seed=s))
    checkpoint.save(t, target)
    return _params(t)


# ---- every cache with the cache dir a file ---------------------------------------------------------------------------
def cache_file(cache: str) -> dict:
    """Each cache written and read with TILESTACK_CACHE_DIR (set by the test) naming ``cache``: what each did."""
    from tilestack import config
    from tilestack.compile import measure
    from tilestack.parallel.plan import comm
    from tilestack.perf.store import Store
    from tilestack.tune.cache import ConfigCache
    from tilestack.tune.devices import DeviceKey

    assert Path(config.knobs.cache_dir) == Path(cache)
    dev = DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H200")
    out: dict = {}

    def attempt(name: str, fn) -> None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                r = fn()
                out[name] = "ok" if r is None else repr(r)
            except Exception as e:  # noqa: BLE001 - what each store did, reported
                out[name] = f"{type(e).__name__}: {e}"
        out[name + "_warnings"] = [str(w.message) for w in seen]

    model = comm.CommModel(fits={"all_reduce": {2: (1e-5, 1e-9)}}, source="mine")
    attempt("tune", lambda: ConfigCache(Path(cache), tables_dir=None).put("gemm", "s", dev, 1024, {"BM": 64},
                                                                          options={}))
    attempt("measure", lambda: measure._store("k", {"fused_s": 1e-6, "unfused_s": 2e-6}))
    attempt("store", lambda: Store().close())
    attempt("comm_store", lambda: comm.store_comm(model, comm.comm_path("mine")))
    attempt("comm_load", lambda: comm.load_comm("mine"))
    return out


if __name__ == "__main__":
    import torch
    torch.set_num_threads(1)
    what = sys.argv[1]
    if what == "killed":
        killed(*sys.argv[2:5])
    elif what == "cache-file":
        print(json.dumps(cache_file(sys.argv[2])), flush=True)
    else:
        args = sys.argv[2:]
        if what == "race":                  # race all ROOT TAG N: every store of STORES under ROOT in turn
            root, tag, n = Path(args[1]), args[2], int(args[3])
            warm = root.parent / f"warm-{tag}"      # (imports done before "ready": both start together)
            for store in STORES:
                (warm / store).mkdir(parents=True)
                write_store(store, target_of(store, warm / store), 0)
            print("ready", flush=True)
            sys.stdin.readline()
            print(json.dumps({s: race(s, str(target_of(s, root / s)), tag, n) for s in STORES}), flush=True)
        elif what == "half-written":
            half_written(args[0], args[1])
        elif what == "load":
            load_many(args[0], json.loads(args[1]))
        elif what == "ckpt-race":
            print(json.dumps(ckpt_race(args[0], args[1], int(args[2]))), flush=True)
