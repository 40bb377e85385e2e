import base64
import io
import re
from html.parser import HTMLParser

import matplotlib.image as mpimg
import numpy as np

from tilestack.perf import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Parsed(HTMLParser):
    """The text, table cells and images of an HTML file."""

    def __init__(self):
        super().__init__()
        self.text, self.cells, self.images, self.links, self._cell = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("td", "th"):
            self._cell = ""
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("href", "src"):
            if a.get(key, "").startswith(("http:", "https:", "//")):
                self.links.append(a[key])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell += data


def _png(src: str) -> np.ndarray:
    data = base64.b64decode(src.removeprefix("data:image/png;base64,"))
    assert data.startswith(PNG_MAGIC)
    return mpimg.imread(io.BytesIO(data), format="png")


def test_html_report_is_self_contained_and_holds_every_kernel(tmp_path, measurements, h100, h100_ceilings):
    path = report.html_report(measurements, tmp_path / "out" / "report.html", device=h100, ceilings=h100_ceilings,
                              versions={"torch": "2.11"}, title="H100 check")
    html = path.read_text()
    p = Parsed()
    p.feed(html)
    assert p.links == [] and "<script" not in html  # nothing fetched when opened
    assert "gemm" in p.cells and "rmsnorm" in p.cells and "BM=128, BN=128" in p.cells
    assert "compute" in p.cells and "memory" in p.cells
    assert any(c.startswith("memory-bound at 50% of bandwidth") for c in p.cells)  # the tips table
    assert "NVIDIA H100 80GB HBM3" in p.cells and "3.02 TB/s" in p.cells  # device section
    assert "torch" in p.cells and "2.11" in p.cells
    (src,) = p.images
    img = _png(src)
    assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0.01  # a drawn plot, not a blank


def test_roofline_png_draws_measured_and_published_roofs(tmp_path, measurements, h100, h100_ceilings):
    lines = report.roof_lines(measurements, h100, h100_ceilings)
    assert [(ln.label, ln.published) for ln in lines] == [("measured bf16", False), ("published bf16", True)]
    assert lines[1].peak_flops_per_s == h100.spec.peak("bf16")
    data = report.roofline_png(measurements, tmp_path / "roof.png", device=h100, ceilings=h100_ceilings)
    assert (tmp_path / "roof.png").read_bytes() == data and data.startswith(PNG_MAGIC)
    # Without device or ceilings the roofs come from the stored rows themselves.
    assert [ln.label for ln in report.roof_lines(measurements)] == ["measured bf16", "published bf16"]


def test_zero_flop_kernels_are_listed_not_plotted(tmp_path, measurements):
    import dataclasses

    copy = dataclasses.replace(measurements[1], name="copy", flops=0)
    report.roofline_png([*measurements, copy], tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_terminal_table_and_tips(measurements):
    from rich.console import Console

    con = Console(record=True, width=250)
    report.print_measurements(measurements, title="t", con=con)
    out = con.export_text()
    assert "gemm" in out and "600 TFLOP/s" in out and "79% / 61%" in out
    assert re.search(r"rmsnorm BLOCK=1024: memory-bound at 50%", out)


def test_formatting():
    assert report.si(3.02e12, "B/s") == "3.02 TB/s" and report.si(None) == "-" and report.si(float("inf")) == "inf"
    assert report.seconds(2.5e-5) == "25 us" and report.seconds(1.5) == "1.5 s" and report.pct(0.456) == "46%"
    md = report.measurements_markdown([])
    assert md.splitlines()[0].startswith("| kernel |")


def test_names_with_brackets_survive_rich(measurements):
    import dataclasses

    from rich.console import Console

    m = dataclasses.replace(measurements[0], name="torch.sdpa[flash]", config={"backend": "[cudnn]"})
    con = Console(record=True, width=250)
    report.print_measurements([m], title="sdpa [bold]", con=con)
    con.print(report.comparison_table(type("C", (), {"a_label": "[a]", "b_label": "b", "rows": []})()))
    out = con.export_text()
    assert "torch.sdpa[flash]" in out and "backend=[cudnn]" in out and "sdpa [bold]" in out and "A = [a]" in out
