"""tokenizer.model files under either protobuf: `tunelab.model.sentencepiece_file` reads the file with the pieces,
scores and types sentencepiece itself reports, and a model that ships tokenizer.model without tokenizer.json loads
through `load_tokenizer` (transformers' converter) with sentencepiece's own ids. scripts/test.sh runs this file again
with swanlab's protobuf 6 ahead on the path, where sentencepiece's generated module refuses to load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tunelab.model.sentencepiece_file import read_model_proto
from tunelab.model.tiny import make_internlm2_tokenizer

TEXTS = ["hello world", "Who are you? 我是一个助手。", "tokens 12345 and   spaces"]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm")
    make_internlm2_tokenizer(path)
    return path


def test_read_model_proto_holds_what_sentencepiece_reports(spm_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    proto = read_model_proto(spm_dir / "tokenizer.model")
    assert len(proto.pieces) == sp.get_piece_size()
    assert [p.piece for p in proto.pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [p.score for p in proto.pieces] == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    assert [i for i, p in enumerate(proto.pieces) if p.type == 3] == [
        i for i in range(sp.get_piece_size()) if sp.is_control(i)]
    assert proto.trainer_spec.model_type == 2  # BPE, as made
    assert proto.normalizer_spec.add_dummy_prefix is False


def test_a_model_with_only_tokenizer_model_loads_with_sentencepiece_ids(tmp_path):
    import sentencepiece as spm

    from tunelab.model.tiny import _CORPUS

    model_dir = tmp_path / "llama_like"
    model_dir.mkdir()
    # Laid out like Llama-2's tokenizer.model: BPE, byte fallback, digits split, a dummy prefix (which transformers'
    # Llama converter assumes).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4), model_prefix=str(model_dir / "tokenizer"), vocab_size=600,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (model_dir / "tokenizer.vocab").unlink()
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    # A fresh process: in this one an earlier read may already have put the loadable module in place.
    child = subprocess.run(
        [sys.executable, "-c", "import json, sys; from tunelab.model.tokenizer import load_tokenizer; "
         "t = load_tokenizer(sys.argv[1]); print(json.dumps([t(x, add_special_tokens=False).input_ids "
         "for x in json.loads(sys.argv[2])]))", str(model_dir), json.dumps(TEXTS)],
        capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    assert json.loads(child.stdout.splitlines()[-1]) == [sp.encode(text) for text in TEXTS]
