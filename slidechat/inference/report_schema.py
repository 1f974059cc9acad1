"""Report templates: which fields a structured report has, how each is asked, constrained, checked and rendered.

A template is a YAML (or JSON) file::

    name: synthslide
    title: Slide report
    fields:
      - name: tumor_fraction_percent        # key in Report.fields
        type: number                        # enum | list | bool | number | text
        question: What percentage of the tissue area is tumour? Answer with a percentage.
        min: 0
        max: 100
        unit: "%"
        render: "TUMOUR FRACTION: {value}."  # a line of the text report ("" leaves the field out of the text)
      - name: lesion_type
        type: enum
        values: [carcinoma (tumour focus), necrotic focus, lymphoid aggregate]
        none_answer: none                   # an answer that means "no value" (the field is then null)
        when: lesion_present                # asked only when that bool field is yes; null otherwise
      - name: tumor_present
        type: bool
        derive: {field: tissue_types, contains: tumour}   # computed from an earlier field, not asked
      - name: tumor_fraction_bin
        type: enum
        values: [under 10%, 10-30%, over 30%]
        when: tumor_present                 # a derived field may be the condition too
        otherwise: none (0%)                # the value when the condition is not yes (default: null)
      - name: tumor_fraction_percent
        type: number
        min: 1                              # asked only when tumour is present, so never 0% beside "tumour"
        max: 100
        range_by: {field: tumor_fraction_bin, ranges: {under 10%: [1, 10], 10-30%: [10, 30], over 30%: [30, 100]}}
        when: tumor_present
        otherwise: 0
    summary:
      question: Write a short pathology report describing this slide.

Types: ``enum`` (one of ``values``), ``list`` (several of ``values``, comma-separated), ``bool`` (yes/no),
``number`` (``min``..``max``, ``decimals`` places, ``unit``), ``text`` (one line of at most ``max_length``
characters). Any field may be null ("not determined"). Fields are asked (or derived) in order, so ``when`` and
``derive`` refer to earlier fields; ``when`` + ``otherwise`` keep fields consistent with each other (a tumour
fraction is only asked, and only above zero, when tumour is among the tissues). ``answer_regex()`` is the pattern
the model's answer is constrained to (the short answer form the report questions are trained with);
``parse_answer`` reads it back; ``validate`` checks a whole ``fields`` dict. ``range_by`` narrows a number to the
range of an earlier enum field's answer (a percentage asked after its bin stays inside the bin: ``bounded``).

Templates are found by name in a registry (``register_report_schema``, ``list_report_schemas``,
``load_report_schema(name_or_path)``); the shipped ones live in ``slidechat/assets/report_schemas/``.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from slidechat.errors import ConfigError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "assets" / "report_schemas"
DEFAULT_SCHEMA = "synthslide"
FIELD_TYPES = ("enum", "list", "bool", "number", "text")
MISSING = "not determined"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIELD_KEYS = {"name", "type", "question", "values", "none_answer", "when", "otherwise", "derive", "min", "max",
               "decimals", "unit", "max_length", "label", "render", "render_false", "max_items", "range_by"}
_MAX_ENUMERATED_NUMBERS = 5000


class ReportSchemaError(ConfigError):
    """A report template that cannot be used (names the template, the field and the problem)."""


def _escape(text: str) -> str:
    """A literal inside a pattern (only the metacharacters escaped: grammar engines reject escaped spaces)."""
    return re.sub(r"([.^$*+?{}\[\]\\|()/])", r"\\\1", text)


def _fmt_number(v: float, decimals: int) -> str:
    return f"{v:.{decimals}f}" if decimals else f"{int(round(v))}"


@dataclass(frozen=True)
class ReportField:
    """One field of a report template (see the module docstring for the keys)."""

    name: str
    type: str
    question: str = ""
    values: tuple[str, ...] = ()
    none_answer: str | None = None
    when: str | None = None
    otherwise: Any = None
    derive: dict[str, Any] | None = None
    min: float | None = None
    max: float | None = None
    decimals: int = 0
    unit: str = ""
    max_length: int = 80
    max_items: int | None = None
    label: str = ""
    render: str | None = None
    render_false: str | None = None
    range_by: dict[str, Any] | None = None  # {field: <enum field>, ranges: {value: (lo, hi)}}

    @property
    def asked(self) -> bool:
        return self.derive is None

    @property
    def display_label(self) -> str:
        return self.label or self.name.replace("_", " ")

    def bounded(self, values: dict[str, Any]) -> "ReportField":
        """This field with ``min``/``max`` narrowed by ``range_by`` to the range of the source field's value in
        ``values`` (itself when it has no such rule or the source has no listed value)."""
        if self.range_by is None:
            return self
        span = self.range_by["ranges"].get(values.get(self.range_by["field"]))
        if span is None:
            return self
        return replace(self, min=float(span[0]), max=float(span[1]), range_by=None)

    # ------------------------------------------------------------------ constraint
    def answer_regex(self) -> str:
        """The pattern the model's answer to ``question`` must match."""
        t = self.type
        if t == "bool":
            body = "(yes|no|Yes|No)"
        elif t == "enum":
            body = "(" + "|".join(_escape(v) for v in self.values) + ")"
        elif t == "list":
            one = "(" + "|".join(_escape(v) for v in self.values) + ")"
            n = (self.max_items or len(self.values)) - 1
            body = one + (f"(, {one}){{0,{n}}}" if n > 0 else "")
        elif t == "number":
            body = self._number_regex()
        else:
            body = f"[^\\n]{{1,{self.max_length}}}"
        if self.none_answer:
            body = f"({body}|{_escape(self.none_answer)})"
        return body

    def _number_regex(self) -> str:
        lo, hi = int(self.min), int(self.max)
        ints = "|".join(str(i) for i in range(hi, lo - 1, -1) if i < hi or not self.decimals)  # longest first
        unit = _escape(self.unit if self.unit == "%" else f" {self.unit}") if self.unit else ""
        if self.decimals:
            frac = f"(\\.[0-9]{{1,{self.decimals}}})?"
            top = f"{hi}(\\.0{{1,{self.decimals}}})?"
            return f"(({ints}){frac}|{top})" + (f"({unit})?" if unit else "") if ints else top
        return f"({ints})" + (f"({unit})?" if unit else "")

    def max_answer_bytes(self) -> int:
        """The longest answer ``answer_regex`` allows, in UTF-8 bytes (bounds the token budget)."""
        t = self.type
        size = lambda v: len(v.encode("utf-8"))  # noqa: E731
        if t == "bool":
            n = 3
        elif t == "enum":
            n = max(size(v) for v in self.values)
        elif t == "list":
            n = sum(sorted((size(v) + 2 for v in self.values), reverse=True)[: self.max_items or len(self.values)])
        elif t == "number":
            n = len(str(int(self.max))) + (self.decimals + 1 if self.decimals else 0) + size(self.unit) + 1
        else:
            n = 4 * self.max_length
        return max(n, size(self.none_answer or ""))

    # ------------------------------------------------------------------ reading
    def parse_answer(self, text: str) -> Any:
        """The field value of an answer that matches ``answer_regex`` (None for ``none_answer`` or no value)."""
        s = text.strip()
        if not s or (self.none_answer and s.lower() == self.none_answer.lower()):
            return None
        t = self.type
        if t == "bool":
            return s.lower().startswith("y")
        if t == "enum":
            return next((v for v in self.values if v.lower() == s.lower()), None)
        if t == "list":
            picked = [v.strip() for v in s.split(", ")]
            return [v for v in self.values if v in picked]
        if t == "number":
            m = re.match(r"-?\d+(?:\.\d+)?", s)
            if not m:
                return None
            v = float(m.group())
            return v if self.min <= v <= self.max else None
        return s[: self.max_length]

    def check(self, value: Any) -> str | None:
        """Why ``value`` is not a valid value of this field, or None when it is."""
        if value is None:
            return None
        t = self.type
        if t == "bool":
            return None if isinstance(value, bool) else f"expected yes/no (bool), got {value!r}"
        if t == "enum":
            return None if value in self.values else f"{value!r} is not one of {list(self.values)}"
        if t == "list":
            if not isinstance(value, list):
                return f"expected a list, got {value!r}"
            bad = [v for v in value if v not in self.values]
            if bad:
                return f"{bad} not among {list(self.values)}"
            return "repeated values" if len(set(value)) != len(value) else None
        if t == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"expected a number, got {value!r}"
            if not self.min <= value <= self.max:
                return f"{value} outside {self.min:g}..{self.max:g}"
            return None
        if not isinstance(value, str) or "\n" in value or len(value) > self.max_length:
            return f"expected one line of at most {self.max_length} characters"
        return None

    def format_value(self, value: Any, missing: str = MISSING) -> str:
        """The value as report text: yes/no, comma-separated lists, numbers with their unit."""
        if value is None or value == []:
            return missing
        if self.type == "bool":
            return "yes" if value else "no"
        if self.type == "list":
            return ", ".join(value)
        if self.type == "number":
            unit = self.unit if self.unit == "%" else (f" {self.unit}" if self.unit else "")
            return _fmt_number(float(value), self.decimals) + unit
        return str(value)


@dataclass(frozen=True)
class ReportSchema:
    """A report template: ``fields`` in the order they are asked, the summary question, the title."""

    name: str
    fields: tuple[ReportField, ...]
    title: str = "Slide report"
    description: str = ""
    summary_question: str | None = None
    summary_label: str = "SUMMARY"
    source: str = ""
    _by_name: dict[str, ReportField] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({f.name: f for f in self.fields})

    def field(self, name: str) -> ReportField:
        return self._by_name[name]

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields] + (["summary"] if self.summary_question else [])

    def derive(self, values: dict[str, Any]) -> None:
        """Fill the derived fields of ``values`` in place."""
        for f in self.fields:
            if f.derive is not None:
                self.derive_field(f, values)

    @staticmethod
    def derive_field(f: ReportField, values: dict[str, Any]) -> None:
        """Fill derived field ``f`` of ``values`` from its (earlier) source field."""
        src = values.get(f.derive["field"])
        if src is None or src == [] and "contains" not in f.derive:
            values[f.name] = None
        elif "contains" in f.derive:
            values[f.name] = f.derive["contains"] in (src or [])
        elif "greater_than" in f.derive:
            values[f.name] = float(src) > float(f.derive["greater_than"])
        else:
            values[f.name] = src == f.derive["equals"]

    def validate(self, values: dict[str, Any]) -> list[str]:
        """Problems of a ``fields`` dict against this template (empty when it validates)."""
        problems = [f"missing field {name!r}" for name in self.field_names if name not in values]
        problems += [f"unknown field {k!r}" for k in values if k not in self._by_name and k != "summary"]
        for f in self.fields:
            value = values.get(f.name)
            if f.when and values.get(f.when) is not True:
                if value is not None and value != f.otherwise:
                    problems.append(f"{f.name}: set although {f.when} is not yes"
                                    + (f" (it is then {f.otherwise!r})" if f.otherwise is not None else ""))
                continue
            why = f.bounded(values).check(value)
            if f.range_by is not None and why and f.check(value) is None:
                why += f" (the range for {f.range_by['field']} = {values.get(f.range_by['field'])!r})"
            if why:
                problems.append(f"{f.name}: {why}")
        if "summary" in values and not isinstance(values["summary"], str):
            problems.append("summary: expected text")
        return problems

    def render_lines(self, values: dict[str, Any]) -> list[str]:
        """The text report: one line per field with a ``render`` template, then the summary."""
        shown = {f.name: f.format_value(values.get(f.name)) for f in self.fields}
        lines = []
        for f in self.fields:
            tpl = f.render
            if tpl is None:
                tpl = f"{f.display_label.upper()}: {{value}}."
            if f.render_false is not None and values.get(f.name) is False:
                tpl = f.render_false
            if tpl:
                lines.append(tpl.format_map({**shown, "value": shown[f.name]}))
        if self.summary_question:
            lines.append(f"{self.summary_label}: {values.get('summary') or MISSING}")
        return lines

    def to_json_schema(self) -> dict[str, Any]:
        """The fields as a JSON Schema (null allowed everywhere: "not determined")."""
        props: dict[str, Any] = {}
        for f in self.fields:
            if f.type == "bool":
                p: dict[str, Any] = {"type": ["boolean", "null"]}
            elif f.type == "enum":
                p = {"enum": [*f.values, *([f.otherwise] if f.otherwise not in (None, *f.values) else []), None]}
            elif f.type == "list":
                p = {"type": ["array", "null"], "items": {"enum": list(f.values)}, "uniqueItems": True}
            elif f.type == "number":
                low = f.min if f.otherwise is None else min(f.min, float(f.otherwise))
                p = {"type": ["number", "null"], "minimum": low, "maximum": f.max}
            else:
                p = {"type": ["string", "null"], "maxLength": f.max_length}
            if f.question:
                p["description"] = f.question
            if f.unit:
                p["x-unit"] = f.unit
            props[f.name] = p
        if self.summary_question:
            props["summary"] = {"type": "string", "description": self.summary_question}
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": self.title, "type": "object",
                "properties": props, "required": list(props), "additionalProperties": False}


# ---------------------------------------------------------------------- parsing
def _err(where: str, problem: str) -> ReportSchemaError:
    return ReportSchemaError(f"report template {where}: {problem}")


def _parse_field(raw: Any, i: int, where: str, seen: dict[str, ReportField]) -> ReportField:
    if not isinstance(raw, dict):
        raise _err(where, f"field #{i + 1} must be a mapping with name/type/question, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _err(where, f"field #{i + 1}: 'name' must be an identifier (letters, digits, _), got {name!r}")
    at = f"{where}, field {name!r}"
    unknown = sorted(set(raw) - _FIELD_KEYS)
    if unknown:
        raise _err(at, f"unknown key(s) {unknown}; allowed: {sorted(_FIELD_KEYS)}")
    if name in seen or name == "summary":
        raise _err(at, "duplicate field name" if name in seen else "'summary' is reserved (use the summary section)")
    ftype = raw.get("type")
    if ftype not in FIELD_TYPES:
        raise _err(at, f"type must be one of {list(FIELD_TYPES)}, got {ftype!r}")
    derive = raw.get("derive")
    question = raw.get("question") or ""
    if derive is None and not (isinstance(question, str) and question.strip()):
        raise _err(at, "needs a 'question' (or a 'derive' rule)")
    kw: dict[str, Any] = {"name": name, "type": ftype, "question": str(question).strip()}
    if ftype in ("enum", "list"):
        values = raw.get("values")
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise _err(at, f"a {ftype} field needs 'values': a non-empty list of strings")
        if len(set(values)) != len(values):
            raise _err(at, "'values' has duplicates")
        if ftype == "list" and any("," in v for v in values):
            raise _err(at, "list values cannot contain a comma (it separates the items)")
        kw["values"] = tuple(v.strip() for v in values)
    elif "values" in raw:
        raise _err(at, f"'values' is only for enum and list fields, not {ftype}")
    if ftype == "number":
        lo, hi = raw.get("min"), raw.get("max")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
            raise _err(at, "a number field needs numeric 'min' and 'max'")
        if lo > hi:
            raise _err(at, f"min {lo} is above max {hi}")
        if int(lo) != lo or int(hi) != hi or lo < 0:
            raise _err(at, "min and max must be whole numbers >= 0 (use 'decimals' for fractions)")
        if hi - lo > _MAX_ENUMERATED_NUMBERS:
            raise _err(at, f"the range {lo}..{hi} is too wide (at most {_MAX_ENUMERATED_NUMBERS} apart)")
        dec = raw.get("decimals", 0)
        if not isinstance(dec, int) or not 0 <= dec <= 3:
            raise _err(at, f"'decimals' must be 0..3, got {dec!r}")
        kw.update(min=float(lo), max=float(hi), decimals=dec)
    elif "min" in raw or "max" in raw or "decimals" in raw:
        raise _err(at, "min/max/decimals are only for number fields")
    if "unit" in raw:
        if not isinstance(raw["unit"], str) or ftype != "number":
            raise _err(at, "'unit' is a string, for number fields")
        kw["unit"] = raw["unit"].strip()
    if ftype == "text":
        ml = raw.get("max_length", 80)
        if not isinstance(ml, int) or not 1 <= ml <= 500:
            raise _err(at, f"'max_length' must be 1..500, got {ml!r}")
        kw["max_length"] = ml
    if "max_items" in raw:
        mi = raw["max_items"]
        if ftype != "list" or not isinstance(mi, int) or mi < 1:
            raise _err(at, "'max_items' is a positive integer, for list fields")
        kw["max_items"] = mi
    for key in ("none_answer", "label", "render", "render_false"):
        if key in raw and raw[key] is not None:
            if not isinstance(raw[key], str):
                raise _err(at, f"{key!r} must be a string")
            kw[key] = raw[key]
    when = raw.get("when")
    if when is not None:
        if when not in seen or seen[when].type != "bool":
            raise _err(at, f"'when: {when}' must name an earlier bool field")
        kw["when"] = when
    if "otherwise" in raw:
        other = raw["otherwise"]
        if when is None:
            raise _err(at, "'otherwise' is the value when the 'when' field is not yes: it needs 'when'")
        numeric = isinstance(other, (int, float)) and not isinstance(other, bool)
        # a number's 'otherwise' may lie outside min..max (0 where only 1..100 can be asked), an enum's outside its
        # values ("none (0%)" where only the bins above zero can be asked)
        if ftype == "number":
            fits = numeric
        elif ftype == "enum":
            fits = isinstance(other, str) and bool(other.strip())
        else:
            fits = ReportField(**kw).check(other) is None
        if other is not None and not fits:
            raise _err(at, f"'otherwise: {other!r}' is not a value of this {ftype} field")
        kw["otherwise"] = float(other) if numeric else other
    if derive is not None:
        if not isinstance(derive, dict) or derive.get("field") not in seen:
            raise _err(at, "'derive' needs {field: <an earlier field>, and one of contains / greater_than / equals}")
        rules = [k for k in ("contains", "greater_than", "equals") if k in derive]
        if len(rules) != 1 or set(derive) - {"field", *rules}:
            raise _err(at, "'derive' takes exactly one of contains / greater_than / equals besides 'field'")
        if ftype != "bool":
            raise _err(at, "derived fields are bool")
        src = seen[derive["field"]]
        if rules[0] == "contains" and (src.type != "list" or derive["contains"] not in src.values):
            raise _err(at, f"'contains: {derive['contains']}' must be one of the values of list field {src.name!r}")
        if rules[0] == "greater_than" and src.type != "number":
            raise _err(at, f"'greater_than' needs a number field; {src.name!r} is {src.type}")
        kw["derive"] = dict(derive)
    if "range_by" in raw:
        kw["range_by"] = _parse_range_by(raw["range_by"], kw, at, seen)
    f = ReportField(**kw)
    return f


def _parse_range_by(rule: Any, kw: dict[str, Any], at: str, seen: dict[str, ReportField]) -> dict[str, Any]:
    """``range_by: {field: <earlier enum field>, ranges: {value: [lo, hi], ...}}`` of a number field."""
    if kw["type"] != "number":
        raise _err(at, "'range_by' is for number fields")
    if not isinstance(rule, dict) or set(rule) != {"field", "ranges"}:
        raise _err(at, "'range_by' needs {field: <an earlier enum field>, ranges: {value: [min, max], ...}}")
    src = seen.get(rule["field"])
    if src is None or src.type != "enum":
        raise _err(at, f"'range_by: {rule['field']}' must name an earlier enum field")
    ranges = rule["ranges"]
    if not isinstance(ranges, dict) or not ranges:
        raise _err(at, "'range_by.ranges' maps values of the enum field to [min, max]")
    out: dict[str, tuple[float, float]] = {}
    for value, span in ranges.items():
        if value not in src.values:
            raise _err(at, f"'range_by.ranges': {value!r} is not one of {list(src.values)} ({src.name!r})")
        ok = (isinstance(span, list) and len(span) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and int(v) == v for v in span))
        if not ok or not kw["min"] <= span[0] <= span[1] <= kw["max"]:
            raise _err(at, f"'range_by.ranges.{value}': {span!r} must be [min, max], whole numbers within "
                           f"{kw['min']:g}..{kw['max']:g}")
        out[value] = (float(span[0]), float(span[1]))
    return {"field": src.name, "ranges": out}


def parse_report_schema(data: Any, where: str = "<template>") -> ReportSchema:
    """A ``ReportSchema`` from a parsed YAML/JSON document; ``ReportSchemaError`` names the field and the problem."""
    if not isinstance(data, dict):
        raise _err(where, "must be a mapping with 'name' and 'fields'")
    unknown = sorted(set(data) - {"name", "title", "description", "fields", "summary"})
    if unknown:
        raise _err(where, f"unknown top-level key(s) {unknown}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _err(where, "needs a 'name'")
    raw_fields = data.get("fields")
    if not isinstance(raw_fields, list) or not raw_fields:
        raise _err(where, "'fields' must be a non-empty list")
    seen: dict[str, ReportField] = {}
    for i, raw in enumerate(raw_fields):
        f = _parse_field(raw, i, where, seen)
        seen[f.name] = f
    for f in seen.values():
        for key in ("render", "render_false"):
            tpl = getattr(f, key)
            if tpl:
                try:
                    tpl.format_map({**{n: "" for n in seen}, "value": ""})
                except (KeyError, IndexError, ValueError) as exc:
                    raise _err(f"{where}, field {f.name!r}", f"{key!r} template {tpl!r} names an unknown field or "
                                                             f"is malformed ({exc}); use {{value}} or field names") \
                        from None
    summary = data.get("summary")
    question, label = None, "SUMMARY"
    if summary is not None:
        if not isinstance(summary, dict) or not isinstance(summary.get("question"), str):
            raise _err(where, "'summary' must be a mapping with a 'question'")
        question, label = summary["question"].strip(), str(summary.get("label", label))
    return ReportSchema(name=name.strip(), fields=tuple(seen.values()), title=str(data.get("title") or "Slide report"),
                        description=str(data.get("description") or ""), summary_question=question,
                        summary_label=label, source=where)


def read_report_schema(path: str | Path) -> ReportSchema:
    """Parse a template file (``.yaml``/``.yml``/``.json``)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReportSchemaError(f"cannot read report template {p}: {exc.strerror or exc}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (ValueError, ImportError) as exc:  # json.JSONDecodeError, yaml.YAMLError are ValueError subclasses?
        raise ReportSchemaError(f"report template {p} is not valid {p.suffix.lstrip('.') or 'YAML'}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        raise ReportSchemaError(f"report template {p} is not valid YAML: {exc}") from None
    return parse_report_schema(data, where=str(p))


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[[], ReportSchema]] = {}
_LOADED: dict[str, ReportSchema] = {}
_LOCK = threading.Lock()


def register_report_schema(name: str, source: str | Path | ReportSchema | Callable[[], ReportSchema],
                           overwrite: bool = False) -> None:
    """Make a template loadable by ``name``: a file path, a ``ReportSchema`` or a function returning one."""
    if not overwrite and name in _REGISTRY:
        raise ReportSchemaError(f"a report template named {name!r} is already registered (pass overwrite=True)")
    if isinstance(source, ReportSchema):
        loader: Callable[[], ReportSchema] = lambda: source  # noqa: E731
    elif callable(source):
        loader = source
    else:
        loader = lambda: read_report_schema(source)  # noqa: E731
    with _LOCK:
        _REGISTRY[name] = loader
        _LOADED.pop(name, None)


def unregister_report_schema(name: str) -> None:
    with _LOCK:
        _REGISTRY.pop(name, None)
        _LOADED.pop(name, None)


def list_report_schemas() -> list[str]:
    """Names of the registered templates."""
    return sorted(_REGISTRY)


def load_report_schema(name_or_path: str | Path | ReportSchema | None = None) -> ReportSchema:
    """A registered template by name, a template file by path, or (None) the default SynthSlide template."""
    if isinstance(name_or_path, ReportSchema):
        return name_or_path
    key = str(name_or_path) if name_or_path is not None else DEFAULT_SCHEMA
    if key in _REGISTRY:
        with _LOCK:
            if key not in _LOADED:
                _LOADED[key] = _REGISTRY[key]()
            return _LOADED[key]
    p = Path(key).expanduser()
    if p.suffix.lower() in (".yaml", ".yml", ".json") or p.exists():
        if not p.is_file():
            raise ReportSchemaError(f"no report template file at {p}")
        return read_report_schema(p)
    raise ReportSchemaError(f"unknown report template {key!r}; give a .yaml/.json file or one of "
                            f"{list_report_schemas()}")


for _p in sorted(SCHEMA_DIR.glob("*.yaml")):
    register_report_schema(_p.stem.replace("-", "_"), _p)


__all__ = ["ReportField", "ReportSchema", "ReportSchemaError", "DEFAULT_SCHEMA", "parse_report_schema",
           "read_report_schema", "register_report_schema", "unregister_report_schema", "list_report_schemas",
           "load_report_schema"]
