"""Public data files of LLaMA-Factory, XTuner, OpenAI, ShareGPT, LLaVA and MS-Agent: each is read as its source means
it, or refused with a message naming the right kind of training; nothing is trained silently on the wrong thing.

The files are in tests/fixtures/ecosystem (sources in its README.md).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tunelab.cli.main import main
from tunelab.config.schema import TrainConfig
from tunelab.data.dataset import build_datasets
from tunelab.data.formats import normalise
from tunelab.data.multimodal import split_images
from tunelab.data.preference import normalise_kto, normalise_preference
from tunelab.data.sources import collect_samples
from tunelab.errors import TunelabError

DATA = Path(__file__).parent / "fixtures" / "ecosystem"
LF = DATA / "llamafactory"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


def _samples(data_path, **kw):
    """(samples, stats) read the way training reads them, without a tokenizer."""
    from tunelab.data.dataset import DataStats

    stats = DataStats()
    cfg = TrainConfig(data_path=data_path if isinstance(data_path, list) else str(data_path), **kw)
    return collect_samples(cfg, stats)[0], stats


def _trained(path, tokenizer, **kw):
    cfg = TrainConfig(**{"data_path": str(path), "prompt_template": "qwen_chat", "max_length": 1024,
                         "pack_to_max_length": False, **kw})
    bundle = build_datasets(cfg, tokenizer, log=lambda m: None)
    return [tokenizer.decode([t for t, l in zip(r["input_ids"], r["labels"]) if l != -100])
            for r in bundle.train_rows]


def _records(path):
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l]


def _check(path, capsys, *extra):
    code = main(["check-dataset", str(path), *extra])
    return code, capsys.readouterr().out


# --- LLaMA-Factory ------------------------------------------------------------------------------

def test_content_parts_are_trained_as_text_not_as_an_empty_reply(tiny_tokenizer):
    # v1_sft_demo.jsonl: {"role", "content": [{"type": "text", "value": ...}], "loss_weight"}
    trained = _trained(LF / "v1_sft_demo.jsonl", tiny_tokenizer)
    replies = [r["messages"][1]["content"][0]["value"] for r in _records(LF / "v1_sft_demo.jsonl")]
    assert trained == [reply + "<|im_end|>" for reply in replies] and all(len(r) > 10 for r in replies)


def test_reasoning_parts_and_tool_definitions_reach_the_sample():
    (sample,), _ = _samples(LF / "reason_tool_use_demo.jsonl")
    system, user, reply = sample["messages"]
    assert system["role"] == "system" and user["content"] == "Can you track my recent refund?"
    assert reply["reasoning_content"].startswith("Okay, the user wants to track their recent refund.")
    assert reply["content"].startswith("I'm sorry, but I need the refund_transaction_id")
    assert [t["function"]["name"] for t in sample["tools"]] == ["track_refund_status"]
    assert sample["tools"][0]["type"] == "function"


def test_sharegpt_function_calls_become_tool_calls_with_their_definitions():
    (sample,), stats = _samples(LF / "glaive_toolcall_en_demo.json")
    messages = sample["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"] * 3
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculate_area",
                                          "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}}]}
    assert messages[2] == {"role": "tool", "content": "{\"area\": 15}", "name": "calculate_area"}
    assert [t["function"]["name"] for t in sample["tools"]] == ["calculate_area", "calculate_discount"]
    assert stats.files[0]["formats"] == {"agent": 1} and not stats.reading_warnings()


def test_identity_placeholders_are_reported_or_filled(tmp_path, tiny_tokenizer, capsys):
    code, out = _check(LF / "identity.json", capsys)
    assert code == 0 and "3 samples with {{author}}, {{name}}" in out and "trained as written" in out
    assert "'placeholders': {'author': '...', 'name': '...'}" in out and "read the 1 warnings above" in out
    filled = _trained(LF / "identity.json", tiny_tokenizer)
    assert "{{name}}" in filled[0]  # what training does unless told: the warning above is the guard
    cfg_path = [{"path": str(LF / "identity.json"), "placeholders": {"name": "TuneBot", "author": "Alice"}}]
    samples, stats = _samples(cfg_path)
    assert samples[0]["messages"][1]["content"] == ("Hello! I am TuneBot, an AI assistant developed by Alice. "
                                                   "How can I assist you today?")
    assert stats.files[0]["filled"] == 3 and not stats.reading_warnings()
    out_file = tmp_path / "identity_filled.json"
    # the command the warning suggests, as written (its -o, beside the fixture, sent to tmp_path instead)
    suggested = re.search(r"`tunelab (data self-cognition [^`]+)`", out).group(1)
    argv = shlex.split(suggested.replace("NAME", "TuneBot").replace("AUTHOR", "Alice"))
    assert argv[-2:] == ["-o", str(LF / "identity_filled.json")], argv
    assert main(argv[:-1] + [str(out_file)]) == 0
    assert "{{" not in out_file.read_text() and "TuneBot" in out_file.read_text()
    assert json.loads(out_file.read_text())[0].keys() == _records(LF / "identity.json")[0].keys()


@pytest.mark.parametrize("name, words", [
    ("dpo_en_demo.json", ["record 0: this is preference data ('chosen' and 'rejected'", "objective = 'dpo'"]),
    ("v1_dpo_demo.jsonl", ["line 1: this is preference data ('chosen_messages' and 'rejected_messages'"]),
    ("kto_en_demo.json", ["record 0: this is KTO data", "labelled false (undesirable)", "objective = 'kto'"]),
    ("mllm_demo.json", ["record 0: the record has 'images'", "multimodal training", "list-cfg -p llava"]),
    ("v1_multimodal_demo.jsonl", ["messages[0].content[0] is an image ('image_url' part)", "list-cfg -p llava"]),
])
def test_preference_kto_and_image_data_are_refused_by_supervised_training(name, words, capsys, tiny_tokenizer):
    code, out = _check(LF / name, capsys)
    assert code == 1 and all(w in out for w in words), out
    with pytest.raises(TunelabError, match="preference|KTO|multimodal"):
        _trained(LF / name, tiny_tokenizer)


def test_pretraining_files_are_plain_text(tiny_tokenizer):
    samples, stats = _samples([str(LF / "c4_demo.jsonl"), str(LF / "wiki_demo.txt")])
    assert [next(iter(s)) for s in samples] == ["text"] * 4
    assert [f["formats"] for f in stats.files] == [{"text": 2}, {"text": 2}]


def test_dataset_info_json_is_a_registry(tiny_tokenizer, capsys):
    registry = str(LF / "dataset_info.json")
    samples, stats = _samples([{"path": registry, "dataset": "alpaca_en_demo,glaive_toolcall_en_demo,c4_demo"}])
    assert [f["formats"] for f in stats.files] == [{"alpaca": 3}, {"sharegpt": 1}, {"text": 2}]
    assert samples[3]["tools"][0]["function"]["name"] == "calculate_area"
    assert samples[3]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"shape": "rectangle",
                                                                                  "dimensions": [5, 3]}
    with pytest.raises(TunelabError, match=r"name the datasets to use.*Datasets with a local file: identity, "
                                           r"alpaca_en_demo"):
        _samples(registry)
    with pytest.raises(TunelabError, match=r"dataset 'dpo_en_demo' of .*: this is preference data"):
        _samples([{"path": registry, "dataset": "dpo_en_demo"}])
    with pytest.raises(TunelabError, match=r"dataset 'kto_en_demo' .*KTO data"):
        _samples([{"path": registry, "dataset": "kto_en_demo"}])
    with pytest.raises(TunelabError, match=r"dataset 'mllm_demo' .* has images .*multimodal"):
        _samples([{"path": registry, "dataset": "mllm_demo"}])
    with pytest.raises(TunelabError, match=r"no dataset 'identiy'.*Did you mean 'identity'"):
        _samples([{"path": registry, "dataset": "identiy"}])
    code, out = _check(registry, capsys, "--dataset", "identity")
    assert code == 0 and "'dataset': 'identity', 'placeholders'" in out


def test_registry_columns_tags_and_num_samples(tmp_path):
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}", "src": "web"})
                                                  for i in range(10)))
    (tmp_path / "chat.json").write_text(json.dumps([{"dialog": [{"speaker": "me", "text": "hi"},
                                                                {"speaker": "bot", "text": "hello"}],
                                                     "sys": "Be kind."}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "q", "response": "a"}, "num_samples": 4},
        "chat": {"file_name": "chat.json", "formatting": "sharegpt",
                 "columns": {"messages": "dialog", "system": "sys"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
    }))
    samples, stats = _samples([{"path": str(tmp_path / "dataset_info.json"), "dataset": ["qa", "chat"]}])
    assert len(samples) == 5 and samples[0]["messages"][1]["content"].startswith("a")
    assert samples[4]["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello"}]
    assert "'src' not used (10 records" in stats.reading_warnings()[0] and "LLaMA-Factory does not read it" in \
        stats.reading_warnings()[0]


@pytest.mark.parametrize("block, entry, fix", [
    ("columns", {"columns": {"prompt": "q", "sytem": "s"}}, "Did you mean 'system'?"),
    ("tags", {"formatting": "sharegpt", "tags": {"assistent_tag": "bot"}}, "Did you mean 'assistant_tag'?"),
])
def test_a_misspelt_registry_column_or_tag_is_named(tmp_path, block, entry, fix):
    """A misspelt name would map nothing, and the field it meant would be read as unused or not at all."""
    (tmp_path / "qa.jsonl").write_text(json.dumps({"q": "q", "s": "Be kind.", "a": "a"}))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"qa": {"file_name": "qa.jsonl", **entry}}))
    with pytest.raises(TunelabError, match=rf"dataset 'qa': unknown {block} key .*{fix}"):
        _samples([{"path": str(tmp_path / "dataset_info.json"), "dataset": "qa"}])


@pytest.mark.parametrize("entry, says", [
    # each was a traceback: Path / None, an unhashable column name, int(nan) or a negative sample size
    ({"file_name": None}, r"'file_name' should be a file name \(text\), found None"),
    ({"file_name": ["qa.jsonl"]}, r"'file_name' should be a file name \(text\), found list"),
    ({"file_name": "qa.jsonl", "columns": {"prompt": ["q"]}}, r"columns 'prompt' should name a field \(text\), "
                                                             r"found list"),
    ({"file_name": "qa.jsonl", "formatting": "sharegpt", "tags": {"role_tag": {}}},
     r"tags 'role_tag' should name a field \(text\), found dict"),
    ({"file_name": "qa.jsonl", "num_samples": -1}, r"num_samples should be a whole number, 1 or more; found -1"),
    ({"file_name": "qa.jsonl", "num_samples": "all"}, r"num_samples should be a whole number, 1 or more; found 'all'"),
    # 0 read every record, as if num_samples were not there
    ({"file_name": "qa.jsonl", "num_samples": 0}, r"num_samples should be a whole number, 1 or more; found 0"),
])
def test_a_registry_entry_value_of_the_wrong_kind_is_named(tmp_path, entry, says):
    (tmp_path / "qa.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"qa": entry}))
    with pytest.raises(TunelabError, match=rf"dataset_info\.json dataset 'qa': {says}"):
        _samples([{"path": str(tmp_path / "dataset_info.json"), "dataset": "qa"}])


# --- XTuner -----------------------------------------------------------------------------------------

def test_xtuner_openai_lines_that_are_bare_message_lists(tiny_tokenizer):
    # tests/resource/openai_sft.jsonl: each line is [{"content", "role"}, ...]
    trained = _trained(DATA / "xtuner" / "openai_sft.jsonl", tiny_tokenizer)
    assert trained[1] == "The three primary colors are red, blue, and yellow.<|im_end|>"


def test_xtuner_format_name_openai_and_loss_false():
    record = {"messages": [{"role": "system", "content": "xxx."}, {"role": "user", "content": "q1"},
                           {"role": "assistant", "content": "a1", "loss": False}, {"role": "user", "content": "q2"},
                           {"role": "assistant", "content": "a2", "loss": True}]}  # the custom-dataset config's doc
    messages = normalise(record, "openai", "r")["messages"]
    assert messages[2] == {"role": "assistant", "content": "a1", "train": False} and "train" not in messages[4]
    assert normalise({"messages": record["messages"][:3]}, "openai", "r")["messages"][2]["train"] is False


def test_xtuner_pretraining_conversation_is_text_not_a_chat(tiny_tokenizer):
    trained = _trained(DATA / "xtuner" / "conversation_formats.json", tiny_tokenizer)
    assert trained[0] == "Hello! How can I help you?<|im_end|>Today is Monday, August 14, 2023.<|im_end|>" \
                         "You are welcome.<|im_end|>"
    assert trained[1].startswith("I am an artificial intelligence (AI) assistant named Puyu.") and \
        "<|im_start|>" not in trained[1]  # every token trained, no chat template


# --- OpenAI, ShareGPT, LLaVA, MS-Agent ------------------------------------------------------------

def test_openai_weight_tools_and_tool_results(capsys):
    first, second = _samples(DATA / "openai" / "chat_weight_tools.jsonl")[0]
    assert first["messages"][2] == {"role": "assistant", "content": "Paris", "train": False}
    assert "train" not in first["messages"][4]
    call, result = second["messages"][1], second["messages"][2]
    assert call["tool_calls"] == [{"type": "function", "id": "call_id", "function": {
        "name": "get_current_weather", "arguments": {"location": "San Francisco, USA", "format": "celsius"}}}]
    assert result == {"role": "tool", "content": "21.0", "name": "get_current_weather", "tool_call_id": "call_id"}
    assert second["tools"][0]["function"]["parameters"]["required"] == ["location", "format"]
    code, out = _check(DATA / "openai" / "chat_weight_tools.jsonl", capsys)
    assert code == 0 and "field 'parallel_tool_calls' not used (1 record, first at" in out


def test_openai_dpo_and_vision_are_refused_then_read_by_their_own_functions(capsys):
    code, out = _check(DATA / "openai" / "dpo.jsonl", capsys)
    assert code == 1 and "('preferred_output' and 'non_preferred_output'" in out
    pair = normalise_preference(_records(DATA / "openai" / "dpo.jsonl")[0])
    assert pair["prompt"] == [{"role": "user", "content": "Hello, can you tell me how cold San Francisco is today?"}]
    assert pair["rejected"] == {"role": "assistant", "content": "It is not particularly cold in San Francisco today."}
    code, out = _check(DATA / "openai" / "vision.jsonl", capsys)
    assert code == 1 and "messages[2].content[0] is an image" in out
    sample = split_images(_records(DATA / "openai" / "vision.jsonl")[0])
    assert sample["images"] == ["https://upload.wikimedia.org/wikipedia/commons/3/36/Danbo_Cheese.jpg"]
    assert sample["messages"][2] == {"role": "user", "content": "<image>"}


def test_sharegpt_dump_reports_its_id(capsys):
    code, out = _check(DATA / "sharegpt" / "sharegpt_dump.json", capsys)
    assert code == 0 and "format sharegpt (1)" in out and "field 'id' not used (1 record" in out


def test_llava_and_llamafactory_images_come_out_with_their_placeholders(capsys):
    code, out = _check(DATA / "llava" / "llava_instruct.json", capsys)
    assert code == 1 and "the record has 'image'" in out
    llava = split_images(_records(DATA / "llava" / "llava_instruct.json")[0])
    assert llava["images"] == ["coco/train2017/000000033471.jpg"]
    assert llava["messages"][0]["content"] == "<image>\nWhat are the colors of the bus in the image?"
    mllm = split_images(_records(LF / "mllm_demo.json")[0])
    assert mllm["images"] == ["mllm_demo_data/1.jpg", "mllm_demo_data/1.jpg"]
    assert mllm["messages"][2]["content"] == "What are they doing?<image>"
    v1 = split_images(_records(LF / "v1_multimodal_demo.jsonl")[0])
    assert v1["images"] == ["data/mllm_demo_data/1.jpg", "data/mllm_demo_data/1.jpg"]
    assert v1["messages"][0]["content"] == "<image>Who are they?"


def test_ms_agent_calls_become_tool_calls():
    (sample,), stats = _samples(DATA / "msagent" / "ms_agent.jsonl")
    system, user, call, result, reply = sample["messages"]
    assert call == {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "modelscope_text-address", "arguments": {"text": "浙江杭州市江干区九堡镇三村村一区"}}}]}
    assert result == {"role": "tool", "content": "{\"prov\": \"浙江省\", \"city\": \"杭州市\"}",
                      "name": "modelscope_text-address"}
    assert reply == {"role": "assistant", "content": "地址解析结果：浙江省杭州市。"}
    assert stats.files[0]["formats"] == {"agent": 1}


# InternLM's chat/chat_format.md, the user's turn to the end, byte for byte (its function-call example).
INTERNLM2_DOC = (
    "<|im_start|>user\nI want to know today's weather in Shanghai<|im_end|>\n<|im_start|>assistant\nSure, I will "
    "search for the weather of Shanghai.<|action_start|><|plugin|>\n{\"name\": \"get_current_weather\", "
    "\"parameters\": {\"location\": \"Shanghai\"}}<|action_end|><|im_end|>\n<|im_start|>environment "
    "name=<|plugin|>\n{\"temperature\": 22}<|im_end|>\n<|im_start|>assistant\nThe weather in Shanghai is 22 "
    "celsius<|im_end|>\n")


def test_internlm2_agent_markup_becomes_tool_calls_written_as_internlm_documents_them():
    from tunelab.data.templates import get_template

    (sample,), stats = _samples(DATA / "internlm" / "chat_format_plugin.jsonl")
    system, user, call, result, reply = sample["messages"]
    assert call == {"role": "assistant", "content": "Sure, I will search for the weather of Shanghai.",
                    "tool_calls": [{"type": "function", "function": {
                        "name": "get_current_weather", "arguments": {"location": "Shanghai"}}}]}
    assert result == {"role": "tool", "content": "{\"temperature\": 22}", "name": "get_current_weather"}
    assert [t["function"]["name"] for t in sample["tools"]] == ["get_current_weather"]
    assert stats.files[0]["formats"] == {"agent": 1} and not stats.reading_warnings()  # name: the channel, read
    text = get_template("internlm2_chat").render(sample["messages"], tools=sample["tools"])
    assert text.startswith("<s><|im_start|>system\nYou are InternLM2-Chat, a harmless AI assistant<|im_end|>\n"
                           "<|im_start|>system name=<|plugin|>\n[{")
    assert text.endswith(INTERNLM2_DOC)
    # the same dialogue read from OpenAI's format is the same sample, so other templates write it their own way
    openai = {"messages": [sample["messages"][0], sample["messages"][1],
                           {"role": "assistant", "content": call["content"], "tool_calls": call["tool_calls"]},
                           {"role": "tool", "content": result["content"]}, reply], "tools": sample["tools"]}
    assert normalise(openai, "messages", "openai") == sample


def test_internlm2_agent_replies_are_trained_and_results_are_context(tmp_path, tiny_tokenizer):
    trained = _trained(DATA / "internlm" / "chat_format_plugin.jsonl", tiny_tokenizer, prompt_template="qwen2_5_chat")
    assert trained[0] == ('Sure, I will search for the weather of Shanghai.\n<tool_call>\n{"name": '
                          '"get_current_weather", "arguments": {"location": "Shanghai"}}\n</tool_call><|im_end|>'
                          'The weather in Shanghai is 22 celsius<|im_end|>')


@pytest.mark.parametrize("change, error", [
    (lambda m: m[3].update(content=m[3]["content"] + "More text."), "messages[3].content has text after its call"),
    (lambda m: m[3].update(content=m[3]["content"].replace("<|action_end|>", "")), "does not end in <|action_end|>"),
    (lambda m: m[3].update(content=m[3]["content"] + "<|action_start|><|plugin|>\n{"),
     "messages[3].content opens a call (<|action_start|>) that does not end in <|action_end|>"),
    (lambda m: m[3].update(content=m[3]["content"].replace("<|plugin|>", "")),
     "messages[3].content has a call without <|plugin|> or <|interpreter|> after <|action_start|>"),
    (lambda m: m[3].update(content=m[3]["content"].replace('"Shanghai"}}', '"Shanghai"}')),
     "messages[3] <|plugin|> call is not valid JSON"),
    (lambda m: m[3].update(content=m[3]["content"].replace('"name": "get_current_weather", ', '')),
     "messages[3] <|plugin|> call has no function name"),  # the call in the text, not a 'tool_calls' it lacks
    (lambda m: m[1].update(content="You can use these tools: get_current_weather"),
     "messages[1].content is not valid JSON"),
])
def test_internlm2_agent_markup_mistakes_name_the_turn(change, error):
    record = _records(DATA / "internlm" / "chat_format_plugin.jsonl")[0]
    change(record["messages"])
    with pytest.raises(TunelabError, match=re.escape(error)):
        normalise(record, "agent", "d.jsonl line 1")


def test_internlm2_tools_given_twice_are_refused():
    record = _records(DATA / "internlm" / "chat_format_plugin.jsonl")[0]
    record["tools"] = [{"type": "function", "function": {"name": "other"}}]
    with pytest.raises(TunelabError, match="tool definitions twice"):
        normalise(record, "messages", "d.jsonl line 1")


@pytest.mark.parametrize("fmt", ["agent", "sharegpt"])
def test_internlm2_messages_in_sharegpt_conversations_are_read_as_in_messages(fmt):
    """ShareGPT's field holding role messages (as LLaMA-Factory's role tags write them): the markup is read there
    too, not trained as text with the plugin system message a second system prompt."""
    record = _records(DATA / "internlm" / "chat_format_plugin.jsonl")[0]
    as_sharegpt = {"conversations": record["messages"]}
    assert normalise(as_sharegpt, fmt, "d.jsonl line 1") == normalise(record, "agent", "d.jsonl line 1")


def test_internlm2_result_loses_its_name_only_where_it_names_the_plugin_channel():
    record = _records(DATA / "internlm" / "chat_format_plugin.jsonl")[0]
    record["messages"][4].update(role="tool")  # 'plugin' on a tool result too: the channel, not the function
    assert normalise(record, "agent", "d.jsonl line 1")["messages"][3]["name"] == "get_current_weather"
    # an environment result named after its function, after a reply that calls it in words: the name is kept
    record["messages"][3]["content"] = "Action: get_current_weather\nAction Input: {\"location\": \"Shanghai\"}"
    record["messages"][4].update(role="environment", name="get_current_weather")
    assert normalise(record, "agent", "d.jsonl line 1")["messages"][3] == {
        "role": "tool", "content": "{\"temperature\": 22}", "name": "get_current_weather"}


# InternLM's chat/chat_format.md, its code-interpreter example byte for byte (chat_format_interpreter.txt), as lagent's
# messages hold it (chat_format_interpreter.jsonl): the doc's attached-file turn (`user name=file`) is left out of
# both, as no canonical message holds it.
INTERPRETER = DATA / "internlm" / "chat_format_interpreter.jsonl"
FILE_TURN = "<|im_start|>user name=file\n[{\"path\": \"data.csv\", size='10K'}]<|im_end|>\n"


def _interpreter_doc() -> str:
    doc = (DATA / "internlm" / "chat_format_interpreter.txt").read_text(encoding="utf-8")
    assert FILE_TURN in doc
    return doc.replace(FILE_TURN, "")


def test_internlm2_code_interpreter_turns_become_custom_calls_written_as_internlm_documents_them():
    from tunelab.data.templates import get_template

    raw = _records(INTERPRETER)[0]["messages"]
    code = raw[3]["content"].split("<|action_start|><|interpreter|>\n")[1].split("<|action_end|>")[0]
    assert code.startswith("```python\nimport plotly.express as px\n") and code.endswith("fig.show()\n```")
    (sample,), stats = _samples(INTERPRETER)
    system, user, call, result, reply, *rest = sample["messages"]
    # a code cell is text, not JSON arguments: OpenAI's free-form (custom) tool call carries it as it is
    assert call == {"role": "assistant", "content": "I have processed the data and visualized it for you.\n\n",
                    "tool_calls": [{"type": "custom", "custom": {"name": "interpreter", "input": code}}]}
    assert result == {"role": "tool", "content": "![image](xxx.png)\n", "name": "interpreter"}
    assert sample["tools"] == [{"type": "custom", "custom": {"name": "interpreter",
                                                             "description": raw[1]["content"]}}]
    assert stats.files[0]["formats"] == {"agent": 1} and not stats.reading_warnings()
    text = get_template("internlm2_chat").render(sample["messages"], tools=sample["tools"])
    assert text == "<s>" + _interpreter_doc()
    # the same dialogue in OpenAI's format (a custom tool and a custom call answered by id) is written the same
    openai = {"messages": [raw[0], raw[2], {"role": "assistant", "content": call["content"], "tool_calls": [
        {"id": "call_1", "type": "custom", "custom": {"name": "interpreter", "input": code}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": result["content"]}, *raw[5:]],
        "tools": [{"type": "custom", "custom": {"name": "interpreter", "description": raw[1]["content"]}}]}
    read = normalise(openai, "messages", "openai")
    assert get_template("internlm2_chat").render(read["messages"], tools=read["tools"]) == "<s>" + _interpreter_doc()


def test_internlm2_interpreter_and_plugin_system_prompts_come_in_the_documented_order():
    """chat_format.md's "Function Call + Code Interpreter": the interpreter's system prompt, then the plugins'."""
    from tunelab.data.templates import get_template

    interpreter = {"type": "custom", "custom": {"name": "interpreter", "description": "Run Python."}}
    weather = {"type": "function", "function": {"name": "get_current_weather", "parameters": {}}}
    text = get_template("internlm2_chat").render([{"role": "user", "content": "Hi"}], tools=[weather, interpreter])
    assert text == ("<s><|im_start|>system name=<|interpreter|>\nRun Python.<|im_end|>\n<|im_start|>system "
                    "name=<|plugin|>\n[{\"name\": \"get_current_weather\", \"parameters\": {}}]<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n")


def test_internlm2_code_interpreter_call_is_trained_and_its_output_is_context(tiny_tokenizer):
    raw = _records(INTERPRETER)[0]["messages"]
    trained = _trained(INTERPRETER, tiny_tokenizer, prompt_template="internlm2_chat", max_length=4096)
    # the reply's text, its call up to <|action_end|> and the end of its turn; then the two later replies
    assert trained == [raw[3]["content"] + "<|im_end|>" + raw[5]["content"] + "<|im_end|>" + raw[7]["content"]
                       + "<|im_end|>"]
    assert "![image]" not in trained[0] and "Jupyter" not in trained[0]


@pytest.mark.parametrize("template", ["qwen2_5_chat", "llama3_1_chat"])
def test_free_form_calls_are_refused_by_templates_without_a_format_for_them(tiny_tokenizer, template):
    """A template that writes function calls only would write a code cell as no call at all: the record is invalid,
    named by file, line and reply, pointing at the template that writes it."""
    with pytest.raises(TunelabError, match=re.escape(
            f"chat_format_interpreter.jsonl line 1: reply 1's tool_calls[0] is a free-form (custom) call to "
            f"'interpreter', which template {template!r} does not write") + ".*internlm2_chat"):
        _trained(INTERPRETER, tiny_tokenizer, prompt_template=template)


def test_internlm2_writes_one_free_form_tool_its_code_interpreter(tmp_path, tiny_tokenizer):
    record = {"messages": [{"role": "user", "content": "2**10?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "custom", "custom": {"name": "shell", "input": "echo $((2**10))"}}]},
        {"role": "tool", "content": "1024"}, {"role": "assistant", "content": "1024"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(TunelabError, match=re.escape(
            "d.jsonl line 1: reply 1's tool_calls[0] is a free-form (custom) call to 'shell', which template "
            "'internlm2_chat' does not write: it writes free-form calls to 'interpreter'")):
        _trained(path, tiny_tokenizer, prompt_template="internlm2_chat")


@pytest.mark.parametrize("change, error", [
    (lambda m: m[3].update(content=m[3]["content"] + "Done."), "messages[3].content has text after its call"),
    (lambda m: m[3].update(content=m[3]["content"].replace("<|action_end|>", "")), "does not end in <|action_end|>"),
    (lambda m: m[2].update(name="interpreter"), "messages[2] is a 'user' turn named 'interpreter'"),
])
def test_internlm2_interpreter_markup_mistakes_name_the_turn(change, error):
    record = _records(INTERPRETER)[0]
    change(record["messages"])
    with pytest.raises(TunelabError, match=re.escape(error)):
        normalise(record, "agent", "d.jsonl line 1")


def test_agent_flan_conversation_of_messages_keeps_its_loss_switches(capsys, tiny_tokenizer):
    path = DATA / "internlm" / "agent_flan.jsonl"
    (react, negative), stats = _samples(path)
    assert [m["role"] for m in react["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert negative["messages"][1] == {"role": "assistant", "content": "Hi! How can I help?", "train": False}
    assert stats.files[0]["formats"] == {"conversation": 2}
    code, out = _check(path, capsys)
    assert code == 0 and "'id' not used" in out and "loss" not in out and "role" not in out
    trained = _trained(path, tiny_tokenizer)
    assert "Action: go to countertop 1" in trained[0] and "Observation" not in trained[0]
    assert "Hi! How can I help?" not in trained[1] and "outstanding in his field" in trained[1]


@pytest.mark.parametrize("turns, problem", [
    ([{"role": "system", "content": "Be brief."}, {"input": "Hi", "output": "Hello!"}],
     "conversation[0] is a message ({role, content}) and conversation[1] is not"),
    ([{"input": "Hi", "output": "Hello!"}, {"role": "user", "content": "Who are you?"},
      {"role": "assistant", "content": "An assistant."}],
     "conversation[1] is a message ({role, content}) and conversation[0] is not"),
])
def test_a_conversation_mixing_messages_and_xtuner_turns_is_refused_naming_both(turns, problem):
    with pytest.raises(TunelabError, match=re.escape(problem) + ".*in one shape"):
        normalise({"conversation": turns}, "conversation", "d.jsonl line 1")


def test_kto_records_keep_their_label():
    good, bad = (normalise_kto(r, f"record {i}") for i, r in enumerate(_records(LF / "kto_en_demo.json")[:2]))
    assert (good["label"], bad["label"]) == (True, False)
    assert good["prompt"][-1]["role"] == "user" and good["completion"]["role"] == "assistant"
    pair = normalise_preference(_records(LF / "v1_dpo_demo.jsonl")[0])
    assert [m["role"] for m in pair["prompt"]] == ["system", "user"]
    assert pair["chosen"]["content"] != pair["rejected"]["content"]


# --- reading and templates together ---------------------------------------------------------------

def test_tool_calls_and_switches_from_files_are_trained_in_the_templates_native_format(tmp_path, tiny_tokenizer):
    # glaive (ShareGPT function_call / observation) through Qwen2.5's template: the calls are trained as its
    # <tool_call> blocks, the results are context; OpenAI weight 0 keeps a reply out of training.
    trained = _trained(LF / "glaive_toolcall_en_demo.json", tiny_tokenizer, prompt_template="qwen2_5_chat",
                       max_length=8192)[0]
    assert trained.startswith('<tool_call>\n{"name": "calculate_area", "arguments": {"shape": "rectangle", '
                              '"dimensions": [5, 3]}}\n</tool_call><|im_end|>')
    assert trained.count("<tool_call>") == 3 and "area\": 15" not in trained
    path = tmp_path / "weights.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "not this one", "weight": 0},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "this one"}]}) + "\n")
    assert _trained(path, tiny_tokenizer) == ["this one<|im_end|>"]
