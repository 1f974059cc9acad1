"""Property-based tests (hypothesis): the closed-VQA answer parser, the strict record readers and the
per-slide feature-file readers never crash on odd input and keep what they promise."""

from __future__ import annotations

import csv
import io
import json
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slidechat.errors import DataError, SlideChatError
from slidechat.evaluation.answer_parser import LETTERS, normalize_text, parse_choice
from slidechat.features.store import load_features, write_features_h5
from slidechat.inference.report import parse_yes_no
from slidechat.utils.io import (BadLines, append_jsonl, read_csv_rows, read_json_records, read_jsonl,
                                write_jsonl_atomic)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

words = st.text(alphabet=string.ascii_lowercase, min_size=3, max_size=10)
option_sets = st.lists(words, min_size=2, max_size=4, unique=True).filter(
    lambda opts: all(f" {a} " not in f" {b} " for a in opts for b in opts if a != b))


def _options(texts: list[str]) -> dict[str, str]:
    return {LETTERS[i]: t for i, t in enumerate(texts)}


# ------------------------------------------------------------------------------------------- answer parser
@FAST
@given(text=st.text(max_size=200), texts=option_sets)
def test_parse_choice_never_raises_and_answers_a_valid_letter(text, texts):
    options = _options(texts)
    got = parse_choice(text, options)
    assert got is None or got in options


@FAST
@given(texts=option_sets, data=st.data())
def test_parse_choice_reads_every_stated_form(texts, data):
    options = _options(texts)
    letter = data.draw(st.sampled_from(sorted(options)))
    form = data.draw(st.sampled_from(["{L}", "({L})", "{L}.", "**{L}**", "Answer: {L}", "The answer is ({l}).",
                                      "{L}. {text}", "{text}", "I choose {L}"]))
    answer = form.format(L=letter, l=letter.lower(), text=options[letter])
    assert parse_choice(answer, options) == letter


@FAST
@given(texts=option_sets, data=st.data())
def test_parse_choice_refuses_letters_of_empty_options(texts, data):
    options = _options(texts)
    empty = data.draw(st.sampled_from(sorted(options)))
    options[empty] = ""
    assert parse_choice(empty, options) is None
    assert parse_choice(f"Answer: {empty}", options) is None


@FAST
@given(text=st.text(max_size=100))
def test_normalize_text_is_idempotent(text):
    assert normalize_text(normalize_text(text)) == normalize_text(text)


@FAST
@given(text=st.text(max_size=80))
def test_report_yes_no_parser_answers_bool_or_none(text):
    assert parse_yes_no(text) in (True, False, None)
    assert parse_yes_no("Yes. " + text) is True


# ------------------------------------------------------------------------------------------- record readers
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=20)
                           | st.floats(allow_nan=False, allow_infinity=False),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=8)
records = st.lists(st.dictionaries(st.text(min_size=1, max_size=8), json_values, min_size=1, max_size=4), max_size=8)


_SCRATCH: list[Path] = []


@pytest.fixture(autouse=True, scope="module")
def scratch(tmp_path_factory):
    """One pytest-managed folder for the module; every example gets a fresh subfolder of it."""
    _SCRATCH[:] = [tmp_path_factory.mktemp("faults_props")]
    yield _SCRATCH[0]


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(dir=_SCRATCH[0]))


@FAST
@given(recs=records)
def test_jsonl_round_trip(recs):
    path = _tmp() / "r.jsonl"
    write_jsonl_atomic(path, recs)
    assert read_jsonl(path) == recs


@FAST
@given(recs=records.filter(bool), cut=st.integers(min_value=1), extra=st.dictionaries(st.text(max_size=5),
                                                                                          json_values, min_size=1))
def test_torn_last_line_is_ignored_and_repaired(recs, cut, extra):
    path = _tmp() / "r.jsonl"
    write_jsonl_atomic(path, recs)
    line = json.dumps(extra, ensure_ascii=False)
    torn = line[: 1 + cut % (len(line) - 1)]  # a strict prefix of a record, as a killed writer leaves it
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(torn)
    try:
        json.loads(torn)
        return  # a prefix that happens to be valid JSON is a record, not a torn line
    except json.JSONDecodeError:
        pass
    assert read_jsonl(path) == recs
    append_jsonl(path, {"next": 1})
    assert read_jsonl(path) == [*recs, {"next": 1}]  # never glued onto the torn fragment


@FAST
@given(recs=records.filter(lambda r: len(r) >= 1), data=st.data(),
       junk=st.sampled_from(["{", "not json", '{"a": 1', "[1, 2]", "3", '"text"', "{'single': 1}"]))
def test_malformed_middle_line_names_its_line_or_is_counted(recs, data, junk):
    pos = data.draw(st.integers(0, len(recs) - 1))
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    lines.insert(pos, junk)
    path = _tmp() / "r.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"r\.jsonl:{pos + 1}: "):
        read_jsonl(path)
    bad = BadLines(skip=True)
    assert read_jsonl(path, bad) == recs
    assert [b.line for b in bad.skipped] == [pos + 1]


cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n"), max_size=12)


@FAST
@given(header=st.lists(st.text(alphabet=string.ascii_letters, min_size=1, max_size=6), min_size=1, max_size=5,
                       unique=True), data=st.data())
def test_csv_rows_round_trip_and_bad_rows_are_located(header, data):
    rows = data.draw(st.lists(st.lists(cells, min_size=len(header), max_size=len(header)), max_size=6))
    rows = [r for r in rows if not (len(r) == 1 and not r[0].strip())]  # a blank line is not a row
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    path = _tmp() / "t.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    assert read_csv_rows(path) == [dict(zip(header, r)) for r in rows]
    pos = data.draw(st.integers(0, len(rows)))
    bad_row = ["x"] * (len(header) + 1)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows[:pos], bad_row, *rows[pos:]])
    path.write_text(buf.getvalue(), encoding="utf-8")
    with pytest.raises(DataError, match=rf"t\.csv:{pos + 2}: {len(header) + 1} field"):
        read_csv_rows(path)
    bad = BadLines(skip=True)
    assert read_csv_rows(path, bad) == [dict(zip(header, r)) for r in rows] and bad.count == 1


@FAST
@given(blob=st.binary(max_size=300))
def test_readers_turn_any_bytes_into_records_or_one_data_error(blob):
    folder = _tmp()
    for name, reader in (("b.jsonl", read_jsonl), ("b.csv", read_csv_rows), ("b.json", read_json_records)):
        (folder / name).write_bytes(blob)
        try:
            out = reader(folder / name)
        except DataError as exc:
            assert str(folder / name) in str(exc) and "\n" not in str(exc)
        else:
            assert isinstance(out, list) and all(isinstance(r, dict) for r in out)


# ------------------------------------------------------------------------------------------- feature files
@FAST
@given(n=st.integers(1, 12), d=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_feature_h5_round_trip(n, d, seed):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    coords = rng.integers(0, 10_000, size=(n, 2))
    path = _tmp() / "s.h5"
    write_features_h5(path, feats, coords, {"patch_size": 224, "patch_size_level0": 448, "target_mpp": 0.5,
                                            "encoder": "demo-cnn", "slide_id": "s", "slide_sha256": "0" * 64})
    got = load_features(path)
    np.testing.assert_array_equal(got.features, feats)
    np.testing.assert_array_equal(got.coords, coords)
    assert got.attrs["patch_size_level0"] == 448


@FAST
@given(n=st.integers(1, 10), d=st.integers(1, 6), seed=st.integers(0, 2**16), header=st.booleans())
def test_feature_csv_round_trip(n, d, seed, header):
    table = np.random.default_rng(seed).normal(size=(n, d)).round(5)
    lines = ([",".join(str(i) for i in range(d))] if header else []) + [",".join(map(str, row)) for row in table]
    path = _tmp() / "s.csv"
    path.write_text("\n".join(lines) + "\n")
    got = load_features(path)
    np.testing.assert_allclose(got.features, table.astype(np.float32), rtol=1e-6)
    assert got.coords is None and got.num_patches == n


def _garbage_is_refused(blob: bytes, suffix: str) -> None:
    path = _tmp() / f"garbage{suffix}"
    path.write_bytes(blob)
    try:
        feats = load_features(path)
    except SlideChatError as exc:
        assert "\n" not in str(exc).strip()
    else:
        assert feats.features.ndim == 2 and feats.num_patches >= 1


@FAST
@given(blob=st.binary(max_size=400))
def test_feature_h5_reader_refuses_garbage_with_a_user_error(blob):
    _garbage_is_refused(blob, ".h5")


@FAST
@given(blob=st.binary(max_size=400))
def test_feature_csv_reader_refuses_garbage_with_a_user_error(blob):
    _garbage_is_refused(blob, ".csv")


def _refused(blob: bytes, path: Path) -> None:
    path.write_bytes(blob)
    try:
        feats = load_features(path)
    except DataError:
        return
    assert feats.num_patches >= 1, f"{blob!r} read as {feats.num_patches} patches"


HDF_HEADER_ONLY = b"\x89HDF\r\n\x1a\n" + b"\0" * 40


@pytest.mark.parametrize("blob,suffix", [(b"", ".csv"), (b"1,2\nnot,numbers\n", ".csv"), (HDF_HEADER_ONLY, ".h5"),
                                         (b"", ".h5"), (b"a,b\n1,2\n", ".h5")])
def test_feature_readers_refuse_known_bad_files(blob, suffix, tmp_path):
    _refused(blob, tmp_path / f"bad{suffix}")


@pytest.mark.filterwarnings("ignore:loadtxt")
@pytest.mark.parametrize("blob", [b"0,1,2\n", b"x,y\n", HDF_HEADER_ONLY])
def test_feature_csv_reader_refuses_header_only_and_binary_files(blob, tmp_path):
    _refused(blob, tmp_path / "bad.csv")
