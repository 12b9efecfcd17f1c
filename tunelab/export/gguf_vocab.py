"""The tokenizer inside a GGUF file, under llama.cpp's keys (tokenizer.ggml.*).

Two kinds, as llama.cpp knows them:
* "gpt2": byte-level BPE from tokenizer.json (Llama 3, Qwen, the tiny test models): tokens in their byte-level
  spelling, the merges, and `tokenizer.ggml.pre`, the name of the split pattern llama.cpp applies before BPE
  (read from tokenizer.json's pre-tokenizer; an unknown pattern is refused rather than guessed).
* "llama": sentencepiece from tokenizer.model (Mistral, InternLM2): pieces, scores and piece types.
Tokens added on top (chat markers) keep their ids; special ones are CONTROL tokens, so llama.cpp stops on them and
never splits them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.model.sentencepiece_file import read_model_proto


def add_vocab(writer, tokenizer, tokenizer_dir: Path, *, vocab_size: int, eot_words: tuple[str, ...] = (),
              add_bos: bool | None = False, sentencepiece_file: Path | None = None,
              probe_prompts: tuple[str, ...] = ()) -> None:
    """The tokenizer under llama.cpp's keys. add_bos: False where the chat template in the file writes the BOS
    itself (tunelab's templates); None: as the tokenizer adds it to a plain text (a model with no template).
    sentencepiece_file: the tokenizer.model whose pieces go in (`find_sentencepiece`); None: tokenizer.json's
    byte-level BPE. probe_prompts: what decides a sentencepiece vocabulary's add_space_prefix (`gguf_space`)."""
    tokenizer_dir = Path(tokenizer_dir)
    if sentencepiece_file is not None:
        _add_sentencepiece(writer, tokenizer, Path(sentencepiece_file), vocab_size, probe_prompts)
    else:
        _add_byte_level_bpe(writer, tokenizer, tokenizer_dir / "tokenizer.json", vocab_size)
    vocab = tokenizer.get_vocab()
    eot = next((vocab[w] for w in eot_words if w in vocab), None)  # the template's end-of-turn token
    eos = tokenizer.eos_token_id
    if eos is None and eot is not None:
        eos = eot
        print(f"note: {tokenizer_dir}: the tokenizer names no eos token (no tokenizer_config.json?); the GGUF's eos "
              f"is the template's end of turn {tokenizer.convert_ids_to_tokens(eot)!r}", flush=True)
    elif eos is None:
        print(f"warning: {tokenizer_dir}: the tokenizer names no eos token (no tokenizer_config.json?) and no chat "
              f"template gives an end of turn, so llama.cpp and Ollama will not know where a reply ends. Copy the "
              f"base model's tokenizer_config.json beside tokenizer.json, or pass --prompt-template.", flush=True)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", eos),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    if eot is not None:
        writer.add_eot_token_id(eot)
    if add_bos is None:  # no template in the file: a plain prompt gets what the tokenizer adds to it
        add_bos, add_eos = _adds_special_tokens(tokenizer)
    else:  # tunelab tokenises rendered templates with add_special_tokens=False; the templates spell out the BOS
        add_eos = False
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(add_eos)


def _adds_special_tokens(tokenizer) -> tuple[bool, bool]:
    """(adds a BOS, adds an EOS): what the tokenizer does to a plain text."""
    ids = tokenizer("a", add_special_tokens=True).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos is not None and bool(ids) and ids[0] == bos,
            eos is not None and bool(ids) and ids[-1] == eos and len(ids) > 1)


def _first_difference(tokenizer, proto) -> int | None:
    """The first id at which tokenizer.model's pieces and the loaded tokenizer's vocabulary differ (None: they agree;
    tokens added on top, such as chat markers over unused pieces, are the tokenizer's own)."""
    vocab = tokenizer.get_vocab()
    added = set(tokenizer.added_tokens_decoder)
    for i, piece in enumerate(proto.pieces):
        if i not in added and vocab.get(piece.piece) != i:
            return i
    return None


def tokenizer_kind(tokenizer, tokenizer_dir: Path) -> str:
    """"sentencepiece" (tokenizer.model) or "bpe" (tokenizer.json): the file that holds the loaded tokenizer's
    vocabulary. A tokenizer.model whose pieces differ from the tokenizer (a stray file beside a byte-level BPE
    tokenizer.json) is passed over for tokenizer.json, with a note; refused when there is no tokenizer.json."""
    tokenizer_dir = Path(tokenizer_dir)
    sp_file, json_file = tokenizer_dir / "tokenizer.model", tokenizer_dir / "tokenizer.json"
    if sp_file.is_file():
        proto = read_model_proto(sp_file)
        at = _first_difference(tokenizer, proto)
        if at is None:
            return "sentencepiece"
        piece = proto.pieces[at].piece
        theirs = tokenizer.convert_ids_to_tokens(at) if at < len(tokenizer) else None
        if not json_file.is_file():
            raise TunelabError(f"{sp_file}: its pieces differ from the tokenizer's vocabulary from id {at} on "
                               f"({piece!r} there, {theirs!r} in the tokenizer): it belongs to another model. Copy "
                               f"this model's own tokenizer files. Nothing was written.")
        print(f"note: {sp_file} differs from the tokenizer's vocabulary from id {at} on ({piece!r} there, {theirs!r} "
              f"in the tokenizer); the GGUF gets the vocabulary of {json_file}", flush=True)
        return "bpe"
    if json_file.is_file():
        return "bpe"
    raise TunelabError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model to put in the GGUF file. Copy "
                       f"the base model's tokenizer files into it.")


def _from_sentencepiece(json_file: Path) -> bool:
    """tokenizer.json converted from a sentencepiece model (byte-fallback BPE as Llama 2's / InternLM2's, or
    Unigram): llama.cpp's vocabulary for it is tokenizer.model's pieces and scores, which tokenizer.json lacks."""
    try:
        model = json.loads(json_file.read_text(encoding="utf-8")).get("model", {})
    except (OSError, ValueError):
        return False  # unreadable: the byte-level path names the file
    return model.get("type") != "BPE" or bool(model.get("byte_fallback"))


def find_sentencepiece(tokenizer, tokenizer_dir: Path, bases: list[tuple[str, str]] = ()) -> Path | None:
    """The tokenizer.model the GGUF's sentencepiece vocabulary comes from (None: tokenizer.json's byte-level BPE,
    `tokenizer_kind`): the one beside the tokenizer; else, for a run saved before tunelab carried tokenizer.model
    along (tokenizer.json alone, converted from sentencepiece), the one in a local base directory the run's records
    name (`bases`: (path, which record names it)) whose pieces are the tokenizer's. Never downloaded; refused, naming
    where it looked, when no base has it. Called before any weights load."""
    tokenizer_dir = Path(tokenizer_dir)
    own, json_file = tokenizer_dir / "tokenizer.model", tokenizer_dir / "tokenizer.json"
    if own.is_file():
        return own if tokenizer_kind(tokenizer, tokenizer_dir) == "sentencepiece" else None
    if not json_file.is_file() or not _from_sentencepiece(json_file):
        return None
    looked = []
    for base, named_by in bases:
        candidate = Path(base) / "tokenizer.model"
        if not Path(base).is_dir():
            looked.append(f"{base} ({named_by}) is not a local directory")
        elif not candidate.is_file():
            looked.append(f"{base} ({named_by}) has none")
        elif _first_difference(tokenizer, read_model_proto(candidate)) is not None:
            looked.append(f"{candidate} ({named_by}) belongs to another tokenizer")
        else:
            print(f"note: {tokenizer_dir} has no tokenizer.model (saved before tunelab carried it along); using "
                  f"the base model's {candidate} ({named_by})", flush=True)
            return candidate
    raise TunelabError(f"{json_file} is a sentencepiece tokenizer and the GGUF vocabulary needs its pieces and scores "
                       f"from tokenizer.model, but {tokenizer_dir} has no tokenizer.model"
                       + (f" and {'; '.join(looked)}" if looked else "") + f". Copy the base model's tokenizer.model "
                       f"into {tokenizer_dir}. Nothing was written.")


def _token_types(tokenizer, vocab_size: int, base: dict[int, int] | None = None) -> list[int]:
    """GGUF token types: CONTROL for special added tokens, USER_DEFINED for other added tokens, UNUSED for ids the
    embedding has but the tokenizer does not; `base`: types of the underlying vocabulary (else NORMAL)."""
    import gguf

    types = [gguf.TokenType.UNUSED] * vocab_size
    for token_id in tokenizer.get_vocab().values():
        if token_id < vocab_size:
            types[token_id] = (base or {}).get(token_id, gguf.TokenType.NORMAL)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id < vocab_size:
            types[token_id] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    return [int(t) for t in types]


def _check_fits(tokenizer, vocab_size: int) -> None:
    largest = max(tokenizer.get_vocab().values())
    if largest >= vocab_size:
        raise TunelabError(f"the tokenizer has token id {largest} but the model's embedding has {vocab_size} rows: "
                           f"the tokenizer does not belong to this model.")


def pre_tokenizer_name(tokenizer_json: dict, path: Path) -> str:
    """llama.cpp's name for the split that runs before byte-level BPE (`tokenizer.ggml.pre`)."""
    from tunelab.export.gguf import PRE_TOKENIZERS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if not splits and len(byte_level) == 1 and byte_level[0].get("use_regex", True):
        return "gpt-2"  # ByteLevel's own split: GPT-2's pattern
    if len(splits) == 1 and splits[0].get("pattern", {}).get("Regex") in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[splits[0]["pattern"]["Regex"]]
    raise TunelabError(f"{path}: a pre-tokenizer llama.cpp may split differently ({json.dumps(pre)[:300]}); "
                       f"tunelab knows GPT-2's, Llama 3's and Qwen2's. Nothing was written.")


def _add_byte_level_bpe(writer, tokenizer, path: Path, vocab_size: int) -> None:
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TunelabError(f"{path}: not a byte-level BPE tokenizer ({model.get('type')}, byte_fallback="
                           f"{model.get('byte_fallback')}). Put the base model's tokenizer.model beside it.")
    _check_fits(tokenizer, vocab_size)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec, path))
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types(_token_types(tokenizer, vocab_size))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_token_merges(merges)


def _add_sentencepiece(writer, tokenizer, path: Path, vocab_size: int, probe_prompts: tuple[str, ...] = ()) -> None:
    from tunelab.export.gguf_space import choose_space_prefix

    proto = read_model_proto(path)
    _check_fits(tokenizer, vocab_size)
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    base_types = {}
    for i, piece in enumerate(proto.pieces[:vocab_size]):
        tokens[i], scores[i] = piece.piece.encode("utf-8"), piece.score
        base_types[i] = int(piece.type)  # sentencepiece's piece types are GGUF's token types (1 normal ... 6 byte)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id < vocab_size and token_id >= len(proto.pieces):
            tokens[token_id] = added.content.encode("utf-8")
    types = _token_types(tokenizer, vocab_size, base_types)  # special chat markers: CONTROL, whatever the proto says
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # llama.cpp's converter writes add_dummy_prefix (or nothing: true); what transformers does after a special token
    # depends on the tokenizer class and its `legacy`, so the prompts decide
    default = bool(proto.normalizer_spec.add_dummy_prefix)
    writer.add_add_space_prefix(choose_space_prefix(tokenizer, tokens, types, list(probe_prompts), default))
