"""Several `slidechat extract` workers on one output folder: per-slide lock files split the slides (each .h5 is
written by exactly one worker), a slide another live worker holds is skipped and counted, and the lock of a
killed worker or of a machine that stopped refreshing it is taken over."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from slidechat.encoders import load_encoder
from slidechat.features.extract import LOCK_DIR, extract_many
from slidechat.features.store import is_complete_features_h5, load_features
from slidechat.slide.config import ExtractionConfig, TissueConfig
from slidechat.utils.locks import LockFolder

FAST = ExtractionConfig(num_workers=0, target_mpp=2.0, tissue=TissueConfig(thumbnail_size=256))

# Each worker imports everything first, then waits for the start file, so all of them go for the same slides
WORKER = """
import os, sys, time
from slidechat.cli import main
import slidechat.features.cli, slidechat.encoders, torch
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.02)
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def six_slides(synth_dataset, tmp_path):
    """Six slide files: the four SynthSlides and two copies under other names."""
    folder = tmp_path / "slides"
    folder.mkdir()
    src = sorted((synth_dataset / "slides").glob("*.tiff"))
    for p in src:
        shutil.copy(p, folder / p.name)
    for i, p in enumerate(src[:2]):
        shutil.copy(p, folder / f"copy-{i}.tiff")
    return folder


def _lock_body(pid: int, host: str) -> str:
    return json.dumps({"pid": pid, "host": host, "token": "t" * 32, "created": "2020-01-01T00:00:00+00:00",
                       "stale_after_s": 120.0}) + "\n"


def test_three_workers_write_each_slide_once(six_slides, tmp_path):
    out, go = tmp_path / "feats", tmp_path / "go"
    bad = tmp_path / "zz-notes.svs"  # a text file named like a slide: fails in whichever worker takes it
    bad.write_text("not a slide\n")
    argv = ["extract", str(six_slides), str(bad), "--out", str(out), "--num-workers", "0", "--target-mpp", "2",
            "--thumbnail-size", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(go), *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    time.sleep(0.5)
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2, 2], results  # every worker reports the bad file
    written, summaries, bad_lines = [], [], []
    for stdout, stderr in results:
        assert "Traceback" not in stderr, stderr
        written += re.findall(r"^ok: (\S+\.h5) \(", stderr, flags=re.M)
        line = re.search(r"slides: (\d+) extracted, (\d+) already done, (\d+) failed"
                         r"(?:, (\d+) being extracted by other workers)?;", stdout)
        summaries.append([int(n or 0) for n in line.groups()])
        bad_lines += [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    names = sorted(os.path.basename(w) for w in written)
    assert names == sorted(f"{p.stem}.h5" for p in six_slides.iterdir())  # each slide written exactly once
    assert sum(s[0] for s in summaries) == 6
    for extracted, done, failed, busy in summaries:  # each worker accounts for every input once
        assert failed == 1 and extracted + done + busy == 6
    # the bad file was read by one worker; the others took its error from that worker's note
    assert len(bad_lines) == 3 and all("zz-notes.svs" in ln and "text file" in ln for ln in bad_lines)
    assert sum("(in worker" not in ln for ln in bad_lines) == 1, bad_lines
    for h5 in out.glob("*.h5"):
        assert is_complete_features_h5(h5) and load_features(h5).num_patches > 0
    assert sorted(p.name for p in out.iterdir()) == names  # no lock folder, note or temp file left


def test_stale_locks_are_taken_over_and_a_held_slide_is_skipped(six_slides, tmp_path):
    out = tmp_path / "feats"
    locks = LockFolder(out / LOCK_DIR)
    locks.folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = locks.path_for("copy-0.h5")  # a worker on this machine that was killed
    killed.write_text(_lock_body(dead.pid, socket.gethostname()))
    silent = locks.path_for("copy-1.h5")  # a worker on another machine that stopped refreshing its lock
    silent.write_text(_lock_body(4242, "other-machine"))
    old = time.time() - 3600
    os.utime(silent, (old, old))
    held = locks.path_for("synth-s0-0000.h5")  # a live worker (this test's process) holds this one
    held.write_text(_lock_body(os.getpid(), socket.gethostname()))
    events = []
    summary = extract_many([six_slides], load_encoder("demo-cnn"), out, FAST,
                           on_slide=lambda p, s, m: events.append((p.name, s, m)))
    assert sorted(p.name for p in summary.written) == sorted(
        f"{p.stem}.h5" for p in six_slides.iterdir() if p.name != "synth-s0-0000.tiff")
    assert [p.name for p in summary.busy] == ["synth-s0-0000.tiff"] and not summary.failed
    busy = [e for e in events if e[1] == "busy"]
    assert len(busy) == 1 and f"{socket.gethostname()}:{os.getpid()}" in busy[0][2]
    assert "1 being extracted by other workers" in summary.line()
    assert not (out / "synth-s0-0000.h5").exists() and held.is_file()  # the live worker's claim is untouched
    assert not killed.exists() and not silent.exists()
    # once the holder has finished (released its lock), a resumed run does only that slide
    held.unlink()
    again = extract_many([six_slides], load_encoder("demo-cnn"), out, FAST)
    assert [p.name for p in again.written] == ["synth-s0-0000.h5"] and len(again.skipped) == 5
    assert not (out / LOCK_DIR).exists()


def test_no_resume_with_a_second_worker_still_writes_each_slide_once(six_slides, tmp_path, monkeypatch):
    """Without resume every slide is extracted again, but one that another worker rewrote during this run is not
    extracted a second time."""
    out = tmp_path / "feats"
    first = extract_many([six_slides / "copy-0.tiff", six_slides / "copy-1.tiff"], load_encoder("demo-cnn"), out, FAST)
    assert len(first.written) == 2
    from slidechat.features import extract as extract_mod

    real = extract_mod.extract_slide
    calls = []

    def other_worker_rewrites_copy_1(slide, encoder, out_path, config, **kw):
        calls.append(slide.name)
        result = real(slide, encoder, out_path, config, **kw)
        if slide.name == "copy-0.tiff":  # meanwhile another worker rewrites copy-1.h5
            time.sleep(0.01)
            real(six_slides / "copy-1.tiff", encoder, out / "copy-1.h5", config)
        return result

    monkeypatch.setattr(extract_mod, "extract_slide", other_worker_rewrites_copy_1)
    summary = extract_many([six_slides / "copy-0.tiff", six_slides / "copy-1.tiff"], load_encoder("demo-cnn"),
                           out, FAST, resume=False)
    assert calls == ["copy-0.tiff"]
    assert [p.name for p in summary.written] == ["copy-0.h5"] and [p.name for p in summary.skipped] == ["copy-1.h5"]


# ------------------------------------------------------------------------------------------ the output folder
def test_two_inputs_with_one_slide_id_do_not_pass_for_each_other(six_slides, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(six_slides / "copy-0.tiff", other / "synth-s0-0000.tiff")  # another slide, same file name
    summary = extract_many([six_slides / "synth-s0-0000.tiff", other / "synth-s0-0000.tiff"],
                           load_encoder("demo-cnn"), tmp_path / "feats", FAST)
    assert [p.name for p in summary.written] == ["synth-s0-0000.h5"] and not summary.skipped
    ((path, msg),) = summary.failed
    assert path == str(other / "synth-s0-0000.tiff") and "same slide id 'synth-s0-0000'" in msg
    assert load_features(summary.written[0]).attrs["slide_path"] == str(six_slides / "synth-s0-0000.tiff")


def test_out_that_is_a_file_is_one_line(six_slides, tmp_path, capsys):
    from slidechat.cli import main

    taken = tmp_path / "taken"
    taken.write_text("keep me\n")
    for out in (taken, taken / "sub"):
        assert main(["extract", str(six_slides / "copy-0.tiff"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file, not a folder" in err and "Traceback" not in err
    assert taken.read_text() == "keep me\n"


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_what_was_written(six_slides, tmp_path, capsys,
                                                                             monkeypatch):
    import errno

    from slidechat.cli import main
    from slidechat.features import extract as extract_mod

    real, calls = extract_mod.write_features_h5, []

    def fills_up(path, *a, **k):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(extract_mod, "write_features_h5", fills_up)
    out = tmp_path / "feats"
    assert main(["extract", str(six_slides), "--out", str(out), "--num-workers", "0", "--target-mpp", "2",
                 "--thumbnail-size", "256"]) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "No space left on device" in line and "Traceback" not in err
    assert len(calls) == 2  # stopped at the first failed write, not tried on every further slide
    assert [p.name for p in out.iterdir()] == [calls[0].name] and is_complete_features_h5(calls[0])
