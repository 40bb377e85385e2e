"""`tilestack tune`: the plan (--dry-run), bad options named, no GPU refused, and a tiny run on Triton's
interpreter (hidden --small) writing the user's table, a shippable table and the report."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tilestack import config
from tilestack.cli import _register, app
from tilestack.tune.cache import Table, launch_kwargs

_register()
runner = CliRunner()


def test_dry_run_lists_the_problems_most_valuable_first():
    res = runner.invoke(app, ["tune", "--dry-run", "-k", "gemm", "-k", "softmax", "--dtype", "bfloat16",
                              "--budget-s", "60"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if "│" in ln]
    assert "12 problems, 60 s" in res.output               # 4 square GEMMs, 1 short-K GEMM, 7 softmax
    assert "gemm" in lines[0] and "4096" in lines[0] and "gemm" in lines[1] and "8192" in lines[1]
    assert sum("softmax" in ln for ln in lines) == 7


def test_dry_run_filters_by_size_and_head_dim():
    res = runner.invoke(app, ["tune", "--dry-run", "-k", "attention_fwd", "--head-dim", "64", "--size", "1024"])
    assert res.exit_code == 0, res.output
    assert "4 problems" in res.output                     # causal or not, bf16 and fp16
    assert res.output.count("D64") == 4 and "D128" not in res.output


@pytest.mark.parametrize("args,message", [
    (["-k", "conv2d"], "kernels ['conv2d'] are not tunable"),
    (["--dtype", "float32"], "dtypes ['float32']"),
    (["-k", "gemm", "--size", "3"], "no problem matches"),
    (["--budget-s", "0"], "--budget-s must be > 0"),
])
def test_bad_options_are_named(args, message):
    res = runner.invoke(app, ["tune", "--dry-run", *args])
    assert res.exit_code == 2 and message in res.output.replace("\n", " ").replace("│", ""), res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_no_gpu_is_refused_with_a_reason():
    res = runner.invoke(app, ["tune", "-k", "gemm", "--budget-s", "5"])
    assert res.exit_code == 2 and "on a CUDA GPU" in res.output


def test_a_tiny_run_on_the_interpreter_writes_every_table(tmp_path):
    out, report = tmp_path / "tables", tmp_path / "report.json"
    with config.override(cache_dir=tmp_path / "cache"):
        res = runner.invoke(app, ["tune", "--small", "--as-device", "sm89-128sm-99kb", "-k", "gemm", "--dtype",
                                  "bfloat16", "--size", "48", "--budget-s", "3", "--ship", "--out", str(out),
                                  "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "1 of 1 problems tuned" in res.output
    user = Table.read(tmp_path / "cache" / "tuned" / "sm89-128sm-99kb.json")
    [(k, entry)] = user.entries.items()
    assert k == "gemm|bfloat16|64" and entry["seconds"] > 0
    shipped = Table.read(out / "gemm_sm89-128sm-99kb_interpreter.json")
    assert shipped.entries == user.entries and str(shipped.device) == "sm89-128sm-99kb"
    rows = json.loads(report.read_text())["problems"]
    assert len(rows) == 1 and rows[0]["config"] == launch_kwargs(entry) and rows[0]["tried"] >= 1


def test_missing_plans_only_what_the_gpus_own_tables_lack(tmp_path):
    """--missing: problems with no entry in this device's own tables (the H100's entries, of the same key, do not
    count for an H200). Planned here for the H200 from a CPU."""
    from tilestack.tune.cache import TABLES
    from tilestack.tune.cache import key as entry_key
    from tilestack.tune.library import library_problems

    have = {k for p in TABLES.glob("*.json") if (t := Table.read(p)).device.name == "NVIDIA H200" for k in t.entries}
    want = [p for p in library_problems(["gemm", "softmax"]) if entry_key(p.kernel, p.signature, p.bucket) not in have]
    with config.override(cache_dir=tmp_path / "cache"):
        res = runner.invoke(app, ["tune", "--dry-run", "--missing", "--as-device", "sm90-132sm-227kb:NVIDIA H200",
                                  "-k", "gemm", "-k", "softmax"])
    assert res.exit_code == 0, res.output
    if not want:
        assert "nothing to tune" in res.output
        return
    rows = [ln for ln in res.output.splitlines() if "│" in ln]
    assert len(rows) == len(want)
    assert [r.split("│")[4].strip() for r in rows] == [str(p.bucket) for p in want]


def test_as_device_with_an_empty_name_is_refused_naming_the_option():
    res = CliRunner().invoke(app, ["tune", "--dry-run", "--missing", "--as-device", "sm90-132sm-227kb:  ", "-k", "gemm"])
    assert res.exit_code == 2
    assert "--as-device" in res.output and "empty device name" in res.output
