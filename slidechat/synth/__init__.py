"""SynthSlide: H&E-like pyramidal TIFFs with known tissue classes, lesion and text ground truth."""

from slidechat.synth.classes import TISSUE_CLASSES
from slidechat.synth.dataset import SIZES, generate_dataset

__all__ = ["TISSUE_CLASSES", "SIZES", "generate_dataset"]
