"""Load closed-VQA benchmarks (SlideBench-VQA CSV/JSON as released) and prediction files.

Gold files: SlideChat's SlideBench-VQA CSVs load as they are (columns ``ID, Slide, Tumor,
Broad Category, Narrow Category, Question, A, B, C, D, Answer``; some options empty; a UTF-8
BOM and stray spaces in headers are tolerated). A JSON list of objects with the same keys (or
lower-case ``id, slide, question, options{A..D}|[...], answer, category``) works too.

Prediction files: JSONL records with an id (``id``/``ID``/``question_id``) and the model's
text (``output``/``Output``/``prediction``/``response``/``text``); or a CSV such as
SlideChat's own inference output (the gold columns plus ``Output``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from slidechat.errors import DataError
from slidechat.prompts import format_mcq
from slidechat.utils.io import BadLines, read_records

OPTION_LETTERS = ("A", "B", "C", "D")
OUTPUT_KEYS = ("output", "Output", "prediction", "Prediction", "response", "answer_text", "text", "pred")
ID_KEYS = ("id", "ID", "Id", "question_id", "qid", "slide_id")


@dataclass
class ClosedVQAItem:
    """One multiple-choice question."""

    id: str
    slide: str
    question: str
    options: dict[str, str]  # letter -> text; empty options are ""
    answer: str  # gold letter
    tumor: str = ""
    broad_category: str = ""
    narrow_category: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _clean(value) -> str:
    if value is None:
        return ""
    text = str(value).strip()
    return "" if text.lower() in {"nan", "none"} else text


def _normalize_keys(row: dict) -> dict:
    return {str(k).strip().lstrip("\ufeff"): v for k, v in row.items() if k is not None}


def _first(row: dict, keys, default=None):
    for key in keys:
        if key in row and _clean(row[key]) != "":
            return row[key]
    return default


def _answer_letter(raw, options: dict[str, str], where: str) -> str:
    text = _clean(raw)
    letter = text.strip("().[] ").upper()[:1] if text else ""
    if len(text.strip("().[] ")) == 1 and letter in options:
        return letter
    # some files give the option text instead of the letter
    for key, value in options.items():
        if value and value.strip().lower() == text.lower():
            return key
    if letter in options and text[1:2] in {".", ")", ":", " "}:
        return letter
    raise DataError(f"{where}: answer {raw!r} is not one of the option letters {sorted(options)}")


def _item_from_row(row: dict, index: int, source: str) -> ClosedVQAItem:
    row = _normalize_keys(row)
    where = f"{source} row {index + 1}"
    raw_options = row.get("options")
    if isinstance(raw_options, dict):
        options = {str(k).strip().upper(): _clean(v) for k, v in raw_options.items()}
    elif isinstance(raw_options, list):
        options = {OPTION_LETTERS[i] if i < 4 else chr(65 + i): _clean(v) for i, v in enumerate(raw_options)}
    else:
        options = {letter: _clean(row.get(letter, row.get(letter.lower()))) for letter in OPTION_LETTERS}
    question = _clean(_first(row, ("Question", "question")))
    if not question:
        raise DataError(f"{where}: no question text (expected a 'Question' column)")
    answer = _first(row, ("Answer", "answer", "gt", "label"))
    if answer is None:
        raise DataError(f"{where}: no answer (expected an 'Answer' column with a letter A-D)")
    item_id = _clean(_first(row, ID_KEYS, default=str(index)))
    known = {"ID", "id", "Slide", "slide", "Tumor", "tumor", "Broad Category", "Narrow Category", "category",
             "Question", "question", "A", "B", "C", "D", "Answer", "answer", "options", *OUTPUT_KEYS}
    return ClosedVQAItem(
        id=item_id,
        slide=_clean(_first(row, ("Slide", "slide", "slide_id", "image"), default="")),
        question=question,
        options=options,
        answer=_answer_letter(answer, options, where),
        tumor=_clean(_first(row, ("Tumor", "tumor", "Tumor Type"), default="")),
        broad_category=_clean(_first(row, ("Broad Category", "broad_category", "category"), default="")),
        narrow_category=_clean(_first(row, ("Narrow Category", "narrow_category"), default="")),
        extra={k: v for k, v in row.items() if k not in known},
    )


def read_table(path: str | Path, bad_lines: BadLines | None = None) -> list[dict]:
    """Rows of a CSV/TSV (BOM-tolerant), JSON list or JSONL file, read strictly (``slidechat.utils.io``)."""
    return [_normalize_keys(r) for r in read_records(path, bad_lines)]


def _dedupe_ids(items: list[ClosedVQAItem]) -> None:
    """Make ids unique (``ID#k`` for the k-th repeat) so lookups by id are safe."""
    seen: dict[str, int] = {}
    for item in items:
        k = seen.get(item.id, 0)
        seen[item.id] = k + 1
        if k:
            item.id = f"{item.id}#{k}"


def load_closed_vqa(path: str | Path, bad_lines: BadLines | None = None) -> list[ClosedVQAItem]:
    """Load a SlideBench-style closed VQA file (CSV or JSON) into items with unique ids."""
    rows = read_table(path, bad_lines)
    if not rows:
        raise DataError(f"{path}: no questions found")
    items = [_item_from_row(row, i, str(path)) for i, row in enumerate(rows)]
    _dedupe_ids(items)
    return items


def load_predictions(path: str | Path, task: str | None = None, bad_lines: BadLines | None = None) -> dict[str, str]:
    """Load predictions as {question id: model output text}.

    Accepts JSONL/JSON records (id + output text) or a CSV with ``ID`` and ``Output`` columns.
    Repeated ids get the same ``#k`` suffixes as the gold file, so row order matches. With ``task``,
    records that carry a different ``task`` field (an `eval run` log mixes tasks) are skipped.
    """
    rows = read_table(path, bad_lines)
    if not rows:
        raise DataError(f"{path}: no predictions found")
    out: dict[str, str] = {}
    if task is not None and not any(_normalize_keys(r).get("task") in (None, task) for r in rows):
        raise DataError(f"{path}: no predictions for task {task!r}")
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        row = _normalize_keys(row)
        if task is not None and row.get("task") not in (None, task):
            continue
        raw_id = _first(row, ID_KEYS)
        if raw_id is None:
            raise DataError(f"{path} record {i + 1}: no id (expected one of {', '.join(ID_KEYS)})")
        key = next((k for k in OUTPUT_KEYS if k in row), None)
        if key is None:
            raise DataError(f"{path} record {i + 1}: no model output (expected 'Output' or 'output')")
        pid = _clean(raw_id)
        k = seen.get(pid, 0)
        seen[pid] = k + 1
        text = row[key]
        out[f"{pid}#{k}" if k else pid] = "" if text is None else str(text)
    return out


def has_gold_columns(path: str | Path, bad_lines: BadLines | None = None) -> bool:
    """True when a predictions file also carries the gold answers (SlideChat's output CSV)."""
    rows = read_table(path, bad_lines)
    return bool(rows) and "Answer" in _normalize_keys(rows[0]) and "Question" in _normalize_keys(rows[0])


def format_mcq_prompt(item: ClosedVQAItem) -> str:
    """The closed-VQA prompt: question, the non-empty options, and the answer instruction."""
    return format_mcq(item.question, item.options)
