"""A small evaluator of Go's text/template, for the subset tunelab's Ollama TEMPLATE uses, so a test can render it
and compare with the training template: text, {{ expr }}, {{ $x := expr }}, {{ $x = expr }}, if / else if / else,
range [$i, $v :=] expr, and the functions eq, not, and, len, slice, and printf "%q" (Go's strconv.Quote). Anything
else raises, so a template that strays outside the subset fails the test instead of passing by accident. (Go's
semantics: a template variable assigned inside range keeps the new value after it; `.` inside range is the element;
`$` is the data.)"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:\\.|[^"\\])*"|\(|\)|:=|=|,|\$\.[A-Za-z]\w*|\$\w*|\.[A-Za-z]\w*|\.|[A-Za-z]\w*|\d+)')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"cannot read action {text!r} at {pos}")
        out.append(match.group(1))
        pos = match.end()
    return out


def _parse(template: str):
    """A list of nodes: str (text) | ("expr", tokens) | ("if", [(cond, body)...], else_body) | ("range", ...)."""
    pieces, pos = [], 0
    for match in _ACTION.finditer(template):
        if match.start() > pos:
            pieces.append(template[pos:match.start()])
        if match.group(1).startswith("-") or match.group(1).endswith("-"):
            raise ValueError("whitespace trimming is outside the subset")
        pieces.append(_tokens(match.group(1)))
        pos = match.end()
    if pos < len(template):
        pieces.append(template[pos:])
    nodes, rest = _block(pieces, 0)
    if rest != len(pieces):
        raise ValueError("unbalanced {{ end }}")
    return nodes


def _block(pieces, i):
    nodes = []
    while i < len(pieces):
        piece = pieces[i]
        if isinstance(piece, str):
            nodes.append(piece)
            i += 1
        elif piece[0] in ("end", "else"):
            return nodes, i
        elif piece[0] == "if":
            branches, otherwise = [], []
            cond = piece[1:]
            while True:
                body, i = _block(pieces, i + 1)
                branches.append((cond, body))
                stop = pieces[i]
                if stop[0] == "end":
                    break
                if stop[:2] == ["else", "if"]:
                    cond = stop[2:]
                    continue
                otherwise, i = _block(pieces, i + 1)
                if pieces[i][0] != "end":
                    raise ValueError("if without end")
                break
            nodes.append(("if", branches, otherwise))
            i += 1
        elif piece[0] == "range":
            declared = piece.index(":=") if ":=" in piece else 0  # `range $i, $v := expr` or `range expr`
            names = [t for t in piece[1:declared] if t != ","]
            body, i = _block(pieces, i + 1)
            if pieces[i][0] != "end":
                raise ValueError("range without end")
            nodes.append(("range", names, piece[declared + 1:], body))
            i += 1
        else:
            nodes.append(("expr", piece))
            i += 1
    return nodes, i


def _value(tokens, pos, scope):
    token = tokens[pos]
    if token == "(":
        value, pos = _call(tokens, pos + 1, scope)
        if tokens[pos] != ")":
            raise ValueError("missing )")
        return value, pos + 1
    if token.isdigit():
        return int(token), pos + 1
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape"), pos + 1
    if token.startswith("$."):
        return scope["$"][token[2:]], pos + 1
    if token.startswith("$"):
        return scope["vars"][token], pos + 1
    if token.startswith("."):
        return (scope["dot"] if token == "." else scope["dot"][token[1:]]), pos + 1
    raise ValueError(f"unexpected {token!r}")


def _printf(fmt: str, value: str) -> str:
    """printf "%q": Go's strconv.Quote, written from its documentation: a double-quoted string, with \\a \\b \\f
    \\n \\r \\t \\v, \\" and \\\\ escaped, other characters below a space and DEL as \\xHH, printable characters
    (Unicode letters, marks, numbers, punctuation, symbols and the ASCII space) as they are, the rest as \\uHHHH or
    \\UHHHHHHHH."""
    if fmt != "%q":
        raise ValueError(f"printf {fmt!r}: only %q is in the subset")
    named = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
             '"': '\\"', "\\": "\\\\"}
    out = []
    for ch in value:
        code = ord(ch)
        if ch in named:
            out.append(named[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


FUNCTIONS = {"eq": lambda a, b: a == b, "not": lambda a: not a, "and": lambda *a: all(a), "len": len,
             "slice": lambda x, i: x[i:], "printf": _printf}


def _call(tokens, pos, scope):
    if tokens[pos] in FUNCTIONS:
        name, args, pos = tokens[pos], [], pos + 1
        while pos < len(tokens) and tokens[pos] != ")":
            value, pos = _value(tokens, pos, scope)
            args.append(value)
        return FUNCTIONS[name](*args), pos
    return _value(tokens, pos, scope)


def _eval(tokens, scope):
    value, pos = _call(tokens, 0, scope)
    if pos != len(tokens):
        raise ValueError(f"unread tokens {tokens[pos:]}")
    return value


def _run(nodes, scope, out):
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "expr":
            tokens = node[1]
            if len(tokens) > 1 and tokens[1] in (":=", "="):
                scope["vars"][tokens[0]] = _eval(tokens[2:], scope)
            else:
                value = _eval(tokens, scope)
                out.append(value if isinstance(value, str) else str(value))
        elif node[0] == "if":
            for cond, body in node[1]:
                if _eval(cond, scope):
                    _run(body, scope, out)
                    break
            else:
                _run(node[2], scope, out)
        elif node[0] == "range":
            names, expr, body = node[1], node[2], node[3]
            for index, item in enumerate(_eval(expr, scope)):
                inner = {**scope, "dot": item}
                inner["vars"] = scope["vars"]  # shared: Go keeps assignments made inside the loop
                if len(names) == 2:
                    scope["vars"][names[0]], scope["vars"][names[1]] = index, item
                _run(body, inner, out)


def render(template: str, data: dict) -> str:
    out: list[str] = []
    _run(_parse(template), {"$": data, "dot": data, "vars": {}}, out)
    return "".join(out)
