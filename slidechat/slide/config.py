"""``ExtractionConfig``: every setting of slide -> patches -> features, validated once, in one object.

The defaults (0.5 µm/px, 224-px patches, ...) are stated here and nowhere else. Every option has an allowed
range; a value outside it raises ConfigError naming the option and the range before any work starts. The
same checks back the CLI's argparse types (``option_type``), so ``--patch-size 0`` fails at parse time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

from slidechat.errors import ConfigError

DEFAULT_TARGET_MPP = 0.5  # µm/px of the patches (≈ 20x)
DEFAULT_PATCH_SIZE = 224  # px per patch side at the target mpp
DEFAULT_MIN_TISSUE = 0.25  # tissue fraction a patch needs to be kept
READER_MODES = ("threads", "processes")
TISSUE_METHODS = ("combined", "saturation", "otsu")

# option -> (lowest, highest, integer?, CLI flag). Ranges are inclusive.
OPTION_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "target_mpp": (0.05, 100.0, False, "--target-mpp"),
    "patch_size": (16, 4096, True, "--patch-size"),
    "batch_size": (1, 8192, True, "--batch-size"),
    "num_workers": (0, 64, True, "--num-workers"),
    "mpp": (0.01, 100.0, False, "--mpp"),
    "threshold": (0.0, 1.0, False, "--tissue-threshold"),
    "min_tissue": (0.001, 1.0, False, "--min-tissue"),
    "thumbnail_size": (64, 8192, True, "--thumbnail-size"),
    "lock_stale_after": (1.0, 7 * 86400.0, False, "--lock-stale-after"),  # seconds; not an ExtractionConfig field
}


def _range_text(name: str) -> str:
    lo, hi, integer, _ = OPTION_RANGES[name]
    kind = "an integer" if integer else "a number"
    return f"{kind} from {lo:g} to {hi:g}"


def check_option(name: str, value: Any) -> int | float:
    """``value`` (a number, not a bool or text) as the option's type, or ConfigError naming the option (its CLI
    flag) and the allowed range. NaN, infinities and, for integer options, fractions are rejected."""
    lo, hi, integer, flag = OPTION_RANGES[name]
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    kind = "" if isinstance(value, numbers.Real) and not isinstance(value, bool) else f" ({type(value).__name__})"
    bad = ConfigError(f"{flag} must be {_range_text(name)}, got {shown}{kind}")
    if kind:
        raise bad
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # an int too large for a float
        raise bad from None
    if not math.isfinite(number) or not lo <= number <= hi or (integer and not number.is_integer()):
        raise bad
    return int(number) if integer else number


def option_type(name: str) -> Callable[[str], int | float]:
    """An argparse ``type=`` function for option ``name`` that reads the text as a number and applies
    ``check_option`` at parse time."""

    def parse(text: str) -> int | float:
        try:
            return check_option(name, float(text))
        except (ConfigError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {_range_text(name)}, got {text!r}") from None

    return parse


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"tissue option {name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class TissueConfig:
    """Tissue detection and patch selection.

    ``method``: "combined" (saturation or stain optical density, pen marks and debris removed), "saturation"
    (saturation hysteresis alone), "otsu" (Otsu on grey level). ``threshold`` fixes the saturation threshold
    instead of choosing it per slide. A patch is kept when at least ``min_tissue`` of it is tissue; when tissue
    exists but no patch reaches that, ``keep_best`` keeps the best-covered patches instead of failing.
    """

    method: str = "combined"
    threshold: float | None = None
    min_tissue: float = DEFAULT_MIN_TISSUE
    thumbnail_size: int = 1024
    exclude_pen: bool = True
    keep_best: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in TISSUE_METHODS:
            raise ConfigError(f"--tissue-method must be one of {', '.join(TISSUE_METHODS)}, got {self.method!r}")
        _check_flag("exclude_pen", self.exclude_pen)
        _check_flag("keep_best", self.keep_best)
        if self.threshold is not None:
            object.__setattr__(self, "threshold", check_option("threshold", self.threshold))
        object.__setattr__(self, "min_tissue", check_option("min_tissue", self.min_tissue))
        object.__setattr__(self, "thumbnail_size", check_option("thumbnail_size", self.thumbnail_size))


@dataclass(frozen=True)
class ExtractionConfig:
    """Settings of one extraction run: resolution and size of the patches, tissue, reading and batching.

    ``mpp`` overrides the slide's own microns per pixel (for files without it). ``reader_mode``: "threads"
    (a thread pool in this process; default, faster) or "processes" (DataLoader worker processes);
    ``num_workers`` readers of either kind (0 = read in the calling thread).
    """

    target_mpp: float = DEFAULT_TARGET_MPP
    patch_size: int = DEFAULT_PATCH_SIZE
    batch_size: int = 64
    num_workers: int = 2
    reader_mode: str = "threads"
    mpp: float | None = None
    tissue: TissueConfig = field(default_factory=TissueConfig)

    def __post_init__(self) -> None:
        for name in ("target_mpp", "patch_size", "batch_size", "num_workers"):
            object.__setattr__(self, name, check_option(name, getattr(self, name)))
        if self.mpp is not None:
            object.__setattr__(self, "mpp", check_option("mpp", self.mpp))
        if not isinstance(self.reader_mode, str) or self.reader_mode not in READER_MODES:
            raise ConfigError(f"--reader must be one of {', '.join(READER_MODES)}, got {self.reader_mode!r}")
        if isinstance(self.tissue, dict):
            _check_known(self.tissue, TissueConfig, "tissue option")
            object.__setattr__(self, "tissue", TissueConfig(**self.tissue))
        elif not isinstance(self.tissue, TissueConfig):
            raise ConfigError(f"tissue must be a TissueConfig, got {type(self.tissue).__name__}")

    def replace(self, **changes: Any) -> "ExtractionConfig":
        """A copy with ``changes`` applied (and validated); ``tissue_<field>`` keys change tissue fields."""
        tissue = {k.removeprefix("tissue_"): changes.pop(k) for k in list(changes) if k.startswith("tissue_")}
        _check_known(changes, type(self), "extraction option")
        if tissue:
            _check_known(tissue, TissueConfig, "tissue option")
            changes["tissue"] = dataclasses.replace(changes.get("tissue", self.tissue), **tissue)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ExtractionConfig":
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"extraction options must be a mapping, got {type(data).__name__}")
        data = dict(data or {})
        _check_known(data, cls, "extraction option")
        return cls(**data)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ExtractionConfig":
        """The config from the options ``add_extraction_arguments`` added (already checked by argparse)."""
        tissue = TissueConfig(method=args.tissue_method, threshold=args.tissue_threshold,
                              min_tissue=args.min_tissue, exclude_pen=not args.keep_pen,
                              thumbnail_size=getattr(args, "thumbnail_size", TissueConfig.thumbnail_size))
        return cls(target_mpp=args.target_mpp, patch_size=args.patch_size, batch_size=args.batch_size,
                   num_workers=args.num_workers, reader_mode=args.reader, mpp=args.mpp, tissue=tissue)


def _check_known(options: dict, cls: type, what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(options) - known))
    if unknown:
        raise ConfigError(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def add_extraction_arguments(parser: argparse.ArgumentParser, *, with_mpp: bool = True) -> None:
    """The CLI options of ``ExtractionConfig`` (values checked at parse time by ``option_type``)."""
    d, t = ExtractionConfig(), TissueConfig()
    if with_mpp:
        parser.add_argument("--mpp", type=option_type("mpp"), default=None,
                            help="microns per pixel, for slides without it")
    parser.add_argument("--target-mpp", type=option_type("target_mpp"), default=d.target_mpp,
                        help=f"patch resolution in µm/px (default {d.target_mpp:g})")
    parser.add_argument("--patch-size", type=option_type("patch_size"), default=d.patch_size,
                        help=f"patch size in px at --target-mpp (default {d.patch_size})")
    parser.add_argument("--batch-size", type=option_type("batch_size"), default=d.batch_size,
                        help=f"patches per encoder batch (default {d.batch_size})")
    parser.add_argument("--num-workers", type=option_type("num_workers"), default=d.num_workers,
                        help=f"patch readers (default {d.num_workers}; 0 = the main thread)")
    parser.add_argument("--reader", choices=READER_MODES, default=d.reader_mode,
                        help=f"read patches with a thread pool or DataLoader worker processes (default {d.reader_mode})")
    parser.add_argument("--tissue-method", choices=TISSUE_METHODS, default=t.method,
                        help=f"tissue detector (default {t.method})")
    parser.add_argument("--tissue-threshold", type=option_type("threshold"), default=None,
                        help="fixed saturation threshold 0-1 for tissue (default: chosen per slide)")
    parser.add_argument("--min-tissue", type=option_type("min_tissue"), default=t.min_tissue,
                        help=f"tissue fraction a patch needs (default {t.min_tissue:g})")
    parser.add_argument("--keep-pen", action="store_true", help="do not remove pen marks from the tissue mask")
    parser.add_argument("--thumbnail-size", type=option_type("thumbnail_size"), default=t.thumbnail_size,
                        help=f"longer side in px of the thumbnail tissue is detected on (default {t.thumbnail_size})")
