"""The IR printed readably: one instruction a line, loop bodies indented, the user's names and lines."""

import pathlib

import tilestack.lang as ts

HERE = pathlib.Path(__file__)


def line_of(marker: str) -> str:
    hits = [n for n, text in enumerate(HERE.read_text().splitlines(), 1) if text.endswith(f"# {marker}")]
    assert len(hits) == 1, hits
    return f"{HERE.name}:{hits[0]}"


@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def gemm(A, B, C, *, BM: int = 32, BN: int = 32, BK: int = 16):
    i, j = ts.block_id(0), ts.block_id(1)
    acc = ts.RegTile[ts.f32, BM, BN]()
    a_tile = ts.SharedTile[A.dtype, BM, BK]()
    b_tile = ts.SharedTile[B.dtype, BK, BN]()
    ts.zero(acc)  # P:zero
    for k in ts.range(ts.cdiv(A.shape[1], BK)):  # P:range
        ts.load(a_tile, A, at=(i, k))  # P:load-a
        ts.load(b_tile, B, at=(k, j))
        ts.mma_AB(acc, a_tile, b_tile, acc)  # P:mma
    ts.store(C, acc, at=(i, j))  # P:store


def printed() -> list[str]:
    traced = gemm.trace(ts.ArgSpec(ts.bf16, 2), ts.ArgSpec(ts.bf16, 2), ts.ArgSpec(ts.f32, 2))
    return str(traced.ir).splitlines()


def the_line(lines: list[str], *parts: str) -> str:
    hits = [x for x in lines if all(p in x for p in parts)]
    assert len(hits) == 1, (parts, hits)
    return hits[0]


def test_header_names_the_kernel_params_and_constants():
    lines = printed()
    assert lines[0] == ("kernel gemm(A: Global[bf16, rank 2], B: Global[bf16, rank 2], C: Global[f32, rank 2]) "
                        "[BM=32, BN=32, BK=16]")
    assert lines[1].startswith("  grid = (%")


def test_each_op_names_the_users_variable_type_and_line():
    lines = printed()
    zero = the_line(lines, "= fill")
    assert zero.lstrip().startswith("%acc") and zero.endswith(f"# {line_of('P:zero')}")
    assert "RegTile[f32, 32, 32]" in zero
    load_a = the_line(lines, "= load", "SharedTile[bf16, 32, 16]")
    assert load_a.lstrip().startswith("%a_tile") and load_a.endswith(f"# {line_of('P:load-a')}")
    mma = the_line(lines, "= mma")
    assert mma.lstrip().startswith("%acc") and "trans_a=False trans_b=False" in mma
    assert "%a_tile" in mma and "%b_tile" in mma and mma.endswith(f"# {line_of('P:mma')}")
    store = the_line(lines, "store(")
    assert store.lstrip().startswith("store(%C") and store.endswith(f"# {line_of('P:store')}")


def test_tile_values_show_their_buffer():
    lines = printed()
    # every version of the accumulator (fill, loop result, mma) is a value of one buffer, named after it
    for marker in ("= fill", "= range(", "= mma"):
        assert the_line(lines, marker).rstrip().split(" # ")[0].rstrip().endswith("#acc"), marker
    assert the_line(lines, "= load", "SharedTile[bf16, 32, 16]").split(" # ")[0].rstrip().endswith("#a_tile")


def test_loop_body_is_indented_with_its_carried_values():
    lines = printed()
    rng = the_line(lines, "= range(")
    assert rng.lstrip().startswith("%acc") and rng.endswith(f"# {line_of('P:range')}")
    i = lines.index(rng)
    indent = len(rng) - len(rng.lstrip())
    body = lines[i + 1]
    assert body.strip().startswith("^body(%k") and ", %acc" in body   # the loop index (the user's `k`), then the tile
    mma = the_line(lines, "= mma")
    assert len(mma) - len(mma.lstrip()) > indent
    yields = [x for x in lines if x.strip().startswith("yield(%acc")]
    assert len(yields) == 1 and lines.index(yields[0]) > lines.index(mma)
    store = the_line(lines, "store(")
    assert len(store) - len(store.lstrip()) == indent
