"""Multimodal data: records with images (LLaVA JSON, LLaMA-Factory's mllm_demo through its dataset_info.json, its v1
content parts, OpenAI image_url parts with base64 data URLs) become rows whose image tokens sit where transformers'
own LlavaProcessor puts them, with labels never on an image; bad images stop the run naming the record, or are
skipped and counted; cutting and packing keep every image whole and in order.

Fixtures: tests/fixtures/ecosystem (sources in its README.md); the pictures are drawn here with PIL.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from tunelab.config.schema import TrainConfig
from tunelab.data.collate import collate
from tunelab.data.dataset import build_datasets
from tunelab.data.images import ImageLoader
from tunelab.errors import TunelabError
from tunelab.model.llava import load_image_processor

DATA = Path(__file__).parent / "fixtures" / "ecosystem"
PER_IMAGE = 16  # the tiny CLIP tower: (32 px / 8 px patches)^2, CLS dropped


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from tunelab.model.tiny import make_model

    return make_model(tmp_path_factory.mktemp("llava_data_llm"), "qwen2")


def _tokenizer(llm_dir):
    from tunelab.model.tokenizer import load_tokenizer

    return load_tokenizer(str(llm_dir))


def _draw(path: Path, colour="red", size=(40, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _cfg(data_path, vision_dir, **kw) -> TrainConfig:
    settings = dict(data_path=data_path, visual_encoder_name_or_path=str(vision_dir), prompt_template="qwen_chat",
                    max_length=256, pack_to_max_length=False)
    return TrainConfig(**{**settings, **kw})


def _rows(cfg, tokenizer):
    bundle = build_datasets(cfg, tokenizer, log=lambda m: None)
    return [bundle.train_rows[i] for i in range(len(bundle.train_rows))], bundle.stats


def _image_positions(row, image_id):
    return [i for i, t in enumerate(row["input_ids"]) if t == image_id]


def test_llava_json_rows_match_hf_llava_processor(tmp_path, llm_dir, tiny_vision_factory):
    """The row of a LLaVA record is what transformers' LlavaProcessor makes of the rendered text and its image."""
    from transformers import LlavaProcessor

    from tunelab.data.templates import get_template
    from tunelab.model.llava import IMAGE_TOKEN

    vision = tiny_vision_factory("clip")
    shutil.copy(DATA / "llava" / "llava_instruct.json", tmp_path / "llava.json")
    record = json.loads((tmp_path / "llava.json").read_text())[0]
    _draw(tmp_path / "images" / record["image"])
    tokenizer = _tokenizer(llm_dir)
    rows, stats = _rows(_cfg(str(tmp_path / "llava.json"), vision, image_folder=str(tmp_path / "images")), tokenizer)
    assert stats.images == 1 and len(rows) == 1
    row = rows[0]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    positions = _image_positions(row, image_id)
    assert len(positions) == PER_IMAGE and positions == list(range(positions[0], positions[0] + PER_IMAGE))
    assert all(row["labels"][p] == -100 for p in positions)
    assert row["images"] == [str(tmp_path / "images" / record["image"])]

    messages = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                for t in record["conversations"]]
    text = get_template("qwen_chat", tokenizer).render(messages)
    processor = LlavaProcessor(image_processor=load_image_processor(vision), tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    from PIL import Image

    hf = processor(text=text, images=[Image.open(row["images"][0])], return_tensors="pt")
    assert hf["input_ids"][0].tolist() == row["input_ids"]
    # the trained tokens are the two replies, as in a text run
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert "white and red" in trained and "advertisement" in trained and "colors of the bus" not in trained


def test_llamafactory_mllm_demo_through_dataset_info(tmp_path, llm_dir, tiny_vision_factory):
    """LLaMA-Factory's registry entry with an `images` column: several images a sample, in the order of <image>."""
    for name in ("dataset_info.json", "mllm_demo.json"):
        shutil.copy(DATA / "llamafactory" / name, tmp_path / name)
    records = json.loads((tmp_path / "mllm_demo.json").read_text())
    colours = {}
    for record in records:
        for ref in record["images"]:
            colours.setdefault(ref, ["red", "green", "blue", "yellow"][len(colours) % 4])
            _draw(tmp_path / ref, colours[ref])
    tokenizer = _tokenizer(llm_dir)
    cfg = _cfg([{"path": str(tmp_path / "dataset_info.json"), "dataset": "mllm_demo"}], tiny_vision_factory("clip"))
    rows, stats = _rows(cfg, tokenizer)
    assert len(rows) == len(records) and stats.images == sum(len(r["images"]) for r in records)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    by_first_text = {r["messages"][0]["content"].replace("<image>", ""): r for r in records}
    for row in rows:
        n = len(row["images"])
        assert len(_image_positions(row, image_id)) == n * PER_IMAGE
        text = tokenizer.decode([t for t in row["input_ids"] if t != image_id])
        record = next(r for first, r in by_first_text.items() if first in text)
        assert row["images"] == [str(tmp_path / ref) for ref in record["images"]]


def test_content_parts_and_base64_images(tmp_path, llm_dir, tiny_vision_factory):
    """LLaMA-Factory v1 parts with paths from image_folder, OpenAI image_url parts with a base64 data URL."""
    shutil.copy(DATA / "llamafactory" / "v1_multimodal_demo.jsonl", tmp_path / "v1.jsonl")
    _draw(tmp_path / "lf" / "data" / "mllm_demo_data" / "1.jpg")
    png = _draw(tmp_path / "blue.png", "blue").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    openai = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What colour is this?"},
                                                        {"type": "image_url", "image_url": {"url": url}}]},
                           {"role": "assistant", "content": "Blue."}]}
    (tmp_path / "openai.jsonl").write_text(json.dumps(openai) + "\n")
    tokenizer = _tokenizer(llm_dir)
    vision = tiny_vision_factory("clip")
    rows, stats = _rows(_cfg([str(tmp_path / "v1.jsonl"), str(tmp_path / "openai.jsonl")], vision,
                             image_folder=str(tmp_path / "lf")), tokenizer)
    assert stats.images == 3
    by_count = sorted(rows, key=lambda r: len(r["images"]))
    assert by_count[0]["images"] == [url]
    assert by_count[1]["images"] == [str(tmp_path / "lf" / "data" / "mllm_demo_data" / "1.jpg")] * 2
    pixels = ImageLoader(load_image_processor(vision))(by_count[0]["images"])
    assert pixels.shape == (1, 3, 32, 32)


def test_missing_broken_and_remote_images_name_the_record(tmp_path, llm_dir, tiny_vision_factory):
    good = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                 {"from": "gpt", "value": "Red."}]}
    _draw(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _draw(tmp_path / "strip.png", size=(1, 20000))  # 160 bytes; scaled to the tower's side first, 6.7 GB of pixels
    tokenizer = _tokenizer(llm_dir)
    vision = tiny_vision_factory("clip")
    cases = [("missing.png", r"record 1: image 1 'missing.png': no such file"),
             ("broken.jpg", r"record 1: image .*broken.jpg cannot be read"),
             ("strip.png", r"record 1: image .*strip.png cannot be read .*1x20000 pixels.*too narrow a strip"),
             (".", r"record 1: image 1 '\.' is a folder .*not an image file"),
             ("https://example.com/a.jpg", r"record 1: image 1 is a web address")]
    for ref, message in cases:
        path = tmp_path / "data.json"
        path.write_text(json.dumps([good, {**good, "image": ref}]))
        with pytest.raises(TunelabError, match=message):
            _rows(_cfg(str(path), vision), tokenizer)
        rows, stats = _rows(_cfg(str(path), vision, skip_invalid=True), tokenizer)
        assert len(rows) == 1 and stats.skipped_invalid == 1 and stats.files[0]["invalid"] == 1
    placeholders = tmp_path / "count.json"
    placeholders.write_text(json.dumps([{**good, "conversations": [{"from": "human", "value": "Colour?"},
                                                                    {"from": "gpt", "value": "Red."}]}]))
    with pytest.raises(TunelabError, match=r"0 <image> placeholders in the text but 1 images"):
        _rows(_cfg(str(placeholders), vision), tokenizer)


def test_pretraining_text_with_an_image_is_an_invalid_record():
    """Named (and so skipped with skip_invalid) rather than a KeyError: a document has no turn for a picture."""
    from tunelab.data.files import InvalidRecord
    from tunelab.data.multimodal import split_images

    with pytest.raises(InvalidRecord, match=r"^data.json record 1: pretraining text with images. Images go with a "
                                            r"conversation"):
        split_images({"text": "<image> A red square.", "image": "a.png"}, "auto", "data.json record 1")


def test_cut_keeps_images_whole_and_packing_keeps_their_order(tmp_path, llm_dir, tiny_vision_factory):
    colours = ["red", "green", "blue"]
    for c in colours:
        _draw(tmp_path / f"{c}.png", c)
    records = [{"images": [f"{c}.png" for c in colours],
                "messages": [{"role": "user", "content": "<image><image> two, then <image>"},
                             {"role": "assistant", "content": "red green blue"}]},
               {"images": ["blue.png"], "messages": [{"role": "user", "content": "<image>?"},
                                                     {"role": "assistant", "content": "blue"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    tokenizer = _tokenizer(llm_dir)
    vision = tiny_vision_factory("clip")
    whole, _ = _rows(_cfg(str(tmp_path / "d.json"), vision), tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")  # added by the multimodal run
    first = next(r for r in whole if len(r["images"]) == 3)
    third = _image_positions(first, image_id)[2 * PER_IMAGE]
    # a cut inside the third image: the row ends before it, with the first two images
    cut, stats = _rows(_cfg(str(tmp_path / "d.json"), vision, max_length=third + 5, train_on="all"), tokenizer)
    short = next(r for r in cut if len(r["input_ids"]) > 20)
    assert short["images"] == [str(tmp_path / "red.png"), str(tmp_path / "green.png")]
    assert len(short["input_ids"]) == third and len(_image_positions(short, image_id)) == 2 * PER_IMAGE
    assert stats.truncated >= 1
    # packed into one row: the images of both samples, in their samples' order
    packed, stats = _rows(_cfg(str(tmp_path / "d.json"), vision, pack_to_max_length=True, shuffle_before_pack=False),
                          tokenizer)
    assert len(packed) == 1 and stats.images == 4
    assert packed[0]["images"] == [str(tmp_path / f"{c}.png") for c in colours + ["blue"]]
    assert len(_image_positions(packed[0], image_id)) == 4 * PER_IMAGE
    batch = collate(packed, tokenizer.pad_token_id, images=ImageLoader(load_image_processor(vision)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    # red, green, blue, blue: the pictures arrive in the order of their image tokens
    means = batch["pixel_values"].mean(dim=(2, 3))
    assert means[0].argmax() == 0 and means[1].argmax() == 1 and means[2].argmax() == 2
    assert (means[2] - means[3]).abs().max() < 1e-6
    # from the cache: the same rows, images included
    again = build_datasets(_cfg(str(tmp_path / "d.json"), vision, pack_to_max_length=True, shuffle_before_pack=False),
                           tokenizer, log=lambda m: None)
    assert again.stats.from_cache and again.train_rows[0]["images"] == packed[0]["images"]


def test_text_runs_still_refuse_images(tmp_path, llm_dir):
    _draw(tmp_path / "ok.png")
    (tmp_path / "d.json").write_text(json.dumps([{"image": "ok.png", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]}]))
    cfg = TrainConfig(data_path=str(tmp_path / "d.json"), prompt_template="qwen_chat")
    with pytest.raises(TunelabError, match=r"list-cfg -p llava"):
        build_datasets(cfg, _tokenizer(llm_dir), log=lambda m: None)


@pytest.mark.parametrize("lines, says", [
    ("method = 'lora'\nfreeze_llm = True", r"freeze_llm = True trains the projector alone, but method = 'lora'"),
    ("method = 'full'\nvisual_encoder_lora = True", r"visual_encoder_lora = True .* use method = 'lora' or 'qlora'"),
    ("vision_feature_layer = 0", r"not 0"),
    ("vision_feature_select_strategy = 'cls'", r"vision_feature_select_strategy"),
    ("evaluation_inputs = ['a', 'b', 'c']\nevaluation_images = ['x.png', 'y.png']", r"2 pictures for 3"),
    ("sequence_parallel_size = 2", r"sequence_parallel_size = 2 with a vision tower"),
])
def test_multimodal_settings_that_cannot_go_together(tmp_path, lines, says):
    from tunelab.config.loader import load_config

    path = tmp_path / "cfg.py"
    path.write_text(f"visual_encoder_name_or_path = 'openai/clip-vit-large-patch14-336'\n{lines}\n")
    with pytest.raises(TunelabError, match=says):
        load_config(path)


def test_multimodal_settings_in_a_text_run_are_refused_not_ignored(tmp_path):
    from tunelab.config.loader import load_config

    path = tmp_path / "cfg.py"
    path.write_text("image_folder = 'images'\n")
    with pytest.raises(TunelabError, match=r"cfg.py.*image_folder is a setting of multimodal .* "
                                           r"visual_encoder_name_or_path is not set"):
        load_config(path)


def test_a_data_folder_with_its_pictures_warns_only_of_files_no_record_reads(tmp_path, llm_dir, tiny_vision_factory):
    """A folder holding the data file and the pictures its records name (relative to the file's folder): the
    pictures are read through the records, so only files neither read nor named are listed as not read."""
    vision = tiny_vision_factory("clip")
    folder = tmp_path / "mm"
    record = json.loads((DATA / "llava" / "llava_instruct.json").read_text())[0]
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "llava.json").write_text(json.dumps([record]))
    _draw(folder / "data" / record["image"])
    (folder / "notes.md").write_text("how the data was made")
    _, stats = _rows(_cfg(str(folder), vision), _tokenizer(llm_dir))
    assert stats.images == 1
    (warning,) = [w for w in stats.reading_warnings() if "not read" in w]
    assert "notes.md" in warning and record["image"] not in warning and "1 file " in warning, warning


def test_wide_ranged_and_tall_images_reach_the_tower_as_pictures(tmp_path, tiny_vision_factory, monkeypatch):
    """A 16-bit greyscale scan keeps its tones (converted to RGB as it is, every value above 255 clips to white), and a
    tall screenshot is scaled down before the processor pads it to a square of its longest side, which it would hold
    in memory at full size: what the tower gets is what it gets from the full-size picture."""
    import numpy as np
    import torch
    from PIL import Image

    from tunelab.data import images

    ramp = Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16))
    assert ramp.mode == "I;16"
    ramp.save(tmp_path / "scan.png")
    loaded = np.asarray(images.open_image(str(tmp_path / "scan.png")), dtype=np.float64)
    assert 120 < loaded.mean() < 135 and loaded.min() == 0 and loaded.max() == 255  # the ramp, not a white page

    tall = Image.new("RGB", (300, 2000), "white")
    tall.paste(Image.new("RGB", (300, 1000), "navy"), (0, 500))
    tall.save(tmp_path / "tall.png")
    loader = ImageLoader(load_image_processor(tiny_vision_factory("clip"), pad_to_square=True))
    full = loader([str(tmp_path / "tall.png")])
    monkeypatch.setattr(images, "PADDED_MAX_SIDE", 400)  # a 2000 px side scaled to 400 before padding
    processor, sizes = loader.processor, []

    class Seeing:  # the processor, noting the size of each picture it is given
        def __getattr__(self, name):
            return getattr(processor, name)

        def __call__(self, images, **kw):
            sizes.extend(image.size for image in images)
            return processor(images=images, **kw)

    loader.processor = Seeing()
    shrunk = loader([str(tmp_path / "tall.png")])
    assert sizes == [(60, 400)]  # scaled down before the processor pads it, aspect kept
    assert shrunk.shape == full.shape
    torch.testing.assert_close(shrunk, full, atol=0.05, rtol=0)


def test_stage_one_without_pictures_is_refused_and_text_samples_are_named(tmp_path, llm_dir, tiny_vision_factory):
    """freeze_llm = True trains the projector alone, which learns from images only: a stage 1 on text-only data
    would train nothing and save the projector as it started, so it stops; text samples among captions are warned of."""
    _draw(tmp_path / "a.png")
    text = {"conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]}
    caption = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                                    {"from": "gpt", "value": "Red."}]}
    (tmp_path / "text.json").write_text(json.dumps([text, text]))
    cfg = _cfg(str(tmp_path / "text.json"), tiny_vision_factory("clip"), freeze_llm=True)
    with pytest.raises(TunelabError, match=r"freeze_llm = True trains the projector alone.*no sample of "
                                           r"data_path = .*text.json. has an image"):
        build_datasets(cfg, _tokenizer(llm_dir), log=lambda m: None)
    (tmp_path / "mixed.json").write_text(json.dumps([caption, text, caption]))
    logged = []
    cfg = _cfg(str(tmp_path / "mixed.json"), tiny_vision_factory("clip"), freeze_llm=True)
    bundle = build_datasets(cfg, _tokenizer(llm_dir), log=logged.append)
    assert bundle.stats.images == 2
    assert any("1 of 3 samples have no image" in line and "freeze_llm = True" in line for line in logged)
    assert any("1 of 3 samples have no image" in w for w in bundle.stats.warnings(cfg))  # what check-dataset lists
    logged.clear()
    again = build_datasets(cfg, _tokenizer(llm_dir), log=logged.append)  # from the cache: said again
    assert again.stats.from_cache and any("1 of 3 samples have no image" in line for line in logged)
    # stage 2 trains the language model too: text samples are fine there
    logged.clear()
    build_datasets(_cfg(str(tmp_path / "mixed.json"), tiny_vision_factory("clip")), _tokenizer(llm_dir),
                   log=logged.append)
    assert not any("have no image" in line for line in logged)


def test_an_image_in_a_reply_is_refused_naming_the_record(tmp_path, llm_dir, tiny_vision_factory):
    """A picture belongs to what the user shows: one inside an assistant reply would train the model to write after
    a picture it cannot produce (and at chat time never sees): the record is invalid. Swapped roles are the usual
    cause."""
    _draw(tmp_path / "a.png")
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                {"from": "gpt", "value": "Red."}]}
    swapped = {"image": "a.png", "conversations": [{"from": "human", "value": "Colour?"},
                                                   {"from": "gpt", "value": "<image>\nRed."}]}
    parts = {"messages": [{"role": "user", "content": "Draw it."}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "text", "text": "Here."}]}]}
    tokenizer, vision = _tokenizer(llm_dir), tiny_vision_factory("clip")
    good_parts = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                                            {"type": "text", "text": "Colour?"}]},
                               {"role": "assistant", "content": "Red."}]}
    for first, bad in ((good, swapped), (good_parts, parts)):
        path = tmp_path / "data.json"
        path.write_text(json.dumps([first, bad]))
        with pytest.raises(TunelabError, match=r"data.json record 1: an image in an assistant reply.*user turn"):
            _rows(_cfg(str(path), vision), tokenizer)
        rows, stats = _rows(_cfg(str(path), vision, skip_invalid=True), tokenizer)
        assert len(rows) == 1 and stats.skipped_invalid == 1


def test_a_folder_given_as_a_picture_and_a_file_as_the_image_folder_are_named_as_such(tmp_path, tiny_vision_factory):
    """A path that is there, only of the other kind, is named as what it is (not as 'not found')."""
    from tunelab.data.images import image_reading
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.model.tiny import make_tokenizer
    from tunelab.train.vision import vision_run

    picture = _draw(tmp_path / "pictures" / "a.png")
    with pytest.raises(TunelabError, match=r"image_folder = .*a.png.: .*a.png is a file, not a folder"):
        image_reading(_cfg("d.json", tiny_vision_factory("clip"), image_folder=str(picture)))
    make_tokenizer(tmp_path / "tok")
    cfg = _cfg("d.json", tiny_vision_factory("clip"), evaluation_inputs=["Colour?"],
               evaluation_images=str(tmp_path / "pictures"))
    with pytest.raises(TunelabError, match=r"evaluation_images: .*pictures is a folder, not a picture"):
        vision_run(cfg, load_tokenizer(str(tmp_path / "tok")), None)
