"""The built-in chat formats, each written to render what its vendor's published `chat_template` renders.

Sources are jinja (see core.py). Conventions: every line starts with a whitespace-eating tag (`{%-` / `{{-`), special
tokens are spelled out (text is tokenised with add_special_tokens=False), `default_system` is the vendor's default
system prompt (set per template, replaced by the training SYSTEM at export), and `{% generation message %}` surrounds
the text the model learns to write: the reply and the token that ends it. Where a vendor's text has no token that
ends a reply (ChatGLM3, GLM-4), the reply is trained up to the role token that follows it, and a conversation's last
reply is followed by the one a model writes next. docs/DATA.md lists each family, its source and any difference.
"""

from __future__ import annotations

from tunelab.data.templates.chatml import CHATML, INTERNLM2, QWEN2_5, QWEN3, YI
from tunelab.data.templates.chatml import SYSTEM_SLOT as _SYSTEM
from tunelab.data.templates.core import ChatTemplate

LLAMA2 = _SYSTEM + r"""
{%- for message in messages %}
{%- set content = message.content %}
{%- if loop.first and system is not none %}{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content %}{% endif %}
{%- if message.role == 'assistant' %}
{%- generation message %}{{ ' ' + content.strip() + ' </s>' }}{% endgeneration %}
{%- else %}
{{- '<s>[INST] ' + content.strip() + ' [/INST]' }}
{%- endif %}
{%- endfor %}
"""

LLAMA3 = r"""
{{- '<|begin_of_text|>' }}
{%- if messages[0].role != 'system' and default_system %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' + default_system | trim + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% generation message %}{{ message.content | trim + '<|eot_id|>' }}{% endgeneration %}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Llama 3.1 / 3.2: the dated system header; tools go into the first user turn, one JSON call per reply, results
# as 'ipython' turns (written as JSON, as the vendor's template does). Training text uses the vendor's fixed date
# (date_string, default "26 Jul 2024"); Llama 3.2's exported template takes today's date where the server has a clock.
_LLAMA3_1_DATE = """{%- if not date_string is defined %}{% set date_string = "26 Jul 2024" %}{% endif %}\n"""
_LLAMA3_2_DATE = ("{%- if not date_string is defined %}{% if strftime_now is defined %}"
                  "{% set date_string = strftime_now('%d %b %Y') %}{% else %}{% set date_string = \"26 Jul 2024\" %}"
                  "{% endif %}{% endif %}\n")
_LLAMA3_1_BODY = r"""
{{- '<|begin_of_text|>' }}
{%- if messages[0].role == 'system' %}{% set system = messages[0].content | trim %}{% set messages = messages[1:] %}
{%- else %}{% set system = default_system | trim %}{% endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{%- if tools %}{{- 'Environment: ipython\n' }}{% endif %}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' + system + '<|eot_id|>' }}
{%- if tools %}
{%- if not messages %}{{- raise_exception('tools go into the first user message, and there is none') }}{% endif %}
{{- '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n' }}
{%- for tool in tools %}{{- tool | tojson(indent=4) + '\n\n' }}{% endfor %}
{{- messages[0].content | trim + '<|eot_id|>' }}
{%- set messages = messages[1:] %}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% generation message %}
{%- if message.tool_calls %}
{%- if message.tool_calls | length != 1 %}{{- raise_exception('Llama 3.1 writes one tool call per reply') }}{% endif %}
{{- '{"name": "' + message.tool_calls[0].function.name + '", "parameters": ' + message.tool_calls[0].function.arguments | tojson + '}' }}
{%- else %}
{{- message.content | trim }}
{%- endif %}
{{- '<|eot_id|>' }}{% endgeneration %}
{%- elif message.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message.content | tojson + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
LLAMA3_1 = _LLAMA3_1_DATE + _LLAMA3_1_BODY
LLAMA3_2 = _LLAMA3_2_DATE + _LLAMA3_1_BODY

# Mistral 'v1' (Mistral-7B-Instruct v0.1 / v0.2, Mixtral-8x7B): the system prompt opens the first [INST].
MISTRAL_V1 = _SYSTEM + r"""
{{- '<s>' }}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{%- generation message %}{{ ' ' + message.content + '</s>' }}{% endgeneration %}
{%- elif loop.first and system is not none %}
{{- ' [INST] ' + system + '\n\n' + message.content + ' [/INST]' }}
{%- else %}
{{- ' [INST] ' + message.content + ' [/INST]' }}
{%- endif %}
{%- endfor %}
"""


def _mistral_v3(sp: str, reply: str) -> str:
    """Mistral 'v3' (v0.3, sp=' ') and 'tekken' (Nemo, sp=''): tools before the last [INST], the system prompt in the
    last user turn (where mistral-common puts it), tool calls with ids of 9 letters and digits: a call without one (or
    with another, like OpenAI's `call_...`) is numbered by its place in the conversation, and the result answering it
    (by tool_call_id, else in order) gets the same number, so the model learns which result answers which call."""
    return _SYSTEM + r"""
{%- macro call_id(value, number) %}{{ value if value is string and value | length == 9 and value.isalnum() else '%09d' % number }}{% endmacro %}
{%- set ns = namespace(last_user=-1, calls=0, results=0) %}
{%- for message in messages %}{% if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{{- '<s>' }}
{%- for message in messages %}
{%- if message.role == 'user' %}
{%- if tools and loop.index0 == ns.last_user %}
{{- '[AVAILABLE_TOOLS]SP[' }}
{%- for tool in tools %}
{{- '{"type": "function", "function": {' }}
{%- for key, val in tool.function.items() if key != 'return' %}
{{- '"' + key + '": ' + ('"' + val + '"' if val is string else val | tojson) + (', ' if not loop.last else '') }}
{%- endfor %}
{{- '}}' + (', ' if not loop.last else ']') }}
{%- endfor %}
{{- '[/AVAILABLE_TOOLS]' }}
{%- endif %}
{%- if loop.index0 == ns.last_user and system is not none %}
{{- '[INST]SP' + system + '\n\n' + message.content + '[/INST]' }}
{%- else %}
{{- '[INST]SP' + message.content + '[/INST]' }}
{%- endif %}
{%- elif message.role == 'assistant' %}
{%- generation message %}
{%- if message.tool_calls %}
{{- '[TOOL_CALLS]SP[' }}
{%- for call in message.tool_calls %}
{%- set ns.calls = ns.calls + 1 %}
{{- (call.function | tojson)[:-1] + ', "id": "' + call_id(call.id, ns.calls) + '"}' + (', ' if not loop.last else ']') }}
{%- endfor %}
{%- else %}
{{- REPLY }}
{%- endif %}
{{- '</s>' }}{% endgeneration %}
{%- elif message.role == 'tool' %}
{%- set ns.results = ns.results + 1 %}
{%- set answered = namespace(number=0, at=ns.results) %}
{%- for earlier in messages[:loop.index0] if message.tool_call_id %}{% for call in earlier.tool_calls or [] %}
{%- set answered.number = answered.number + 1 %}{% if call.id == message.tool_call_id %}{% set answered.at = answered.number %}{% endif %}
{%- endfor %}{% endfor %}
{{- '[TOOL_RESULTS]SP{"content": ' + message.content | string + ', "call_id": "' + call_id(message.tool_call_id, answered.at) + '"}[/TOOL_RESULTS]' }}
{%- endif %}
{%- endfor %}
""".replace("SP", sp).replace("REPLY", reply)


MISTRAL_V3 = _mistral_v3(" ", "' ' + message.content | trim")
MISTRAL_TEKKEN = _mistral_v3("", "message.content")

GEMMA = r"""
{{- '<bos>' }}
{%- if messages[0].role == 'system' %}{% set prefix = messages[0].content + '\n\n' %}{% set messages = messages[1:] %}
{%- elif default_system %}{% set prefix = default_system + '\n\n' %}{% else %}{% set prefix = '' %}{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<start_of_turn>model\n' }}{% generation message %}{{ message.content | trim + '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}
{%- else %}
{{- '<start_of_turn>user\n' + (prefix if loop.first else '') + message.content | trim + '<end_of_turn>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<start_of_turn>model\n' }}
{%- endif %}
"""

PHI3 = r"""
{%- if messages[0].role != 'system' and default_system %}{{- '<|system|>\n' + default_system + '<|end|>\n' }}{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|assistant|>\n' }}{% generation message %}{{ message.content + '<|end|>' }}{% endgeneration %}{{ '\n' }}
{%- else %}
{{- '<|' + message.role + '|>\n' + message.content + '<|end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{% else %}{{- '<|endoftext|>' }}{% endif %}
"""

# Phi-4-mini: tools ride on the system turn; calls are written as the model card shows them.
PHI4_MINI = _SYSTEM + r"""
{%- if tools %}
{{- '<|system|>' + (system or '') + '<|tool|>' + tools | map(attribute='function') | list | tojson + '<|/tool|><|end|>' }}
{%- elif system is not none %}
{{- '<|system|>' + system + '<|end|>' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|assistant|>' }}{% generation message %}{{ message.content }}
{%- if message.tool_calls %}
{{- '<|tool_call|>' + message.tool_calls | map(attribute='function') | list | tojson + '<|/tool_call|>' }}
{%- endif %}
{{- '<|end|>' }}{% endgeneration %}
{%- else %}
{{- '<|' + message.role + '|>' + message.content + '<|end|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>' }}{% else %}{{- '<|endoftext|>' }}{% endif %}
"""

# ChatGLM3 / GLM-4: no token ends a reply; the model writes the next role token (<|user|> or <|observation|>),
# which is among its stop tokens. So a reply is trained up to and including that token.
_GLM_TURNS = r"""
{%- set ns = namespace(open=false) %}
{%- for message in messages %}
{%- set role = 'observation' if message.role == 'tool' else message.role %}
{%- if message.content or message.tool_calls %}
{%- if not ns.open %}{{- '<|' + role + '|>' }}{% endif %}
{%- if message.role == 'assistant' %}
{%- set next = messages[loop.index0 + 1].role if not loop.last else ('tool' if message.tool_calls else 'user') %}
{%- generation message %}{{ REPLY + '<|' + ('observation' if next == 'tool' else next) + '|>' }}{% endgeneration %}
{%- set ns.open = true %}
{%- else %}
{{- SEP + message.content }}
{%- set ns.open = false %}
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>' }}{% endif %}
"""

CHATGLM3 = r"""
{{- '[gMASK]sop' }}
{%- if messages[0].role != 'system' and default_system %}{{- '<|system|>\n ' + default_system }}{% endif %}
""" + _GLM_TURNS.replace("REPLY", "'\\n ' + message.content").replace("SEP", "'\\n '")

_GLM4_TOOLS_PROMPT = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                      "你的任务是针对用户的问题和要求提供适当的答复和支持。")
GLM4 = r"""
{{- '[gMASK]<sop>' }}
{%- if tools %}
{{- '<|system|>\n""" + _GLM4_TOOLS_PROMPT + r"""\n\n# 可用工具' }}
{%- for tool in tools %}
{{- '\n## ' + tool.function.name + '\n\n' + tool.function | tojson(indent=4) + '\n在调用上述函数时，请使用 Json 格式表示调用的参数。' }}
{%- endfor %}
{%- endif %}
{%- if messages[0].role != 'system' and default_system %}{{- '<|system|>\n' + default_system }}{% endif %}
{%- macro call(c) %}{{ c.name + '\n' + c.arguments | tojson }}{% endmacro %}
""" + _GLM_TURNS.replace("SEP", "'\\n'").replace(
    "REPLY", "('\\n' + message.content if message.content else '') + ((('<|assistant|>' if message.content else '') "
             "+ call(message.tool_calls[0].function)) if message.tool_calls else '')")

DEEPSEEK_V2 = r"""
{{- '<｜begin▁of▁sentence｜>' }}
{%- if messages[0].role != 'system' and default_system %}{{- default_system + '\n\n' }}{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- 'Assistant:' }}{% generation message %}{{ ' ' + message.content + '<｜end▁of▁sentence｜>' }}{% endgeneration %}
{%- elif message.role == 'system' %}
{{- message.content + '\n\n' }}
{%- else %}
{{- 'User: ' + message.content + '\n\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'Assistant:' }}{% endif %}
"""

# DeepSeek-V3 / R1: system prompts joined at the start. R1 (think=true) drops reasoning from earlier replies like its
# template, opens generation with "<think>\n", and trains a last reply's reasoning_content inside that block.
DEEPSEEK_V3 = r"""
{%- set ns = namespace(system='') %}
{%- for message in messages if message.role == 'system' %}{% set ns.system = ns.system + ('\n\n' if not loop.first else '') + message.content %}{% endfor %}
{%- if not ns.system and default_system %}{% set ns.system = default_system %}{% endif %}
{{- '<｜begin▁of▁sentence｜>' + ns.system }}
{%- for message in messages %}
{%- if message.role == 'user' %}
{{- '<｜User｜>' + message.content }}
{%- elif message.role == 'assistant' %}
{%- if message.tool_calls %}{{- raise_exception('tool calls are not supported by this template') }}{% endif %}
{%- set content = message.content.split('</think>')[-1] if think else message.content %}
{%- if think and loop.last and message.reasoning_content %}
{{- '<｜Assistant｜><think>\n' }}{% generation message %}{{ message.reasoning_content.strip('\n') + '\n</think>\n\n' + content + '<｜end▁of▁sentence｜>' }}{% endgeneration %}
{%- else %}
{{- '<｜Assistant｜>' }}{% generation message %}{{ content + '<｜end▁of▁sentence｜>' }}{% endgeneration %}
{%- endif %}
{%- elif message.role == 'tool' %}
{{- raise_exception('tool results are not supported by this template') }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<｜Assistant｜>' + ('<think>\n' if think else '') }}{% endif %}
"""

# Formats with no published chat_template (kept as XTuner writes them).
BAICHUAN2 = r"""
{%- if messages[0].role == 'system' %}{{- messages[0].content }}{% set messages = messages[1:] %}
{%- elif default_system %}{{- default_system }}{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{%- generation message %}{{ message.content + '</s>' }}{% endgeneration %}
{%- else %}
{{- '<reserved_106>' + message.content }}{% if not loop.last or add_generation_prompt %}{{- '<reserved_107>' }}{% endif %}
{%- endif %}
{%- endfor %}
"""


def _plain(bos: str, system: str, user: str, opener: str, end: str, sep: str) -> str:
    """A turn-by-turn format: `user` wraps a question, `opener` opens a reply, `end` closes it, `sep` follows it."""
    lit = lambda s: "'" + s.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'") + "'"  # noqa: E731
    before, _, after = system.partition("{system}")
    u_before, _, u_after = user.partition("{content}")
    return ("{{- " + lit(bos) + " }}\n" + _SYSTEM +
            "{%- if system is not none %}{{- " + lit(before) + " + system + " + lit(after) + " }}{% endif %}\n"
            "{%- for message in messages %}\n"
            "{%- if message.role == 'assistant' %}\n"
            "{%- generation message %}{{ message.content + " + lit(end) + " }}{% endgeneration %}"
            "{{ " + lit(sep) + " if not loop.last }}\n"
            "{%- else %}\n"
            "{{- " + lit(u_before) + " + message.content + " + lit(u_after) + " }}"
            "{% if not loop.last or add_generation_prompt %}{{- " + lit(opener) + " }}{% endif %}\n"
            "{%- endif %}\n{%- endfor %}\n")


ZEPHYR = r"""
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|assistant|>\n' }}{% generation message %}{{ message.content + '</s>' }}{% endgeneration %}{{ '\n' }}
{%- else %}
{{- '<|' + message.role + '|>\n' + message.content + '</s>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{% endif %}
"""

# LLaMA-Factory's fewshot (src/llamafactory/data/template.py): a base model's plain text, no role markers. The system
# prompt, then each message's text as it is, each reply followed by "\n\n"; after a conversation's last reply the
# tokenizer's EOS (its efficient_eos: the EOS ends the whole sequence, not each turn). Every message is a piece of its
# own, the system prompt too (a context piece), tokenised apart as LLaMA-Factory encodes them (`pieces_apart`).
FEWSHOT = _SYSTEM + r"""
{%- if system %}{% generation {'train': false} %}{{ system }}{% endgeneration %}{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{%- generation message %}{{ message.content + '\n\n' }}{% if loop.last %}{{ eos_token }}{% endif %}{% endgeneration %}
{%- else %}
{{- message.content }}
{%- endif %}
{%- endfor %}
"""

_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                  "detailed, and polite answers to the user's questions.")
_IM = ("<|im_end|>", "<|endoftext|>")

DEFINITIONS = [
    ChatTemplate("chatml", CHATML, _IM, vendor="ChatML (OpenAI), as in teknium/OpenHermes-2.5"),
    ChatTemplate("qwen2_chat", CHATML, _IM, "You are a helpful assistant.", vendor="Qwen/Qwen2-7B-Instruct"),
    ChatTemplate("qwen2_5_chat", QWEN2_5, _IM, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                 vendor="Qwen/Qwen2.5-7B-Instruct"),
    ChatTemplate("qwen3_chat", QWEN3, _IM, vendor="Qwen/Qwen3-8B"),
    ChatTemplate("qwen3_nothink_chat", "{%- set enable_thinking = false %}\n" + QWEN3, _IM,
                 vendor="Qwen/Qwen3-8B with enable_thinking=False"),
    ChatTemplate("internlm2_chat", INTERNLM2, ("<|im_end|>",), vendor="internlm/internlm2-chat-7b"),
    ChatTemplate("yi_chat", YI, _IM, vendor="01-ai/Yi-1.5-34B-Chat"),
    ChatTemplate("llama2_chat", LLAMA2, ("</s>",), vendor="meta-llama/Llama-2-7b-chat-hf"),
    ChatTemplate("llama3_chat", LLAMA3, ("<|eot_id|>", "<|end_of_text|>"), vendor="meta-llama/Meta-Llama-3-8B-Instruct"),
    ChatTemplate("llama3_1_chat", LLAMA3_1, ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
                 vendor="meta-llama/Llama-3.1-8B-Instruct"),
    ChatTemplate("llama3_2_chat", LLAMA3_2, ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
                 vendor="meta-llama/Llama-3.2-3B-Instruct"),
    ChatTemplate("mistral", MISTRAL_V1, ("</s>",), vendor="mistralai/Mistral-7B-Instruct-v0.2 (v0.1, Mixtral-8x7B)"),
    ChatTemplate("mistral_v3", MISTRAL_V3, ("</s>",), vendor="mistralai/Mistral-7B-Instruct-v0.3"),
    ChatTemplate("mistral_tekken", MISTRAL_TEKKEN, ("</s>",), vendor="mistralai/Mistral-Nemo-Instruct-2407"),
    ChatTemplate("gemma", GEMMA, ("<end_of_turn>", "<eos>"), vendor="google/gemma-3-1b-it (gemma-2b-it, gemma-7b-it)"),
    ChatTemplate("phi3_chat", PHI3, ("<|end|>", "<|endoftext|>"), vendor="microsoft/Phi-3-mini-4k-instruct"),
    ChatTemplate("phi4_mini", PHI4_MINI, ("<|end|>", "<|endoftext|>"), vendor="microsoft/Phi-4-mini-instruct"),
    ChatTemplate("chatglm3", CHATGLM3, ("<|user|>", "<|observation|>", "</s>"), vendor="THUDM/chatglm3-6b"),
    ChatTemplate("glm4_chat", GLM4, ("<|user|>", "<|observation|>", "<|endoftext|>"), vendor="THUDM/glm-4-9b-chat"),
    ChatTemplate("deepseek_v2", DEEPSEEK_V2, ("<｜end▁of▁sentence｜>",), vendor="deepseek-ai/DeepSeek-V2-Lite-Chat"),
    ChatTemplate("deepseek_v3", "{%- set think = false %}\n" + DEEPSEEK_V3, ("<｜end▁of▁sentence｜>",),
                 vendor="deepseek-ai/DeepSeek-V3"),
    ChatTemplate("deepseek_r1", "{%- set think = true %}\n" + DEEPSEEK_V3, ("<｜end▁of▁sentence｜>",),
                 vendor="deepseek-ai/DeepSeek-R1"),
    ChatTemplate("baichuan2_chat", BAICHUAN2, ("</s>",), vendor="baichuan-inc/Baichuan2-7B-Chat (no chat_template)"),
    ChatTemplate("zephyr", ZEPHYR, ("</s>",), vendor="HuggingFaceH4/zephyr-7b-beta"),
    ChatTemplate("internlm_chat", _plain("<s>", "<|System|>:{system}\n", "<|User|>:{content}<eoh>\n", "<|Bot|>:",
                                         "<eoa>", "\n"), ("<eoa>",), vendor="internlm/internlm-chat-7b (XTuner)"),
    ChatTemplate("vicuna", _plain("<s>", "{system} ", "USER: {content} ", "ASSISTANT: ", "</s>", ""),
                 ("</s>", "USER:"), _VICUNA_SYSTEM, vendor="lmsys/vicuna-7b-v1.5 (FastChat)"),
    ChatTemplate("fewshot", FEWSHOT, (), vendor="LLaMA-Factory's fewshot (a base model's plain text)",
                 pieces_apart=True),
    ChatTemplate("default", _plain("", "{system}\n", "### Human: {content}\n", "### Assistant: ", "</s>", "\n"),
                 ("</s>", "### Human:"), vendor="tunelab's plain format"),
]

ALIASES = {"qwen_chat": "chatml", "qwen1_5_chat": "qwen2_chat", "internlm2_5_chat": "internlm2_chat",
           "internlm3_chat": "internlm2_chat", "mixtral": "mistral", "mistral_v1": "mistral",
           "gemma3": "gemma", "deepseek_v3_chat": "deepseek_v3"}
"""Other names for a template (older names configs use, and the vendors' version names)."""

# Not aliases: a name here is refused like any unknown one, and its error suggests ours. LLaMA-Factory's names spell
# the family alone, and the closest spelling of ours can be another format (its `qwen`, Qwen2.5 with the default
# system prompt, against our `qwen_chat`, plain ChatML without one).
LLAMAFACTORY_NAMES = {"qwen": "qwen2_5_chat", "qwen3": "qwen3_chat", "qwen3_nothink": "qwen3_nothink_chat",
                      "llama2": "llama2_chat", "llama3": "llama3_chat", "glm4": "glm4_chat", "intern": "internlm_chat",
                      "intern2": "internlm2_chat", "yi": "yi_chat", "baichuan2": "baichuan2_chat",
                      "deepseek3": "deepseek_v3", "deepseekr1": "deepseek_r1", "phi": "phi3_chat"}
"""LLaMA-Factory's `template` names -> the built-in template of the same format, for "Did you mean"."""
