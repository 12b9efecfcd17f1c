"""Proof that LLaVA training learns: a tiny language model and a tiny CLIP tower, both random and built here, trained
through `tunelab train`'s loop in the two stages (projector on captions, then projector + language model on
questions) on coloured shapes drawn with PIL, name the colour and the shape of held-out pictures (new positions,
sizes and shades) through `tunelab chat`; the HF LLaVA export gives the logits tunelab computes; a LoRA stage 2
exports as the same model with its adapter merged, and resumes from its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from tests.train_helpers import tiny_cfg
from tunelab.train.loop import train

COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (40, 70, 215), "yellow": (225, 200, 35)}
SHAPES = ("circle", "cross", "triangle")
COLOUR_Q, SHAPE_Q = "What colour is the shape?", "What shape is it?"


def draw(colour: str, shape: str, rng: random.Random, size: int = 32):
    """A shape of `colour` (its shade varied) at a random place and size on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    side = rng.randint(18, 28)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    shade = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    if shape == "circle":
        pen.ellipse([x, y, x + side, y + side], fill=shade)
    elif shape == "cross":
        third = side / 3
        pen.rectangle([x + third, y, x + 2 * third, y + side], fill=shade)
        pen.rectangle([x, y + third, x + side, y + 2 * third], fill=shade)
    else:
        pen.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=shade)
    return image


def pictures(folder: Path, n: int, seed: int) -> list[tuple[str, str, str]]:
    """n pictures in `folder`: (file name, colour, shape), every combination about equally often."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        draw(colour, shape, rng).save(folder / f"{i}.png")
        out.append((f"{i}.png", colour, shape))
    return out


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Stage 1 and stage 2 trained once for the module: (root, stage-1 work dir, stage-2 work dir, settings)."""
    from tunelab.model.tiny import make_model, make_vision_tower

    root = tmp_path_factory.mktemp("llava_learn")
    llm = make_model(root / "llm", "qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    tower = make_vision_tower(root / "tower", "clip", hidden_size=64, num_layers=2, intermediate_size=128)
    seen = pictures(root / "images", 960, seed=0)
    captions = [{"image": f, "conversations": _turns("Describe the picture.", f"a {c} {s}")} for f, c, s in seen]
    questions = [{"image": f, "conversations": _turns(q, a)} for f, c, s in seen for q, a in ((COLOUR_Q, c),
                                                                                             (SHAPE_Q, s))]
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "questions.json").write_text(json.dumps(questions))
    common = dict(visual_encoder_name_or_path=str(tower), image_folder=str(root / "images"), max_length=512,
                  batch_size=4, lr_scheduler="constant", logging_steps=50)
    # stage 1: the projector alone, on captions
    stage1 = tiny_cfg(llm, data_path=str(root / "captions.json"), freeze_llm=True, lr=1e-3, max_steps=20, **common)
    train(stage1, root / "pretrain")
    # stage 2: projector + the whole language model, on questions; the projector from stage 1's work dir
    stage2 = tiny_cfg(llm, data_path=str(root / "questions.json"), pretrained_pth=str(root / "pretrain"),
                      lr=2e-3, max_steps=200, **common)
    train(stage2, root / "finetune")
    return root, root / "pretrain", root / "finetune", common


def test_names_colour_and_shape_of_pictures_it_never_saw(stages):
    from tunelab.chat.engine import load_chat_model
    from tunelab.model.generate import GenerationSettings
    from tunelab.train import layout

    root, pretrain, finetune, _ = stages
    # stage 1 saved the projector alone, and stage 2 started from it
    stage1_files = [p.name for p in (layout.last_checkpoint(pretrain) / "model").glob("*.safetensors")]
    from safetensors import safe_open

    with safe_open(str(layout.last_checkpoint(pretrain) / "model" / stage1_files[0]), "pt") as f:
        assert all("multi_modal_projector" in k for k in f.keys())

    chat = load_chat_model(str(finetune), device="cpu")  # the checkpoint itself, as `tunelab chat WORK_DIR`
    held_out = pictures(root / "held_out", 36, seed=99)
    right = {"colour": 0, "shape": 0}
    for name, colour, shape in held_out:
        for kind, question, truth in (("colour", COLOUR_Q, colour), ("shape", SHAPE_Q, shape)):
            content = [{"type": "image_url", "image_url": {"url": str(root / "held_out" / name)}},
                       {"type": "text", "text": "\n" + question}]
            reply = chat.reply([{"role": "user", "content": content}], GenerationSettings(max_new_tokens=6),
                               files=True)
            right[kind] += reply.strip() == truth
    # chance: 1/4 for colours, 1/3 for shapes (a random frozen tower makes shapes the harder part)
    assert right["colour"] >= 0.9 * len(held_out), right
    assert right["shape"] >= 2 / 3 * len(held_out), right


def test_hf_export_gives_tunelabs_logits(stages, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from PIL import Image

    from tunelab.chat.engine import load_chat_model
    from tunelab.cli.main import main

    root, _, finetune, _ = stages
    assert main(["convert", "to-hf", str(finetune), str(tmp_path / "hf"), "--fp32"]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    chat = load_chat_model(str(finetune), device="cpu")
    picture = root / "images" / "5.png"
    content = [{"type": "image_url", "image_url": {"url": str(picture)}}, {"type": "text", "text": "\n" + SHAPE_Q}]
    ids, pixels = chat.prompt([{"role": "user", "content": content}], files=True)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + SHAPE_Q}]}]
    inputs = processor(text=processor.apply_chat_template(hf_messages, add_generation_prompt=True),
                       images=[Image.open(picture)], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids  # the exported processor prepares the prompt as training did
    torch.testing.assert_close(inputs["pixel_values"], pixels)
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = chat.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    answer = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert processor.decode(answer, skip_special_tokens=True).strip().startswith(SHAPES)


def test_lora_stage_2_exports_merged_and_resumes(stages, tmp_path):
    """A LoRA stage 2 (the adapter holds the projector too) exports as one HF LLaVA model with the adapter merged,
    by `convert to-hf` and by `convert merge` alike, and a resumed run continues the same loss curve."""
    from transformers import LlavaForConditionalGeneration

    from tunelab.cli.main import main
    from tunelab.model.llava_train import rebuild_for_export
    from tunelab.train import layout

    root, pretrain, _, common = stages
    cfg = tiny_cfg(root / "llm", data_path=str(root / "questions.json"), pretrained_pth=str(pretrain),
                   method="lora", lora_r=8, lr=1e-3, max_steps=4, save_steps=2, **{**common, "logging_steps": 1})
    whole = train(cfg, tmp_path / "lora")
    ckpt = layout.last_checkpoint(tmp_path / "lora")
    config = json.loads((ckpt / "model" / "adapter_config.json").read_text())
    assert "multi_modal_projector" in config["modules_to_save"]
    assert not any("vision_tower" in m or "multi_modal_projector" in m for m in config["target_modules"])

    # resume from step 2: steps 3 and 4 again, the same losses
    (tmp_path / "lora" / "iter_4").rename(tmp_path / "iter_4_done")
    layout.write_pointer(tmp_path / "lora", tmp_path / "lora" / "iter_2")
    resumed = train(cfg, tmp_path / "lora", resume="auto")
    assert resumed.losses.keys() == {3, 4}
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-4)

    assert main(["convert", "to-hf", str(tmp_path / "iter_4_done"), str(tmp_path / "hf"), "--fp32"]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    meta = layout.read_meta(tmp_path / "iter_4_done")
    merged = rebuild_for_export(meta, tmp_path / "iter_4_done" / "model", dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7] + [hf.config.image_token_id] * 16 + [8, 9]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(theirs, merged(input_ids=ids, pixel_values=pixels).logits, atol=1e-5, rtol=1e-5)

    # `tunelab convert merge BASE CKPT OUT`, XTuner's verb, writes the same HF LLaVA model
    assert main(["convert", "merge", str(root / "llm"), str(tmp_path / "iter_4_done"), str(tmp_path / "merged"),
                 "--dtype", "fp32", "--device", "cpu"]) == 0
    by_merge = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_merge(input_ids=ids, pixel_values=pixels).logits, theirs, atol=1e-5, rtol=1e-5)


def test_visual_encoder_lora_trains_the_tower_and_reaches_the_export(tmp_path):
    """visual_encoder_lora = True: LoRA adapters on the vision tower's layers that feed the projector learn too
    (their B matrices start at zero), and the HF export carries a tower changed by them."""
    from safetensors import safe_open
    from transformers import AutoModel, LlavaForConditionalGeneration

    from tunelab.cli.main import main
    from tunelab.train import layout

    from tunelab.model.tiny import make_model, make_vision_tower

    root = tmp_path
    make_model(root / "llm", "qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    make_vision_tower(root / "tower", "clip", hidden_size=64, num_layers=2, intermediate_size=128)
    records = [{"image": f, "conversations": _turns(COLOUR_Q, c)} for f, c, _ in pictures(root / "images", 8, seed=1)]
    (root / "questions.json").write_text(json.dumps(records))
    cfg = tiny_cfg(root / "llm", data_path=str(root / "questions.json"), visual_encoder_name_or_path=str(root / "tower"),
                   image_folder=str(root / "images"), method="lora", visual_encoder_lora=True, lr=1e-2, max_steps=2,
                   batch_size=4, max_length=512)
    train(cfg, tmp_path / "run")
    model_dir = layout.last_checkpoint(tmp_path / "run") / "model"
    with safe_open(str(next(model_dir.glob("*.safetensors"))), "pt") as f:
        # layer 0 feeds the projector (vision_feature_layer = -2 of 2 layers); the last layer's output is unused
        tower_b = [f.get_tensor(k) for k in f.keys() if "vision_tower" in k and "layers.0." in k and "lora_B" in k]
    assert len(tower_b) == 6 and all(t.abs().max() > 0 for t in tower_b)  # q, k, v, out_proj, fc1, fc2

    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--fp32"]) == 0
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).model.vision_tower
    original = AutoModel.from_pretrained(root / "tower", dtype=torch.float32)

    def first_query(model):  # the first layer's attention query weight, whatever the prefix of its name
        return next(p for n, p in model.named_parameters() if n.endswith("layers.0.self_attn.q_proj.weight"))

    assert not torch.allclose(first_query(exported), first_query(original))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gpu_fast_path_trains_like_the_plain_path(stages, tmp_path, method):
    """On a GPU: compiled layers, CUDA graphs, varlen attention and the chunked loss on the language model, the
    tower in bf16 under no_grad: the loss curve of transformers + peft as they come (fast_path = False)."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    root, pretrain, _, common = stages
    curves = []
    for fast in (False, True):
        cfg = tiny_cfg(root / "llm", data_path=str(root / "questions.json"), pretrained_pth=str(pretrain),
                       method=method, dtype="bf16", lr=1e-3, max_steps=8, lora_r=8, fast_path=fast,
                       use_compile=fast, **{**common, "logging_steps": 1})
        curves.append(train(cfg, tmp_path / f"fast_{fast}", device="cuda").losses)
    plain, fast = curves
    assert fast[8] < fast[1]
    for step in plain:
        assert fast[step] == pytest.approx(plain[step], rel=0.05), (step, plain, fast)


def test_evaluation_questions_that_write_image_themselves(tmp_path, tiny_vision_factory, tiny_tokenizer_dir,
                                                          monkeypatch):
    """An evaluation question may say where its picture goes ('<image>\\nDescribe it.', as data records do): the
    picture goes there, once (a second one would be a traceback from transformers after the model loaded).
    Two <image>, or <image> with no picture to put there (the image token alone: a silently wrong answer), stop
    before anything loads, naming the question."""
    import tunelab.model.generate as generate
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.train.evaluate import answer_questions
    from tunelab.train.vision import vision_run
    from tunelab.errors import TunelabError

    picture = tmp_path / "p.png"
    draw("red", "circle", random.Random(0)).save(picture)
    common = dict(visual_encoder_name_or_path=str(tiny_vision_factory("clip")), prompt_template="qwen_chat")
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    cfg = tiny_cfg(tiny_tokenizer_dir, evaluation_inputs=["<image>\nDescribe it.", "What colour?"],
                   evaluation_images=str(picture), **common)
    vision = vision_run(cfg, tokenizer, None)
    asked = []
    monkeypatch.setattr(generate, "generate_reply", lambda model, tok, template, messages, settings, **kw:
                        asked.append(messages[-1]["content"]) or "ok")
    answer_questions(None, tokenizer, cfg, vision)
    assert asked == ["<image>\nDescribe it.", "<image>\nWhat colour?"]
    for questions, pictures, says in (
            (["<image><image> Compare."], str(picture), r"evaluation_inputs\[0\] writes <image> 2 times"),
            (["Hi.", "<image>\nDescribe it."], None, r"evaluation_inputs\[1\] writes <image> but has no picture")):
        with pytest.raises(TunelabError, match=says):
            vision_run(tiny_cfg(tiny_tokenizer_dir, evaluation_inputs=questions, evaluation_images=pictures, **common),
                       tokenizer, None)


@pytest.mark.parametrize("layer", [4, -4, 50])
def test_a_feature_layer_the_tower_does_not_have_stops_before_loading(tiny_vision_factory, tiny_tokenizer_dir, layer):
    """The tiny tower has 3 layers: -3 to -1 and 1 to 3 are layers; 4, -4 (its embeddings, as 0 is) and beyond are
    not (an IndexError from transformers at the first step, or the embeddings silently)."""
    from tunelab.errors import TunelabError
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.train.vision import vision_run

    common = dict(visual_encoder_name_or_path=str(tiny_vision_factory("clip")), prompt_template="qwen_chat")
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    for ok in (-3, -1, 1, 3):
        vision_run(tiny_cfg(tiny_tokenizer_dir, vision_feature_layer=ok, **common), tokenizer, None)
    with pytest.raises(TunelabError, match=rf"vision_feature_layer = {layer}: the vision tower .* has 3 layers: "
                                           r"use 1 to 3, or -1 to -3 .*-2"):
        vision_run(tiny_cfg(tiny_tokenizer_dir, vision_feature_layer=layer, **common), tokenizer, None)


def test_stage_two_checks_what_stage_one_trained_its_projector_for(tmp_path, tiny_tokenizer_dir, caplog):
    """pretrained_pth's tunelab.json says how stage 1 made its projector's inputs and outputs. It is read
    before anything loads: another feature layer or activation stops the run (the weights' shapes are the same, so
    they cannot tell), another language model is warned of, and a text-only run's checkpoint is named as one."""
    import logging

    from tunelab.errors import TunelabError
    from tunelab.train import layout
    from tunelab.train.vision import with_pretrained_checkpoint

    def stage_one(name, **changes):
        checkpoint = tmp_path / name / "iter_5"
        (checkpoint / "model").mkdir(parents=True)
        (tmp_path / name / "last_checkpoint").write_text("iter_5")
        cfg = tiny_cfg(tiny_tokenizer_dir, visual_encoder_name_or_path="towers/clip", freeze_llm=True, **changes)
        layout.write_meta(checkpoint, {**layout.training_meta(cfg), **({"llava": None} if name == "text" else {})})
        return str(tmp_path / name)

    stage2 = dict(visual_encoder_name_or_path="towers/clip")
    same = with_pretrained_checkpoint(tiny_cfg(tiny_tokenizer_dir, pretrained_pth=stage_one("same"), **stage2), None)
    assert same.pretrained_pth == str(tmp_path / "same" / "iter_5")
    for name, setting, says in (
            ("layer", dict(vision_feature_layer=-1), r"vision_feature_layer = -1; this run has -2"),
            ("act", dict(projector_hidden_act="relu"), r"projector_hidden_act = 'relu'; this run has 'gelu'"),
            ("text", {}, r"a text-only run .* no projector")):
        with pytest.raises(TunelabError, match=rf"pretrained_pth = .*{name}.*{says}"):
            with_pretrained_checkpoint(tiny_cfg(tiny_tokenizer_dir, pretrained_pth=stage_one(name, **setting),
                                                **stage2), None)
    other = stage_one("other_llm", pretrained_model_name_or_path="/models/another-llm")
    with caplog.at_level(logging.WARNING, logger="tunelab.train.vision"):
        with_pretrained_checkpoint(tiny_cfg(tiny_tokenizer_dir, pretrained_pth=other, **stage2), None)
    assert "stage 1 trained its projector for pretrained_model_name_or_path = '/models/another-llm'" in caplog.text


def test_stage_two_from_a_work_dir_without_a_checkpoint_stops_before_loading(tmp_path, tiny_tokenizer_dir):
    """Stage 1 stopped before its first save (an iter_N.tmp, a pointer naming it): named as such before
    anything loads. A work dir whose pointer is gone uses its newest complete checkpoint."""
    from tunelab.errors import TunelabError
    from tunelab.train import layout
    from tunelab.train.vision import with_pretrained_checkpoint

    work_dir = tmp_path / "pretrain"
    (work_dir / "iter_3.tmp").mkdir(parents=True)
    (work_dir / "last_checkpoint").write_text("iter_3")
    cfg = tiny_cfg(tiny_tokenizer_dir, visual_encoder_name_or_path="towers/clip", pretrained_pth=str(work_dir))
    with pytest.raises(TunelabError, match=r"pretrained_pth = .*pretrain.: a work dir without a checkpoint yet"):
        with_pretrained_checkpoint(cfg, None)
    (work_dir / "iter_2" / "model").mkdir(parents=True)
    (work_dir / "last_checkpoint").unlink()
    layout.write_meta(work_dir / "iter_2", layout.training_meta(dataclasses.replace(cfg, freeze_llm=True)))
    assert with_pretrained_checkpoint(cfg, None).pretrained_pth == str(work_dir / "iter_2")


def test_stage_two_without_stage_one_says_where_it_looked_once_and_the_other_way(tmp_path, tiny_tokenizer_dir,
                                                                                  monkeypatch):
    """The copied finetune config names stage 1's work dir; run from the config's folder without stage 1, the error
    names the place once (the config's folder is the current one) and says that None starts a new projector."""
    from tunelab.errors import TunelabError
    from tunelab.train.vision import with_pretrained_checkpoint

    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(tiny_tokenizer_dir, visual_encoder_name_or_path="towers/clip",
                   pretrained_pth="./work_dirs/llava_pretrain")
    with pytest.raises(TunelabError) as info:
        with_pretrained_checkpoint(cfg, ".")
    message = str(info.value)
    assert f"(looked at {tmp_path / 'work_dirs' / 'llava_pretrain'})" in message
    assert "pretrained_pth = None" in message


def test_stage_two_with_pretrained_pth_none_says_at_the_start_that_its_projector_is_new(
        tmp_path, tiny_qwen2_dir, tiny_vision_factory, capsys):
    """pretrained_pth = None in a stage 2 (the language model trains) starts a projector from random weights: legal,
    but it skips stage 1's image-caption pretraining, so the start of training says so in one line; stage 1 (whose
    projector is new by design) and a stage 2 from stage 1's checkpoint do not."""
    draw("red", "circle", random.Random(0)).save(tmp_path / "p.png")
    records = [{"image": "p.png", "conversations": _turns(COLOUR_Q, "red")}] * 2
    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = tiny_cfg(tiny_qwen2_dir, data_path=str(tmp_path / "data.json"), image_folder=str(tmp_path),
                   visual_encoder_name_or_path=str(tiny_vision_factory("clip")), max_steps=1)
    train(cfg, tmp_path / "run")
    lines = [line for line in capsys.readouterr().out.splitlines() if "pretrained_pth = None" in line]
    assert len(lines) == 1 and lines[0].startswith("note: ") and "new projector" in lines[0], lines
    from tunelab.train.vision import projector_note

    assert projector_note(dataclasses.replace(cfg, freeze_llm=True), resuming=False) is None  # stage 1
    assert projector_note(dataclasses.replace(cfg, pretrained_pth="work_dirs/pretrain"), resuming=False) is None
    assert projector_note(cfg, resuming=True) is None  # the checkpoint holds the projector trained so far
