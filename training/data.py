"""Training data: SlideInstruction/LLaVA conversations, captions and reports, with slide features.

Accepts SlideChat's released files as they are::

    {"id": "...", "image": ["TCGA-XX.csv"], "conversations": [{"from": "human", "value": "...\\n<image>"},
                                                            {"from": "gpt", "value": "..."}]}

A record whose ``image`` lists several slides is a case: one conversation over all of them (each slide's tokens
behind its marker, ``prompts.case_header``). Slide features are found by file stem in ``features_dir`` (``<stem>.h5`` from our extractor, TRIDENT/CLAM,
or SlideChat's per-slide feature ``<stem>.csv``). Bad samples are skipped and counted by reason, never a
crash: ``no_features``, ``empty_answer``, ``missing_image_tag``, ``too_long``, ``malformed``, and
``unreadable_features`` (a file that fails to load when first used in an epoch).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from slidechat.errors import DataError
from slidechat.model import IGNORE_INDEX
from slidechat.prompts import SLIDE_PLACEHOLDER, normalise_placeholder
from slidechat.utils.io import BadLines, read_json_records, read_jsonl

log = logging.getLogger(__name__)

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Single-turn prompts for stage-1 alignment on captions / reports (one is chosen per sample, deterministically).
CAPTION_PROMPTS = (
    "Describe this slide.",
    "Please describe the tissue in this whole-slide image.",
    "What does this slide show?",
    "Give a short description of this slide.",
)
REPORT_PROMPTS = (
    "Write a pathology report for this slide.",
    "Write a structured report for this slide.",
)


class SkipSample(Exception):
    """Raised while converting a record that must be skipped; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class TrainSample:
    """One conversation about one slide (or a case: ``slide_keys`` lists its slides in order); ``messages`` use
    roles user/assistant; the slides go in the first user turn."""

    id: str
    slide_key: str
    messages: list[dict[str, str]]
    source: str = ""
    slide_keys: list[str] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        """Every slide of the sample, in order."""
        return self.slide_keys or [self.slide_key]


@dataclass
class SkipCounter:
    """Counts skipped samples by reason (thread-safe, so DataLoader threads can share it)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str, sample_id: str = "") -> None:
        with self._lock:
            self.counts[reason] += 1
            self.examples.setdefault(reason, sample_id)

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items())}

    def summary(self) -> str:
        if not self.counts:
            return "skipped 0 samples"
        parts = ", ".join(f"{k}={v} (e.g. {self.examples.get(k, '?')})" for k, v in sorted(self.counts.items()))
        return f"skipped {self.total} samples: {parts}"


# ------------------------------------------------------------------------------------- reading


def read_records(path: str | Path, skips: SkipCounter | None = None) -> list[dict]:
    """A JSON list (LLaVA style) or JSONL file of records; malformed lines are skipped and counted
    (``malformed_line``), read by the library's strict readers."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data file {path} not found")
    bad = BadLines(skip=True)
    if path.suffix.lower() == ".jsonl":
        records = read_jsonl(path, bad)
    else:
        records = read_json_records(path, bad, jsonl_fallback=True)
    for b in bad.skipped:
        log.warning("%s:%d: %s; skipped", b.source, b.line, b.reason)
        if skips is not None:
            skips.add("malformed_line", f"{Path(b.source).name}:{b.line}")
    return records


def slide_key(ref: str) -> str:
    """The file stem that names a slide: ``TCGA-A.csv`` / ``slides/x.tiff`` / ``x.h5`` / ``x`` -> stem."""
    name = Path(str(ref)).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if "." in name else name


def llava_to_sample(record: dict, *, require_image_tag: bool = True, source: str = "") -> TrainSample:
    """Convert one LLaVA/SlideInstruction record; raises SkipSample with the reason for a bad one."""
    rid = str(record.get("id", ""))
    image = record.get("image", record.get("slide"))
    images = image if isinstance(image, list) else [image]
    if not images or not all(isinstance(i, str) and i for i in images):
        raise SkipSample("malformed", f"{rid}: no image/slide")
    if len(set(images)) != len(images):
        raise SkipSample("malformed", f"{rid}: a slide is listed twice in image")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise SkipSample("malformed", f"{rid}: no conversations")
    messages: list[dict[str, str]] = []
    tag_seen = False
    for turn in convs:
        if not isinstance(turn, dict):
            raise SkipSample("malformed", f"{rid}: turn is not an object")
        role = ROLE_MAP.get(str(turn.get("from", turn.get("role", ""))).lower())
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            raise SkipSample("malformed", f"{rid}: bad turn {turn!r:.80}")
        if role == "system":
            continue
        value = normalise_placeholder(value)
        if SLIDE_PLACEHOLDER in value:
            tag_seen = True
            # a case's first turn that names each slide before its placeholder ("Slide 1 (A1 H&E): <image>") keeps
            # them where they are; otherwise the processor puts the placeholder(s) at the turn's start
            if messages or len(images) == 1 or value.count(SLIDE_PLACEHOLDER) != len(images):
                value = value.replace(SLIDE_PLACEHOLDER, "").strip()
        if role == "assistant" and not value.strip():
            raise SkipSample("empty_answer", rid)
        if messages and messages[-1]["role"] == role:
            raise SkipSample("malformed", f"{rid}: two {role} turns in a row")
        if not messages and role != "user":
            raise SkipSample("malformed", f"{rid}: conversation does not start with a human turn")
        messages.append({"role": role, "content": value.strip()})
    if require_image_tag and not tag_seen:
        raise SkipSample("missing_image_tag", rid)
    if messages and messages[-1]["role"] == "user":
        messages.pop()  # a trailing question without an answer carries no loss
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipSample("empty_answer", rid)
    if not messages[0]["content"]:
        messages[0]["content"] = CAPTION_PROMPTS[0]
    keys = [slide_key(i) for i in images]
    return TrainSample(id=rid, slide_key=keys[0], messages=messages, source=source,
                       slide_keys=keys if len(keys) > 1 else [])


def _pick(options: tuple[str, ...], key: str) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return options[h % len(options)]


def text_to_sample(slide_id: str, text: Any, kind: str, index: int, source: str = "") -> TrainSample:
    """A single-turn sample slide -> caption or report (stage-1 alignment)."""
    if not isinstance(text, str) or not text.strip():
        raise SkipSample("empty_answer", str(slide_id))
    prompts = CAPTION_PROMPTS if kind == "captions" else REPORT_PROMPTS
    prompt = _pick(prompts, f"{slide_id}/{index}")
    return TrainSample(
        id=f"{kind}-{slide_id}-{index}",
        slide_key=slide_key(slide_id),
        messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": text.strip()}],
        source=source,
    )


def load_samples(path: str | Path, kind: str, skips: SkipCounter, *, require_image_tag: bool = True,
                 multi_turn: bool = True) -> list[TrainSample]:
    """Read one data source into samples; bad records are counted in ``skips``."""
    samples: list[TrainSample] = []
    records = read_records(path, skips)
    src = str(path)
    for i, rec in enumerate(records):
        try:
            if kind == "instructions":
                sample = llava_to_sample(rec, require_image_tag=require_image_tag, source=src)
                samples.extend(split_turns(sample) if not multi_turn else [sample])
            elif kind == "captions":
                sid = rec.get("slide_id", rec.get("slide", rec.get("id")))
                if not sid:
                    raise SkipSample("malformed", f"record {i}: no slide_id")
                samples.append(text_to_sample(str(sid), rec.get("caption", rec.get("text")), kind, i, src))
            elif kind == "reports":
                sid = rec.get("slide_id", rec.get("slide", rec.get("id")))
                if not sid:
                    raise SkipSample("malformed", f"record {i}: no slide_id")
                samples.append(text_to_sample(str(sid), rec.get("report_text", rec.get("text")), kind, i, src))
            else:
                raise DataError(f"unknown data kind {kind!r}")
        except SkipSample as exc:
            skips.add(exc.reason, str(rec.get("id", i)))
    return samples


def split_turns(sample: TrainSample) -> list[TrainSample]:
    """One single-turn sample per (question, answer) pair of a multi-turn conversation."""
    out = []
    msgs = sample.messages
    for j in range(0, len(msgs) - 1, 2):
        q, a = msgs[j], msgs[j + 1]
        out.append(TrainSample(f"{sample.id}#{j // 2}", sample.slide_key, [dict(q), dict(a)], sample.source,
                               list(sample.slide_keys)))
    return out


# ------------------------------------------------------------------------------------- features


class FeatureResolver:
    """Finds a slide's feature file by stem in one folder or several (``.h5`` preferred over SlideChat ``.csv``;
    with several folders, a stem in an earlier folder wins)."""

    SUFFIXES = (".h5", ".hdf5", ".csv")

    def __init__(self, features_dir: str | Path | Sequence[str | Path]) -> None:
        self.roots = feature_dirs(features_dir)
        index: dict[str, Path] = {}
        for root in reversed(self.roots):
            if not root.is_dir():
                raise DataError(f"features folder {root} not found; run `slidechat extract` first")
            for suffix in reversed(self.SUFFIXES):  # later (preferred) suffixes overwrite earlier ones
                for p in root.rglob(f"*{suffix}"):
                    index[p.name[: -len(suffix)]] = p
        self.index = index

    def resolve(self, key: str) -> Path | None:
        return self.index.get(key)


def feature_dirs(features_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    """A recipe's ``features_dir`` (one folder or a list) as a list of paths."""
    dirs = [features_dir] if isinstance(features_dir, (str, Path)) else list(features_dir)
    return [Path(d) for d in dirs]


def default_feature_loader(path: Path):
    from slidechat.features.store import load_features

    return load_features(path)


class FeatureCache:
    """Small LRU cache of loaded features (tensors) keyed by path."""

    def __init__(self, loader: Callable[[Path], Any] = default_feature_loader, capacity: int = 64) -> None:
        self.loader = loader
        self.capacity = capacity
        self._items: OrderedDict[Path, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._lock:
            if path in self._items:
                self._items.move_to_end(path)
                return self._items[path]
        sf = self.loader(path)
        feats = torch.from_numpy(np.ascontiguousarray(sf.features, dtype=np.float32))
        coords = None if sf.coords is None else torch.from_numpy(np.ascontiguousarray(sf.coords, dtype=np.int64))
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise DataError(f"{path}: features must be a non-empty [N, D] array, got {tuple(feats.shape)}")
        if not torch.isfinite(feats).all():
            raise DataError(f"{path}: features contain NaN/inf")
        with self._lock:
            self._items[path] = (feats, coords)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return feats, coords


# ------------------------------------------------------------------------------------- dataset


Tokenize = Callable[[list[dict[str, str]]], dict]


class SlideConversationDataset(torch.utils.data.Dataset):
    """Tokenized samples with their slide features; bad samples are filtered (and counted) up front.

    ``tokenize`` is the model's ``tokenize_conversation`` (called with ``num_slides=S`` for a case);
    ``extra_tokens`` is how many positions each slide placeholder grows into (K slide tokens minus the
    placeholder) so ``max_length`` is exact. A case's item holds a list of feature tensors.
    """

    def __init__(self, samples: Iterable[TrainSample], tokenize: Tokenize, resolver: FeatureResolver,
                 *, max_length: int, extra_tokens: int = 0, max_patches: int | None = None,
                 seed: int = 0, skips: SkipCounter | None = None,
                 feature_cache: FeatureCache | None = None, grounding_dir: str | Path | None = None) -> None:
        self.grounding_dir = Path(grounding_dir) if grounding_dir else None
        self.skips = skips if skips is not None else SkipCounter()
        self.max_patches = max_patches
        self.seed = seed
        self.epoch = 0
        self.cache = feature_cache or FeatureCache()
        self.items: list[dict] = []
        for s in samples:
            paths = [resolver.resolve(k) for k in s.keys]
            if any(p is None for p in paths):
                self.skips.add("no_features", s.id)
                continue
            try:
                tok = tokenize(s.messages) if len(paths) == 1 else tokenize(s.messages, num_slides=len(paths))
            except Exception as exc:  # noqa: BLE001 - a bad sample must never stop training
                log.debug("tokenize failed for %s: %s", s.id, exc)
                self.skips.add("malformed", s.id)
                continue
            ids = torch.as_tensor(tok["input_ids"], dtype=torch.long).flatten()
            labels = torch.as_tensor(tok["labels"], dtype=torch.long).flatten()
            if int((labels != IGNORE_INDEX).sum()) == 0:
                self.skips.add("empty_answer", s.id)
                continue
            length = len(ids) + extra_tokens * len(paths)
            if length > max_length:
                self.skips.add("too_long", s.id)
                continue
            self.items.append({"id": s.id, "paths": paths, "keys": s.keys, "input_ids": ids, "labels": labels,
                               "length": length})

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> list[int]:
        return [it["length"] for it in self.items]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict | None:
        item = self.items[index]
        slides = []
        for j, (path, key) in enumerate(zip(item["paths"], item["keys"])):
            try:
                feats, coords = self.cache.get(path)
            except Exception as exc:  # noqa: BLE001
                log.warning("skipping %s: cannot read features %s (%s)", item["id"], path, exc)
                self.skips.add("unreadable_features", item["id"])
                return None
            targets = self._targets(key, feats.shape[0])
            if self.max_patches and feats.shape[0] > self.max_patches:
                salt = (self.seed, self.epoch, index) + ((j,) if j else ())  # slide 0 draws as a single slide does
                g = torch.Generator().manual_seed(hash(salt) & 0x7FFFFFFF)
                keep = torch.randperm(feats.shape[0], generator=g)[: self.max_patches].sort().values
                feats = feats[keep]
                coords = coords[keep] if coords is not None else None
                targets = targets[keep] if targets is not None else None
            slides.append((feats, coords, targets))
        if len(slides) == 1:
            feats, coords, targets = slides[0]
        else:
            feats, coords, targets = (list(x) for x in zip(*slides))
        return {"id": item["id"], "input_ids": item["input_ids"], "labels": item["labels"],
                "slide_features": feats, "slide_coords": coords, "patch_targets": targets}

    def _targets(self, key: str, n: int) -> torch.Tensor | None:
        """Per-patch grounding targets from ``grounding_dir/<slide>.npy`` (None when absent or mismatched)."""
        if self.grounding_dir is None:
            return None
        p = self.grounding_dir / f"{key}.npy"
        if not p.exists():
            return None
        t = torch.from_numpy(np.load(p).astype(np.float32)).flatten()
        return t if t.shape[0] == n else None


class Collator:
    """Right-pads token ids (pad id), labels (IGNORE_INDEX) and builds the attention mask; drops skipped (None) items."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: list[dict | None]) -> dict | None:
        items = [it for it in items if it is not None]
        if not items:
            return None
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for i, it in enumerate(items):
            L = len(it["input_ids"])
            ids[i, :L] = it["input_ids"]
            labels[i, :L] = it["labels"]
            mask[i, :L] = 1
        return {"ids": [it["id"] for it in items], "input_ids": ids, "attention_mask": mask, "labels": labels,
                "slide_features": [it["slide_features"] for it in items],
                "slide_coords": [it["slide_coords"] for it in items],
                "patch_targets": [it.get("patch_targets") for it in items]}
