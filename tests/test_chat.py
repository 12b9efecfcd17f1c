"""`tunelab chat`: the taught answer comes back, streamed or not, with the template the model was trained with."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from chat_helpers import ANSWER, QUESTION, TEMPLATE, make_lora_checkpoint, taught_model_dir
from tunelab.cli.main import main


@pytest.fixture(scope="module")
def taught_dir(tmp_path_factory):
    return taught_model_dir(tmp_path_factory)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_prompt_flag_prints_taught_answer_and_template(taught_dir, capsys):
    assert main(["chat", str(taught_dir), "--prompt", QUESTION, "--max-new-tokens", "20"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == ANSWER
    assert f"prompt template: {TEMPLATE} (tunelab.json)" in err


def test_stdin_questions_one_per_line_no_streamer(taught_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n\nRESET\n{QUESTION}\nEXIT\nnever asked\n"))
    assert main(["chat", str(taught_dir), "--no-streamer", "--max-new-tokens", "20"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [ANSWER, ANSWER]  # blank line skipped, RESET silent, nothing after EXIT


def test_interactive_multi_turn_reset_exit(taught_dir):
    from tunelab.chat.engine import load_chat_model
    from tunelab.chat.terminal import run_chat
    from tunelab.model.generate import GenerationSettings

    chat = load_chat_model(str(taught_dir))
    seen = []
    original = chat.reply

    def spy(messages, settings, **kw):
        seen.append([m["content"] for m in messages])
        return original(messages, settings, **kw)

    chat.reply = spy
    stdin = FakeTTY(f"{QUESTION}\n\nsecond\nline\n\nRESET\n{QUESTION}\n\nEXIT\n")
    out = io.StringIO()
    run_chat(chat, GenerationSettings(max_new_tokens=20), stdin=stdin, out=out)
    text = out.getvalue()
    assert text.count(ANSWER) >= 2 and "history cleared" in text and "double enter" in text
    assert seen[0] == [QUESTION]
    assert seen[1] == [QUESTION, ANSWER, "second\nline"]  # history kept, a question may span lines
    assert seen[2] == [QUESTION]  # RESET cleared it


def test_a_question_over_the_context_is_refused_and_the_session_goes_on(taught_dir):
    from tunelab.chat.engine import load_chat_model
    from tunelab.chat.terminal import run_chat
    from tunelab.model.generate import GenerationSettings

    chat = load_chat_model(str(taught_dir), max_model_len=40)
    out = io.StringIO()
    run_chat(chat, GenerationSettings(max_new_tokens=20), stdin=FakeTTY("word " * 100 + f"\n\n{QUESTION}\n\nEXIT\n"),
             out=out)
    text = out.getvalue()
    assert "maximum context length is 40 tokens" in text and "RESET" in text
    assert text.count(ANSWER) == 1  # the session went on: the next question is answered
    chat.batcher.stop()


def test_streamed_pieces_make_the_reply(taught_dir):
    from tunelab.chat.engine import load_chat_model
    from tunelab.chat.terminal import answer
    from tunelab.model.generate import GenerationSettings

    chat = load_chat_model(str(taught_dir))
    pieces = []

    class Out(io.StringIO):
        def write(self, s):
            pieces.append(s)
            return super().write(s)

    reply = answer(chat, [], QUESTION, GenerationSettings(max_new_tokens=20), out=Out())
    assert reply == ANSWER
    assert len([p for p in pieces if p.strip()]) > 1  # it came in several pieces
    assert "".join(pieces).strip() == ANSWER


def test_adapter_checkpoint_template_from_tunelab_json(tiny_llama_dir, tmp_path, capsys):
    make_lora_checkpoint(tiny_llama_dir, tmp_path / "work", template="llama3_chat")
    assert main(["chat", str(tiny_llama_dir), "--adapter", str(tmp_path / "work"), "--prompt", "Hi",
                 "--max-new-tokens", "3"]) == 0
    assert "prompt template: llama3_chat (tunelab.json)" in capsys.readouterr().err
    # the checkpoint alone: its tunelab.json names the base
    assert main(["chat", str(tmp_path / "work" / "iter_10"), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert f"loading {tiny_llama_dir} with adapter" in err


def test_a_full_run_with_an_adapter_is_refused_not_the_adapter_dropped(tiny_llama_dir, tmp_path, capsys):
    """A full fine-tuning run is a whole model: an --adapter beside it is refused, not dropped silently."""
    import shutil

    from tunelab.train.layout import write_meta

    full = tmp_path / "full" / "iter_4"
    shutil.copytree(tiny_llama_dir, full / "model")
    (full / "training_state.pt").write_bytes(b"")
    write_meta(full, {"base_model": str(tiny_llama_dir), "method": "full", "prompt_template": TEMPLATE})
    make_lora_checkpoint(tiny_llama_dir, tmp_path / "lora")
    assert main(["chat", str(tmp_path / "full"), "--adapter", str(tmp_path / "lora"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "already a checkpoint" in err and str(tmp_path / "full") in err and "--adapter" in err


def test_template_guessed_when_not_recorded(tiny_llama_dir, capsys):
    assert main(["chat", str(tiny_llama_dir), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "prompt template:" in err and ("guessed" in err or "fallback" in err)


def test_unknown_template_lists_known_ones(taught_dir, capsys):
    assert main(["chat", str(taught_dir), "--prompt-template", "nope", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "qwen_chat" in err and "llama3_chat" in err


def test_adapter_for_another_base_is_named(tiny_llama_dir, tmp_path, capsys):
    from tunelab.model.tiny import make_model

    other = make_model(tmp_path / "wider", "llama", hidden_size=96)
    make_lora_checkpoint(other, tmp_path / "work")
    assert main(["chat", str(tiny_llama_dir), "--adapter", str(tmp_path / "work"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the base model" in err and str(other) in err


def test_missing_model_and_adapter(tmp_path, capsys):
    assert main(["chat", str(tmp_path), "--adapter", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "adapter not found" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "no_model"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no_model" in err  # names the path it could not load


def test_bits_on_cpu_falls_back_and_says_so(taught_dir, capsys):
    pytest.importorskip("bitsandbytes")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU fallback")
    assert main(["chat", str(taught_dir), "--bits", "4", "--prompt", QUESTION, "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert "no CUDA GPU" in err and "4-bit on the CPU" in err
    assert out.strip()  # a 4-bit tiny model still answers (not necessarily the taught text)


def test_chat_subprocess_reads_piped_stdin(taught_dir):
    result = subprocess.run([sys.executable, "-m", "tunelab", "chat", str(taught_dir), "--max-new-tokens", "20"],
                            input=f"{QUESTION}\n", capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ANSWER


def test_chat_ends_its_generation_worker_before_it_returns(taught_dir, capsys):
    # A daemon worker still inside a torch op when Python exits dies with "terminate called without an active
    # exception" (exit -6), which a piped `tunelab chat` hit on CI after printing its answer.
    import threading

    before = set(threading.enumerate())
    assert main(["chat", str(taught_dir), "--prompt", QUESTION, "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.strip() == ANSWER
    assert not [t for t in set(threading.enumerate()) - before if t.name == "tunelab-generate"]


@pytest.mark.parametrize("flag, value, expected", [
    ("--top-p", "0", "--top-p 0.0: must be above 0 and at most 1"),
    ("--temperature", "-1", "--temperature -1.0: must be 0 (greedy) or more"),
    ("--repetition-penalty", "0", "--repetition-penalty 0.0: must be above 0"),
])
def test_chat_rejects_sampling_settings_out_of_range_before_loading(tmp_path, capsys, flag, value, expected):
    assert main(["chat", str(tmp_path / "no_model"), flag, value, "--prompt", "hi"]) == 2
    assert expected in capsys.readouterr().err


def test_an_empty_prompt_is_refused_and_an_unanswered_question_fails_a_script(taught_dir, capsys):
    """--prompt "" (an unset variable) or blank is refused before loading, as blank stdin lines are skipped; a
    question that got no answer (over the context) makes a non-interactive run exit 1, the others still answered."""
    from tests.train_helpers import assert_one_line_error

    code = main(["chat", str(taught_dir), "--prompt", QUESTION, "--prompt", "  "])
    message = assert_one_line_error(capsys, code, "--prompt 2 is empty")
    assert "loading" not in capsys.readouterr().err + message
    code = main(["chat", str(taught_dir), "--prompt", "word " * 2100, "--prompt", QUESTION, "--max-new-tokens", "20"])
    out, err = capsys.readouterr()
    assert code == 1 and out.strip() == ANSWER and "maximum context length is 2048 tokens" in err


def test_xtuners_system_template_flag_gives_its_text(capsys):
    """`xtuner chat ... --system-template alpaca` as XTuner users type it: the system prompt is that template's text,
    in every command that loads a model; an unknown name lists the known ones; with --system it is one or the other."""
    from tunelab.cli.main import build_parser
    from tunelab.config.xtuner_runtime import SYSTEM_TEMPLATES

    parser = build_parser()
    for command in ("chat", "web", "serve", "predict"):
        extra = ["--data", "d.jsonl", "--out", "o.jsonl"] if command == "predict" else []
        args = parser.parse_args([command, "m", "--system-template", "alpaca", *extra])
        assert args.system == SYSTEM_TEMPLATES["alpaca"]
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "m", "--system-template", "alpacca"])
    assert "'alpaca'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "m", "--system", "Be brief.", "--system-template", "alpaca"])
    assert "not allowed with" in capsys.readouterr().err
