"""Export and merge never write into what they read, into a training checkpoint or over a work dir, and an adapter
is only applied to a base of the architecture it was trained on (unless --allow-other-base)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from chat_helpers import make_lora_checkpoint
from tests.train_helpers import assert_one_line_error
from tunelab.cli.main import main


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def base_and_work(tiny_llama_dir, tmp_path):
    """A base model of our own (the test may try to write over it) and a work dir trained on it (iter_10)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    work = tmp_path / "work"
    make_lora_checkpoint(base, work)
    return base, work


def test_to_hf_refuses_to_write_over_the_base_model_it_names(base_and_work, capsys):
    base, work = base_and_work
    before = _snapshot(base)
    code = main(["convert", "to-hf", str(work), str(base)])
    assert_one_line_error(capsys, code, f"OUT {base} is an input of this command", "Choose another OUT")
    assert _snapshot(base) == before


@pytest.mark.parametrize("out", ["work", "work/iter_10", "work/iter_10/hf", "other_work", "other_work/iter_12"])
@pytest.mark.parametrize("verb", ["to-hf", "merge"])
def test_export_refuses_a_checkpoint_or_a_work_dir_as_out(verb, out, base_and_work, tmp_path, capsys):
    base, work = base_and_work
    make_lora_checkpoint(base, tmp_path / "other_work", step=3)
    target = tmp_path / out
    before = {p: _snapshot(p) for p in (work, tmp_path / "other_work")}
    args = ["to-hf", str(work / "iter_10")] if verb == "to-hf" else ["merge", str(base), str(work / "iter_10")]
    code = main(["convert", *args, str(target), *(["--device", "cpu"] if verb == "merge" else [])])
    words = {"work": ["is a training work dir"], "other_work": ["is a training work dir"],
             "work/iter_10": ["is an input of this command"], "work/iter_10/hf": ["inside the training checkpoint"],
             "other_work/iter_12": ["training uses the iter_* names"]}  # the checkpoint a resumed run saves next
    assert_one_line_error(capsys, code, f"OUT {target}", *words[out])
    assert {p: _snapshot(p) for p in before} == before
    assert not (tmp_path / "work" / "iter_10" / "hf").exists()


def test_a_folder_inside_the_work_dir_is_a_fine_out(base_and_work, capsys):
    _, work = base_and_work
    assert main(["convert", "to-hf", str(work), str(work / "hf")]) == 0  # what `tunelab train` suggests
    assert (work / "hf" / "adapter_model.safetensors").is_file()


def test_out_that_is_a_file_and_a_shard_size_typo_are_refused_before_any_work(base_and_work, tmp_path, capsys):
    base, work = base_and_work
    (tmp_path / "file").write_text("not a folder")
    code = main(["convert", "to-hf", str(work), str(tmp_path / "file")])
    assert_one_line_error(capsys, code, f"OUT {tmp_path / 'file'} is a file", "pass a directory")
    code = main(["convert", "merge", str(base), str(work), str(tmp_path / "merged"), "--max-shard-size", "2GBB"])
    message = assert_one_line_error(capsys, code, "--max-shard-size '2GBB'", "e.g. 2GB")
    assert not (tmp_path / "merged").exists() and "loading" not in message
    code = main(["convert", "to-hf", str(work), str(tmp_path / "hf"), "--max-shard-size", "2.5GB"])
    assert_one_line_error(capsys, code, "--max-shard-size '2.5GB'")


def test_an_adapter_is_refused_on_a_same_shape_base_of_another_family(tiny_llama_dir, tiny_qwen2_dir, tmp_path,
                                                                        capsys):
    work = tmp_path / "work"
    make_lora_checkpoint(tiny_llama_dir, work)  # adapter_config.json names the Llama base
    out = tmp_path / "merged"
    code = main(["convert", "merge", str(tiny_qwen2_dir), str(work), str(out), "--device", "cpu"])
    assert_one_line_error(capsys, code, f"trained on {tiny_llama_dir} (model_type 'llama')",
                          f"{tiny_qwen2_dir} is a 'qwen2' model", "--allow-other-base")
    assert not (out / "config.json").exists()
    code = main(["chat", str(tiny_qwen2_dir), "--adapter", str(work), "--device", "cpu", "--prompt", "hi",
                 "--max-new-tokens", "2"])
    assert_one_line_error(capsys, code, "model_type 'llama'", "--allow-other-base")

    assert main(["convert", "merge", str(tiny_qwen2_dir), str(work), str(out), "--device", "cpu",
                 "--allow-other-base"]) == 0
    assert "applied to" in capsys.readouterr().out and (out / "config.json").is_file()


def test_gguf_refuses_a_directory_and_a_place_inside_a_checkpoint(base_and_work, tmp_path, capsys):
    pytest.importorskip("gguf")
    base, work = base_and_work
    (tmp_path / "dir.gguf").mkdir()
    code = main(["convert", "gguf", str(base), str(tmp_path / "dir.gguf")])
    assert_one_line_error(capsys, code, "is a directory", "name the file")
    code = main(["convert", "gguf", str(base), str(work / "iter_10" / "model.gguf")])
    assert_one_line_error(capsys, code, "inside the training checkpoint")
    assert not (work / "iter_10" / "model.gguf").exists()


def test_an_adapter_for_modules_the_base_lacks_names_each_once(base_and_work, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base, work = base_and_work
    adapter = work / "iter_10" / "model" / "adapter_model.safetensors"
    tensors = load_file(adapter)
    save_file({k.replace("q_proj", "qq_proj"): v for k, v in tensors.items()}, adapter)  # lora_A and lora_B of each
    code = main(["convert", "merge", str(base), str(work / "iter_10"), str(tmp_path / "out"), "--device", "cpu"])
    err = assert_one_line_error(capsys, code, "does not fit the base model", "the base has no module")
    named = "'model.layers.0.self_attn.qq_proj'"
    assert err.count(named) == 1, err


@pytest.mark.parametrize("verb", ["to-hf", "merge"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(verb, base_and_work, tmp_path, capsys,
                                                                  monkeypatch):
    """An OUT below a file, or in a folder the user may not write to, is one line naming OUT and why, before any
    weights are read (not a NotADirectoryError / PermissionError traceback, nor one after a long merge)."""
    base, work = base_and_work
    (tmp_path / "file").write_text("not a folder")
    args = ["to-hf", str(work)] if verb == "to-hf" else ["merge", str(base), str(work)]
    code = main(["convert", *args, str(tmp_path / "file" / "out"), *(["--device", "cpu"] if verb == "merge" else [])])
    message = assert_one_line_error(capsys, code, f"OUT {tmp_path / 'file' / 'out'}", "cannot write", "Not a directory")
    assert "loading" not in message

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked"))

    monkeypatch.setattr(Path, "mkdir", refuse)
    code = main(["convert", *args, str(tmp_path / "locked" / "out"), *(["--device", "cpu"] if verb == "merge" else [])])
    assert_one_line_error(capsys, code, f"OUT {tmp_path / 'locked' / 'out'}", "Permission denied")


def test_a_model_given_as_the_adapter_is_named_as_a_model_and_swapped_arguments_are_named(base_and_work, tmp_path,
                                                                                           capsys):
    """A full or merged model where an adapter is asked for (merge's ADAPTER, chat's --adapter) is named as a model to
    use as it is, not 'convert a checkpoint first' (whose command would write into that model); merge's BASE and
    ADAPTER given the other way round are named as swapped."""
    from tunelab.chat.engine import load_chat_model
    from tunelab.errors import TunelabError

    base, work = base_and_work
    merged = tmp_path / "merged"
    assert main(["convert", "merge", str(base), str(work), str(merged), "--device", "cpu"]) == 0
    capsys.readouterr()
    code = main(["convert", "merge", str(base), str(merged), str(tmp_path / "out"), "--device", "cpu"])
    message = assert_one_line_error(capsys, code, f"{merged} is a merged model", "tunelab chat")
    assert "pth_to_hf" not in message
    with pytest.raises(TunelabError, match=f"{base} is a full model, not a LoRA adapter") as err:
        load_chat_model(str(base), adapter=str(base), device="cpu")
    assert "pth_to_hf" not in str(err.value)
    code = main(["convert", "merge", str(work), str(base), str(tmp_path / "out"), "--device", "cpu"])
    assert_one_line_error(capsys, code, "swapped", f"tunelab convert merge {base} {work} {tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()


# --- a checkpoint damaged on disk (a kill, a cut-off copy, a flipped byte) is named, never exported as it is ---------

def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40  # inside the tensor data: the file still loads, with one weight changed
    path.write_bytes(bytes(data))


def _full_checkpoint(base: Path, work: Path, step: int) -> Path:
    """iter_N of a full fine-tuning run as training writes it: model/, training_state.pt, checksums.json."""
    import torch

    from tunelab.train import layout
    from tunelab.train.checksums import write_manifest

    ckpt = layout.checkpoint_dir(work, step)
    shutil.copytree(base, ckpt / layout.MODEL_DIR)
    torch.save({"step": step}, ckpt / layout.STATE_FILE)
    layout.write_meta(ckpt, {"base_model": str(base), "method": "full", "prompt_template": "qwen_chat"})
    write_manifest(ckpt)
    layout.write_pointer(work, ckpt)
    return ckpt


@pytest.mark.parametrize("verb", ["to-hf", "chat", "chat --adapter iter_N/model"])
def test_a_checkpoint_that_fails_its_checksums_is_named_and_the_sound_one_before_it_offered(verb, base_and_work,
                                                                                             tmp_path, capsys):
    """Training verifies checksums.json before resuming; export and chat read the same weights, so a flipped byte
    must not become a silently different adapter (nor a cut-off file a traceback)."""
    from tunelab.train.checksums import write_manifest

    base, work = base_and_work
    write_manifest(work / "iter_10")
    newest = make_lora_checkpoint(base, work, step=20)
    write_manifest(newest)
    _flip_a_byte(newest / "model" / "adapter_model.safetensors")
    chat = ["--device", "cpu", "--prompt", "hi", "--max-new-tokens", "2"]
    args = {"to-hf": ["convert", "to-hf", str(work), str(tmp_path / "hf")], "chat": ["chat", str(work), *chat],
            "chat --adapter iter_N/model": ["chat", str(base), "--adapter", str(newest / "model"), *chat]}[verb]
    message = assert_one_line_error(capsys, main(args), f"{newest} is damaged",
                                    "model/adapter_model.safetensors does not match its checksum", "iter_10")
    assert "loading" not in message and not (tmp_path / "hf").exists()


def test_a_cut_off_full_model_is_one_line_not_a_traceback(tiny_llama_dir, tmp_path, capsys):
    work = tmp_path / "work"
    ckpt = _full_checkpoint(Path(tiny_llama_dir), work, 4)
    weights = ckpt / "model" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    code = main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf")])
    assert_one_line_error(capsys, code, f"{ckpt} is damaged", "model/model.safetensors has", "no earlier")


def test_a_save_cut_short_is_refused_by_name(base_and_work, tmp_path, capsys):
    """iter_N.tmp is a save a kill interrupted (training removes it at its next start): it may lack any file."""
    base, work = base_and_work
    partial = work / "iter_12.tmp"
    shutil.copytree(work / "iter_10", partial)
    (partial / "model" / "adapter_model.safetensors").unlink()
    (partial / "model" / "adapter_model.safetensors").write_bytes(b"")
    code = main(["convert", "to-hf", str(partial), str(tmp_path / "hf")])
    assert_one_line_error(capsys, code, f"{partial} is a save that was cut short", str(work / "iter_10"))


@pytest.mark.parametrize("given", ["iter_N/model", "iter_N", "WORK_DIR"])
def test_merge_refuses_a_full_run_base_that_fails_its_checksums(given, base_and_work, tmp_path, capsys):
    """BASE may be a full fine-tuning run (an adapter trained on top of it): chat and convert gguf check its
    checksums.json before reading it, and so does merge, so a flipped byte is not merged into a quietly other model."""
    base, work = base_and_work
    full = _full_checkpoint(base, tmp_path / "full", 4)
    _flip_a_byte(full / "model" / "model.safetensors")
    typed = {"iter_N/model": full / "model", "iter_N": full, "WORK_DIR": full.parent}[given]
    out = tmp_path / "out"
    code = main(["convert", "merge", str(typed), str(work), str(out), "--device", "cpu"])
    assert_one_line_error(capsys, code, f"{full} is damaged", "model/model.safetensors does not match its checksum")
    assert not (out / "config.json").exists()


def test_merge_takes_a_full_runs_work_dir_as_base(base_and_work, tmp_path, capsys):
    """A full run's WORK_DIR or iter_N as BASE means its model/, as it does for chat and convert gguf."""
    base, work = base_and_work
    full = _full_checkpoint(base, tmp_path / "full", 4)
    for typed, out in ((full.parent, tmp_path / "a"), (full, tmp_path / "b")):
        assert main(["convert", "merge", str(typed), str(work), str(out), "--device", "cpu"]) == 0, capsys.readouterr()
        assert (out / "config.json").is_file()
    code = main(["convert", "merge", str(work), str(work), str(tmp_path / "c"), "--device", "cpu"])
    assert_one_line_error(capsys, code, f"BASE {work} is a LoRA adapter or checkpoint, not a model",
                          f"tunelab convert merge {base} {work} merged")


def test_merge_refuses_an_adapter_folder_without_a_recorded_base_as_base_in_merges_words(base_and_work, tmp_path,
                                                                                         capsys):
    """A PEFT adapter folder given as BASE (no tunelab.json naming what it was trained on) is not a model: the error
    speaks of BASE, not of chat's MODEL and --adapter."""
    _, work = base_and_work
    peft = tmp_path / "peft"
    shutil.copytree(work / "iter_10" / "model", peft)
    (peft / "tunelab.json").unlink(missing_ok=True)
    code = main(["convert", "merge", str(peft), str(work), str(tmp_path / "out"), "--device", "cpu"])
    message = assert_one_line_error(capsys, code, f"BASE {peft} is a LoRA adapter or checkpoint, not a model")
    assert "--adapter" not in message and "MODEL" not in message
