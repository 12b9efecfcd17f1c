"""`tunelab serve`'s OpenAI fields beyond temperature / top_p: `presence_penalty` and `frequency_penalty` (OpenAI's
formula, on the reply's tokens), `logit_bias` (token ids as strings), `logprobs` / `top_logprobs` (the model's own
log-probabilities, streamed too), each checked and refused in OpenAI's error shape when out of range."""

from __future__ import annotations

import pytest

from chat_helpers import ANSWER, QUESTION

openai = pytest.importorskip("openai")

ASK = [{"role": "user", "content": QUESTION}]


class _Row:
    def __init__(self, settings, generated, prompt=(1, 2)):
        self.settings, self.generated, self.generator = settings, list(generated), None
        self.prompt = list(prompt)

    def token_ids(self):
        return self.prompt + self.generated


def test_presence_and_frequency_penalties_are_openais_formula_on_the_reply_tokens():
    """logit[j] - frequency * count[j] - presence * (count[j] > 0), count over the reply's tokens (the prompt's are not
    counted, as in OpenAI's description and vLLM): each row against that formula written out, greedy."""
    import torch

    from tunelab.model.generate import GenerationSettings, next_tokens

    torch.manual_seed(0)
    vocab = 50
    cases = [(0.0, 0.0), (0.8, 0.0), (0.0, 0.7), (1.5, -0.4), (-2.0, 2.0)]
    generated = [[3, 3, 3, 7, 11], [7, 7, 9], [3, 11, 11, 11], [5], [40, 41, 40]]
    for trial in range(20):
        logits = torch.randn(len(cases), vocab)
        top = logits.argmax(-1)
        rows = [_Row(GenerationSettings(presence_penalty=p, frequency_penalty=f), list(g) + [int(t)] * (trial % 3),
                     prompt=[int(t)] * 4)
                for (p, f), g, t in zip(cases, generated, top)]
        expected = []
        for row, scores in zip(rows, logits):
            counts = torch.zeros(vocab)
            for token in row.generated:
                counts[token] += 1
            s = row.settings
            expected.append(int((scores - s.frequency_penalty * counts - s.presence_penalty * (counts > 0)).argmax()))
        assert next_tokens(logits.clone(), rows) == expected
    # the penalties did change choices: a strong presence penalty steers away from the reply's own tokens
    logits = torch.zeros(1, vocab)
    logits[0, 4] = 1.0
    assert next_tokens(logits.clone(), [_Row(GenerationSettings(presence_penalty=2.0), [4])]) != [4]
    assert next_tokens(logits.clone(), [_Row(GenerationSettings(), [4])]) == [4]


def test_logit_bias_adds_to_the_logits_and_leaves_them_to_the_caller():
    import torch

    from tunelab.model.generate import GenerationSettings, next_tokens

    logits = torch.zeros(2, 10)
    logits[:, 2] = 5.0
    rows = [_Row(GenerationSettings(logit_bias={2: -100.0, 6: 3.0}), []), _Row(GenerationSettings(), [])]
    assert next_tokens(logits, rows) == [6, 2]
    assert logits[0, 2] == 5.0 and logits[0, 6] == 0.0  # the model's logits, untouched (logprobs read them)


def test_logit_bias_reaches_the_model_through_the_openai_client(taught_client, taught_chat):
    token = taught_chat.tokenizer.encode(" hello", add_special_tokens=False)[-1]
    forced = taught_client.chat.completions.create(model="m", messages=ASK, max_tokens=4,
                                            logit_bias={str(token): 100})
    assert forced.choices[0].message.content == taught_chat.tokenizer.decode([token] * 4).strip() or \
        forced.choices[0].message.content == taught_chat.tokenizer.decode([token] * 4)
    first = taught_chat.tokenizer.encode(ANSWER, add_special_tokens=False)[0]
    banned = taught_client.chat.completions.create(model="m", messages=ASK, logit_bias={str(first): -100})
    assert banned.choices[0].message.content != ANSWER
    # a request without it, after them: the taught answer
    assert taught_client.chat.completions.create(model="m", messages=ASK).choices[0].message.content == ANSWER


def test_penalties_reach_the_model_through_the_openai_client(taught_client, taught_chat, monkeypatch):
    # past its end (vLLM's ignore_eos) the taught model says its answer again: penalised, it cannot repeat itself
    extra = {"ignore_eos": True}
    plain = taught_client.chat.completions.create(model="m", messages=ASK, max_tokens=40, extra_body=extra)
    assert plain.choices[0].message.content.startswith(ANSWER)
    penalised = taught_client.chat.completions.create(model="m", messages=ASK, max_tokens=40, extra_body=extra,
                                               frequency_penalty=2.0)
    assert penalised.choices[0].message.content != plain.choices[0].message.content
    # the taught model is surer of its words than a presence penalty of 2 can change: the job carries the value
    jobs = []
    job = taught_chat.job
    monkeypatch.setattr(taught_chat, "job", lambda *args, **kwargs: jobs.append(job(*args, **kwargs)) or jobs[-1])
    taught_client.chat.completions.create(model="m", messages=ASK, presence_penalty=-1.5, frequency_penalty=0.25)
    assert (jobs[0].settings.presence_penalty, jobs[0].settings.frequency_penalty) == (-1.5, 0.25)


@pytest.mark.parametrize("fields, param, says", [
    ({"presence_penalty": 2.5}, "presence_penalty", "from -2 to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "from -2 to 2"),
    ({"frequency_penalty": "1"}, "frequency_penalty", "number"),
    ({"logit_bias": {"12": 101}}, "logit_bias", "from -100 to 100"),
    ({"logit_bias": {"twelve": 1}}, "logit_bias", "not a token id"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", "not a token id"),
    ({"logit_bias": {"-1": 1}}, "logit_bias", "not a token id"),
    ({"logit_bias": {"5": "1"}}, "logit_bias", "number"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({"logprobs": "yes"}, "logprobs", "boolean"),
])
def test_bad_sampling_fields_get_a_400_naming_them(taught_client, taught_chat, fields, param, says):
    with pytest.raises(openai.BadRequestError) as caught:
        taught_client.chat.completions.create(model="m", messages=ASK, **fields)
    error = caught.value.body
    assert error["param"] == param and says in error["message"], error


def _model_logprobs(taught_chat, reply_ids):
    """The log-probability of each reply token and the log-softmax at its position, by one forward pass over prompt
    + reply (teacher forcing), as a reference the server's streaming decode must match."""
    import torch

    prompt = taught_chat.prompt(list(ASK))[0]
    with torch.no_grad():
        out = taught_chat.model(input_ids=torch.tensor([prompt + reply_ids])).logits[0].float().log_softmax(-1)
    at = out[len(prompt) - 1:len(prompt) - 1 + len(reply_ids)]
    return at


def test_logprobs_are_the_models_own_and_stream_as_they_come(taught_client, taught_chat):
    reply = taught_client.chat.completions.create(model="m", messages=ASK, logprobs=True, top_logprobs=3)
    assert reply.choices[0].message.content == ANSWER
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == ANSWER  # the reply's tokens, the EOS that ended it left out
    reply_ids = taught_chat.tokenizer.encode(ANSWER, add_special_tokens=False)
    assert len(content) == len(reply_ids)
    reference = _model_logprobs(taught_chat, reply_ids)
    for entry, token, row in zip(content, reply_ids, reference):
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert bytes(entry.bytes).decode() == entry.token
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the likeliest
        assert entry.top_logprobs[1].logprob == pytest.approx(row.topk(2).values[1].item(), abs=1e-4)
    streamed = taught_client.chat.completions.create(model="m", messages=ASK, logprobs=True, top_logprobs=3,
                                              stream=True)
    pieces = [c.choices[0].logprobs.content for c in streamed if c.choices and c.choices[0].logprobs]
    joined = [entry for piece in pieces for entry in piece]
    assert [(e.token, round(e.logprob, 5)) for e in joined] == [(e.token, round(e.logprob, 5)) for e in content]
    assert sum(1 for piece in pieces if piece) > 1  # they came with the text, not all at the end
    plain = taught_client.chat.completions.create(model="m", messages=ASK)
    assert plain.choices[0].logprobs is None
    none_top = taught_client.chat.completions.create(model="m", messages=ASK, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in none_top.choices[0].logprobs.content)


@pytest.mark.parametrize("stop", [", your", "Bot,", "am T", "neBot", "your help"])
def test_logprobs_cover_the_text_a_stop_word_cut(taught_client, taught_chat, stop):
    """The tokens of a stop word, which may be several and begin inside a token, are left out with it."""
    reply = taught_client.chat.completions.create(model="m", messages=ASK, logprobs=True, stop=[stop])
    text = reply.choices[0].message.content
    assert text == ANSWER[:ANSWER.index(stop)]
    tokens = [entry.token for entry in reply.choices[0].logprobs.content]
    assert "".join(tokens).startswith(text)
    assert len("".join(tokens[:-1])) < len(text)  # every token is needed: the last may run into the stop word


@pytest.fixture(scope="module")
def random_url(tiny_llama_dir):
    """A random tiny llama served: it samples widely, so that replies drawn with different seeds differ."""
    from tunelab.chat.engine import load_chat_model
    from tunelab.chat.http_server import BackgroundServer
    from tunelab.chat.server import create_app
    from tunelab.model.generate import GenerationSettings

    chat = load_chat_model(str(tiny_llama_dir), max_batch_size=8, prompt_template="qwen_chat")
    with BackgroundServer(create_app(chat, GenerationSettings(max_new_tokens=12), max_tokens_limit=200)) as url:
        yield url
    chat.close()


SAMPLED = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "extra_body": {"top_k": 0, "ignore_eos": True}}


def test_n_replies_are_drawn_apart_and_reply_0_is_what_n_1_gives(random_url):
    from chat_helpers import openai_client

    client = openai_client(random_url)
    one = client.chat.completions.create(model="m", messages=ASK, seed=5, **SAMPLED)
    three = client.chat.completions.create(model="m", messages=ASK, seed=5, n=3, **SAMPLED)
    texts = [c.message.content for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts[0] == one.choices[0].message.content
    again = client.chat.completions.create(model="m", messages=ASK, seed=5, n=3, **SAMPLED)
    assert [c.message.content for c in again.choices] == texts  # seeded: the same three again
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once, as OpenAI counts it
    assert three.usage.completion_tokens == 3 * 12
    pieces, finish, usage = {0: "", 1: "", 2: ""}, {}, None
    for chunk in client.chat.completions.create(model="m", messages=ASK, seed=5, n=3, stream=True, logprobs=True,
                                                stream_options={"include_usage": True}, **SAMPLED):
        if not chunk.choices:
            usage = chunk.usage
        for c in chunk.choices:
            pieces[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert [pieces[i] for i in range(3)] == texts and finish == {0: "length", 1: "length", 2: "length"}
    assert usage.completion_tokens == 36 and usage.prompt_tokens == one.usage.prompt_tokens
    greedy = client.chat.completions.create(model="m", messages=ASK, n=2, max_tokens=12)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content  # as vLLM: greedy is one reply


def test_n_completions_of_several_prompts_come_prompt_by_prompt(random_url):
    from chat_helpers import openai_client

    client = openai_client(random_url)
    prompts = ["Once upon a time", "The weather today"]
    alone = [client.completions.create(model="m", prompt=p, seed=9, **SAMPLED).choices[0].text for p in prompts]
    both = client.completions.create(model="m", prompt=prompts, seed=9, n=2, **SAMPLED)
    texts = [c.text for c in both.choices]
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert texts[0] == alone[0] and texts[2] == alone[1]  # choice k: prompt k // n, its reply k % n
    assert texts[0] != texts[1] and texts[2] != texts[3]
    assert both.usage.completion_tokens == 4 * 12
    assert both.usage.prompt_tokens == sum(client.completions.create(model="m", prompt=p, max_tokens=1)
                                           .usage.prompt_tokens for p in prompts)
    streamed = {}
    for chunk in client.completions.create(model="m", prompt=prompts, seed=9, n=2, stream=True, **SAMPLED):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[k] for k in range(4)] == texts
