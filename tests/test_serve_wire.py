"""A server-sent event must stay one line for every client's line splitter: httpx's `iter_lines` (and Python's
`str.splitlines`) also break lines at U+0085, U+2028 and U+2029, which JSON leaves raw inside strings. A reply
holding one (a model writes any character) would cut its event in two and the client's JSON parse would fail."""

import json

import httpx

from tunelab.chat.wire import event

TEXT = "a\u2028b\u2029c\x85d \u00e9\u4e2d\U0001F600 \x1c\n\"q\""


def test_an_event_is_one_line_to_httpx_and_decodes_to_the_same_text():
    body = {"choices": [{"delta": {"content": TEXT}}]}
    sent = event(body)
    lines = list(httpx.Response(200, content=sent.encode()).iter_lines())
    assert [line for line in lines if line] == [sent.strip()]
    assert json.loads(lines[0][len("data: "):]) == body
    assert "\u00e9\u4e2d\U0001F600" in sent  # other text is sent as itself, not as \u escapes
