"""Bad inputs and a hostile disk get one line naming the file / setting and the fix, exit code 2, no traceback."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil

import pytest
import torch

from chat_helpers import make_lora_checkpoint
from tests.train_helpers import assert_one_line_error, write_config
from tunelab.cli.main import main
from tunelab.train import layout


@pytest.fixture
def config(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    return write_config(tmp_path, tiny_llama_dir, max_steps=2)


def _train(config, work, *extra):
    return main(["train", str(config), "--work-dir", str(work), "--device", "cpu", *extra])


# How a full disk surfaces: Python's own writes (json, the tokenizer files) raise OSError ENOSPC; torch.save raises
# RuntimeError with its writer's words (pytorch/pytorch#13542 and many since).
FULL_DISK = {"OSError": OSError(errno.ENOSPC, "No space left on device"),
             "RuntimeError": RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed "
                                          "writing file data/0: file write failed")}


@pytest.mark.parametrize("error", sorted(FULL_DISK))
def test_a_full_disk_during_a_save_keeps_the_earlier_checkpoint(error, config, tmp_path, monkeypatch, capsys):
    original, saves = torch.save, {"n": 0}

    def save_onto_a_full_disk(obj, path, *args, **kwargs):
        if str(path).endswith(layout.STATE_FILE):
            saves["n"] += 1
            if saves["n"] == 2:  # the second checkpoint: the disk is full now
                raise FULL_DISK[error]
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_onto_a_full_disk)
    code = _train(config, tmp_path / "work")
    words = ["No space left on device"] if error == "OSError" else ["file write failed", "GiB free there"]
    assert_one_line_error(capsys, code, f"saving checkpoint {tmp_path / 'work' / 'iter_2'} failed", *words,
                          "Free disk space", "--resume auto (from iter_1")
    assert [p.name for p in layout.list_checkpoints(tmp_path / "work")] == ["iter_1"]
    assert not layout.partial_saves(tmp_path / "work")


def test_a_work_dir_that_turns_read_only_during_a_save(config, tmp_path, monkeypatch, capsys):
    original = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    code = _train(config, tmp_path / "work")
    assert_one_line_error(capsys, code, "saving checkpoint", "Read-only file system", "iter_1.tmp",
                          "make", "writable", "step 0: no checkpoint saved yet")


def test_a_read_only_work_dir_at_the_start(config, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes into read-only folders; sysfs refuses even root
        work = pathlib.Path("/sys/tunelab_work")
        if not pathlib.Path("/sys/kernel").is_dir() or work.exists():
            pytest.skip("root writes into read-only folders, and there is no sysfs to refuse it")
        assert_one_line_error(capsys, _train(config, work), f"{work}: cannot write there", "--work-dir")
        return
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o555)
    try:
        assert_one_line_error(capsys, _train(config, work), f"{work}: cannot write there", "--work-dir")
    finally:
        work.chmod(0o755)


def test_a_damaged_adapter_in_a_checkpoint_without_checksums(config, tmp_path, capsys):
    work = tmp_path / "work"
    assert _train(config, work) == 0
    for ckpt in layout.list_checkpoints(work):  # as an older tunelab saved them: no checksums.json
        (ckpt / layout.MANIFEST_FILE).unlink()
    weights = work / "iter_2" / layout.MODEL_DIR / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # cut off inside its header
    capsys.readouterr()
    code = _train(config, work, "--resume", "auto", "--cfg-options", "max_steps=3")
    # advice that works while newer checkpoints exist or not: set this one aside, resume from the one before
    assert_one_line_error(capsys, code, f"{weights}: cannot be read", "damaged",
                          f"move {work / 'iter_2'} out of {work}, then continue with --resume auto")


@pytest.fixture
def garbage_bin_adapter(tiny_llama_dir, tmp_path):
    """A work dir whose adapter weights are a .bin file of garbage (as a broken download or disk would leave)."""
    ckpt = make_lora_checkpoint(tiny_llama_dir, tmp_path / "work")
    model_dir = ckpt / layout.MODEL_DIR
    (model_dir / "adapter_model.safetensors").unlink()
    (model_dir / "adapter_model.bin").write_bytes(os.urandom(3000))
    return tmp_path / "work", model_dir / "adapter_model.bin"


@pytest.mark.parametrize("verb", ["to-hf", "merge", "chat"])
def test_a_garbage_bin_adapter(verb, garbage_bin_adapter, tiny_llama_dir, tmp_path, capsys):
    work, weights = garbage_bin_adapter
    argv = {"to-hf": ["convert", "to-hf", str(work), str(tmp_path / "hf")],
            "merge": ["convert", "merge", str(tiny_llama_dir), str(work), str(tmp_path / "merged"), "--device", "cpu"],
            "chat": ["chat", str(tiny_llama_dir), "--adapter", str(work), "--device", "cpu", "--prompt", "hi"]}[verb]
    assert_one_line_error(capsys, main(argv), f"{weights}: cannot be read as adapter weights",
                          "convert the training checkpoint again")


def test_a_seed_beyond_numpys_range(config, tmp_path, capsys):
    code = _train(config, tmp_path / "work", "--seed", str(2**70))
    assert_one_line_error(capsys, code, "'seed' must be a whole number from 0 to 2**32 - 1", str(2**70))


@pytest.mark.parametrize("flag, value, says", [
    ("--seed", "-1", "--seed: 'seed' must be a whole number from 0 to 2**32 - 1"),
    ("--deepspeed", "zero9", "--deepspeed: 'deepspeed' must be None, one of 'zero1'"),
])
def test_a_bad_value_of_a_settings_own_flag_names_that_flag(flag, value, says, config, tmp_path, capsys):
    # the flag became a --cfg-options override, and its error named --cfg-options, which the command line never had
    message = assert_one_line_error(capsys, _train(config, tmp_path / "work", flag, value), says)
    assert "--cfg-options" not in message


def test_fsdp_in_one_process_says_to_launch_several(config, tmp_path, capsys):
    # was torch's "environment variable RANK expected, but not set" traceback from fully_shard
    code = _train(config, tmp_path / "work", "--fsdp")
    assert_one_line_error(capsys, code, "fsdp = True in one process", "--nproc-per-node", "fsdp = False")


def test_a_lora_target_module_that_matches_nothing(config, tmp_path, capsys):
    code = _train(config, tmp_path / "work", "--cfg-options", "lora_target_modules=['q_proj','qproj']")
    assert_one_line_error(capsys, code, "lora_target_modules: 'qproj' matches no module", "'q_proj'", "'v_proj'",
                          "'all-linear'")


def test_a_config_that_calls_sys_exit(tmp_path, capsys):
    config = tmp_path / "exits.py"
    config.write_text("import sys\nlr = 1e-4\nsys.exit(3)\n")
    code = main(["train", str(config), "--device", "cpu"])
    assert_one_line_error(capsys, code, f"{config}: the config called sys.exit(3) (line 3)", "remove the exit call")


def test_resuming_with_another_lora_rank_names_the_tensor_and_lora_r(config, tmp_path, capsys):
    # load_state_dict's bare "size mismatch" traceback before; the config was trained with lora_r = 8
    assert _train(config, tmp_path / "work") == 0
    capsys.readouterr()
    code = _train(config, tmp_path / "work", "--resume", "auto", "--cfg-options", "lora_r=4", "max_steps=3")
    # the checkpoint's recorded settings: refused before anything loads (tests/test_resume_settings.py)
    assert_one_line_error(capsys, code, "lora_r was 8 in the checkpoint, is 4 now",
                          "resume with the config the run was trained with")
    for ckpt in layout.list_checkpoints(tmp_path / "work"):  # as an older tunelab saved them: no recorded settings
        meta = layout.read_meta(ckpt)
        del meta["run"]
        layout.write_meta(ckpt, meta)
    code = _train(config, tmp_path / "work", "--resume", "auto", "--cfg-options", "lora_r=4", "max_steps=3")
    assert_one_line_error(capsys, code, "adapter does not match this config's LoRA settings", "lora_A.weight has shape [8, ",
                          "in the checkpoint, [4, ", "lora_r differs (the checkpoint's rank is 8, "
                          "this config's 4)", "Resume with the config it was trained with")


def test_resuming_a_full_run_on_another_size_of_model_names_the_model(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from tunelab.model.tiny import make_model

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path, tiny_llama_dir, max_steps=1, method="full")
    assert _train(config, tmp_path / "work") == 0
    capsys.readouterr()
    wider = make_model(tmp_path / "wider", "llama", hidden_size=96)
    code = _train(config, tmp_path / "work", "--resume", "auto",
                  "--cfg-options", f"pretrained_model_name_or_path={str(wider)!r}", "max_steps=2")
    assert_one_line_error(capsys, code, "the saved model does not match this config's model", "in the checkpoint",
                          "pretrained_model_name_or_path is a model of another size")
