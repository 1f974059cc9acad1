"""Per-slide feature files: TRIDENT/CLAM-compatible ``.h5`` and SlideChat's feature ``.csv``.

An ``.h5`` holds dataset ``features`` float32 [N, D], dataset ``coords`` int64 [N, 2] (level-0 x, y of each
patch's top-left corner) and attributes (patch_size, patch_size_level0, target_mpp, encoder, slide_id,
slide_sha256, ...). SlideChat's released CSVs hold one row per patch whose first 512 columns are CONCH features.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slidechat.errors import DataError
from slidechat.utils.io import atomic_path

REQUIRED_ATTRS = ("patch_size", "patch_size_level0", "target_mpp", "encoder", "slide_id", "slide_sha256")
SLIDECHAT_CSV_DIM = 512


@dataclass
class SlideFeatures:
    """Patch features of one slide. ``coords`` is None for sources without positions (SlideChat CSVs)."""

    features: np.ndarray
    coords: np.ndarray | None
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def slide_id(self) -> str:
        if self.attrs.get("slide_id"):
            return str(self.attrs["slide_id"])
        return self.path.stem if self.path is not None else ""


def _attr_value(value: Any) -> Any:
    """h5py returns numpy scalars/bytes; turn them into plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def write_features_h5(
    path: str | os.PathLike,
    features: np.ndarray,
    coords: np.ndarray | None,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write ``features`` [N, D] (float32) and ``coords`` [N, 2] (int64) with ``attrs`` atomically."""
    import h5py

    path = Path(path)
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise DataError(f"features must be a 2-D array [N, D], got shape {features.shape}")
    if coords is not None:
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        if coords.shape[0] != features.shape[0]:
            raise DataError(f"{coords.shape[0]} coords for {features.shape[0]} feature rows")
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("features", data=features)
            if coords is not None:
                fh.create_dataset("coords", data=coords)
            for key, value in (attrs or {}).items():
                if value is None:
                    continue
                fh.attrs[key] = value
    return path


def _load_h5(path: Path) -> SlideFeatures:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            if "features" not in fh:
                raise DataError(f"{path}: no 'features' dataset; is this a TRIDENT/CLAM feature file?")
            features = np.asarray(fh["features"][()], dtype=np.float32)
            # CLAM stores [1, N, D] in some versions
            if features.ndim == 3 and features.shape[0] == 1:
                features = features[0]
            coords = None
            if "coords" in fh:
                coords = np.asarray(fh["coords"][()]).reshape(-1, 2).astype(np.int64)
            attrs = {k: _attr_value(v) for k, v in fh.attrs.items()}
            if "coords" in fh:
                # CLAM/TRIDENT keep patch_size/patch_level on the coords dataset
                for k, v in fh["coords"].attrs.items():
                    attrs.setdefault(k, _attr_value(v))
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 feature file ({exc}); re-run `slidechat extract`") from exc
    if features.ndim != 2:
        raise DataError(f"{path}: 'features' has shape {features.shape}, expected [N, D]")
    if coords is not None and coords.shape[0] != features.shape[0]:
        raise DataError(f"{path}: {coords.shape[0]} coords for {features.shape[0]} features")
    return SlideFeatures(features=features, coords=coords, attrs=attrs, path=path)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_csv(path: Path) -> SlideFeatures:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            first = next(csv.reader(fh), None)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a feature CSV (text with comma-separated numbers): {exc}") from exc
    if not first:
        raise DataError(f"{path}: empty feature CSV")
    cells = [c.strip() for c in first]
    # pandas writes column names; SlideChat's files are read with a header row ("0,1,...,511" or names)
    has_header = not all(_is_number(c) for c in cells if c) or cells[: min(4, len(cells))] == [
        str(i) for i in range(min(4, len(cells)))
    ]
    header = [c.strip() for c in first] if has_header else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy warns about an empty table; we say it below
            table = np.loadtxt(path, delimiter=",", skiprows=1 if has_header else 0, dtype=np.float64, ndmin=2)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: feature CSV has non-numeric cells ({exc})") from exc
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise DataError(f"{path}: feature CSV has a header but no patch rows")
    if header is not None and table.shape[1] != len(header):
        raise DataError(f"{path}: feature CSV rows have {table.shape[1]} values but the header names {len(header)}")
    coords = None
    if header is not None:
        lower = [h.lower() for h in header]
        for xs, ys in (("x", "y"), ("coord_x", "coord_y"), ("coords_x", "coords_y")):
            if xs in lower and ys in lower:
                coords = table[:, [lower.index(xs), lower.index(ys)]].astype(np.int64)
                keep = [i for i in range(table.shape[1]) if i not in (lower.index(xs), lower.index(ys))]
                table = table[:, keep]
                break
        # a leading unnamed index column written by pandas
        if lower and lower[0] in ("", "unnamed: 0") and table.shape[1] > SLIDECHAT_CSV_DIM:
            table = table[:, 1:]
    if table.shape[1] == 0:
        raise DataError(f"{path}: feature CSV has coordinates but no feature columns")
    features = table[:, :SLIDECHAT_CSV_DIM].astype(np.float32)
    attrs = {"slide_id": path.stem, "encoder": "conch" if features.shape[1] == SLIDECHAT_CSV_DIM else "unknown",
             "source_format": "slidechat-csv"}
    return SlideFeatures(features=features, coords=coords, attrs=attrs, path=path)


def load_features(path: str | os.PathLike) -> SlideFeatures:
    """Read our/TRIDENT/CLAM ``.h5`` or a SlideChat feature ``.csv`` into a SlideFeatures."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return _load_h5(path)
    if suffix == ".csv":
        return _load_csv(path)
    raise DataError(f"{path}: unknown feature file type {suffix!r}; expected .h5 or .csv")


def is_complete_features_h5(path: str | os.PathLike, expected: dict[str, Any] | None = None) -> bool:
    """True when ``path`` is a readable feature .h5 with all required attrs (and matching ``expected`` attrs)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        feats = _load_h5(path)
    except DataError:
        return False
    if any(k not in feats.attrs for k in REQUIRED_ATTRS) or feats.coords is None:
        return False
    for key, value in (expected or {}).items():
        have = feats.attrs.get(key)
        if isinstance(value, float) or isinstance(have, float):
            try:
                if abs(float(have) - float(value)) > 1e-6:
                    return False
            except (TypeError, ValueError):
                return False
        elif have != value:
            return False
    return True
