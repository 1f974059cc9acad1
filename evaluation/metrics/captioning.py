"""Open-ended text metrics (captions, open VQA, reports) with the standard COCO implementations.

BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) come from ``pycocoevalcap`` (the COCO caption
evaluation code, as used by SlideChat and most captioning papers), on text tokenized by its
Stanford PTB tokenizer. Both the tokenizer and METEOR need Java; without ``java`` on the PATH
(or if it fails) the text is tokenized with a regex that mimics PTB + punctuation removal and
METEOR is reported as ``None`` with a note. A corpus BLEU from ``sacrebleu`` is added as a
cross-check.

Notes: CIDEr is a corpus metric (IDF over the references): with one item it is 0 by
construction. Empty model outputs are scored as a single out-of-vocabulary token.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from contextlib import contextmanager
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

EMPTY_TOKEN = "xxemptyxx"
_PUNCT = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_TOKEN = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*|%|[^\sa-z0-9]")


def java_available() -> bool:
    """True when a ``java`` executable is on the PATH (needed by PTB tokenizer and METEOR)."""
    return shutil.which("java") is not None


def regex_tokenize(text: str) -> str:
    """Lower-case and tokenize like PTB, then drop the punctuation tokens COCO drops."""
    tokens = _TOKEN.findall(str(text).lower().replace("\n", " "))
    return " ".join(t for t in tokens if t not in _PUNCT)


@contextmanager
def _stderr_silenced():
    """File descriptor 2 points at /dev/null for the block (a child process inherits it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tokenize(captions: dict[str, list[str]], use_java: bool) -> dict[str, list[str]]:
    if use_java:
        try:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            wrapped = {k: [{"caption": c} for c in v] for k, v in captions.items()}
            with _stderr_silenced():  # the Java tokenizer prints its token rate on the inherited stderr
                out = PTBTokenizer().tokenize(wrapped)
            if set(out) == set(captions) and all(len(out[k]) == len(captions[k]) for k in captions):
                return out
            log.warning("PTB tokenizer output did not line up; using the regex tokenizer")
        except Exception as exc:  # java present but broken, read-only site-packages, ...
            log.warning("PTB tokenizer failed (%s); using the regex tokenizer", exc)
    return {k: [regex_tokenize(c) for c in v] for k, v in captions.items()}


def caption_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str] | str],
    use_java: bool | None = None,
    with_meteor: bool = True,
) -> dict:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L, CIDEr and sacreBLEU for ``predictions`` vs ``references``.

    ``predictions``: {id: text}; ``references``: {id: text or list of texts}; only ids present in
    both are scored. Returns ``{"BLEU-1": ..., ..., "n": count, "per_item": {id: {...}}, "notes": [...]}``
    with scores in [0, 1] (CIDEr in [0, 10]; sacreBLEU in [0, 100]).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = [k for k in predictions if k in references]
    notes: list[str] = []
    if not ids:
        return {"n": 0, "notes": ["no prediction matched a reference id"]}
    use_java = java_available() if use_java is None else use_java
    if not use_java:
        notes.append("java not found: regex tokenizer used and METEOR skipped")
    refs_raw = {k: [references[k]] if isinstance(references[k], str) else list(references[k]) for k in ids}
    # one tokenizer call (one JVM start) for hypotheses and references together
    both = {("res", k): [str(predictions[k] or "")] for k in ids} | {("gts", k): v for k, v in refs_raw.items()}
    tokenized = _tokenize(both, use_java)
    res = {k: tokenized[("res", k)] for k in ids}
    gts = {k: tokenized[("gts", k)] for k in ids}
    res = {k: [v[0] if v[0].strip() else EMPTY_TOKEN] for k, v in res.items()}
    gts = {k: [r if r.strip() else EMPTY_TOKEN for r in v] for k, v in gts.items()}

    out: dict = {"n": len(ids)}
    per_item: dict[str, dict] = {k: {} for k in ids}
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"BLEU-{n + 1}"] = float(bleu[n])
        for k, s in zip(ids, bleu_items[n]):
            per_item[k][f"BLEU-{n + 1}"] = float(s)
    rouge, rouge_items = Rouge().compute_score(gts, res)
    out["ROUGE-L"] = float(rouge)
    cider, cider_items = Cider().compute_score(gts, res)
    out["CIDEr"] = float(cider)
    for k, r, c in zip(ids, rouge_items, cider_items):
        per_item[k]["ROUGE-L"] = float(r)
        per_item[k]["CIDEr"] = float(c)
    out["METEOR"] = None
    if use_java and with_meteor:
        try:
            out["METEOR"], meteor_items = _meteor(gts, res)
            for k, m in zip(ids, meteor_items):
                per_item[k]["METEOR"] = float(m)
        except Exception as exc:
            notes.append(f"METEOR failed: {exc}")
    if len(ids) == 1:
        notes.append("CIDEr is 0 by construction with a single item (IDF over one document)")
    import sacrebleu

    n_refs = max(len(v) for v in refs_raw.values())
    ref_streams = [[v[i] if i < len(v) else v[0] for v in refs_raw.values()] for i in range(n_refs)]
    out["sacreBLEU"] = float(sacrebleu.corpus_bleu([str(predictions[k] or "") for k in ids], ref_streams).score)
    out["per_item"] = per_item
    out["notes"] = notes
    return out


def _meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, items = scorer.compute_score(gts, res)
    finally:
        proc = getattr(scorer, "meteor_p", None)
        if proc is not None and proc.poll() is None:
            proc.stdin.close()
            proc.kill()
            proc.wait()
        scorer.meteor_p = _DeadProcess()  # its __del__ must not touch the killed process
    return float(score), [float(s) for s in items]


class _DeadProcess:
    """Stand-in so pycocoevalcap's Meteor.__del__ is a no-op after we closed the JVM ourselves."""

    class _Stdin:
        def close(self):
            pass

    stdin = _Stdin()

    def kill(self):
        pass

    def wait(self):
        pass
