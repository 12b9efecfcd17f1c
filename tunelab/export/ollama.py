"""An Ollama `Modelfile` beside an exported GGUF: `ollama create NAME -f Modelfile` and the model chats as trained.

* `FROM ./NAME.gguf`
* `TEMPLATE`: the training template in Ollama's template language (Go's text/template over `.Messages`).
  It is read off the training template by rendering it: conversations whose contents are markers show the text
  the template puts before the first message of each role, between any two roles and after the last message
  (`TurnTable`); the TEMPLATE writes that text around each message's content. Before it is written, the table is
  checked against the training template on conversations with real text (system prompt, several turns, tool
  results, spaces and newlines in contents); a template that does more than wrap contents (one that moves the
  system prompt to the last turn, or rewrites earlier replies) fails the check and gets no TEMPLATE, with a note
  (Ollama then reads `tokenizer.chat_template` from the GGUF file). A template that trims the spaces around each
  message's text gets a TEMPLATE that keeps them (Ollama's language cannot trim), and a comment saying so. As in Ollama's own templates, a chat that ends
  with an assistant message is left open, so the model continues it. Tool results are wrapped as the template wraps
  them; the calls themselves (Ollama's .ToolCalls) are not written.
* `PARAMETER stop` for each of the template's stop words.
* `SYSTEM`: the run's system prompt (or the template's default), which Ollama adds when a chat brings none.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tunelab.data.messages import with_default_system
from tunelab.data.templates import HFChatTemplate
from tunelab.errors import TunelabError

ROLES = ("system", "user", "assistant", "tool")
# Conversations rendered with marker contents to read the text between turns (roles only; contents are markers).
PROBES = [("system", "user", "assistant", "user"), ("user", "assistant", "user"), ("user",),
          ("system", "user", "assistant", "tool", "assistant", "user"), ("user", "assistant", "tool", "tool")]
# Conversations with real text the table must reproduce before a TEMPLATE is written.
CHECKS = [
    [("user", "Hi")],
    [("system", "You are terse."), ("user", "Hi  there\n")],
    [("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2 {{ braces }} and \"quotes\"\nnew line")],
    [("user", " leading space"), ("assistant", "calling"), ("tool", "{\"temp\": 21}")],
]


def _marker(i: int) -> str:
    return f"@@tunelab{i}@@"


def _between_texts(template, roles, gen: bool) -> list[str] | None:
    """The texts around the contents of a rendered conversation: [before 1st, between 1st and 2nd, ..., after last];
    None when the template cannot render it or does not show each content once, in order."""
    messages = [{"role": r, "content": _marker(i)} for i, r in enumerate(roles)]
    try:
        text = template.render(messages, add_generation_prompt=gen)
    except TunelabError:
        return None
    pieces, rest = [], text
    for i in range(len(roles)):
        before, found, rest = rest.partition(_marker(i))
        if not found or any(_marker(j) in before for j in range(len(roles))):
            return None
        pieces.append(before)
    return pieces + [rest]


@dataclasses.dataclass
class TurnTable:
    """The text the template writes before each message, by (role of the previous message or "", role)."""
    before: dict[tuple[str, str], str]
    after: dict[str, str]
    """After the last message, asking for the reply (add_generation_prompt), by its role."""

    def render(self, messages: list[dict]) -> str | None:
        out, prev = [], ""
        for m in messages:
            if (prev, m["role"]) not in self.before:
                return None
            out += [self.before[(prev, m["role"])], m["content"]]
            prev = m["role"]
        return "".join(out) + self.after.get(prev, "")


def turn_table(template) -> TurnTable | None:
    """The template's TurnTable, or None when its text between turns depends on more than the two roles."""
    template = dataclasses.replace(template, default_system="")  # the Modelfile's SYSTEM provides it
    before: dict[tuple[str, str], str] = {}
    after: dict[str, str] = {}

    def record(table: dict, key, text: str) -> bool:
        return table.setdefault(key, text) == text

    for roles in PROBES:
        pieces = _between_texts(template, roles, gen=roles[-1] != "assistant")
        if pieces is None:
            continue
        for i, role in enumerate(roles):
            if not record(before, (roles[i - 1] if i else "", role), pieces[i]):
                return None
        if roles[-1] != "assistant" and not record(after, roles[-1], pieces[-1]):
            return None
    return TurnTable(before, after) if ("", "user") in before else None


def check_table(table: TurnTable, template) -> str | None:
    """"exact" when the table renders every CHECKS conversation (with the template's default system, as Ollama adds
    the Modelfile's SYSTEM) exactly as the training template does; "trims" when it does so once the contents are
    stripped of surrounding spaces (the template trims them, which Ollama's template language cannot); else None."""
    verdicts = set()
    for check in CHECKS:
        messages = [{"role": r, "content": c} for r, c in check]
        with_default_system(messages, template.default_system)
        try:
            expected = template.render(messages, add_generation_prompt=True)
        except TunelabError:
            continue  # a conversation this template cannot hold (e.g. tool results without tool support)
        if table.render(messages) == expected:
            verdicts.add("exact")
        elif table.render([{**m, "content": m["content"].strip()} for m in messages]) == expected:
            verdicts.add("trims")
        else:
            return None
    return "trims" if "trims" in verdicts else "exact"


def _go_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _literal(text: str) -> str:
    """Template text that prints `text` as is (Go templates only treat '{{' specially)."""
    return "{{ " + _go_string(text) + " }}" if "{{" in text or "}}" in text else text


def go_template(table: TurnTable) -> str:
    """The TurnTable as Ollama's TEMPLATE: before each message the text for (previous role, its role), then its
    content; after the last message the text that asks for the reply. No `{{-` trimming: the text is exact."""
    branches = []
    for (prev, role), text in table.before.items():
        branches.append((f'and (eq $prev "{prev}") (eq .Role "{role}")', _literal(text)))
    cases = "".join(("{{ if " if i == 0 else "{{ else if ") + cond + " }}" + text for i, (cond, text) in
                    enumerate(branches)) + "{{ end }}"
    tails = "".join(("{{ if " if i == 0 else "{{ else if ") + f'eq $prev "{role}" }}}}' + _literal(text)
                    for i, (role, text) in enumerate(table.after.items())) + ("{{ end }}" if table.after else "")
    return '{{ $prev := "" }}{{ range .Messages }}' + cases + "{{ .Content }}{{ $prev = .Role }}{{ end }}" + tails


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
            lines.append(f"# no TEMPLATE: template {template.name!r} does more than wrap each message's text, so "
                         f"Ollama uses the chat template inside the GGUF file")
        for word in template.stop_words:
            lines.append(f"PARAMETER stop {_go_string(word)}")
        system = system or template.default_system
    if system:
        if '"""' in system:
            raise TunelabError('the system prompt contains """, which a Modelfile cannot quote.')
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, template, *, system: str = "") -> Path:
    """`Modelfile` in the GGUF file's folder, naming the file relatively (the folder can move)."""
    gguf_path = Path(gguf_path)
    path = gguf_path.parent / "Modelfile"
    path.write_text(modelfile_text(gguf_path.name, template, system=system), encoding="utf-8")
    print(f"wrote {path}: ollama create {gguf_path.stem} -f {path}", flush=True)
    return path
