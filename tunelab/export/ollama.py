"""An Ollama `Modelfile` beside an exported GGUF: `ollama create NAME -f Modelfile` and the model chats as trained.

* `FROM ./NAME.gguf`
* `TEMPLATE`: the training template in Ollama's template language (Go's text/template over `.Messages`), built from
  the same fields as `render()` and `to_jinja()`, so the prompt Ollama builds is the text training saw. As in
  Ollama's own templates, a conversation that ends with an assistant message leaves it open (the model continues
  it) instead of closing it with the end-of-turn text.
* `PARAMETER stop` for each of the template's stop words.
* `SYSTEM`: the run's system prompt (or the template's default), which Ollama adds when a chat brings none.

Only the output of the actions below is produced (no `{{-` trimming), so the template's literal text is exact.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.data.templates import HFChatTemplate
from tunelab.errors import TunelabError


def _literal(text: str) -> str:
    """Template text that prints `text` as is (Go templates only treat '{{' specially)."""
    if "{{" in text or "}}" in text:
        return "{{ " + _go_string(text) + " }}"
    return text


def _go_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def go_template(template) -> str:
    """Ollama's TEMPLATE for a tunelab ChatTemplate (the fields `ChatTemplate.segments` reads)."""
    user_before, _, user_after = template.user.partition("{content}")
    tool_before, _, tool_after = (template.tool or template.user).partition("{content}")
    sys_before, _, sys_after = template.system.partition("{system}")
    separator = ""
    if template.separator:
        separator = '{{ if eq $prev "assistant" }}' + _literal(template.separator) + "{{ end }}"
    if template.system_in_first_user:  # kept until the first user turn, then written inside it
        on_system = "{{ $sys = .Content }}"
        user = (_literal(user_before) + "{{ if $sys }}" + _literal(sys_before) + "{{ $sys }}" + _literal(sys_after)
                + '{{ $sys = "" }}{{ end }}{{ .Content }}' + _literal(user_after))
    else:
        on_system = (_literal(sys_before) + "{{ .Content }}" + _literal(sys_after)) if template.system else ""
        user = _literal(user_before) + "{{ .Content }}" + _literal(user_after)
    return "".join([
        '{{ $sys := "" }}{{ $prev := "" }}', _literal(template.bos),
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{ if eq .Role "system" }}', on_system,
        '{{ else if eq .Role "user" }}', separator, user,
        '{{ else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}', _literal(template.assistant_end),
        "{{ end }}",
        "{{ else }}", separator, _literal(tool_before), "{{ .Content }}", _literal(tool_after),
        "{{ end }}{{ $prev = .Role }}{{ end }}",
    ])


def modelfile_text(gguf_name: str, template, *, system: str = "") -> str:
    lines = ["# Made by tunelab: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    if template is not None:
        if isinstance(template, HFChatTemplate):
            lines.append("# no TEMPLATE: the model's own chat template (Ollama reads it from the GGUF file)")
        else:
            text = go_template(template)
            if '"""' in text:
                raise TunelabError(f"template {template.name!r}: its text contains \"\"\", which a Modelfile "
                                   f"cannot quote. Use --no-modelfile and write the TEMPLATE by hand.")
            lines.append(f'TEMPLATE """{text}"""')
        for word in getattr(template, "stop_words", ()) or ():
            lines.append(f"PARAMETER stop {_go_string(word)}")
        system = system or getattr(template, "default_system", "")
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
