"""``slidechat.load``: the embedded demo checkpoint, an untrained demo model, or a checkpoint folder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from slidechat.errors import CheckpointError
from slidechat.inference.pipeline import SlideChat
from slidechat.model.assistant import SlideAssistant
from slidechat.model.config import PatchEncoderRef, SlideAssistantConfig, SlideEncoderConfig

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
UNTRAINED_NAMES = ("demo-untrained", "untrained")


def demo_untrained_config(feature_dim: int | None = None) -> SlideAssistantConfig:
    """Default config: SmolLM2-135M (frozen), the demo CNN patch encoder, random slide encoder + Q-Former."""
    if feature_dim is None:
        feature_dim = 512
        try:
            from slidechat.encoders import load_encoder

            feature_dim = int(load_encoder("demo-cnn").embed_dim)
        except Exception as exc:  # the demo CNN without weights may not be loadable; 512 = CONCH / SlideChat CSVs
            log.debug("demo-cnn unavailable (%s); feature_dim=512", exc)
    return SlideAssistantConfig(encoder=SlideEncoderConfig(feature_dim=feature_dim),
                                patch_encoder=PatchEncoderRef(name="demo-cnn"))


def load(name_or_path: str = "demo", device: str | torch.device | None = None, **kwargs) -> SlideChat:
    """Load a model as a ``SlideChat`` (``encode_slide`` / ``chat`` / ``report``; ``.model`` is the SlideAssistant).

    - ``"demo"``: the embedded checkpoint in ``slidechat/assets/demo/`` (written by the training recipe);
    - ``"demo-untrained"``: the default architecture with SmolLM2 and *random* (seeded) encoder/projector weights,
      so the app and CLI run before a checkpoint exists (answers are not about the slide);
    - a checkpoint folder (``save_pretrained`` / ``slidechat train`` output).
    Extra keyword arguments go to ``SlideAssistant.from_pretrained`` (e.g. ``llm_overrides``).
    """
    if name_or_path == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise CheckpointError(
                f"the embedded demo checkpoint is not there yet ({DEMO_DIR}); train it with the demo recipe "
                "(`slidechat train`), pass a checkpoint folder, or use slidechat.load('demo-untrained') for an "
                "untrained model that runs end to end")
        return SlideChat(SlideAssistant.from_pretrained(DEMO_DIR, device=device, **kwargs))
    if name_or_path in UNTRAINED_NAMES:
        config = kwargs.pop("config", None) or demo_untrained_config()
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            return SlideChat(SlideAssistant(config, device=device, **kwargs).eval())
        finally:
            torch.random.set_rng_state(state)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; give a folder with config.json + model.safetensors, "
                              "'demo', or 'demo-untrained'")
    return SlideChat(SlideAssistant.from_pretrained(path, device=device, **kwargs))
