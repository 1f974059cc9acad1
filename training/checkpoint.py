"""Mid-run checkpoints for exact resume: trainable weights, optimizer, scheduler, RNG and sampler state.

Layout of ``<output_dir>/checkpoints/step-000123/`` (written to a temp folder, then renamed)::

    trainable.safetensors   parameters with requires_grad (the frozen LLM is rebuilt, never copied)
    optimizer.pt / scheduler.pt   tensors and numbers only; read with torch.load(weights_only=True)
    rng.safetensors         torch CPU (+ CUDA) generator states
    trainer_state.json      step, epoch, batches consumed, python/numpy RNG, skip counts, timings

Under DeepSpeed or FSDP the model/optimizer shards are saved with ``accelerator.save_state`` instead
(into ``accelerate_state/``); the JSON state and RNG files are the same.

A finished model folder also gets the statistics of the patch features it was trained on
(:func:`write_feature_stats`; ``slidechat.model.feature_stats``), for the out-of-distribution warning.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from slidechat.errors import CheckpointError, SlideChatError

STATE_FILE = "trainer_state.json"
FEATURE_SUFFIXES = (".h5", ".hdf5")

log = logging.getLogger("training")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).exists()]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    py = random.getstate()
    np_state = np.random.get_state()
    json_state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return json_state, tensors


def _set_rng_state(json_state: dict, tensors: dict[str, torch.Tensor]) -> None:
    py = json_state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = json_state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def save_checkpoint(ckpt_dir: Path, *, model: torch.nn.Module, optimizer, scheduler, state: dict,
                    accelerator=None, use_accelerate_state: bool = False) -> Path:
    """Write one checkpoint atomically (temp folder + rename). ``state`` is the JSON trainer state."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if use_accelerate_state and accelerator is not None:
        accelerator.save_state(str(tmp / "accelerate_state"))
    else:
        weights = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng_json, rng_tensors = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / STATE_FILE).write_text(json.dumps({**state, "rng": rng_json}), encoding="utf-8")
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    tmp.rename(ckpt_dir)
    return ckpt_dir


def load_checkpoint(ckpt_dir: Path, *, model: torch.nn.Module, optimizer, scheduler, accelerator=None,
                    use_accelerate_state: bool = False) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the trainer state (RNG already set)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        state = json.loads((ckpt_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ckpt_dir}: unreadable trainer state ({exc}); delete it to resume from an earlier one") from exc
    if use_accelerate_state and accelerator is not None:
        accelerator.load_state(str(ckpt_dir / "accelerate_state"))
    else:
        weights = load_file(str(ckpt_dir / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n in weights if n not in params]
        if missing:
            raise CheckpointError(f"{ckpt_dir}: parameters {missing[:3]} not in the model; was the recipe changed?")
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w.to(params[n].device, params[n].dtype))
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True))
    _set_rng_state(state.pop("rng"), load_file(str(ckpt_dir / "rng.safetensors")))
    return state


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for p in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def write_feature_stats(model_dir: str | Path, features_dir: str | Path | list, **kwargs) -> Path | None:
    """Write the training features' statistics (``feature_stats.*``) into the model folder ``model_dir``.

    ``features_dir`` (a folder or a list of them) holds the training slides' feature files; ``kwargs`` go to
    ``compute_feature_stats``. Too few or unreadable feature files leave the folder without statistics (a warning,
    not a failed run)."""
    from slidechat.model.feature_stats import stats_from_feature_files
    from slidechat.training.data import feature_dirs

    files = sorted(p for d in feature_dirs(features_dir) for p in d.glob("*") if p.suffix.lower() in FEATURE_SUFFIXES)
    try:
        stats = stats_from_feature_files(files, **kwargs)
    except SlideChatError as exc:
        log.warning("no feature statistics for %s (no out-of-distribution warning): %s", model_dir, exc)
        return None
    stats.save(model_dir)
    log.info("feature statistics of %d training slides in %s (OOD threshold %.2f)", stats.calibration["slides"],
             model_dir, stats.threshold)
    return Path(model_dir)
