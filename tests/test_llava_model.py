"""The LLaVA model: assembled from a text model folder and a CLIP / SigLIP folder, exported as a HF LLaVA folder that
transformers' LlavaForConditionalGeneration and AutoProcessor load as they are, giving the logits training computes
(training runs the language model on input embeddings, the images' features scattered in)."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.model import llava


def _image(colour="red", size=(40, 30)):
    from PIL import Image

    return Image.new("RGB", size, colour)


def _assembled(llm_dir, vision_dir, strategy="default"):
    from tunelab.model.load import load_causal_lm
    from tunelab.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(llm_dir))
    image_id = llava.add_image_token(tokenizer)
    llm = load_causal_lm(str(llm_dir), dtype=torch.float32, device="cpu")
    llava.resize_for_image_token(llm, image_id)
    tower = llava.load_vision_tower(vision_dir, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    model = llava.assemble(llm, tower, image_token_id=image_id, select_strategy=strategy)
    return model.eval(), tokenizer, llava.load_image_processor(vision_dir)


def _training_logits(model, input_ids, pixel_values):
    """Logits the way training computes them: embeddings with image features, then the language model."""
    with torch.no_grad():
        embeds = llava.image_embeddings(model, input_ids, pixel_values)
        positions = torch.arange(input_ids.shape[1])[None]
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        return model.lm_head(hidden)


@pytest.mark.parametrize("arch,tower,strategy", [("llama", "clip", "default"), ("internlm2", "clip", "full"),
                                                 ("qwen2", "siglip", "full")])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, tiny_model_factory, tiny_vision_factory,
                                                           arch, tower, strategy):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tunelab.data.templates import get_template

    model, tokenizer, processor = _assembled(tiny_model_factory(arch), tiny_vision_factory(tower), strategy)
    template = get_template("qwen_chat", tokenizer)
    llava.save_hf_llava(model, tokenizer, processor, tmp_path / "hf", chat_template=template.to_jinja())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == \
        ["LlavaForConditionalGeneration"]

    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    # an OpenAI-style content list through the exported chat template = tunelab's template on the <image> text
    content = [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]
    text = hf_processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert text == template.render([{"role": "user", "content": "<image>What colour is it?"}],
                                   add_generation_prompt=True)
    images = [_image("red"), _image("blue", (20, 50))]
    inputs = hf_processor(text=text.replace("<image>", "<image><image>"), images=images, return_tensors="pt")
    per_image = 16 + (1 if tower == "clip" and strategy == "full" else 0)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * per_image
    with torch.no_grad():
        theirs = hf(**inputs).logits
    ours = _training_logits(model, inputs["input_ids"], inputs["pixel_values"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # and it generates, as transformers users call it
    out = hf.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_vision_half_of_a_whole_clip_folder(tmp_path):
    """openai/clip-vit-large-patch14-336 is a whole CLIP model (text and vision): its vision half is the tower."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=99),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    whole = CLIPModel(config)
    whole.save_pretrained(tmp_path)
    tower = llava.load_vision_tower(tmp_path, dtype=torch.float32, device="cpu")
    assert type(tower).__name__ == "CLIPVisionModel"
    torch.testing.assert_close(tower.embeddings.patch_embedding.weight,
                               whole.vision_model.embeddings.patch_embedding.weight)
    assert llava.image_seq_length(llava.vision_config(tmp_path), "default") == 16


def test_wrong_towers_and_strategies_are_refused(tmp_path, tiny_model_factory, tiny_vision_factory):
    with pytest.raises(TunelabError, match=r"SigLIP tower has none .* vision_feature_select_strategy = 'full'"):
        _assembled(tiny_model_factory("llama"), tiny_vision_factory("siglip"), "default")
    with pytest.raises(TunelabError, match=r"is a 'llama' model; the vision tower must be a CLIP or SigLIP"):
        llava.vision_family(tiny_model_factory("llama"))
    with pytest.raises(TunelabError, match=r"no model config found"):
        llava.vision_family(tmp_path / "nowhere")


def test_image_processor_of_a_hub_id_a_text_model_and_a_missing_folder(tmp_path, tiny_model_factory,
                                                                      tiny_vision_factory, monkeypatch):
    """The LLaVA configs name the tower by hub id: its downloaded snapshot is read (not refused as a folder without
    preprocessor_config.json); a text model or a missing folder is named as what it is."""
    import shutil

    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someorg--tinyclip" / "snapshots" / "abc123"
    shutil.copytree(tiny_vision_factory("clip"), snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    processor = llava.load_image_processor("someorg/tinyclip")
    assert processor.crop_size["height"] == 32
    with pytest.raises(TunelabError, match=r"is a 'llama' model; the vision tower must be a CLIP or SigLIP"):
        llava.load_image_processor(tiny_model_factory("llama"))
    with pytest.raises(TunelabError, match=r"visual_encoder_name_or_path: model directory .*nowhere' does not exist"):
        llava.load_image_processor(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_vision_factory("clip"), broken)
    (broken / "preprocessor_config.json").write_text("{\"size\": ")
    with pytest.raises(TunelabError, match=r"preprocessor_config.json: not valid JSON"):
        llava.load_image_processor(broken)


def test_projector_gets_gradients_from_images_and_takes_part_in_text_only_batches(tiny_model_factory, tiny_vision_factory):
    model, tokenizer, processor = _assembled(tiny_model_factory("llama"), tiny_vision_factory("clip"))
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    pixels = processor(images=[_image()], return_tensors="pt")["pixel_values"]
    features = llava.image_features(model, pixels)
    assert features.shape == (1, 16, model.config.text_config.hidden_size) and features.requires_grad
    features.sum().backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.any()
    model.zero_grad(set_to_none=True)
    # a batch of text only: the projector still gets a (zero) gradient, so DDP's all-reduce sees it
    ids = torch.tensor([[1, 2, 3]])
    llava.image_embeddings(model, ids, None).sum().backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and not grad.any()
