"""On a GPU: tilestack's norm backward (layer norm, RMS norm, with and without the fused residual's gradient)
against torch's at the GPT-2-small and Llama shapes of a training step, in one process.

    PYTHONPATH=src python3 scripts/gpu/check_norm_backward.py --json /tmp/norm_backward.json
    PYTHONPATH=src python3 scripts/gpu/check_norm_backward.py --quick        # tiny shapes; runs on a CPU too

Per case (8192 x 768 layer norm as GPT-2 small's 25 norms a step, 8192 x 2048 RMS norm as the Llama model's;
bf16; each with the residual stream's gradient dh added into dx, as ``add_layer_norm``/``add_rms_norm`` need,
and without) it times, median of CUDA-event timed calls over inputs rotated past the L2:

- kernel: ``tilestack.kernels.layernorm_bwd.norm_backward`` (the norm backward kernel and the partial-sum
  kernel) against torch's backward kernels called directly (``aten.native_layer_norm_backward`` /
  ``aten._fused_rms_norm_backward``, plus the add of dh that torch's autograd does apart), each also replayed
  from a CUDA graph (GPU time alone, no host cost);
- bwd: the public op's backward through autograd (``tilestack.torch.ops``), against F.layer_norm / F.rms_norm of
  x + r through autograd, from one retained forward;
- fwd+bwd: forward and backward through autograd, as a training step calls them.

Bytes are what the backward must move at least (read x, dy [, dh], the weights and row statistics; write dx and
the weight gradients); bytes/s of the kernel (graph replay) are reported against this GPU's copy bandwidth
(measured here, ``dst.copy_(src)`` of 1 GiB) and against the H200's 4.27 TB/s. Prints a table last; ``--json``
writes every number.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch
import torch.nn.functional as F

H200_COPY_BYTES_PER_S = 4.27e12     # the H200's measured copy bandwidth (docs/performance.md), for the ratio
COPY_BYTES = 1 << 30                 # the copy whose bandwidth is measured here
EPS = 1e-5
# (name, rows, width, layer norm?, residual gradient?)
CASES = [("gpt2 add_layer_norm", 8192, 768, True, True), ("gpt2 layer_norm", 8192, 768, True, False),
         ("llama add_rms_norm", 8192, 2048, False, True), ("llama rms_norm", 8192, 2048, False, False)]
QUICK_CASES = [("quick add_layer_norm", 64, 96, True, True), ("quick rms_norm", 64, 160, False, False)]


def make_inputs(m: int, n: int, centered: bool, residual: bool, device, seed: int) -> dict:
    """A forward's inputs and saved statistics (tilestack's and torch's), and the gradients reaching it."""
    from tilestack.kernels import add_layer_norm, add_rms_norm

    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, loc=0.0, std=1.0):
        return (torch.randn(*shape, generator=g) * std + loc).to(device=device, dtype=torch.bfloat16)

    x, r, dy = randn(m, n, loc=0.5), randn(m, n), randn(m, n)
    w, b = randn(n, loc=1.0, std=0.1), randn(n, std=0.1)
    dh = randn(m, n) if residual else None
    if centered:
        _, h, mean, rstd = add_layer_norm(x, r, w, b, EPS)
        _, t_mean, t_rstd = torch.ops.aten.native_layer_norm(h, (n,), w, b, EPS)
    else:
        _, h, rstd = add_rms_norm(x, r, w, EPS)
        mean = t_mean = None
        t_rstd = torch.ops.aten._fused_rms_norm(h, (n,), w, EPS)[1] if _has_fused_rms(device.type) else None
    return dict(x=x, r=r, w=w, b=b, dy=dy, dh=dh, h=h, mean=mean, rstd=rstd, t_mean=t_mean, t_rstd=t_rstd)


@functools.cache
def _has_fused_rms(device_type: str) -> bool:
    """Whether torch has a fused RMS norm backward kernel on this device (CUDA builds since 2.8; not on a CPU)."""
    try:
        x = torch.ones(2, 8, device=device_type)
        rstd = torch.ops.aten._fused_rms_norm(x, (8,), x[0], EPS)[1]
        torch.ops.aten._fused_rms_norm_backward(x, x, (8,), rstd, x[0], [True, True])
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


def ideal_bytes(m: int, n: int, centered: bool, residual: bool) -> int:
    """Bytes a norm backward moves at least: x, dy [, dh] read and dx written (bf16), the weight (and bias)
    read and their gradients written, the row statistics (f32) read."""
    rows = 2 * m * n * (3 + residual)
    vectors = 2 * n * (2 + 2 * centered)
    stats = 4 * m * (1 + centered)
    return rows + vectors + stats


def ts_kernel(i: dict, centered: bool):
    from tilestack.kernels.layernorm_bwd import norm_backward

    return norm_backward(i["dy"], i["h"], i["w"], i["mean"], i["rstd"], dh=i["dh"], centered=centered,
                         backend=None, config={})


def torch_kernel(i: dict, centered: bool):
    n = i["h"].shape[1]
    if centered:
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(i["dy"], i["h"], (n,), i["t_mean"], i["t_rstd"],
                                                               i["w"], i["b"], [True, True, True])
    else:
        dx, dw = torch.ops.aten._fused_rms_norm_backward(i["dy"], i["h"], (n,), i["t_rstd"], i["w"], [True, True])
    if i["dh"] is not None:
        dx = dx + i["dh"]                           # the residual stream's gradient: a separate add in torch
    return dx, dw


def autograd_fns(centered: bool, residual: bool):
    """(tilestack forward, torch forward): (x, r, w, b) -> the outputs a training step differentiates."""
    from tilestack.torch import ops

    def ours(x, r, w, b):
        if residual:
            return ops.add_layer_norm(x, r, w, b, EPS) if centered else ops.add_rms_norm(x, r, w, EPS)
        return (ops.layer_norm(x, w, b, EPS) if centered else ops.rms_norm(x, w, EPS)),

    def theirs(x, r, w, b):
        n = x.shape[-1]
        h = x + r if residual else x
        y = F.layer_norm(h, (n,), w, b, EPS) if centered else F.rms_norm(h, (n,), w, EPS)
        return (y, h) if residual else (y,)
    return ours, theirs


def leaves(i: dict, centered: bool) -> list:
    return [t.detach().requires_grad_() for t in (i["x"], i["r"], i["w"], i["b"])]


def time_ms(fn, sets, device, graph: bool = False) -> float:
    from tilestack.perf import timing

    return timing.time_fn(fn, args_sets=sets, device=device, graph=graph).median_s * 1e3


def copy_bandwidth(device) -> float:
    """Read + written bytes per second of one large device copy."""
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), [()], device)
    return 2 * COPY_BYTES / (ms / 1e3)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def plan_of(m: int, n: int, centered: bool, device) -> dict:
    """The launch config and persistent programs tilestack picks here (for the record)."""
    from tilestack.kernels import layernorm_bwd as lb
    from tilestack.tune.lookup import launch_config

    tuned = launch_config("layer_norm_bwd" if centered else "rms_norm_bwd", "bfloat16", device, n, {})
    cfg = lb.bwd_config(n, device.type, tuned)
    return {**cfg, "programs": lb.programs(m, device, cfg), "launches": 2}


def run_case(name, m, n, centered, residual, device, copy_bps) -> dict:
    from tilestack.perf import timing

    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else None
    cuda = device.type == "cuda"
    nbytes = ideal_bytes(m, n, centered, residual)
    sets = timing.rotating_sets(lambda: (make_inputs(m, n, centered, residual, device, seed=len(name)),),
                                bytes_per_set=nbytes, l2_bytes=l2, device=device)
    fused_rms = _has_fused_rms(device.type)
    if not centered and not fused_rms:
        print(f"{name}: this torch has no aten._fused_rms_norm_backward; kernel rows left out", file=sys.stderr)
    row = {"case": name, "rows": m, "width": n, "layer_norm": centered, "residual": residual,
           "ideal_bytes": nbytes, "tilestack_plan": plan_of(m, n, centered, device)}

    # correctness first: the numbers below are of results that agree with torch's
    i = sets[0][0]
    dx, sums = ts_kernel(i, centered)
    if centered or fused_rms:
        tdx, tdw = torch_kernel(i, centered)
        row["rel_err_dx"], row["rel_err_dw"] = rel(dx, tdx), rel(sums[0], tdw)

    kernels = {"tilestack": lambda i: ts_kernel(i, centered)}
    if centered or fused_rms:
        kernels["torch"] = lambda i: torch_kernel(i, centered)
    for impl, fn in kernels.items():
        row[f"kernel_ms_{impl}"] = time_ms(fn, sets, device)
        if cuda:
            try:
                row[f"kernel_graph_ms_{impl}"] = time_ms(fn, sets, device, graph=True)
            except timing.TimingError as e:       # not capturable: say so, keep the other numbers
                row[f"kernel_graph_error_{impl}"] = str(e)[:300]
                print(f"{name}: {impl} kernel not timed from a CUDA graph: {e}", file=sys.stderr)

    ours, theirs = autograd_fns(centered, residual)
    for impl, fwd in (("tilestack", ours), ("torch", theirs)):
        def step(i, fwd=fwd):
            ins = leaves(i, centered)
            outs = fwd(*ins)
            grads = (i["dy"], i["dh"]) if residual else (i["dy"],)
            return torch.autograd.grad(outs, ins, grads, allow_unused=True)

        def retained(i, fwd=fwd):
            ins = leaves(i, centered)
            return ins, fwd(*ins), ((i["dy"], i["dh"]) if residual else (i["dy"],))
        graphs = [(retained(s[0]),) for s in sets]
        row[f"bwd_ms_{impl}"] = time_ms(
            lambda g: torch.autograd.grad(g[1], g[0], g[2], retain_graph=True, allow_unused=True), graphs, device)
        del graphs
        row[f"fwd_bwd_ms_{impl}"] = time_ms(step, sets, device)

    best = row.get("kernel_graph_ms_tilestack", row["kernel_ms_tilestack"])
    row["kernel_bytes_per_s"] = nbytes / (best / 1e3)
    row["of_copy_bandwidth"] = row["kernel_bytes_per_s"] / copy_bps
    row["of_h200_copy_bandwidth"] = row["kernel_bytes_per_s"] / H200_COPY_BYTES_PER_S
    for k in ("kernel_ms", "kernel_graph_ms", "bwd_ms", "fwd_bwd_ms"):
        if f"{k}_torch" in row:
            row[f"{k}_ratio"] = row[f"{k}_tilestack"] / row[f"{k}_torch"]
    return row


def print_table(rows: list[dict], copy_bps: float) -> None:
    def ms(r, k):
        v = r.get(k)
        return f"{v:8.4f}" if v is not None else f"{'-':>8}"

    def ratio(r, k):
        v = r.get(k)
        return f"{v:5.2f}x" if v is not None else f"{'-':>6}"

    print(f"\ncopy bandwidth here: {copy_bps / 1e12:.2f} TB/s (H200 reference {H200_COPY_BYTES_PER_S / 1e12:.2f})")
    print(f"{'case':22} {'shape':>10} | {'kernel ts':>8} {'torch':>8} {'ratio':>6} | {'graph ts':>8} {'torch':>8} "
          f"{'ratio':>6} | {'TB/s':>5} {'copy%':>5} {'h200%':>5} | {'bwd ts':>8} {'torch':>8} {'ratio':>6} | "
          f"{'fwd+bwd':>8} {'torch':>8} {'ratio':>6} | {'err dx':>7}")
    for r in rows:
        print(f"{r['case']:22} {r['rows']:>5}x{r['width']:<4} | {ms(r, 'kernel_ms_tilestack')} "
              f"{ms(r, 'kernel_ms_torch')} {ratio(r, 'kernel_ms_ratio')} | {ms(r, 'kernel_graph_ms_tilestack')} "
              f"{ms(r, 'kernel_graph_ms_torch')} {ratio(r, 'kernel_graph_ms_ratio')} | "
              f"{r['kernel_bytes_per_s'] / 1e12:5.2f} {100 * r['of_copy_bandwidth']:4.0f}% "
              f"{100 * r['of_h200_copy_bandwidth']:4.0f}% | {ms(r, 'bwd_ms_tilestack')} {ms(r, 'bwd_ms_torch')} "
              f"{ratio(r, 'bwd_ms_ratio')} | {ms(r, 'fwd_bwd_ms_tilestack')} {ms(r, 'fwd_bwd_ms_torch')} "
              f"{ratio(r, 'fwd_bwd_ms_ratio')} | {r.get('rel_err_dx', float('nan')):7.1e}")
    print("ms per call (median); ratio = tilestack / torch (below 1: tilestack faster); kernel = both backward "
          "kernels with the dh add, graph = replayed from a CUDA graph (no host cost); TB/s of the graph-replayed "
          "kernel over the least bytes it must move.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test; runs on a CPU)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        print("needs a CUDA GPU (or --quick)", file=sys.stderr)
        return 2
    import tilestack  # noqa: F401  (before the timing imports: the interpreter choice on a CPU)

    copy_bps = copy_bandwidth(device)
    rows = []
    failed = []
    for case in QUICK_CASES if args.quick else CASES:
        try:
            rows.append(run_case(*case, device, copy_bps))
        except Exception as e:  # noqa: BLE001 - one case's failure is reported; the others still run
            failed.append({"case": case[0], "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"{case[0]}: FAILED {failed[-1]['error']}", file=sys.stderr, flush=True)
            continue
        print(json.dumps({k: v for k, v in rows[-1].items() if "ms" in k or k == "case"}), flush=True)
    print_table(rows, copy_bps)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "copy_bytes_per_s": copy_bps, "h200_copy_bytes_per_s": H200_COPY_BYTES_PER_S}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows, "failed": failed}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
