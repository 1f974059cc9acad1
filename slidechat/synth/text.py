"""Text products of a synthetic slide, all derived from its ground truth: caption, structured report,
multi-turn conversation, closed (multiple-choice) and open questions. Every answer is answerable from
the slide's pixels (which tissues, how much, where the lesion is, how many fragments)."""

from __future__ import annotations

import numpy as np

from slidechat.synth.classes import (
    DISPLAY_NAMES,
    LESION_CLASSES,
    LESION_DISPLAY,
    QUADRANTS,
    TISSUE_CLASSES,
    TUMOR_FRACTION_BINS,
    tumor_fraction_bin,
)

NO_LESION = "no focal lesion"
FRAGMENT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _join(items: list[str]) -> str:
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _pct(x: float) -> str:
    return f"{round(100 * x):d}%"


def _composition(truth: dict) -> str:
    fr = truth["area_fractions"]
    order = sorted(truth["classes_present"], key=lambda c: -fr[c])
    return _join([f"{DISPLAY_NAMES[c]} (~{_pct(fr[c])})" for c in order])


def _lesion_sentence(truth: dict) -> str:
    les = truth["lesion"]
    if les is None:
        return "No focal lesion is identified."
    return (
        f"A {LESION_DISPLAY[les['class']]} occupies about {_pct(les['area_fraction'])} of the tissue, "
        f"in the {les['quadrant']} quadrant of the specimen."
    )


def caption(truth: dict, rng: np.random.Generator) -> str:
    """A free-text description of the slide (varied wording, same facts)."""
    n = truth["n_fragments"]
    frag = f"{FRAGMENT_WORDS.get(n, str(n))} tissue fragment{'s' if n != 1 else ''}"
    openers = [
        f"H&E-stained section with {frag}, composed of {_composition(truth)}.",
        f"The slide shows {frag} made up of {_composition(truth)}.",
        f"This whole-slide image contains {frag}; the tissue consists of {_composition(truth)}.",
    ]
    text = openers[int(rng.integers(len(openers)))] + " " + _lesion_sentence(truth)
    tf = truth["tumor_fraction"]
    text += f" Tumour fraction: {_pct(tf)} of tissue area." if tf > 0 else " No tumour is seen."
    return text


def report(truth: dict) -> tuple[str, dict]:
    """Structured report fields and their rendered text."""
    les = truth["lesion"]
    fields = {
        "specimen_fragments": truth["n_fragments"],
        "tissue_types": [DISPLAY_NAMES[c] for c in truth["classes_present"]],
        "dominant_tissue": DISPLAY_NAMES[truth["dominant_class"]] if truth["dominant_class"] else None,
        "lesion_present": les is not None,
        "lesion_type": LESION_DISPLAY[les["class"]] if les else None,
        "lesion_location": les["quadrant"] if les else None,
        "tumor_present": truth["tumor_fraction"] > 0,
        "tumor_fraction_percent": round(100 * truth["tumor_fraction"], 1),
        "tumor_fraction_bin": tumor_fraction_bin(truth["tumor_fraction"]),
        "necrosis_present": "necrosis" in truth["classes_present"],
        "diagnosis": (
            "carcinoma" if truth["tumor_fraction"] > 0
            else (LESION_DISPLAY[les["class"]] if les else "benign tissue, no lesion")
        ),
    }
    lines = [
        "SPECIMEN: synthetic H&E whole-slide image.",
        f"MICROSCOPY: {fields['specimen_fragments']} fragment(s); tissue types: {_composition(truth)}.",
        f"LESION: {(fields['lesion_type'] + ', ' + fields['lesion_location'] + ' quadrant') if les else 'none'}.",
        f"TUMOUR FRACTION: {fields['tumor_fraction_percent']}% ({fields['tumor_fraction_bin']}).",
        f"NECROSIS: {'present' if fields['necrosis_present'] else 'absent'}.",
        f"DIAGNOSIS: {fields['diagnosis']}.",
    ]
    return "\n".join(lines), fields


def _lesion_answer(truth: dict) -> str:
    les = truth["lesion"]
    return LESION_DISPLAY[les["class"]] if les else NO_LESION


def open_questions(truth: dict, rng: np.random.Generator) -> list[dict]:
    """Open questions with reference answers: {question, answer, category}."""
    present = truth["classes_present"]
    absent = [c for c in TISSUE_CLASSES if c not in present]
    les = truth["lesion"]
    qs = [
        {"category": "composition", "question": "Which tissue types are present in this slide?",
         "answer": f"The slide contains {_composition(truth)}."},
        {"category": "dominant", "question": "What is the predominant tissue type?",
         "answer": f"The predominant tissue is {DISPLAY_NAMES[truth['dominant_class']]}."},
        {"category": "tumor_presence", "question": "Is there tumour in this slide?",
         "answer": (f"Yes, tumour occupies about {_pct(truth['tumor_fraction'])} of the tissue."
                    if truth["tumor_fraction"] > 0 else "No, no tumour is seen.")},
        {"category": "lesion", "question": "Is there a focal lesion, and where is it?",
         "answer": (f"Yes, a {LESION_DISPLAY[les['class']]} in the {les['quadrant']} quadrant."
                    if les else "No focal lesion is identified.")},
    ]
    # a yes/no presence question, yes and no equally likely
    ask_present = bool(rng.random() < 0.5) if absent and present else bool(present)
    cls = present[int(rng.integers(len(present)))] if ask_present else absent[int(rng.integers(len(absent)))]
    qs.append({"category": "presence", "question": f"Is {DISPLAY_NAMES[cls]} present in this slide?",
               "answer": (f"Yes, {DISPLAY_NAMES[cls]} is present (~{_pct(truth['area_fractions'][cls])} of tissue)."
                          if ask_present else f"No, there is no {DISPLAY_NAMES[cls]}.")})
    qs.append({"category": "fragments", "question": "How many tissue fragments are on the slide?",
               "answer": f"There {'is' if truth['n_fragments'] == 1 else 'are'} {FRAGMENT_WORDS.get(truth['n_fragments'], truth['n_fragments'])}."})
    return qs


def conversation(truth: dict, caption_text: str, rng: np.random.Generator) -> list[dict]:
    """A multi-turn LLaVA-style conversation; the first human turn carries the ``<image>`` token."""
    describe = ["Describe this slide.", "What do you see in this whole-slide image?",
                "Give a short description of the tissue on this slide."]
    turns = [(describe[int(rng.integers(len(describe)))], caption_text)]
    extra = open_questions(truth, rng)
    order = rng.permutation(len(extra))[: int(rng.integers(2, 5))]
    turns += [(extra[i]["question"], extra[i]["answer"]) for i in order]
    conv = []
    for k, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if k == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def closed_questions(truth: dict, rng: np.random.Generator) -> list[dict]:
    """Multiple-choice questions: {broad, narrow, question, correct, distractors(3)} (letters assigned later)."""
    present = truth["classes_present"]
    absent = [c for c in TISSUE_CLASSES if c not in present]
    disp = DISPLAY_NAMES
    out = []

    def pick(pool: list[str], k: int) -> list[str]:
        return [pool[i] for i in rng.permutation(len(pool))[:k]]

    dom = truth["dominant_class"]
    others = [c for c in TISSUE_CLASSES if c != dom]
    out.append({"broad": "Microscopy", "narrow": "Dominant tissue",
                "question": "Which tissue type makes up the largest part of the tissue on this slide?",
                "correct": disp[dom], "distractors": [disp[c] for c in pick(others, 3)]})
    if len(absent) >= 3:
        out.append({"broad": "Microscopy", "narrow": "Tissue presence",
                    "question": "Which of the following tissue types is present on this slide?",
                    "correct": disp[pick(present, 1)[0]], "distractors": [disp[c] for c in pick(absent, 3)]})
    if len(present) >= 3 and absent:
        out.append({"broad": "Microscopy", "narrow": "Tissue absence",
                    "question": "Which of the following tissue types is NOT present on this slide?",
                    "correct": disp[pick(absent, 1)[0]], "distractors": [disp[c] for c in pick(present, 3)]})
    n = truth["n_fragments"]
    if 1 <= n <= 4:
        out.append({"broad": "Microscopy", "narrow": "Fragment count",
                    "question": "How many separate tissue fragments are on this slide?",
                    "correct": str(n), "distractors": [str(k) for k in (1, 2, 3, 4) if k != n]})
    lesion_opts = [LESION_DISPLAY[c] for c in LESION_CLASSES] + [NO_LESION]
    ans = _lesion_answer(truth)
    out.append({"broad": "Diagnosis", "narrow": "Lesion type", "question": "Which focal lesion does this slide show?",
                "correct": ans, "distractors": [o for o in lesion_opts if o != ans]})
    bins = [b[2] for b in TUMOR_FRACTION_BINS]
    tb = tumor_fraction_bin(truth["tumor_fraction"])
    out.append({"broad": "Diagnosis", "narrow": "Tumour fraction",
                "question": "What fraction of the tissue area is tumour?",
                "correct": tb, "distractors": [b for b in bins if b != tb]})
    les = truth["lesion"]
    if les is not None:
        out.append({"broad": "Diagnosis", "narrow": "Lesion location",
                    "question": f"In which quadrant of the specimen is the {LESION_DISPLAY[les['class']]} located?",
                    "correct": les["quadrant"], "distractors": [q for q in QUADRANTS if q != les["quadrant"]]})
    return out


def assign_letters(questions: list[dict], rng: np.random.Generator) -> list[dict]:
    """Place each correct answer at a letter from a balanced shuffled sequence (A-D equally often)."""
    n = len(questions)
    letters = np.tile(np.arange(4), -(-n // 4))[:n]
    letters = letters[rng.permutation(n)]
    out = []
    for q, li in zip(questions, letters):
        opts = [q["distractors"][i] for i in rng.permutation(3)]
        opts.insert(int(li), q["correct"])
        out.append({**q, "options": opts, "answer": "ABCD"[int(li)]})
    return out
