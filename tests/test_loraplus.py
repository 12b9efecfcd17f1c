"""loraplus_lr_ratio: LoRA+ as peft's `create_loraplus_optimizer` builds it (the reference), through the loop as
`tunelab train` runs it, held on resume like the other schedule settings, and refused where nothing is LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_helpers import assert_one_line_error, tiny_cfg, write_config
from tunelab.cli.main import main
from tunelab.model.load import load_model_for_training
from tunelab.train.optim import build_optimizer


def _one_step(model, optimizer) -> dict:
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # B starts at zero, which would leave A's gradient zero: start both random
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("settings", [{}, {"lora_bias": "all"}, {"use_dora": True}], ids=["lora", "bias", "dora"])
def test_the_update_equals_peft_loraplus_optimizer(tiny_qwen2_dir, settings):
    from peft.optimizers import create_loraplus_optimizer

    cfg = tiny_cfg(tiny_qwen2_dir, method="lora", dtype="fp32", fast_path=False, gradient_checkpointing=False,
                   loraplus_lr_ratio=16.0, lr=1e-3, weight_decay=0.0, **settings)
    ours, _ = load_model_for_training(cfg, torch.device("cpu"))
    theirs, _ = load_model_for_training(cfg, torch.device("cpu"))
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                          betas=tuple(cfg.betas))
    after, expected = _one_step(ours, build_optimizer(ours, cfg, torch.device("cpu"))), _one_step(theirs, reference)
    assert after.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(after[name], expected[name], rtol=0, atol=1e-7, msg=name)


def test_b_learns_at_the_ratio_and_the_log_shows_the_base_lr(tiny_qwen2_dir):
    cfg = tiny_cfg(tiny_qwen2_dir, method="lora", loraplus_lr_ratio=16.0, lr=1e-3)
    model, _ = load_model_for_training(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert lr_of[id(param)] == pytest.approx(1.6e-2 if "lora_B" in name else 1e-3), name
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_a_run_with_loraplus_trains_and_resumes_with_the_checkpoints_ratio(tmp_path, tiny_llama_dir, capsys):
    config = write_config(tmp_path, tiny_llama_dir, max_steps=2, dtype="fp32", gradient_checkpointing=False,
                          loraplus_lr_ratio=16.0, lr=1e-3)
    work = tmp_path / "w"
    assert main(["train", str(config), "--work-dir", str(work), "--device", "cpu"]) == 0
    losses = [json.loads(line)["loss"] for line in (work / "train_log.jsonl").read_text().splitlines()
              if '"step"' in line and '"loss"' in line]
    assert len(losses) == 2 and losses[1] < losses[0]
    longer = config.with_name("longer.py")
    longer.write_text(config.read_text().replace("max_steps = 2", "max_steps = 3")
                      .replace("loraplus_lr_ratio = 16.0", "loraplus_lr_ratio = 4.0"))
    capsys.readouterr()
    assert main(["train", str(longer), "--work-dir", str(work), "--device", "cpu", "--resume", "auto"]) == 0
    assert "loraplus_lr_ratio was 16.0 in the checkpoint, is 4.0 now" in capsys.readouterr().out


def test_loraplus_with_full_fine_tuning_is_refused(tmp_path, tiny_llama_dir, capsys):
    config = write_config(tmp_path, tiny_llama_dir, method="full", loraplus_lr_ratio=16.0)
    code = main(["train", str(config), "--work-dir", str(tmp_path / "w"), "--device", "cpu"])
    assert_one_line_error(capsys, code, "loraplus_lr_ratio", "method = 'full'")


def test_a_checkpoint_saved_before_loraplus_existed_resumes_without_it(tmp_path, tiny_llama_dir, capsys):
    """A run record without loraplus_lr_ratio (a tunelab before LoRA+) trained without it: a resume with a ratio
    keeps the checkpoint's optimiser groups (one ratio, with a warning), as for any ratio changed on resume; it
    crashed in torch's load_state_dict ("a different number of parameter groups")."""
    config = write_config(tmp_path, tiny_llama_dir, max_steps=1, dtype="fp32", gradient_checkpointing=False)
    work = tmp_path / "w"
    assert main(["train", str(config), "--work-dir", str(work), "--device", "cpu"]) == 0
    meta_file = work / "iter_1" / "tunelab.json"
    meta = json.loads(meta_file.read_text())
    del meta["run"]["settings"]["loraplus_lr_ratio"], meta["run"]["settings"]["rope_scaling"]
    meta_file.write_text(json.dumps(meta))  # as the tunelab before loraplus_lr_ratio and rope_scaling wrote it
    capsys.readouterr()
    assert main(["train", str(config), "--work-dir", str(work), "--device", "cpu", "--resume", "auto",
                 "--cfg-options", "max_steps=2", "loraplus_lr_ratio=16.0"]) == 0
    assert "loraplus_lr_ratio was None in the checkpoint, is 16.0 now" in capsys.readouterr().out
    code = main(["train", str(config), "--work-dir", str(work), "--device", "cpu", "--resume", str(work / "iter_1"),
                 "--overwrite", "--cfg-options", "max_steps=2", "rope_scaling='linear'"])
    assert_one_line_error(capsys, code, "rope_scaling was None in the checkpoint, is 'linear' now")


def test_an_optimiser_state_of_other_groups_is_a_message_naming_the_checkpoint(tiny_qwen2_dir, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.train.strategy import load_optimizer_state

    plain = tiny_cfg(tiny_qwen2_dir, method="lora")
    model, _ = load_model_for_training(plain, torch.device("cpu"))
    saved = build_optimizer(model, plain, torch.device("cpu")).state_dict()
    optimizer = build_optimizer(model, tiny_cfg(tiny_qwen2_dir, method="lora", loraplus_lr_ratio=16.0),
                                torch.device("cpu"))
    with pytest.raises(TunelabError, match=r"iter_3: its optimiser state does not fit .*loraplus_lr_ratio"):
        load_optimizer_state(optimizer, saved, tmp_path / "iter_3")


def test_an_embedding_adapter_learns_as_any_pair_and_saved_modules_at_lr(tiny_qwen2_dir):
    """Where tunelab departs from peft on purpose: LoRA on embed_tokens is a pair like any other (peft's optimiser
    trains both matrices at loraplus_lr_embedding = 1e-6, all but frozen); a module trained whole (modules_to_save)
    learns at lr, as in peft."""
    cfg = tiny_cfg(tiny_qwen2_dir, method="lora", loraplus_lr_ratio=16.0, lr=1e-3,
                   lora_target_modules=["q_proj", "embed_tokens"], lora_modules_to_save=["lm_head"])
    model, _ = load_model_for_training(cfg, torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in build_optimizer(model, cfg, torch.device("cpu")).param_groups for p in g["params"]}
    lrs = {name.split("model.")[-1]: lr_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}
    assert lrs["embed_tokens.lora_embedding_A.default"] == pytest.approx(1e-3)
    assert lrs["embed_tokens.lora_embedding_B.default"] == pytest.approx(1.6e-2)
    assert lrs["lm_head.modules_to_save.default.weight"] == pytest.approx(1e-3)


def test_an_fsdp2_optimiser_state_of_other_groups_is_the_same_message(tiny_qwen2_dir, tmp_path):
    """FSDP2 keeps its optimiser state in a torch.distributed.checkpoint folder, loaded by its own code: a state of
    another grouping (saved without loraplus_lr_ratio, loaded with it) is the message above, not DCP's RuntimeError
    ("Missing key in checkpoint state_dict: optimizer.param_groups.1...") as a traceback from every rank. One process
    of one rank (gloo) runs FSDP2's code as each of several does."""
    import torch.distributed as torch_dist

    from tunelab.errors import TunelabError
    from tunelab.train.distributed import DistEnv
    from tunelab.train.strategy import FSDP2

    def strategy(cfg) -> FSDP2:
        model, _ = load_model_for_training(cfg, torch.device("cpu"))
        fsdp = FSDP2(DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
        fsdp.setup(model, build_optimizer(model, cfg, torch.device("cpu")), lambda model, batch: None)
        return fsdp

    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        plain = tiny_cfg(tiny_qwen2_dir, method="lora")
        strategy(plain).save_optimizer(tmp_path / "iter_3" / "optimizer", {})
        strategy(plain).load_optimizer(tmp_path / "iter_3" / "optimizer", {})  # the same groups load
        with pytest.raises(TunelabError, match=r"iter_3: its optimiser state does not fit .*loraplus_lr_ratio"):
            strategy(tiny_cfg(tiny_qwen2_dir, method="lora", loraplus_lr_ratio=16.0)).load_optimizer(
                tmp_path / "iter_3" / "optimizer", {})
        with pytest.raises(TunelabError, match=r"iter_3: its optimiser state does not fit .*lora_bias"):
            strategy(tiny_cfg(tiny_qwen2_dir, method="lora", lora_bias="all")).load_optimizer(
                tmp_path / "iter_3" / "optimizer", {})
        with pytest.raises(TunelabError, match=r"iter_3: its optimiser state does not fit .*no state saved for "
                                               r".*embed_tokens\.lora_embedding_A.*and \d+ more"):
            strategy(tiny_cfg(tiny_qwen2_dir, method="lora", lora_target_modules=["q_proj", "embed_tokens"])
                     ).load_optimizer(tmp_path / "iter_3" / "optimizer", {})
    finally:
        torch_dist.destroy_process_group()


def test_a_deepspeed_optimiser_state_of_other_groups_is_the_same_message(tiny_qwen2_dir, tmp_path, monkeypatch):
    """DeepSpeed loads its ZeRO checkpoint (iter_N/optimizer/deepspeed) itself: a state of another grouping is the
    message above, checked against the groups its model-states file records (`param_shapes`) before DeepSpeed loads
    anything, not ZeRO-1/2's RuntimeError ("parameter-alignment layout") or ZeRO-3's ValueError as a traceback from
    every rank. One process of one rank (gloo), ZeRO-2 (ZeRO-1 and -3 record their groups the same way)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'tunelab[deepspeed]'")
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as torch_dist

    from tunelab.errors import TunelabError
    from tunelab.train.deepspeed_engine import DeepSpeed
    from tunelab.train.distributed import DistEnv

    for name, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):  # as torchrun sets them
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ds_comm, "cdb", None)  # DeepSpeed's handle on this test's process group goes with it

    def strategy(**settings) -> DeepSpeed:
        cfg = tiny_cfg(tiny_qwen2_dir, method="lora", deepspeed="zero2", dtype="fp32", **settings)
        model, _ = load_model_for_training(cfg, torch.device("cpu"))
        engine = DeepSpeed(DistEnv(), cfg)
        engine.setup(model, build_optimizer(model, cfg, torch.device("cpu")), lambda model, batch: None)
        return engine

    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        optimizer = tmp_path / "iter_3" / "optimizer"
        strategy().save_optimizer(optimizer, {})
        strategy().load_optimizer(optimizer, {})  # the same groups load
        with pytest.raises(TunelabError, match=r"iter_3: its optimiser state does not fit .*1 parameter groups "
                                               r"saved, 2 now.*loraplus_lr_ratio"):
            strategy(loraplus_lr_ratio=16.0).load_optimizer(optimizer, {})
        with pytest.raises(TunelabError, match=r"iter_3: its optimiser state does not fit .*parameter group 0 holds "
                                               r"other parameters: .*embed_tokens\.lora_embedding_A.* trained in it "
                                               r"now, not saved"):
            strategy(lora_target_modules=["q_proj", "embed_tokens"]).load_optimizer(optimizer, {})
    finally:  # DeepSpeed's teardown lets go of the groups it cached too (a later run in this process makes its own)
        getattr(ds_comm, "destroy_process_group", torch_dist.destroy_process_group)()


class _MakesDirectory:
    """An object whose unpickling would make a directory: reading a file that holds one must not."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.path),)


def test_a_model_states_file_the_weights_only_unpickler_refuses_gives_its_groups_running_nothing(tmp_path):
    """A DeepSpeed model-states file holding an object torch's weights-only unpickler refuses (a client state, or
    another DeepSpeed's) still gives its parameter groups, read from the pickle with stand-ins, running no code."""
    from collections import OrderedDict

    from tunelab.train.deepspeed_engine import saved_param_groups

    groups = [OrderedDict(a=torch.Size([2, 3]), b=torch.Size([3, 2])), OrderedDict(c=torch.Size([3]))]
    torch.save({"module": {"a": torch.ones(2, 3)}, "param_shapes": groups, "client": _MakesDirectory(tmp_path / "ran")},
               tmp_path / "mp_rank_00_model_states.pt")
    assert saved_param_groups(tmp_path) == groups
    assert not (tmp_path / "ran").exists()
    # a record whose names or shapes are something else (stand-ins) is no record to compare: DeepSpeed's load says
    torch.save({"param_shapes": [OrderedDict(a=_MakesDirectory(tmp_path / "ran"))]},
               tmp_path / "mp_rank_00_model_states.pt")
    assert saved_param_groups(tmp_path) is None
    torch.save({"param_shapes": [OrderedDict([(_MakesDirectory(tmp_path / "ran"), torch.Size([2]))])]},
               tmp_path / "mp_rank_00_model_states.pt")
    assert saved_param_groups(tmp_path) is None
    assert not (tmp_path / "ran").exists()
