"""A sentencepiece tokenizer.model file read as its protobuf message (pieces, scores, types, the model's specs):
what `tunelab.model.internlm2` builds a fast tokenizer from, `tunelab.export.gguf_vocab` writes into GGUF, and
transformers' own converters read when a model ships tokenizer.model without tokenizer.json.

Recent sentencepiece (0.2.3) ships that message's module generated for protobuf 7, which refuses an older protobuf
at import (swanlab, for one, pins protobuf < 7); transformers ships the same message generated for any protobuf from
4 on. The refusal comes before sentencepiece's module registers its file, so transformers' can register the same
file name after it (the two cannot both load in one process)."""

from __future__ import annotations

import sys
from pathlib import Path


def model_proto_module():
    """The generated module of sentencepiece's ModelProto that loads under the installed protobuf. Where
    sentencepiece's own refuses, transformers' copy also takes its place under sentencepiece's name, so that
    transformers' converters (which import it from sentencepiece) read tokenizer.model files too."""
    try:
        from sentencepiece import sentencepiece_model_pb2

        return sentencepiece_model_pb2
    except Exception:  # protobuf's VersionError, which shares no base class with ImportError
        pass
    from transformers.utils import sentencepiece_model_pb2_new as module

    try:
        import sentencepiece
    except ImportError:
        return module
    sys.modules["sentencepiece.sentencepiece_model_pb2"] = module
    sentencepiece.sentencepiece_model_pb2 = module
    return module


def read_model_proto(path: str | Path):
    """The ModelProto in the tokenizer.model file at `path`."""
    proto = model_proto_module().ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto
