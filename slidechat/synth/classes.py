"""Tissue classes of SynthSlide. Index 0 of a label map is glass (background); class i is TISSUE_CLASSES[i-1]."""

from __future__ import annotations

TISSUE_CLASSES: tuple[str, ...] = ("stroma", "normal_glands", "tumor", "necrosis", "lymphocytes", "fat")
BACKGROUND = "background"
LABEL_NAMES: tuple[str, ...] = (BACKGROUND, *TISSUE_CLASSES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(LABEL_NAMES)}

# how each class is named in generated text
DISPLAY_NAMES: dict[str, str] = {
    "stroma": "fibrous stroma",
    "normal_glands": "normal glands",
    "tumor": "tumour",
    "necrosis": "necrosis",
    "lymphocytes": "lymphocyte-rich infiltrate",
    "fat": "adipose tissue",
}

# classes that make up the background tissue of a slide, and classes a lesion can be
BASE_CLASSES: tuple[str, ...] = ("stroma", "normal_glands", "necrosis", "lymphocytes", "fat")
LESION_CLASSES: tuple[str, ...] = ("tumor", "necrosis", "lymphocytes")
LESION_DISPLAY: dict[str, str] = {
    "tumor": "carcinoma (tumour focus)",
    "necrosis": "necrotic focus",
    "lymphocytes": "lymphoid aggregate",
}

QUADRANTS: tuple[str, ...] = ("upper-left", "upper-right", "lower-left", "lower-right")
TUMOR_FRACTION_BINS: tuple[tuple[float, float, str], ...] = (
    (0.0, 0.0, "none (0%)"),
    (0.0, 0.10, "under 10%"),
    (0.10, 0.30, "10-30%"),
    (0.30, 1.01, "over 30%"),
)


def tumor_fraction_bin(fraction: float) -> str:
    """Name of the tumour-fraction bin that ``fraction`` (of tissue area) falls in."""
    if fraction <= 0.0:
        return TUMOR_FRACTION_BINS[0][2]
    for lo, hi, name in TUMOR_FRACTION_BINS[1:]:
        if lo < fraction <= hi or (lo == 0.0 and fraction <= hi):
            return name
    return TUMOR_FRACTION_BINS[-1][2]


# class key -> spellings a free-text answer may use (lower case; prefixes allowed)
TISSUE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "stroma": ("stroma", "fibrous", "connective"),
    "normal_glands": ("normal gland", "glands", "glandular"),
    "tumor": ("tumour", "tumor", "carcinoma", "malignan", "cancer"),
    "necrosis": ("necros", "necrotic"),
    "lymphocytes": ("lymphocyt", "lymphoid", "inflammat"),
    "fat": ("adipose", "fat"),
}
LESION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "tumor": ("carcinoma", "tumour", "tumor", "malignan", "cancer"),
    "necrosis": ("necros", "necrotic"),
    "lymphocytes": ("lymphoid", "lymphocyt", "aggregate"),
}


def spelling_vocabulary() -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """(tissue, lesion) vocabularies for reading answers: display name -> the spellings that name it."""
    tissues = {d: (d.lower(), k.replace("_", " "), *TISSUE_SYNONYMS.get(k, ())) for k, d in DISPLAY_NAMES.items()}
    lesions = {d: (d.lower(), k.replace("_", " "), *LESION_SYNONYMS.get(k, ())) for k, d in LESION_DISPLAY.items()}
    return tissues, lesions
