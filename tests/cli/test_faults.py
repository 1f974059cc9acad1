"""Bad-input matrix for `slidechat report`, `slidechat eval score|run|compare` and their Python API.

Every case: exit code 2 (or the SlideChatError subclass from the API), exactly one ``error:`` line that says
what is wrong (and where: file and line), no traceback, and nothing partial left behind: an ``--out`` that did
not exist still does not exist, and a folder that did exist is byte-for-byte unchanged.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from slidechat.cli import main
from slidechat.errors import ConfigError, DataError, SlideChatError

GOLD_HEADER = ["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D", "Answer"]
GOLD_ROWS = [
    ["1", "S1", "BRCA", "Microscopy", "Tissue", "Which tissue dominates?", "Tumor", "Stroma", "Fat", "", "A"],
    ["2", "S1", "BRCA", "Diagnosis", "Subtype", "What subtype?", "Ductal", "Lobular", "", "", "B"],
    ["3", "S2", "LUAD", "Diagnosis", "Grade", "Which grade?", "1", "2", "3", "", "C"],
]


def _write_csv(path: Path, rows: list[list[str]], header: list[str] = GOLD_HEADER) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def _write_preds(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD_PREDS = ['{"id": "1", "output": "A"}', '{"id": "2", "output": "B"}', '{"id": "3", "output": "C"}']


@dataclass
class Case:
    name: str
    build: Callable[[Path, dict], list[str]]  # (tmp dir, fixtures) -> argv; ``--out`` is tmp/"out"
    message: str  # a part of the one error line
    out_exists: bool = False  # the case prepares an --out folder that must stay unchanged


def _report(*extra: str) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, fx: dict) -> list[str]:
        return ["report", str(fx["slide"]), "--out", str(tmp / "out"), "--checkpoint", str(fx["ckpt"]),
                "--no-progress", *extra]
    return build


def _report_inputs(make_inputs: Callable[[Path], list[str]], *extra: str) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, fx: dict) -> list[str]:
        return ["report", *make_inputs(tmp), "--out", str(tmp / "out"), "--checkpoint", str(fx["ckpt"]),
                "--no-progress", *extra]
    return build


def _empty_folder(tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return [str(tmp / "empty")]


def _csv_without_slide_path(tmp: Path) -> list[str]:
    return [str(_write_csv(tmp / "cases.csv", [["a", "b"]], header=["path", "case_id"]))]


def _csv_with_bad_row(tmp: Path) -> list[str]:
    return [str(_write_csv(tmp / "cases.csv", [["x.tiff", "c1"], ["y.tiff", "c2", "extra"], ["z.tiff", "c3"]],
                           header=["slide_path", "case_id"]))]


def _csv_unquoted_end(tmp: Path) -> list[str]:
    (tmp / "cases.csv").write_text('slide_path,case_id\nx.tiff,c1\n"y.tiff,c2\n')
    return [str(tmp / "cases.csv")]


def _score(pred_lines: list[str] | None = None, *, gold: Callable[[Path], Path] | None = None,
           pred_name: str = "pred.jsonl", pred_bytes: bytes | None = None, extra: tuple[str, ...] = ()
           ) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, fx: dict) -> list[str]:
        pred = tmp / pred_name
        if pred_bytes is not None:
            pred.write_bytes(pred_bytes)
        elif pred_lines is not None:
            _write_preds(pred, pred_lines)
        gold_path = gold(tmp) if gold else _write_csv(tmp / "gold.csv", GOLD_ROWS)
        return ["eval", "score", "--pred", str(pred), "--gold", str(gold_path), "--out", str(tmp / "out"),
                "--bootstrap", "10", "--no-plots", *extra]
    return build


def _gold_extra_field(tmp: Path) -> Path:
    return _write_csv(tmp / "gold.csv", [GOLD_ROWS[0], GOLD_ROWS[1] + ["surplus"], GOLD_ROWS[2]])


def _gold_json_non_object(tmp: Path) -> Path:
    rows = [dict(zip(GOLD_HEADER, r)) for r in GOLD_ROWS]
    (tmp / "gold.json").write_text(json.dumps([rows[0], "not a question", rows[2]]))
    return tmp / "gold.json"


def _gold_json_invalid(tmp: Path) -> Path:
    (tmp / "gold.json").write_text('[\n{"ID": "1",\n "Question": oops}\n]')
    return tmp / "gold.json"


def _gold_unknown_columns(tmp: Path) -> Path:
    return _write_csv(tmp / "gold.csv", [["1", "x"]], header=["foo", "bar"])


def _gold_bad_answer(tmp: Path) -> Path:
    return _write_csv(tmp / "gold.csv", [GOLD_ROWS[0][:-1] + ["Z"]])


def _run(data: Callable[[Path, dict], Path], *extra: str) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, fx: dict) -> list[str]:
        return ["eval", "run", "--checkpoint", str(fx["ckpt"]), "--data", str(data(tmp, fx)), "--out",
                str(tmp / "out"), "--no-progress", "--no-plots", "--no-meteor", "--no-embedding",
                "--cache-dir", str(fx["cache"]), *extra]
    return build


def _synth_copy(tmp: Path, fx: dict) -> Path:
    dst = tmp / "synth"
    if not dst.exists():
        shutil.copytree(fx["synth"], dst)
    return dst


def _synth_broken_truth(tmp: Path, fx: dict) -> Path:
    dst = _synth_copy(tmp, fx)
    lines = (dst / "truth.jsonl").read_text().splitlines()
    lines.insert(1, '{"slide_id": "broken", "path": ')
    (dst / "truth.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def _synth_broken_captions(tmp: Path, fx: dict) -> Path:
    dst = _synth_copy(tmp, fx)
    with open(dst / "captions.jsonl", "r+") as fh:
        text = fh.read()
        fh.seek(0)
        fh.write("[1, 2]\n" + text)
    return dst


def _not_synth(tmp: Path, fx: dict) -> Path:
    (tmp / "plain").mkdir(exist_ok=True)
    return tmp / "plain"


def _missing(tmp: Path, fx: dict) -> Path:
    return tmp / "nope.csv"


def _slidebench_csv(tmp: Path, fx: dict) -> Path:
    return _write_csv(tmp / "bench.csv", GOLD_ROWS)


def _prepared_run_folder(kind: str) -> Callable[[Path, dict], list[str]]:
    """An --out that holds a run: a corrupt run.json, or a resume log with a broken line in the middle."""
    def build(tmp: Path, fx: dict) -> list[str]:
        data = _synth_copy(tmp, fx)
        out = tmp / "out"
        out.mkdir()
        meta = {"checkpoint": str(fx["ckpt"]), "data": str(data.resolve()), "tasks": ["closed_vqa"]}
        if kind == "corrupt_meta":
            (out / "run.json").write_text('{"checkpoint": ')
        else:
            (out / "run.json").write_text(json.dumps(meta))
            (out / "predictions.jsonl").write_text(
                '{"task": "closed_vqa", "id": "0", "slide_id": "s", "status": "ok", "output": "A"}\n'
                '{"task": "closed_vqa", "id": "1", "sl\n'
                '{"task": "closed_vqa", "id": "2", "slide_id": "s", "status": "ok", "output": "B"}\n')
        return _run(lambda t, f: data, "--tasks", "closed_vqa", "--limit", "1")(tmp, fx)
    return build


def _compare(kind: str) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, fx: dict) -> list[str]:
        folder = tmp / "res"
        folder.mkdir()
        if kind == "corrupt":
            (folder / "results.json").write_text("{")
        return ["eval", "compare", str(folder), "--out", str(tmp / "out" / "table.md")]
    return build


CASES = [
    # slidechat report
    Case("report_empty_folder", _report_inputs(_empty_folder), "no slides found"),
    Case("report_csv_without_slide_path", _report_inputs(_csv_without_slide_path), "needs a 'slide_path' column"),
    Case("report_csv_row_with_extra_field", _report_inputs(_csv_with_bad_row), "cases.csv:3: 3 field(s)"),
    Case("report_csv_unterminated_quote", _report_inputs(_csv_unquoted_end), "cases.csv:"),
    Case("report_max_new_tokens_zero", _report("--max-new-tokens", "0"), "--max-new-tokens must be"),
    Case("report_summary_tokens_negative", _report("--summary-max-new-tokens", "-3"), "--summary-max-new-tokens"),
    Case("report_thumbnail_size_tiny", _report("--thumbnail-size", "1"), "--thumbnail-size must be"),
    Case("report_mpp_zero", _report("--mpp", "0"), "argument --mpp: must be a number from 0.01 to 100"),
    Case("report_mpp_not_a_number", _report("--mpp", "fast"), "argument --mpp: must be a number from 0.01 to 100"),
    Case("report_shard_out_of_range", _report("--num-shards", "2", "--shard-id", "5"), "--shard-id must be in [0, 2)"),
    Case("report_zero_shards", _report("--num-shards", "0"), "--num-shards 0"),
    Case("report_lock_stale_zero", _report("--lock-stale-after", "0"), "--lock-stale-after must be a finite"),
    Case("report_lock_stale_inf", _report("--lock-stale-after", "inf"), "--lock-stale-after must be a finite"),
    Case("report_missing_checkpoint", lambda t, fx: ["report", str(fx["slide"]), "--out", str(t / "out"),
                                                       "--checkpoint", str(t / "no_ckpt"), "--no-progress"],
         "no checkpoint at"),
    Case("report_corrupt_checkpoint", lambda t, fx: ["report", str(fx["slide"]), "--out", str(t / "out"),
                                                       "--checkpoint", str(fx["bad_ckpt"]), "--no-progress"],
         "config.json"),
    # slidechat eval score
    Case("score_broken_middle_line", _score([GOOD_PREDS[0], '{"id": "2", "output": "B"', GOOD_PREDS[2]]),
         "pred.jsonl:2: not valid JSON"),
    Case("score_array_line", _score([GOOD_PREDS[0], "[1, 2]", GOOD_PREDS[2]]), "pred.jsonl:2: expected a JSON object"),
    Case("score_missing_pred", _score(None), "pred.jsonl: file not found"),
    Case("score_not_utf8", _score(pred_bytes=b'{"id": "1", "output": "\xff\xfe"}\n'), "not UTF-8"),
    Case("score_unsupported_suffix", _score(GOOD_PREDS, pred_name="pred.txt"), "unsupported file type '.txt'"),
    Case("score_empty_pred", _score([]), "no predictions found"),
    Case("score_record_without_id", _score(['{"output": "A"}']), "record 1: no id"),
    Case("score_record_without_output", _score(['{"id": "1"}']), "record 1: no model output"),
    Case("score_gold_row_extra_field", _score(GOOD_PREDS, gold=_gold_extra_field), "gold.csv:3: 12 field(s)"),
    Case("score_gold_json_non_object", _score(GOOD_PREDS, gold=_gold_json_non_object), "gold.json:2: record 2"),
    Case("score_gold_json_invalid", _score(GOOD_PREDS, gold=_gold_json_invalid), "gold.json:3: not valid JSON"),
    Case("score_gold_unknown_columns", _score(GOOD_PREDS, gold=_gold_unknown_columns), "cannot tell the task"),
    Case("score_gold_answer_not_a_letter", _score(GOOD_PREDS, gold=_gold_bad_answer), "not one of the option letters"),
    Case("score_bootstrap_from_text", lambda t, fx: ["eval", "score", "--pred", "p.jsonl", "--bootstrap", "many"],
         "invalid int value"),
    # slidechat eval run
    Case("run_missing_data", _run(_missing), "nope.csv: file not found"),
    Case("run_folder_not_synth", _run(_not_synth), "not a SynthSlide folder"),
    Case("run_truth_broken_line", _run(_synth_broken_truth), "truth.jsonl:2: not valid JSON"),
    Case("run_captions_array_line", _run(_synth_broken_captions), "captions.jsonl:1: expected a JSON object"),
    Case("run_task_without_data", _run(_slidebench_csv, "--tasks", "grounding"), "has no data for task(s) grounding"),
    Case("run_max_new_tokens_zero", _run(_synth_copy, "--max-new-tokens", "0"), "--max-new-tokens must be"),
    Case("run_limit_zero", _run(_synth_copy, "--limit", "0"), "--limit must be >= 1"),
    Case("run_overlays_negative", _run(_synth_copy, "--overlays", "-1"), "--overlays must be >= 0"),
    Case("run_lock_stale_negative", _run(_synth_copy, "--lock-stale-after", "-5"), "--lock-stale-after must be > 0"),
    Case("run_corrupt_run_json", _prepared_run_folder("corrupt_meta"), "run.json: corrupt", out_exists=True),
    Case("run_resume_log_broken_line", _prepared_run_folder("broken_log"), "predictions.jsonl:2: not valid JSON",
         out_exists=True),
    # slidechat eval compare
    Case("compare_no_results", _compare("missing"), "no results.json here"),
    Case("compare_corrupt_results", _compare("corrupt"), "corrupt results.json"),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fault_fixtures(synth_dataset, tiny_checkpoint_dir, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("faults")
    bad_ckpt = base / "bad_ckpt"
    shutil.copytree(tiny_checkpoint_dir, bad_ckpt)
    (bad_ckpt / "config.json").write_text("{ not json")
    slide = sorted((synth_dataset / "slides").glob("*.tiff"))[0]
    return {"synth": synth_dataset, "ckpt": tiny_checkpoint_dir, "bad_ckpt": bad_ckpt, "slide": slide,
            "cache": base / "cache"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_cli(case: Case, fault_fixtures, tmp_path, capsys):
    argv = case.build(tmp_path, fault_fixtures)
    out = tmp_path / "out"
    before = _snapshot(out) if out.exists() else None
    assert (before is not None) == case.out_exists
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse rejects the value itself
        rc = exc.code
    err = capsys.readouterr().err
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error:") or ": error:" in ln]
    assert rc == 2, err
    assert len(error_lines) == 1 and case.message in error_lines[0], err
    assert "Traceback" not in err
    if case.out_exists:
        assert _snapshot(out) == before  # nothing written, nothing removed
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temp file of an atomic write left anywhere


# ------------------------------------------------------------------------------------------- the Python API
def test_bad_config_values_fail_at_construction():
    from slidechat.evaluation.runner import EvalRunConfig
    from slidechat.inference.batch_report import BatchReportConfig

    for kwargs, option in [({"max_new_tokens": 0}, "--max-new-tokens"), ({"thumbnail_size": 10**6}, "--thumbnail"),
                           ({"mpp": -1.0}, "--mpp"), ({"lock_stale_s": 0}, "--lock-stale-after"),
                           ({"summary_max_new_tokens": 2.5}, "--summary-max-new-tokens")]:
        with pytest.raises(ConfigError, match=option):
            BatchReportConfig(inputs=["x"], out_dir="o", **kwargs)
    for kwargs, option in [({"limit": 0}, "--limit"), ({"mcq_max_new_tokens": 0}, "--mcq-max-new-tokens"),
                           ({"n_overlays": -2}, "--overlays")]:
        with pytest.raises(ConfigError, match=option):
            EvalRunConfig(checkpoint="demo", data="d", out_dir="o", **kwargs)


def test_api_report_on_empty_folder_leaves_no_out(tmp_path):
    from slidechat.inference.batch_report import BatchReportConfig, run_batch

    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideChatError, match="no slides found"):
        run_batch(BatchReportConfig(inputs=[str(tmp_path / "empty")], out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_api_score_files_strict_and_skip(tmp_path):
    from slidechat.evaluation.scoring import score_files
    from slidechat.utils.io import BadLines

    gold = _write_csv(tmp_path / "gold.csv", GOLD_ROWS)
    pred = _write_preds(tmp_path / "pred.jsonl", [GOOD_PREDS[0], "{oops", GOOD_PREDS[2]])
    with pytest.raises(DataError, match=r"pred\.jsonl:2: not valid JSON.*--skip-bad-lines"):
        score_files(pred, gold)
    bad = BadLines(skip=True)
    results, _ = score_files(pred, gold, bad_lines=bad)
    assert bad.count == 1 and bad.skipped[0].line == 2
    assert results["meta"]["skipped_lines"] == [f"{pred}:2: {bad.skipped[0].reason}"]
    assert results["closed_vqa"]["overall"]["n"] == 3 and results["closed_vqa"]["overall"]["accuracy"] == 2 / 3


def test_cli_skip_bad_lines_counts_and_reports(tmp_path, capsys):
    gold = _write_csv(tmp_path / "gold.csv", GOLD_ROWS)
    pred = _write_preds(tmp_path / "pred.jsonl", [GOOD_PREDS[0], "garbage", "[3]", GOOD_PREDS[2]])
    with open(pred, "a") as fh:
        fh.write('{"id": "2", "outp')  # a torn last line is not a malformed line: ignored, not counted
    out = tmp_path / "out"
    assert main(["eval", "score", "--pred", str(pred), "--gold", str(gold), "--out", str(out), "--bootstrap", "10",
                 "--no-plots", "--skip-bad-lines"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 malformed line(s)" in err and "pred.jsonl:2" in err and "pred.jsonl:3" in err
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert len(meta["skipped_lines"]) == 2
    # without the flag the same file is refused, naming the first bad line
    assert main(["eval", "score", "--pred", str(pred), "--gold", str(gold), "--bootstrap", "10"]) == 2
    assert "pred.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_torn_last_line_of_predictions_is_not_an_error(tmp_path):
    from slidechat.evaluation.scoring import score_files

    gold = _write_csv(tmp_path / "gold.csv", GOLD_ROWS)
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(GOOD_PREDS[:2]) + '\n{"id": "3", "out')
    results, _ = score_files(pred, gold)
    assert results["closed_vqa"]["overall"]["n"] == 3 and results["meta"]["skipped_lines"] == []
