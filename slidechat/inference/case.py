"""Cases: the slides of one specimen (blocks, levels, stains) asked about, and reported on, together.

A ``Case`` is an id, its slides (paths, ``EncodedSlide`` or ``SlideFeatures``) and an optional label per slide
("A1 H&E"). A conversation about a case shows the LLM every slide's projected tokens behind a marker
(``prompts.case_header``), so its cost grows as S x K tokens. A cases CSV has one row per slide::

    case_id,slide_path,label
    C-001,blocks/a1.svs,A1 H&E
    C-001,blocks/a2.svs,A2 H&E

Rows of one case keep their order; relative paths are relative to the CSV's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from slidechat import prompts
from slidechat.errors import DataError
from slidechat.utils.io import BadLines, read_csv_rows

MAX_CASE_SLIDES = 32  # the LLM's context is the real bound; this catches a CSV whose case_id column is wrong


@dataclass
class Case:
    """``case_id``, ``slides`` (1..S) and ``labels`` (one per slide, ``None`` for none)."""

    case_id: str
    slides: list[Any]
    labels: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slides = list(self.slides)
        if not self.slides:
            raise DataError(f"case {self.case_id!r} has no slides")
        if len(self.slides) > MAX_CASE_SLIDES:
            raise DataError(f"case {self.case_id!r} has {len(self.slides)} slides; at most {MAX_CASE_SLIDES} "
                            "fit one conversation")
        labels = [None if (v is None or not str(v).strip()) else str(v).strip() for v in self.labels]
        if len(labels) > len(self.slides):
            raise DataError(f"case {self.case_id!r}: {len(labels)} labels for {len(self.slides)} slides")
        self.labels = labels + [None] * (len(self.slides) - len(labels))

    def __len__(self) -> int:
        return len(self.slides)

    def name(self, index: int) -> str:
        """How answers and pages name slide ``index`` (0-based): ``Slide 2 (A1 H&E)``."""
        return prompts.slide_name(index + 1, self.labels[index])


def as_case(value: Any, labels: Sequence[str | None] | None = None) -> Case:
    """A ``Case`` from a case, a list of slides, or one slide."""
    if isinstance(value, Case):
        return value if labels is None else Case(value.case_id, value.slides, list(labels))
    if isinstance(value, (list, tuple)):
        return Case("", list(value), list(labels or []))
    return Case("", [value], list(labels or []))


def read_cases_csv(path: str | Path, bad_lines: BadLines | None = None) -> list[Case]:
    """The cases of a ``case_id,slide_path[,label]`` CSV, in order of first appearance."""
    p = Path(path)
    rows = read_csv_rows(p, bad_lines=bad_lines, required=("case_id", "slide_path"))
    cases: dict[str, Case] = {}
    for i, row in enumerate(rows, start=2):
        case_id, slide = (row.get("case_id") or "").strip(), (row.get("slide_path") or "").strip()
        if not case_id or not slide:
            raise DataError(f"{p}:{i}: every row needs a case_id and a slide_path")
        slide_path = Path(slide).expanduser()
        if not slide_path.is_absolute():
            slide_path = p.parent / slide_path
        label = (row.get("label") or "").strip() or None
        case = cases.get(case_id)
        if case is None:
            cases[case_id] = Case(case_id, [slide_path], [label])
        else:
            if slide_path in case.slides:
                raise DataError(f"{p}:{i}: {slide} is listed twice in case {case_id!r}")
            case.slides.append(slide_path)
            case.labels.append(label)
            if len(case.slides) > MAX_CASE_SLIDES:
                raise DataError(f"{p}:{i}: case {case_id!r} has more than {MAX_CASE_SLIDES} slides")
    if not cases:
        raise DataError(f"{p} lists no cases (it needs case_id,slide_path rows)")
    return list(cases.values())


__all__ = ["Case", "as_case", "read_cases_csv", "MAX_CASE_SLIDES"]
