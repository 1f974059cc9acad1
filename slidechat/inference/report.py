"""Structured slide report: ask the model the targeted questions of ``prompts.REPORT_QUESTIONS`` (each in a fresh
conversation about the same slide, so answers do not bias each other) and parse the answers into fields.

Fields (names as SlideSynth's ground-truth reports): ``tissue_types`` (list), ``dominant_tissue``,
``lesion_present`` (bool), ``lesion_type``, ``lesion_location`` (quadrant), ``tumor_fraction_percent`` (float),
``tumor_present`` (bool), ``necrosis_present`` (bool), ``summary`` (free text). ``raw_answers`` keeps every answer.
A value the parser cannot read is None (never a guess).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from slidechat import prompts
from slidechat.inference.cache import InferenceCache, resolve
from slidechat.inference.conversation import Conversation, prepare_slide

# class key -> spellings recognised in answers (lower case, prefixes allowed)
_TISSUE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "stroma": ("stroma", "fibrous", "connective"),
    "normal_glands": ("normal gland", "glands", "glandular"),
    "tumor": ("tumour", "tumor", "carcinoma", "malignan", "cancer"),
    "necrosis": ("necros", "necrotic"),
    "lymphocytes": ("lymphocyt", "lymphoid", "inflammat"),
    "fat": ("adipose", "fat"),
}
_LESION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "tumor": ("carcinoma", "tumour", "tumor", "malignan", "cancer"),
    "necrosis": ("necros", "necrotic"),
    "lymphocytes": ("lymphoid", "lymphocyt", "aggregate"),
}
_FALLBACK_DISPLAY = {"stroma": "fibrous stroma", "normal_glands": "normal glands", "tumor": "tumour",
                     "necrosis": "necrosis", "lymphocytes": "lymphocyte-rich infiltrate", "fat": "adipose tissue"}
_FALLBACK_LESION_DISPLAY = {"tumor": "carcinoma (tumour focus)", "necrosis": "necrotic focus",
                            "lymphocytes": "lymphoid aggregate"}


def _vocab() -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """(tissue, lesion) vocabularies: canonical display name -> spellings (SlideSynth's names when available)."""
    try:
        from slidechat.synth.classes import DISPLAY_NAMES, LESION_DISPLAY
    except ImportError:
        DISPLAY_NAMES, LESION_DISPLAY = _FALLBACK_DISPLAY, _FALLBACK_LESION_DISPLAY
    tissues = {d: (d.lower(), k.replace("_", " "), *_TISSUE_SYNONYMS.get(k, ())) for k, d in DISPLAY_NAMES.items()}
    lesions = {d: (d.lower(), k.replace("_", " "), *_LESION_SYNONYMS.get(k, ())) for k, d in LESION_DISPLAY.items()}
    return tissues, lesions


def _mentions(text: str, vocab: dict[str, tuple[str, ...]]) -> list[str]:
    """Canonical names mentioned in ``text``, in order of first mention."""
    low = text.lower()
    found = []
    for name, spellings in vocab.items():
        pos = [low.find(s) for s in spellings if s and low.find(s) >= 0]
        if pos:
            found.append((min(pos), name))
    return [n for _, n in sorted(found)]


def parse_yes_no(text: str) -> bool | None:
    low = text.strip().lower()
    if re.match(r"^(yes|yeah|true|present)\b", low):
        return True
    if re.match(r"^(no|none|false|absent|not)\b", low):
        return False
    if re.search(r"\b(no|not|without|absent)\b", low):
        return False
    if re.search(r"\b(yes|present|there is|shows)\b", low):
        return True
    return None


def parse_location(text: str) -> str | None:
    """'upper-left' / 'upper-right' / 'lower-left' / 'lower-right' / 'center', or None."""
    low = text.lower()
    vert = re.search(r"\b(upper|top|superior|lower|bottom|inferior)\b", low)
    horiz = re.search(r"\b(left|right)\b", low)
    if vert and horiz:
        v = "upper" if vert.group(1) in ("upper", "top", "superior") else "lower"
        return f"{v}-{horiz.group(1)}"
    if re.search(r"\b(cent(er|re|ral)|middle)\b", low):
        return "center"
    return None


def parse_percent(text: str) -> float | None:
    """A percentage in [0, 100]: '35%' -> 35, '0.35' -> 35, 'none' -> 0."""
    low = text.lower()
    m = re.search(r"(\d+(?:\.\d+)?)\s*(%|percent|per cent)", low)
    if m:
        v = float(m.group(1))
    else:
        m = re.search(r"\b(\d+(?:\.\d+)?)\b", low)
        if not m:
            return 0.0 if re.search(r"\b(none|no tumou?r|zero)\b", low) else None
        v = float(m.group(1))
        v = v * 100 if v <= 1 and "." in m.group(1) else v
    return v if 0 <= v <= 100 else None


def parse_answers(answers: dict[str, str]) -> dict[str, Any]:
    """Fields from the raw answers to ``prompts.REPORT_QUESTIONS``."""
    tissues, lesions = _vocab()
    f: dict[str, Any] = {}
    f["tissue_types"] = _mentions(answers.get("tissue_types", ""), tissues)
    dom = _mentions(answers.get("dominant_tissue", ""), tissues)
    f["dominant_tissue"] = dom[0] if dom else None
    present = parse_yes_no(answers.get("lesion_present", ""))
    ltype = _mentions(answers.get("lesion_type", ""), lesions)
    if present is None and ltype:
        present = True
    f["lesion_present"] = present
    f["lesion_type"] = (ltype[0] if ltype else None) if present else None
    f["lesion_location"] = parse_location(answers.get("lesion_location", "")) if present else None
    pct = parse_percent(answers.get("tumor_fraction_percent", ""))
    f["tumor_fraction_percent"] = pct
    f["tumor_present"] = None if pct is None else pct > 0
    f["necrosis_present"] = any("necros" in t for t in f["tissue_types"]) if f["tissue_types"] else None
    f["summary"] = answers.get("summary", "").strip()
    return f


@dataclass
class Report:
    """``fields`` (parsed), ``text`` (rendered), ``raw_answers`` (question field -> model answer)."""

    fields: dict[str, Any]
    raw_answers: dict[str, str] = field(default_factory=dict)
    slide_id: str = ""

    @property
    def text(self) -> str:
        f = self.fields

        def show(v):
            if v is None:
                return "not determined"
            if isinstance(v, bool):
                return "yes" if v else "no"
            if isinstance(v, list):
                return ", ".join(v) if v else "not determined"
            return str(v)

        lesion = "none" if f.get("lesion_present") is False else \
            f"{show(f.get('lesion_type'))}, {show(f.get('lesion_location'))}"
        pct = f.get("tumor_fraction_percent")
        lines = [
            f"TISSUE TYPES: {show(f.get('tissue_types'))}.",
            f"DOMINANT TISSUE: {show(f.get('dominant_tissue'))}.",
            f"LESION: {lesion}.",
            f"TUMOUR FRACTION: {'not determined' if pct is None else f'{pct:g}%'}.",
            f"NECROSIS: {show(f.get('necrosis_present'))}.",
            f"SUMMARY: {f.get('summary') or 'not determined'}",
        ]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        title = f"## {prompts.REPORT_TITLE}" + (f": {self.slide_id}" if self.slide_id else "")
        rows = ["| field | value |", "|---|---|"]
        for k, v in self.fields.items():
            if k == "summary":
                continue
            val = (", ".join(v) or "—") if isinstance(v, list) else ("—" if v is None else str(v))
            rows.append(f"| {k.replace('_', ' ')} | {val.replace('|', '/')} |")
        return "\n".join([title, "", *rows, "", "**Summary.** " + (self.fields.get("summary") or "—"), ""])

    def to_dict(self) -> dict[str, Any]:
        return {"slide_id": self.slide_id, "fields": self.fields, "text": self.text, "raw_answers": self.raw_answers}


def generate_report(assistant, slide, max_new_tokens: int = 64, summary_max_new_tokens: int = 160,
                    questions: dict[str, str] | None = None, cache: InferenceCache | None = None) -> Report:
    """Ask each targeted question in a fresh conversation (the slide is encoded once) and parse the answers."""
    model, cache = resolve(assistant, cache)
    state = prepare_slide(model, slide, cache)
    answers: dict[str, str] = {}
    for key, question in (questions or prompts.REPORT_QUESTIONS).items():
        conv = Conversation(model, state.slide, cache=cache)
        limit = summary_max_new_tokens if key == "summary" else max_new_tokens
        answers[key] = conv.ask(question, max_new_tokens=limit)
    return Report(fields=parse_answers(answers), raw_answers=answers, slide_id=state.slide.slide_id)
