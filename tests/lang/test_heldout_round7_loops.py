"""Round 7 of held-out kernels, continued (see test_heldout_round7.py's docstring): what a ts.range loop carries when
the kernel is written with Python's own idioms. Running sums, products, hashes and masks by augmented assignments
(`s += x`, `h <<= 1`, `seen |= big`), and the rebindings whose Python meaning a body traced once cannot have
(`acc = acc + x`, `off += 1` on a Python number) refused, naming the name; names the body binds afresh still trace.

Bugs these found, fixed in the compiler, each kept here as its regression test:
- language: `acc += x` on a tile made a new tile and bound the name to it, so in a ts.range loop nothing was carried
  and every trip added to the value from before the loop, silently; augmented assignments write their tile in place
  now, as NumPy's and torch's (lang.tiles.Tile._inplace): test_augmented_assignments_are_carried_by_loops;
- language: `acc = acc + x` (or `off = off + 1` of an index Scalar) in a loop body ran the same wrong way, silently;
  the loop refuses a name bound in its body to a value made from that name's old value, naming it and saying what to
  write (lang.control._refuse_rebinding): test_rebinding_a_name_from_itself_in_a_loop_is_refused;
- language: a Python number updated from itself in a loop body (`off = 0` before, `off += 1` in it: Triton's pointer
  increment) changed once, when the body was traced, silently; refused naming it, from the loop body's source
  (lang.control._refuse_python_counters): test_a_python_number_updated_from_itself_in_a_loop_is_refused.
"""

import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, I8, I32, close, ints, launch, meta, randn
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts
from tilestack.errors import TraceError

POISON = -77.0


def poisoned(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, POISON, dtype=dtype)


# ---- 1. augmented assignments write their tile, so a loop carries them; `acc = acc + x` in a loop is refused ---------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def running_sugar(X, I, S, P, H, A, *, BM: int = 8, BN: int = 8):
    """Over column tiles j, stored after each: S = running sum (+=), P = running product of 0.5 + x / 8 (*=),
    H = running hash of I (h = (h << 1 | h >>> 31) ^ i on i32, by <<= >>= |= ^= &=), A = any x > 1 so far (|=)."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    k = ts.RegTile[ts.i32, BM, BN]()
    s = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[ts.f32, BM, BN]()
    h = ts.RegTile[ts.i32, BM, BN]()
    top = ts.RegTile[ts.i32, BM, BN]()
    big = ts.RegTile[ts.bool_, BM, BN]()
    seen = ts.RegTile[ts.bool_, BM, BN]()
    a = ts.RegTile[ts.i8, BM, BN]()
    ts.zero(s)
    ts.one(p)
    ts.zero(h)
    ts.fill(seen, 0)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.load(k, I, at=(i, j))
        s += x
        p *= x / 8.0 + 0.5
        ts.copy(top, h)
        top >>= 31
        top &= 1                                      # the logical shift right by 31: the top bit
        h <<= 1
        h |= top
        h ^= k
        ts.gt(big, x, 1.0)
        seen |= big
        ts.copy(a, seen)
        ts.store(S, s, at=(i, j))
        ts.store(P, p, at=(i, j))
        ts.store(H, h, at=(i, j))
        ts.store(A, a, at=(i, j))


def running_sugar_want(x: torch.Tensor, k: torch.Tensor, BN: int = 8):
    """The four outputs of running_sugar, column tile by column tile (columns past the edge read 0)."""
    M, N = x.shape
    nb = -(-N // BN)
    xb = F.pad(x.double(), (0, nb * BN - N)).reshape(M, nb, BN)
    kb = F.pad(k.long(), (0, nb * BN - N)).reshape(M, nb, BN)
    s = xb.cumsum(1)
    p = (xb / 8 + 0.5).cumprod(1)
    a = (xb > 1).to(torch.int64).cummax(1).values
    h, hs = torch.zeros(M, BN, dtype=torch.int64), []
    for j in range(nb):
        h = (((h << 1) | (h >> 31)) & 0xFFFFFFFF) ^ (kb[:, j] & 0xFFFFFFFF)
        hs.append(h)
    hw = torch.stack(hs, 1)
    hw = torch.where(hw >= 2**31, hw - 2**32, hw)
    return [t.reshape(M, nb * BN)[:, :N] for t in (s, p, hw, a)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(8, 40), (11, 19), (1, 1), (0, 3)])
def test_augmented_assignments_are_carried_by_loops(backend, M, N, rng):
    x = randn(rng, M, N) * 2
    k = ints(rng, -2**31, 2**31, (M, N), I32)
    outs = poisoned(M, N), poisoned(M, N), torch.full((M, N), -5, dtype=I32), torch.full((M, N), -5, dtype=I8)
    launch(running_sugar, backend, x, k, *outs)
    s, p, h, a = running_sugar_want(x, k)
    close(outs[0], s.float(), scale=10)
    close(outs[1], p.float(), scale=10)
    assert torch.equal(outs[2], h.int())
    assert torch.equal(outs[3], a.to(I8))


def _rebind_tile(X):
    acc = ts.RegVec[ts.f32, 8]()
    x = ts.RegVec[ts.f32, 8]()
    ts.zero(acc)
    for j in ts.range(X.shape[0]):
        ts.load(x, X, at=(j,))
        acc = acc + x
        ts.store(X, acc, at=(j,))


def _rebind_scalar(X):
    x = ts.RegVec[ts.f32, 8]()
    off = ts.block_id(0) * 4
    for _ in ts.range(X.shape[0]):
        off = off + 1
        ts.load(x, X, at=(off,))
        ts.store(X, x, at=(0,))


def _rebind_in_an_inner_loop(X):
    acc = ts.RegVec[ts.f32, 8]()
    ts.zero(acc)
    for _ in ts.range(2):
        for _ in ts.range(3):
            acc = acc * 2.0
        ts.store(X, acc, at=(0,))


def _python_counter(X):
    x = ts.RegVec[ts.f32, 8]()
    off = 0
    for _ in ts.range(X.shape[0]):
        ts.load(x, X, at=(off,))
        ts.store(X, x, at=(off + 1,))
        off += 1                                      # (Triton's pointer increment, as a tile coordinate)


def _python_pair(X):
    x = ts.RegVec[ts.f32, 8]()
    ts.zero(x)
    a, b = 0, 1
    for _ in ts.range(X.shape[0]):
        a, b = b, a + b
        ts.store(X, x, at=(a,))


def _python_numbers_the_body_binds_afresh(X):
    """Python numbers bound in the body each trip (a counter reset, an unrolled loop's variable): traced as written."""
    x = ts.RegVec[ts.f32, 8]()
    k, c, s = 5, 7, 1
    for j in ts.range(X.shape[0]):
        k = 0
        for c in range(2):
            k += c
        s = 1
        while s < 4:
            s *= 2
        ts.load(x, X, at=(j + k + s,))
        ts.store(X, x, at=(j,))


def _rebound_names_that_carry_nothing(X):
    """Names bound again in a loop to values that do not come from their old ones: traced as written."""
    acc = ts.RegVec[ts.f32, 8]()
    ts.zero(acc)
    s = ts.block_id(0) * 2
    for j in ts.range(X.shape[0]):
        s = j % 2                                     # a new scalar under an old name, from the counter alone
        acc = ts.RegVec[ts.f32, 8]()                  # a new tile under an old name
        ts.load(acc, X, at=(j + s,))
        acc += acc
        ts.store(X, acc, at=(j,))
    for j in ts.range(X.shape[0]):                    # the counter's name again
        ts.zero(acc)
        ts.store(X, acc, at=(j,))


@pytest.mark.parametrize(("body", "name"), [(_rebind_tile, "acc"), (_rebind_scalar, "off"),
                                            (_rebind_in_an_inner_loop, "acc")])
def test_rebinding_a_name_from_itself_in_a_loop_is_refused(body, name):
    """(Before, each traced silently and ran as if the body saw the value from before the loop on every trip.)"""
    k = ts.kernel(body, grid=lambda X: (1,))
    with pytest.raises(TraceError, match=rf"test_heldout_round7_loops.py:\d+: `{name}` is bound in this loop's body to "
                                         r"a new value made from its value before.*not Python names"):
        k.trace(ts.ArgSpec(ts.f32, 1))


@pytest.mark.parametrize(("body", "name", "value"), [(_python_counter, "off", 0), (_python_pair, "a", 0)])
def test_a_python_number_updated_from_itself_in_a_loop_is_refused(body, name, value):
    """(Before, `off += 1` changed off once, when the body was traced: every trip read and wrote the same tiles.)"""
    k = ts.kernel(body, grid=lambda X: (1,))
    with pytest.raises(TraceError, match=rf"test_heldout_round7_loops.py:\d+: `{name}` is a Python number \({value}\) "
                                         r"that this loop's body updates from itself"):
        k.trace(ts.ArgSpec(ts.f32, 1))


@pytest.mark.parametrize("body", [_rebound_names_that_carry_nothing, _python_numbers_the_body_binds_afresh])
def test_names_bound_afresh_in_a_loop_are_traced(body):
    ts.kernel(body, grid=lambda X: (1,)).trace(ts.ArgSpec(ts.f32, 1))


# ---- 2. the kernel above compiled for Hopper (sm_90a) on this CPU, by Triton and by Gluon ----------------------------
RUNNING_SUGAR = (running_sugar, (meta(4096, 4096), meta(4096, 4096, dtype=I32), meta(4096, 4096), meta(4096, 4096),
                                 meta(4096, 4096, dtype=I32), meta(4096, 4096, dtype=I8)), dict(BM=32, BN=64))


def test_compiles_for_sm90a_with_triton():
    check_triton_sm90a(*RUNNING_SUGAR)


def test_compiles_for_sm90a_with_gluon():
    compile_gluon_sm90a(*RUNNING_SUGAR)
