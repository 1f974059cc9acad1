"""Map a model's free-text answer to a multiple-choice letter.

The rules, tried in order (the first that gives an answer wins); ``None`` means unparseable,
which the scorer counts as wrong and lists:

1. **Bare letter**: the whole answer is one letter, optionally wrapped or followed by
   punctuation: ``B``, ``b``, ``(B)``, ``[B]``, ``B.``, ``B)``, ``**B**``.
2. **Stated answer**: ``Answer: B``, ``The answer is (b)``, ``correct option is C``,
   ``I choose D``, ``Option B`` (case-insensitive). A lower-case ``a`` directly followed by
   more words ("the answer is a tumour") is read as an article, unless those words are
   option A's own text.
3. **Leading letter**: the answer starts with a letter followed by ``.``, ``)``, ``:`` or
   ``-`` (``B. Adenocarcinoma``, ``(C) Lymph node``, ``d) none``).
4. **Option text**: after lower-casing and stripping punctuation, the answer equals one
   option's text, or contains exactly one option's text as a whole phrase (when several match
   and one contains all the others, e.g. "carcinoma" inside "adenocarcinoma", the longest wins).
5. **Lone letter**: exactly one distinct standalone capital letter among the options appears in
   the answer (``(B)`` anywhere, or a capital ``B``/``C``/``D`` token; a capital ``A`` counts only
   in parentheses because it is usually the article).

Only letters whose option text is non-empty are valid; a letter outside the options is
unparseable. When the options are unknown (``options=None``) letters A–D are valid and
rule 4 is skipped.
"""

from __future__ import annotations

import re
from typing import Mapping

LETTERS = ("A", "B", "C", "D", "E", "F")

_WRAP = r"[\s\*\"'`_]*"
_BARE = re.compile(rf"^{_WRAP}[\(\[\{{<]?\s*([A-Fa-f])\s*[\)\]\}}>]?{_WRAP}[.:;,!]?{_WRAP}$")
_STATED = re.compile(
    r"(?:answer|option|choice)\s*(?:is|would be|should be|=|:|-)?\s*(?:option|choice|letter)?\s*:?\s*"
    r"(\(\s*[A-Fa-f]\s*\)|\[\s*[A-Fa-f]\s*\]|\*{0,2}[A-Fa-f]\*{0,2})(?![A-Za-z0-9])(.*)$",
    re.IGNORECASE | re.DOTALL,
)
_CHOOSE = re.compile(
    r"\b(?:i\s+(?:would\s+)?(?:choose|pick|select)|(?:correct|right|best)\s+(?:one|letter)\s+is)\s*"
    r"(\(\s*[A-Fa-f]\s*\)|[A-Fa-f])(?![A-Za-z0-9])(.*)$",
    re.IGNORECASE | re.DOTALL,
)
_LEADING = re.compile(r"^[\s\*\"'`]*[\(\[]?\s*([A-Fa-f])\s*(?:[\)\]]|\.(?!\d)|:|\s-\s|-\s)")
_PAREN_LETTER = re.compile(r"[\(\[]\s*([A-F])\s*[\)\]]")
_CAPITAL_TOKEN = re.compile(r"(?<![A-Za-z0-9'])([B-F])(?![A-Za-z0-9'])")
_NON_WORD = re.compile(r"[^a-z0-9%]+")


def normalize_text(text: str) -> str:
    """Lower-case, turn every run of non-alphanumerics into one space, strip."""
    return _NON_WORD.sub(" ", str(text).lower()).strip()


def _valid_letters(options: Mapping[str, str] | None) -> set[str]:
    if options is None:
        return {"A", "B", "C", "D"}
    return {k.upper() for k, v in options.items() if v is not None and str(v).strip() != ""}


def _letter_from_token(token: str) -> str:
    return re.sub(r"[^A-Fa-f]", "", token).upper()


def _stated_letter(match: re.Match, options: Mapping[str, str] | None) -> str | None:
    token, rest = match.group(1), match.group(2)
    letter = _letter_from_token(token)
    bare_lower_a = token.strip("* ") == "a"
    if bare_lower_a and re.match(r"\s+[A-Za-z]", rest):
        # "the answer is a tumour": an article, unless the words are option A's text
        option_a = normalize_text((options or {}).get("A", "") or "")
        if not option_a or not normalize_text(rest).startswith(option_a):
            return None
    return letter


def _match_option_text(text: str, options: Mapping[str, str]) -> str | None:
    norm = normalize_text(text)
    if not norm:
        return None
    opts = {k.upper(): normalize_text(v) for k, v in options.items() if v is not None and normalize_text(v)}
    for letter, opt in opts.items():
        if norm == opt:
            return letter
    padded = f" {norm} "
    hits = {letter: opt for letter, opt in opts.items() if f" {opt} " in padded}
    if len(hits) == 1:
        return next(iter(hits))
    if len(hits) > 1:
        longest_letter, longest = max(hits.items(), key=lambda kv: len(kv[1]))
        if all(f" {opt} " in f" {longest} " for opt in hits.values()):
            return longest_letter
    return None


def parse_choice(text: str | None, options: Mapping[str, str] | None = None) -> str | None:
    """Return the chosen letter ("A".."D") for a free-text answer, or None when unparseable.

    ``options`` maps letters to option texts (empty/None options are not valid answers).
    See the module docstring for the exact rules.
    """
    if text is None:
        return None
    text = str(text).strip()
    if not text:
        return None
    valid = _valid_letters(options)

    def ok(letter: str | None) -> str | None:
        return letter if letter in valid else None

    m = _BARE.match(text)
    if m:
        return ok(m.group(1).upper())
    for pattern in (_STATED, _CHOOSE):
        m = pattern.search(text)
        if m:
            letter = _stated_letter(m, options)
            if letter is not None:
                return ok(letter)
    m = _LEADING.match(text)
    if m:
        return ok(m.group(1).upper())
    if options is not None:
        letter = _match_option_text(text, options)
        if letter is not None:
            return ok(letter)
    lone = set(_PAREN_LETTER.findall(text)) | set(_CAPITAL_TOKEN.findall(text))
    lone &= valid
    if len(lone) == 1:
        return lone.pop()
    return None
