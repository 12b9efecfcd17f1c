"""`tunelab predict`: a tiny model taught its identity through `tunelab train` names itself on held-out questions and
scores above its base; lines in data order with their source; greedy replies the same at any batch size; an
interrupted run resumed, another run's file refused; dataset_info.json columns; bad records named; the scores equal
the libraries' own (LLaMA-Factory's recipe) on fixed English and Chinese strings."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from tests.train_helpers import IDENTITY, assert_one_line_error, write_config
from tunelab.cli.main import main
from tunelab.data.self_cognition import QUESTIONS_EN

HELD_OUT = QUESTIONS_EN[16:]  # never trained on: the model must answer them from what it learnt


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _predict(model, data, out, *extra) -> int:
    return main(["predict", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--max-new-tokens", "16", *extra])


@pytest.fixture(scope="module")
def identity_run(tmp_path_factory, tiny_llama_dir):
    """A work dir of `tunelab train` on 16 identity questions (full fine-tuning of the tiny llama, ~10 s)."""
    directory = tmp_path_factory.mktemp("identity_run")
    config = write_config(directory, tiny_llama_dir, method="full", lr=3e-3, max_epochs=12, batch_size=4,
                          pack_to_max_length=False, save_steps=1000, logging_steps=50)
    (directory / "identity.json").write_text(json.dumps([{"instruction": q, "input": "", "output": IDENTITY}
                                                         for q in QUESTIONS_EN[:16]]))
    assert main(["train", str(config), "--work-dir", str(directory / "wd"), "--device", "cpu"]) == 0
    return directory / "wd"


def test_a_trained_model_names_itself_on_held_out_questions_and_scores_above_its_base(
        identity_run, tiny_llama_dir, tmp_path, capsys):
    data = _jsonl(tmp_path / "held_out.jsonl", [{"instruction": q, "output": IDENTITY} for q in HELD_OUT])
    assert _predict(identity_run, data, tmp_path / "tuned.jsonl", "--max-new-tokens", "24") == 0
    assert _predict(tiny_llama_dir, data, tmp_path / "base.jsonl", "--prompt-template", "qwen_chat") == 0
    printed = capsys.readouterr().out
    tuned, base = (json.loads((tmp_path / f"{n}.jsonl.metrics.json").read_text()) for n in ("tuned", "base"))
    assert all("Tuna" in line["prediction"] for line in _lines(tmp_path / "tuned.jsonl"))
    assert not any("Tuna" in line["prediction"] for line in _lines(tmp_path / "base.jsonl"))
    for key in ("exact_match", "bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert tuned[key] > base[key] or tuned[key] == base[key] == 100, key
    assert tuned["bleu-4"] > 50 > base["bleu-4"] and tuned["count"] == len(HELD_OUT) == tuned["scored"]
    # the checkpoint the work dir names is what was loaded and recorded (a resume must load the same)
    assert tuned["finished"] and tuned["settings"]["model"] == str((identity_run / "iter_48" / "model").resolve())
    assert f"bleu-4               {tuned['bleu-4']}" in printed  # the scores are printed too


def _mixed(tmp_path) -> Path:
    """Records of several formats and prompt lengths; one ends before its reply, one is a preference pair."""
    return _jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "Who are you?", "output": IDENTITY},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And your name?"},
                      {"role": "assistant", "content": "Tuna."}]},
        {"conversations": [{"from": "human", "value": "What is your name? " * 6}]},
        {"prompt": "Who built you?", "chosen": IDENTITY, "rejected": "Nobody."},
        {"instruction": "Say something long, please, about yourself and your maker", "output": "No."},
        {"instruction": "x", "output": ""},
    ])


def test_lines_follow_the_data_with_their_source_and_batch_sizes_agree(tiny_llama_dir, tmp_path, capsys,
                                                                       monkeypatch):
    from tunelab.chat.batcher import Batcher

    sizes = []  # the batcher's size: --batch-size reaches it, so the two runs below batch differently
    start = Batcher.__init__
    monkeypatch.setattr(Batcher, "__init__", lambda self, *a, **kw: sizes.append(kw["max_batch_size"]) or start(
        self, *a, **kw))
    data = _mixed(tmp_path)
    for size in ("1", "4"):
        assert _predict(tiny_llama_dir, data, tmp_path / f"b{size}.jsonl", "--batch-size", size,
                        "--prompt-template", "qwen_chat") == 0
    assert sizes == [1, 4]
    err = capsys.readouterr().err
    one, four = _lines(tmp_path / "b1.jsonl"), _lines(tmp_path / "b4.jsonl")
    assert [r["prediction"] for r in one] == [r["prediction"] for r in four]  # greedy: padding changes nothing
    assert len({r["prediction"] for r in one}) > 1  # the model does not say one thing to all: the order matters
    assert [(r["index"], r["source"], r["file"], r["line"]) for r in one] == \
        [(i, f"{data} line {i + 1}", str(data), i + 1) for i in range(6)]
    assert [r["reference"] for r in one] == [IDENTITY, "Tuna.", None, IDENTITY, "No.", None]
    assert one[1]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello."},
                                  {"role": "user", "content": "And your name?"}]
    assert one[2]["messages"][-1]["role"] == "user" and "no reference" in one[2]["note"]
    assert one[3]["note"] == "reference: the chosen reply"
    assert "2 sample(s) have no reference" in err
    metrics = json.loads((tmp_path / "b1.jsonl.metrics.json").read_text())
    assert (metrics["count"], metrics["scored"], metrics["without_reference"]) == (6, 4, 2)


def test_an_interrupted_run_resumes_and_another_runs_file_is_refused(tiny_llama_dir, tmp_path, capsys):
    data, out = _mixed(tmp_path), tmp_path / "p.jsonl"
    args = ("--prompt-template", "qwen_chat")
    assert _predict(tiny_llama_dir, data, out, *args) == 0
    whole = out.read_text(encoding="utf-8")
    lines = whole.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:15], encoding="utf-8")  # stopped while writing line 3
    capsys.readouterr()
    assert _predict(tiny_llama_dir, data, out, *args) == 0
    assert "resuming: " in capsys.readouterr().err and out.read_text(encoding="utf-8") == whole

    assert _predict(tiny_llama_dir, data, out, *args, "--max-new-tokens", "8") == 2  # other settings: refused
    assert_one_line_error(capsys, 2, str(out), "max_new_tokens: 16 there, 8 now", "--overwrite")
    assert out.read_text(encoding="utf-8") == whole
    assert _predict(tiny_llama_dir, data, out, *args, "--max-new-tokens", "8", "--overwrite") == 0
    assert out.read_text(encoding="utf-8") != whole and len(_lines(out)) == 6

    mine = _jsonl(tmp_path / "mine.jsonl", [{"a": 1}])  # a file tunelab predict did not write
    assert _predict(tiny_llama_dir, data, mine, *args) == 2
    assert_one_line_error(capsys, 2, "mine.jsonl exists", "--overwrite")
    assert mine.read_text() == '{"a": 1}\n'
    assert _predict(tiny_llama_dir, data, data, *args) == 2  # never over the test data, even with --overwrite
    assert_one_line_error(capsys, 2, "is the test data")


def test_a_checkpoint_is_hashed_once_for_its_record_and_its_load(tiny_llama_dir, tmp_path, monkeypatch):
    """predict reads MODEL once to record what it loads (a resume must load the same) and loads it: a checkpoint's
    model/ files are checked against its checksums.json once, not again at load (seconds on a multi-GB model)."""
    import shutil
    from collections import Counter

    from tunelab.train import checksums, layout

    ckpt = layout.checkpoint_dir(tmp_path / "work", 2)
    shutil.copytree(tiny_llama_dir, ckpt / layout.MODEL_DIR)  # a full run, as training saves it
    layout.write_meta(ckpt, {"base_model": str(tiny_llama_dir), "method": "full", "prompt_template": "qwen_chat"})
    checksums.write_manifest(ckpt)
    hashed = Counter()
    real_hash = checksums._hash_file
    monkeypatch.setattr(checksums, "_hash_file", lambda path: hashed.update([Path(path).name]) or real_hash(path))
    data = _jsonl(tmp_path / "d.jsonl", [{"instruction": "Who are you?", "output": IDENTITY}])
    assert _predict(ckpt, data, tmp_path / "p.jsonl") == 0
    assert set(hashed) == {p.name for p in (ckpt / layout.MODEL_DIR).iterdir()} and set(hashed.values()) == {1}, hashed


def test_a_run_on_edited_data_is_another_run(tiny_llama_dir, tmp_path, capsys):
    """Its lines hold the old references: scoring them again would give the old scores without a word."""
    data, out = _jsonl(tmp_path / "t.jsonl", [{"instruction": "Hi", "output": "Helo"}]), tmp_path / "p.jsonl"
    assert _predict(tiny_llama_dir, data, out) == 0
    _jsonl(data, [{"instruction": "Hi", "output": "Hello"}])  # a reference corrected
    capsys.readouterr()
    assert _predict(tiny_llama_dir, data, out) == 2
    assert_one_line_error(capsys, 2, "holds the predictions of another run (data_content: 'sha256:", "--overwrite")
    assert _predict(tiny_llama_dir, data, out, "--overwrite") == 0 and _lines(out)[0]["reference"] == "Hello"


def test_a_dataset_info_dataset_is_read_through_its_columns(tiny_llama_dir, tmp_path, capsys):
    _jsonl(tmp_path / "qa.jsonl", [{"question": "Who are you?", "answer": IDENTITY, "id": 1},
                                   {"question": "Hi", "answer": "Hello."}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"qa": {
        "file_name": "qa.jsonl", "columns": {"prompt": "question", "response": "answer"}}}))
    registry = tmp_path / "dataset_info.json"
    assert _predict(tiny_llama_dir, registry, tmp_path / "out.jsonl") == 2  # which dataset?
    assert_one_line_error(capsys, 2, "name the datasets to predict with --dataset NAME (its datasets: qa)")
    assert _predict(tiny_llama_dir, registry, tmp_path / "out.jsonl", "--dataset", "qa") == 0
    rows = _lines(tmp_path / "out.jsonl")
    assert [r["reference"] for r in rows] == [IDENTITY, "Hello."]
    assert rows[0]["messages"][-1] == {"role": "user", "content": "Who are you?"}
    assert rows[0]["file"] == str(tmp_path / "qa.jsonl") and rows[1]["line"] == 2
    assert "field 'id' not used" in capsys.readouterr().err  # nothing dropped without a word


def test_unfilled_placeholders_are_warned_about(tmp_path):
    """LLaMA-Factory's identity.json as it comes: its references would say {{name}}, not the name trained."""
    from tunelab.chat.predict import read_test_samples

    data = _jsonl(tmp_path / "identity.jsonl", [{"instruction": "hi", "output": "I am {{name}}, by {{author}}."},
                                                {"instruction": "Who?", "output": "{{name}}."}])
    warnings: list[str] = []
    assert len(read_test_samples(data, warn=warnings.append)) == 2
    assert warnings == [f"{data}: 2 record(s) with {{{{author}}}}, {{{{name}}}} (first at {data} line 1), read as "
                        f"written: the model sees and is compared with the placeholders. Fill them first: `tunelab "
                        f"data self-cognition --name NAME --author AUTHOR --from {data} -o "
                        f"{tmp_path / 'identity_filled.jsonl'}`, and pass that file."]


@pytest.mark.parametrize("record, says", [
    ({"text": "A plain document."}, "line 2: pretraining text"),
    ({"messages": [{"role": "user", "content": "Hi"}], "images": ["cat.png"]},
     "line 2: 0 <image> placeholders in the text but 1 images"),
    ({"prompt": "<image>Hi", "chosen": "A cat.", "rejected": "A dog.", "images": ["cat.png"]},
     "line 2: a preference pair with 'images'"),
    ({"conversations": [{"from": "nobody", "value": "Hi"}]}, "line 2:"),
    ({"weird": 1}, "line 2: cannot tell the data format"),
])
def test_a_bad_record_is_named_before_the_model_loads(tmp_path, capsys, record, says):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n" + json.dumps(record) + "\n")
    assert _predict(tmp_path / "no_model", data, tmp_path / "out.jsonl") == 2
    message = assert_one_line_error(capsys, 2, "test.jsonl", says)
    assert "no_model" not in message and not (tmp_path / "out.jsonl").exists()


def test_a_line_that_is_not_json_is_named(tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n{oops\n")
    assert _predict(tmp_path / "no_model", data, tmp_path / "out.jsonl") == 2
    assert_one_line_error(capsys, 2, "test.jsonl line 2")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "", "parameters": {}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
    "name": "get_weather", "arguments": {"city": "Paris"}}}]}


def test_the_reference_is_the_reply_as_the_template_writes_it():
    """What the model trained with the template writes (Qwen3's empty thinking block before a plain reply too, or
    every prediction of a Qwen3 model would miss its reference), and, where the template writes none of the reply,
    no reference with the reason in the line."""
    from tunelab.chat.predict import TestSample, reference_text
    from tunelab.data.templates import get_template

    asked = [{"role": "user", "content": "Weather in Paris?"}]
    plain = TestSample("t line 1", asked, {"role": "assistant", "content": "Sunny."})
    assert reference_text(get_template("qwen3_chat"), plain) == ("<think>\n\n</think>\n\nSunny.", "")
    assert reference_text(get_template("qwen2_5_chat"), plain) == ("Sunny.", "")
    call = TestSample("t line 2", asked, CALL, TOOLS)
    assert reference_text(get_template("qwen2_5_chat"), call) == \
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "")
    assert reference_text(get_template("qwen_chat"), call) == \
        (None, "no reference: template 'qwen_chat' writes nothing of the reply (its tool calls)")
    reference, why = reference_text(get_template("deepseek_r1"), call)  # the template refuses tool calls
    assert reference is None and why.startswith("no reference: ") and "tool calls are not supported" in why


def test_what_the_template_does_not_write_is_said(tiny_llama_dir, tmp_path, capsys):
    """A reply it writes nothing of: no reference, its line says why; tool definitions it has no place for: a
    warning naming the first sample (the prompt goes without them)."""
    data = _jsonl(tmp_path / "calls.jsonl", [{"instruction": "Hi", "output": "Hello"},
                                             {"messages": [{"role": "user", "content": "Weather?"}, CALL]},
                                             {"messages": [{"role": "user", "content": "Weather?"}, CALL],
                                              "tools": TOOLS}])
    assert _predict(tiny_llama_dir, data, tmp_path / "p.jsonl", "--prompt-template", "qwen_chat") == 0
    assert f"1 sample(s) carry tool definitions (first at {data} line 3), which template 'qwen_chat' has no " \
        "place for: predicted without them" in capsys.readouterr().err
    rows = _lines(tmp_path / "p.jsonl")
    assert rows[0]["reference"] == "Hello" and "note" not in rows[0]
    assert rows[1]["reference"] is None and "writes nothing of the reply (its tool calls)" in rows[1]["note"]
    assert json.loads((tmp_path / "p.jsonl.metrics.json").read_text())["without_reference"] == 2


def test_a_prompt_the_template_refuses_is_a_failed_line_saying_why(tiny_llama_dir, tmp_path, capsys):
    data = _jsonl(tmp_path / "calls.jsonl", [{"messages": [
        {"role": "user", "content": "Weather?"}, CALL, {"role": "tool", "content": "Sunny"},
        {"role": "assistant", "content": "It is sunny."}]}])
    assert _predict(tiny_llama_dir, data, tmp_path / "p.jsonl", "--prompt-template", "deepseek_r1") == 0
    row = _lines(tmp_path / "p.jsonl")[0]
    assert row["prediction"] is None and "tool calls are not supported" in row["error"]
    err = capsys.readouterr().err
    assert "1 sample(s) not predicted" in err and "or one the template refuses): their lines say why" in err


# --- image (LLaVA) samples ----------------------------------------------------------------------------------------

QUESTION = "<image>\nWhat is it?"


def _picture(path: Path, colour: str) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def _llava_record(image: str, reply: str | None = "A square.") -> dict:
    """LLaVA's own shape: an 'image' path and its conversation, the picture's <image> before the question."""
    turns = [{"from": "human", "value": QUESTION}] + ([{"from": "gpt", "value": reply}] if reply else [])
    return {"id": image, "image": image, "conversations": turns}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tiny_model_factory, tiny_vision_factory):
    from tests.chat_helpers import make_llava_dir

    return make_llava_dir(tmp_path_factory.mktemp("llava_hf"), tiny_model_factory("llama"), tiny_vision_factory("clip"))


def test_a_llava_model_predicts_image_samples_with_their_pictures(llava_dir, tmp_path, monkeypatch, capsys):
    """Each picture reaches the model at its <image>: the prediction is what `tunelab chat --image` answers about that
    picture (greedy), another picture gets another reply, batches keep each row's pictures with it, and the line
    keeps the prompt's text with its placeholders beside the pictures' paths."""
    from tunelab.chat.engine import ChatModel, load_chat_model
    from tunelab.chat.vision import with_images
    from tunelab.model.generate import GenerationSettings

    folder = tmp_path / "llava_images"
    for colour in ("red", "blue", "green"):
        _picture(folder / "shapes" / f"{colour}.png", colour)
    red_url = "data:image/png;base64," + base64.b64encode((folder / "shapes" / "red.png").read_bytes()).decode()
    data = _jsonl(tmp_path / "test.jsonl", [
        *(_llava_record(f"shapes/{colour}.png", f"A {colour} square.") for colour in ("red", "blue", "green")),
        {"instruction": "Hi", "output": "Hello"},  # text samples go beside them
        {"messages": [{"role": "user", "content": "<image>Which is redder, this or <image>?"}],  # no reply yet
         "images": ["shapes/red.png", "shapes/blue.png"]},
        {"messages": [{"role": "user", "content": [  # the red picture itself, as an OpenAI part
            {"type": "image_url", "image_url": {"url": red_url}}, {"type": "text", "text": "\nWhat is it?"}]}]},
    ])
    sent = []  # what reaches the batcher: the prompt's image tokens and pictures per sample
    job = ChatModel.job

    def spy(self, prompt_ids, settings, **kwargs):
        pixels = kwargs.get("pixel_values")
        sent.append((prompt_ids.count(self.vision.token_id), None if pixels is None else tuple(pixels.shape)))
        return job(self, prompt_ids, settings, **kwargs)

    monkeypatch.setattr(ChatModel, "job", spy)
    for size in ("1", "4"):
        assert _predict(llava_dir, data, tmp_path / f"b{size}.jsonl", "--image-folder", str(folder), "--batch-size",
                        size, "--max-new-tokens", "8") == 0
    one, four = _lines(tmp_path / "b1.jsonl"), _lines(tmp_path / "b4.jsonl")
    assert [r["prediction"] for r in one] == [r["prediction"] for r in four]

    chat = load_chat_model(str(llava_dir), device="cpu")
    per_image = chat.vision.per_image
    side = chat.vision.processor.crop_size["height"]
    assert sent[:5] == [(per_image, (1, 3, side, side))] * 3 + [(0, None), (2 * per_image, (2, 3, side, side))]
    assert [r.get("images") for r in one] == [[str(folder / "shapes" / f"{c}.png")] for c in ("red", "blue", "green")] \
        + [None, [str(folder / "shapes" / "red.png"), str(folder / "shapes" / "blue.png")], [red_url[:40] + "..."]]
    assert one[0]["messages"] == [{"role": "user", "content": QUESTION}] and one[0]["reference"] == "A red square."
    assert one[4]["reference"] is None and one[4]["messages"][-1]["content"].count("<image>") == 2
    greedy = GenerationSettings(max_new_tokens=8, temperature=0.0)
    for row in one[:3]:  # as the terminal asks it: `tunelab chat MODEL --image FILE`, the picture before the text
        parts = with_images(QUESTION.removeprefix("<image>"), row["images"])
        assert row["prediction"] == chat.reply([{"role": "user", "content": parts}], greedy, files=True)
    assert len({r["prediction"] for r in one[:3]}) == 3  # the same question about three pictures: three replies
    assert one[5]["prediction"] == one[0]["prediction"]  # the same picture as its bytes, named shortly in its line
    settings = json.loads((tmp_path / "b1.jsonl.metrics.json").read_text())["settings"]
    assert settings["image_folder"] == str(folder.resolve())
    assert "6 sample(s) to predict" in capsys.readouterr().err


def test_image_paths_start_at_the_data_files_folder_or_at_image_folder(tmp_path, capsys):
    from tunelab.chat.predict import data_content, read_test_samples

    red = _picture(tmp_path / "data" / "red.png", "red")
    elsewhere = _picture(tmp_path / "images" / "red.png", "blue")
    data = _jsonl(tmp_path / "data" / "test.jsonl", [_llava_record("red.png"), _llava_record("red.png", None)])
    beside, unanswered = read_test_samples(data)
    assert beside.images == [str(red)] and beside.prompt == [{"role": "user", "content": QUESTION}]
    assert beside.reply == {"role": "assistant", "content": "A square."}
    # a conversation that ends before its reply is a prompt, as for text
    assert unanswered.reply is None and unanswered.prompt == beside.prompt and unanswered.images == [str(red)]
    there, _ = read_test_samples(data, image_folder=tmp_path / "images")
    assert there.images == [str(elsewhere)]
    assert data_content([beside]) != data_content([there])  # another picture: another run, not a resume
    before = data_content([beside])
    _picture(red, "green")  # the same name, another picture: another run too
    os.utime(red, ns=(1, 1))
    assert data_content([beside]) != before

    assert _predict(tmp_path / "no_model", data, tmp_path / "out.jsonl", "--image-folder", str(tmp_path / "nope")) == 2
    assert_one_line_error(capsys, 2, f"--image-folder {tmp_path / 'nope'}: no such folder")
    assert _predict(tmp_path / "no_model", data, tmp_path / "out.jsonl", "--image-folder", str(red)) == 2
    assert_one_line_error(capsys, 2, "a file, not a folder")


def test_llamafactory_mllm_demo_is_read_through_its_dataset_info(tmp_path):
    """LLaMA-Factory's registry entry with an `images` column (its do_predict's multimodal data): the pictures
    resolved from the data file's folder, one per <image> of the prompt."""
    import shutil

    from tunelab.chat.predict import read_test_samples

    for name in ("dataset_info.json", "mllm_demo.json"):
        shutil.copy(Path(__file__).parent / "fixtures" / "ecosystem" / "llamafactory" / name, tmp_path / name)
    records = json.loads((tmp_path / "mllm_demo.json").read_text())
    for ref in {ref for record in records for ref in record["images"]}:
        _picture(tmp_path / ref, "red")
    samples = read_test_samples(tmp_path / "dataset_info.json", dataset="mllm_demo")
    assert [s.images for s in samples] == [[str(tmp_path / ref) for ref in r["images"]] for r in records]
    assert all(sum(m["content"].count("<image>") for m in s.prompt) == len(s.images) for s in samples)
    assert all(s.reply is not None for s in samples)


def test_a_missing_or_broken_image_is_named_before_the_model_loads(tmp_path, capsys):
    _picture(tmp_path / "red.png", "red")
    data = _jsonl(tmp_path / "test.jsonl", [_llava_record("red.png"), _llava_record("gone.png")])
    assert _predict(tmp_path / "no_model", data, tmp_path / "out.jsonl") == 2
    message = assert_one_line_error(capsys, 2, f"{data} line 2: image 1 'gone.png': no such file "
                                    f"({tmp_path / 'gone.png'})", "set --image-folder")
    assert "no_model" not in message and not (tmp_path / "out.jsonl").exists()

    (tmp_path / "gone.png").write_bytes(b"not a picture")
    assert _predict(tmp_path / "no_model", data, tmp_path / "out.jsonl") == 2
    message = assert_one_line_error(capsys, 2, f"{data} line 2: image {tmp_path / 'gone.png'} cannot be read",
                                    "leave the record out of the test set")
    assert "no_model" not in message and "skip_invalid" not in message
    assert "(not a picture in a format it knows)" in message and " at 0x" not in message  # Pillow's object, left out


def test_a_text_model_refuses_image_samples_before_generating(tiny_llama_dir, tmp_path, capsys):
    _picture(tmp_path / "red.png", "red")
    data = _jsonl(tmp_path / "test.jsonl", [{"instruction": "Hi", "output": "Hello"}, _llava_record("red.png"),
                                            _llava_record("red.png")])
    assert _predict(tiny_llama_dir, data, tmp_path / "out.jsonl", "--prompt-template", "qwen_chat") == 2
    assert_one_line_error(capsys, 2, f"{data} line 2: an image sample (2 in the test set)", "reads text only",
                          "with a LLaVA model")
    assert _lines(tmp_path / "out.jsonl") == []  # nothing generated, not a failed line per image sample


# --- the scores -------------------------------------------------------------------------------------------------

EN = ("I am a cat.", "I am TuneBot, your helper.")
ZH = ("我是小助手，很高兴为你服务。", "我是小助手，由张三开发的人工智能助手。")


def _library_scores(prediction: str, reference: str) -> dict:
    """LLaMA-Factory's ComputeSimilarity, written out with the libraries."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hyp, ref = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    rouge = Rouge().get_scores(hyp, ref)[0]
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return {"bleu-4": round(bleu * 100, 4), **{k: round(v["f"] * 100, 4) for k, v in rouge.items()}}


@pytest.mark.parametrize("pair", [EN, ZH])
def test_scores_equal_the_libraries_values(pair):
    from tunelab.chat.metrics import similarity

    assert similarity(*pair) == _library_scores(*pair)
    assert similarity(pair[1], pair[1]) == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}


def test_scores_by_hand():
    from tunelab.chat.metrics import similarity, summarise

    # words I, am, a, cat, . against I, am, TuneBot, ",", your, helper, .: 3 shared of 5 and 7 words (F1 0.5), one
    # shared bigram of 4 and 6 (F1 0.2), the longest common subsequence I am . (F1 0.5)
    scores = similarity(*EN)
    assert (scores["rouge-1"], scores["rouge-2"], scores["rouge-l"]) == (50.0, 20.0, 50.0)
    assert 0 < scores["bleu-4"] < 20
    assert similarity("", "abc") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    rows = [{"prediction": EN[1], "reference": f" {EN[1]} "}, {"prediction": EN[0], "reference": EN[1]},
            {"prediction": "x", "reference": None}, {"prediction": None, "reference": "y", "error": "too long"}]
    result = summarise(rows)
    assert result["exact_match"] == 50.0 and (result["count"], result["scored"]) == (4, 2)
    assert (result["without_reference"], result["failed"]) == (1, 1)
    assert result["rouge-1"] == round((100 + 50) / 2, 4)


def test_without_the_libraries_predictions_and_exact_match_are_still_written(tiny_llama_dir, tmp_path, capsys,
                                                                              monkeypatch):
    import tunelab.chat.metrics as metrics

    monkeypatch.setattr(metrics, "missing_libraries", lambda: ["nltk", "rouge-chinese"])
    data = _jsonl(tmp_path / "t.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    assert _predict(tiny_llama_dir, data, tmp_path / "p.jsonl") == 0
    result = json.loads((tmp_path / "p.jsonl.metrics.json").read_text())
    assert "exact_match" in result and "bleu-4" not in result and len(_lines(tmp_path / "p.jsonl")) == 1
    assert "pip install 'tunelab[metrics]'" in capsys.readouterr().err


def test_a_text_too_long_for_rouge_is_left_out_of_its_means_and_counted():
    """rouge_chinese's recursion would stop the scoring past ~10,000 words (and takes minutes before that)."""
    from tunelab.chat.metrics import ROUGE_MAX_WORDS, similarity, summarise

    long_text = "word " * (ROUGE_MAX_WORDS + 1)
    scores = similarity(long_text, "word word")
    assert scores["rouge-l"] is None and scores["bleu-4"] is not None
    result = summarise([{"prediction": long_text, "reference": "word word"},
                        {"prediction": EN[1], "reference": EN[1]}])
    assert result["rouge_skipped"] == 1 and result["rouge-l"] == 100.0 and result["scored"] == 2


# --- reasoning models -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, text", [
    ("qwen3_chat", "<think>\nThey ask my name.\n</think>\n\nI am TuneBot."),
    ("deepseek_r1", "They ask my name.\n</think>\n\nI am TuneBot."),  # its generation prompt opened the block
])
def test_the_answers_are_scored_and_the_reasoning_kept_beside_them(tiny_tokenizer, tmp_path, template, text):
    """A model whose template writes reasoning (Qwen3, DeepSeek-R1) writes it before its answer: the prediction is the
    answer, which matches a reference whose answer it is; the reasoning is kept in the line. The reference is the
    answer part of what the template writes: Qwen3's empty block before a plain reply, or the reasoning of a reply
    that has some (kept as reference_reasoning), left out."""
    from tests.chat_helpers import Scripted
    from tunelab.chat.engine import ChatModel
    from tunelab.chat.metrics import summarise
    from tunelab.chat.predict import predict, read_lines, read_test_samples
    from tunelab.data.templates import get_template
    from tunelab.model.generate import GenerationSettings

    data = _jsonl(tmp_path / "t.jsonl", [
        {"instruction": "Who are you?", "output": "I am TuneBot."},
        {"messages": [{"role": "user", "content": "Your name?"},
                      {"role": "assistant", "content": "I am TuneBot.", "reasoning_content": "Name myself."}]},
        {"instruction": "Who made you?", "output": "Someone else."}])
    chat = ChatModel(model=None, tokenizer=tiny_tokenizer, template=get_template(template), _batcher=Scripted([text]))
    out = tmp_path / "p.jsonl"
    out.write_text("")
    predict(chat, read_test_samples(data), out, GenerationSettings(max_new_tokens=16))
    rows = read_lines(out)
    assert [r["prediction"] for r in rows] == ["I am TuneBot."] * 3
    assert [r["reasoning"] for r in rows] == ["They ask my name."] * 3
    assert [r["reference"] for r in rows] == ["I am TuneBot.", "I am TuneBot.", "Someone else."]
    assert [r.get("reference_reasoning") for r in rows] == [None, "Name myself.", None]
    result = summarise(rows)
    assert result["exact_match"] == round(200 / 3, 4) and result["with_reasoning"] == 3


def _predicted_row(tokenizer, tmp_path, reply: str) -> dict:
    """The line `predict` writes for one question whose model replies `reply` (qwen2_5_chat), as read back."""
    from tests.chat_helpers import Scripted
    from tunelab.chat.engine import ChatModel
    from tunelab.chat.predict import predict, read_lines, read_test_samples
    from tunelab.data.templates import get_template
    from tunelab.model.generate import GenerationSettings

    data = _jsonl(tmp_path / "t.jsonl", [{"instruction": "Who are you?", "output": "I am TuneBot."}])
    chat = ChatModel(model=None, tokenizer=tokenizer, template=get_template("qwen2_5_chat"),
                     _batcher=Scripted([reply]))
    out = tmp_path / "p.jsonl"
    out.write_text("")
    predict(chat, read_test_samples(data), out, GenerationSettings(max_new_tokens=16))
    [row] = read_lines(out)
    return row


def test_a_template_without_reasoning_scores_the_whole_reply(tiny_tokenizer, tmp_path):
    """A guard: where the template writes no reasoning, a <think> block is text like any other, as before."""
    text = "<think>\nThey ask my name.\n</think>\n\nI am TuneBot."
    row = _predicted_row(tiny_tokenizer, tmp_path, text)
    assert row["prediction"] == text and row["reference"] == "I am TuneBot." and "reasoning" not in row


@pytest.mark.parametrize("template", ["qwen3_chat", "deepseek_r1"])
def test_a_reference_of_reasoning_alone_is_no_reference(tiny_tokenizer, tmp_path, template):
    """A reply that holds reasoning and no answer leaves no answer to score against: the sample is predicted without a
    reference (its reasoning kept), as a template without reasoning leaves it, not scored against an empty text."""
    from tests.chat_helpers import Scripted
    from tunelab.chat.engine import ChatModel
    from tunelab.chat.metrics import summarise
    from tunelab.chat.predict import predict, read_lines, read_test_samples
    from tunelab.data.templates import get_template
    from tunelab.model.generate import GenerationSettings

    data = _jsonl(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": "Your name?"},
                      {"role": "assistant", "content": "", "reasoning_content": "Name myself."}]},
        {"instruction": "Who are you?", "output": "I am TuneBot."}])
    chat = ChatModel(model=None, tokenizer=tiny_tokenizer, template=get_template(template),
                     _batcher=Scripted(["<think>\nMe.\n</think>\n\nI am TuneBot."]))
    out = tmp_path / "p.jsonl"
    out.write_text("")
    predict(chat, read_test_samples(data), out, GenerationSettings(max_new_tokens=16))
    first, second = read_lines(out)
    assert first["reference"] is None and first["reference_reasoning"] == "Name myself."
    assert first["note"] == "no reference: the reply is reasoning alone, with no answer to score"
    assert first["prediction"] == "I am TuneBot." and second["reference"] == "I am TuneBot."
    result = summarise([first, second])
    assert (result["scored"], result["without_reference"], result["exact_match"]) == (1, 1, 100.0)


def test_a_prediction_holding_a_unicode_line_separator_is_read_back_whole(tiny_tokenizer, tmp_path):
    """JSON Lines end at '\\n' alone: a prediction may hold U+2028 or U+0085 (JSON leaves them raw), which
    `str.splitlines()` would also break at, so the summary read the file as broken lines."""
    text = "I am\u2028Tune\x85Bot."
    assert _predicted_row(tiny_tokenizer, tmp_path, text)["prediction"] == text
