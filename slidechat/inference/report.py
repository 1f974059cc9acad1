"""Structured slide report from a report template (``slidechat.inference.report_schema``; default: SynthSlide).

Each field's question is asked about the slide with the conversation's history cleared (answers do not bias each
other; the key/values of the system prompt and slide tokens are reused) and its answer is decoded under the
field's pattern (``slidechat.inference.constrained``), so every value is valid for the template. Fields with
``when`` are asked only when that yes/no field is yes (else they take their ``otherwise`` value); derived fields are
computed as their turn comes, so a later ``when`` can read them. The summary is then written
in a conversation that holds the field questions and answers, and the text report is rendered from the fields
(plus that summary), so the two cannot disagree.

``generate_report(..., schema=False)`` (or custom ``questions``) keeps the free-text path: the questions of
``prompts.REPORT_QUESTIONS``, each in a fresh conversation, answers parsed into fields by the readers below.

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
from slidechat.errors import SlideChatError
from slidechat.inference.conversation import Conversation, prepare_slide
from slidechat.synth.classes import spelling_vocabulary
from slidechat.inference.evidence import DEFAULT_K
from slidechat.inference.report_schema import ReportSchema, load_report_schema

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
    tissues, lesions = spelling_vocabulary()
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


def format_field(value: Any, missing: str = "not determined") -> str:
    """One report field as text: None -> ``missing``, booleans -> yes/no, lists -> comma-separated, numbers as is."""
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else missing
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass
class Report:
    """``fields`` (parsed), ``text`` (rendered), ``raw_answers`` (question field -> model answer), ``evidence``
    (the most attended regions while the summary was written: ``EvidenceRegion.to_dict()`` rows with level-0
    ``box`` [x, y, w, h] and ``score``; ``evidence_error`` says why it is empty when it could not be computed)."""

    fields: dict[str, Any]
    raw_answers: dict[str, str] = field(default_factory=dict)
    slide_id: str = ""
    evidence: list[dict[str, Any]] = field(default_factory=list)
    evidence_error: str | None = None
    schema: ReportSchema | None = None

    @property
    def title(self) -> str:
        return self.schema.title if self.schema is not None else prompts.REPORT_TITLE

    @property
    def text(self) -> str:
        if self.schema is not None:
            return "\n".join(self.schema.render_lines(self.fields))
        f = self.fields
        lesion = "none" if f.get("lesion_present") is False else \
            f"{format_field(f.get('lesion_type'))}, {format_field(f.get('lesion_location'))}"
        pct = f.get("tumor_fraction_percent")
        lines = [
            f"TISSUE TYPES: {format_field(f.get('tissue_types'))}.",
            f"DOMINANT TISSUE: {format_field(f.get('dominant_tissue'))}.",
            f"LESION: {lesion}.",
            f"TUMOUR FRACTION: {'not determined' if pct is None else f'{pct:g}%'}.",
            f"NECROSIS: {format_field(f.get('necrosis_present'))}.",
            f"SUMMARY: {f.get('summary') or 'not determined'}",
        ]
        return "\n".join(lines)

    def evidence_markdown(self) -> list[str]:
        """The evidence as Markdown lines (a table of level-0 boxes), or a line saying why there is none."""
        if not self.evidence:
            return [f"_Evidence unavailable: {self.evidence_error}_"] if self.evidence_error else []
        rows = ["**Evidence** (most attended regions, level-0 pixels)", "",
                "| # | x | y | width | height | score |", "|---|---|---|---|---|---|"]
        for r in self.evidence:
            x, y, w, h = r["box"]
            rows.append(f"| {r['rank']} | {x} | {y} | {w} | {h} | {r['score']:.3f} |")
        return rows

    def to_markdown(self) -> str:
        title = f"## {self.title}" + (f": {self.slide_id}" if self.slide_id else "")
        rows = ["| field | value |", "|---|---|"]
        for k, v in self.fields.items():
            if k == "summary":
                continue
            if self.schema is not None:
                spec = self.schema.field(k)
                label, shown = spec.display_label, spec.format_value(v, missing="—")
            else:
                label, shown = k.replace("_", " "), format_field(v, missing="—")
            rows.append(f"| {label} | {shown.replace('|', '/')} |")
        evidence = self.evidence_markdown()
        return "\n".join([title, "", *rows, "", "**Summary.** " + (self.fields.get("summary") or "—"), "",
                          *evidence, *([""] if evidence else [])])

    def to_dict(self) -> dict[str, Any]:
        return {"slide_id": self.slide_id, "fields": self.fields, "text": self.text, "raw_answers": self.raw_answers,
                "evidence": self.evidence, "evidence_error": self.evidence_error,
                "schema": self.schema.name if self.schema is not None else None}


def generate_report(assistant, slide, max_new_tokens: int = 64, summary_max_new_tokens: int = 160,
                    questions: dict[str, str] | None = None, cache: InferenceCache | None = None,
                    evidence_k: int = DEFAULT_K, schema: str | ReportSchema | bool | None = None,
                    context: str | None = None) -> Report:
    """The report of ``slide`` under ``schema`` (a template name or file, a ``ReportSchema``; None: SynthSlide).

    ``schema=False`` or custom ``questions`` take the free-text path. ``context`` (clinical information) is given
    with the summary question only. ``max_new_tokens`` bounds free-text answers (a constrained field gets the
    tokens its longest valid answer needs). The evidence is that of the summary's conversation; if it fails the
    report keeps its fields and says why in ``evidence_error``."""
    if questions is not None or schema is False:
        qs = dict(questions or prompts.REPORT_QUESTIONS)
        if context and "summary" in qs:
            qs["summary"] = f"Clinical information: {context.strip()}\n{qs['summary']}"
        return _free_text_report(assistant, slide, max_new_tokens, summary_max_new_tokens, qs, cache, evidence_k)
    return schema_report(assistant, slide, load_report_schema(None if schema is True else schema), max_new_tokens,
                         summary_max_new_tokens, cache, evidence_k, context)


def schema_report(assistant, slide, schema: ReportSchema, max_new_tokens: int = 64,
                  summary_max_new_tokens: int = 160, cache: InferenceCache | None = None,
                  evidence_k: int = DEFAULT_K, context: str | None = None) -> Report:
    """Fields under ``schema`` by constrained decoding, then the summary conditioned on them (see the module doc)."""
    from slidechat.inference.constrained import constrained_answer, grammars_for, token_budget

    model, cache = resolve(assistant, cache)
    grammars = grammars_for(model)
    conv = Conversation(model, slide, cache=cache)
    values: dict[str, Any] = {}
    answers: dict[str, str] = {}
    history: list[dict[str, str]] = []
    for f in schema.fields:
        if not f.asked:  # derived now, so that a later field's ``when`` can read it
            schema.derive_field(f, values)
            continue
        if f.when and values.get(f.when) is not True:
            values[f.name], answers[f.name] = f.otherwise, ""
            if f.otherwise is not None:  # the summary reads every field it is conditioned on, fixed ones too
                history += [{"role": "user", "content": f.question},
                            {"role": "assistant", "content": f.format_value(f.otherwise)}]
            continue
        f = f.bounded(values)  # a number inside the range an earlier answer allows (range_by)
        conv.messages = []
        limit = token_budget(f)
        if f.type == "text":
            limit = min(limit, max_new_tokens)
        answers[f.name] = constrained_answer(conv, f.question, f.answer_regex(), limit, grammars)
        values[f.name] = f.parse_answer(answers[f.name])
        history += conv.messages[-2:]
    fields = {f.name: values.get(f.name) for f in schema.fields}
    report = Report(fields=fields, raw_answers=answers, slide_id=conv.slide.slide_id, schema=schema)
    if schema.summary_question:
        question = schema.summary_question
        if context:
            question = f"Clinical information: {context.strip()}\n{question}"
        conv.messages = history
        answers["summary"] = conv.ask(question, max_new_tokens=summary_max_new_tokens).strip()
        fields["summary"] = answers["summary"]
    if evidence_k > 0 and answers:
        try:
            report.evidence = [r.to_dict() for r in conv.evidence(evidence_k)]
        except (SlideChatError, RuntimeError, ValueError) as exc:
            report.evidence_error = f"{type(exc).__name__}: {exc}"
    return report


def _free_text_report(assistant, slide, max_new_tokens: int, summary_max_new_tokens: int,
                      questions: dict[str, str], cache: InferenceCache | None, evidence_k: int) -> Report:
    """Ask each question in a fresh conversation (the slide is encoded once) and parse the answers."""
    model, cache = resolve(assistant, cache)
    answers: dict[str, str] = {}
    conv = None
    for key, question in questions.items():
        # the first conversation encodes the slide; the others reuse its encoded slide(s)
        source = slide if conv is None else (getattr(conv, "slides", None) or conv.slide)
        conv = Conversation(model, source, cache=cache)
        limit = summary_max_new_tokens if key == "summary" else max_new_tokens
        answers[key] = conv.ask(question, max_new_tokens=limit)
    slide_id = conv.slide.slide_id if conv is not None else prepare_slide(model, slide, cache).slide.slide_id
    report = Report(fields=parse_answers(answers), raw_answers=answers, slide_id=slide_id)
    if evidence_k > 0 and conv is not None:
        try:
            report.evidence = [r.to_dict() for r in conv.evidence(evidence_k)]
        except (SlideChatError, RuntimeError, ValueError) as exc:
            report.evidence_error = f"{type(exc).__name__}: {exc}"
    return report
