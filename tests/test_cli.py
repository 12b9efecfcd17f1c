"""The command line as a first-time user meets it: every verb has help with an example; version works."""

import argparse
import subprocess
import sys

import pytest

from tunelab.cli.main import build_parser, main


def _verbs():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        yield name, p
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for action in nested:  # `convert pth_to_hf`, `data self-cognition`, ...
            for sub_name, sub_p in action.choices.items():
                yield f"{name} {sub_name}", sub_p


def test_the_pipeline_verbs_are_all_there():
    names = {name for name, _ in _verbs()}
    for verb in ["list-cfg", "copy-cfg", "train", "plan", "convert pth_to_hf", "convert merge", "chat", "web",
                 "serve", "check-dataset", "preview", "preprocess", "data self-cognition", "demo", "version"]:
        assert verb in names, f"`tunelab {verb}` is missing"


@pytest.mark.parametrize("name,parser", list(_verbs()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_verb_help_shows_an_example(name, parser):
    text = parser.format_help()
    assert "example" in text.lower(), f"`tunelab {name} --help` has no example"
    assert f"tunelab {name.split()[0]}" in text


def test_version_lists_dependencies(capsys):
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tunelab ") and "transformers" in out and "peft" in out


def test_python_m_tunelab_help():
    out = subprocess.run([sys.executable, "-m", "tunelab", "--help"], capture_output=True, text=True, check=True)
    assert "list-cfg" in out.stdout and "tunelab demo" in out.stdout


@pytest.mark.parametrize("argv", [["preview", "cfg.py", "-n", "0"], ["preview", "cfg.py", "-n", "-3"],
                                  ["preprocess", "cfg.py", "--num-proc", "0"],
                                  ["preprocess", "cfg.py", "--num-proc", "-1"]])
def test_counts_that_are_not_positive_are_refused_by_the_parser(argv, capsys):
    # `preview -n 0` printed one sample and `preprocess --num-proc 0` was taken as the config's num_proc
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[2]}: expected a positive whole number (1 or more), got {int(argv[3])}" in err, err


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "-inf", "lots"])
def test_plan_gpu_memory_must_be_a_positive_finite_number(value, capsys):
    # 0 was ignored (falsy), -5 checked against ("a -5 GiB GPU does NOT fit"), nan / inf were tracebacks
    with pytest.raises(SystemExit) as info:
        main(["plan", "cfg.py", f"--gpu-memory={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --gpu-memory: expected a" in err and "number of GiB" in err and "Traceback" not in err, err


def test_plan_gpu_memory_accepts_a_fraction():
    from tunelab.cli.main import build_parser

    assert build_parser().parse_args(["plan", "cfg.py", "--gpu-memory", "79.6"]).gpu_memory == 79.6


@pytest.mark.parametrize("command", [["chat", "m"], ["web", "m"], ["serve", "m"],
                                     ["predict", "m", "--data", "d", "--out", "o"], ["eval", "m", "--task", "mmlu_test"],
                                     ["convert", "merge", "b", "a", "o"], ["convert", "gguf", "m", "o.gguf"],
                                     ["reward", "m", "--data", "d"]])
def test_every_model_command_takes_llama_factorys_template_spelling(command):
    """--template (LLaMA-Factory's and check-dataset's spelling) is --prompt-template wherever a model is loaded."""
    from tunelab.cli.main import build_parser

    assert build_parser().parse_args([*command, "--template", "qwen_chat"]).prompt_template == "qwen_chat"


def _readme_commands(name: str) -> list[str]:
    """The `tunelab ...` command lines of a README's bash blocks, comments and line continuations dropped."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / name).read_text(encoding="utf-8")
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ")
    lines = (re.sub(r"\s+#.*", "", line).split() for line in blocks.splitlines())
    return [" ".join(words) for words in lines if words[:1] == ["tunelab"]]


def test_the_chinese_readme_gives_the_english_readmes_commands():
    """README_zh-CN.md is a translation: a reader following it runs the same commands, with the same flags."""
    english = _readme_commands("README.md")
    assert len(english) > 20
    assert _readme_commands("README_zh-CN.md") == english
