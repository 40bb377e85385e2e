import os
import stat
import sys
from pathlib import Path

import pytest

from tilestack.perf import ncu

HEADER = ['"ID"', '"Process ID"', '"Process Name"', '"Host Name"', '"Kernel Name"', '"Context"', '"Stream"',
          '"Block Size"', '"Grid Size"', '"Device"', '"CC"', '"gpu__time_duration.sum"',
          '"sm__throughput.avg.pct_of_peak_sustained_elapsed"',
          '"gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"', '"dram__bytes_read.sum"',
          '"dram__bytes_write.sum"', '"launch__registers_per_thread"']
UNITS = ['""'] * 11 + ['"nsecond"', '"%"', '"%"', '"byte"', '"Kbyte"', '"register/thread"']
ROWS = [
    ['"0"', '"42"', '"python3"', '"localhost"', '"flash_fwd_kernel"', '"1"', '"7"', '"(128, 1, 1)"',
     '"(64, 16, 1)"', '"0"', '"9.0"', '"200,000"', '"81.5"', '"40.25"', '"1000000"', '"500"', '"168"'],
    ['"1"', '"42"', '"python3"', '"localhost"', '"flash_fwd_kernel"', '"1"', '"7"', '"(128, 1, 1)"',
     '"(64, 16, 1)"', '"0"', '"9.0"', '"100000"', '"60"', '"70"', '"3000000"', '"n/a"', '"168"'],
]
CSV = "\n".join([
    "==PROF== Connected to process 42",
    ",".join(HEADER), ",".join(UNITS), *(",".join(r) for r in ROWS),
])


def test_parse_raw_csv_in_base_units():
    k0, k1 = ncu.parse_raw_csv(CSV)
    assert k0.name == "flash_fwd_kernel" and k0.block_size == "(128, 1, 1)"
    assert k0.duration_s == pytest.approx(200e-6)  # "200,000" ns, thousands separator dropped
    assert k0.sm_throughput_pct == 81.5 and k0.memory_throughput_pct == 40.25
    assert k0.dram_bytes == pytest.approx(1_000_000 + 500_000)  # 500 Kbyte written
    assert k1.dram_bytes_written is None and k1.dram_bytes == 3_000_000
    assert k0.registers_per_thread == 168 and k0.l2_bytes is None


def test_summary_weights_percentages_by_time():
    s = ncu.NcuResult(ncu.parse_raw_csv(CSV), ["ncu"]).summary()
    assert s["launches"] == 2 and s["duration_s"] == pytest.approx(300e-6)
    assert s["sm_throughput_pct"] == pytest.approx((81.5 * 2 + 60) / 3)
    assert s["dram_bytes"] == pytest.approx(4.5e6)


def test_command_keeps_real_clocks_and_filters():
    cmd = ncu.build_command(["python", "x.py"], export="/tmp/r", kernel_regex="flash", nvtx_include="tilestack:a/",
                            launch_skip=3, launch_count=2)
    assert cmd[cmd.index("--clock-control") + 1] == "none"
    assert cmd[cmd.index("--kernel-name") + 1] == "regex:flash"
    assert cmd[cmd.index("--nvtx-include") + 1] == "tilestack:a/" and "--nvtx" in cmd
    assert cmd[cmd.index("--launch-skip") + 1] == "3" and cmd[-2:] == ["python", "x.py"]
    with pytest.raises(ncu.NcuError, match="launch_count=0"):
        ncu.build_command(["x"], export="r", launch_count=0)


def test_no_ncu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ncu, "find_ncu", lambda: None)
    with pytest.raises(ncu.NcuError, match="not on PATH"):
        ncu.run(["python", "x.py"])


def _fake_ncu(tmp_path: Path, profile_body: str) -> None:
    """An `ncu` on PATH: profiling runs ``profile_body``; ``--import`` prints the CSV above."""
    (tmp_path / "out.csv").write_text(CSV)
    script = tmp_path / "bin" / "ncu"
    script.parent.mkdir()
    script.write_text(f"""#!/bin/sh
case " $* " in
  *" --import "*) cat {tmp_path / 'out.csv'} ;;
  *) {profile_body} ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_counters_not_permitted(on_path):
    _fake_ncu(on_path, 'echo "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission"; exit 1')
    with pytest.raises(ncu.NcuPermissionError, match="NVreg_RestrictProfilingToAdminUsers=0"):
        ncu.run([sys.executable, "-c", "pass"])


def test_no_kernel_matched(on_path):
    _fake_ncu(on_path, 'echo "==WARNING== No kernels were profiled."; exit 0')
    with pytest.raises(ncu.NcuError, match="profiled no kernel"):
        ncu.run([sys.executable, "-c", "pass"], kernel_regex="nothing")


def test_run_and_fold(on_path, measurements):
    _fake_ncu(on_path, "exit 0")
    res = ncu.run([sys.executable, "-c", "pass"], kernel_regex="flash")
    assert len(res.kernels) == 2 and "--clock-control" in res.command
    m = ncu.fold(measurements[0], res)
    assert m.ncu["sm_throughput_pct"] == pytest.approx(res.summary()["sm_throughput_pct"])
    from tilestack.perf import report

    assert "SM SOL 74%" in report.ncu_summary(m.ncu)


def test_parse_the_long_details_layout_too():
    head = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
            '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')
    row = '"{id}","1","p","h","{k}","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0","s","{m}","{u}","{v}"'
    text = "\n".join([head,
                      row.format(id=0, k="k0", m="gpu__time_duration.sum", u="usecond", v="12.5"),
                      row.format(id=0, k="k0", m="dram__bytes_read.sum", u="Mbyte", v="2"),
                      row.format(id=1, k="k1", m="sm__throughput.avg.pct_of_peak_sustained_elapsed", u="%",
                                 v="55")])
    k0, k1 = ncu.parse_raw_csv(text)
    assert k0.name == "k0" and k0.duration_s == pytest.approx(12.5e-6) and k0.dram_bytes_read == 2e6
    assert k1.sm_throughput_pct == 55 and k1.duration_s is None and k1.grid_size == "(8, 1, 1)"
