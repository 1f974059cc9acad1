"""Pipeline recipes: from nothing (SynthSlide) to an evaluated checkpoint on the one trainer, resumable; the
evaluate step is the evaluation runner (closed VQA per category + pointing game), also on the shipped demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slidechat.slide.config import ExtractionConfig
from slidechat.training.patch_cnn import PatchCNNTrainConfig
from slidechat.training.pipeline import evaluate_checkpoint, run_pipeline
from slidechat.training.recipe import EvaluateStep, recipe_from_dict
from slidechat.training.slide_pretrain import SlidePretrainConfig

DEMO = Path(__file__).resolve().parents[2] / "slidechat" / "assets" / "demo"


def tiny_pipeline(out: Path, llm: Path) -> dict:
    stage = {"name": "stage1", "stage": 1, "output_dir": "{out}/stage1",
             "model": {"encoder": {"hidden_size": 32, "num_heads": 2, "region_size": 2, "num_slide_tokens": 2},
                       "projector": "qformer",
                       "qformer": {"num_query_tokens": 4, "hidden_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "intermediate_size": 64},
                       "llm": {"name_or_path": str(llm)}},
             "data": {"sources": [{"path": "{out}/data/instructions.json"}], "features_dir": "{out}/features",
                      "grounding_dir": "{out}/grounding", "max_length": 512},
             "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0,
                       "train_modules": ["projector"], "log_every": 1}}
    return {"kind": "pipeline", "name": "tiny-pipeline", "output_dir": str(out),
            "synth": {"n": 3, "seed": 7, "size": "tiny"},
            "patch_cnn": {"patches_per_slide": 6, "epochs": 1, "batch_size": 8, "channels": [8, 8, 8, 8],
                          "embed_dim": 16},
            "extract": {"target_mpp": 2.0, "batch_size": 32, "num_workers": 0},  # few patches: fast
            "demo_data": {"mcq_rounds": 1},
            "slide_pretrain": {"epochs": 2, "batch_size": 2, "val_fraction": 0.0},
            "stages": [stage],
            "evaluate": {"n": 2, "seed": 99, "limit": 2, "max_new_tokens": 4}}


def test_pipeline_runs_every_step_on_the_trainer_and_resumes(tiny_llm_dir, tmp_path):
    recipe = recipe_from_dict(tiny_pipeline(tmp_path / "run", tiny_llm_dir))
    assert isinstance(recipe.patch_cnn, PatchCNNTrainConfig) and isinstance(recipe.extract, ExtractionConfig)
    assert isinstance(recipe.slide_pretrain, SlidePretrainConfig) and isinstance(recipe.evaluate, EvaluateStep)
    summary = run_pipeline(recipe)
    steps = summary["steps"]
    assert set(steps) >= {"synth", "patch_cnn", "extract", "data", "slide_pretrain", "stage1", "evaluate"}
    run = tmp_path / "run"
    # every trained step went through the trainer: its log and metrics next to its output
    for folder in ("patch_cnn", "pretrain", "stage1"):
        assert (run / folder / "log.csv").read_text().startswith("step,epoch,loss")
        assert json.loads((run / folder / "metrics.json").read_text())["interrupted"] is False
    assert steps["slide_pretrain"]["steps"] == 4 and steps["stage1"]["steps"] == 2
    ev = steps["evaluate"]
    assert ev["questions"] == 2 and 0.0 <= ev["closed_vqa_accuracy"] <= 1.0 and ev["per_category"]
    assert (run / "eval" / "run-stage1" / "results.json").is_file()  # one folder per evaluated stage
    again = run_pipeline(recipe, resume=True)  # everything is complete: nothing is trained again
    assert again["steps"]["stage1"]["final_loss"] == steps["stage1"]["final_loss"]
    assert again["steps"]["slide_pretrain"] == steps["slide_pretrain"]


def test_synth_step_keeps_a_complete_folder_and_remakes_one_of_another_lesion_probability(tmp_path):
    from slidechat.training.pipeline import _Run, _synth_step

    def synth(p: float) -> dict:
        recipe = recipe_from_dict({"kind": "pipeline", "output_dir": str(tmp_path / "run"),
                                   "synth": {"n": 1, "seed": 3, "lesion_probability": p}})
        _synth_step(_Run(recipe, resume=True))
        return json.loads((tmp_path / "run" / "synth" / "dataset.json").read_text())

    def lesion() -> bool:
        return json.loads((tmp_path / "run" / "synth" / "truth.jsonl").read_text())["lesion"] is not None

    assert synth(0.0)["lesion_probability"] == 0.0 and not lesion()
    marker = tmp_path / "run" / "synth" / "dataset.json"
    made = marker.stat().st_mtime_ns
    synth(0.0)
    assert marker.stat().st_mtime_ns == made  # complete: not made again
    assert synth(1.0)["lesion_probability"] == 1.0 and lesion()  # asked for another probability: made again


def test_evaluate_step_scores_the_demo_checkpoint(tmp_path):
    """One fresh slide with the demo recipe's unseen eval seed: the step generates it, then asks and points."""
    summary = evaluate_checkpoint(DEMO, tmp_path / "eval", EvaluateStep(n=1, seed=98765, limit=2))
    assert summary["slides"] == 1 and summary["questions"] == 2, summary
    assert summary["closed_vqa_accuracy"] == 1.0 and sum(c["n"] for c in summary["per_category"].values()) == 2
    assert summary["lesion_slides"] >= 1 and summary["pointing_game_mask"] is not None


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[2] / "training" /
                                                         "recipes").glob("*.yaml")))
def test_committed_recipes_load(name):
    from slidechat.training.recipe import load_recipe

    load_recipe(Path(__file__).resolve().parents[2] / "training" / "recipes" / name)


def test_evaluation_summary_records_free_text_and_report_scores():
    from slidechat.training.pipeline import evaluation_summary

    ci = {"ci_low": 0.0, "ci_high": 1.0, "n": 4}
    results = {
        "closed_vqa": {"overall": {"accuracy": 0.75, "n": 4},
                       "narrow_category": {"Dominant tissue": {"accuracy": 1.0, "n": 2}}},
        "facts": {"open_vqa": {"overall": {"accuracy": 0.5, **ci},
                               "per_category": {"presence": {"accuracy": 0.25, **ci},
                                                "lesion": {"accuracy": 1.0, **ci}}},
                  "captioning": {"fact_precision": {"value": 0.9, **ci}, "contradiction_rate": {"value": 0.0, **ci}},
                  "reports": {"fact_precision": {"value": None, **ci}, "contradiction_rate": {"value": None, **ci}}},
        "report_fields": {"mean_field_accuracy": 0.8, "exact_report": 0.5,
                          "fields": {"a": {"accuracy": 1.0, "n": 2}, "b": {"accuracy": 0.6, "n": 2}}},
    }
    out = evaluation_summary(results)
    assert out["closed_vqa_accuracy"] == 0.75 and out["open_fact_accuracy"] == 0.5
    assert out["open_per_type"] == {"lesion": 1.0, "presence": 0.25}
    assert out["captioning_fact_precision"] == 0.9 and out["captioning_contradiction_rate"] == 0.0
    assert "reports_fact_precision" not in out  # a task without claims is left out, not reported as 0
    assert (out["report_fields_mean"], out["report_fields_min"], out["reports_all_right"]) == (0.8, 0.6, 0.5)
    assert "pointing_game_mask" not in out
