"""Inference on a tiny random LLM: streaming, KV reuse, heatmaps, reports, encode_slide caching, load(), the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slidechat
from slidechat.errors import CheckpointError, DataError, SlideChatError
from slidechat.features.store import SlideFeatures, write_features_h5
from slidechat.inference.conversation import Conversation
from slidechat.inference.report import parse_answers, parse_location, parse_percent, parse_yes_no
from slidechat.inference import SlideChat
from slidechat.model import SLIDE_TOKEN_ID, SlideAssistant

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _features(n: int, dim: int = 32, coords: bool = True, seed: int = 0) -> SlideFeatures:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n * 1.5)))
    cells = rng.permutation(side * side)[:n]
    xy = np.stack([cells % side, cells // side], 1).astype(np.int64) * 256 if coords else None
    return SlideFeatures(features=rng.standard_normal((n, dim)).astype(np.float32), coords=xy,
                         attrs={"slide_id": f"s{n}", "slide_sha256": f"sha{n}-{seed}", "patch_size_level0": 256})


@pytest.fixture(scope="module")
def assistant(tiny_qformer_chat):
    return tiny_qformer_chat


QUESTIONS = ["Which tissue types are present?", "Is there a focal lesion?", "Write a short pathology report."]


def test_streamed_answer_equals_non_streamed(assistant):
    slide = _features(200)
    pieces = list(assistant.chat(slide).ask(QUESTIONS[0], stream=True, max_new_tokens=24))
    assert len(pieces) > 1  # really streamed piece by piece
    whole = assistant.chat(slide).ask(QUESTIONS[0], max_new_tokens=24)
    assert "".join(pieces) == whole and whole


def test_kv_reuse_equals_recomputation(assistant):
    slide = _features(300)
    reuse, fresh = assistant.chat(slide), assistant.chat(slide, kv_reuse=False)
    prefill_reuse, prefill_fresh = [], []
    for q in QUESTIONS:
        assert reuse.ask(q, max_new_tokens=16) == fresh.ask(q, max_new_tokens=16)
        prefill_reuse.append(reuse.last_prefill_tokens)
        prefill_fresh.append(fresh.last_prefill_tokens)
    assert reuse.messages == fresh.messages and len(reuse.messages) == 6
    assert all(m["content"] for m in reuse.messages)  # real answers, not immediate end-of-turn
    assert prefill_reuse[0] == prefill_fresh[0]
    assert prefill_reuse[1] < prefill_fresh[1] // 2 and prefill_reuse[2] < prefill_fresh[2] // 2
    # the KV cache covers everything said so far
    assert reuse._cache.get_seq_length() == len(reuse._fed)


def test_second_turn_cost_does_not_depend_on_slide_size(assistant):
    counts = []
    for n in (50, 3000):
        conv = assistant.chat(_features(n, seed=1))
        conv.ask(QUESTIONS[0], max_new_tokens=4)
        conv.ask(QUESTIONS[1], max_new_tokens=4)
        counts.append(conv.last_prefill_tokens)
    assert counts[0] == counts[1]


def test_reset_and_empty_question(assistant):
    conv = assistant.chat(_features(100))
    conv.ask(QUESTIONS[0], max_new_tokens=4)
    conv.reset()
    assert conv.messages == [] and conv._cache is None
    with pytest.raises(SlideChatError):
        conv.ask("   ")


def test_heatmap_scores_coords_and_region_mapping(assistant):
    slide = _features(400)
    conv = assistant.chat(slide)
    conv.ask(QUESTIONS[1], max_new_tokens=6)
    heat = conv.heatmap()
    assert heat.scores.shape == (400,) and heat.coords.shape == (400, 2)
    assert heat.scores.min() == 0.0 and heat.scores.max() == 1.0
    assert np.array_equal(heat.coords, slide.coords) and heat.patch_size_level0 == 256
    # the map equals cross-attention (mean over layers/heads/queries) with region mass spread over member patches
    st = conv.state
    rel = st.output.cross_attentions[0][0, 0].mean(0)
    n, enc = 400, st.encoding
    manual = rel[:n] + (rel[n:n + enc.num_regions] / enc.region_sizes)[enc.region_index]
    manual = (manual - manual.min()) / (manual.max() - manual.min())
    assert np.allclose(heat.scores, manual.numpy(), atol=1e-5)
    weighted = conv.heatmap(weighting="llm")
    assert weighted.scores.shape == (400,) and not np.allclose(weighted.scores, heat.scores)
    assert assistant.llm.config._attn_implementation == "sdpa"  # the shared model is never switched


def test_heatmap_without_coords_and_for_linear_projector(assistant, tiny_model_config):
    conv = assistant.chat(_features(90, coords=False))
    conv.ask(QUESTIONS[0], max_new_tokens=3)
    heat = conv.heatmap()
    assert not heat.has_coords and heat.coords[:, 0].max() == 9 * 256  # raster width ceil(sqrt(90)) = 10
    torch.manual_seed(0)
    linear = SlideChat(SlideAssistant(tiny_model_config(projector="linear"), device="cpu"))
    conv = linear.chat(_features(70))
    conv.ask(QUESTIONS[0], max_new_tokens=3)
    heat = conv.heatmap()
    assert heat.scores.shape == (70,) and heat.scores.max() == 1.0


def test_report_fields_and_markdown(assistant):
    report = assistant.report(_features(120), max_new_tokens=6, summary_max_new_tokens=8)
    assert set(report.raw_answers) == {"tissue_types", "dominant_tissue", "lesion_present", "lesion_type",
                                       "lesion_location", "tumor_fraction_bin", "tumor_fraction_percent", "summary"}
    assert {"tissue_types", "lesion_present", "tumor_fraction_percent", "summary"} <= set(report.fields)
    assert report.text.startswith("TISSUE TYPES:") and report.to_markdown().startswith("## Slide report: s120")


def test_report_answer_parsing():
    fields = parse_answers({
        "tissue_types": "Fibrous stroma, adipose tissue and a carcinoma.", "dominant_tissue": "Mostly stroma.",
        "lesion_present": "Yes.", "lesion_type": "A lymphoid aggregate.", "lesion_location": "Top right.",
        "tumor_fraction_percent": "About 12 %", "summary": " A slide. "})
    assert fields["tissue_types"] == ["fibrous stroma", "adipose tissue", "tumour"]
    assert fields["dominant_tissue"] == "fibrous stroma" and fields["lesion_present"] is True
    assert fields["lesion_type"] == "lymphoid aggregate" and fields["lesion_location"] == "upper-right"
    assert fields["tumor_fraction_percent"] == 12.0 and fields["tumor_present"] and fields["summary"] == "A slide."
    assert fields["necrosis_present"] is False
    no = parse_answers({"lesion_present": "No focal lesion is identified.", "lesion_type": "carcinoma"})
    assert no["lesion_present"] is False and no["lesion_type"] is None
    assert parse_yes_no("maybe") is None and parse_location("somewhere") is None
    assert parse_percent("0.35") == 35.0 and parse_percent("none") == 0.0 and parse_percent("n/a") is None


def test_encode_slide_feature_files(assistant, tmp_path):
    f = _features(50)
    write_features_h5(tmp_path / "a.h5", f.features, f.coords,
                      {"patch_size": 256, "patch_size_level0": 256, "target_mpp": 0.5, "encoder": "x",
                       "slide_id": "a", "slide_sha256": "abc"})
    enc = assistant.encode_slide(tmp_path / "a.h5")
    assert enc.slide_id == "a" and enc.sha256 == "abc" and enc.h5_path == tmp_path / "a.h5"
    assert enc.num_patches == 50 and enc.patch_size_level0 == 256
    csv = tmp_path / "b.csv"
    rows = ",".join(str(i) for i in range(512)) + "\n" + "\n".join(
        ",".join(f"{v:.4f}" for v in row) for row in np.random.default_rng(0).standard_normal((20, 512)))
    csv.write_text(rows + "\n")
    enc_csv = assistant.encode_slide(csv)
    assert enc_csv.features.coords is None and enc_csv.num_patches == 20
    with pytest.raises(DataError, match="32"):  # SlideChat CSVs are 512-d; this model wants 32
        assistant.chat(enc_csv)
    with pytest.raises(SlideChatError):
        assistant.encode_slide(tmp_path / "missing.svs")


def test_encode_slide_file_extracts_once_and_caches(tiny_model_config, cmu_slide, tmp_path, monkeypatch):
    from slidechat.encoders import load_encoder
    from slidechat.model.config import PatchEncoderRef

    dim = load_encoder("demo-cnn").embed_dim
    cfg = tiny_model_config(feature_dim=dim)
    cfg.patch_encoder = PatchEncoderRef(name="demo-cnn", target_mpp=2.0, patch_size=224)
    torch.manual_seed(0)
    model = SlideChat(SlideAssistant(cfg, device="cpu"))
    stages = []
    enc = model.encode_slide(cmu_slide, cache_dir=tmp_path, progress=lambda s, d, t: stages.append(s))
    assert enc.h5_path.is_file() and enc.h5_path.parent.parent == tmp_path and enc.h5_path.stem == enc.sha256
    assert enc.num_patches > 0 and enc.features.coords is not None and "encoding" in stages
    import slidechat.features.extract as extract

    monkeypatch.setattr(extract, "extract_slide", lambda *a, **k: pytest.fail("re-extracted a cached slide"))
    again = model.encode_slide(cmu_slide, cache_dir=tmp_path)
    assert again.h5_path == enc.h5_path and again.num_patches == enc.num_patches
    answer = model.chat(again).ask("Which tissue types are present?", max_new_tokens=4)
    assert isinstance(answer, str)
    import slidechat.inference.encode as encode

    monkeypatch.setattr(encode, "sha256_file", lambda *a: pytest.fail("hashed a slide whose sha256 was given"))
    given = model.encode_slide(cmu_slide, cache_dir=tmp_path, sha256=enc.sha256)
    assert given.sha256 == enc.sha256 and given.h5_path == enc.h5_path


def test_load_errors(tmp_path):
    from slidechat.inference.api import DEMO_DIR

    if not (DEMO_DIR / "config.json").exists():
        with pytest.raises(CheckpointError, match="demo-untrained"):
            slidechat.load("demo")
    with pytest.raises(CheckpointError):
        slidechat.load(str(tmp_path / "nope"))


def test_cli_one_shot_and_interactive(assistant, tmp_path, monkeypatch, capsys):
    from slidechat.cli import main

    ck = assistant.save_pretrained(tmp_path / "ck")
    f = _features(60)
    h5 = tmp_path / "s.h5"
    write_features_h5(h5, f.features, f.coords, {"patch_size": 256, "patch_size_level0": 256, "target_mpp": 0.5,
                                                 "encoder": "x", "slide_id": "s", "slide_sha256": "s"})
    rc = main(["chat", "--checkpoint", str(ck), "--slide", str(h5), "-q", QUESTIONS[0], "-q", QUESTIONS[1],
               "--max-new-tokens", "5", "--heatmap", str(tmp_path / "heat.json")])
    out = capsys.readouterr().out
    assert rc == 0 and f"> {QUESTIONS[1]}" in out
    heat = json.loads((tmp_path / "heat.json").read_text())
    assert len(heat["scores"]) == 60 and max(heat["scores"]) == 1.0
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTIONS[0]}\n/reset\n{QUESTIONS[1]}\n\n"))
    rc = main(["chat", "--checkpoint", str(ck), "--slide", str(h5), "--max-new-tokens", "3", "--no-stream"])
    captured = capsys.readouterr()
    assert rc == 0 and "conversation reset" in captured.err
    assert main(["chat", "--checkpoint", str(tmp_path / "missing"), "--slide", str(h5)]) == 2


def test_conversation_accepts_encoded_or_raw(assistant):
    f = _features(40)
    conv = Conversation(assistant, f)
    assert conv.slide.slide_id == "s40" and conv.state.tokens.shape == (8, 64)


def test_slide_state_cache_follows_weights_and_content(assistant):
    f = _features(30)
    f.attrs.pop("slide_sha256")
    g = _features(30, seed=5)
    g.attrs.pop("slide_sha256")  # same slide_id, different content: must not share a cache entry
    a, b = assistant.chat(f), assistant.chat(g)
    assert a.slide.sha256 != b.slide.sha256 and not torch.equal(a.state.tokens, b.state.tokens)
    before = assistant.chat(f).state.tokens.clone()
    with torch.no_grad():
        assistant.projector.language_projection.bias.add_(1.0)  # like an optimizer step
    try:
        after = assistant.chat(f).state.tokens
        assert torch.allclose(after, before + 1.0, atol=1e-5)
    finally:
        with torch.no_grad():
            assistant.projector.language_projection.bias.sub_(1.0)


def test_checkpoint_embeds_patch_encoder_weights(tiny_model_config, tmp_path):
    from safetensors.torch import save_file

    from slidechat.model.config import PatchEncoderRef

    weights = tmp_path / "cnn.safetensors"
    save_file({"w": torch.ones(3)}, str(weights))
    cfg = tiny_model_config()
    cfg.patch_encoder = PatchEncoderRef(name="demo-cnn", weights=str(weights))
    model = SlideAssistant(cfg, device="cpu")
    ck = model.save_pretrained(tmp_path / "ck")
    assert (ck / "patch_encoder.safetensors").read_bytes() == weights.read_bytes()
    assert json.loads((ck / "config.json").read_text())["patch_encoder"]["weights"] == "patch_encoder.safetensors"
    loaded = SlideAssistant.from_pretrained(ck, device="cpu")
    assert loaded.patch_encoder_weights_path() == ck / "patch_encoder.safetensors"
    from slidechat.inference.encode import encoder_cache_key

    assert encoder_cache_key(loaded) == encoder_cache_key(model)  # same weights -> same feature cache


@pytest.mark.parametrize("projector,concepts", [("qformer", False), ("qformer", True), ("linear", False)])
def test_every_heatmap_weighting_for_every_projector_at_every_turn(tiny_model_config, projector, concepts):
    cfg = tiny_model_config(projector=projector)
    if concepts:
        cfg.qformer.concepts = [{"name": "lesion", "words": ["tumour", "necrosis", "absent"]},
                                {"name": "count", "words": ["1", "2"]}]
    torch.manual_seed(0)
    model = SlideChat(SlideAssistant(cfg, device="cpu"))
    conv = model.chat(_features(60))
    for turn in range(3):
        for weighting in ("uniform", "llm"):
            heat = conv.heatmap(weighting=weighting)
            assert heat.scores.shape == (60,) and heat.scores.max() == 1.0 and heat.scores.min() >= 0.0
        conv.ask(QUESTIONS[turn], max_new_tokens=3)


def test_llm_heatmap_runs_beside_other_sessions_without_touching_the_shared_model(assistant):
    """The LLM-weighted heatmap uses an eager view sharing the weights: concurrent answers are unchanged and the
    shared model keeps its attention implementation; its weights equal an eager run of the whole sequence."""
    import threading

    from slidechat.inference.heatmap import llm_attention_to_slide
    from slidechat.model.llm import base_model

    slide_a, slide_b = _features(80, seed=3), _features(90, seed=4)
    reference = assistant.chat(slide_b).ask(QUESTIONS[0], max_new_tokens=12)
    busy = assistant.chat(slide_a)
    busy.ask(QUESTIONS[1], max_new_tokens=4)
    errors, stop = [], threading.Event()

    def heatmaps():
        try:
            while not stop.is_set():
                busy.heatmap(weighting="llm")
        except Exception as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=heatmaps)
    worker.start()
    try:
        answers = [assistant.chat(slide_b).ask(QUESTIONS[0], max_new_tokens=12) for _ in range(3)]
    finally:
        stop.set()
        worker.join()
    assert not errors and answers == [reference] * 3
    assert base_model(assistant.llm).config._attn_implementation == "sdpa"
    # same numbers as running the whole sequence eagerly at once
    ids = busy.attended_ids()
    start, t = ids.index(SLIDE_TOKEN_ID), int(busy.state.tokens.shape[0])
    view = busy.cache.attention_view(assistant.llm)
    with torch.no_grad():
        out = view(inputs_embeds=busy._embed(ids, 0, ids)[None], output_attentions=True, use_cache=False)
    full = torch.stack([a[0].float().mean(0) for a in out.attentions]).mean(0)[start + t:, start:start + t].mean(0)
    assert torch.allclose(llm_attention_to_slide(busy), full, atol=1e-6)


def test_logits_processor_constrains_every_step_and_can_end_the_turn(tiny_qformer_chat):
    chat = tiny_qformer_chat
    slide = SlideFeatures(features=np.random.default_rng(5).standard_normal((20, 32)).astype(np.float32), coords=None,
                          attrs={"slide_id": "lp", "slide_sha256": "logits-processor"})
    target = chat.processor.tokenizer("yes no", add_special_tokens=False)["input_ids"]
    seen = []

    def only_target(generated, logits):
        seen.append(list(generated))
        out = torch.full_like(logits, float("-inf"))
        if len(generated) < len(target):
            out[target[len(generated)]] = 0.0
        return out  # all -inf after the target: the turn ends

    conv = chat.chat(slide, max_new_tokens=20)
    answer = conv.ask("Is there tumour?", logits_processor=only_target)
    assert answer == chat.processor.decode(target).strip()
    assert seen == [target[:i] for i in range(len(target) + 1)]
    assert conv.messages[-1] == {"role": "assistant", "content": answer}
