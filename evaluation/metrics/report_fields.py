"""Accuracy of structured report fields against ground truth (SynthSlide ``reports.jsonl``).

Comparison rules per field value type (of the truth):
- numbers: correct when ``|pred - truth| <= numeric_tolerance`` (absolute, for fractions in [0, 1]);
  fields whose name contains ``percent`` are in percent and use ``100 * numeric_tolerance``;
  a predicted string such as "35%" is parsed (divided by 100 unless the field is a percent field);
- lists/sets: correct when equal as case-insensitive sets; the Jaccard index is reported too;
- booleans: a bool, a number (non-zero = yes) or text read by the report's own yes/no parser
  (``slidechat.inference.report.parse_yes_no``: "yes/true/present..." vs "no/none/absent/not...");
- None/null: correct when the prediction is empty/none/absent/not present;
- strings: equal after lower-casing and stripping punctuation.
A field missing from one prediction is wrong. Fields the model never outputs (no prediction has the
key, e.g. SynthSlide's ``specimen_fragments`` for a model whose report has no such field) are not
scored but listed under ``not_predicted``.
"""

from __future__ import annotations

import re
from collections import defaultdict

from slidechat.evaluation.answer_parser import normalize_text
from slidechat.inference.report import parse_yes_no

_NULL = {"", "none", "null", "n a", "na", "absent", "not present", "no lesion", "not applicable"}


def _to_float(value, percent_field: bool = False) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = re.search(r"-?\d+(?:\.\d+)?", str(value))
    if not m:
        return None
    number = float(m.group())
    is_percent = "%" in str(value)[m.end():m.end() + 2]
    return number / 100.0 if is_percent and not percent_field else number


def _as_bool(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    text = str(value).strip()
    if re.fullmatch(r"-?\d+(?:\.\d+)?", text):
        return float(text) != 0
    return parse_yes_no(text)


def _as_set(value) -> set[str]:
    if isinstance(value, (list, tuple, set)):
        return {normalize_text(v) for v in value if normalize_text(v)}
    return {normalize_text(v) for v in re.split(r"[,;/]| and ", str(value or "")) if normalize_text(v)}


def compare_field(pred, truth, numeric_tolerance: float = 0.1, percent_field: bool = False
                  ) -> tuple[bool, float | None]:
    """Return (correct, jaccard or None) for one field; see the module docstring for the rules."""
    if truth is None:
        return (pred is None or normalize_text(pred) in _NULL), None
    if pred is None:
        return False, (0.0 if isinstance(truth, (list, tuple, set)) else None)
    if isinstance(truth, bool):
        return _as_bool(pred) is truth, None
    if isinstance(truth, (int, float)):
        p = _to_float(pred, percent_field)
        tol = numeric_tolerance * (100.0 if percent_field else 1.0)
        return (p is not None and abs(p - float(truth)) <= tol + 1e-9), None
    if isinstance(truth, (list, tuple, set)):
        t, p = _as_set(truth), _as_set(pred)
        union = t | p
        jac = len(t & p) / len(union) if union else 1.0
        return t == p, jac
    if isinstance(truth, dict):
        if not isinstance(pred, dict):
            return False, None
        return all(compare_field(pred.get(k), v, numeric_tolerance)[0] for k, v in truth.items()), None
    return normalize_text(pred) == normalize_text(truth), None


def report_field_accuracy(pairs: list[tuple[dict, dict]], numeric_tolerance: float = 0.1) -> dict:
    """Per-field accuracy over (predicted fields, true fields) pairs, plus the mean over fields.

    Returns ``{"fields": {name: {"accuracy", "n", "jaccard"?}}, "mean_field_accuracy", "exact_report"}``
    where ``exact_report`` is the share of reports with every field right.
    """
    hits: dict[str, list[float]] = defaultdict(list)
    jaccards: dict[str, list[float]] = defaultdict(list)
    exact = []
    predicted_keys = {k for pred, _ in pairs for k in (pred or {})}
    truth_keys = {k for _, truth in pairs for k in truth}
    for pred, truth in pairs:
        pred = pred or {}
        all_ok = True
        for name, true_value in truth.items():
            if name not in predicted_keys:
                continue
            ok, jac = compare_field(pred.get(name), true_value, numeric_tolerance, "percent" in name)
            hits[name].append(float(ok))
            if jac is not None:
                jaccards[name].append(jac)
            all_ok &= ok
        exact.append(float(all_ok))
    fields = {}
    for name, vals in sorted(hits.items()):
        entry = {"accuracy": sum(vals) / len(vals), "n": len(vals)}
        if jaccards.get(name):
            entry["jaccard"] = sum(jaccards[name]) / len(jaccards[name])
        fields[name] = entry
    mean = sum(f["accuracy"] for f in fields.values()) / len(fields) if fields else None
    return {
        "fields": fields,
        "mean_field_accuracy": mean,
        "exact_report": sum(exact) / len(exact) if exact else None,
        "n": len(pairs),
        "numeric_tolerance": numeric_tolerance,
        "not_predicted": sorted(truth_keys - predicted_keys),
    }
