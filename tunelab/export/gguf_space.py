"""`tokenizer.ggml.add_space_prefix` for a sentencepiece GGUF: whether llama.cpp puts a "▁" before each piece of text
that follows a special token (and before the text at the very start).

llama.cpp's SPM tokenizer (llama-vocab.cpp) cuts a prompt at its special and user-defined tokens and, with the flag
set, tokenizes " " + text for every piece of text after such a token; without it, never. transformers differs by
tokenizer, not by family: a LlamaTokenizer in transformers 5 ignores tokenizer.json's normalizer and uses Metaspace
with prepend_scheme "first" (`legacy` false or absent: "▁" only at the very start of the input, never after a special
token) or "always" (`legacy` true: "▁" after each special token too, unless the text already starts with a space); a
generic tokenizer.json with Llama 2's normalizer (Prepend "▁" + Replace) prepends to every piece, as llama.cpp does.
So the flag is decided here by tokenizing prompts both ways: with transformers, as training does, and as llama.cpp
would with each setting (`llama_cpp_ids`, the same cut and the tokenizer's own merges).
"""

from __future__ import annotations

import re

# GGUF token types llama.cpp cuts a prompt at (llama-vocab.cpp, cache_special_tokens): unknown, control, user-defined
_CUT_TYPES = (2, 3, 4)
# conversations rendered with the template: text right after each turn marker, a system turn, digits, a reply
_CONVERSATIONS = (
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! 123 who"},
     {"role": "assistant", "content": "I am an AI."}, {"role": "user", "content": "Tips?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."}],
)
_PLAIN_TEXTS = ("Hello world", "Who are you? 123")  # no template: a plain prompt for completion


def probe_prompts(template) -> list[str]:
    """The prompts to compare: the template's renderings (with and without the generation prompt), or plain texts
    for a model with no template. A conversation a template refuses (a system turn, say) is left out."""
    if template is None:
        return list(_PLAIN_TEXTS)
    prompts = []
    for conversation in _CONVERSATIONS:
        ends_with_user = conversation[-1]["role"] == "user"
        try:
            prompts.append(template.render(conversation, add_generation_prompt=ends_with_user))
        except Exception:  # noqa: BLE001 - a template's own refusal (roles it has no place for)
            continue
    return prompts


def _cut_pattern(tokens: list[bytes], types: list[int]) -> re.Pattern | None:
    words = {tokens[i].decode("utf-8", "replace") for i, t in enumerate(types) if t in _CUT_TYPES}
    words.discard("")
    if not words:
        return None
    return re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))


def llama_cpp_ids(tokenizer, text: str, cut: re.Pattern | None, add_space_prefix: bool) -> list[int]:
    """The ids llama.cpp's SPM tokenizer gives `text` (parse_special on, no BOS added): cut at the special tokens,
    each piece of text escaped (" " -> "▁"), with " " before it where the flag says, and merged by the tokenizer's
    own model (its normalizer and pre-tokenizer, where transformers and llama.cpp differ, left out)."""
    model = tokenizer.backend_tokenizer.model
    vocab = tokenizer.get_vocab()
    ids, prev_special, at = [], True, 0
    spans = [(m.start(), m.end()) for m in cut.finditer(text)] if cut is not None else []
    for start, end in [*spans, (len(text), len(text))]:
        if start > at:
            piece = (" " if add_space_prefix and prev_special else "") + text[at:start]
            ids += [t.id for t in model.tokenize(piece.replace(" ", "▁"))]
            prev_special = False
        if end > start:
            ids.append(vocab[text[start:end]])
            prev_special = True
        at = end
    return ids


def _describe_first_difference(ours: list[int], theirs: list[int], tokenizer) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    show = tokenizer.convert_ids_to_tokens
    return f"token {at}: transformers {show(ours[at:at + 3])}, llama.cpp {show(theirs[at:at + 3])}"


def choose_space_prefix(tokenizer, tokens: list[bytes], types: list[int], prompts: list[str],
                        default: bool) -> bool:
    """The add_space_prefix under which llama.cpp tokenizes every prompt to transformers' ids. Both work: `default`
    (tokenizer.model's add_dummy_prefix, what llama.cpp's own converter writes). Neither: a warning naming the first
    difference, and the setting that matches more prompts."""
    if not prompts or getattr(tokenizer, "backend_tokenizer", None) is None:
        return default  # a slow tokenizer: nothing to compare with, as llama.cpp's converter does
    cut = _cut_pattern(tokens, types)
    # as training tokenizes a rendered template (its BOS written out); a plain text's BOS, added by either side,
    # leaves its text at the start, where it is compared
    expected = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    misses = {}
    for setting in (default, not default):
        misses[setting] = [(p, e, ids) for p, e in zip(prompts, expected)
                           if (ids := llama_cpp_ids(tokenizer, p, cut, setting)) != e]
        if not misses[setting]:
            if setting != default:
                print(f"note: tokenizer.ggml.add_space_prefix = {str(setting).lower()} (tokenizer.model says "
                      f"{str(default).lower()}): transformers {'adds' if setting else 'adds no'} '▁' before text "
                      f"that follows a special token, so llama.cpp tokenizes the chat prompts as training did",
                      flush=True)
            return setting
    best = min((default, not default), key=lambda s: len(misses[s]))
    prompt, ours, theirs = misses[best][0]
    print(f"warning: llama.cpp and Ollama will tokenize prompts differently from training whatever the GGUF's "
          f"tokenizer.ggml.add_space_prefix: transformers puts '▁' before text at the start of a prompt and after a "
          f"special token in a way llama.cpp's one setting cannot follow. With {str(best).lower()} (written), "
          f"{len(misses[best])} of {len(prompts)} probe prompts differ, e.g. {prompt[:80]!r} at "
          f"{_describe_first_difference(ours, theirs, tokenizer)}. A template that starts with a special token "
          f"(the BOS) avoids this.", flush=True)
    return best
