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


# Paraphrases of each open question type (the question a user types varies; the fact asked does not).
OPEN_QUESTIONS: dict[str, tuple[str, ...]] = {
    "composition": ("Which tissue types are present in this slide?", "What tissues can you see on this slide?",
                    "List the tissue types in this section.", "What is this specimen composed of?"),
    "dominant": ("What is the predominant tissue type?", "Which tissue covers most of the slide?",
                 "What is the main tissue on this slide?", "Which tissue type is most abundant here?"),
    "tumor_presence": ("Is there tumour in this slide?", "Is carcinoma present on this slide?",
                       "Does this slide show any tumour?", "Is there evidence of malignancy in this section?"),
    "lesion": ("Is there a focal lesion, and where is it?", "Do you see a focal lesion? Where is it?",
               "Where is the lesion located?", "Is there any focal lesion on this slide?"),
    "presence": ("Is {tissue} present in this slide?", "Do you see {tissue} on this slide?",
                 "Does this slide contain {tissue}?", "Is there any {tissue} in this section?"),
    "fragments": ("How many tissue fragments are on the slide?", "How many pieces of tissue are there?",
                  "How many separate tissue fragments does the section have?", "Count the tissue fragments."),
}
DESCRIBE_PROMPTS: tuple[str, ...] = ("Describe this slide.", "What do you see in this whole-slide image?",
                                     "Give a short description of the tissue on this slide.",
                                     "Summarise the findings on this slide.")


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _in_class_order(classes) -> list[str]:
    """Tissues in the fixed class order (``TISSUE_CLASSES``): a list a reader can walk class by class."""
    return [c for c in TISSUE_CLASSES if c in classes]


def _tumour_share(truth: dict) -> str:
    """The tumour fraction as its bin ("10-30%"), the resolution at which a slide-level reader states it."""
    return tumor_fraction_bin(truth["tumor_fraction"])


def _fragments_phrase(n: int) -> str:
    return f"{FRAGMENT_WORDS.get(n, str(n))} tissue fragment{'s' if n != 1 else ''}"


def open_answer(category: str, truth: dict, rng: np.random.Generator, tissue: str | None = None) -> str:
    """A full-sentence answer to an open question of ``category`` (one of several phrasings, same facts).

    Answers state what is visible at slide level: which tissues, the dominant one, the lesion and its quadrant,
    the fragment count, and the tumour fraction by bin; per-tissue area shares are left to the caption."""
    les = truth["lesion"]
    if category == "composition":
        names = _join([DISPLAY_NAMES[c] for c in _in_class_order(truth["classes_present"])])
        return _pick(rng, (f"The slide contains {names}.", f"The tissue is made up of {names}.",
                           f"I can see {names}."))
    if category == "dominant":
        d = DISPLAY_NAMES[truth["dominant_class"]]
        return _pick(rng, (f"The predominant tissue is {d}.", f"The tissue is mostly {d}.",
                           f"The dominant tissue type is {d}."))
    if category == "tumor_presence":
        if truth["tumor_fraction"] > 0:
            share = _tumour_share(truth)
            return _pick(rng, (f"Yes, tumour is present ({share} of the tissue area).",
                               f"Yes, there is a carcinoma (tumour focus) in the {les['quadrant']} quadrant.",
                               f"Yes. Tumour makes up {share} of the tissue."))
        return _pick(rng, ("No, no tumour is seen.", "No, there is no tumour in this slide.",
                           "No. The slide shows no tumour."))
    if category == "lesion":
        if les is None:
            return _pick(rng, ("No focal lesion is identified.", "No, there is no focal lesion on this slide."))
        name, quad = LESION_DISPLAY[les["class"]], les["quadrant"]
        return _pick(rng, (f"Yes, a {name} in the {quad} quadrant.",
                           f"There is a {name} in the {quad} quadrant of the specimen.",
                           f"A {name} is present in the {quad} quadrant."))
    if category == "presence":
        name = DISPLAY_NAMES[tissue]
        if tissue in truth["classes_present"]:
            return _pick(rng, (f"Yes, {name} is present.", f"Yes, the slide contains {name}."))
        return _pick(rng, (f"No, there is no {name}.", f"No, {name} is not present.", f"No {name} is seen."))
    if category == "fragments":
        n = truth["n_fragments"]
        return _pick(rng, (f"There {'is' if n == 1 else 'are'} {_fragments_phrase(n)}.",
                           f"The slide has {_fragments_phrase(n)}.",
                           f"I count {_fragments_phrase(n)}."))
    raise ValueError(f"unknown open question category {category!r}")


def _presence_question(truth: dict, rng: np.random.Generator, tissue: str) -> dict:
    question = _pick(rng, OPEN_QUESTIONS["presence"]).format(tissue=DISPLAY_NAMES[tissue])
    return {"category": "presence", "question": question, "answer": open_answer("presence", truth, rng, tissue)}


def open_questions(truth: dict, rng: np.random.Generator) -> list[dict]:
    """One open question per type, each in a drawn phrasing, with a reference answer: {question, answer,
    category} (presence: a present or an absent tissue, equally likely)."""
    present = truth["classes_present"]
    absent = [c for c in TISSUE_CLASSES if c not in present]
    qs = []
    for category in ("composition", "dominant", "tumor_presence", "lesion"):
        qs.append({"category": category, "question": _pick(rng, OPEN_QUESTIONS[category]),
                   "answer": open_answer(category, truth, rng)})
    ask_present = bool(rng.random() < 0.5) if absent and present else bool(present)
    cls = present[int(rng.integers(len(present)))] if ask_present else absent[int(rng.integers(len(absent)))]
    qs.append(_presence_question(truth, rng, cls))
    qs.append({"category": "fragments", "question": _pick(rng, OPEN_QUESTIONS["fragments"]),
               "answer": open_answer("fragments", truth, rng)})
    return qs


def presence_questions(truth: dict, rng: np.random.Generator, k: int) -> list[dict]:
    """``k`` presence questions about distinct tissue classes (present and absent ones alternating, as far as the
    slide has both), each in a drawn phrasing with its answer."""
    present = [truth["classes_present"][i] for i in rng.permutation(len(truth["classes_present"]))]
    absent = [c for c in TISSUE_CLASSES if c not in truth["classes_present"]]
    absent = [absent[i] for i in rng.permutation(len(absent))]
    order = []
    for i in range(max(len(present), len(absent))):
        pair = [present[i:i + 1], absent[i:i + 1]]
        for part in (pair if rng.random() < 0.5 else pair[::-1]):
            order += part
    return [_presence_question(truth, rng, c) for c in order[:k]]


def description(truth: dict, rng: np.random.Generator, tumour_fraction: bool = True) -> str:
    """A slide description in the words a slide-level reader can back: fragments, tissues (the dominant one,
    then the others in class order), the lesion and its quadrant, the tumour fraction by bin (one of several
    phrasings). ``tumour_fraction=False`` leaves the fraction out (a report states it in its own field)."""
    dominant = truth["dominant_class"]
    rest = _in_class_order(set(truth["classes_present"]) - {dominant})
    order = [DISPLAY_NAMES[c] for c in ([dominant] if dominant else []) + rest]
    frag = _fragments_phrase(truth["n_fragments"])
    tissue = (f"composed mainly of {order[0]}, with {_join(order[1:])}" if len(order) > 1
              else f"composed of {order[0]} only")
    text = _pick(rng, (f"H&E-stained section with {frag}, {tissue}.", f"The slide shows {frag} {tissue}.",
                       f"This whole-slide image contains {frag}, {tissue}."))
    les = truth["lesion"]
    if les is None:
        text += " " + _pick(rng, ("No focal lesion is identified.", "There is no focal lesion."))
    else:
        name, quad = LESION_DISPLAY[les["class"]], les["quadrant"]
        text += " " + _pick(rng, (f"A {name} lies in the {quad} quadrant.",
                                  f"There is a {name} in the {quad} quadrant of the specimen."))
    if truth["tumor_fraction"] > 0:
        if tumour_fraction:
            text += " " + _pick(rng, (f"Tumour fraction: {_tumour_share(truth)} of the tissue area.",
                                      f"Tumour makes up {_tumour_share(truth)} of the tissue."))
    else:
        text += " No tumour is seen."
    return text


def conversation(truth: dict, caption_text: str, rng: np.random.Generator) -> list[dict]:
    """A multi-turn LLaVA-style conversation; the first human turn carries the ``<image>`` token."""
    turns = [(_pick(rng, DESCRIBE_PROMPTS), caption_text)]
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
