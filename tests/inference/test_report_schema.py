"""Report templates: parsing (valid and malformed), the registry, rendering, and constrained generation that
always validates (tiny random LLM, the demo checkpoint, `slidechat report --schema`)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from slidechat.cli import main
from slidechat.inference.report_schema import (ReportSchemaError, list_report_schemas, load_report_schema,
                                               parse_report_schema, register_report_schema,
                                               unregister_report_schema)
from slidechat.synth.classes import DISPLAY_NAMES, LESION_DISPLAY, QUADRANTS, TUMOR_FRACTION_BINS
from slidechat.utils.io import read_jsonl

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _minimal(**field):
    return {"name": "t", "fields": [{"name": "grade", "type": "number", "question": "Grade?", "min": 1, "max": 3,
                                     **field}]}


# ------------------------------------------------------------------ parsing + registry
def test_shipped_templates_are_registered_and_synthslide_matches_the_generator():
    assert {"synthslide", "breast_carcinoma"} <= set(list_report_schemas())
    s = load_report_schema()  # the default
    assert s.name == "synthslide"
    assert list(s.field("tissue_types").values) == list(DISPLAY_NAMES.values())
    assert list(s.field("lesion_type").values) == list(LESION_DISPLAY.values())
    assert list(s.field("lesion_location").values) == list(QUADRANTS)
    from slidechat import prompts

    asked = {f.name: f.question for f in s.fields if f.asked}
    # the tumour-fraction bin is asked as the multiple-choice question the checkpoints are trained on
    bins = [b[2] for b in TUMOR_FRACTION_BINS[1:]]
    assert list(s.field("tumor_fraction_bin").values) == bins
    assert asked.pop("tumor_fraction_bin") == prompts.format_mcq("What fraction of the tissue area is tumour?",
                                                                 dict(zip("ABC", bins)))
    assert s.field("tumor_fraction_bin").otherwise == TUMOR_FRACTION_BINS[0][2]
    assert asked == {k: v for k, v in prompts.REPORT_QUESTIONS.items() if k != "summary"}
    assert s.summary_question == prompts.REPORT_QUESTIONS["summary"]


def test_breast_template_loads_validates_and_renders():
    s = load_report_schema("breast_carcinoma")
    grade = s.field("nottingham_grade")
    assert (grade.type, grade.min, grade.max) == ("number", 1, 3)
    values = {f.name: None for f in s.fields}
    values.update(histologic_type="invasive lobular carcinoma", nottingham_grade=2, tubule_formation_score=3,
                  nuclear_pleomorphism_score=2, mitotic_count_score=1, tumor_size_mm=14.5,
                  margin_status="negative", lymphovascular_invasion="not identified", dcis_present=False,
                  summary="Invasive lobular carcinoma.")
    assert s.validate(values) == []
    text = "\n".join(s.render_lines(values))
    assert "HISTOLOGIC GRADE (NOTTINGHAM): 2 (tubules 3, nuclei 2, mitoses 1)." in text
    assert "TUMOUR SIZE: 14.5 mm." in text and text.endswith("DIAGNOSIS: Invasive lobular carcinoma.")
    assert s.validate({**values, "nottingham_grade": 4}) == ["nottingham_grade: 4 outside 1..3"]
    assert any("dcis_nuclear_grade" in p for p in s.validate({**values, "dcis_nuclear_grade": "high"}))
    js = s.to_json_schema()
    assert js["properties"]["tumor_size_mm"]["maximum"] == 200 and "summary" in js["required"]


@pytest.mark.parametrize("change, message", [
    ({"type": "integer"}, "type must be one of"),
    ({"min": 5}, "min 5 is above max 3"),
    ({"question": ""}, "needs a 'question'"),
    ({"values": ["a"]}, "'values' is only for enum and list"),
    ({"when": "nothing"}, "must name an earlier bool field"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"render": "GRADE: {grde}"}, "names an unknown field"),
    ({"decimals": 7}, "'decimals' must be 0..3"),
    ({"otherwise": 0}, "'otherwise' is the value when the 'when' field is not yes: it needs 'when'"),
])
def test_malformed_field_gives_one_clear_error_naming_the_field(change, message):
    with pytest.raises(ReportSchemaError) as err:
        parse_report_schema(_minimal(**change), where="my.yaml")
    assert "my.yaml, field 'grade'" in str(err.value) and message in str(err.value)


def test_otherwise_needs_a_value_of_its_field_and_keeps_fields_consistent():
    fields = [{"name": "tumour", "type": "bool", "question": "Tumour?"},
              {"name": "kind", "type": "enum", "question": "Kind?", "values": ["a", "b"], "when": "tumour"}]
    with pytest.raises(ReportSchemaError, match="'otherwise: 5' is not a value of this enum field"):
        parse_report_schema({"name": "t", "fields": [fields[0], {**fields[1], "otherwise": 5}]}, where="t.yaml")
    with pytest.raises(ReportSchemaError, match="'otherwise: 'no'' is not a value of this bool field"):
        parse_report_schema({"name": "t", "fields": [fields[0], {"name": "b", "type": "bool", "question": "B?",
                                                                "when": "tumour", "otherwise": "no"}]})
    # an enum's 'otherwise' may be a value that cannot be asked ("none" where only kinds are choices)
    kinds = parse_report_schema({"name": "t", "fields": [fields[0], {**fields[1], "otherwise": "none"}]})
    assert kinds.validate({"tumour": False, "kind": "none"}) == []
    assert kinds.validate({"tumour": True, "kind": "none"}) == ["kind: 'none' is not one of ['a', 'b']"]
    assert kinds.to_json_schema()["properties"]["kind"]["enum"] == ["a", "b", "none", None]
    with pytest.raises(ReportSchemaError, match="is not a value of this number field"):
        parse_report_schema({"name": "t", "fields": [fields[0], {"name": "pct", "type": "number", "question": "%?",
                                                                "min": 1, "max": 100, "when": "tumour",
                                                                "otherwise": "none"}]})
    s = load_report_schema()  # SynthSlide: the tumour fraction follows the tissue list
    f = s.field("tumor_fraction_percent")
    assert (f.when, f.otherwise, f.min) == ("tumor_present", 0.0, 1.0)
    base = {name: None for name in s.field_names} | {"tissue_types": ["fibrous stroma"], "lesion_present": False,
                                                      "necrosis_present": False, "summary": "x"}
    s.derive(base)
    assert base["tumor_present"] is False
    base["tumor_fraction_bin"] = "none (0%)"
    assert s.validate({**base, "tumor_fraction_percent": 0.0}) == []
    assert s.validate({**base, "tumor_fraction_percent": 5.0}) == [
        "tumor_fraction_percent: set although tumor_present is not yes (it is then 0.0)"]
    with_tumour = {**base, "tissue_types": ["fibrous stroma", "tumour"], "tumor_present": True}
    assert s.validate({**with_tumour, "tumor_fraction_percent": 0.0}) == [
        "tumor_fraction_bin: 'none (0%)' is not one of ['under 10%', '10-30%', 'over 30%']",
        "tumor_fraction_percent: 0.0 outside 1..100"]
    assert s.to_json_schema()["properties"]["tumor_fraction_percent"]["minimum"] == 0.0


def test_range_by_keeps_a_number_inside_the_bin_an_earlier_field_chose():
    s = load_report_schema()
    pct = s.field("tumor_fraction_percent")
    assert pct.range_by["field"] == "tumor_fraction_bin"
    under = pct.bounded({"tumor_fraction_bin": "under 10%"})
    assert (under.min, under.max) == (1.0, 10.0)
    assert re.fullmatch(under.answer_regex(), "7%") and not re.fullmatch(under.answer_regex(), "23%")
    assert pct.bounded({"tumor_fraction_bin": None}) is pct  # no bin: the field's own 1..100
    base = {name: None for name in s.field_names} | {"tissue_types": ["tumour"], "dominant_tissue": "tumour",
                                                      "lesion_present": False, "necrosis_present": False,
                                                      "summary": "x"}
    s.derive(base)
    ok = {**base, "tumor_fraction_bin": "10-30%", "tumor_fraction_percent": 23.0}
    assert s.validate(ok) == []
    assert s.validate({**ok, "tumor_fraction_bin": "under 10%"}) == [
        "tumor_fraction_percent: 23.0 outside 1..10 (the range for tumor_fraction_bin = 'under 10%')"]
    number = {"name": "pct", "type": "number", "question": "%?", "min": 0, "max": 100}
    enum = {"name": "bin", "type": "enum", "question": "Bin?", "values": ["low", "high"]}
    for rule, problem in [({"field": "bin"}, "needs {field"),
                          ({"field": "nope", "ranges": {"low": [0, 5]}}, "must name an earlier enum field"),
                          ({"field": "bin", "ranges": {"mid": [0, 5]}}, "'mid' is not one of"),
                          ({"field": "bin", "ranges": {"low": [5, 200]}}, "within 0..100")]:
        with pytest.raises(ReportSchemaError, match=re.escape(problem)):
            parse_report_schema({"name": "t", "fields": [enum, {**number, "range_by": rule}]})
    with pytest.raises(ReportSchemaError, match="'range_by' is for number fields"):
        parse_report_schema({"name": "t", "fields": [enum, {**enum, "name": "b2", "range_by": {"field": "bin"}}]})


def test_malformed_documents(tmp_path):
    with pytest.raises(ReportSchemaError, match="'fields' must be a non-empty list"):
        parse_report_schema({"name": "x", "fields": []})
    with pytest.raises(ReportSchemaError, match="a enum field needs 'values'"):
        parse_report_schema({"name": "x", "fields": [{"name": "a", "type": "enum", "question": "q"}]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfields: [\n")
    with pytest.raises(ReportSchemaError, match="not valid YAML"):
        load_report_schema(bad)
    with pytest.raises(ReportSchemaError, match="unknown report template 'nope'"):
        load_report_schema("nope")


def test_register_by_name_and_load_from_file(tmp_path):
    path = tmp_path / "grade.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    assert load_report_schema(path).field("grade").answer_regex() == "(3|2|1)"
    register_report_schema("grade_only", path)
    try:
        assert "grade_only" in list_report_schemas() and load_report_schema("grade_only").name == "t"
        with pytest.raises(ReportSchemaError, match="already registered"):
            register_report_schema("grade_only", path)
    finally:
        unregister_report_schema("grade_only")


def test_answer_patterns_accept_exactly_the_valid_answers():
    s = load_report_schema()
    pct = s.field("tumor_fraction_percent")
    rx = re.compile(pct.answer_regex())
    assert all(rx.fullmatch(a) for a in ("1%", "35%", "100%", "7"))
    assert not any(rx.fullmatch(a) for a in ("0%", "101%", "-3%", "35 %", "abc"))  # asked only beside tumour
    assert pct.parse_answer("35%") == 35.0
    tt = s.field("tissue_types")
    assert tt.parse_answer("necrosis, fibrous stroma, necrosis") == ["fibrous stroma", "necrosis"]
    size = load_report_schema("breast_carcinoma").field("tumor_size_mm")
    rs = re.compile(size.answer_regex())
    assert rs.fullmatch("14.5 mm") and rs.fullmatch("200") and not rs.fullmatch("200.5") and not rs.fullmatch("14.55")


# ------------------------------------------------------------------ constrained generation
def _features(n: int, seed: int = 0):
    import numpy as np

    from slidechat.features.store import SlideFeatures

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n * 1.5)))
    cells = rng.permutation(side * side)[:n]
    xy = np.stack([cells % side, cells // side], 1).astype(np.int64) * 256
    return SlideFeatures(features=rng.standard_normal((n, 32)).astype(np.float32), coords=xy,
                         attrs={"slide_id": f"s{n}", "slide_sha256": f"schema-{n}-{seed}", "patch_size_level0": 256})


def test_untrained_model_reports_validate_under_every_shipped_template(tiny_qformer_chat):
    """A random LLM writes garbage unconstrained; under the templates every field is still valid."""
    for name in ("synthslide", "breast_carcinoma"):
        schema = load_report_schema(name)
        for seed in range(3):
            rep = tiny_qformer_chat.report(_features(60 + seed, seed), schema=name, max_new_tokens=8,
                                           summary_max_new_tokens=4, evidence_k=0)
            assert schema.validate(rep.fields) == [], (name, rep.raw_answers)
            if name == "synthslide":  # the fields agree with each other whatever the model says
                tumour = "tumour" in (rep.fields["tissue_types"] or [])
                assert rep.fields["tumor_present"] is tumour
                assert (rep.fields["tumor_fraction_percent"] == 0.0) is (not tumour)
                assert bool(rep.raw_answers.get("tumor_fraction_percent")) is tumour  # asked only then
            assert all(re.fullmatch(schema.field(k).answer_regex(), a)
                       for k, a in rep.raw_answers.items() if a and k != "summary"), rep.raw_answers
            assert rep.to_dict()["schema"] == name and rep.text.splitlines()[0].split(":")[0].isupper()


def test_free_text_path_is_kept(tiny_qformer_chat):
    rep = tiny_qformer_chat.report(_features(70), schema=False, max_new_tokens=4, summary_max_new_tokens=4,
                                   evidence_k=0)
    assert rep.schema is None and rep.text.startswith("TISSUE TYPES:") and "schema" in rep.to_dict()


@pytest.fixture(scope="module")
def demo():
    import slidechat

    return slidechat.load("demo", device="cpu")


def test_demo_checkpoint_fields_validate_and_text_agrees(demo, synth_dataset, tmp_path):
    schema = load_report_schema()
    path = sorted((synth_dataset / "slides").glob("*.tiff"))[0]
    slide = demo.encode_slide(path, cache_dir=tmp_path / "cache")
    rep = demo.report(slide, summary_max_new_tokens=8, evidence_k=2)
    assert schema.validate(rep.fields) == [], rep.raw_answers
    assert rep.fields["dominant_tissue"] in rep.fields["tissue_types"]  # the trained model is self-consistent
    assert f"TISSUE TYPES: {', '.join(rep.fields['tissue_types'])}." in rep.text
    assert rep.fields["necrosis_present"] == ("necrosis" in rep.fields["tissue_types"])
    assert rep.fields["summary"] and rep.text.endswith(rep.fields["summary"]) and len(rep.evidence) == 2
    md = rep.to_markdown()
    assert md.startswith("## Slide report: ") and "| tumor fraction percent |" in md


def test_report_cli_with_a_template_file(synth_dataset, tiny_checkpoint_dir, tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump({"name": "mini", "fields": [
        {"name": "lesion_present", "type": "bool", "question": "Is there a focal lesion in this slide?"},
        {"name": "grade", "type": "number", "question": "Grade?", "min": 1, "max": 3, "when": "lesion_present"},
        {"name": "margin", "type": "enum", "question": "Margins?", "values": ["negative", "positive"]}]}))
    slides = sorted((synth_dataset / "slides").glob("*.tiff"))[:2]
    out = tmp_path / "out"
    assert main(["report", *map(str, slides), "--out", str(out), "--checkpoint", str(tiny_checkpoint_dir),
                 "--cache-dir", str(tmp_path / "cache"), "--schema", str(path), "--no-progress",
                 "--no-heatmaps", "--thumbnail-size", "64"]) == 0
    recs = read_jsonl(out / "reports.jsonl")
    schema = load_report_schema(path)
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs)
    for r in recs:
        assert set(r["fields"]) == {"lesion_present", "grade", "margin"} and schema.validate(r["fields"]) == []
        assert r["schema"] == "mini" and r["report_text"].startswith("LESION PRESENT: ")
    assert "margin" in (out / "index.html").read_text()
    assert main(["report", str(slides[0]), "--out", str(tmp_path / "o2"), "--schema", "no_such_template",
                 "--checkpoint", str(tiny_checkpoint_dir)]) != 0
    json.dumps(recs)
