"""The work dir and checkpoint layout (tunelab.train.layout): what training writes, export and chat find."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.train import layout


def _checkpoint(work_dir, step):
    (layout.checkpoint_dir(work_dir, step) / layout.MODEL_DIR).mkdir(parents=True)
    return layout.checkpoint_dir(work_dir, step)


def test_a_work_dir_means_its_last_checkpoint_even_after_it_moved(tmp_path):
    work = tmp_path / "a"
    _checkpoint(work, 2)
    last = _checkpoint(work, 10)
    layout.write_pointer(work, last)
    assert layout.resolve_checkpoint(work) == last
    assert layout.resolve_checkpoint(work / layout.POINTER_FILE) == last
    work.rename(tmp_path / "b")  # the pointer still names the old absolute path
    assert layout.last_checkpoint(tmp_path / "b") == tmp_path / "b" / "iter_10"


def test_without_a_pointer_the_newest_complete_checkpoint_counts(tmp_path):
    _checkpoint(tmp_path, 9)
    _checkpoint(tmp_path, 10)
    (tmp_path / "iter_11.tmp" / layout.MODEL_DIR).mkdir(parents=True)  # a save that was killed
    assert [p.name for p in layout.list_checkpoints(tmp_path)] == ["iter_9", "iter_10"]
    assert layout.resolve_checkpoint(tmp_path) == tmp_path / "iter_10"


def test_the_pointer_is_a_hint_the_newest_complete_checkpoint_stands_in(tmp_path):
    _checkpoint(tmp_path, 4)
    (tmp_path / layout.POINTER_FILE).write_text(str(tmp_path / "iter_5"))  # names a checkpoint that was deleted
    assert layout.last_checkpoint(tmp_path) is None
    assert layout.resolve_checkpoint(tmp_path) == tmp_path / "iter_4"
    (tmp_path / layout.POINTER_FILE).write_bytes(b"\xff\xfe garbage")  # unreadable
    assert layout.resolve_checkpoint(tmp_path) == tmp_path / "iter_4"


def test_a_copied_work_dir_reads_its_own_checkpoints_not_the_originals(tmp_path):
    original = tmp_path / "a"
    layout.write_pointer(original, _checkpoint(original, 6))
    assert (original / layout.POINTER_FILE).read_text().strip() == "iter_6"  # relative: the work dir may move
    copy = tmp_path / "b"
    _checkpoint(copy, 3)
    (copy / layout.POINTER_FILE).write_text(str(original / "iter_6"))  # an absolute pointer (older tunelab)
    assert layout.last_checkpoint(copy) is None
    assert layout.resolve_checkpoint(copy) == copy / "iter_3"


def test_broken_tunelab_json_names_the_file(tmp_path):
    (tmp_path / layout.META_FILE).write_text('{"base_model": ')
    with pytest.raises(TunelabError, match=r"tunelab\.json: not valid JSON"):
        layout.read_meta(tmp_path)


def test_metadata_written_is_read_back_as_the_config_says(tmp_path):
    from tunelab.config.schema import TrainConfig

    cfg = TrainConfig(pretrained_model_name_or_path="base", method="lora", prompt_template="qwen_chat", SYSTEM="Hi.")
    layout.write_meta(tmp_path, layout.training_meta(cfg))
    meta = layout.read_meta(tmp_path)
    assert meta["base_model"] == "base" and meta["prompt_template"] == "qwen_chat" and meta["system"] == "Hi."
    assert json.loads((tmp_path / layout.META_FILE).read_text())["method"] == "lora"


def test_a_raw_deepspeed_checkpoint_says_how_to_read_it(tmp_path):
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(TunelabError, match="raw deepspeed checkpoint.*load_consolidated_state_dict"):
        layout.resolve_checkpoint(tmp_path)


def test_xtuners_iter_n_pth_names_the_iter_n_directory(tmp_path):
    """XTuner saves WORK_DIR/iter_500.pth; a user who passes that out of habit is pointed at tunelab's iter_500/."""
    _checkpoint(tmp_path, 32)
    with pytest.raises(TunelabError) as info:
        layout.resolve_checkpoint(tmp_path / "iter_32.pth")
    assert f"Did you mean {tmp_path / 'iter_32'}?" in str(info.value)
    with pytest.raises(TunelabError) as info:  # no such directory either: the plain message, nothing guessed
        layout.resolve_checkpoint(tmp_path / "iter_7.pth")
    assert "Did you mean" not in str(info.value)
