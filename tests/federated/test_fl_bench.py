"""`tilestack fl bench` on a tiny grid: every cell runs, the table and the plot land in the document, twice."""

import pytest
from typer.testing import CliRunner

import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
from tilestack.cli import app
from tilestack.federated.bench import END_MARK, START_MARK, BenchSpec, run_bench, write_report


def test_bench_runs_every_cell_and_writes_the_table_between_markers(tmp_path):
    spec = BenchSpec(tasks=("blobs",), partitions=("iid", "dir0.1"), profiles=("stragglers",),
                     methods=("fedavg", "qfedavg"), seeds=(0, 1), clients=6, per_round=3, rounds=2,
                     local_steps=2)  # fmt: skip
    cells = run_bench(spec, workers=1)
    assert len(cells) == 8 and {(c.partition, c.method, c.seed) for c in cells} == {
        (p, m, s) for p in ("iid", "dir0.1") for m in ("fedavg", "qfedavg") for s in (0, 1)
    }
    assert all(0.0 <= c.test_acc <= 1.0 and 0.0 <= c.worst10 <= c.test_acc + 0.5 and c.bytes_up > 0 for c in cells)
    doc = tmp_path / "federated.md"
    doc.write_text("# Federated\n\nintro\n")
    write_report(spec, cells, doc, tmp_path / "img", seconds=1.0)
    write_report(spec, cells, doc, tmp_path / "img", seconds=2.0)  # replaces its own section
    text = doc.read_text()
    assert text.startswith("# Federated\n\nintro\n") and text.count(START_MARK) == 1 and text.count(END_MARK) == 1
    assert "| fedavg |" in text and "| qfedavg |" in text and "dir0.1" in text and "2 s on" in text
    assert (tmp_path / "img" / "fl_bench.png").stat().st_size > 5000


def test_bench_arguments_are_checked():
    with pytest.raises(ValueError, match="methods=\\('fedsgd',\\)"):
        BenchSpec(methods=("fedsgd",))
    with pytest.raises(ValueError, match="per_round=9"):
        BenchSpec(clients=4, per_round=9)
    res = CliRunner().invoke(app, ["fl", "bench", "--size", "huge"], env={"COLUMNS": "200"})
    assert res.exit_code != 0 and "size='huge'" in res.output
