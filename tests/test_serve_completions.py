"""`tunelab serve`'s /v1/completions (OpenAI's legacy text completion, as vLLM serves it), through the official
`openai` client: a prompt continued as it is (text or token ids, one or several), streamed or not, echo, the legacy
logprobs against the model's own (the prompt's too, read as lm-evaluation-harness reads them), and each refusal a 400
naming its field."""

from __future__ import annotations

import json
import urllib.request

import pytest

from chat_helpers import ANSWER, QUESTION, post_json, taught_model_dir

openai = pytest.importorskip("openai")

ASK = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def asked(taught_chat):
    """The question in the training template, as the token ids and the text a completion client would send."""
    ids = taught_chat.prompt(list(ASK))[0]
    return ids, taught_chat.tokenizer.decode(ids)


def test_a_prompt_in_the_template_is_continued_with_the_taught_answer(taught_client, taught_chat, asked):
    ids, text = asked
    for prompt in (text, ids):
        reply = taught_client.completions.create(model="m", prompt=prompt, max_tokens=40)
        assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
        assert [(c.index, c.text, c.finish_reason) for c in reply.choices] == [(0, ANSWER, "stop")]
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.usage.completion_tokens == len(taught_chat.tokenizer.encode(ANSWER, add_special_tokens=False)) + 1
    # no template around it: a bare text is continued as text (here, whatever the tiny model makes of it)
    bare = taught_client.completions.create(model="m", prompt="Who are you?", max_tokens=5)
    assert bare.choices[0].finish_reason in ("stop", "length")


def test_several_prompts_are_one_choice_each_as_each_alone(taught_client, taught_chat, asked):
    ids, text = asked
    other = taught_chat.prompt([{"role": "user", "content": "Tell me a story."}])[0]
    alone = taught_client.completions.create(model="m", prompt=other, max_tokens=12).choices[0].text
    both = taught_client.completions.create(model="m", prompt=[ids, other], max_tokens=12)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == ANSWER[:len(both.choices[0].text)] and both.choices[1].text == alone
    texts = taught_client.completions.create(model="m", prompt=[text, text], max_tokens=40)
    assert [c.text for c in texts.choices] == [ANSWER, ANSWER]
    assert texts.usage.prompt_tokens == 2 * len(ids)


def test_streamed_choices_arrive_in_pieces_under_their_index(taught_client, taught_chat, asked):
    ids, _ = asked
    other = taught_chat.prompt([{"role": "user", "content": "Tell me a story."}])[0]
    plain = taught_client.completions.create(model="m", prompt=[ids, other], max_tokens=20)
    pieces, finish, usage = {0: [], 1: []}, {}, None
    for chunk in taught_client.completions.create(model="m", prompt=[ids, other], max_tokens=20, stream=True,
                                           stream_options={"include_usage": True}):
        if not chunk.choices:
            usage = chunk.usage
        for c in chunk.choices:
            pieces[c.index].append(c.text)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert ["".join(pieces[i]) for i in (0, 1)] == [c.text for c in plain.choices]
    assert finish == {c.index: c.finish_reason for c in plain.choices}
    assert sum(1 for p in pieces[0] if p) > 1
    assert usage.total_tokens == plain.usage.total_tokens


def test_echo_puts_the_prompt_before_the_reply(taught_client, taught_chat, asked):
    ids, text = asked
    assert taught_client.completions.create(model="m", prompt=text, echo=True).choices[0].text == text + ANSWER
    streamed = taught_client.completions.create(model="m", prompt=text, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text + ANSWER


def test_logprobs_are_the_models_own_in_the_legacy_shape(taught_client, taught_chat, asked):
    import torch

    ids, _ = asked
    reply = taught_client.completions.create(model="m", prompt=ids, logprobs=2)
    choice = reply.choices[0]
    choice_logprobs = choice.logprobs
    assert "".join(choice_logprobs.tokens) == choice.text == ANSWER
    assert choice_logprobs.text_offset == [len("".join(choice_logprobs.tokens[:k]))
                                           for k in range(len(choice_logprobs.tokens))]
    reply_ids = taught_chat.tokenizer.encode(ANSWER, add_special_tokens=False)
    with torch.no_grad():
        reference = taught_chat.model(input_ids=torch.tensor([ids + reply_ids])).logits[0].float().log_softmax(-1)
    for k, (token, logprob, top) in enumerate(zip(reply_ids, choice_logprobs.token_logprobs,
                                                  choice_logprobs.top_logprobs)):
        row = reference[len(ids) - 1 + k]
        assert logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob, abs=1e-6)  # greedy: the likeliest
    streamed = taught_client.completions.create(model="m", prompt=ids, logprobs=2, stream=True)
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == choice_logprobs.tokens
    assert taught_client.completions.create(model="m", prompt=ids).choices[0].logprobs is None


@pytest.mark.parametrize("fields, param, says", [
    ({"prompt": ""}, "prompt", "prompt is empty"),
    ({"prompt": []}, "prompt", "should be a text, a list of texts"),
    ({"prompt": {"text": "hi"}}, "prompt", "should be a text, a list of texts"),
    ({"prompt": [1, "two"]}, "prompt", "should be a text, a list of texts"),
    ({"prompt": [[5, 6], []]}, "prompt", "prompt[1] is empty"),
    ({"prompt": [5, 99999999]}, "prompt", "99999999 is not a token id"),
    ({"prompt": "hi", "suffix": "end"}, "suffix", "not supported"),
    ({"prompt": "hi", "best_of": 3}, "best_of", "only 1"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs", "20"),
    ({"prompt": "hi", "n": 0}, "n", "1"),
    ({"prompt": "hi", "n": 1.5}, "n", "integer"),
    ({"prompt": "hi", "temperature": 5}, "temperature", "at most 2"),
    ({"prompt": "hi", "max_tokens": 5000}, "max_tokens", "--max-tokens-limit"),
    ({"prompt": "hi " * 3000, "max_tokens": 10}, "prompt", "the prompt alone takes"),
    ({"prompt": "hi"}, None, None),
])
def test_bad_completion_requests_get_a_400_naming_the_field(taught_server_url, fields, param, says):
    status, payload = post_json(f"{taught_server_url}/v1/completions", fields)
    if param is None:
        assert status == 200 and payload["choices"][0]["text"] is not None
        return
    assert status == 400, payload
    assert payload["error"]["param"] == param and says in payload["error"]["message"], payload


def test_echo_with_logprobs_scores_a_continuation_as_lm_evaluation_harness_reads_it(taught_client, taught_chat, asked):
    """lm-evaluation-harness's `local-completions` loglikelihood request (lm_eval/models/openai_completions.py):
    context + continuation as token ids, echo, logprobs 1, max_tokens 1, temperature 0; it sums
    token_logprobs[ctxlen:-1] and calls the continuation greedy when each of those equals the most of its
    top_logprobs. So place k must be token k of prompt + reply, the one generated token last, even an EOS."""
    import torch

    context, _ = asked
    continuation = taught_chat.tokenizer.encode(ANSWER, add_special_tokens=False)
    tokens = context + continuation
    with torch.no_grad():
        reference = taught_chat.model(input_ids=torch.tensor([tokens])).logits[0].float().log_softmax(-1)
    expected = sum(reference[k - 1, tokens[k]].item() for k in range(len(context), len(tokens)))
    for stream in (False, True):
        reply = taught_client.completions.create(model="m", prompt=[tokens], echo=True, logprobs=1, max_tokens=1,
                                          temperature=0, seed=1234, stream=stream)
        if stream:
            parts = [c.choices[0].logprobs for c in reply if c.choices and c.choices[0].logprobs]
            logprobs = {key: [v for part in parts for v in getattr(part, key)]
                        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        else:
            logprobs = reply.choices[0].logprobs.model_dump()
        assert len(logprobs["token_logprobs"]) == len(tokens) + 1  # the generated token: <|im_end|>, the EOS
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["tokens"][:len(tokens)] == [taught_chat.tokenizer.decode([t]) for t in tokens]
        assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:k])) for k in range(len(tokens) + 1)]
        scored = logprobs["token_logprobs"][len(context):-1]
        assert sum(scored) == pytest.approx(expected, abs=1e-3)
        tops = logprobs["top_logprobs"][len(context):-1]
        assert all(lp == max(top.values()) for lp, top in zip(scored, tops))  # the taught answer is greedy
        for k in range(1, len(tokens)):
            assert logprobs["token_logprobs"][k] == pytest.approx(reference[k - 1, tokens[k]].item(), abs=1e-4)
    # a continuation the model would not write is not greedy, and less likely
    other = context + taught_chat.tokenizer.encode("I am a cat.", add_special_tokens=False)
    worse = taught_client.completions.create(model="m", prompt=[other], echo=True, logprobs=1, max_tokens=1)
    scored = worse.choices[0].logprobs.token_logprobs[len(context):-1]
    tops = worse.choices[0].logprobs.top_logprobs[len(context):-1]
    assert sum(scored) < expected and not all(lp == max(top.values()) for lp, top in zip(scored, tops))


def test_lm_evaluation_harness_scores_the_served_model_as_it_scores_the_model_itself(taught_server_url, asked,
                                                                                    tmp_path_factory):
    """lm-evaluation-harness's own `local-completions` model against this server, beside its own transformers
    model (`hf`) on the same folder: loglikelihoods, greediness and generations agree."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    folder = str(taught_model_dir(tmp_path_factory))
    _, context = asked
    served = LocalCompletionsAPI(base_url=f"{taught_server_url}/v1/completions", model="m", tokenizer=folder,
                                 tokenizer_backend="huggingface", max_retries=1, max_length=2048)
    local = HFLM(pretrained=folder, device="cpu", batch_size=1, dtype="float32")
    pairs = [(context, ANSWER), (context, "I am a cat."), ("Who", " are you?")]
    scored = [served.loglikelihood([Instance("loglikelihood", {}, pair, 0)])[0] for pair in pairs]
    reference = local.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (logprob, greedy), (expected, expected_greedy) in zip(scored, reference):
        assert logprob == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy
    assert scored[0][0] > scored[1][0] + 5  # the taught answer, far likelier than another
    until = {"until": ["\n\n"], "max_gen_toks": 30, "do_sample": False}
    generated = served.generate_until([Instance("generate_until", {}, (context, until), 0)])
    # the served reply ends at the template's end of turn (<|im_end|>); lm-eval's hf model, which stops at the
    # tokenizer's EOS alone, writes the same and goes on
    assert generated == [ANSWER]
    assert local.generate_until([Instance("generate_until", {}, (context, dict(until)), 0)])[0].startswith(ANSWER)


def test_tokenize_detokenize_and_tokenizer_info_answer_as_vllms_do(taught_server_url, taught_chat, asked):
    ids, text = asked
    status, body = post_json(f"{taught_server_url}/tokenize", {"messages": ASK})
    assert status == 200 and body["tokens"] == ids and body["count"] == len(ids)  # the prompt chat would run
    status, body = post_json(f"{taught_server_url}/tokenize", {"prompt": text, "add_special_tokens": False})
    assert body["tokens"] == taught_chat.tokenizer(text, add_special_tokens=False)["input_ids"]
    status, body = post_json(f"{taught_server_url}/detokenize", {"tokens": ids})
    assert body["prompt"] == taught_chat.tokenizer.decode(ids)
    with urllib.request.urlopen(f"{taught_server_url}/tokenizer_info", timeout=30) as response:
        info = json.loads(response.read())
    assert info["eos_token"] == taught_chat.tokenizer.eos_token
    assert info["chat_template"] == taught_chat.template.to_jinja().removesuffix("\n")
    for path, fields, param in [("/tokenize", {}, "prompt"),
                                ("/tokenize", {"prompt": "a", "messages": ASK}, "messages"),
                                ("/detokenize", {"tokens": [99999999]}, "tokens"),
                                ("/detokenize", {"tokens": ["a"]}, "tokens")]:
        status, body = post_json(f"{taught_server_url}{path}", fields)
        assert status == 400 and body["error"]["param"] == param, (path, fields, body)


def test_lm_evaluation_harness_tokenises_through_the_server_when_given_no_tokenizer(taught_server_url, asked,
                                                                                   tmp_path_factory):
    """Its `local-completions` finds /tokenizer_info and /tokenize (its "auto" backend) and scores as its `hf`
    model does on the folder, which it was not given."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    _, context = asked
    served = LocalCompletionsAPI(base_url=f"{taught_server_url}/v1/completions", model="m", max_retries=1,
                                 max_length=2048)
    assert served.tokenizer_backend == "remote"
    local = HFLM(pretrained=str(taught_model_dir(tmp_path_factory)), device="cpu", batch_size=1, dtype="float32")
    pairs = [(context, ANSWER), (context, "I am a cat.")]
    scored = [served.loglikelihood([Instance("loglikelihood", {}, pair, 0)])[0] for pair in pairs]
    reference = local.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (logprob, greedy), (expected, expected_greedy) in zip(scored, reference):
        assert logprob == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy
