"""`NPROC_PER_NODE=2 tunelab train` with `sequence_parallel_size = 2` end to end on CPU (gloo): both ranks train
every packed row, each on its half; the loss curve is one process's on the same rows, tokens are counted once, and a
run resumed after a stop continues the same curve."""

from __future__ import annotations

from tests.train_helpers import copy_stopped_after, logged_steps, train_on_ranks

CONFIG = """\
pretrained_model_name_or_path = {model!r}
method = "lora"
data_path = {data!r}
data_format = "conversation"
prompt_template = "qwen_chat"
max_length = 96
batch_size = 2
accumulative_counts = 2
lr = 1e-2
lr_scheduler = "constant"
warmup_ratio = 0.0
lora_r = 8
lora_alpha = 16
lora_dropout = 0.0
max_steps = 6
save_steps = 3
save_total_limit = -1
logging_steps = 1
evaluation_freq = 6
evaluation_inputs = ["Who are you?"]
eval_max_new_tokens = 12
eval_split_ratio = 0.1
seed = 1
"""


def test_two_ranks_sharing_rows_train_one_process_curve_and_resume_it(tmp_path):
    """With LoRA+ (its groups' lr in the updates, and resumed) and RoPE scaled past a base of 48 positions: the rows'
    shards computed with the whole rows' positions, scaled."""
    from tunelab.data import self_cognition
    from tunelab.model.tiny import make_model
    from tunelab.train.layout import read_meta

    data = self_cognition.write(tmp_path / "data.json", name="Duo", author="tests", n=48)
    base = make_model(tmp_path / "base", "llama", max_position_embeddings=48)  # max_length 96: scaled by 2
    single, split = tmp_path / "single.py", tmp_path / "split.py"
    single.write_text(CONFIG.format(model=str(base), data=str(data))
                      + 'loraplus_lr_ratio = 4.0\nrope_scaling = "linear"\n')
    split.write_text(single.read_text() + "sequence_parallel_size = 2\n")

    from tunelab.config.loader import load_config
    from tunelab.train.loop import train

    train(load_config(single), tmp_path / "one", config_path=single, device="cpu")  # one process, in this one
    proc = train_on_ranks(split, tmp_path / "run", 2)
    assert "each row over 2 ranks (sequence parallel)" in proc.stdout
    one, run = logged_steps(tmp_path / "one"), logged_steps(tmp_path / "run")
    assert sorted(run) == [1, 2, 3, 4, 5, 6]
    for step in run:  # the loss is divided by the step's trained tokens: counted twice, it would be half
        assert abs(run[step]["loss"] - one[step]["loss"]) < 1e-5, (step, run[step]["loss"], one[step]["loss"])
        assert abs(run[step]["grad_norm"] - one[step]["grad_norm"]) < 1e-5
        assert run[step]["epoch"] == one[step]["epoch"]  # both ranks read every row: the rows of one process
        assert run[step]["tokens"] == one[step]["tokens"] > 0  # and tokens/s counts each of their tokens once
    assert run[6]["loss"] < run[1]["loss"]  # it learns
    assert read_meta(tmp_path / "run" / "iter_6")["rope_scaling"] == read_meta(tmp_path / "one" / "iter_6")[
        "rope_scaling"] == {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0},
                            "max_position_embeddings": 96}
    # the held-out loss runs on shards too; the answers (rank 0 alone, generating) are one process's
    evals = logged_steps(tmp_path / "one", "eval_loss"), logged_steps(tmp_path / "run", "eval_loss")
    assert sorted(evals[1]) == [0, 6]
    for step in (0, 6):
        assert abs(evals[1][step]["eval_loss"] - evals[0][step]["eval_loss"]) < 1e-5
    answers = [(d / "eval_outputs_iter_6.txt").read_text() for d in (tmp_path / "one", tmp_path / "run")]
    assert answers[0] == answers[1]

    # as if the run stopped after iter_3: resume on 2 ranks and compare every later loss
    resumed_dir = copy_stopped_after(tmp_path / "run", tmp_path / "resumed", step=3, later=6)
    train_on_ranks(split, resumed_dir, 2, "--resume", "auto")
    resumed = logged_steps(resumed_dir)
    for step in (4, 5, 6):
        assert abs(resumed[step]["loss"] - run[step]["loss"]) < 1e-6, (step, resumed[step]["loss"], run[step]["loss"])
