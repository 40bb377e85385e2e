"""``tilestack train`` end to end on 2 gloo processes, and its refusal of a bad layout before spawning."""

from typer.testing import CliRunner

from tilestack.cli import _register, app

_register()


def test_train_dp2_tp_off_runs_and_reports():
    res = CliRunner().invoke(app, ["train", "--nproc", "2", "--dp", "2", "--zero", "1", "--steps", "3",
                                   "--batch", "4", "--seq", "16", "--no-store"])
    assert res.exit_code == 0, res.output
    assert "2 ranks" in res.output and "tokens/s" in res.output and "MFU: no published peak" in res.output


def test_train_stores_its_result(tmp_path):
    from tilestack import config
    from tilestack.perf.store import Store
    with config.override(cache_dir=tmp_path):
        res = CliRunner().invoke(app, ["train", "--nproc", "2", "--pp", "2", "--microbatches", "2", "--steps", "3",
                                       "--batch", "2", "--seq", "8"])
        assert res.exit_code == 0, res.output
        with Store() as st:
            (m,) = st.measurements("latest")
    assert m.name == "train/pp2" and m.items == 2 * 8 / 2 and m.latency_s > 0 and m.config["nproc"] == 2


def test_train_refuses_degrees_that_do_not_fit():
    res = CliRunner().invoke(app, ["train", "--nproc", "2", "--tp", "3"])
    assert res.exit_code != 0
    assert "expected the world size 2" in str(res.exception)
