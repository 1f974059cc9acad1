"""Pipeline recipes (``kind: pipeline``): from nothing to an exported checkpoint.

Steps, each skipped when its output is already complete (so ``--resume`` after an interruption continues):

1. ``synth``: a SynthSlide training set (fixed seed) in ``<out>/synth``;
2. ``patch_cnn``: the demo CNN trained on the label maps -> ``<out>/patch_cnn.safetensors``;
3. ``extract``: features of every slide -> ``<out>/features/<slide>.h5`` (resumes slide by slide);
4. data: ``<out>/data/instructions.json`` (MCQ + report questions + open questions) and grounding targets;
5. ``stages``: stage recipes in order, each starting from the previous stage's ``final/`` checkpoint;
6. ``export``: the last checkpoint copied to ``export`` (and the CNN to ``slidechat/assets/demo_cnn.safetensors``);
7. ``evaluate``: closed VQA + pointing game on a fresh SynthSlide set with an unseen seed (``training.measure``).

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
from slidechat.utils.io import write_json_atomic
from slidechat.training.recipe import PipelineRecipe, StageRecipe

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
                  embed_dim: int | None, extract) -> StageRecipe:
    """Fill pipeline paths into a stage: ``{out}``, init_from (previous stage), the patch encoder and feature dim."""
    stage = _subst(copy.deepcopy(stage), str(out))
    if stage.init_from is None and prev_final is not None:
        stage.init_from = str(prev_final)
    if stage.init_from is None:
        model = stage.model
        if cnn_path is not None:
            model.setdefault("patch_encoder", {"name": "demo-cnn", "weights": str(cnn_path.resolve()),
                                               "target_mpp": extract.target_mpp if extract else 0.5,
                                               "patch_size": extract.patch_size if extract else 224})
        if embed_dim is not None:
            model.setdefault("encoder", {}).setdefault("feature_dim", embed_dim)
    return stage


def run_pipeline(recipe: PipelineRecipe, *, resume: bool = False, only: list[str] | None = None) -> dict:
    """Run every step of a pipeline recipe; returns a summary (also written to ``<out>/pipeline.json``)."""
    from slidechat.training.loop import train_stage

    if recipe.threads and not torch.cuda.is_available():
        torch.set_num_threads(recipe.threads)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "pipeline.json"
    summary: dict = json.loads(summary_path.read_text()) if resume and summary_path.exists() else {}
    summary.setdefault("steps", {})
    t_all = time.perf_counter()

    def record(name: str, info: dict) -> None:
        summary["steps"][name] = info
        write_json_atomic(summary_path, summary)

    synth_dir = out / "synth"
    if recipe.synth is not None:
        marker = synth_dir / "dataset.json"
        if marker.exists() and json.loads(marker.read_text()).get("seed") == recipe.synth.seed \
                and json.loads(marker.read_text()).get("n") == recipe.synth.n:
            log.info("[pipeline] synth: %s already complete", synth_dir)
        else:
            from slidechat.synth import generate_dataset

            t = time.perf_counter()
            log.info("[pipeline] synth: %d %s slides, seed %d", recipe.synth.n, recipe.synth.size, recipe.synth.seed)
            generate_dataset(synth_dir, recipe.synth.n, seed=recipe.synth.seed, size=recipe.synth.size)
            record("synth", {"n": recipe.synth.n, "seed": recipe.synth.seed, "wall_time_s": round(time.perf_counter() - t, 1)})

    cnn_path = out / "patch_cnn.safetensors"
    embed_dim = None
    if recipe.patch_cnn is not None:
        from slidechat.training.patch_cnn import PatchCNNTrainConfig, train_patch_cnn

        pc = recipe.patch_cnn
        cfg = PatchCNNTrainConfig(patches_per_slide=pc.patches_per_slide, epochs=pc.epochs, batch_size=pc.batch_size,
                                  lr=pc.lr, seed=pc.seed, input_size=pc.input_size, embed_dim=pc.embed_dim,
                                  target_mpp=recipe.extract.target_mpp if recipe.extract else 0.5,
                                  patch_size=recipe.extract.patch_size if recipe.extract else 224)
        embed_dim = pc.embed_dim
        if cnn_path.exists():
            log.info("[pipeline] patch CNN: %s already trained", cnn_path)
        else:
            log.info("[pipeline] patch CNN: training on %s", synth_dir)
            record("patch_cnn", train_patch_cnn(synth_dir, cnn_path, cfg))

    features_dir = out / "features"
    if recipe.extract is not None:
        from slidechat.encoders import load_encoder
        from slidechat.features.extract import extract_many

        t = time.perf_counter()
        encoder = load_encoder("demo-cnn", weights=str(cnn_path) if cnn_path.exists() else None)
        embed_dim = int(encoder.embed_dim)
        ex = recipe.extract
        summary_ex = extract_many([str(synth_dir / "slides")], encoder, features_dir, target_mpp=ex.target_mpp,
                                  patch_size=ex.patch_size, batch_size=ex.batch_size, num_workers=ex.num_workers)
        if summary_ex.written or "extract" not in summary["steps"]:  # a resume that only skipped keeps the first timing
            record("extract", {"wall_time_s": round(time.perf_counter() - t, 1), "summary": _plain(summary_ex)})

    data_dir = out / "data"
    if recipe.synth is not None:
        from slidechat.training.synth_data import build_demo_instructions, write_grounding_targets

        counts = build_demo_instructions(synth_dir, data_dir / "instructions.json", **recipe.demo_data)
        n_targets = write_grounding_targets(synth_dir, features_dir, out / "grounding")
        record("data", {"samples": counts, "grounding_targets": n_targets})

    prev_final: Path | None = None
    if recipe.slide_pretrain is not None and recipe.stages:
        prev_final = out / "pretrain" / "final"
        if resume and (prev_final / "config.json").exists():
            log.info("[pipeline] slide pretrain: already done (%s)", prev_final)
        else:
            from slidechat.training.model_hooks import build_model
            from slidechat.training.slide_pretrain import SlidePretrainConfig, pretrain_slide_encoder

            first = prepare_stage(recipe.stages[0], out, None, cnn_path if cnn_path.exists() else None, embed_dim,
                                  recipe.extract)
            first.train.train_llm = "frozen"
            torch.manual_seed(first.train.seed)
            model = build_model(first)
            m = pretrain_slide_encoder(model, synth_dir, features_dir, first.data.grounding_dir,
                                       SlidePretrainConfig(**recipe.slide_pretrain))
            model.save_pretrained(prev_final)
            record("slide_pretrain", m)
            del model
    stage_metrics = []
    for stage in recipe.stages:
        if prev_final is not None and stage.init_from is None:
            stage = copy.deepcopy(stage)
            stage.model = {}
        st = prepare_stage(stage, out, prev_final, cnn_path if cnn_path.exists() else None, embed_dim, recipe.extract)
        final = Path(st.output_dir) / "final"
        if resume and (Path(st.output_dir) / "metrics.json").exists() and (final / "config.json").exists():
            log.info("[pipeline] %s: already trained (%s)", st.name, final)
            m = json.loads((Path(st.output_dir) / "metrics.json").read_text())
        else:
            m = train_stage(st, resume=resume)
            m.pop("model", None)
        stage_metrics.append(m)
        record(st.name, {k: m.get(k) for k in ("steps", "first_loss", "final_loss", "wall_time_s", "tokens_per_s",
                                               "train_samples", "skipped", "fixed_batches_loss_before",
                                               "fixed_batches_loss_after")})
        prev_final = final

    if recipe.export and prev_final is not None:
        export_checkpoint(prev_final, Path(recipe.export), cnn_path if cnn_path.exists() else None)
        record("export", {"path": recipe.export, "size_mb": round(dir_size(Path(recipe.export)) / 1e6, 2)})

    summary["wall_time_s"] = round(time.perf_counter() - t_all + summary.get("wall_time_s_before", 0.0), 1)
    write_json_atomic(summary_path, summary)

    if recipe.evaluate and prev_final is not None:
        from slidechat.training.measure import measure_checkpoint

        ev = dict(recipe.evaluate)
        res = measure_checkpoint(Path(recipe.export or prev_final), out / "eval", **ev)
        record("evaluate", res["summary"])
    return summary


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
