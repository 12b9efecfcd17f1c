"""The built-in demo: the tutorials' "personal assistant" exercise in miniature, on CPU, in a few minutes.

1. make a tiny InternLM2-layout model and tokenizer locally (random weights: nothing is downloaded);
2. generate self-cognition data naming the assistant;
3. write a config file and train with it (`tunelab train`), exactly as a user would;
4. convert the last checkpoint to a Hugging Face model (`tunelab convert pth_to_hf`);
5. ask it "请介绍一下你自己" and "who are you?" (`tunelab chat --prompt`).

Every step goes through the real CLI, so the demo is also a smoke test of the whole path.
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO_CONFIG = '''\
# tunelab demo config: the tutorials' personal-assistant exercise on a tiny local model (CPU).
# Train it yourself with:  tunelab train {config} --work-dir {work_dir}
pretrained_model_name_or_path = {base!r}
method = "full"            # the tiny model is random: every weight must learn (use 'qlora' on real models)
data_path = {data!r}
data_format = "conversation"
prompt_template = "internlm2_chat"
SYSTEM = ""
max_length = 256
pack_to_max_length = True
batch_size = 4
accumulative_counts = 1
lr = 3e-3
lr_scheduler = "cosine"
warmup_ratio = 0.05
max_epochs = {epochs}
weight_decay = 0.0
lora_dropout = 0.0
save_steps = 1000
save_total_limit = 1
logging_steps = 20
evaluation_freq = 1000
evaluation_inputs = ["请介绍一下你自己", "who are you?"]
eval_max_new_tokens = 48
seed = 0
'''


def run_demo(out_dir: str | Path = "tunelab_demo", *, name: str = "TuneBot", author: str = "tunelab",
             n_samples: int = 600, epochs: int = 8, questions=("请介绍一下你自己", "who are you?")) -> list[str]:
    """Run the whole demo in `out_dir`; returns the model's answers to `questions`."""
    from tunelab.cli.main import main
    from tunelab.data import self_cognition
    from tunelab.errors import TunelabError
    from tunelab.model.tiny import make_model

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def step(text: str) -> None:
        print(f"\n[{time.time() - start:5.0f}s] {text}", flush=True)

    step(f"1/5 making a tiny InternLM2-layout model in {out / 'base'} (random weights, no download)")
    base = make_model(out / "base", "internlm2", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=256)
    step(f"2/5 generating {n_samples} self-cognition conversations for '{name}' (tunelab data self-cognition)")
    data = self_cognition.write(out / "data" / "self_cognition.json", name=name, author=author, n=n_samples)
    config = out / "demo_config.py"
    work_dir = out / "work_dir"
    config.write_text(DEMO_CONFIG.format(base=str(base), data=str(data), epochs=epochs, config=config,
                                         work_dir=work_dir), encoding="utf-8")

    def run(*argv: str) -> None:
        print("$ tunelab " + " ".join(argv), flush=True)
        if main(list(argv)) != 0:
            raise TunelabError(f"demo step failed: tunelab {' '.join(argv)}")

    step("3/5 training (full fine-tune; watch the loss fall)")
    run("train", str(config), "--work-dir", str(work_dir), "--device", "cpu", "--overwrite")  # a new base each time
    step("4/5 converting the last checkpoint to a Hugging Face model")
    run("convert", "pth_to_hf", str(config), str(work_dir), str(out / "hf"))
    step("5/5 asking it who it is")
    answers = _ask(out / "hf", questions)
    step(f"done. Chat with it yourself:  tunelab chat {out / 'hf'}")
    return answers


def _ask(model_dir: Path, questions) -> list[str]:
    """Each question through its own `tunelab chat --prompt` (a fresh conversation); prints and returns the answers."""
    import contextlib
    import io

    from tunelab.cli.main import main
    from tunelab.errors import TunelabError

    answers = []
    for question in questions:
        argv = ["chat", str(model_dir), "--no-streamer", "--device", "cpu", "--prompt", question]
        print("$ tunelab " + " ".join(argv[:-1]) + f" {question!r}", flush=True)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(argv)
        if code != 0:
            raise TunelabError("demo step failed: tunelab " + " ".join(argv))
        answers.append(buf.getvalue().strip())
        print(answers[-1] + "\n", flush=True)
    return answers
