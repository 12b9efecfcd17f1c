"""The README's first command: the built-in demo must teach the tiny model its new identity, end to end."""

from tunelab.cli.main import main


def test_demo_teaches_the_new_identity(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "demo"), "--name", "TuneBot"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    # the chat step's answers (after "5/5") name the assistant in Chinese and in English
    chat = out.split("5/5", 1)[1]
    answers = [line for line in chat.splitlines() if "TuneBot" in line and not line.startswith(("$", "["))]
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in a) for a in answers), chat
    assert any(a.isascii() for a in answers), chat
    assert (tmp_path / "demo" / "hf" / "tunelab.json").is_file()
    assert (tmp_path / "demo" / "work_dir" / "last_checkpoint").is_file()
