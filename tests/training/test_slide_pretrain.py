"""Slide pre-training (training/slide_pretrain.py): concept heads learn SynthSlide facts from real extracted features."""

from __future__ import annotations

import torch

from slidechat.model.assistant import SlideAssistant
from slidechat.training.slide_pretrain import (SlidePretrainConfig, SYNTH_CONCEPT_TARGETS, AttributeHeads, _batch_loss,
                                     load_slides, pretrain_slide_encoder)
from slidechat.training.synth_data import write_grounding_targets

CONCEPTS = [{"name": "present_tumor", "words": ["tumour", "absent"]},
            {"name": "fragments", "words": ["1", "2", "3", "4"]},
            {"name": "lesion_row", "words": ["upper", "lower", "none"]}]


def test_concept_heads_learn_the_training_slides(synth_dataset, tiny_model_config, tmp_path):
    from slidechat.encoders import load_encoder
    from slidechat.features.extract import extract_many
    from slidechat.slide.config import ExtractionConfig

    feats_dir = tmp_path / "features"
    extract_many([str(synth_dataset / "slides")], load_encoder("demo-cnn"), feats_dir, ExtractionConfig(num_workers=0))
    assert write_grounding_targets(synth_dataset, feats_dir, tmp_path / "grounding") == 4
    cfg = tiny_model_config(feature_dim=64)
    cfg.encoder.layout_grid = 8
    cfg.qformer.concepts = CONCEPTS
    torch.manual_seed(0)
    model = SlideAssistant(cfg, device="cpu")
    data = load_slides(synth_dataset, feats_dir, tmp_path / "grounding")
    assert len(data) == 4 and all(g is not None for (_, _, g), _ in data)
    pc = SlidePretrainConfig(epochs=40, batch_size=4, lr=3e-3, keep_min=1.0, augment=False, grounding_weight=0.2)

    def loss_now() -> float:
        heads = AttributeHeads(model.num_slide_tokens, model.llm.get_input_embeddings().weight.shape[1])
        with torch.no_grad():
            loss, _, _ = _batch_loss(model, heads, [d[0] for d in data], [d[1] for d in data], pc, False,
                                     torch.Generator().manual_seed(0))
        return float(loss)

    truth = [SYNTH_CONCEPT_TARGETS["fragments"](a) for _, a in data]
    before = loss_now()
    metrics = pretrain_slide_encoder(model, synth_dataset, feats_dir, tmp_path / "grounding", pc, val_data=data,
                                     output_dir=tmp_path / "pretrain")
    acc = metrics["held_out_attribute_accuracy"]  # scored on the training slides here: memorised
    assert acc["concept_present_tumor"] == 1.0 and acc["concept_fragments"] == 1.0 and acc["concept_lesion_row"] == 1.0
    assert loss_now() < before
    assert (tmp_path / "pretrain" / "final" / "config.json").is_file() and metrics["steps"] == 40
    model.eval()
    with torch.no_grad():
        _, proj = model.encode_features([d[0][0] for d in data], [d[0][1] for d in data])
    assert proj.concept_logits["fragments"].argmax(1).tolist() == truth
    model.save_pretrained(tmp_path / "ck")
    loaded = SlideAssistant.from_pretrained(tmp_path / "ck", device="cpu").eval()
    with torch.no_grad():
        _, proj2 = loaded.encode_features([d[0][0] for d in data], [d[0][1] for d in data])
    assert torch.allclose(proj2.tokens[0], proj.tokens[0], atol=1e-5)
