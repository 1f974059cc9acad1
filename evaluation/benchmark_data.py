"""What `eval run` evaluates: a SynthSlide folder (all tasks) or a SlideBench CSV/JSON (closed VQA).

SynthSlide folder (``slidechat synth`` / ``slidechat.synth.generate_dataset``): ``truth.jsonl``,
``closed_vqa.csv``, ``open_vqa.jsonl``, ``captions.jsonl``, ``reports.jsonl`` and ``masks/``.
SlideBench file: each row's ``Slide`` is looked up as ``<features_dir>/<Slide>.h5|.csv`` (also one
folder deeper, and names that start with the slide id) or ``<slides_dir>/<Slide>.<slide ext>``.

Cases: a row whose ``Slide`` lists several slides (``a;b`` or ``a|b``) is asked about all of them in one
conversation; each slide is looked up as above. A SynthSlide case folder (``slidechat synth --cases``) adds its
``case_closed_vqa.csv`` to the closed questions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slidechat.evaluation.slidebench import ClosedVQAItem, load_closed_vqa
from slidechat.errors import DataError
from slidechat.utils.io import BadLines, read_jsonl

FEATURE_EXTS = (".h5", ".hdf5", ".csv")
SLIDE_EXTS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".svslide", ".qptiff")


@dataclass
class BenchmarkData:
    """Everything a run needs, keyed by slide id; ``slides[sid]`` is None when the file was not found."""

    name: str
    root: Path
    slides: dict[str, Path | None] = field(default_factory=dict)
    closed_vqa: list[ClosedVQAItem] = field(default_factory=list)
    open_vqa: list[dict] = field(default_factory=list)  # {id, slide_id, question, answer}
    captions: dict[str, str] = field(default_factory=dict)
    reports: dict[str, dict] = field(default_factory=dict)  # sid -> {report_text, report}
    truth: dict[str, dict] = field(default_factory=dict)  # SynthSlide truth.jsonl records

    def available_tasks(self) -> list[str]:
        tasks = []
        if self.closed_vqa:
            tasks.append("closed_vqa")
        if self.open_vqa:
            tasks.append("open_vqa")
        if self.captions:
            tasks.append("captioning")
        if self.reports:
            tasks.append("reports")
        if any(t.get("lesion") and t.get("mask_path") for t in self.truth.values()):
            tasks.append("grounding")
        if self.captions and len(self.captions) > 1:
            tasks.append("retrieval")
        return tasks

    def lesion_mask_path(self, sid: str) -> Path | None:
        t = self.truth.get(sid, {})
        return (self.root / t["mask_path"]) if t.get("lesion") and t.get("mask_path") else None


def case_slides(slide: str) -> list[str]:
    """The slide ids of a ``Slide`` value: one, or several joined by ``;`` or ``|``."""
    parts = [p.strip() for p in slide.replace("|", ";").split(";")]
    return [p for p in parts if p] or [slide]


def _keyed(records: list[dict], key: str, source: Path) -> dict[str, dict]:
    """{record[key]: record}; a record without the key is malformed."""
    for i, r in enumerate(records, 1):
        if key not in r:
            raise DataError(f"{source}: record {i} has no {key!r}; regenerate the folder with `slidechat synth`")
    return {r[key]: r for r in records}


def load_synth_folder(root: Path, bad_lines: BadLines | None = None) -> BenchmarkData:
    truth = _keyed(read_jsonl(root / "truth.jsonl", bad_lines), "slide_id", root / "truth.jsonl")
    if not truth:
        raise DataError(f"{root}/truth.jsonl is empty or unreadable; regenerate with `slidechat synth`")
    data = BenchmarkData(name=root.name, root=root, truth=truth,
                         slides={sid: root / r["path"] for sid, r in truth.items()})
    if (root / "closed_vqa.csv").exists():
        data.closed_vqa = load_closed_vqa(root / "closed_vqa.csv", bad_lines)
    if (root / "case_closed_vqa.csv").exists():
        case_items = load_closed_vqa(root / "case_closed_vqa.csv", bad_lines)
        unknown = sorted({s for it in case_items for s in case_slides(it.slide) if s not in truth})
        if unknown:
            raise DataError(f"{root / 'case_closed_vqa.csv'} names slides not in truth.jsonl: {unknown[:3]}")
        data.closed_vqa += case_items
    data.open_vqa = read_jsonl(root / "open_vqa.jsonl", bad_lines)
    for i, r in enumerate(data.open_vqa, 1):
        missing = [k for k in ("id", "slide_id", "question", "answer") if k not in r]
        if missing:
            raise DataError(f"{root / 'open_vqa.jsonl'}: record {i} has no {', '.join(missing)}")
    captions = _keyed(read_jsonl(root / "captions.jsonl", bad_lines), "slide_id", root / "captions.jsonl")
    data.captions = {sid: str(r.get("caption", "")) for sid, r in captions.items()}
    data.reports = _keyed(read_jsonl(root / "reports.jsonl", bad_lines), "slide_id", root / "reports.jsonl")
    return data


def find_slide_file(slide: str, features_dir: Path | None, slides_dir: Path | None) -> Path | None:
    """Feature file (preferred: no re-extraction) or slide file for a SlideBench ``Slide`` value."""
    if features_dir is not None:
        for pattern in (f"{slide}{{ext}}", f"*/{slide}{{ext}}", f"{slide}*{{ext}}", f"*/{slide}*{{ext}}"):
            for ext in FEATURE_EXTS:
                hits = sorted(features_dir.glob(pattern.format(ext=ext)))
                if hits:
                    return hits[0]
    if slides_dir is not None:
        for ext in SLIDE_EXTS:
            for pattern in (f"{slide}{ext}", f"{slide}*{ext}", f"*/{slide}*{ext}"):
                hits = sorted(slides_dir.glob(pattern))
                if hits:
                    return hits[0]
    return None


def load_benchmark(data: str | Path, features_dir: str | Path | None = None,
                   slides_dir: str | Path | None = None, bad_lines: BadLines | None = None) -> BenchmarkData:
    """Load a SynthSlide folder or a SlideBench CSV/JSON (see the module docstring)."""
    path = Path(data)
    if path.is_dir():
        if not (path / "truth.jsonl").exists():
            raise DataError(f"{path}: not a SynthSlide folder (no truth.jsonl); give a folder made by "
                            "`slidechat synth` or a SlideBench CSV")
        return load_synth_folder(path, bad_lines)
    items = load_closed_vqa(path, bad_lines)
    fdir = Path(features_dir) if features_dir else None
    sdir = Path(slides_dir) if slides_dir else None
    if fdir is None and sdir is None:
        fdir = sdir = path.parent
    out = BenchmarkData(name=path.stem, root=path.parent, closed_vqa=items)
    for item in items:
        for slide in case_slides(item.slide):
            if slide not in out.slides:
                out.slides[slide] = find_slide_file(slide, fdir, sdir)
    return out
