"""An Ollama `Modelfile` beside an exported GGUF: `ollama create NAME -f Modelfile` and the model chats as trained.

* `FROM ./NAME.gguf`
* `TEMPLATE`: the training template in Ollama's template language (Go's text/template over `.Messages`).
  It is read off the training template by rendering it: conversations whose contents are markers show the text the
  template puts before a message of each role after each role (the first message included) and after the last message
  (`TurnTable`); the TEMPLATE has a branch for every role, writing that text before each message's content (the text
  most pairs share where the training template refuses a pair). Before it is written, the table is checked against the
  training template on conversations with real text: every order of up to three roles (two user turns in a row, a first
  message from the assistant, a tool result then a user turn, ...), a system prompt, several turns, tool results, spaces
  and newlines in contents; a template that does more than wrap contents (one that moves the system prompt to the last
  turn, or rewrites earlier replies) fails the check and gets no TEMPLATE, with a note (Ollama then matches
  `tokenizer.chat_template` in the GGUF file to one of its own). Conversations the training template refuses, or in
  which it leaves a message out (Gemma's and Mistral's drop a system prompt no user turn follows), are not compared: the
  TEMPLATE keeps such a message. A template that trims the spaces around each message's text gets a TEMPLATE that keeps
  them (Ollama's language cannot trim), and a comment saying so. As in Ollama's own templates, a chat that ends with an
  assistant message is left open, so the model continues it. Tool results are wrapped as the template wraps them; the
  tool definitions and calls (Ollama's .Tools, .ToolCalls) are not written: Ollama 0.30 and later then prompt a model
  whose GGUF chat template has tools with that template (llama.cpp's Jinja), the training one, tools included. A role
  whose content the template writes as a JSON string (Llama 3.1 / 3.2's tool results, `| tojson`) is written with
  `printf "%q"`, Go's quoting: the same text as JSON's for text without control or invisible characters (`\n`, `\t`,
  quotes, backslashes, `<>&` and non-ASCII letters alike).
  Without a TEMPLATE, `ollama create` takes the nearest of Ollama's built-in templates by edit distance, or none.
* `PARAMETER stop` for each of the template's stop words.
* `SYSTEM`: the run's system prompt (or the template's default), which Ollama adds when a chat brings none.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tunelab.data.messages import with_default_system
from tunelab.data.templates import HFChatTemplate
from tunelab.errors import TunelabError

ROLES = ("system", "user", "assistant", "tool")
# The conversation each probe leads in with to end on a message of that role ("": the start).
_LEAD_IN = {"": (), "system": ("system",), "user": ("user",), "assistant": ("user", "assistant"),
            "tool": ("user", "assistant", "tool")}
# Conversations rendered with marker contents to read the text between turns: one for every (previous role, role),
# the first message of each role included, so no pair is left without its text (roles only; contents are markers).
# A probe never ends with the assistant (some templates write the last reply differently, e.g. Qwen3's empty think
# block), and a system message comes first; EXTRA_PROBES (a system message later in the chat) only add pairs they
# agree on.
PROBES = [(*_LEAD_IN[prev], role, *(("user",) if role == "assistant" else ())) for prev in _LEAD_IN for role in ROLES
          if role != "system" or not prev]
EXTRA_PROBES = [(*_LEAD_IN[prev], "system", "user") for prev in ROLES]
_TEXTS = {"system": "You are terse.", "user": "Hi  there\n", "assistant": "Hello.", "tool": "{\"temp\": 21}"}


def _every_sequence(length: int) -> list[list[tuple[str, str]]]:
    """Every role sequence of `length` messages with real text (a system prompt only first), a user turn after the
    assistant's last (a chat ending with the assistant's words is left open, and some templates write the last reply
    differently)."""
    import itertools

    out = []
    for roles in itertools.product(ROLES, repeat=length):
        if "system" not in roles[1:]:
            roles = roles + (("user",) if roles[-1] == "assistant" else ())
            out.append([(r, f"{_TEXTS[r]} {i}" if i else _TEXTS[r]) for i, r in enumerate(roles)])
    return out


# Conversations with real text the TEMPLATE must render as the training template does before it is written: every
# role sequence of up to three messages (two user turns in a row, a first message from the assistant, a tool result
# then a user turn, two assistant turns, ...) and some longer chats.
CHECKS = [
    *_every_sequence(1), *_every_sequence(2), *_every_sequence(3),
    [("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2 {{ braces }} and \"quotes\"\nnew line")],
    [("user", " leading space"), ("assistant", "calling"), ("tool", "{\"temp\": 21}")],
    [("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("tool", "r1"), ("tool", "r2"), ("assistant", "A2"),
     ("user", "Q2"), ("user", "Q3")],
]


def _marker(i: int) -> str:
    return f"@@tunelab{i}@@"


def _between_texts(template, roles, gen: bool, quoted: frozenset = frozenset()) -> list[str] | None:
    """The texts around the contents of a rendered conversation: [before 1st, between 1st and 2nd, ..., after last];
    None when the template cannot render it or does not show each content once, in order. The content of a role in
    `quoted` is looked for with its JSON quotes, which belong to the content, not to the text around it."""
    messages = [{"role": r, "content": _marker(i)} for i, r in enumerate(roles)]
    try:
        text = template.render(messages, add_generation_prompt=gen)
    except Exception:  # noqa: BLE001 (a template's own refusal of this order of roles: raise_exception, TunelabError)
        return None
    pieces, rest = [], text
    for i, role in enumerate(roles):
        before, found, rest = rest.partition(json.dumps(_marker(i)) if role in quoted else _marker(i))
        if not found or any(_marker(j) in before for j in range(len(roles))):
            return None
        pieces.append(before)
    return pieces + [rest]


_QUOTE_PROBE = 'x "y" \\ z\n'  # a content that JSON quoting changes in every way a plain wrap cannot


def _quoted_roles(template) -> frozenset:
    """Roles whose content the template writes as a JSON string (Llama 3.1's tool results: `content | tojson`)."""
    quoted = set()
    for role in ROLES:
        roles = (*_LEAD_IN[role][:-1], role, *(("user",) if role == "assistant" else ()))
        messages = [{"role": r, "content": _QUOTE_PROBE if i == len(_LEAD_IN[role][:-1]) else "Hi"}
                    for i, r in enumerate(roles)]
        try:
            text = template.render(messages, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 (a template that refuses this role here: nothing to learn)
            continue
        if json.dumps(_QUOTE_PROBE, ensure_ascii=False) in text:
            quoted.add(role)
    return frozenset(quoted)


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
               "\v": "\\v", '"': '\\"', "\\": "\\\\"}


def _go_quote(text: str) -> str:
    """What Ollama's `printf "%q"` writes (Go's strconv.Quote), so the check compares what Ollama will render."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif ch.isprintable():  # Python's printable is Go's IsPrint: letters, marks, numbers, punctuation, symbols
            out.append(ch)
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


@dataclasses.dataclass
class TurnTable:
    """The text the template writes before each message, by (role of the previous message or "", role)."""
    before: dict[tuple[str, str], str]
    after: dict[str, str]
    """After the last message, asking for the reply (add_generation_prompt), by its role."""
    quoted: frozenset = frozenset()
    """Roles whose content is written as a quoted string (`printf "%q"` in the TEMPLATE)."""

    def usual(self, role: str) -> str | None:
        """The text most (previous role, `role`) pairs share: the TEMPLATE's text before a `role` message after a
        role the probes could not show (one the training template refuses there)."""
        texts = [text for (prev, r), text in self.before.items() if r == role and prev]
        texts = texts or [text for (prev, r), text in self.before.items() if r == role]
        return max(texts, key=texts.count) if texts else None

    def text_before(self, prev: str, role: str) -> str | None:
        text = self.before.get((prev, role))
        return text if text is not None else self.usual(role)

    def render(self, messages: list[dict]) -> str | None:
        """What go_template(self) renders for `messages` (None for a role it has no text for)."""
        out, prev = [], ""
        for m in messages:
            text = self.text_before(prev, m["role"])
            if text is None:
                return None
            out += [text, _go_quote(m["content"]) if m["role"] in self.quoted else m["content"]]
            prev = m["role"]
        return "".join(out) + self.after.get(prev, "")


def turn_table(template) -> TurnTable | None:
    """The template's TurnTable, or None when its text between turns depends on more than the two roles."""
    template = dataclasses.replace(template, default_system="")  # the Modelfile's SYSTEM provides it
    before: dict[tuple[str, str], str] = {}
    after: dict[str, str] = {}
    quoted = _quoted_roles(template)

    def record(table: dict, key, text: str) -> bool:
        return table.setdefault(key, text) == text

    for roles in PROBES + EXTRA_PROBES:
        pieces = _between_texts(template, roles, gen=True, quoted=quoted)
        if pieces is None:
            continue
        pairs = [((roles[i - 1] if i else "", role), pieces[i]) for i, role in enumerate(roles)]
        if roles in EXTRA_PROBES and any(before.get(key, text) != text for key, text in pairs):
            continue  # a later system message that changes the text around it: left to the usual text
        if not all(record(before, key, text) for key, text in pairs):
            return None
        if not record(after, roles[-1], pieces[-1]):
            return None
    return TurnTable(before, after, quoted) if ("", "user") in before else None


def _up_to_last(text: str, content: str) -> str | None:
    """`text` cut after the last `content` (a chat ending with the assistant's words: Ollama leaves it open)."""
    at = text.rfind(content)
    return text[:at + len(content)] if at >= 0 else None


def _drops_a_message(template, messages: list[dict]) -> bool:
    """The template leaves a message of this conversation out of the prompt altogether."""
    marked = [{**m, "content": _marker(i)} for i, m in enumerate(messages)]
    text = template.render(marked, add_generation_prompt=True)
    return any(_marker(i) not in text for i in range(len(messages)))


def check_table(table: TurnTable, template) -> str | None:
    """"exact" when the table renders every CHECKS conversation (with the template's default system, as Ollama adds
    the Modelfile's SYSTEM) exactly as the training template does; "trims" when it does so once the contents are
    stripped of surrounding spaces (the template trims them, which Ollama's template language cannot); else None.
    A chat ending with an assistant message is compared up to its text (the TEMPLATE leaves it open); conversations
    the training template refuses are skipped."""
    verdicts = set()
    for check in CHECKS:
        messages = [{"role": r, "content": c} for r, c in check]
        with_default_system(messages, template.default_system)
        open_reply = messages[-1]["role"] == "assistant"
        try:
            expected = template.render(messages, add_generation_prompt=not open_reply)
        except Exception:  # noqa: BLE001 (a conversation this template refuses, e.g. tool results without tools)
            continue
        if _drops_a_message(template, messages):
            continue  # (Gemma's, Mistral's: a system prompt no user turn follows): the TEMPLATE keeps it
        for verdict, sent in (("exact", messages), ("trims", [{**m, "content": m["content"].strip()}
                                                              for m in messages])):
            want = _up_to_last(expected, sent[-1]["content"]) if open_reply else expected
            if want is not None and table.render(sent) == want:
                verdicts.add(verdict)
                break
        else:
            return None
    return "trims" if "trims" in verdicts else "exact"


def _go_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _literal(text: str) -> str:
    """Template text that prints `text` as is (Go templates only treat '{{' specially)."""
    return "{{ " + _go_string(text) + " }}" if "{{" in text or "}}" in text else text


def _chain(branches: list[tuple[str, str]], otherwise: str | None = None) -> str:
    """{{ if c1 }}t1{{ else if c2 }}t2...{{ else }}otherwise{{ end }}: just `otherwise` when there are no branches."""
    if not branches:
        return otherwise or ""
    text = "".join(("{{ if " if i == 0 else "{{ else if ") + cond + " }}" + body
                   for i, (cond, body) in enumerate(branches))
    return text + ("{{ else }}" + otherwise if otherwise else "") + "{{ end }}"


def go_template(table: TurnTable) -> str:
    """The TurnTable as Ollama's TEMPLATE: a branch for every role, in it the text before a message of that role
    (by the role before it; the text most pairs share otherwise), then its content; after the last message the text
    that asks for the reply. No `{{-` trimming: the text is exact."""
    roles = [r for r in ROLES if any(role == r for _, role in table.before)]
    per_role = []
    for role in roles:
        usual = table.usual(role)
        special = [(f'eq $prev "{prev}"', _literal(text)) for (prev, r), text in table.before.items()
                   if r == role and text != usual]
        per_role.append((f'eq .Role "{role}"', _chain(special, _literal(usual))))
    tails = _chain([(f'eq $prev "{role}"', _literal(text)) for role, text in table.after.items()])
    content = _chain([(f'eq .Role "{role}"', '{{ printf "%q" .Content }}') for role in ROLES if role in table.quoted],
                     "{{ .Content }}")
    return '{{ $prev := "" }}{{ range .Messages }}' + _chain(per_role) + content + "{{ $prev = .Role }}{{ end }}" \
        + tails


def modelfile_text(gguf_name: str, template, *, system: str = "") -> str:
    lines = ["# Made by tunelab: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    if template is not None:
        table = None if isinstance(template, HFChatTemplate) else turn_table(template)
        verdict = check_table(table, template) if table is not None else None
        if verdict == "trims":
            lines.append(f"# template {template.name!r} trims spaces around each message's text; this TEMPLATE "
                         f"keeps them (Ollama's template language has no trim)")
        if verdict is not None:
            text = go_template(table)
            if '"""' in text:
                raise TunelabError(f"template {template.name!r}: its text contains \"\"\", which a Modelfile "
                                   f"cannot quote. Use --no-modelfile and write the TEMPLATE by hand.")
            lines.append(f'TEMPLATE """{text}"""')
        else:
            lines.append(f"# no TEMPLATE: template {template.name!r} does more than wrap each message's text; Ollama "
                         f"matches the GGUF's chat template to the nearest of its own, which may not be the training "
                         f"one")
        for word in template.stop_words:
            lines.append(f"PARAMETER stop {_go_string(word)}")
        system = system or template.default_system
    if system:
        if '"""' in system:
            raise TunelabError('the system prompt contains """, which a Modelfile cannot quote.')
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


MODELFILE = "Modelfile"


def _from_line(path: Path) -> str | None:
    """What the Modelfile at `path` is FROM (None when it cannot be read or names nothing)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return next((line.split(None, 1)[1].strip() for line in lines
                 if line.upper().startswith("FROM ") and len(line.split(None, 1)) == 2), None)


def modelfile_path(gguf_path: Path) -> Path:
    """Where the Modelfile of `gguf_path` goes: `Modelfile` in its folder, when there is none yet or the one there is
    this GGUF file's (FROM ./NAME.gguf: it is replaced with the file); else NAME.Modelfile beside it, so another GGUF
    file's Modelfile (or one tunelab cannot tell, e.g. written by hand) is kept."""
    gguf_path = Path(gguf_path)
    plain = gguf_path.parent / MODELFILE
    if not plain.exists() and not plain.is_symlink():
        return plain
    if plain.is_file() and _from_line(plain) in (f"./{gguf_path.name}", gguf_path.name):
        return plain
    return gguf_path.parent / f"{gguf_path.stem}.{MODELFILE}"


def write_modelfile(gguf_path: Path, template, *, system: str = "") -> Path:
    """The Modelfile in the GGUF file's folder (see modelfile_path), naming the file relatively (the folder can
    move)."""
    gguf_path = Path(gguf_path)
    path = modelfile_path(gguf_path)
    text = modelfile_text(gguf_path.name, template, system=system)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise TunelabError(f"cannot write the Modelfile {path}: {exc.strerror or exc}. The GGUF file {gguf_path} is "
                           f"written; pass --no-modelfile, or free the path and convert again.") from None
    kept = f" ({path.parent / MODELFILE} is another model's and is kept)" if path.name != MODELFILE else ""
    print(f"wrote {path}{kept}: ollama create {gguf_path.stem} -f {path}", flush=True)
    return path
