"""Pipeline recipes (``kind: pipeline``): from nothing to an exported checkpoint.

Steps, each skipped when its output is already complete (so ``--resume`` after an interruption continues):

1. ``synth``: a SynthSlide training set (fixed seed) in ``<out>/synth``;
2. ``patch_cnn``: the demo CNN trained on the label maps -> ``<out>/patch_cnn.safetensors``;
3. ``extract``: features of every slide -> ``<out>/features/<slide>.h5`` (resumes slide by slide);
4. data: ``<out>/data/instructions.json`` (MCQ + report questions + open questions) and grounding targets;
4b. ``slide_pretrain`` / ``patch_readout``: the slide side taught the SynthSlide truth without the LLM; the
   readout (on the pre-trained slide side, or on the ``init_from`` checkpoint) reads concepts from patch classes;
5. ``stages``: stage recipes in order, each starting from the previous stage's ``final/`` checkpoint (with the
   statistics of its training features, ``feature_stats.*``, for the out-of-distribution warning);
6. ``export``: the last checkpoint copied to ``export`` (and the CNN to ``slidechat/assets/demo_cnn.safetensors``);
7. ``evaluate``: ``slidechat eval run`` (the recipe's tasks: closed VQA, free text fact by fact, reports, pointing
   game) on a fresh SynthSlide set with an unseen seed; its summary is recorded in ``pipeline.json``, the full
   results in ``<out>/eval/run-<last stage>/``.

Paths inside stage recipes may use ``{out}`` for the pipeline's output folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from slidechat.errors import ConfigError
from slidechat.slide.config import DEFAULT_PATCH_SIZE, DEFAULT_TARGET_MPP, ExtractionConfig
from slidechat.training.model_hooks import LLM_TRAINING_OPTIONS
from slidechat.training.recipe import EvaluateStep, PipelineRecipe, StageRecipe, SynthStep
from slidechat.utils.io import write_json_atomic

log = logging.getLogger("training")


def _subst(value, out: str):
    if isinstance(value, str):
        return value.replace("{out}", out)
    if isinstance(value, list):
        return [_subst(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, out) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            setattr(value, f.name, _subst(getattr(value, f.name), out))
        return value
    return value


def prepare_stage(stage: StageRecipe, out: Path, prev_final: Path | None, cnn_path: Path | None,
                  embed_dim: int | None, extract: ExtractionConfig | None) -> StageRecipe:
    """Fill pipeline paths into a stage: ``{out}``, init_from (previous stage), the patch encoder and feature dim."""
    stage = _subst(copy.deepcopy(stage), str(out))
    if stage.init_from is None and prev_final is not None:
        stage.init_from = str(prev_final)
    if stage.init_from is None:
        model = stage.model
        if cnn_path is not None:
            model.setdefault("patch_encoder", {"name": "demo-cnn", "weights": str(cnn_path.resolve()),
                                               "target_mpp": extract.target_mpp if extract else DEFAULT_TARGET_MPP,
                                               "patch_size": extract.patch_size if extract else DEFAULT_PATCH_SIZE})
        if embed_dim is not None:
            model.setdefault("encoder", {}).setdefault("feature_dim", embed_dim)
    return stage


class _Run:
    """One pipeline run: its folders, the summary file (``<out>/pipeline.json``) and what earlier steps made."""

    def __init__(self, recipe: PipelineRecipe, resume: bool) -> None:
        self.recipe, self.resume = recipe, resume
        self.out = Path(recipe.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.summary_path = self.out / "pipeline.json"
        self.summary: dict = json.loads(self.summary_path.read_text()) if resume and self.summary_path.exists() else {}
        self.summary.setdefault("steps", {})
        self.synth_dir = self.out / "synth"
        self.cases_dir = self.out / "synth_cases"
        self.cnn_path = self.out / "patch_cnn.safetensors"
        self.features_dir = self.out / "features"
        self.embed_dim: int | None = None
        self.prev_final: Path | None = None

    @property
    def cnn(self) -> Path | None:
        return self.cnn_path if self.cnn_path.exists() else None

    def record(self, name: str, info: dict) -> None:
        self.summary["steps"][name] = info
        write_json_atomic(self.summary_path, self.summary)


def _synth_step(run: _Run) -> None:
    step = run.recipe.synth
    marker = run.synth_dir / "dataset.json"
    if marker.exists():
        made = json.loads(marker.read_text())
        made.setdefault("lesion_probability", SynthStep.lesion_probability)  # not recorded before: the default
        wanted = {"seed": step.seed, "n": step.n, "lesion_probability": step.lesion_probability}
        if {k: made.get(k) for k in wanted} == wanted:
            log.info("[pipeline] synth: %s already complete", run.synth_dir)
            return
    from slidechat.synth import generate_dataset

    t = time.perf_counter()
    log.info("[pipeline] synth: %d %s slides, seed %d", step.n, step.size, step.seed)
    generate_dataset(run.synth_dir, step.n, seed=step.seed, size=step.size,
                     lesion_probability=step.lesion_probability)
    run.record("synth", {"n": step.n, "seed": step.seed, "wall_time_s": round(time.perf_counter() - t, 1)})


def _cases_step(run: _Run) -> None:
    step = run.recipe.cases
    marker = run.cases_dir / "dataset.json"
    source = str(Path(step.from_dataset)) if step.from_dataset else None  # composed cases name their source folder
    if marker.exists() and {k: json.loads(marker.read_text()).get(k) for k in ("seed", "n_cases", "source")} == {
            "seed": step.seed, "n_cases": step.n_cases, "source": source}:
        log.info("[pipeline] cases: %s already complete", run.cases_dir)
        return
    from slidechat.synth.cases import compose_case_dataset, generate_case_dataset

    t = time.perf_counter()
    if step.from_dataset:
        log.info("[pipeline] cases: %d cases of %d-%d slides of %s, seed %d", step.n_cases, step.min_slides,
                 step.max_slides, step.from_dataset, step.seed)
        compose_case_dataset(step.from_dataset, run.cases_dir, step.n_cases, seed=step.seed,
                             min_slides=step.min_slides, max_slides=step.max_slides)
    else:
        log.info("[pipeline] cases: %d cases of %d-%d %s slides, seed %d", step.n_cases, step.min_slides,
                 step.max_slides, step.size, step.seed)
        generate_case_dataset(run.cases_dir, step.n_cases, seed=step.seed, size=step.size,
                              min_slides=step.min_slides, max_slides=step.max_slides)
    run.record("cases", {"n_cases": step.n_cases, "seed": step.seed, "wall_time_s": round(time.perf_counter() - t, 1)})


def _patch_cnn_step(run: _Run) -> None:
    from slidechat.training.patch_cnn import train_patch_cnn

    cfg, ex = run.recipe.patch_cnn, run.recipe.extract
    if ex is not None:  # the CNN sees patches cut as extraction will cut them
        cfg = dataclasses.replace(cfg, target_mpp=ex.target_mpp, patch_size=ex.patch_size)
    run.embed_dim = cfg.embed_dim
    if run.cnn_path.exists():
        log.info("[pipeline] patch CNN: %s already trained", run.cnn_path)
        return
    log.info("[pipeline] patch CNN: training on %s", run.synth_dir)
    run.record("patch_cnn", train_patch_cnn(run.synth_dir, run.cnn_path, cfg, output_dir=run.out / "patch_cnn",
                                            resume=run.resume))


def _extract_step(run: _Run) -> None:
    from slidechat.encoders import load_encoder
    from slidechat.features.extract import extract_many

    t = time.perf_counter()
    encoder = load_encoder("demo-cnn", weights=str(run.cnn) if run.cnn else None)
    run.embed_dim = int(encoder.embed_dim)
    folders = [d / "slides" for d in (run.synth_dir, run.cases_dir) if (d / "slides").is_dir()]
    if not folders:  # cases composed of an earlier dataset's slides: their features exist already
        log.info("[pipeline] extract: no new slides")
        return
    summary = extract_many([str(d) for d in folders], encoder, run.features_dir, run.recipe.extract)
    if summary.written or "extract" not in run.summary["steps"]:  # a resume that only skipped keeps the first timing
        run.record("extract", {"wall_time_s": round(time.perf_counter() - t, 1), "summary": _plain(summary)})


def _data_step(run: _Run) -> None:
    from slidechat.training.synth_data import (build_case_instructions, build_demo_instructions,
                                               write_grounding_targets)

    info: dict = {}
    if run.recipe.synth is not None:
        info["samples"] = build_demo_instructions(run.synth_dir, run.out / "data" / "instructions.json",
                                                  **run.recipe.demo_data)
        info["grounding_targets"] = write_grounding_targets(run.synth_dir, run.features_dir, run.out / "grounding")
    if run.recipe.cases is not None:
        info["case_samples"] = build_case_instructions(run.cases_dir, run.out / "data" / "case_instructions.json",
                                                       **run.recipe.case_data)
    run.record("data", info)


def _slide_pretrain_step(run: _Run) -> None:
    recipe = run.recipe
    run.prev_final = run.out / "pretrain" / "final"
    if run.resume and (run.prev_final / "config.json").exists():
        log.info("[pipeline] slide pretrain: already done (%s)", run.prev_final)
        return
    from slidechat.training.model_hooks import build_model
    from slidechat.training.slide_pretrain import pretrain_slide_encoder

    first = prepare_stage(recipe.stages[0], run.out, None, run.cnn, run.embed_dim, recipe.extract)
    first.model.setdefault("llm", {})["mode"] = "frozen"
    torch.manual_seed(first.train.seed)
    model = build_model(first)
    m = pretrain_slide_encoder(model, run.synth_dir, run.features_dir, first.data.grounding_dir,
                               recipe.slide_pretrain, output_dir=run.out / "pretrain", resume=run.resume)
    m.pop("model", None)
    run.record("slide_pretrain", m)


def _patch_readout_step(run: _Run) -> None:
    cfg = run.recipe.patch_readout
    src = Path(cfg.init_from) if cfg.init_from else run.prev_final
    if src is None:
        raise ConfigError("patch_readout needs init_from (a checkpoint) or a slide_pretrain step before it")
    out = run.out / "readout"
    if run.resume and (out / "final" / "config.json").is_file() and (out / "metrics.json").is_file():
        log.info("[pipeline] patch readout: already done (%s)", out / "final")
    else:
        from slidechat.model.assistant import SlideAssistant
        from slidechat.training.patch_readout import train_patch_readout

        log.info("[pipeline] patch readout: %s on %s", sorted(cfg.read), src)
        model = SlideAssistant.from_pretrained(src)
        if cfg.val_seed is not None and not cfg.val_synth_dir:
            cfg = _fresh_validation_set(model, run.out / f"val-seed{cfg.val_seed}", cfg)
        run.record("patch_readout", train_patch_readout(model, cfg, cfg.synth_dir or run.synth_dir,
                                                        cfg.features_dir or run.features_dir, out))
    run.prev_final = out / "final"


def _fresh_validation_set(model, val_dir: Path, cfg):
    """``cfg.val_n`` SynthSlides of ``cfg.val_seed`` and their features (the checkpoint's own patch encoder)."""
    from slidechat.features.extract import extract_many
    from slidechat.inference.encode import load_patch_encoder
    from slidechat.synth import generate_dataset

    if not (val_dir / "dataset.json").exists():
        generate_dataset(val_dir, cfg.val_n, seed=cfg.val_seed, size="tiny",
                         lesion_probability=cfg.val_lesion_probability)
    ref = model.config.patch_encoder
    extract_many([str(val_dir / "slides")], load_patch_encoder(model), val_dir / "features",
                 ExtractionConfig(target_mpp=ref.target_mpp, patch_size=ref.patch_size, num_workers=0))
    return dataclasses.replace(cfg, val_synth_dir=str(val_dir), val_features_dir=str(val_dir / "features"))


STAGE_SUMMARY_KEYS = ("steps", "first_loss", "final_loss", "wall_time_s", "tokens_per_s", "train_samples", "skipped",
                      "fixed_batches_loss_before", "fixed_batches_loss_after")


def _stage_steps(run: _Run) -> None:
    from slidechat.training.loop import train_stage

    for stage in run.recipe.stages:
        if run.prev_final is not None and stage.init_from is None:  # the architecture is in prev_final
            stage = copy.deepcopy(stage)
            llm = stage.model.get("llm") or {}
            stage.model = {"llm": {k: llm[k] for k in LLM_TRAINING_OPTIONS if k in llm}} if llm else {}
        st = prepare_stage(stage, run.out, run.prev_final, run.cnn, run.embed_dim, run.recipe.extract)
        final = Path(st.output_dir) / "final"
        if run.resume and (Path(st.output_dir) / "metrics.json").exists() and (final / "config.json").exists():
            log.info("[pipeline] %s: already trained (%s)", st.name, final)
            m = json.loads((Path(st.output_dir) / "metrics.json").read_text())
        else:
            m = train_stage(st, resume=run.resume)
            m.pop("model", None)
        run.record(st.name, {k: m.get(k) for k in STAGE_SUMMARY_KEYS})
        run.prev_final = final


def evaluation_summary(results: dict) -> dict:
    """The pipeline's record of an ``eval run``: closed-VQA accuracy (overall, per category), open-answer fact
    accuracy (overall, per type), fact precision and contradiction rate of captions and reports, report fields,
    pointing game -- each where the run has it."""
    out: dict = {}
    vqa = results.get("closed_vqa")
    if vqa:
        out["closed_vqa_accuracy"] = round(float(vqa["overall"]["accuracy"]), 4)
        out["questions"] = int(vqa["overall"]["n"])
        out["per_category"] = {c: {"accuracy": round(float(e["accuracy"]), 4), "n": int(e["n"])}
                               for c, e in sorted(vqa.get("narrow_category", {}).items())}
        out["unparseable"] = len(vqa.get("unparseable", []))
    facts = results.get("facts") or {}
    if facts.get("open_vqa"):
        ov = facts["open_vqa"]
        out["open_fact_accuracy"] = round(float(ov["overall"]["accuracy"]), 4)
        out["open_per_type"] = {c: round(float(e["accuracy"]), 4) for c, e in sorted(ov["per_category"].items())}
    for task in ("captioning", "reports"):
        if facts.get(task) and facts[task]["fact_precision"]["value"] is not None:
            out[f"{task}_fact_precision"] = round(float(facts[task]["fact_precision"]["value"]), 4)
            out[f"{task}_contradiction_rate"] = round(float(facts[task]["contradiction_rate"]["value"]), 4)
    rf = results.get("report_fields")
    if rf and rf.get("mean_field_accuracy") is not None:
        out["report_fields_mean"] = round(float(rf["mean_field_accuracy"]), 4)
        out["report_fields_min"] = round(min(float(f["accuracy"]) for f in rf["fields"].values()), 4)
        out["reports_all_right"] = round(float(rf["exact_report"]), 4)
    g = results.get("grounding")
    if g and g.get("n"):
        out["pointing_game_mask"] = round(float(g["pointing_game"]), 4)
        out["mass_in_lesion"] = round(float(g["mass_in_lesion"]), 4)
        out["lesion_slides"] = int(g["n"])
    return out


def evaluate_checkpoint(checkpoint: Path, out_dir: Path, step: EvaluateStep, name: str = "run") -> dict:
    """Generate (or reuse) the fresh SynthSlide set and run the evaluation runner on it (results in
    ``out_dir/<name>``, cases in ``out_dir/<name>-cases``); returns the summary."""
    from slidechat.evaluation.runner import EvalRunConfig, run_evaluation
    from slidechat.synth import generate_dataset

    synth_dir = Path(step.synth_dir) if step.synth_dir else out_dir / f"synth-seed{step.seed}"
    if not (synth_dir / "dataset.json").exists():
        generate_dataset(synth_dir, step.n, seed=step.seed, size=step.size)
    results = run_evaluation(EvalRunConfig(checkpoint=str(checkpoint), data=str(synth_dir), out_dir=str(out_dir / name),
                                           tasks=list(step.tasks), limit=step.limit,
                                           mcq_max_new_tokens=step.max_new_tokens,
                                           cache_dir=str(out_dir / "feature-cache"), progress=False))
    summary = {"checkpoint": str(checkpoint), "eval_seed": step.seed, "slides": len(list(
        (synth_dir / "slides").iterdir())) if (synth_dir / "slides").is_dir() else None, **evaluation_summary(results)}
    if step.cases > 0:
        from slidechat.synth.cases import generate_case_dataset

        case_dir = out_dir / f"cases-seed{step.seed}"
        if not (case_dir / "dataset.json").exists():
            generate_case_dataset(case_dir, step.cases, seed=step.seed, size=step.size)
        bench = case_dir / "case_closed_vqa.csv"
        case_results = run_evaluation(EvalRunConfig(
            checkpoint=str(checkpoint), data=str(bench), slides_dir=str(case_dir / "slides"),
            out_dir=str(out_dir / f"{name}-cases"), tasks=["closed_vqa"], mcq_max_new_tokens=step.case_max_new_tokens,
            cache_dir=str(out_dir / "feature-cache"), progress=False))
        summary["cases"] = {"n_cases": step.cases, **evaluation_summary(case_results)}
    log.info("[pipeline] evaluation: %s", json.dumps(summary))
    return summary


def run_pipeline(recipe: PipelineRecipe, *, resume: bool = False) -> dict:
    """Run every step of a pipeline recipe; returns a summary (also written to ``<out>/pipeline.json``)."""
    if recipe.threads and not torch.cuda.is_available():
        torch.set_num_threads(recipe.threads)
    run = _Run(recipe, resume)
    t_all = time.perf_counter()
    if recipe.synth is not None:
        _synth_step(run)
    if recipe.cases is not None:
        _cases_step(run)
    if recipe.patch_cnn is not None:
        _patch_cnn_step(run)
    if recipe.extract is not None:
        _extract_step(run)
    if recipe.synth is not None or recipe.cases is not None:
        _data_step(run)
    if recipe.slide_pretrain is not None and recipe.stages:
        _slide_pretrain_step(run)
    if recipe.patch_readout is not None:
        _patch_readout_step(run)
    _stage_steps(run)
    if recipe.export and run.prev_final is not None:
        export_checkpoint(run.prev_final, Path(recipe.export), run.cnn)
        run.record("export", {"path": recipe.export, "size_mb": round(dir_size(Path(recipe.export)) / 1e6, 2)})
    run.summary["wall_time_s"] = round(time.perf_counter() - t_all + run.summary.get("wall_time_s_before", 0.0), 1)
    write_json_atomic(run.summary_path, run.summary)
    if recipe.evaluate is not None and run.prev_final is not None:
        # one results folder per final stage: a resumed run never mixes answers of two checkpoints
        run.record("evaluate", evaluate_checkpoint(Path(recipe.export or run.prev_final), run.out / "eval",
                                                   recipe.evaluate, name=f"run-{run.prev_final.parent.name}"))
    return run.summary


def _plain(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj][:20]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_checkpoint(src: Path, dst: Path, cnn_path: Path | None = None, max_mb: float = 30.0) -> Path:
    """Copy a checkpoint folder to ``dst`` (replacing it atomically) and check it fits the repo budget."""
    size = dir_size(src) / 1e6
    if size > max_mb:
        raise ConfigError(f"checkpoint {src} is {size:.1f} MB > {max_mb} MB; shrink the model before exporting")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    if cnn_path is not None:  # the default weights of load_encoder("demo-cnn")
        assets = Path(__file__).resolve().parent.parent / "slidechat" / "assets"
        if dst.resolve().parent == assets.resolve():
            shutil.copyfile(cnn_path, assets / "demo_cnn.safetensors")
    log.info("[pipeline] exported %s (%.1f MB) to %s", src, size, dst)
    return dst
