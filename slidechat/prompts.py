"""Prompt templates: the system prompt, the slide placeholder, and the targeted questions behind ``report()``.

Training data (SlideChat / LLaVA) marks the image with ``<image>``; we use ``<slide>``. Both are accepted
everywhere and normalised to ``SLIDE_PLACEHOLDER``.
"""

from __future__ import annotations

from collections.abc import Mapping

SLIDE_PLACEHOLDER = "<slide>"
PLACEHOLDER_ALIASES = ("<image>", "<slide>", "<wsi>")

SYSTEM_PROMPT = (
    "You are SlideChat, an assistant for pathology whole-slide images. The slide is given to you as a "
    "sequence of visual tokens. Answer concisely and only from what the slide shows."
)

# Targeted questions for the structured report: field -> question. Answers are parsed by slidechat.inference.report.
REPORT_QUESTIONS: dict[str, str] = {
    "tissue_types": "Which tissue types are present in this slide? Answer with a comma-separated list.",
    "dominant_tissue": "Which tissue type covers the largest area of this slide? Answer with one tissue type.",
    "lesion_present": "Is there a focal lesion in this slide? Answer yes or no.",
    "lesion_type": "Which focal lesion does this slide show? Answer with the lesion type, or none.",
    "lesion_location": "In which quadrant of the slide is the lesion? Answer upper-left, upper-right, lower-left "
                       "or lower-right.",
    "tumor_fraction_percent": "What percentage of the tissue area is tumour? Answer with a percentage.",
    "summary": "Write a short pathology report describing this slide.",
}
# Field names follow the structured reports of SlideSynth (slidechat.synth.text.report) so they can be scored.

REPORT_TITLE = "Slide report"

# Used by `slidechat chat` when no question is typed yet.
CHAT_GREETING = "Ask a question about the slide (empty line or Ctrl-D to quit, /reset to start over)."


def slide_name(number: int, label: str | None = None) -> str:
    """How a case's ``number``-th slide (1-based) is named in prompts and answers: ``Slide 2 (A1 H&E)``."""
    label = (label or "").strip()
    return f"Slide {number} ({label})" if label else f"Slide {number}"


def slide_marker(number: int, label: str | None = None) -> str:
    """The marker before a case's ``number``-th slide in the first turn: ``Slide 2 (A1 H&E):``."""
    return slide_name(number, label) + ":"


def case_header(num_slides: int, labels=None) -> str:
    """The slide block of a conversation's first turn: ``<slide>`` alone for one slide; for a case, one marked
    line per slide (``Slide 1 (A1 H&E): <slide>``), so answers can name the slide they refer to."""
    if num_slides == 1:
        return SLIDE_PLACEHOLDER
    labels = list(labels or [])
    labels += [None] * (num_slides - len(labels))
    return "\n".join(f"{slide_marker(i + 1, labels[i])} {SLIDE_PLACEHOLDER}" for i in range(num_slides))


def split_case_header(text: str) -> tuple[str, str]:
    """(the leading lines that carry slide placeholders, the rest): ``"Slide 1 (A1 H&E): <image>\\nSlide 2:
    <image>\\nWhich slide..."`` -> the two marked lines and the question; ``("", text)`` when it has none."""
    lines = text.split("\n")
    n = 0
    while n < len(lines) and any(p in lines[n] for p in PLACEHOLDER_ALIASES):
        n += 1
    return "\n".join(lines[:n]), "\n".join(lines[n:])


def normalise_placeholder(text: str) -> str:
    """Replace any accepted placeholder spelling (``<image>``, ``<wsi>``) with ``<slide>``."""
    for alias in PLACEHOLDER_ALIASES:
        if alias != SLIDE_PLACEHOLDER:
            text = text.replace(alias, SLIDE_PLACEHOLDER)
    return text


MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def format_mcq(question: str, options: Mapping[str, str]) -> str:
    """The closed-VQA (SlideBench) prompt: the question, each non-empty option as ``X. text``, the instruction.

    Training data and evaluation both use this, so the model is scored on the prompt it was taught.
    """
    lines = [question.strip()] + [f"{letter}. {text}" for letter, text in options.items() if text]
    lines.append(MCQ_INSTRUCTION)
    return "\n".join(lines)
