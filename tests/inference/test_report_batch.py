"""`slidechat report` on a tiny random model: 3 synthetic slides + 1 broken file, interrupted and resumed."""

from __future__ import annotations

import json
import shutil

import pytest

from slidechat.inference.batch_report import BatchReportConfig, collect_jobs, run_batch, shard_jobs
from slidechat.cli import main
from slidechat.utils.io import read_jsonl



class Interrupt(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def batch_inputs(synth_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch_slides")
    slides = sorted((synth_dataset / "slides").glob("*.tiff"))[:3]
    for s in slides:
        shutil.copy(s, folder / s.name)
    (folder / "broken.tiff").write_bytes(slides[0].read_bytes()[:4000])  # a truncated copy
    return folder


def _cfg(inputs, out, ckpt, cache, **kw):
    return BatchReportConfig(inputs=[str(i) for i in inputs], out_dir=str(out), checkpoint=str(ckpt),
                             cache_dir=str(cache), max_new_tokens=2, summary_max_new_tokens=4, progress=False,
                             thumbnail_size=128, **kw)


def test_batch_interrupted_and_resumed_gives_3_ok_1_error(batch_inputs, tiny_checkpoint_dir, tmp_path, test_output):
    out, cache = tmp_path / "reports", tmp_path / "cache"
    seen = []

    def stop_after_two(record):
        seen.append(record["id"])
        if len(seen) == 2:
            raise Interrupt()

    with pytest.raises(Interrupt):
        run_batch(_cfg([batch_inputs], out, tiny_checkpoint_dir, cache, on_record=stop_after_two))
    first = read_jsonl(out / "reports.jsonl")
    assert [r["id"] for r in first] == seen
    with open(out / "reports.jsonl", "a") as fh:  # a kill in the middle of the next write
        fh.write('{"id": "synth-s0-0002", "status": "ok", "report_te')

    counts = run_batch(_cfg([batch_inputs], out, tiny_checkpoint_dir, cache))
    assert counts["skipped"] == 2 and counts["ok"] + counts["error"] == 2

    lines = (out / "reports.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses: no torn record left
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 4
    assert sorted(r["status"] for r in records) == ["error", "ok", "ok", "ok"]
    bad = next(r for r in records if r["status"] == "error")
    assert bad["id"] == "broken" and "truncated" in bad["error"] and bad["slide_sha256"]
    for r in (r for r in records if r["status"] == "ok"):
        assert len(r["slide_sha256"]) == 64 and r["model"] == str(tiny_checkpoint_dir)
        assert r["report_text"].startswith("TISSUE TYPES") and "lesion_present" in r["fields"]
        assert (out / r["heatmap_path"]).is_file() and (out / r["thumbnail_path"]).is_file()
        assert r["timing"]["report_s"] > 0 and "prefetch_wait_s" in r["timing"]
    # the prefetch thread fills encode_slide's own feature cache: one .h5 per readable slide, none twice
    assert len(list(cache.rglob("*.h5"))) == 3
    html = (out / "index.html").read_text()
    assert html.count('class="card') == 4 and "3 ok, 1 error" in html
    shutil.copytree(out, test_output / "report_batch", dirs_exist_ok=True)

    # a third run has nothing to do and changes nothing
    again = run_batch(_cfg([batch_inputs], out, tiny_checkpoint_dir, cache))
    assert again["skipped"] == 4 and (out / "reports.jsonl").read_text().splitlines() == lines


def test_shards_split_and_merge_via_cli(batch_inputs, tiny_checkpoint_dir, tmp_path):
    """Two shards (as two `accelerate` processes would run) cover every slide once; the last one merges."""
    csv_path = tmp_path / "cases.csv"
    slides = sorted(p for p in batch_inputs.glob("synth*.tiff"))[:2]
    csv_path.write_text("slide_path,case_id,prompt\n" + "".join(
        f"{p},case-{i},female 54y breast core biopsy\n" for i, p in enumerate(slides)))
    jobs = collect_jobs([str(csv_path)])
    assert [j.id for j in jobs] == ["case-0", "case-1"] and jobs[0].prompt.startswith("female")
    assert [j.id for j in shard_jobs(jobs, 2, 1)] == ["case-1"]
    out = tmp_path / "sharded"
    common = ["report", str(csv_path), "--out", str(out), "--checkpoint", str(tiny_checkpoint_dir),
              "--cache-dir", str(tmp_path / "cache"), "--max-new-tokens", "2", "--summary-max-new-tokens", "2",
              "--no-progress", "--no-heatmaps", "--num-shards", "2"]
    assert main(common + ["--shard-id", "0"]) == 0
    assert not (out / "index.html").exists()  # shard 1 has not run yet
    assert main(common + ["--shard-id", "1"]) == 0
    merged = read_jsonl(out / "reports.jsonl")
    assert [r["id"] for r in merged] == ["case-0", "case-1"]
    assert {r["shard"] for r in merged} == {"0/2", "1/2"}
    assert merged[0]["prompt"] == "female 54y breast core biopsy" and merged[0]["case_id"] == "case-0"
    assert "Clinical information: female 54y" not in json.dumps(merged[0]["fields"])  # context is not a field
    assert (out / "index.html").is_file()


def test_shard_from_accelerate_environment(monkeypatch):
    from slidechat.inference.batch_report import resolve_shard
    from slidechat.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert resolve_shard(None, None) == (3, 2)
    assert resolve_shard(4, 1) == (4, 1)  # explicit flags win
    with pytest.raises(ConfigError):
        resolve_shard(2, 2)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert resolve_shard(None, None) == (1, 0)


def test_csv_with_a_bad_row_stops_or_is_skipped_and_counted(batch_inputs, tiny_checkpoint_dir, tmp_path, capsys):
    slide = sorted(batch_inputs.glob("synth*.tiff"))[0]
    csv_path = tmp_path / "cases.csv"
    csv_path.write_text(f"slide_path,case_id\n{slide},case-0\n{slide},case-1,surplus\n")
    out = tmp_path / "out"
    common = ["report", str(csv_path), "--out", str(out), "--checkpoint", str(tiny_checkpoint_dir), "--cache-dir",
              str(tmp_path / "cache"), "--max-new-tokens", "2", "--summary-max-new-tokens", "2", "--no-progress",
              "--no-heatmaps"]
    assert main(common) == 2
    assert "cases.csv:3: 3 field(s), the header has 2" in capsys.readouterr().err and not out.exists()
    assert main(common + ["--skip-bad-lines"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 malformed line(s): " in err and "cases.csv:3" in err
    assert [r["id"] for r in read_jsonl(out / "reports.jsonl")] == ["case-0"]
