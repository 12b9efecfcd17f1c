"""The tokenizer of a model directory: loaded with a pad token, saved with the files a later step reads again.

`load_tokenizer` goes through transformers' `AutoTokenizer`, InternLM2's sentencepiece tokenizer converted natively
(`tunelab.model.internlm2`, no remote code) and a lone tokenizer.model through a protobuf module that loads
(`tunelab.model.sentencepiece_file`); a tokenizer without a pad token gets one (never trained on, never attended to).
`save_tokenizer` writes it beside a checkpoint, adapter or merged model with the sentencepiece tokenizer.model it was
loaded beside (the GGUF export reads it) and the `legacy` key transformers leaves out. Missing files and a tokenizer
that needs remote code raise `TunelabError` with the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.model import internlm2
from tunelab.model.model_dir import resolve_model_dir
from tunelab.model.sentencepiece_file import model_proto_module

log = logging.getLogger(__name__)


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (never trained on, never attended to)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(path)
    if internlm2.is_internlm2_tokenizer(model_dir):
        # Always native: InternLM2's remote tokenizer code was written for transformers 4.
        tokenizer = internlm2.load_tokenizer(model_dir)
    else:
        if Path(model_dir, "tokenizer.model").is_file() and not Path(model_dir, "tokenizer.json").is_file():
            model_proto_module()  # transformers converts the file, through a module that loads under this protobuf
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        except ValueError as exc:
            if "trust_remote_code" in str(exc) and not trust_remote_code:
                raise TunelabError(f"{model_dir}: the tokenizer needs the repository's own code. Set "
                                   "`trust_remote_code = True` in the config (or --trust-remote-code on chat) "
                                   "if you trust it.") from None
            if "instantiate the backend tokenizer" in str(exc):  # tokenizer_config.json without tokenizer.json
                raise TunelabError(f"{model_dir}: no tokenizer to load (tokenizer.json or tokenizer.model is "
                                   "missing). Copy the base model's tokenizer files (tokenizer.json or "
                                   "tokenizer.model, and tokenizer_config.json) into it.") from None
            raise
        except OSError as exc:
            raise TunelabError(f"{model_dir}: no tokenizer files found ({exc}). Copy tokenizer.json / "
                               "tokenizer.model and tokenizer_config.json of the base model into it.") from None
    if tokenizer.pad_token is None:
        # Padding is its own segment and labelled -100, so any token will do; say which one.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        log.warning("%s: the tokenizer has no pad token; using %r for padding (it is never trained on).",
                    model_dir, tokenizer.pad_token)
    tokenizer.tunelab_dir = model_dir  # where save_tokenizer finds the sentencepiece file to carry along
    return tokenizer


SENTENCEPIECE_FILE = "tokenizer.model"


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """`save_pretrained`, plus the sentencepiece tokenizer.model the tokenizer was loaded beside (when it was loaded
    by `load_tokenizer`). transformers writes tokenizer.json alone, and the GGUF export of a sentencepiece model
    (InternLM2, Llama 2, Mistral) reads its pieces and scores from tokenizer.model: each checkpoint, adapter and
    merged model carries the file on, so `tunelab convert gguf` works on any of them."""
    import shutil

    tokenizer.save_pretrained(out_dir)
    source_dir = getattr(tokenizer, "tunelab_dir", None)
    source, target = Path(source_dir or ".", SENTENCEPIECE_FILE), Path(out_dir, SENTENCEPIECE_FILE)
    if source_dir and source.is_file() and not target.exists():
        shutil.copyfile(source, target)
    _keep_legacy_spacing(tokenizer, Path(out_dir, "tokenizer_config.json"))


def _keep_legacy_spacing(tokenizer, config_file: Path) -> None:
    """A Llama / Mistral tokenizer loaded with `legacy: true` puts "▁" before the text after each special token;
    transformers 5 saves it without the `legacy` key, and reloaded it would not (other ids than training gave, at
    every turn of a chat prompt). Write the key back."""
    import json

    legacy = getattr(tokenizer, "legacy", None)
    if not isinstance(legacy, bool) or not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if "legacy" not in config:
        config["legacy"] = legacy
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
