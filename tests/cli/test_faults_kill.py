"""Killed and concurrent workers: SIGKILL at random points of `slidechat report` / `slidechat eval run`
followed by a resume gives exactly the outputs of an uninterrupted run; several workers on one ``--out``
do every item exactly once; lock files of killed workers expire."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slidechat.cli import main
from slidechat.utils.io import JsonlLog, read_jsonl
from slidechat.utils.locks import LockFolder

VOLATILE = {"timing", "created", "shard", "worker", "seconds"}  # wall-clock and process fields


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return env


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slidechat.cli", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_after(proc: subprocess.Popen, log: Path, n_records: int, extra_s: float, timeout_s: float = 240) -> bool:
    """SIGKILL ``proc`` once ``log`` holds ``n_records`` lines, ``extra_s`` later; False if it finished first."""
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout_s:
        if log.exists() and log.read_bytes().count(b"\n") >= n_records:
            time.sleep(extra_s)
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in (".jpg", ".png")}


# ------------------------------------------------------------------------------------------- slidechat report
@pytest.fixture(scope="module")
def slides_folder(synth_dataset, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kill_slides")
    for s in sorted((synth_dataset / "slides").glob("*.tiff")):
        shutil.copy(s, folder / s.name)
    return folder


def _report_args(slides: Path, out: Path, ckpt: Path, cache: Path) -> list[str]:
    return ["report", str(slides), "--out", str(out), "--checkpoint", str(ckpt), "--cache-dir", str(cache),
            "--max-new-tokens", "2", "--summary-max-new-tokens", "4", "--thumbnail-size", "96", "--no-progress"]


@pytest.fixture(scope="module")
def report_reference(slides_folder, tiny_checkpoint_dir, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted single-worker report over the slides (and the feature cache it filled)."""
    base = tmp_path_factory.mktemp("report_ref")
    out, cache = base / "out", base / "cache"
    assert main(_report_args(slides_folder, out, tiny_checkpoint_dir, cache)) == 0
    return out, cache


def _assert_same_report(out: Path, ref: Path) -> None:
    lines = (out / "reports.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses: no torn record left
    expected = read_jsonl(ref / "reports.jsonl")
    assert [r["id"] for r in records] == [r["id"] for r in expected]  # each slide once, in input order
    assert [_stable(r) for r in records] == [_stable(r) for r in expected]
    assert _files(out) == _files(ref)
    assert (out / "index.html").is_file() and not (out / ".locks").exists()
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temp file of a killed atomic write


def _kill_and_resume_report(slides, ckpt, ref, cache, out, rng, kills: int) -> None:
    n = len(read_jsonl(ref / "reports.jsonl"))
    killed = 0
    for _ in range(kills):
        done = len(read_jsonl(out / "reports.jsonl"))
        if done >= n:
            break
        proc = _spawn(_report_args(slides, out, ckpt, cache))
        killed += _kill_after(proc, out / "reports.jsonl", rng.randint(done, n - 1), rng.uniform(0.0, 0.4))
    assert killed >= 1
    assert main(_report_args(slides, out, ckpt, cache)) == 0
    _assert_same_report(out, ref)


def test_report_sigkill_then_resume_gives_the_same_reports(slides_folder, tiny_checkpoint_dir, report_reference,
                                                           tmp_path):
    ref, cache = report_reference
    _kill_and_resume_report(slides_folder, tiny_checkpoint_dir, ref, cache, tmp_path / "out", random.Random(17), 1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_report_many_sigkills_then_resume(slides_folder, tiny_checkpoint_dir, report_reference, tmp_path, seed):
    ref, cache = report_reference
    _kill_and_resume_report(slides_folder, tiny_checkpoint_dir, ref, cache, tmp_path / "out", random.Random(seed), 3)


def test_three_concurrent_report_workers_do_each_slide_once(slides_folder, tiny_checkpoint_dir, report_reference,
                                                            tmp_path):
    ref, cache = report_reference
    out = tmp_path / "out"
    procs = [_spawn(_report_args(slides_folder, out, tiny_checkpoint_dir, cache)) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    _assert_same_report(out, ref)
    workers = {r["worker"] for r in read_jsonl(out / "reports.jsonl")}
    assert 1 <= len(workers) <= 3


@pytest.mark.slow
def test_concurrent_workers_killed_and_resumed(slides_folder, tiny_checkpoint_dir, report_reference, tmp_path):
    ref, cache = report_reference
    out = tmp_path / "out"
    procs = [_spawn(_report_args(slides_folder, out, tiny_checkpoint_dir, cache)) for _ in range(3)]
    _kill_after(procs[0], out / "reports.jsonl", 1, 0.1)
    for p in procs[1:]:
        p.communicate(timeout=300)
    assert main(_report_args(slides_folder, out, tiny_checkpoint_dir, cache)) == 0
    _assert_same_report(out, ref)


# ------------------------------------------------------------------------------------------- slidechat eval run
def _eval_args(data: Path, out: Path, ckpt: Path, cache: Path) -> list[str]:
    return ["eval", "run", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--tasks", "closed_vqa",
            "reports", "grounding", "--limit", "3", "--max-new-tokens", "3", "--mcq-max-new-tokens", "3",
            "--cache-dir", str(cache), "--no-meteor", "--no-embedding", "--bootstrap", "50", "--no-progress",
            "--overlays", "1"]


@pytest.fixture(scope="module")
def eval_reference(synth_dataset, tiny_checkpoint_dir, report_reference, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_ref") / "out"
    assert main(_eval_args(synth_dataset, out, tiny_checkpoint_dir, report_reference[1])) == 0
    return out


def _numbers(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    results.pop("meta")
    return results


def _kill_and_resume_eval(synth, ckpt, ref, cache, out, rng, kills: int) -> None:
    n = len(read_jsonl(ref / "predictions.jsonl"))
    for _ in range(kills):
        done = len(read_jsonl(out / "predictions.jsonl"))
        if done >= n:
            break
        proc = _spawn(_eval_args(synth, out, ckpt, cache))
        _kill_after(proc, out / "predictions.jsonl", rng.randint(done, n - 1), rng.uniform(0.0, 0.3))
    assert main(_eval_args(synth, out, ckpt, cache)) == 0
    key = lambda r: (r["task"], r["id"])  # noqa: E731
    got = sorted((_stable(r) for r in read_jsonl(out / "predictions.jsonl")), key=key)
    want = sorted((_stable(r) for r in read_jsonl(ref / "predictions.jsonl")), key=key)
    assert got == want  # each item once, same answers
    assert _numbers(out) == _numbers(ref)
    assert not (out / ".locks").exists()


def test_eval_run_sigkill_then_resume_gives_the_same_numbers(synth_dataset, tiny_checkpoint_dir, eval_reference,
                                                             report_reference, tmp_path):
    _kill_and_resume_eval(synth_dataset, tiny_checkpoint_dir, eval_reference, report_reference[1], tmp_path / "out",
                          random.Random(5), 1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12])
def test_eval_run_many_sigkills_then_resume(synth_dataset, tiny_checkpoint_dir, eval_reference, report_reference,
                                            tmp_path, seed):
    _kill_and_resume_eval(synth_dataset, tiny_checkpoint_dir, eval_reference, report_reference[1], tmp_path / "out",
                          random.Random(seed), 3)


@pytest.mark.slow
def test_two_concurrent_eval_workers(synth_dataset, tiny_checkpoint_dir, eval_reference, report_reference, tmp_path):
    out = tmp_path / "out"
    procs = [_spawn(_eval_args(synth_dataset, out, tiny_checkpoint_dir, report_reference[1])) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    keys = [(r["task"], r["id"]) for r in read_jsonl(out / "predictions.jsonl")]
    assert len(keys) == len(set(keys)) == len(read_jsonl(eval_reference / "predictions.jsonl"))
    assert _numbers(out) == _numbers(eval_reference)


# ------------------------------------------------------------------------------------------- the locks themselves
def _claim_all(folder: str, keys: list[str], start: int) -> None:
    locks, log = LockFolder(Path(folder) / ".locks"), JsonlLog(Path(folder) / "done.jsonl")
    for key in keys[start:] + keys[:start]:
        lock = locks.try_acquire(key)
        if lock is None:
            continue
        with lock:
            log.refresh()
            if key not in log:
                time.sleep(0.002)
                log.append({"id": key, "pid": os.getpid()})


def test_four_processes_split_a_work_list_exactly_once(tmp_path):
    keys = [f"item/{i}" for i in range(60)]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_claim_all, args=(str(tmp_path), keys, 15 * k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = read_jsonl(tmp_path / "done.jsonl")
    assert sorted(r["id"] for r in records) == sorted(keys)  # none twice, none lost
    assert len({r["pid"] for r in records}) >= 2
    assert not list((tmp_path / ".locks").iterdir())


def _hold_forever(folder: str) -> None:
    LockFolder(folder).try_acquire("slide-a")
    time.sleep(600)


def test_lock_of_a_killed_worker_is_taken_over_at_once(tmp_path):
    locks = LockFolder(tmp_path, stale_after_s=3600)
    proc = mp.get_context("fork").Process(target=_hold_forever, args=(str(tmp_path),))
    proc.start()
    for _ in range(200):
        if locks.holder("slide-a") is not None:
            break
        time.sleep(0.02)
    assert locks.holder("slide-a").pid == proc.pid and locks.try_acquire("slide-a") is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    lock = locks.try_acquire("slide-a")
    assert lock is not None and json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()


def test_lock_from_another_machine_expires_by_age(tmp_path):
    locks = LockFolder(tmp_path, stale_after_s=60)
    path = locks.path_for("slide-b")
    path.write_text(json.dumps({"pid": 1, "host": "another-node", "token": "t", "created": "x"}))
    assert locks.try_acquire("slide-b") is None  # fresh: a live worker elsewhere
    old = time.time() - 61
    os.utime(path, (old, old))
    lock = locks.try_acquire("slide-b")
    assert lock is not None and json.loads(path.read_text())["host"] == locks.host
    lock.release()


def test_held_lock_is_kept_fresh_by_its_heartbeat(tmp_path):
    locks = LockFolder(tmp_path, stale_after_s=0.4)
    lock = locks.try_acquire("slide-c")
    time.sleep(1.0)  # over twice the stale age: only the heartbeat keeps it
    assert locks.try_acquire("slide-c") is None
    lock.release()
    assert locks.try_acquire("slide-c") is not None


def test_report_skips_a_slide_held_by_a_live_worker_elsewhere(slides_folder, tiny_checkpoint_dir, report_reference,
                                                              tmp_path, capsys):
    ref, cache = report_reference
    out = tmp_path / "out"
    first_id = read_jsonl(ref / "reports.jsonl")[0]["id"]
    locks = LockFolder(out / ".locks")
    locks.path_for(first_id).parent.mkdir(parents=True)
    locks.path_for(first_id).write_text(json.dumps({"pid": 1, "host": "another-node", "token": "t"}))
    assert main(_report_args(slides_folder, out, tiny_checkpoint_dir, cache)) == 0
    assert "index.html is written when every slide has a record" in capsys.readouterr().err
    assert first_id not in {r["id"] for r in read_jsonl(out / "reports.jsonl")} and not (out / "index.html").exists()
    locks.path_for(first_id).unlink()  # that worker is gone (or its lock expired): a rerun completes the folder
    assert main(_report_args(slides_folder, out, tiny_checkpoint_dir, cache)) == 0
    _assert_same_report(out, ref)


# --------------------------------------------------------------------------------------- slidechat extract
@pytest.mark.slow
def test_extract_sigkill_then_two_workers_resume_each_slide_once(synth_dataset, tmp_path):
    import re

    from slidechat.features.store import is_complete_features_h5

    slides, out = tmp_path / "slides", tmp_path / "feats"
    slides.mkdir()
    src = sorted((synth_dataset / "slides").glob("*.tiff"))
    for p in src:
        shutil.copy(p, slides / p.name)
    for i, p in enumerate(src[:2]):
        shutil.copy(p, slides / f"copy-{i}.tiff")
    args = ["extract", str(slides), "--out", str(out), "--num-workers", "0", "--target-mpp", "2",
            "--thumbnail-size", "256"]
    victim = _spawn(args)
    t0 = time.monotonic()
    while victim.poll() is None and time.monotonic() - t0 < 240:  # kill it mid-slide, after one slide is done
        if list(out.glob("*.h5")) and list((out / ".locks").glob("*.h5.lock")):
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the worker finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    claimed = [p.name for p in (out / ".locks").glob("*.h5.lock")]
    assert 1 <= len(before) < 6 and claimed  # a finished slide and the killed worker's claim on the next
    workers = [_spawn(args) for _ in range(2)]
    results = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], results
    written = sorted(m for _, err in results for m in re.findall(r"^ok: \S+/(\S+\.h5) \(", err, flags=re.M))
    assert written == sorted(f"{p.stem}.h5" for p in slides.iterdir() if f"{p.stem}.h5" not in before)
    assert all(f"{c[:-len('.lock')]}" in written for c in claimed)  # the killed worker's slide was taken over
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5") if p.name in before} == before
    assert all(is_complete_features_h5(p) for p in out.glob("*.h5")) and len(list(out.glob("*.h5"))) == 6
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.h5" for p in slides.iterdir())
