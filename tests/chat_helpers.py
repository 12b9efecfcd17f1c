"""Helpers shared by the export / chat / serve / web tests: a tiny model taught one answer, and checkpoint layouts.

The taught model is a tiny full model trained for a few seconds with a plain torch loop on one question/answer
pair, so greedy decoding gives a reply the tests know in advance (a random tiny model only babbles).
"""

from __future__ import annotations

from pathlib import Path

QUESTION = "Who are you?"
ANSWER = "I am TuneBot, your helper."
TEMPLATE = "qwen_chat"


def make_taught_model(out_dir: Path, *, steps: int = 60) -> Path:
    """A tiny llama that answers QUESTION with ANSWER (greedy), saved with a tunelab.json naming TEMPLATE."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.templates import get_template
    from tunelab.train.layout import write_meta
    from tunelab.model.tiny import make_model

    out_dir = Path(out_dir)
    make_model(out_dir, "llama", hidden_size=64, num_layers=2, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    template = get_template(TEMPLATE)
    ids, labels = [], []
    for text, trained in template.segments([{"role": "user", "content": QUESTION},
                                            {"role": "assistant", "content": ANSWER}]):
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    input_ids = torch.tensor([ids])
    label_ids = torch.tensor([labels])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=label_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out_dir)
    write_meta(out_dir, {"base_model": str(out_dir), "method": "full", "prompt_template": TEMPLATE,
                         "system": "", "max_length": 128, "tunelab_version": "test"})
    return out_dir


def taught_model_dir(tmp_path_factory) -> Path:
    """The taught model, trained once per test session and shared by the test files that need it."""
    path = tmp_path_factory.getbasetemp() / "taught_model"
    if not (path / "tunelab.json").is_file():
        make_taught_model(path)
    return path


def make_lora_checkpoint(base_dir: Path, work_dir: Path, *, step: int = 10, template: str = TEMPLATE,
                         method: str = "lora", seed: int = 0) -> Path:
    """WORK_DIR/iter_N/{model/, tunelab.json, training_state.pt} as training writes it, with a non-zero adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.train.layout import write_meta

    ckpt = Path(work_dir) / f"iter_{step}"
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # lora_B starts at zero: make the adapter actually change the logits
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(ckpt / "model")
    torch.save({"step": step}, ckpt / "training_state.pt")
    write_meta(ckpt, {"base_model": str(base_dir), "method": method, "prompt_template": template,
                      "system": "Be brief.", "max_length": 128, "tunelab_version": "test"})
    (Path(work_dir) / "last_checkpoint").write_text(str(ckpt))
    return ckpt


def make_llava_dir(out: Path, llm_dir: Path, vision_dir: Path, *, template: str = TEMPLATE) -> Path:
    """A random tiny LLaVA (the tiny language model and vision tower given) exported as a HF LLaVA folder with its
    tunelab.json, as `tunelab convert pth_to_hf` writes it."""
    import torch

    from tunelab.data.templates import get_template
    from tunelab.model import llava
    from tunelab.model.load import load_causal_lm
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.train.layout import write_meta

    tokenizer = load_tokenizer(str(llm_dir))
    image_id = llava.add_image_token(tokenizer)
    llm = load_causal_lm(str(llm_dir), dtype=torch.float32, device="cpu")
    llava.resize_for_image_token(llm, image_id)
    torch.manual_seed(0)
    model = llava.assemble(llm, llava.load_vision_tower(vision_dir, dtype=torch.float32, device="cpu"),
                           image_token_id=image_id)
    llava.save_hf_llava(model, tokenizer, llava.load_image_processor(vision_dir), out,
                        chat_template=get_template(template, tokenizer).to_jinja())
    write_meta(out, {"base_model": str(llm_dir), "method": "lora", "prompt_template": template, "system": "",
                     "max_length": 256})
    return out


class Scripted:
    """A batcher whose every reply is `pieces` joined, streamed one piece at a time, keeping the prompts (and jobs) it
    was given: the text a trained model would write, for tests of what the server, chat and predict make of it."""

    max_batch_size = 1

    def __init__(self, pieces, finish: str = "stop"):
        self.pieces, self.finish, self.prompts, self.jobs = list(pieces), finish, [], []

    def submit(self, job):
        from tunelab.chat.jobs import Reply

        self.prompts.append(job.prompt_ids)
        self.jobs.append(job)
        for piece in self.pieces:
            if job.on_text:
                job.on_text(piece)
        job.on_done(Reply(text="".join(self.pieces), finish_reason=self.finish, prompt_tokens=len(job.prompt_ids),
                          completion_tokens=len(self.pieces)))

    def stop(self, timeout=None):
        pass


def served_scripted(tokenizer, template, pieces, finish: str = "stop"):
    """(chat, server): a ChatModel with `template` (a name or a ChatTemplate) whose every reply is `pieces` (`Scripted`:
    the prompts it was given are chat.batcher.prompts), and a BackgroundServer of it."""
    from tunelab.chat.engine import ChatModel
    from tunelab.chat.server import create_app
    from tunelab.chat.http_server import BackgroundServer
    from tunelab.data.templates import get_template
    from tunelab.model.generate import GenerationSettings

    chat = ChatModel(model=None, tokenizer=tokenizer, template=get_template(template) if isinstance(template, str)
                     else template, _batcher=Scripted(pieces, finish))
    return chat, BackgroundServer(create_app(chat, GenerationSettings(max_new_tokens=64)))


def post_json(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of POSTing `body` to `url`, an error status too (a refusal is a value to check)."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def openai_client(url: str):
    """The OpenAI client of a test server: no retries, so a refusal shows at once."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def logits(model, text_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([text_ids])).logits
