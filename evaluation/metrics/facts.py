"""Fact-level scoring of free text against SynthSlide ground truth (``truth.jsonl``).

A text is read into claims ``(key, value)`` (see ``extract_claims``); keys: ``tissue_present:<class>`` (bool),
``tissue_percent:<class>`` (percent of tissue; ``tumour fraction`` is ``tissue_percent:tumor``), ``dominant``,
``lesion_present`` (bool), ``lesion_type`` (class), ``lesion_location`` (quadrant), ``lesion_percent``,
``fragments`` (int). Tissue and lesion names come from ``slidechat.synth.classes`` and the spellings the report
parser accepts. Rules are in evaluation/README.md ("Fact-level scoring").

Open answers get one verdict: correct / wrong / hedged (both yes and no, or several conflicting values) /
unparseable (no claim of the asked kind). Captions and reports get fact precision (stated claims that are true),
recall (truth facts stated correctly) and a list of contradictions (defects inside the text itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from slidechat.inference.report import parse_yes_no
from slidechat.synth.classes import DISPLAY_NAMES, LESION_DISPLAY, spelling_vocabulary

VERDICTS = ("correct", "wrong", "hedged", "unparseable")
PERCENT_SUM_SLACK = 2.0  # rounded percentages ("~42%") may add up to slightly over 100
NUMBER_WORDS = {"no": 0, "zero": 0, "one": 1, "a single": 1, "single": 1, "two": 2, "three": 3, "four": 4,
                "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
                "eleven": 11, "twelve": 12}
_NUM = r"(\d+|" + "|".join(sorted(NUMBER_WORDS, key=len, reverse=True)) + r")"
RANGE_SLACK_PP = 0.5  # a stated range ("10-30%") holds for a truth inside it, up to rounding
_BELOW, _ABOVE = ("under", "below", "less than", "up to"), ("over", "above", "more than")
_PCT_BODY = (r"(?:\b(" + "|".join(_BELOW + _ABOVE) + r")\s+)?(\d+(?:\.\d+)?)"
             r"(?:\s*(?:-|\u2013|to)\s*(\d+(?:\.\d+)?))?\s*(?:%|per ?cent)")
_PCT = re.compile(_PCT_BODY, re.I)
_NEG_BEFORE = re.compile(r"\b(no|not|without|nor|absence of|free of|negative for)\b")
_NEG_AFTER = re.compile(r"^[^,()]{0,25}?\b(not|absent|none|no)\b")
_CLAUSE = re.compile(r"[.;!?\n]+|,\s*but\b")
_LESION_ABSENT = re.compile(r"\bno (?:focal |discrete )?lesions?\b|\blesion\s*:\s*(?:none|no|absent)\b|"
                            r"\bwithout (?:a |any )?(?:focal )?lesion\b|\bno focal\b", re.I)
_QUADRANT = re.compile(r"\b(upper|top|superior|lower|bottom|inferior)[\s-]+(left|right)\b", re.I)
_FRAGMENTS = re.compile(_NUM + r"\s+(?:separate\s+|distinct\s+)?(?:tissue\s+)?fragment", re.I)
_FRAGMENTS_AFTER = re.compile(r"fragments?\s*:\s*" + _NUM, re.I)
_TUMOR_FRACTION = re.compile(r"tumou?r fraction\W{0,3}(?:of\s+|is\s+)?(?:about\s+|~\s*)?" + _PCT_BODY
                             + r"(?:\s*\((?:[^()]|\([^()]*\))*\))?", re.I)
_DOMINANT = re.compile(r"\b(pre)?dominant(ly)?\b|\bmostly\b|\bmainly\b|\blargely\b|\bmajority\b", re.I)
_REPEATED_QUALIFIER = re.compile(r"(\([^()]{2,40}\))\s*\1", re.I)
_REPEATED_PHRASE = re.compile(r"\b([a-z][\w-]*(?:\s+[\w-]+){1,3})\s+\1\b", re.I)
_LEADING_YES_NO = re.compile(r"^\W*(yes|yeah|no|nope|none|true|false)\b", re.I)
_PHRASE_THEN_SAME_IN_PARENS = re.compile(r"\b([\w-]+(?:\s+[\w-]+){0,4})\s*\(\1\)", re.I)


@dataclass(frozen=True)
class Claim:
    key: str
    value: object
    start: int
    source: str = ""  # "tumour fraction" for a stated tumour fraction (not a composition entry)
    spread: float = 0.0  # half-width of a stated range ("10-30%" is 20 +- 10); 0 for a single value


@dataclass
class TextFacts:
    """Claims of one caption/report, each with whether it is true, the truth facts covered, the contradictions."""
    claims: list[tuple[str, object, bool]] = field(default_factory=list)
    truth_facts: list[str] = field(default_factory=list)
    covered: list[str] = field(default_factory=list)
    contradictions: list[str] = field(default_factory=list)

    @property
    def precision(self) -> float | None:
        return sum(ok for _, _, ok in self.claims) / len(self.claims) if self.claims else None

    @property
    def recall(self) -> float:
        return len(self.covered) / len(self.truth_facts) if self.truth_facts else 1.0

    def to_dict(self) -> dict:
        return {"fact_precision": self.precision, "fact_recall": self.recall, "n_claims": len(self.claims),
                "wrong_claims": [f"{k}={v}" for k, v, ok in self.claims if not ok],
                "contradictions": self.contradictions}


def _class_of_display() -> dict[str, str]:
    return {d: k for k, d in DISPLAY_NAMES.items()}


def _tissue_pattern() -> list[tuple[str, re.Pattern]]:
    """(class, regex) per tissue class; spellings are word-start prefixes (``necros`` matches ``necrosis``)."""
    tissues, _ = spelling_vocabulary()
    by_display = _class_of_display()
    out = []
    for display, spellings in tissues.items():
        alts = sorted({s for s in spellings if s}, key=len, reverse=True)
        out.append((by_display.get(display, display), re.compile(
            r"\b(?:" + "|".join(re.escape(s) for s in alts) + r")[\w-]*(?:\s+tissue)?", re.I)))
    return out


def _lesion_pattern() -> re.Pattern:
    names = sorted(LESION_DISPLAY.values(), key=len, reverse=True)
    return re.compile("|".join(re.escape(n) for n in names)
                      + r"|\(?\s*(?:tumou?r|necrotic|lymphoid)\s+(?:focus|aggregate|nodule)\s*\)?|\bcarcinoma\b", re.I)


def _lesion_class(text: str) -> str:
    low = text.lower()
    for display, cls in ((d, c) for c, d in LESION_DISPLAY.items()):
        if display.lower() == low.strip():
            return cls
    return "necrosis" if "necro" in low else "lymphocytes" if "lymph" in low else "tumor"


def _percent(m: re.Match) -> tuple[float, float]:
    """(value, spread) of a stated percentage (a ``_PCT`` match): "12%" -> (12, 0), "10-30%" -> (20, 10),
    "under 10%" -> (5, 5), "over 30%" -> (65, 35)."""
    qualifier, a, b = m.group(1), float(m.group(2)), m.group(3)
    if b is not None:
        lo, hi = sorted((a, float(b)))
    elif qualifier:
        lo, hi = (0.0, a) if qualifier.lower() in _BELOW else (a, 100.0)
    else:
        return a, 0.0
    return (lo + hi) / 2, (hi - lo) / 2


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    chars = list(text)
    for a, b in spans:
        chars[a:b] = " " * (b - a)
    return "".join(chars)


def _number(word: str) -> int:
    return int(word) if word.isdigit() else NUMBER_WORDS[word.lower()]


def _clauses(text: str) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for m in _CLAUSE.finditer(text):
        bounds.append((start, m.start()))
        start = m.end()
    return bounds + [(start, len(text))]


def _tissue_claims(text: str) -> list[Claim]:
    """Tissue mentions with polarity (negation in the clause before or just after) and an attached percent."""
    found = []
    for cls, pat in _tissue_pattern():
        found += [(m.start(), m.end(), cls) for m in pat.finditer(text)]
    found.sort(key=lambda t: (t[0], -(t[1] - t[0])))
    mentions, last_end = [], -1
    for a, b, cls in found:
        if a >= last_end:
            mentions.append((a, b, cls))
            last_end = b
    claims = []
    for ca, cb in _clauses(text):
        inside = [m for m in mentions if ca <= m[0] < cb]
        prev_end = ca
        for i, (a, b, cls) in enumerate(inside):
            nxt = inside[i + 1][0] if i + 1 < len(inside) else cb
            before, after = text[max(prev_end, a - 30):a].lower(), text[b:nxt].lower()
            negated = bool(_NEG_BEFORE.search(before) or _NEG_AFTER.search(after))
            claims.append(Claim(f"tissue_present:{cls}", not negated, a))
            pct = _PCT.search(after[:40])
            if pct and not negated:
                value, spread = _percent(pct)
                claims.append(Claim(f"tissue_percent:{cls}", value, a, spread=spread))
            if _DOMINANT.search(text[prev_end:a]) and not negated:
                claims.append(Claim("dominant", cls, a))
            prev_end = b
    return claims


def extract_claims(text: str) -> list[Claim]:
    """Every checkable claim in ``text`` (README "Fact-level scoring" lists the patterns)."""
    text = text or ""
    claims, spans = [], []
    for m in _TUMOR_FRACTION.finditer(text):
        value, spread = _percent(m)
        claims.append(Claim("tissue_percent:tumor", value, m.start(), "tumour fraction", spread))
        spans.append(m.span())
    masked = _mask(text, spans)
    for m in _lesion_pattern().finditer(masked):
        claims += [Claim("lesion_present", True, m.start()), Claim("lesion_type", _lesion_class(m.group()), m.start())]
        pct = _PCT.search(masked[m.end():m.end() + 40])
        if pct:
            value, spread = _percent(pct)
            claims.append(Claim("lesion_percent", value, m.start(), spread=spread))
            spans.append((m.end() + pct.start(), m.end() + pct.end()))
        spans.append(m.span())
    for m in _LESION_ABSENT.finditer(masked):
        claims.append(Claim("lesion_present", False, m.start()))
        spans.append(m.span())
    for m in _QUADRANT.finditer(masked):
        v = "upper" if m.group(1).lower() in ("upper", "top", "superior") else "lower"
        claims.append(Claim("lesion_location", f"{v}-{m.group(2).lower()}", m.start()))
    for pat in (_FRAGMENTS, _FRAGMENTS_AFTER):
        for m in pat.finditer(masked):
            claims.append(Claim("fragments", _number(m.group(1)), m.start()))
            spans.append(m.span())
    claims += _tissue_claims(_mask(text, spans))
    return sorted(claims, key=lambda c: c.start)


def truth_value(key: str, truth: dict):
    """The true value of a claim key for one slide (None: the slide has no such fact, e.g. no lesion)."""
    lesion = truth.get("lesion")
    if key.startswith("tissue_present:"):
        return key.split(":", 1)[1] in truth["classes_present"]
    if key.startswith("tissue_percent:"):
        cls = key.split(":", 1)[1]
        frac = truth["tumor_fraction"] if cls == "tumor" else truth["area_fractions"].get(cls, 0.0)
        return 100.0 * frac
    return {"dominant": truth.get("dominant_class"), "lesion_present": lesion is not None,
            "lesion_type": lesion and lesion["class"], "lesion_location": lesion and lesion["quadrant"],
            "lesion_percent": lesion and 100.0 * lesion["area_fraction"], "fragments": truth.get("n_fragments")}[key]


def claim_is_true(claim: Claim, truth: dict, tolerance_pp: float) -> bool:
    value = truth_value(claim.key, truth)
    if value is None:
        return False
    if "percent" in claim.key:
        slack = claim.spread + RANGE_SLACK_PP if claim.spread > 0 else tolerance_pp
        return abs(float(claim.value) - value) <= slack + 1e-9
    return claim.value == value


def contradictions(claims: list[Claim], text: str, tolerance_pp: float) -> list[str]:
    """Defects inside one text, whatever the truth: presence stated both ways, percentages over 100, no lesion but a
    lesion described, one fact with several values, a repeated qualifier/phrase."""
    kinds = []
    values: dict[str, set] = {}
    for c in claims:
        values.setdefault(c.key, set()).add(c.value)
    tumor_yes = (True in values.get("tissue_present:tumor", ()) or "tumor" in values.get("lesion_type", ())
                 or any(v > 0 for v in values.get("tissue_percent:tumor", ())))
    tumor_no = False in values.get("tissue_present:tumor", ()) or 0.0 in values.get("tissue_percent:tumor", ())
    if tumor_yes and tumor_no:
        kinds.append("tumour_absent_and_present")
    for key, vals in values.items():
        if key.startswith("tissue_present:") and key != "tissue_present:tumor" and len(vals) > 1:
            kinds.append("tissue_absent_and_present")
        elif "percent" in key and vals and max(vals) - min(vals) > tolerance_pp:
            kinds.append(f"conflicting_{key.split(':')[0]}")
        elif key in ("dominant", "lesion_type", "lesion_location", "fragments") and len(vals) > 1:
            kinds.append(f"conflicting_{key}")
    lowest: dict[str, float] = {}  # a range counts with its low end
    for c in claims:
        if c.key.startswith("tissue_percent:"):
            lowest[c.key] = max(lowest.get(c.key, 0.0), float(c.value) - c.spread)
    total = sum(lowest.values())
    if total > 100.0 + PERCENT_SUM_SLACK:
        kinds.append("percentages_over_100")
    if False in values.get("lesion_present", ()) and (values.get("lesion_location") or values.get("lesion_type")):
        kinds.append("no_lesion_but_lesion_described")
    listed = [c.key for c in claims if c.key.startswith("tissue_percent:") and c.source != "tumour fraction"]
    if len(listed) != len(set(listed)):
        kinds.append("tissue_listed_twice")
    if any(p.search(text or "") for p in (_REPEATED_QUALIFIER, _REPEATED_PHRASE, _PHRASE_THEN_SAME_IN_PARENS)):
        kinds.append("repeated_qualifier")
    return sorted(set(kinds))


def truth_facts(truth: dict) -> list[str]:
    """The facts a full description states: each tissue present and its share, dominant tissue, tumour presence,
    lesion presence (+ type, location), fragment count."""
    keys = [f"tissue_present:{c}" for c in truth["classes_present"]]
    keys += [f"tissue_percent:{c}" for c in truth["classes_present"]]
    keys += ["dominant", "tissue_present:tumor", "lesion_present", "fragments"]
    if truth.get("lesion"):
        keys += ["lesion_type", "lesion_location"]
    return list(dict.fromkeys(keys))


def check_text(text: str, truth: dict, tolerance_pp: float = 10.0) -> TextFacts:
    """Fact precision/recall and contradictions of one caption or report."""
    claims = extract_claims(text)
    unique = list(dict.fromkeys((c.key, c.value, c.spread) for c in claims))
    out = TextFacts(claims=[(k, v, claim_is_true(Claim(k, v, 0, spread=w), truth, tolerance_pp))
                            for k, v, w in unique],
                    truth_facts=truth_facts(truth), contradictions=contradictions(claims, text, tolerance_pp))
    right = {k for k, _, ok in out.claims if ok}
    percents = {k.split(":", 1)[1]: v for k, v, _ in out.claims if k.startswith("tissue_percent:")}
    if percents and "dominant" not in right and max(percents, key=percents.get) == truth.get("dominant_class"):
        right.add("dominant")  # implied by the largest stated share
    if "tissue_present:tumor" not in right and truth["tumor_fraction"] == 0 and "tissue_percent:tumor" in right:
        right.add("tissue_present:tumor")  # "tumour fraction: 0%" states absence
    out.covered = [k for k in out.truth_facts if k in right]
    return out


@dataclass
class AnswerVerdict:
    category: str
    verdict: str  # one of VERDICTS
    claimed: object = None
    truth: object = None

    def to_dict(self) -> dict:
        return {"category": self.category, "verdict": self.verdict, "claimed": self.claimed, "truth": self.truth}


def _polarities(answer: str, claims: list[Claim], subject: str) -> set[bool]:
    """Yes/no stances on ``subject`` (a tissue class): a leading yes/no of a clause (``parse_yes_no``) and each
    mention of the subject with its negation."""
    stances = set()
    for a, b in _clauses(answer):
        clause = answer[a:b]
        if _LEADING_YES_NO.match(clause):
            yn = parse_yes_no(clause.strip().split(",")[0])
            if yn is not None:
                stances.add(yn)
        stances |= {c.value for c in claims if c.key == f"tissue_present:{subject}" and a <= c.start <= b}
        # "carcinoma (tumour focus)": a lesion of the asked class states that the class is present
        stances |= {True for c in claims if c.key == "lesion_type" and c.value == subject and a <= c.start <= b}
    return stances


def _verdict_from_values(values: set, truth) -> str:
    if not values:
        return "unparseable"
    if len(values) > 1:
        return "hedged"
    return "correct" if next(iter(values)) == truth else "wrong"


def _percent_ok(claims: list[Claim], key: str, truth: dict, tolerance_pp: float) -> bool:
    return all(claim_is_true(c, truth, tolerance_pp) for c in claims if c.key == key)


def _presence(category: str, answer: str, claims: list[Claim], cls: str | None, truth: dict,
              tolerance_pp: float) -> AnswerVerdict:
    if cls is None:
        return AnswerVerdict(category, "unparseable")
    true = cls in truth["classes_present"] if cls != "tumor" else truth["tumor_fraction"] > 0
    stances = _polarities(answer, claims, cls)
    verdict = _verdict_from_values(stances, true)
    if verdict == "correct" and not _percent_ok(claims, f"tissue_percent:{cls}", truth, tolerance_pp):
        verdict = "wrong"
    return AnswerVerdict(category, verdict, sorted(stances), true)


def _dominant(answer: str, claims: list[Claim], truth: dict) -> AnswerVerdict:
    named = {c.value for c in claims if c.key == "dominant"}
    if not named:
        named = {c.key.split(":", 1)[1] for c in claims if c.key.startswith("tissue_present:") and c.value}
    if len(named) > 1:
        shares = {c.key.split(":", 1)[1]: c.value for c in claims if c.key.startswith("tissue_percent:")}
        if set(shares) >= named:
            named = {max(named, key=shares.get)}
    return AnswerVerdict("dominant", _verdict_from_values(named, truth["dominant_class"]), sorted(named),
                         truth["dominant_class"])


def _composition(claims: list[Claim], truth: dict, tolerance_pp: float) -> AnswerVerdict:
    stances: dict[str, set] = {}
    for c in claims:
        if c.key.startswith("tissue_present:"):
            stances.setdefault(c.key.split(":", 1)[1], set()).add(c.value)
    true = sorted(truth["classes_present"])
    if not stances:
        return AnswerVerdict("composition", "unparseable", None, true)
    if any(len(v) > 1 for v in stances.values()):
        return AnswerVerdict("composition", "hedged", None, true)
    named = sorted(k for k, v in stances.items() if True in v)
    ok = named == true and all(claim_is_true(c, truth, tolerance_pp) for c in claims if "percent" in c.key)
    return AnswerVerdict("composition", "correct" if ok else "wrong", named, true)


def _lesion(answer: str, claims: list[Claim], truth: dict) -> AnswerVerdict:
    lesion = truth.get("lesion")
    true = None if lesion is None else {"type": lesion["class"], "location": lesion["quadrant"]}
    present = {c.value for c in claims if c.key == "lesion_present"}
    types = {c.value for c in claims if c.key == "lesion_type"}
    places = {c.value for c in claims if c.key == "lesion_location"}
    if not types and (places or True in present):  # "necrosis in the upper-left": a tissue named as the lesion
        types = {c.key.split(":", 1)[1] for c in claims if c.key.startswith("tissue_present:") and c.value}
    if places or types:
        present.add(True)
    if not present:
        yn = parse_yes_no(answer) if _LEADING_YES_NO.match(answer) else None
        present = set() if yn is None else {yn}
    claimed = {"present": sorted(present), "type": sorted(types), "location": sorted(places)}
    if not present:
        return AnswerVerdict("lesion", "unparseable", claimed, true)
    if len(present) > 1 or len(types) > 1 or len(places) > 1:
        return AnswerVerdict("lesion", "hedged", claimed, true)
    if lesion is None:
        return AnswerVerdict("lesion", "correct" if present == {False} else "wrong", claimed, true)
    ok = present == {True} and types == {lesion["class"]} and places == {lesion["quadrant"]}
    return AnswerVerdict("lesion", "correct" if ok else "wrong", claimed, true)


def _fragments(answer: str, claims: list[Claim], truth: dict) -> AnswerVerdict:
    # every count in the answer ("two or three" is hedged), percentages left out
    counts = {c.value for c in claims if c.key == "fragments"}
    counts |= {_number(m.group(1)) for m in re.finditer(r"\b" + _NUM + r"\b", _PCT.sub(" ", answer), re.I)
               if m.group(1).lower() != "no"}
    return AnswerVerdict("fragments", _verdict_from_values(counts, truth["n_fragments"]), sorted(counts),
                         truth["n_fragments"])


def asked_class(question: str) -> str | None:
    """The tissue class a presence question asks about ("Is adipose tissue present ...?" -> "fat")."""
    mentioned = [c.key.split(":", 1)[1] for c in _tissue_claims(question or "")
                 if c.key.startswith("tissue_present:")]
    return mentioned[0] if mentioned else None


def check_answer(category: str, answer: str, truth: dict, question: str = "",
                 tolerance_pp: float = 10.0) -> AnswerVerdict:
    """Score one open answer of a SynthSlide question type against its slide's truth."""
    answer = answer or ""
    claims = extract_claims(answer)
    if category == "composition":
        return _composition(claims, truth, tolerance_pp)
    if category == "dominant":
        return _dominant(answer, claims, truth)
    if category == "tumor_presence":
        return _presence(category, answer, claims, "tumor", truth, tolerance_pp)
    if category == "presence":
        return _presence(category, answer, claims, asked_class(question), truth, tolerance_pp)
    if category == "lesion":
        return _lesion(answer, claims, truth)
    if category == "fragments":
        return _fragments(answer, claims, truth)
    return AnswerVerdict(category, "unparseable")


def _ci_entry(values: list[float], bootstrap) -> dict:
    from slidechat.evaluation.metrics.bootstrap import bootstrap_ci

    mean, low, high = bootstrap_ci(values, bootstrap.n_resamples, bootstrap.confidence, bootstrap.seed)
    nan = mean != mean
    return {"value": None if nan else mean, "ci_low": None if nan else low, "ci_high": None if nan else high,
            "n": len(values)}


def summarize_answer_facts(verdicts: list[AnswerVerdict], bootstrap) -> dict:
    """Fact accuracy (share ``correct``, 95% bootstrap CI) overall and per question type, with verdict counts."""
    def entry(vs: list[AnswerVerdict]) -> dict:
        e = _ci_entry([float(v.verdict == "correct") for v in vs], bootstrap)
        return {"accuracy": e["value"], "ci_low": e["ci_low"], "ci_high": e["ci_high"], "n": e["n"],
                **{k: sum(v.verdict == k for v in vs) for k in VERDICTS}}
    categories = sorted({v.category for v in verdicts})
    return {"overall": entry(verdicts),
            "per_category": {c: entry([v for v in verdicts if v.category == c]) for c in categories}}


def summarize_text_facts(checked: list[TextFacts], bootstrap) -> dict:
    """Mean per-text fact precision (texts with no claim left out), recall, contradiction rate (with CIs) and the
    count of each contradiction kind."""
    kinds: dict[str, int] = {}
    for t in checked:
        for k in t.contradictions:
            kinds[k] = kinds.get(k, 0) + 1
    return {"fact_precision": _ci_entry([t.precision for t in checked if t.precision is not None], bootstrap),
            "fact_recall": _ci_entry([t.recall for t in checked], bootstrap),
            "contradiction_rate": _ci_entry([float(bool(t.contradictions)) for t in checked], bootstrap),
            "contradiction_kinds": dict(sorted(kinds.items())), "n": len(checked),
            "no_claims": sum(t.precision is None for t in checked)}


def score_facts(task: str, outputs: dict[str, str], gold: dict[str, dict], bootstrap,
                tolerance_pp: float = 10.0) -> tuple[dict, dict[str, dict]]:
    """(summary, {id: per-item facts}) for ``task`` "open_vqa" (gold: {truth, category, question}) or
    "captioning"/"reports" (gold: {truth}). An id without an output is scored as an empty text."""
    per_item: dict[str, dict] = {}
    if task == "open_vqa":
        verdicts = []
        for rid, g in gold.items():
            v = check_answer(g["category"], outputs.get(rid, ""), g["truth"], g.get("question", ""), tolerance_pp)
            verdicts.append(v)
            per_item[rid] = v.to_dict()
        summary = summarize_answer_facts(verdicts, bootstrap)
    else:
        checked = []
        for rid, g in gold.items():
            t = check_text(outputs.get(rid, ""), g["truth"], tolerance_pp)
            checked.append(t)
            per_item[rid] = t.to_dict()
        summary = summarize_text_facts(checked, bootstrap)
    summary["tolerance_pp"] = tolerance_pp
    return summary, per_item
