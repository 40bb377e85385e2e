"""Op-level checks of the twenty-third profiler round's fixes, and the public API's refusals of bad arguments.

Fixed this round (each test names what it pins):
- complex factorisations and solves were counted as the real routine of their size: a complex Cholesky, LU, solve,
  inverse, QR, eigh, SVD, eig, lstsq, pinv, triangular or factored solve, Householder product or application is
  4x the real one (a complex multiply-add is four real multiplies and four adds, ``formulas.COMPLEX_MAC_OVER_REAL``,
  as a complex mm was already counted), forward and in the backward ops that run them (counting_linalg);
- ``formulas.householder_apply_flops`` and ``formulas.factorization_flops("householder_product")`` gave negative
  FLOPs for more reflectors than the matrix has rows (columns): refused, naming k (formulas);
- ``compute_metrics`` / ``measure`` stored a measurement with an empty name, which no compare pairs (metrics);
- a hand-made ``EnergyWindow`` / ``EnergySample`` took negative or NaN joules, negative calls or idle power (negative
  energy per call and FLOP per joule), and calls=0 under a valid window divided by zero; an NVML counter that went
  back during a window (a driver reload) was read as a valid negative energy (energy);
- the reports took a list holding None (then an AttributeError mid-table: a None element read as "none wrong"),
  ``roofline_png`` one Measurement ("not iterable") and ``html_report`` a path of None (a TypeError in the file
  writer, after drawing); ``Measurement.from_row`` of None or of a row missing columns failed with an AttributeError
  or a TypeError listing __init__'s arguments (report, metrics).

Hand counts: a multiply-add is 2 FLOPs; LAPACK's leading terms as ``formulas.factorization_flops`` documents them
(Cholesky n^3/3, LU 2n^3/3, inverse 2n^3, solve 2n^3/3 + 2n^2 k, triangular solve n^2 k, factored solve 2n^2 k, QR
2mn^2 - 2n^3/3 for R and as much again for Q, eigh 9n^3 with vectors, 4n^3/3 without, thin SVD 14mn^2 + 8n^3).
"""

import math
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tilestack import perf
from tilestack.errors import DeviceError, LaunchError
from tilestack.perf import energy, formulas, metrics, profile, report
from tilestack.perf.counting import count_ops

sys.path.insert(0, str(Path(__file__).parent))
from _profile_helpers import FILTERS, profile_cpu  # noqa: E402
from profile_support import CEIL  # noqa: E402

pytestmark = FILTERS
COMPLEX = formulas.COMPLEX_MAC_OVER_REAL
N, K, M = 5, 2, 7  # matrix order, right-hand sides, rows of a tall matrix


def _spd(dtype):
    """A well-conditioned Hermitian positive-definite (N, N) matrix of ``dtype``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(N, N, generator=g, dtype=dtype)
    return a @ a.mH + N * torch.eye(N, dtype=dtype)


def _tall(dtype, rows=M, cols=N):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _rhs(dtype, rows=N):
    return torch.randn(rows, K, generator=torch.Generator().manual_seed(2), dtype=dtype)


def _flops_of(step, op: str) -> float:
    """FLOPs of ``op`` (``aten::...``) over one run of ``step``, all shapes."""
    return math.fsum(c.flops for (name, _), c in count_ops(step).items() if name == op)


# (id, the call on a matrix of a dtype, the op that counts it, the real routine's FLOPs by hand)
ROUTINES = [
    ("cholesky", lambda dt: torch.linalg.cholesky(_spd(dt)), "aten::linalg_cholesky_ex", N**3 / 3),
    ("lu_factor", lambda dt: torch.linalg.lu_factor(_spd(dt)), "aten::linalg_lu_factor_ex", 2 * N**3 / 3),
    ("lu", lambda dt: torch.linalg.lu(_spd(dt)), "aten::linalg_lu", 2 * N**3 / 3),
    ("slogdet", lambda dt: torch.linalg.slogdet(_spd(dt)), "aten::_linalg_slogdet", 2 * N**3 / 3),
    ("det", lambda dt: torch.linalg.det(_spd(dt)), "aten::_linalg_det", 2 * N**3 / 3),
    ("inv", lambda dt: torch.linalg.inv(_spd(dt)), "aten::linalg_inv_ex", 2 * N**3),
    ("solve", lambda dt: torch.linalg.solve(_spd(dt), _rhs(dt)), "aten::_linalg_solve_ex",
     2 * N**3 / 3 + 2 * N**2 * K),
    ("solve_triangular", lambda dt: torch.linalg.solve_triangular(_spd(dt), _rhs(dt), upper=True),
     "aten::linalg_solve_triangular", N**2 * K),
    ("cholesky_solve", lambda dt: torch.cholesky_solve(_rhs(dt), _spd(dt)), "aten::cholesky_solve", 2 * N**2 * K),
    ("lu_solve", lambda dt: torch.linalg.lu_solve(*torch.linalg.lu_factor(_spd(dt)), _rhs(dt)),
     "aten::linalg_lu_solve", 2 * N**2 * K),
    ("qr", lambda dt: torch.linalg.qr(_tall(dt)), "aten::linalg_qr", 2 * (2 * M * N**2 - 2 * N**3 / 3)),
    ("qr_r", lambda dt: torch.linalg.qr(_tall(dt), mode="r"), "aten::linalg_qr", 2 * M * N**2 - 2 * N**3 / 3),
    ("geqrf", lambda dt: torch.geqrf(_tall(dt)), "aten::geqrf", 2 * M * N**2 - 2 * N**3 / 3),
    ("eigh", lambda dt: torch.linalg.eigh(_spd(dt)), "aten::_linalg_eigh", 9 * N**3),
    ("eigvalsh", lambda dt: torch.linalg.eigvalsh(_spd(dt)), "aten::_linalg_eigh", 4 * N**3 / 3),
    ("svd", lambda dt: torch.linalg.svd(_tall(dt), full_matrices=False), "aten::_linalg_svd",
     14 * M * N**2 + 8 * N**3),
    ("svdvals", lambda dt: torch.linalg.svdvals(_tall(dt)), "aten::_linalg_svd", 4 * M * N**2 - 4 * N**3 / 3),
    ("pinv", lambda dt: torch.linalg.pinv(_tall(dt)), "aten::linalg_pinv", 14 * M * N**2 + 8 * N**3 + 2 * M * N**2),
    ("lstsq", lambda dt: torch.linalg.lstsq(_tall(dt), _rhs(dt, M)), "aten::linalg_lstsq",
     2 * M * N**2 - 2 * N**3 / 3 + 4 * M * N * K - 2 * N**2 * K + N**2 * K),
    ("cholesky_inverse", lambda dt: torch.cholesky_inverse(_spd(dt)), "aten::cholesky_inverse", 2 * N**3 / 3),
]


@pytest.mark.parametrize("call,op,real", [r[1:] for r in ROUTINES], ids=[r[0] for r in ROUTINES])
def test_a_complex_factorisation_is_four_times_the_real_one(call, op, real):
    """Round 23: the complex routine was counted as the real one of its size (a quarter of its work). The real one
    is counted by hand, the complex one COMPLEX_MAC_OVER_REAL (4) times it, in single and double precision."""
    assert _flops_of(lambda: call(torch.float32), op) == pytest.approx(real, rel=1e-12)
    assert _flops_of(lambda: call(torch.float64), op) == pytest.approx(real, rel=1e-12)
    assert _flops_of(lambda: call(torch.complex64), op) == pytest.approx(COMPLEX * real, rel=1e-12)
    assert _flops_of(lambda: call(torch.complex128), op) == pytest.approx(COMPLEX * real, rel=1e-12)


def test_a_general_eig_of_a_real_matrix_stays_real():
    """eig of a real matrix runs the real LAPACK routine (its results are complex): 25n^3 with vectors; of a complex
    matrix 4x that."""
    a = _spd(torch.float32)
    assert _flops_of(lambda: torch.linalg.eig(a), "aten::linalg_eig") == 25 * N**3
    assert _flops_of(lambda: torch.linalg.eig(a.to(torch.complex64)), "aten::linalg_eig") == COMPLEX * 25 * N**3


@pytest.mark.parametrize("dtype,factor", [(torch.float32, 1), (torch.complex64, COMPLEX)], ids=["real", "complex"])
def test_householder_product_and_ormqr_of_complex_reflectors(dtype, factor):
    """Q formed from the k = N reflectors of a (M, N) geqrf: 4MNk - 2(M + N)k^2 + 4k^3/3; applied (ormqr) to a (M, K)
    matrix from the left: 4MKk - 2Kk^2; 4 times each for complex reflectors."""
    q, tau = torch.geqrf(_tall(dtype))
    c = _rhs(dtype, M)
    formed = _flops_of(lambda: torch.linalg.householder_product(q, tau), "aten::linalg_householder_product")
    applied = _flops_of(lambda: torch.ormqr(q, tau, c), "aten::ormqr")
    assert formed == pytest.approx(factor * (4 * M * N * N - 2 * (M + N) * N**2 + 4 * N**3 / 3), rel=1e-12)
    assert applied == pytest.approx(factor * (4 * M * K * N - 2 * K * N**2), rel=1e-12)


class ComplexWhiten(nn.Module):
    """A learned mixing, then whitening by the Cholesky factor of the features' Gram matrix: (N, C) -> (C, N)."""

    def __init__(self, dtype):
        super().__init__()
        self.mix = nn.Parameter(_spd(dtype) / N)

    def forward(self, x):  # (M, N)
        h = x @ self.mix  # (M, N)
        gram = h.mH @ h + torch.eye(N, dtype=h.dtype)  # (N, N), Hermitian positive definite
        white = torch.linalg.solve_triangular(torch.linalg.cholesky(gram), h.mT, upper=False)  # (N, M)
        return white.abs().pow(2).sum()


LINALG_ROWS = ("aten::linalg_cholesky_ex", "aten::linalg_solve_triangular")


@pytest.mark.parametrize("train", [False, True], ids=["forward", "trained"])
def test_complex_whitening_counts_four_times_the_real_routines(train):
    """The same layer in complex64 and float32, forward and trained (Cholesky's backward solves with the factor,
    the triangular solve's backward solves again): every factorisation and solve row of the complex step is 4x the
    real step's, as its matrix products are; by hand forward: Cholesky N^3/3 and the solve N^2 M."""
    from _profile_helpers import step_counts

    def by_op(dtype):
        torch.manual_seed(0)
        counts = step_counts(ComplexWhiten(dtype), (_tall(dtype),), train=train, warm=train)
        out: dict[str, float] = {}
        for (op, _), c in counts.items():
            out[op] = out.get(op, 0.0) + c.flops
        return out

    real, cplx = by_op(torch.float32), by_op(torch.complex64)
    if not train:
        assert real["aten::linalg_cholesky_ex"] == N**3 / 3 and real["aten::linalg_solve_triangular"] == N**2 * M
    for op in (*LINALG_ROWS, "aten::mm"):
        assert cplx[op] == pytest.approx(COMPLEX * real[op], rel=1e-12), op
    if train:
        assert cplx["aten::linalg_solve_triangular"] > COMPLEX * N**2 * M  # the backward's solves are in it


# --- formulas: reflector counts within the matrix ------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols,k", [(2, 3, 10), (4, 3, 5), (1, 1, 2)])
def test_householder_apply_refuses_more_reflectors_than_rows(rows, cols, k):
    """Round 23: householder_apply_flops(2, 3, 10) was -360 FLOPs."""
    with pytest.raises(LaunchError, match=rf"k={k} with rows={rows}"):
        formulas.householder_apply_flops(rows, cols, k)


@pytest.mark.parametrize("m,n,k", [(10, 1, 3), (1, 10, 3), (4, 4, 5)])
def test_householder_product_refuses_more_reflectors_than_columns(m, n, k):
    """Round 23: factorization_flops("householder_product", 10, 1, 3) was -42 FLOPs."""
    with pytest.raises(LaunchError, match=rf"k={k} with m={m}, n={n}"):
        formulas.factorization_flops("householder_product", m, n, k)


KINDS = ["cholesky", "lu", "inverse", "solve", "triangular_solve", "factored_solve", "qr", "eigh", "svd", "eig",
         "pinv", "pinv_hermitian", "lstsq", "householder_product", "ldl", "cholesky_inverse"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_factorisation_count_is_never_negative(kind):
    """Every kind over a grid of shapes it takes (k up to min(m, n) reflectors for the Householder product): a
    finite count >= 0, with and without vectors; householder_apply_flops likewise for k <= rows."""
    for m in range(0, 7):
        for n in range(0, 7):
            for k in range(0, (min(m, n) if kind == "householder_product" else 6) + 1):
                for vectors in (True, False):
                    flops = formulas.factorization_flops(kind, m, n, k, vectors=vectors)
                    assert math.isfinite(flops) and flops >= 0, (kind, m, n, k, vectors, flops)
                    if kind == "householder_product" and k <= m:
                        assert formulas.householder_apply_flops(m, n, k) >= 0, (m, n, k)


# --- metrics: a name to pair by --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "   "])
def test_compute_metrics_refuses_an_empty_name(name):
    """Round 23: compute_metrics(name='') made a Measurement that the store keeps and no compare can pair."""
    with pytest.raises(metrics.MetricsError, match=r"name=.*expected the kernel's name as a str \(not empty\)"):
        metrics.compute_metrics(name=name, latency_s=1e-3, flops=1.0, bytes_read=1.0, bytes_written=1.0)


def test_measure_refuses_an_empty_name_before_timing():
    calls = []
    with pytest.raises(metrics.MetricsError, match=r"name=''"):
        metrics.measure(lambda: calls.append(1), args_sets=None, flops=1.0, bytes_read=1.0, bytes_written=1.0,
                        name="", device="cpu", ceilings=False, repeats=3)
    assert calls == []


# --- energy: samples that mean something --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,arg", [
    ({"joules": -2.0, "seconds": 1.0, "valid": True}, "joules"),
    ({"joules": math.nan, "seconds": 1.0, "valid": True}, "joules"),
    ({"joules": "2", "seconds": 1.0, "valid": True}, "joules"),
    ({"joules": 2.0, "seconds": -1.0, "valid": True}, "seconds"),
    ({"joules": 2.0, "seconds": math.inf, "valid": True}, "seconds"),
    ({"joules": None, "seconds": 1.0, "valid": True}, "valid"),
    ({"joules": 2.0, "seconds": 1.0, "valid": "yes"}, "valid"),
])
def test_energy_window_refuses_what_is_no_energy(kwargs, arg):
    with pytest.raises(DeviceError, match=rf"EnergyWindow: {arg}="):
        energy.EnergyWindow(**kwargs)


@pytest.mark.parametrize("calls,idle,arg", [(0, None, "calls"), (-5, None, "calls"), (2.5, None, "calls"),
                                            (True, None, "calls"), (10, -1.0, "idle_power_w"),
                                            (10, math.nan, "idle_power_w")])
def test_energy_sample_refuses_bad_calls_and_idle_power(calls, idle, arg):
    """Round 23: calls=0 under a valid window raised ZeroDivisionError in joules_per_call; calls=-1 gave a negative
    energy per call; a negative idle power was stored."""
    with pytest.raises(DeviceError, match=rf"EnergySample: {arg}="):
        energy.EnergySample(energy.EnergyWindow(2.0, 1.0, True), calls, idle_power_w=idle)


def test_energy_sample_with_no_window_is_refused():
    with pytest.raises(DeviceError, match=r"EnergySample: window="):
        energy.EnergySample(2.0, 10)


def test_an_unmeasured_sample_keeps_zero_calls():
    """What measure_energy returns without a counter: no energy, 0 calls, every energy figure None (never 0)."""
    s = energy.EnergySample(energy.EnergyWindow(None, 0.0, False, "no energy counter: test"), 0)
    m = metrics.compute_metrics(name="k", latency_s=1e-3, flops=1e6, bytes_read=8.0, bytes_written=8.0, energy=s)
    assert (m.joules_per_call, m.avg_power_w, m.flops_per_joule, m.items_per_joule) == (None, None, None, None)
    assert "no energy counter" in m.energy_note


def test_energy_figures_by_hand():
    """2 J over 0.5 s and 1000 calls, 0.5 W idle: 2 mJ a call, 4 W, 1e9 FLOP / 2 mJ = 5e11 FLOP/J, 100 items a call
    -> 5e4 items/J, the energy above idle 2 mJ * (1 - 0.5/4)."""
    s = energy.EnergySample(energy.EnergyWindow(2.0, 0.5, True), 1000, idle_power_w=0.5)
    m = metrics.compute_metrics(name="k", latency_s=1e-3, flops=1e9, bytes_read=8.0, bytes_written=8.0, items=100,
                                energy=s)
    assert m.joules_per_call == pytest.approx(2e-3) and m.avg_power_w == pytest.approx(4.0)
    assert m.flops_per_joule == pytest.approx(5e11) and m.items_per_joule == pytest.approx(5e4)
    assert m.joules_above_idle_per_call == pytest.approx(2e-3 * (1 - 0.5 / 4.0))


class BackwardsMeter(energy.EnergyMeter):
    """An energy counter that goes back by 5 J between two reads (a driver reloaded mid-window)."""

    def __init__(self):
        self.index, self.reason, self._handle, self._reads = 98, "", object(), iter((10_000, 5_000))

    def energy_mj(self) -> int:
        return next(self._reads)


def test_a_counter_that_goes_back_gives_an_unmeasured_window():
    """Round 23: the window was valid with -5 J (a negative energy per call and FLOP per joule)."""
    with BackwardsMeter().window(min_window_s=0.0) as w:
        time.sleep(0.001)
    assert not w.result.valid and w.result.joules is None and "went back" in w.result.note


def test_profile_rows_on_a_cpu_carry_no_energy_never_zero():
    """A CPU profile has no energy counter: each row's energy figures are None (unknown), not 0."""
    torch.manual_seed(0)
    p = profile_cpu(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.randn(3, 4))
    assert p.ops
    for o in p.ops:
        assert (o.m.joules_per_call, o.m.avg_power_w, o.m.flops_per_joule) == (None, None, None), o.label


# --- the public profiler API: bad arguments named before any work -------------------------------------------------
class Calls(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(4, 4), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("device", ["tpu", "H100", "gpu", "cuda:-1", -1, "cpu:x"])
def test_profile_refuses_an_unknown_device_name_before_any_work(device):
    model = Calls()
    with pytest.raises(DeviceError, match=r"device="):
        profile.profile_model(model, torch.randn(2, 4), steps=1, warmup=0, device=device, ceilings=CEIL)
    assert model.calls == 0


@pytest.mark.parametrize("model,inputs,arg", [
    (None, torch.randn(2, 4), "model"), ("Linear", torch.randn(2, 4), "model"), (nn.Linear, torch.randn(2, 4), "model"),
    (torch.randn(2, 4), torch.randn(2, 4), "model"), (Calls(), 3, "inputs"), (Calls(), None, "inputs"),
    (Calls(), {torch.randn(2, 4)}, "inputs"), (Calls(), torch.randn(2, 4).numpy(), "inputs"),
])
def test_profile_names_a_bad_model_or_inputs_before_any_work(model, inputs, arg):
    with pytest.raises(profile.ProfileError, match=rf"\b{arg}="):
        profile.profile_model(model, inputs, steps=1, warmup=0, device="cpu", ceilings=CEIL)
    if isinstance(model, Calls):
        assert model.calls == 0


@pytest.mark.parametrize("steps", [-1, 0, 1.5, True])
def test_profile_refuses_a_bad_step_count_before_any_work(steps):
    model = Calls()
    with pytest.raises(profile.ProfileError, match=r"\bsteps="):
        profile.profile_model(model, torch.randn(2, 4), steps=steps, device="cpu", ceilings=CEIL)
    assert model.calls == 0


@pytest.mark.parametrize("call,arg", [
    (lambda: formulas.matmul(4, 4, 4, batch=-2), "batch"),
    (lambda: formulas.attention(-1, 2, 4, 4, 8), "batch"),
    (lambda: formulas.convolution((-2, 3, 8, 8), (4, 3, 3, 3), (-2, 4, 6, 6)), "x_shape"),
    (lambda: formulas.layernorm(-4, 8), "rows"),
    (lambda: formulas.fft_flops(-8), "points"),
    (lambda: formulas.elementwise(8, inputs=-1), "inputs"),
])
def test_formulas_name_a_negative_size(call, arg):
    with pytest.raises(LaunchError, match=rf"\b{arg}="):
        call()


def test_count_ops_and_detect_name_their_arguments():
    with pytest.raises(profile.ProfileError, match=r"step=.*expected a callable"):
        count_ops(torch.ones(3))
    with pytest.raises(DeviceError, match=r"device='tpu'"):
        perf.detect("tpu")


# --- reports and stored rows: bad arguments named before anything is drawn or written ------------------------------
def _m(name: str = "k") -> metrics.Measurement:
    return metrics.compute_metrics(name=name, latency_s=1e-3, flops=2e6, bytes_read=4e3, bytes_written=1e3,
                                   device="cpu-test", device_kind="cpu", dtype="fp32")


@pytest.mark.parametrize("call,fragment", [
    (lambda d: report.print_measurements([_m(), None]), r"print_measurements: ms holds NoneType None; .*ms\[1\]"),
    (lambda d: report.measurements_markdown([None]), r"measurements_markdown: ms holds NoneType"),
    (lambda d: report.roofline_png(_m(), d / "r.png"), r"roofline_png: ms is Measurement \(one: pass \[m\]\)"),
    (lambda d: report.roofline_png([None], d / "r.png"), r"roofline_png: ms holds NoneType"),
    (lambda d: report.roofline_png([_m()], 3), r"roofline_png: path=3 \(int\)"),
    (lambda d: report.html_report([_m()], None), r"html_report: path=None \(NoneType\)"),
    (lambda d: report.html_report([_m()], ""), r"html_report: path='' \(str\)"),
    (lambda d: report.html_report([_m(), None], d / "r.html"), r"html_report: ms holds NoneType"),
], ids=["print-none", "markdown-none", "png-one", "png-none", "png-path", "html-none-path", "html-empty-path",
        "html-none"])
def test_reports_name_a_bad_argument_before_writing(tmp_path, call, fragment):
    """Round 23: [None] passed the reports' check (a None element read as "no wrong element") and failed mid-table
    with an AttributeError; roofline_png took one Measurement ("not iterable"); html_report drew the whole report,
    then failed with a TypeError on path=None. Nothing is written."""
    with pytest.raises(metrics.MetricsError, match=fragment):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_reports_still_take_a_list_and_a_path(tmp_path):
    assert report.roofline_png([_m()], None)[:4] == b"\x89PNG"
    assert report.html_report([_m("a"), _m("b")], tmp_path / "r.html").read_text().count("<tr>") >= 3


def test_measurement_from_row_names_what_is_missing():
    """Round 23: from_row(None) raised AttributeError ('items'), a row without flops a TypeError listing __init__'s
    arguments. A whole row reads back as written."""
    m = _m()
    back = metrics.Measurement.from_row(m.to_row())
    assert (back.name, back.flops, back.bytes_read, back.latency_s, back.dtype) == ("k", 2e6, 4e3, 1e-3, "fp32")
    row = m.to_row()
    del row["flops"], row["device"]
    with pytest.raises(metrics.MetricsError, match=r"from_row: row lacks device, flops"):
        metrics.Measurement.from_row(row)
    with pytest.raises(metrics.MetricsError, match=r"from_row: row=None \(NoneType\); expected a mapping"):
        metrics.Measurement.from_row(None)


# --- FFT sample frequencies ------------------------------------------------------------------------------------------
FS_B, FS_L = 2, 16
FS_F = FS_L // 2 + 1  # rfft bins


class SpectralDerivative(nn.Module):
    """A learned gain per frequency times i*2*pi*f (a derivative in the Fourier domain), the frequencies by rfftfreq."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(FS_F))

    def forward(self, x):  # (B, L)
        f = torch.fft.rfftfreq(FS_L)  # (F,)
        spectrum = torch.fft.rfft(x) * (self.gain * f)  # (B, F) complex times real
        return torch.fft.irfft(spectrum * 1j, n=FS_L)


def test_fft_frequencies_are_counted_not_reported_uncounted():
    """Round 23: rfftfreq / fftfreq (aten::fft_rfftfreq) were a spectral model's only uncounted rows. Each is a
    scale per frequency (i / (n d)); the model by hand: rfftfreq F, the gain times f F, rfft 5 L log2 L / 2 per row,
    the complex-by-real multiply 2 per complex element, the multiply by 1j (a complex product of two complex
    operands, the scalar one of them: 6 per element; before round 23 2, as by a real number), irfft 5 L log2 L / 2
    per row and its 1/L scale per output."""
    assert _flops_of(lambda: torch.fft.fftfreq(10), "aten::fft_fftfreq") == 10
    assert _flops_of(lambda: torch.fft.rfftfreq(10, d=0.5), "aten::fft_rfftfreq") == 6
    torch.manual_seed(0)
    p = profile_cpu(SpectralDerivative(), torch.randn(FS_B, FS_L))
    assert p.unsupported == ()
    fft = 5 * FS_L * math.log2(FS_L) / 2
    by_hand = FS_F + FS_F + FS_B * fft + 2 * FS_B * FS_F + 6 * FS_B * FS_F + FS_B * fft + FS_B * FS_L
    assert p.flops == pytest.approx(by_hand, rel=1e-12)
    freq = next(o for o in p.ops if o.op == "aten::fft_rfftfreq")
    assert freq.counted and freq.m.flops == FS_F and freq.m.bytes_written == FS_F * 4


@pytest.mark.parametrize("call,op,per_element", [
    (lambda z: z * 1j, "aten::mul", formulas.COMPLEX_MUL_FLOPS),
    (lambda z: z.clone().mul_(0.5 - 2j), "aten::mul_", formulas.COMPLEX_MUL_FLOPS),
    (lambda z: z / (1 + 2j), "aten::div", formulas.COMPLEX_DIV_FLOPS),
    (lambda z: z * 2.0, "aten::mul", formulas.COMPLEX_ELEMENT_OVER_REAL),
    (lambda z: z + 1j, "aten::add", formulas.COMPLEX_ELEMENT_OVER_REAL),
    (lambda z: z.real * 1j, "aten::mul", formulas.COMPLEX_ELEMENT_OVER_REAL),
], ids=["mul-1j", "mul_-scalar", "div-scalar", "mul-real", "add-1j", "real-times-1j"])
def test_a_complex_scalar_is_a_complex_operand(call, op, per_element):
    """Round 23: z * 1j and z / (1 + 2j) were counted as products by a real number (2 per element), though a complex
    scalar makes them complex products (6) and quotients (11), as z * w of two complex tensors is; a real scalar, a
    complex add, and a real tensor times 1j stay 2 per complex element."""
    z = torch.randn(3, 4, dtype=torch.complex64)
    assert _flops_of(lambda: call(z), op) == per_element * 12


# --- loading a profile target ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [":mixer", ".relative:build", "..up"])
def test_load_target_names_a_module_path_it_cannot_import(target):
    """Round 23: an empty module name (":mixer") raised a bare ValueError, a relative one a bare TypeError."""
    from tilestack.perf import profile_render

    with pytest.raises(profile.ProfileError, match=r"target=.*cannot import module"):
        profile_render.load_target(target)


def test_load_target_reports_a_module_that_raises_while_loading(tmp_path, monkeypatch):
    """A module (not a script path) that raises at import: named with the target, as a script that raises is."""
    from tilestack.perf import profile_render

    (tmp_path / "r23_raises_on_import.py").write_text("raise RuntimeError('no weights here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(profile.ProfileError, match=r"target='r23_raises_on_import:build' raised RuntimeError while "
                                                   r"loading: no weights here"):
        profile_render.load_target("r23_raises_on_import:build")


# --- roofs by any name of a dtype -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "float32", torch.float32])
def test_roofs_for_takes_a_dtype_by_any_of_its_names(dtype):
    """Round 23: roofs_for(dev, ceilings, "float32") or torch.float32 found no roof, silently: a Measurement built on
    them read as bound "unknown" and carried the torch dtype object as its dtype. Under the synthetic ceilings (ridge
    10 FLOP/B) 1e6 FLOPs over 2e3 bytes are compute-bound."""
    roofs = metrics.roofs_for(perf.detect("cpu"), CEIL, dtype)
    assert roofs.dtype == "fp32" and roofs.measured.peak_flops_per_s == CEIL.matmul["fp32"]
    m = metrics.compute_metrics(name="k", latency_s=1e-3, flops=1e6, bytes_read=1e3, bytes_written=1e3, roofs=roofs)
    assert (m.dtype, m.bound) == ("fp32", "compute")


@pytest.mark.parametrize("dtype", ["fp7", 3, "float33"])
def test_roofs_for_refuses_a_dtype_of_no_name(dtype):
    with pytest.raises(metrics.MetricsError, match=r"dtype=.*for 'roofs_for'; expected a dtype's short name"):
        metrics.roofs_for(perf.detect("cpu"), CEIL, dtype)


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (2, 7, 4), (4, 4)])
def test_a_rectangular_lu_counts_its_panel(shape):
    """Round 23: an LU of a tall (m, n) matrix was counted as the n x n one's 2n^3/3, its m - n extra rows free;
    getrf's leading term is mn^2 - n^3/3 (a wide matrix as its transpose), 2n^3/3 when square."""
    a = torch.randn(*shape)
    m, n = max(shape[-2:]), min(shape[-2:])
    batch = math.prod(shape[:-2])
    want = batch * (m * n**2 - n**3 / 3)
    assert _flops_of(lambda: torch.linalg.lu_factor(a), "aten::linalg_lu_factor_ex") == pytest.approx(want, rel=1e-12)
    assert _flops_of(lambda: torch.linalg.lu(a), "aten::linalg_lu") == pytest.approx(want, rel=1e-12)
    assert formulas.factorization_flops("lu", *shape[-2:]) == pytest.approx(m * n**2 - n**3 / 3, rel=1e-12)


B3 = 3  # a batch of matrices


@pytest.mark.parametrize("call,op,want", [
    (lambda a, b: torch.linalg.solve(a, b[:, 0]), "aten::_linalg_solve_ex", B3 * (2 * N**3 / 3 + 2 * N**2)),
    (lambda a, b: torch.linalg.solve(a, b), "aten::_linalg_solve_ex", B3 * (2 * N**3 / 3 + 2 * N**2 * K)),
    (lambda a, b: torch.linalg.solve(a[0], b.expand(B3, N, K).clone()), "aten::_linalg_solve_ex",
     2 * N**3 / 3 + B3 * 2 * N**2 * K),
    (lambda a, b: torch.linalg.solve(a, b.T.expand(B3, K, N).clone(), left=False), "aten::_linalg_solve_ex",
     B3 * (2 * N**3 / 3 + 2 * N**2 * K)),
    (lambda a, b: torch.linalg.lu_solve(*torch.linalg.lu_factor(a), b), "aten::linalg_lu_solve", B3 * 2 * N**2 * K),
    (lambda a, b: torch.linalg.solve_triangular(a.triu(), b, upper=True), "aten::linalg_solve_triangular",
     B3 * N**2 * K),
    (lambda a, b: torch.cholesky_solve(b, torch.linalg.cholesky(a)), "aten::cholesky_solve", B3 * 2 * N**2 * K),
], ids=["vector", "matrix", "one-matrix-many-b", "left-false", "lu_solve", "solve_triangular", "cholesky_solve"])
def test_right_hand_sides_broadcast_over_a_batch_of_matrices(call, op, want):
    """Round 23: k was b's elements over a's batch, so (B, N, N) matrices against one (N, K) right-hand side counted
    0 columns (lu_solve, solve_triangular, cholesky_solve: 0 FLOPs, silently; solve: its LU alone). Each of the B
    systems solves K columns; a single matrix against B right-hand sides is factored once."""
    a = torch.stack([_spd(torch.float32)] * B3)  # (B, N, N)
    b = _rhs(torch.float32)  # (N, K), unbatched
    assert _flops_of(lambda: call(a, b), op) == pytest.approx(want, rel=1e-12)
