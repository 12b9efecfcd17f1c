"""A sentencepiece tokenizer.model file read as its protobuf message (pieces, scores, types, the model's specs):
what `tunelab.model.internlm2` builds a fast tokenizer from and `tunelab.export.gguf_vocab` writes into GGUF."""

from __future__ import annotations

from pathlib import Path


def read_model_proto(path: str | Path):
    """The ModelProto in `path`. Recent sentencepiece (0.2.3) ships the message generated for protobuf 7, which refuses an
    older protobuf at import (swanlab, for one, pins protobuf < 7); transformers ships the same message generated for
    any protobuf from 4 on. The refusal comes before sentencepiece's module registers its file, so transformers'
    can register the same file name after it (the two modules cannot both load in one process)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except Exception:  # protobuf's VersionError, which shares no base class with ImportError
        from transformers.utils import sentencepiece_model_pb2_new as sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto
