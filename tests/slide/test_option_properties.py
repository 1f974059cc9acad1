"""Property-based tests (hypothesis) of the extraction options: every in-range value is accepted as the option's
type; every out-of-range, NaN, infinite, fractional (for integer options) or wrongly typed value is refused with
a ConfigError naming the option and its range, in the Python API (check_option, ExtractionConfig, TissueConfig)
and at parse time on the command line (exit 2, one line)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from slidechat.cli import main
from slidechat.errors import ConfigError, SlideChatError
from slidechat.slide.config import OPTION_RANGES, ExtractionConfig, TissueConfig, _range_text, check_option

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NAMES = sorted(OPTION_RANGES)
EXTRACTION_FIELDS = ("target_mpp", "patch_size", "batch_size", "num_workers", "mpp")
TISSUE_FIELDS = ("threshold", "min_tissue", "thumbnail_size")
# the options `slidechat extract` reads as numbers (flag -> option)
CLI_FLAGS = {flag: name for name, (_, _, _, flag) in OPTION_RANGES.items()}
WRONG_TYPES = st.sampled_from([None, "0.5", b"1", [1], {"v": 1}, (1,), 1j, True, False, object()])


def in_range(name: str):
    lo, hi, integer, _ = OPTION_RANGES[name]
    if integer:
        return st.integers(int(lo), int(hi))
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def out_of_range(name: str):
    """Numbers of the option's type outside its range, plus NaN and the infinities."""
    lo, hi, integer, _ = OPTION_RANGES[name]
    if integer:
        numbers = st.integers(max_value=int(lo) - 1) | st.integers(min_value=int(hi) + 1)
    else:
        numbers = (st.floats(max_value=lo, exclude_max=True, allow_nan=False)
                   | st.floats(min_value=hi, exclude_min=True, allow_nan=False))
    return numbers | st.sampled_from([math.nan, math.inf, -math.inf])


def _names_option_and_range(err: BaseException, name: str) -> None:
    msg = str(err)
    assert OPTION_RANGES[name][3] in msg and _range_text(name) in msg and "\n" not in msg, msg


# ------------------------------------------------------------------------------------------- check_option
@FAST
@given(data=st.data(), name=st.sampled_from(NAMES))
def test_any_value_in_range_is_accepted_as_the_options_type(data, name):
    value = data.draw(in_range(name))
    got = check_option(name, value)
    assert got == value and type(got) is (int if OPTION_RANGES[name][2] else float)


@FAST
@given(data=st.data(), name=st.sampled_from(NAMES))
def test_any_value_out_of_range_is_refused_naming_option_and_range(data, name):
    value = data.draw(out_of_range(name))
    with pytest.raises(ConfigError) as err:
        check_option(name, value)
    _names_option_and_range(err.value, name)


@FAST
@given(name=st.sampled_from(NAMES), value=WRONG_TYPES)
def test_values_of_the_wrong_type_are_refused(name, value):
    with pytest.raises(ConfigError) as err:
        check_option(name, value)
    _names_option_and_range(err.value, name)


@FAST
@given(name=st.sampled_from([n for n in NAMES if OPTION_RANGES[n][2]]), data=st.data())
def test_integer_options_refuse_fractions_and_accept_whole_floats(name, data):
    lo, hi, _, _ = OPTION_RANGES[name]
    value = data.draw(st.floats(lo, hi, allow_nan=False))
    if value.is_integer():
        assert check_option(name, value) == int(value)
    else:
        with pytest.raises(ConfigError) as err:
            check_option(name, value)
        _names_option_and_range(err.value, name)


@FAST
@given(name=st.sampled_from(NAMES), sign=st.sampled_from([-1, 1]), exponent=st.integers(20, 400))
def test_huge_and_negative_integers_never_overflow(name, sign, exponent):
    with pytest.raises(ConfigError) as err:
        check_option(name, sign * 10**exponent)
    _names_option_and_range(err.value, name)
    assert len(str(err.value)) < 200  # the value is shortened, not printed in full


def test_zero_and_negative_values_where_the_range_excludes_them():
    for name in NAMES:
        lo = OPTION_RANGES[name][0]
        for value in (0, -1, -0.5, -1e-9):
            if value < lo:
                with pytest.raises(ConfigError, match=OPTION_RANGES[name][3]):
                    check_option(name, value)
    assert check_option("num_workers", 0) == 0 and check_option("threshold", 0.0) == 0.0


# ----------------------------------------------------------------------------------------- config objects
@FAST
@given(data=st.data())
def test_configs_accept_any_in_range_settings_and_round_trip(data):
    values = {n: data.draw(in_range(n)) for n in EXTRACTION_FIELDS}
    tissue = {n: data.draw(in_range(n)) for n in TISSUE_FIELDS}
    flags = {k: data.draw(st.booleans()) for k in ("exclude_pen", "keep_best")}
    cfg = ExtractionConfig(**values, tissue=TissueConfig(**tissue, **flags))
    assert {n: getattr(cfg, n) for n in EXTRACTION_FIELDS} == values
    assert ExtractionConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(**{f"tissue_{k}": v for k, v in tissue.items()}) == cfg


@FAST
@given(data=st.data(), name=st.sampled_from(EXTRACTION_FIELDS + TISSUE_FIELDS))
def test_configs_refuse_a_bad_value_in_any_field(data, name):
    value = data.draw(out_of_range(name) | WRONG_TYPES)
    assume(not (value is None and name in ("mpp", "threshold")))  # None means "not given" for these two
    with pytest.raises(ConfigError) as err:
        if name in TISSUE_FIELDS:
            TissueConfig(**{name: value})
        else:
            ExtractionConfig(**{name: value})
    _names_option_and_range(err.value, name)
    with pytest.raises(ConfigError):  # the same through replace() and from_dict()
        ExtractionConfig().replace(**{(f"tissue_{name}" if name in TISSUE_FIELDS else name): value})
    with pytest.raises(ConfigError):
        ExtractionConfig.from_dict({"tissue": {name: value}} if name in TISSUE_FIELDS else {name: value})


@FAST
@given(key=st.text(min_size=1, max_size=12).filter(
    lambda k: k not in ExtractionConfig.__dataclass_fields__ and k not in TissueConfig.__dataclass_fields__
    and not k.startswith("tissue_")),
       value=st.integers() | st.text(max_size=5))
def test_unknown_option_names_are_refused_by_name(key, value):
    for build in (lambda: ExtractionConfig.from_dict({key: value}), lambda: ExtractionConfig().replace(**{key: value}),
                  lambda: ExtractionConfig(tissue={key: value})):
        with pytest.raises(ConfigError, match="unknown"):
            build()


@FAST
@given(method=st.text(max_size=12) | WRONG_TYPES, reader=st.text(max_size=12) | WRONG_TYPES,
       flag=st.sampled_from(["exclude_pen", "keep_best"]), flag_value=st.integers() | st.text(max_size=4) | st.none())
def test_choices_and_switches_refuse_anything_else(method, reader, flag, flag_value):
    assume(method not in ("combined", "saturation", "otsu") and reader not in ("threads", "processes"))
    with pytest.raises(ConfigError, match="--tissue-method"):
        TissueConfig(method=method)
    with pytest.raises(ConfigError, match="--reader"):
        ExtractionConfig(reader_mode=reader)
    with pytest.raises(ConfigError, match=flag):
        TissueConfig(**{flag: flag_value})


# --------------------------------------------------------------------------------------- the command line
def _parse_extract(capsys, flag: str, text: str) -> tuple[int | None, str]:
    capsys.readouterr()
    try:
        rc = main(["extract", "slide.svs", "--out", "never-made", f"{flag}={text}"])
    except SystemExit as stop:
        rc = stop.code
    return rc, capsys.readouterr().err


@FAST
@given(flag=st.sampled_from(sorted(CLI_FLAGS)), data=st.data())
def test_cli_refuses_bad_option_text_at_parse_time_with_one_line(capsys, flag, data):
    name = CLI_FLAGS[flag]
    text = data.draw(out_of_range(name).map(repr) | st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=12))
    try:
        check_option(name, float(text))
        assume(False)  # a valid number: not what this test is about
    except (ValueError, OverflowError, SlideChatError):
        pass
    rc, err = _parse_extract(capsys, flag, text)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: slidechat extract: argument " + flag) and _range_text(name) in lines[0]


@FAST
@given(flag=st.sampled_from(sorted(CLI_FLAGS)), data=st.data())
def test_cli_accepts_any_in_range_option_text(capsys, flag, data):
    from slidechat.cli import build_parser

    name = CLI_FLAGS[flag]
    value = data.draw(in_range(name))
    args = build_parser(only="extract").parse_args(["extract", "s.svs", "--out", "o", f"{flag}={value!r}"])
    assert getattr(args, flag.lstrip("-").replace("-", "_")) == value
