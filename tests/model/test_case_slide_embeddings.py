"""Case slide embeddings: a learned vector per slide position added to a case's slide tokens (never to a single
slide's), saved with the checkpoint, added by a training stage to a checkpoint that lacks it, and read by the
conversation, on the tiny random Q-Former model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slidechat.errors import CheckpointError, ConfigError
from slidechat.features.store import SlideFeatures
from slidechat.inference.pipeline import SlideChat
from slidechat.model.assistant import WEIGHTS_NAME, SlideAssistant
from slidechat.model.processor import SLIDE_TOKEN_ID

pytestmark = pytest.mark.usefixtures("single_torch_thread")
PS = 256


def _slide(side: int, seed: int) -> SlideFeatures:
    rng = np.random.default_rng(seed)
    gy, gx = np.divmod(np.arange(side * side), side)
    return SlideFeatures(features=rng.standard_normal((side * side, 32)).astype(np.float32),
                         coords=np.stack([gx, gy], 1).astype(np.int64) * PS,
                         attrs={"slide_id": f"s{seed}", "slide_sha256": f"pos-{side}-{seed}", "patch_size_level0": PS,
                                "slide_width": side * PS, "slide_height": side * PS})


@pytest.fixture
def model(tiny_model_config):
    torch.manual_seed(0)
    m = SlideAssistant(tiny_model_config(case_slide_embeddings=3), device="cpu").eval()
    with torch.no_grad():
        m.case_slide_embedding.weight.normal_(0, 1.0)
    return m


def test_new_slide_vectors_start_at_zero(tiny_model_config):
    m = SlideAssistant(tiny_model_config(case_slide_embeddings=4), device="cpu")
    assert tuple(m.case_slide_embedding.weight.shape) == (4, m.llm.get_input_embeddings().weight.shape[1])
    assert not m.case_slide_embedding.weight.any()
    with pytest.raises(ConfigError, match="case_slide_embeddings"):
        tiny_model_config(case_slide_embeddings=-1)


def test_each_case_slide_gets_its_position_vector_and_a_single_slide_none(model):
    w = model.case_slide_embedding.weight
    tokens = [torch.randn(5, w.shape[1]) for _ in range(4)]
    marked = model.mark_case_slides(tokens)
    for i in range(3):
        assert torch.allclose(marked[i], tokens[i] + w[i])
    assert torch.equal(marked[3], tokens[3])  # beyond the table: as it was
    assert torch.equal(model.mark_case_slides(tokens[:1])[0], tokens[0])
    # the LLM's input: the second slide's rows are its tokens plus vector 2; a single slide's rows are unchanged
    ids = torch.tensor([[1, SLIDE_TOKEN_ID, 2, SLIDE_TOKEN_ID, 3], [1, SLIDE_TOKEN_ID, 2, 3, 3]])
    embeds, mask, _ = model.build_inputs_embeds(ids, [tokens[:2], tokens[0]])
    assert torch.allclose(embeds[0, 7:12], tokens[1] + w[1]) and torch.allclose(embeds[0, 1:6], tokens[0] + w[0])
    assert torch.allclose(embeds[1, 1:6], tokens[0])


def test_the_conversation_reads_the_marked_tokens(model):
    chat = SlideChat(model)
    a, b = _slide(5, 1), _slide(4, 2)
    conv = chat.chat([a, b])
    ids = conv.prompt_ids([{"role": "user", "content": "Which slide shows the lesion?"}])
    emb = conv._embed(ids, 0, ids)
    spans = conv.slide_spans(ids)
    w = model.case_slide_embedding.weight
    for i, (s, e) in enumerate(spans):
        assert torch.allclose(emb[s:e], conv.states[i].tokens + w[i], atol=1e-6)
    single = chat.chat(a)
    one = single.prompt_ids([{"role": "user", "content": "Describe."}])
    (s, e), = single.slide_spans(one)
    assert torch.allclose(single._embed(one, 0, one)[s:e], single.state.tokens)
    # the vectors change what the LLM reads, so they change its answer's scores
    with torch.no_grad():
        before = model.llm(inputs_embeds=emb[None]).logits[0, -1]
        model.case_slide_embedding.weight.zero_()
        zero = chat.chat([a, b])
        after = model.llm(inputs_embeds=zero._embed(ids, 0, ids)[None]).logits[0, -1]
    assert not torch.allclose(before, after)


def test_checkpoints_keep_the_vectors_and_older_ones_load_without(model, tiny_model_config, tmp_path):
    model.save_pretrained(tmp_path / "with")
    back = SlideAssistant.from_pretrained(tmp_path / "with", device="cpu")
    assert back.config.case_slide_embeddings == 3
    assert torch.equal(back.case_slide_embedding.weight, model.case_slide_embedding.weight)
    SlideAssistant(tiny_model_config(), device="cpu").save_pretrained(tmp_path / "older")
    older = SlideAssistant.from_pretrained(tmp_path / "older", device="cpu")
    assert older.case_slide_embedding is None and older.config.case_slide_embeddings == 0
    # a config that promises vectors the weights lack is a clear error, not silent zeros
    cfg = json.loads((tmp_path / "older" / "config.json").read_text())
    (tmp_path / "older" / "config.json").write_text(json.dumps({**cfg, "case_slide_embeddings": 2}))
    with pytest.raises(CheckpointError, match="lack case_slide_embedding"):
        SlideAssistant.from_pretrained(tmp_path / "older", device="cpu")
    assert (tmp_path / "with" / WEIGHTS_NAME).is_file()


def test_a_stage_adds_the_vectors_to_a_checkpoint_and_trains_only_them_and_lora(tiny_model_config, tmp_path):
    from slidechat.training import model_hooks
    from slidechat.training.loop import _param_groups
    from slidechat.training.recipe import StageRecipe, TrainConfig

    torch.manual_seed(0)
    SlideAssistant(tiny_model_config(mode="lora"), device="cpu").save_pretrained(tmp_path / "prev")
    recipe = StageRecipe(name="pos", stage=2, init_from=str(tmp_path / "prev"),
                         model={"llm": {"mode": "lora"}, "case_slide_embeddings": 4},
                         train=TrainConfig(train_modules=["case_slide_embedding"], lr=1e-4, lr_llm=1e-2))
    m = model_hooks.build_model(recipe)
    assert m.config.case_slide_embeddings == 4 and not m.case_slide_embedding.weight.any()
    model_hooks.configure_trainable(m, recipe)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "case_slide_embedding.weight" in trainable
    assert all(n == "case_slide_embedding.weight" or "lora_" in n for n in trainable)
    groups = _param_groups(m, recipe.train)
    assert any(g["lr"] == 1e-2 and any(p is m.case_slide_embedding.weight for p in g["params"]) for g in groups)
    # one step on a two-slide conversation moves the vectors of slides 1 and 2 only
    row = m.tokenize_conversation([{"role": "user", "content": "Which slide?"},
                                   {"role": "assistant", "content": "Slide 2"}], num_slides=2)
    a, b = _slide(4, 3), _slide(3, 4)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    loss = m(row["input_ids"][None], None, row["labels"][None],
             slide_features=[[torch.from_numpy(a.features), torch.from_numpy(b.features)]],
             slide_coords=[[torch.from_numpy(a.coords), torch.from_numpy(b.coords)]]).loss
    loss.backward()
    opt.step()
    moved = m.case_slide_embedding.weight.detach().abs().sum(dim=1)
    assert moved[0] > 0 and moved[1] > 0 and moved[2] == 0 and moved[3] == 0
    # the checkpoint already has them: the recipe may not ask for another table
    m.save_pretrained(tmp_path / "next")
    again = StageRecipe(name="pos2", stage=2, init_from=str(tmp_path / "next"),
                        model={"llm": {"mode": "lora"}, "case_slide_embeddings": 8})
    with pytest.raises(ConfigError, match="already has 4 case slide embeddings"):
        model_hooks.build_model(again)
    same = StageRecipe(name="pos3", stage=2, init_from=str(tmp_path / "next"),
                       model={"llm": {"mode": "lora"}, "case_slide_embeddings": 4})
    assert torch.equal(model_hooks.build_model(same).case_slide_embedding.weight, m.case_slide_embedding.weight)
