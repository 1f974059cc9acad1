"""SynthSlide cases: 2-4 slides of one synthetic specimen with case-level ground truth and questions.

A case's slides are ordinary SynthSlides (written to ``slides/`` with every single-slide product), drawn so that
case questions have definite answers: at most one slide carries the focal lesion (none in about one case in five).
Extra files, beside the single-slide ones::

    cases.csv             case_id,slide_path,label   (the input of `slidechat report --cases`)
    case_truth.jsonl      per case: slide ids, labels, which slides show a lesion / tumour / necrosis
    case_closed_vqa.csv   SlideBench columns; ``Slide`` lists the case's slides joined by ";", ``Slide Labels``
                          their labels in the same order
    case_instructions.json  LLaVA/SlideInstruction records with ``"image": [...]`` (one conversation per case; its
                          first turn has a ``Slide 1 (A1 H&E): <image>`` line per slide)
    case_reports.jsonl    a case-level report (text + fields) per case

Answers name slides as the prompt does (``Slide 2 (A2 H&E)``: ``slidechat.inference.case.Case.name``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from slidechat import prompts
from slidechat.errors import ConfigError
from slidechat.synth import text as T
from slidechat.synth.classes import DISPLAY_NAMES, LABEL_NAMES, LESION_DISPLAY, QUADRANTS, TISSUE_CLASSES
from slidechat.synth.dataset import (CLOSED_VQA_COLUMNS, MAGNIFICATION, MPP, SLIDE_LABELS_COLUMN, generate_slide,
                                     prepare_dataset_folder, write_text_products)
from slidechat.utils.io import write_json_atomic, write_text_atomic

CASE_SLIDE_SEPARATOR = ";"
NO_LESION_SLIDE = "None of the slides"
CASE_CATEGORY = "Case"


def slide_name(index: int, label: str | None) -> str:
    """``Slide 2 (A2 H&E)`` for the 0-based ``index`` (``prompts.slide_name``, as the case prompt names it)."""
    return prompts.slide_name(index + 1, label)


def case_id(seed: int, index: int) -> str:
    return f"case-{seed}-{index:04d}"


def case_labels(index: int, n_slides: int) -> list[str]:
    """The labels of the ``index``-th case's slides, as a block and level would name them: ``A1 H&E``, ``A2 H&E``."""
    block = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[index % 26]
    return [f"{block}{j + 1} H&E" for j in range(n_slides)]


def plan_cases(n_cases: int, seed: int, min_slides: int = 2, max_slides: int = 4) -> list[dict]:
    """Per case: its slide count and which slide (0-based, or None) carries the lesion; deterministic in ``seed``."""
    if not 1 <= min_slides <= max_slides:
        raise ConfigError(f"case slides: need 1 <= min ({min_slides}) <= max ({max_slides})")
    rng = np.random.default_rng([seed, 4242])
    plans = []
    for _ in range(n_cases):
        n = int(rng.integers(min_slides, max_slides + 1))
        lesion = None if rng.random() < 0.2 else int(rng.integers(n))
        plans.append({"n_slides": n, "lesion_slide": lesion})
    return plans


def case_truth(case_id: str, slides: list[dict], labels: list[str]) -> dict:
    """Case-level facts from the slides' truth records (indices 0-based)."""
    return {
        "case_id": case_id,
        "slide_ids": [r["slide_id"] for r in slides],
        "labels": labels,
        "lesion_slides": [i for i, r in enumerate(slides) if r["lesion"] is not None],
        "tumor_slides": [i for i, r in enumerate(slides) if r["tumor_fraction"] > 0],
        "necrosis_slides": [i for i, r in enumerate(slides) if "necrosis" in r["classes_present"]],
        "lesion_types": [LESION_DISPLAY[r["lesion"]["class"]] if r["lesion"] else None for r in slides],
        "lesion_quadrants": [r["lesion"]["quadrant"] if r["lesion"] else None for r in slides],
        "dominant_tissues": [DISPLAY_NAMES[r["dominant_class"]] for r in slides],
    }


def _mcq(narrow: str, question: str, correct: str, others: list[str], rng: np.random.Generator) -> dict:
    """Up to four options (the correct one + up to three others), shuffled; letters A.. in order."""
    distractors = [others[i] for i in rng.permutation(len(others))[:3]]
    options = [correct] + distractors
    options = [options[i] for i in rng.permutation(len(options))]
    return {"broad": CASE_CATEGORY, "narrow": narrow, "question": question, "options": options,
            "answer": "ABCD"[options.index(correct)]}


def case_closed_questions(truth: dict, rng: np.random.Generator) -> list[dict]:
    """Questions whose answer needs more than one slide of the case."""
    n = len(truth["slide_ids"])
    names = [slide_name(i, lab) for i, lab in enumerate(truth["labels"])]
    lesion = truth["lesion_slides"]
    lesion_answer = names[lesion[0]] if lesion else NO_LESION_SLIDE
    out = [
        _mcq("Lesion slide", "Which slide shows the focal lesion?", lesion_answer,
             [x for x in names + [NO_LESION_SLIDE] if x != lesion_answer], rng),
        _mcq("Tumour in any slide", "Is tumour present in any of the slides?",
             "Yes" if truth["tumor_slides"] else "No", ["No" if truth["tumor_slides"] else "Yes"], rng),
    ]
    k = len(truth["necrosis_slides"])
    out.append(_mcq("Necrosis count", "In how many of the slides is necrosis present?", str(k),
                    [str(v) for v in range(n + 1) if v != k], rng))
    return out


def slide_findings(truth: dict, narrow: str) -> str:
    """Each slide's own finding behind a case question (``narrow``: its category), in slide order, each followed by
    the answer so far, so that every step needs only the slide at hand and the step before: "Slide 1: no focal
    lesion -> none so far; Slide 2: necrotic focus -> Slide 2; Slide 3: no focal lesion -> Slide 2", "Slide 1:
    necrosis -> 1; Slide 2: no necrosis -> 1" or "Slide 1: no tumour -> no; Slide 2: tumour -> yes"."""
    names = [slide_name(i, lab) for i, lab in enumerate(truth["labels"])]
    steps, state = [], None
    for i, name in enumerate(names):
        if narrow == "Lesion slide":
            found = truth["lesion_types"][i] or "no focal lesion"
            state = name if i in truth["lesion_slides"] else (state or "none so far")
        elif narrow == "Tumour in any slide":
            found = "tumour" if i in truth["tumor_slides"] else "no tumour"
            state = "yes" if i in truth["tumor_slides"] or state == "yes" else "no"
        elif narrow == "Necrosis count":
            found = "necrosis" if i in truth["necrosis_slides"] else "no necrosis"
            state = str(sum(j <= i for j in truth["necrosis_slides"]))
        else:
            raise ValueError(f"unknown case question category {narrow!r}")
        steps.append(f"{name}: {found} -> {state}")
    return "; ".join(steps)


def reasoned_case_answer(truth: dict, question: dict) -> str:
    """The answer to a case multiple-choice ``question``: each slide's finding with the answer so far, then the
    chosen option's text and its letter ("... So the answer is Slide 2 (B)."). The text comes first because it
    follows from the last step; the letter is then a look-up in the options, as in single-slide answers."""
    letter = question["answer"]
    option = question["options"]["ABCD".index(letter)]
    return f"{slide_findings(truth, question['narrow'])}. So the answer is {option} ({letter})."


def _lesion_slide_sentence(truth: dict) -> str:
    names = [slide_name(i, lab) for i, lab in enumerate(truth["labels"])]
    if not truth["lesion_slides"]:
        return "None of the slides shows a focal lesion."
    i = truth["lesion_slides"][0]
    return (f"{names[i]} shows the focal lesion: a {truth['lesion_types'][i]} in the "
            f"{truth['lesion_quadrants'][i]} quadrant.")


def _count_sentence(what: str, slides: list[int], names: list[str]) -> str:
    if not slides:
        return f"{what.capitalize()} is present in none of the slides."
    where = T._join([names[i] for i in slides])
    return f"{what.capitalize()} is present in {len(slides)} slide{'s' if len(slides) != 1 else ''}: {where}."


def case_image_header(labels: list[str | None]) -> str:
    """The first turn's slide lines in LLaVA spelling, one per slide: ``Slide 1 (A1 H&E): <image>``."""
    return prompts.case_header(len(labels), labels).replace(prompts.SLIDE_PLACEHOLDER, "<image>")


def case_sentence_turns(truth: dict) -> list[tuple[str, str]]:
    """(question, answer in a sentence) about the case: which slide shows the lesion, tumour anywhere, necrosis
    count; the answers name the slides with ``truth["labels"]``."""
    names = [slide_name(i, lab) for i, lab in enumerate(truth["labels"])]
    tumor = truth["tumor_slides"]
    return [
        ("Which slide shows the focal lesion?", _lesion_slide_sentence(truth)),
        ("Is tumour present in any of the slides?",
         (f"Yes, tumour is present in {T._join([names[i] for i in tumor])}." if tumor
          else "No, none of the slides shows tumour.")),
        ("In how many of the slides is necrosis present?", _count_sentence("necrosis", truth["necrosis_slides"], names)),
    ]


def case_conversation(truth: dict) -> list[dict]:
    """A LLaVA conversation over the case, ``case_sentence_turns`` in order; its first turn names every slide with
    its label, as the case prompt does."""
    conv = []
    for q, a in case_sentence_turns(truth):
        conv.append({"from": "human", "value": q if conv else case_image_header(truth["labels"]) + "\n" + q})
        conv.append({"from": "gpt", "value": a})
    return conv


def case_report(truth: dict) -> tuple[str, dict]:
    """A case-level report: one line per slide and the case's findings."""
    names = [slide_name(i, lab) for i, lab in enumerate(truth["labels"])]
    fields = {
        "n_slides": len(names),
        "lesion_slide": names[truth["lesion_slides"][0]] if truth["lesion_slides"] else None,
        "tumor_present_any": bool(truth["tumor_slides"]),
        "tumor_slides": [names[i] for i in truth["tumor_slides"]],
        "necrosis_slide_count": len(truth["necrosis_slides"]),
    }
    lines = [f"CASE {truth['case_id']}: {len(names)} slides."]
    for i, name in enumerate(names):
        lesion = truth["lesion_types"][i]
        lines.append(f"{name.upper()}: predominantly {truth['dominant_tissues'][i]}; "
                     + (f"{lesion}, {truth['lesion_quadrants'][i]} quadrant." if lesion else "no focal lesion."))
    lines += [f"LESION: {_lesion_slide_sentence(truth)}",
              f"TUMOUR: {'present in ' + T._join(fields['tumor_slides']) if fields['tumor_slides'] else 'absent'}.",
              f"NECROSIS: {_count_sentence('necrosis', truth['necrosis_slides'], names)}"]
    return "\n".join(lines), fields


def write_case_products(out_dir: Path, cases: list[dict], records: dict[str, dict], seed: int) -> None:
    """cases.csv, case_truth.jsonl, case_closed_vqa.csv, case_instructions.json, case_reports.jsonl."""
    rng = np.random.default_rng([seed, 7331])
    truths, reports, convs, closed = [], [], [], []
    table = io.StringIO()
    cases_csv = csv.writer(table, lineterminator="\n")
    cases_csv.writerow(["case_id", "slide_path", "label"])
    for case in cases:
        slides = [records[sid] for sid in case["slide_ids"]]
        truth = case_truth(case["case_id"], slides, case["labels"])
        truths.append(truth)
        for r, label in zip(slides, case["labels"]):
            cases_csv.writerow([case["case_id"], r["path"], label])
        text, fields = case_report(truth)
        reports.append({"case_id": case["case_id"], "report_text": text, "report": fields})
        convs.append({"id": f"{case['case_id']}-conv", "image": [f"{sid}.tiff" for sid in truth["slide_ids"]],
                      "conversations": case_conversation(truth)})
        closed += [{**q, "slide": CASE_SLIDE_SEPARATOR.join(truth["slide_ids"]), "case_id": case["case_id"],
                    "labels": CASE_SLIDE_SEPARATOR.join(truth["labels"])}
                   for q in case_closed_questions(truth, rng)]

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    write_text_atomic(out_dir / "cases.csv", table.getvalue())
    write_text_atomic(out_dir / "case_truth.jsonl", jsonl(truths))
    write_text_atomic(out_dir / "case_reports.jsonl", jsonl(reports))
    write_json_atomic(out_dir / "case_instructions.json", convs)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CLOSED_VQA_COLUMNS + [SLIDE_LABELS_COLUMN])
    for i, q in enumerate(closed):
        options = q["options"] + [""] * (4 - len(q["options"]))
        writer.writerow([f"{q['case_id']}-{i}", q["slide"], "SYNTH", q["broad"], q["narrow"], q["question"],
                         *options, q["answer"], q["labels"]])
    write_text_atomic(out_dir / "case_closed_vqa.csv", buf.getvalue())


def generate_case_dataset(out_dir: str | os.PathLike, n_cases: int, seed: int = 0, size: str = "tiny", *,
                          min_slides: int = 2, max_slides: int = 4, workers: int = 1,
                          progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Write ``n_cases`` cases (their slides + single-slide and case products) to ``out_dir``; return the cases."""
    out = prepare_dataset_folder(out_dir, size, n_cases, "--cases")
    plans = plan_cases(n_cases, seed, min_slides, max_slides)
    total = sum(p["n_slides"] for p in plans)
    records: list[dict] = []
    cases: list[dict] = []
    quad_rng = np.random.default_rng([seed, 556])
    for c, plan in enumerate(plans):
        ids = []
        for j in range(plan["n_slides"]):
            has_lesion = plan["lesion_slide"] == j
            rec = generate_slide(out, seed, len(records), size, quadrant=QUADRANTS[int(quad_rng.integers(4))],
                                 lesion_probability=1.0 if has_lesion else 0.0, workers=workers)
            rec["case_id"] = case_id(seed, c)
            records.append(rec)
            ids.append(rec["slide_id"])
            if progress is not None:
                progress(len(records), total)
        cases.append({"case_id": case_id(seed, c), "slide_ids": ids, "labels": case_labels(c, len(ids))})
    write_text_products(out, records, seed)
    write_case_products(out, cases, {r["slide_id"]: r for r in records}, seed)
    write_json_atomic(out / "dataset.json", {
        "generator": "slidechat.synth", "seed": seed, "size": size, "n": len(records), "n_cases": n_cases,
        "mpp": MPP, "magnification": MAGNIFICATION, "tissue_classes": list(TISSUE_CLASSES),
        "label_names": list(LABEL_NAMES)})
    return cases


def compose_case_dataset(source_dir: str | os.PathLike, out_dir: str | os.PathLike, n_cases: int, seed: int = 0, *,
                         min_slides: int = 2, max_slides: int = 4) -> list[dict]:
    """Cases drawn from the slides of an existing SynthSlide folder (``slidechat synth``), no new slides: each case
    takes 2-4 of them, at most one with a focal lesion (none in about one case in five), so many distinct cases
    come from one set of slides and their features. Writes the case products (``cases.csv`` with paths to the
    source slides, ``case_truth.jsonl``, ...) and ``dataset.json`` to ``out_dir``; returns the cases."""
    from slidechat.utils.io import read_jsonl

    source, out = Path(source_dir), Path(out_dir)
    truth_path = source / "truth.jsonl"
    if not truth_path.is_file():
        raise ConfigError(f"{source}: no truth.jsonl; compose cases from a folder written by `slidechat synth`")
    records = read_jsonl(truth_path)
    with_lesion = [r for r in records if r["lesion"] is not None]
    without = [r for r in records if r["lesion"] is None]
    if len(without) < max_slides or not with_lesion:
        raise ConfigError(f"{source}: composing cases needs slides with a lesion and at least {max_slides} without "
                          f"(has {len(with_lesion)} and {len(without)})")
    rng = np.random.default_rng([seed, 9090])
    cases = []
    for c, plan in enumerate(plan_cases(n_cases, seed, min_slides, max_slides)):
        picked = [without[i] for i in rng.choice(len(without), plan["n_slides"], replace=False)]
        if plan["lesion_slide"] is not None:
            picked[plan["lesion_slide"]] = with_lesion[int(rng.integers(len(with_lesion)))]
        cases.append({"case_id": case_id(seed, c), "slide_ids": [r["slide_id"] for r in picked],
                      "labels": case_labels(c, len(picked))})
    out.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(source, out)
    by_id = {r["slide_id"]: {**r, "path": f"{rel}/{r['path']}"} for r in records}
    write_case_products(out, cases, by_id, seed)
    write_json_atomic(out / "dataset.json", {"generator": "slidechat.synth.cases.compose_case_dataset",
                                             "source": str(source), "seed": seed, "n_cases": n_cases})
    return cases


__all__ = ["generate_case_dataset", "compose_case_dataset", "plan_cases", "case_truth", "case_closed_questions",
           "case_conversation", "case_sentence_turns", "slide_findings", "reasoned_case_answer",
           "case_report", "write_case_products", "slide_name", "case_image_header",
           "CASE_SLIDE_SEPARATOR", "NO_LESION_SLIDE"]
