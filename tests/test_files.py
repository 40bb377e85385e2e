"""tilestack.files: every file tilestack writes is written whole or not at all (caches, tables, checkpoints,
records, reports, figures), through one function."""

import os
import stat
import subprocess
import sys

import pytest

from tilestack.files import sweep_dead_temporaries, write_atomic, write_figure


def _dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(out.stdout)


def test_writes_text_and_bytes_and_makes_the_folder(tmp_path):
    p = write_atomic(tmp_path / "a" / "b" / "x.md", "héllo\n")
    assert p.read_bytes() == "héllo\n".encode()
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01" and os.listdir(p.parent) == ["x.md"]


def test_the_file_gets_the_umask_mode_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_atomic(tmp_path / "r.html", "<p>")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_an_interrupted_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    p = write_atomic(tmp_path / "t.json", "old")

    def boom(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(p, "new")
    monkeypatch.undo()
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["t.json"]


def test_dead_writers_temporaries_are_swept_live_ones_kept(tmp_path):
    dead, live = tmp_path / f".t.json.{_dead_pid()}.ab.tmp", tmp_path / f".t.json.{os.getppid()}.cd.tmp"
    other = tmp_path / f".u.json.{_dead_pid()}.ef.tmp"         # another file's: not this write's business
    for f in (dead, live, other):
        f.write_text("{")
    write_atomic(tmp_path / "t.json", "{}")
    assert not dead.exists() and live.exists() and other.exists()
    sweep_dead_temporaries(tmp_path, ".u.json.")
    assert not other.exists()


def test_a_kept_older_prefix_is_swept_under_its_own_name(tmp_path):
    dead = tmp_path / f"ceil.{_dead_pid()}.tmp"                # the "<stem>.<pid>.tmp" of files older than the module
    dead.write_text("{")
    write_atomic(tmp_path / "ceil.json", "{}", tmp_prefix="ceil.")
    assert sorted(os.listdir(tmp_path)) == ["ceil.json"]


def test_figure_in_the_suffix_format_and_nothing_on_a_failure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = write_figure(fig, tmp_path / "f.png", dpi=50)
    svg = write_figure(fig, tmp_path / "f.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in svg.read_bytes()[:400]
    with pytest.raises(ValueError):
        write_figure(fig, tmp_path / "f.nosuchformat")
    plt.close(fig)
    assert sorted(os.listdir(tmp_path)) == ["f.png", "f.svg"]


def test_a_held_lock_refuses_a_second_holder_until_released(tmp_path):
    from tilestack.files import LockHeldError, held_lock

    lock = tmp_path / "run.lock"
    with held_lock(lock):
        with pytest.raises(LockHeldError) as err, held_lock(lock):
            pass
        assert str(lock) in str(err.value)
    with held_lock(lock):          # released at the block's end
        pass


def test_a_forked_child_lets_go_of_the_locks_it_inherited(tmp_path):
    import os

    from tilestack.files import LockHeldError, held_lock

    lock = tmp_path / "run.lock"
    with held_lock(lock):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:               # the child idles, as a worker pool that outlives its run does
            os.close(r)
            os.write(w, b"x")
            import time
            time.sleep(3)
            os._exit(0)
        os.close(w)
        os.read(r, 1)
        os.close(r)
    try:
        with held_lock(lock):      # the child's copy would keep it held for 3 s more
            pass
    except LockHeldError:
        pytest.fail("a forked child kept the lock held after its parent let go")
    finally:
        os.waitpid(pid, 0)
