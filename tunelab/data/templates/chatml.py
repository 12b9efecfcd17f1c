"""The ChatML family (Qwen, InternLM2, Yi): `<|im_start|>role ... <|im_end|>` turns (conventions: families.py)."""

from __future__ import annotations

SYSTEM_SLOT = ("{%- if messages[0].role == 'system' %}{% set system = messages[0].content %}"
               "{% set messages = messages[1:] %}{% else %}{% set system = default_system or none %}{% endif %}\n")
"""The system prompt slot: the conversation's own system message, else the template's default (none when '')."""

CHATML = r"""
{%- if messages[0].role != 'system' and default_system %}
{{- '<|im_start|>system\n' + default_system + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant\n' }}{% generation message %}{{ message.content + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

INTERPRETER = "interpreter"
"""The name of InternLM2's code interpreter as a free-form (custom) tool: the one free-form tool internlm2_chat writes."""

# InternLM2 / 2.5 / 3: ChatML after <s>; tools and calls as in InternLM's chat format (chat/chat_format.md). Its code
# interpreter is OpenAI's free-form (custom) tool 'interpreter': its description a system message of its own before
# the functions', a call's input (the code) after <|action_start|><|interpreter|>, its output an environment message.
# A plugin call ends `<|action_end|><|im_end|>`, an interpreter call `<|action_end|>\n<|im_end|>`: both as
# chat_format.md shows them (lagent writes the newline after both). A result is the interpreter's when it answers a
# custom call: the call with its tool_call_id, else the call in its place.
INTERNLM2 = r"""
{{- '<s>' }}
""" + SYSTEM_SLOT + r"""
{%- if system is not none %}{{- '<|im_start|>system\n' + system + '<|im_end|>\n' }}{% endif %}
{%- set free_form_error = "internlm2_chat writes one free-form (custom) tool, its code interpreter, named '""" + INTERPRETER + r"""'" %}
{%- for tool in tools or [] if tool.type == 'custom' %}
{%- if tool.custom.name != '""" + INTERPRETER + r"""' %}{{- raise_exception(free_form_error) }}{% endif %}
{{- '<|im_start|>system name=<|interpreter|>\n' + (tool.custom.description or '') + '<|im_end|>\n' }}
{%- endfor %}
{%- set functions = (tools or []) | rejectattr('type', 'equalto', 'custom') | map(attribute='function') | list %}
{%- if functions %}
{{- '<|im_start|>system name=<|plugin|>\n' + functions | tojson + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(calls=[], at=0, call=none) %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant\n' }}{% generation message %}{{ message.content }}
{%- for call in message.tool_calls or [] %}
{%- if call.type == 'custom' %}
{%- if call.custom.name != '""" + INTERPRETER + r"""' %}{{- raise_exception(free_form_error) }}{% endif %}
{{- '<|action_start|><|interpreter|>\n' + call.custom.input + '<|action_end|>\n' }}
{%- else %}
{{- '<|action_start|><|plugin|>\n' + {'name': call.function.name, 'parameters': call.function.arguments} | tojson + '<|action_end|>' }}
{%- endif %}
{%- endfor %}
{{- '<|im_end|>' }}{% endgeneration %}{{ '\n' }}
{%- set ns.calls = message.tool_calls or [] %}{% set ns.at = 0 %}
{%- elif message.role == 'tool' %}
{%- set ns.call = ns.calls[ns.at] if ns.at < ns.calls | length else none %}
{%- for call in ns.calls if message.tool_call_id and call.id == message.tool_call_id %}{% set ns.call = call %}{% endfor %}
{%- set ns.at = ns.at + 1 %}
{{- '<|im_start|>environment name=' + ('<|interpreter|>' if ns.call and ns.call.type == 'custom' else '<|plugin|>') + '\n' + message.content + '<|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_QWEN_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_QWEN_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                    "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")
_QWEN_TOOLS = (r"""
{%- macro tools_block() %}
{{- '""" + _QWEN_TOOLS_HEAD.replace("\n", "\\n") + r"""' }}
{%- for tool in tools %}{{- '\n' + tool | tojson }}{% endfor %}
{{- '""" + _QWEN_TOOLS_TAIL.replace("\n", "\\n") + r"""' }}
{%- endmacro %}
{%- macro tool_calls(message, content) %}
{%- for call in message.tool_calls or [] %}
{{- '\n' if content or not loop.first }}
{%- set call = call.function if call.function is defined else call %}
{{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
{{- call.arguments if call.arguments is string else call.arguments | tojson }}
{{- '}\n</tool_call>' }}
{%- endfor %}
{%- endmacro %}
{%- macro tool_result(message, loop, messages) %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{% endif %}
{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{% endif %}
{%- endmacro %}
""")

QWEN2_5 = _QWEN_TOOLS + r"""
{%- if messages[0].role == 'system' %}{% set system = messages[0].content %}{% set messages = messages[1:] %}
{%- else %}{% set system = default_system %}{% endif %}
{%- if tools %}
{{- '<|im_start|>system\n' + system + '\n\n' + tools_block() }}
{%- else %}
{{- '<|im_start|>system\n' + system + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant\n' }}{% generation message %}{{ message.content + tool_calls(message, message.content) + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}
{%- elif message.role == 'tool' %}
{{- tool_result(message, loop, messages) }}
{%- else %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3: replies after the last user question carry their reasoning in <think>...</think> (an empty block when
# there is none); earlier replies are rendered without it, as the vendor's template does. enable_thinking=false
# (the qwen3_nothink_chat template) opens generation with the empty block and keeps it out of the trained text.
QWEN3 = _QWEN_TOOLS + r"""
{%- set first_system = messages[0].role == 'system' %}
{%- if first_system and not default_system %}{% set system = messages[0].content %}
{%- elif first_system %}{% set system = messages[0].content %}{% else %}{% set system = default_system %}{% endif %}
{%- if tools %}
{{- '<|im_start|>system\n' + (system + '\n\n' if system else '') + tools_block() }}
{%- elif system %}
{{- '<|im_start|>system\n' + system + '<|im_end|>\n' }}
{%- elif first_system %}
{{- '<|im_start|>system\n<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages | length - 1, multi_step=true) %}
{%- for message in messages[::-1] %}
{%- if ns.multi_step and message.role == 'user' and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
{%- set ns.multi_step = false %}{% set ns.last_query = messages | length - 1 - loop.index0 %}
{%- endif %}
{%- endfor %}
{%- set thinking = enable_thinking is not defined or enable_thinking %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{%- set content = message.content %}
{%- if message.reasoning_content is string %}{% set reasoning = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\n') %}
{%- else %}{% set reasoning = '' %}{% endif %}
{{- '<|im_start|>assistant\n' }}
{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
{%- if reasoning or thinking %}
{%- generation message %}{{ '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') + tool_calls(message, content) + '<|im_end|>' }}{% endgeneration %}
{%- else %}
{{- '<think>\n\n</think>\n\n' }}{% generation message %}{{ content.lstrip('\n') + tool_calls(message, content) + '<|im_end|>' }}{% endgeneration %}
{%- endif %}
{%- else %}
{%- generation message %}{{ content + tool_calls(message, content) + '<|im_end|>' }}{% endgeneration %}
{%- endif %}
{{- '\n' }}
{%- elif message.role == 'tool' %}
{{- tool_result(message, loop, messages) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if not thinking %}{{- '<think>\n\n</think>\n\n' }}{% endif %}
{%- endif %}
"""

YI = SYSTEM_SLOT + r"""
{%- if system is not none %}{{- system }}{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{%- generation message %}{{ message.content + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}
{%- else %}
{{- '<|im_start|>user\n' + message.content + '<|im_end|>\n<|im_start|>assistant\n' }}
{%- endif %}
{%- endfor %}
"""
