"""Training conversations for the demo, built from a SynthSlide folder's ground truth (``truth.jsonl``).

Three kinds of single-turn samples, each in the format the rest of the system asks with:

* **multiple choice** in the SlideBench / ``slidechat eval`` prompt format (question, ``A. ...`` lines, "Answer with
  the option's letter ..."), several shuffles of the options per slide; the answer names the option and then
  its letter, ``"lower-left (C)"`` (the option text is the supervision on the slide's content; the letter makes it
  a choice);
* the **report questions** of ``slidechat.prompts.REPORT_QUESTIONS`` (what ``assistant.report()`` asks), with short
  answers in the form its parser reads;
* **open questions** in drawn paraphrases with full-sentence answers, and **descriptions** ("Describe this
  slide."), both from ``slidechat.synth.text`` (``open_answer`` / ``description``: several phrasings per fact,
  only facts a slide-level reader can back; the tumour fraction by bin).

Written as a LLaVA/SlideInstruction JSON list, so the demo trains through the same loader as SlideChat's data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slidechat import prompts
from slidechat.errors import ConfigError
from slidechat.utils.io import read_jsonl, write_json_atomic



def format_mcq(question: str, options: list[str]) -> str:
    """The closed-VQA prompt for options listed A, B, C, D (``slidechat.prompts.format_mcq``)."""
    return prompts.format_mcq(question, dict(zip("ABCD", options)))


def mcq_answer(options: list[str], letter: str) -> str:
    return f"{options['ABCD'.index(letter)]} ({letter})"


def report_answers(truth: dict, summary: str | None) -> dict[str, str]:
    """Short answers to the report questions (field -> answer), from the truth record; ``summary`` answers the
    summary question."""
    from slidechat.synth import text as T
    from slidechat.synth.classes import DISPLAY_NAMES, LESION_DISPLAY

    _, fields = T.report(truth)
    les = truth["lesion"]
    answers = {
        "tissue_types": ", ".join(fields["tissue_types"]),
        "dominant_tissue": fields["dominant_tissue"] or DISPLAY_NAMES.get(truth.get("dominant_class") or "", "none"),
        "lesion_present": "yes" if les else "no",
        "lesion_type": LESION_DISPLAY[les["class"]] if les else "none",
        "lesion_class": LESION_DISPLAY[les["class"]] if les else "none",
        "lesion_location": les["quadrant"] if les else "none",
        "tumor_fraction_percent": f"{round(100 * truth['tumor_fraction'])}%",
        "tumor_fraction": f"{round(100 * truth['tumor_fraction'])}%",
    }
    if summary:
        answers["summary"] = summary
    return answers


def build_demo_instructions(synth_dir: str | Path, out_path: str | Path, *, mcq_rounds: int = 4,
                            report_questions: bool = True, open_rounds: int = 0, describe_rounds: int = 0,
                            presence_per_round: int = 1, seed: int = 0, turns_per_conversation: int = 1) -> dict:
    """Write the demo's stage-2 instruction JSON from a SynthSlide folder; returns counts per kind.

    Per slide: ``mcq_rounds`` option shuffles of the closed questions, ``open_rounds`` draws of the open questions
    (one per type, a new paraphrase each draw; ``presence_per_round`` presence questions about distinct tissues),
    ``describe_rounds`` descriptions and, with ``report_questions``, the report questions (the summary answered by
    a description).

    ``turns_per_conversation`` > 1 packs a slide's questions (shuffled) into multi-turn conversations: the system
    prompt and slide tokens are then paid once per conversation instead of once per question.
    """
    from slidechat import prompts
    from slidechat.synth import text as T

    synth_dir = Path(synth_dir)
    truths = read_jsonl(synth_dir / "truth.jsonl")
    records: list[dict] = []
    counts = {"mcq": 0, "report": 0, "open": 0, "describe": 0}

    def add(rid: str, slide_id: str, question: str, answer: str, draw: int = 0) -> None:
        records.append({"id": rid, "image": [f"{slide_id}.tiff"], "draw": draw, "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})

    for t in truths:
        sid = t["slide_id"]
        for r in range(mcq_rounds):
            rng = np.random.default_rng([seed, t["index"], r, 17])
            qs = T.assign_letters(T.closed_questions(t, rng), rng)
            for k, q in enumerate(qs):
                add(f"{sid}-mcq{r}-{k}", sid, format_mcq(q["question"], q["options"]),
                    mcq_answer(q["options"], q["answer"]), r)
                counts["mcq"] += 1
        for r in range(open_rounds):
            rng = np.random.default_rng([seed, t["index"], r, 23])
            qs = T.open_questions(t, rng)
            if presence_per_round != 1:
                qs = [q for q in qs if q["category"] != "presence"] + T.presence_questions(t, rng, presence_per_round)
            for k, q in enumerate(qs):
                add(f"{sid}-open{r}-{k}-{q['category']}", sid, q["question"], q["answer"], r)
                counts["open"] += 1
        for r in range(describe_rounds):
            rng = np.random.default_rng([seed, t["index"], r, 31])
            add(f"{sid}-describe{r}", sid, T.DESCRIBE_PROMPTS[int(rng.integers(len(T.DESCRIBE_PROMPTS)))],
                T.description(t, rng), r)
            counts["describe"] += 1
        if report_questions:
            # the summary leaves the tumour fraction to its field, so the report states it once
            summary = T.description(t, np.random.default_rng([seed, t["index"], 37]), tumour_fraction=False)
            answers = report_answers(t, summary)
            for field, question in prompts.REPORT_QUESTIONS.items():
                if field in answers:
                    add(f"{sid}-report-{field}", sid, question, answers[field])
                    counts["report"] += 1
    if turns_per_conversation > 1:
        records = pack_conversations(records, turns_per_conversation, seed)
    records = [{k: v for k, v in r.items() if k != "draw"} for r in records]
    order = np.random.default_rng(seed).permutation(len(records))
    write_json_atomic(Path(out_path), [records[i] for i in order], indent=None)
    return counts


def pack_conversations(records: list[dict], turns: int, seed: int = 0) -> list[dict]:
    """Group single-turn records of the same slide (or the same case's slides) into conversations of up to
    ``turns`` question/answer pairs, in random order within each ``draw`` (a record's optional round), earlier
    draws first -- so a conversation rarely asks the same fact twice and an answer cannot be copied from a turn
    before it."""
    by_slide: dict[tuple, list[tuple[str, dict]]] = {}  # (images, slide header) -> (question, record)
    for r in records:
        header, question = prompts.split_case_header(r["conversations"][0]["value"])
        by_slide.setdefault((tuple(r["image"]), header or "<image>"), []).append((question, r))
    rng = np.random.default_rng([seed, 3])
    out = []
    for (image, header), recs in by_slide.items():
        recs = sorted((recs[i] for i in rng.permutation(len(recs))), key=lambda qr: qr[1].get("draw", 0))
        for c in range(0, len(recs), turns):
            group = recs[c:c + turns]
            conv = []
            for k, (q, r) in enumerate(group):
                conv += [{"from": "human", "value": (header + "\n" + q) if k == 0 else q}, r["conversations"][1]]
            out.append({"id": f"{group[0][1]['id']}+{len(group) - 1}", "image": list(image), "conversations": conv})
    return out


STAINS = ("H&E", "H&E", "H&E", "PAS", "IHC", "Masson", "H&E deeper level")


def training_slide_labels(slide_ids: list[str], rng: np.random.Generator) -> list[str]:
    """Labels for a training case's slides, in one of the ways users name them: ``A1 H&E`` (blocks, one stain per
    slide), ``B2 level 3`` (levels of a block), ``Part 2`` or the slide's file name."""
    n, style = len(slide_ids), rng.choice(["block", "block", "level", "part", "file"])
    block = "ABCDEFGHJKLMNPRST"[int(rng.integers(17))]
    if style == "block":
        first = int(rng.integers(1, 4))
        return [f"{block}{first + j} {STAINS[int(rng.integers(len(STAINS)))]}" for j in range(n)]
    if style == "level":
        return [f"{block}{int(rng.integers(1, 6))} level {j + 1}" for j in range(n)]
    if style == "part":
        return [f"Part {j + 1}" for j in range(n)]
    return [f"{sid}.tiff" for sid in slide_ids]


def build_case_instructions(case_dir: str | Path, out_path: str | Path, *, mcq_rounds: int = 3,
                            sentence_turns: bool = True, replay_mcq_rounds: int = 1, seed: int = 0,
                            turns_per_conversation: int = 6, reasoned: bool = False,
                            replay_share: float = 1.0, replay_presence_per_round: int = 1,
                            unlabelled_share: float = 0.25, name_slides_in_prompt: bool = True) -> dict:
    """Training conversations from a SynthSlide case folder (``slidechat synth --cases``); returns counts per kind.

    Case questions in the closed-VQA format (``mcq_rounds`` option shuffles per case; answers "option (letter)", or
    with ``reasoned`` each slide's finding first, then "So the answer is Slide 2 (B)." -- ``reasoned_case_answer``),
    the case's own conversation in sentences (which slide shows the lesion, tumour in any slide, necrosis count),
    and, so that single-slide answers are not forgotten, ``replay_mcq_rounds`` rounds of every slide's own questions
    (multiple choice, open questions, a description) and its report questions (``build_demo_instructions``), of
    which a random ``replay_share`` of the conversations is kept (``replay_presence_per_round``: presence questions
    per round of open questions).

    Every case conversation starts with one ``Slide 1 (A1 H&E): <image>`` line per slide; in a random
    ``unlabelled_share`` of the cases the slides have no labels (``Slide 1: <image>``) and the answers name them
    by number only; the labelled ones are named in varied ways (``training_slide_labels``: blocks and stains, levels,
    file names), so that an answer copies the names the prompt gives and never invents a label. With
    ``name_slides_in_prompt`` false the first turn has a single ``<image>`` (the slides are then marked by number
    only, ``Slide 1: <slide>``) while the answers name them with the case folder's labels: the form the shipped demo
    checkpoint's case stage was trained on.
    """
    from slidechat.synth.cases import (case_closed_questions, case_image_header, case_sentence_turns,
                                      reasoned_case_answer)

    if not 0.0 <= unlabelled_share <= 1.0:
        raise ConfigError(f"case_data.unlabelled_share {unlabelled_share}: use a share in [0, 1]")
    case_dir = Path(case_dir)
    truths = read_jsonl(case_dir / "case_truth.jsonl")
    records: list[dict] = []
    counts = {"case_mcq": 0, "case_sentences": 0, "unlabelled_cases": 0}

    def add(rid: str, images: list[str], header: str, question: str, answer: str) -> None:
        records.append({"id": rid, "image": images, "conversations": [
            {"from": "human", "value": header + "\n" + question}, {"from": "gpt", "value": answer}]})

    for c, t in enumerate(truths):
        header = "<image>"
        if name_slides_in_prompt:
            label_rng = np.random.default_rng([seed, c, 41])
            if label_rng.random() < unlabelled_share:
                t = {**t, "labels": [None] * len(t["slide_ids"])}
                counts["unlabelled_cases"] += 1
            else:
                t = {**t, "labels": training_slide_labels(t["slide_ids"], label_rng)}
            header = case_image_header(t["labels"])
        images = [f"{sid}.tiff" for sid in t["slide_ids"]]
        for r in range(mcq_rounds):
            rng = np.random.default_rng([seed, c, r, 29])
            for k, q in enumerate(case_closed_questions(t, rng)):
                answer = reasoned_case_answer(t, q) if reasoned else mcq_answer(q["options"], q["answer"])
                add(f"{t['case_id']}-mcq{r}-{k}", images, header, format_mcq(q["question"], q["options"]), answer)
                counts["case_mcq"] += 1
        if sentence_turns:
            for k, (question, answer) in enumerate(case_sentence_turns(t)):
                add(f"{t['case_id']}-conv-{k}", images, header, question, answer)
                counts["case_sentences"] += 1
    records = pack_conversations(records, turns_per_conversation, seed)
    if replay_mcq_rounds > 0:
        single = Path(out_path).with_name(Path(out_path).stem + ".single.json")
        replay = build_demo_instructions(case_dir, single, mcq_rounds=replay_mcq_rounds, report_questions=True,
                                         open_rounds=replay_mcq_rounds, describe_rounds=replay_mcq_rounds,
                                         presence_per_round=replay_presence_per_round,
                                         seed=seed + 1,
                                         turns_per_conversation=turns_per_conversation)
        kept = json.loads(single.read_text())
        single.unlink()
        if not 0.0 < replay_share <= 1.0:
            raise ConfigError(f"case_data.replay_share {replay_share}: use a share in (0, 1]")
        pick = np.random.default_rng([seed, 11]).permutation(len(kept))[: max(1, round(replay_share * len(kept)))]
        records += [kept[i] for i in sorted(pick)]
        counts["replay_conversations"] = len(pick)
        counts.update({f"replay_{k}": v for k, v in replay.items()})
    order = np.random.default_rng([seed, 5]).permutation(len(records))
    write_json_atomic(Path(out_path), [records[i] for i in order], indent=None)
    return counts


def lesion_patch_targets(truth: dict, synth_dir: Path, coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
    """Fraction of each patch (level-0 top-left ``coords``) inside the slide's lesion mask; zeros without a lesion."""
    from PIL import Image

    if not truth.get("lesion"):
        return np.zeros(len(coords), dtype=np.float32)
    mask = np.asarray(Image.open(synth_dir / truth["mask_path"])) > 0
    ds = float(truth["mask_downsample"])
    # integral image -> mean of the mask over each patch footprint, vectorised over patches
    ii = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / ds).astype(int), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / ds).astype(int), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + patch_size_level0) / ds).astype(int), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + patch_size_level0) / ds).astype(int), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return (inside / area).astype(np.float32)


def write_grounding_targets(synth_dir: str | Path, features_dir: str | Path, out_dir: str | Path) -> int:
    """``<out_dir>/<slide_id>.npy``: per-patch lesion fraction aligned with each slide's feature rows."""
    from slidechat.features.store import load_features

    synth_dir, features_dir, out_dir = Path(synth_dir), Path(features_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for t in read_jsonl(synth_dir / "truth.jsonl"):
        h5 = features_dir / f"{t['slide_id']}.h5"
        if not h5.exists():
            continue
        sf = load_features(h5)
        ps = float(sf.attrs.get("patch_size_level0") or 0) or 224.0
        np.save(out_dir / f"{t['slide_id']}.npy", lesion_patch_targets(t, synth_dir, sf.coords, ps))
        n += 1
    return n


def dump_counts(counts: dict) -> str:
    return json.dumps(counts)
