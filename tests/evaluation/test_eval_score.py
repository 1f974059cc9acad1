"""`slidechat eval score` / `compare` on hand-made files (no model), SlideBench loading, the resume log."""

from __future__ import annotations

import csv
import json

import pytest

from slidechat.evaluation.closed_vqa import BootstrapConfig, score_closed_vqa
from slidechat.utils.io import JsonlLog, repair_torn_tail
from slidechat.evaluation.slidebench import format_mcq_prompt, load_closed_vqa, load_predictions
from slidechat.cli import main
from slidechat.errors import DataError

COLUMNS = ["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D", "Answer"]
GOLD_ROWS = [
    [1, "TCGA-01", "BRCA", "Microscopy", "Tissue", "Which tissue dominates?", "Tumor", "Stroma", "Fat", "", "A"],
    [2, "TCGA-01", "BRCA", "Microscopy", "Cells", "Which cells?", "Lymphocytes", "Neutrophils", "Plasma cells",
     "Macrophages", "C"],
    [3, "TCGA-02", "LUAD", "Diagnosis", "Subtype", "What subtype?", "Adenocarcinoma", "Squamous", "Small cell",
     "Large cell", "A"],
    [4, "TCGA-02", "LUAD", "Diagnosis", "Grade", "Which grade?", "1", "2", "3", "", "B"],
    [5, "TCGA-03", "LUAD", "Diagnosis", "Subtype", "What subtype?", "Adenocarcinoma", "Squamous", "", "", "B"],
]
# outputs -> parsed: A (right), B (wrong), A via option text (right), unparseable (wrong), "(B)" (right)
OUTPUTS = {"1": "A", "2": "The answer is (B).", "3": "adenocarcinoma", "4": "I cannot tell", "5": "(B)"}


def _write_gold(path, bom=True):
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([c if i else c for i, c in enumerate(COLUMNS)])
        w.writerows(GOLD_ROWS)
    return path


def test_slidebench_csv_loads_as_released(tmp_path):
    items = load_closed_vqa(_write_gold(tmp_path / "SlideBench-VQA-TCGA.csv"))
    assert [i.id for i in items] == ["1", "2", "3", "4", "5"]
    assert items[0].options == {"A": "Tumor", "B": "Stroma", "C": "Fat", "D": ""}
    assert items[3].answer == "B" and items[2].broad_category == "Diagnosis" and items[1].tumor == "BRCA"
    prompt = format_mcq_prompt(items[0])
    assert "A. Tumor" in prompt and "D." not in prompt and prompt.startswith("Which tissue dominates?")


def test_bad_gold_raises_data_error(tmp_path):
    p = tmp_path / "g.csv"
    p.write_text("ID,Question,A,B,Answer\n1,q?,x,y,Z\n")
    with pytest.raises(DataError, match="answer"):
        load_closed_vqa(p)
    with pytest.raises(DataError, match="not found"):
        load_closed_vqa(tmp_path / "missing.csv")


def test_score_closed_vqa_known_accuracy():
    items = load_closed_vqa_from_rows()
    summary, records = score_closed_vqa(items, OUTPUTS, BootstrapConfig(n_resamples=500, seed=1))
    assert summary["overall"]["accuracy"] == pytest.approx(3 / 5) and summary["overall"]["n_correct"] == 3
    assert summary["unparseable"] == ["4"] and summary["missing"] == []
    assert summary["broad_category"]["Microscopy"]["accuracy"] == 0.5
    assert summary["broad_category"]["Diagnosis"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["narrow_category"]["Subtype"]["accuracy"] == 1.0
    lo, hi = summary["overall"]["ci_low"], summary["overall"]["ci_high"]
    assert 0 <= lo < 0.6 < hi <= 1
    assert [r["parsed"] for r in records] == ["A", "B", "A", None, "B"]
    # a question without a prediction is wrong and listed
    summary2, _ = score_closed_vqa(items, {k: v for k, v in OUTPUTS.items() if k != "5"})
    assert summary2["missing"] == ["5"] and summary2["overall"]["accuracy"] == pytest.approx(2 / 5)


def load_closed_vqa_from_rows():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return load_closed_vqa(_write_gold(Path(d) / "g.csv"))


def test_eval_score_cli_jsonl_predictions(tmp_path, capsys):
    gold = _write_gold(tmp_path / "gold.csv")
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"id": k, "output": v}) + "\n" for k, v in OUTPUTS.items()))
    out = tmp_path / "res"
    assert main(["eval", "score", "--pred", str(pred), "--gold", str(gold), "--out", str(out),
                 "--bootstrap", "200"]) == 0
    assert "60.0" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["closed_vqa"]["overall"]["accuracy"] == pytest.approx(0.6)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and sum(p["correct"] for p in preds) == 3
    assert (out / "plots" / "closed_vqa_broad_category.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "| **overall** | 60.0" in md and "Unparseable answers (counted wrong): 1" in md


def test_eval_score_slidechat_output_csv_without_gold(tmp_path):
    """SlideChat's inference CSV (gold columns + Output) is re-scored with our parser, --gold optional."""
    path = tmp_path / "slidechat_output.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS + ["Output"])
        for row in GOLD_ROWS:
            w.writerow(row + [OUTPUTS[str(row[0])]])
    assert load_predictions(path)["2"] == "The answer is (B)."
    out = tmp_path / "res"
    assert main(["eval", "score", "--pred", str(path), "--out", str(out), "--bootstrap", "100"]) == 0
    assert json.loads((out / "results.json").read_text())["closed_vqa"]["overall"]["accuracy"] == pytest.approx(0.6)


def test_eval_score_open_text_and_report_fields(tmp_path):
    gold = tmp_path / "reports.jsonl"
    gold.write_text("".join(json.dumps(r) + "\n" for r in [
        {"slide_id": "s1", "report_text": "the cat is on the mat", "report": {"dominant_tissue": "stroma"}},
        {"slide_id": "s2", "report_text": "a dog runs in the park", "report": {"dominant_tissue": "fat"}},
    ]))
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in [
        {"slide_id": "s1", "output": "the cat sat on the mat", "fields": {"dominant_tissue": "Stroma"}},
        {"slide_id": "s2", "output": "a dog runs in the park.", "fields": {"dominant_tissue": "tumour"}},
    ]))
    out = tmp_path / "res"
    assert main(["eval", "score", "--pred", str(pred), "--gold", str(gold), "--out", str(out),
                 "--no-meteor", "--no-embedding"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["reports"]["BLEU-1"] == pytest.approx(11 / 12, abs=1e-6) and r["reports"]["n"] == 2
    assert r["report_fields"]["fields"]["dominant_tissue"]["accuracy"] == 0.5
    assert "## Structured report fields" in (out / "results.md").read_text()


def test_eval_compare_table(tmp_path, capsys):
    gold = _write_gold(tmp_path / "gold.csv")
    for name, outputs in [("model_a", OUTPUTS), ("model_b", {k: "A" for k in OUTPUTS})]:
        pred = tmp_path / f"{name}.jsonl"
        pred.write_text("".join(json.dumps({"id": k, "output": v}) + "\n" for k, v in outputs.items()))
        assert main(["eval", "score", "--pred", str(pred), "--gold", str(gold), "--out", str(tmp_path / name),
                     "--no-plots", "--bootstrap", "50"]) == 0
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "model_a"), str(tmp_path / "model_b"),
                 "--out", str(tmp_path / "cmp.md")]) == 0
    table = (tmp_path / "cmp.md").read_text()
    # model_a 3/5 = 0.600; model_b answers A everywhere: right on 1 and 3 -> 0.400
    assert "| closed_vqa/accuracy | **0.600** | 0.400 |" in table
    assert table.splitlines()[0] == "| metric | model_a | model_b |"
    assert main(["eval", "compare", str(tmp_path / "nothing")]) == 2  # a user error, not a traceback


def test_jsonl_log_repairs_a_torn_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(path)
    log.append({"id": "a"})
    log.append({"id": "b"})
    with open(path, "a") as fh:
        fh.write('{"id": "c", "outp')  # killed mid-write
    reopened = JsonlLog(path)
    assert reopened.done == {"a", "b"}
    reopened.append({"id": "c"})
    lines = path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]
    assert repair_torn_tail(path) == 0
