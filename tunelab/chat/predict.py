"""`tunelab predict MODEL --data FILE --out preds.jsonl`: the model's replies to a test set, beside the references,
scored as LLaMA-Factory's `do_predict` scores them (`tunelab.chat.metrics`), to tell whether training taught it.

Each record is read as training reads it (`tunelab.data.eval_data`). A conversation's prompt is everything before its
last assistant reply, and that reply is the reference; a conversation that ends before its reply (a user turn last,
an alpaca record without 'output') is predicted without a reference. A preference pair's prompt is predicted and its
chosen reply is the reference (what the training aimed at); a KTO sample's reply is the reference when it is labelled
desirable, and an undesirable one is left out as a reference (the prompt is still predicted). Pretraining text has no
prompt to answer: it is refused, naming its record.

An image (LLaVA) sample is read as multimodal training reads it (`tunelab.data.images.read_images`): its prompt keeps
an <image> placeholder where each picture goes, and its pictures are resolved to files (relative paths from
--image-folder, else from the data file's folder) and opened once before the model loads, so a missing or broken
one stops the command naming the record. A LLaVA model is sent each placeholder as an image_url part naming the
file (or its data URL), as `tunelab chat --image` sends it, and its line lists the pictures beside the prompt's text;
a model that reads no images refuses the test set before generating.

Generation goes through the engine's batcher (`tunelab.chat.batcher`, what `tunelab serve` runs), with the model's
template, system prompt and stop words, greedy by default. Where the template writes reasoning (Qwen3's, DeepSeek-R1's
<think>...</think>), a prediction is the answer after it (its reasoning in the line's `reasoning`) and the reference
the answer part of the text the template writes (Qwen3's empty block left out), so the scores are the answers'.
Lines are written in data order as soon as every reply before them is done, so an interrupted run keeps what it
finished, and the same command again resumes after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import queue
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunelab.errors import TunelabError

WHERE = re.compile(r"^(?P<file>.*) (?P<kind>line|record|row) (?P<n>\d+)$")
"""A record's place as the readers write it ('data.jsonl line 3'), split into its file and number."""


@dataclass
class TestSample:
    where: str
    prompt: list[dict]
    reply: dict | None
    """The reply the prediction is compared with (None: predicted without a reference)."""
    tools: list[dict] | None = None
    note: str = ""
    """Where the reference comes from when that is not a conversation's last reply, or why there is none."""
    images: list[str] = field(default_factory=list)
    """The pictures of an image (LLaVA) sample, resolved (a file path or a data URL): one per <image> in the
    prompt, in order."""


def metrics_path(out: Path) -> Path:
    return out.with_name(out.name + ".metrics.json")


# --- reading ----------------------------------------------------------------------------------------------------

def read_test_samples(path: str | Path, limit: int | None = None, dataset: str | None = None,
                      warn: Callable[[str], None] | None = None, image_folder: Path | None = None
                      ) -> list[TestSample]:
    """The test samples of the data at `path` (of the datasets `dataset` names in a dataset_info.json; the first
    `limit`), read before the model loads so that a bad record stops the command at once: a missing image too, and
    one that does not open. `image_folder`: where relative image paths start (None: the data file's folder)."""
    from functools import partial

    from tunelab.data.eval_data import read_samples
    from tunelab.data.images import ImageReading, unreadable_samples

    reading = ImageReading(image_folder, setting="--image-folder")
    samples = read_samples(path, partial(_test_sample, reading=reading), limit=limit, dataset=dataset, warn=warn,
                           verb="predict", multimodal=True)
    with_images = [{"where": s.where, "images": s.images} for s in samples if s.images]
    bad = unreadable_samples(with_images, fix="Replace the file, or leave the record out of the test set.")
    if bad:
        raise TunelabError(bad[min(bad)])
    return samples


def _test_sample(data, fmt: str, where: str, report: dict, reading=None) -> TestSample:
    """One record as its test sample (`eval_data.ToSample`); `reading`: how its images are read
    (`tunelab.data.images.ImageReading`: --image-folder; None: from the data file's folder)."""
    from tunelab.data.formats import FORMATS, MEDIA_FIELDS, UNUSED_HINTS, detect_format, normalise, unused_fields
    from tunelab.data.images import ImageReading, read_images
    from tunelab.data.messages import refuse_lone_surrogates
    from tunelab.data.preference import normalise_kto, normalise_preference, record_kind
    from tunelab.data.reports import count_unused

    kind = record_kind(data)
    media = [k for k in MEDIA_FIELDS if isinstance(data, dict) and data.get(k)]
    if media and kind:  # as training, which trains preference and KTO objectives on text only
        what = "a preference pair" if kind == "preference" else "a KTO sample"
        raise TunelabError(f"{where}: {what} with {' and '.join(map(repr, media))}; `tunelab predict` reads the "
                           f"images of conversations (LLaVA samples) only. Give the question and its reply as a "
                           f"conversation, or remove the images and their <image> placeholders.")
    if kind == "preference":
        pair = normalise_preference(data, where)
        sample = TestSample(where, pair["prompt"], pair["chosen"], pair.get("tools"), "reference: the chosen reply")
    elif kind == "kto":
        kto = normalise_kto(data, where)
        sample = TestSample(where, kto["prompt"], kto["completion"] if kto["label"] else None, kto.get("tools"),
                            "reference: the desirable reply" if kto["label"] else
                            "no reference: the reply is labelled undesirable")
    else:
        fmt = detect_format(data) if fmt == "auto" else fmt
        if fmt is None:
            keys = ", ".join(map(repr, data)) if isinstance(data, dict) else type(data).__name__
            raise TunelabError(f"{where}: cannot tell the data format from this record (fields: {keys}). Use one "
                               f"of {', '.join(FORMATS)} (docs/DATA.md shows each), with a conversation to answer.")
        parts: list = []  # pictures given as content parts: collected here (a text-only read would refuse them)
        read = None if media else normalise(data, fmt, where, images=parts, reply_needed=False)
        if read is None or parts:  # as multimodal training reads it: <image> where each picture goes, resolved
            read = read_images(data, fmt, where, reading or ImageReading(), _data_folder(report), reply_needed=False)
        if "text" in read:
            raise TunelabError(f"{where}: pretraining text (format {fmt!r}) has no prompt to answer. `tunelab "
                               f"predict` needs conversations: a question and, to be scored, its reply.")
        if report is not None:
            for name in unused_fields(data, fmt):  # as training tells them
                count_unused(report, name, where, UNUSED_HINTS.get(name.split(".")[-1], f"the {fmt!r} format does "
                             f"not read it"))
        messages = read["messages"]
        last = messages[-1]["role"] == "assistant"
        sample = TestSample(where, messages[:-1] if last else messages, messages[-1] if last else None,
                            read.get("tools"), "" if last else "no reference: the conversation ends before its reply",
                            read.get("images", []))
        if last and not (messages[-1].get("content") or "").strip() and not messages[-1].get("tool_calls") \
                and not messages[-1].get("reasoning_content"):
            sample.reply, sample.note = None, "no reference: the reply is empty"
    refuse_lone_surrogates({"messages": sample.prompt + ([sample.reply] if sample.reply else [])}, where)
    sample.prompt = [{k: v for k, v in m.items() if k != "train"} for m in sample.prompt]
    return sample


def _data_folder(report: dict | None) -> Path | None:
    """Where a record's relative image paths start without --image-folder: its data file's folder, as in training
    (None for a `datasets` dataset, whose images are most often their own bytes)."""
    path = Path(report["path"]) if report else None
    return path.parent if path is not None and path.is_file() else None


def reference_text(template, sample: TestSample) -> tuple[str | None, str]:
    """(the text the prediction is compared with, why there is none): the reply as the template writes it after the
    prompt, up to its stop words, which is what the model was trained to generate and what it writes (Qwen3's empty
    '<think>' block before a plain reply included); its content where the template writes the prompt otherwise
    once the reply is added. (None, '') where the sample has no reply (its note says why); (None, why) where the
    template writes none of it (tool calls it does not write) or refuses it."""
    from tunelab.model.generate import cut_at_stop_words

    reply = sample.reply
    if reply is None:
        return None, ""
    try:
        prompt = template.render(sample.prompt, tools=sample.tools, add_generation_prompt=True)
        whole = template.render(sample.prompt + [reply], tools=sample.tools)
    except TunelabError as exc:
        return None, f"no reference: {exc}"
    text = whole[len(prompt):] if whole.startswith(prompt) else reply.get("content") or ""
    text = cut_at_stop_words(text, template.stop_words).strip()
    if not text:
        held = "tool calls" if reply.get("tool_calls") else "reasoning"  # an empty reply has no note of its own
        return None, f"no reference: template {template.name!r} writes nothing of the reply (its {held})"
    return text, ""


# --- the output file --------------------------------------------------------------------------------------------

def source_fields(where: str) -> dict:
    """{"source": where, "file", "line" | "record" | "row"}: where a sample came from, also as its parts."""
    found = WHERE.match(where)
    return {"source": where, **({"file": found["file"], found["kind"]: int(found["n"])} if found else {})}


def data_content(samples: list[TestSample]) -> str:
    """A digest of the samples as read (places, prompts, replies, tools, images with each picture file's size and
    modification time): a resume after the data was edited (a reference corrected, another picture named or a
    picture replaced under its name) is another run, whose lines would hold the old prompts and references."""
    read = [[s.where, s.prompt, s.reply, s.tools] + ([[_picture_stamp(ref) for ref in s.images]] if s.images else [])
            for s in samples]
    return "sha256:" + hashlib.sha256(json.dumps(read, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def _picture_stamp(ref: str) -> list:
    """A picture as the digest sees it: a file's path, size and modification time (a data URL holds its bytes)."""
    from tunelab.data.images import DATA_URL

    if ref.startswith(DATA_URL):
        return [ref]
    stat = Path(ref).stat()
    return [ref, stat.st_size, stat.st_mtime_ns]


def done_lines(out: Path, settings: dict, samples: list[TestSample], overwrite: bool) -> int:
    """How many predictions of this run `out` holds already (0: start it anew). An `out` written by another run
    (other model, data or settings), or not by `tunelab predict`, is refused unless `overwrite`. (`out` is a file:
    the CLI's `_check_out` refuses a folder.)"""
    if overwrite or not out.exists():
        return 0
    fix = "pass --overwrite to replace it, or another --out"
    meta_file = metrics_path(out)
    try:
        recorded = json.loads(meta_file.read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError):
        recorded = None
    if recorded is None:
        raise TunelabError(f"--out {out} exists and {meta_file.name} beside it does not say which run wrote it: "
                           f"{fix}.")
    changed = [k for k in sorted(set(settings) | set(recorded)) if settings.get(k) != recorded.get(k)]
    if changed:
        says = "; ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} now" for k in changed)
        raise TunelabError(f"--out {out} holds the predictions of another run ({says}): {fix}.")
    lines = out.read_text(encoding="utf-8").split("\n")
    kept: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n >= len(lines) - 1:  # the last line, cut short when the run stopped: written again
                break
            raise TunelabError(f"{out} line {n}: not JSON, so the run cannot resume after it: {fix}.") from None
        count = len(kept)
        if count >= len(samples) or row.get("index") != count or row.get("source") != samples[count].where:
            raise TunelabError(f"{out} line {n} is not the prediction of sample {count} of this data "
                               f"({samples[count].where if count < len(samples) else 'none left'}): {fix}.")
        kept.append(line)
    if len(kept) != sum(1 for line in lines if line.strip()):
        out.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return len(kept)


# --- generating -------------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """A bar with samples/s on a terminal, else a line at every tenth of the run (a log file stays short).
    `label`, `unit` and `said` name the work (`tunelab eval`: questions evaluated)."""
    total: int
    start: int = 0
    label: str = "predict"
    unit: str = "samples"
    said: str = "predicted"

    def __post_init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.began, self.done, self.bar = time.monotonic(), self.start, None
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self.bar = Bar(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[rate]}"), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, completed=self.start, rate="")

    def rate(self) -> float:
        return (self.done - self.start) / max(time.monotonic() - self.began, 1e-9)

    def advance(self, count: int = 1) -> None:
        self.done += count
        step = max(1, self.total // 10)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{self.rate():.2f} {self.unit}/s")
        elif self.done == self.total or self.done // step > (self.done - count) // step:
            self.console.print(f"{self.said} {self.done}/{self.total} ({self.rate():.2f} {self.unit}/s)",
                               markup=False, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def predict(chat, samples: list[TestSample], out: Path, settings, *, start: int = 0) -> float:
    """Predict samples[start:] with `chat` (a `tunelab.chat.engine.ChatModel`), appending one JSON line per sample
    to `out` in data order as soon as it and every sample before it are done. Returns samples/s."""
    from tunelab.chat.reasoning import answer_part, split_reasoning
    from tunelab.data.images import describe  # a picture given as its bytes is named shortly, not copied in

    _refuse_images_without_vision(chat, samples[start:])
    _say_tools_left_out(chat.template, samples[start:])
    replies: queue.Queue = queue.Queue()
    jobs, ready = [], {}
    for i in range(start, len(samples)):
        sample = samples[i]
        messages = chat.with_system(sample.prompt)
        reference, why = reference_text(chat.template, sample)
        thought, reference = answer_part(reference, chat.reasoning) if reference else (None, reference)
        if reference == "":  # an empty text scored against would count as a miss whatever the model answers
            reference, why = None, "no reference: the reply is reasoning alone, with no answer to score"
        note = why or sample.note
        line = {"index": i, **source_fields(sample.where), "messages": messages,
                **({"images": [describe(ref) for ref in sample.images]} if sample.images else {}),
                **({"tools": sample.tools} if sample.tools else {}),
                "reference": reference, **({"reference_reasoning": thought} if thought else {}),
                **({"note": note} if note else {})}
        try:
            ids, pixels = chat.prompt(image_parts(sample.prompt, sample.images), files=True, tools=sample.tools)
            limit = chat.fit_reply(len(ids), settings.max_new_tokens, asked=False)
        except TunelabError as exc:  # too long for the context, or refused: said in its line, counted as failed
            ready[i] = {**line, "prediction": None, "error": str(exc)}
            continue
        job = chat.job(ids, dataclasses.replace(settings, max_new_tokens=limit), pixel_values=pixels,
                       on_done=lambda reply, i=i, line=line: replies.put((i, line, reply)))
        jobs.append(job)
    bar = Progress(len(samples), start)
    next_i, speed = start, 0.0
    try:
        for job in jobs:
            chat.batcher.submit(job)
        with open(out, "a", encoding="utf-8") as f:
            while next_i < len(samples):
                if next_i not in ready:
                    i, line, reply = replies.get()
                    if isinstance(reply, Exception):
                        raise reply
                    thought, text = split_reasoning(reply.text, chat.reasoning)
                    ready[i] = {**line, "prediction": text.strip(), **({"reasoning": thought} if thought else {}),
                                "finish_reason": reply.finish_reason}
                    continue
                row = ready.pop(next_i)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                next_i += 1
                bar.advance()
        speed = bar.rate()
    finally:
        bar.close()
        for job in jobs:  # Ctrl-C: the worker drops what is left at its next step
            job.cancel()
    return speed


def image_parts(messages: list[dict], images: list[str]) -> list[dict]:
    """The prompt with each <image> placeholder made the next picture's image_url part, at its place, as `tunelab
    chat --image` sends a picture (`ChatModel.prompt` reads the parts back, joining them with "", so the text sent
    is the text read). A sample without images is sent as it is: a literal <image> in its text stays text."""
    from tunelab.data.messages import IMAGE_PLACEHOLDER

    if not images:
        return messages
    pictures = iter(images)
    out = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str) or IMAGE_PLACEHOLDER not in content:
            out.append(m)
            continue
        parts: list[dict] = []
        for k, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
            if k:
                parts.append({"type": "image_url", "image_url": {"url": next(pictures)}})
            if text:
                parts.append({"type": "text", "text": text})
        out.append({**m, "content": parts})
    return out


def _refuse_images_without_vision(chat, samples: list[TestSample]) -> None:
    """One error before anything is generated, rather than a failed line per image sample, when the model reads no
    images (a text model: `ChatModel.vision` is None)."""
    first = next((s for s in samples if s.images), None)
    if first is not None and chat.vision is None:
        count = sum(1 for s in samples if s.images)
        raise TunelabError(f"{first.where}: an image sample ({count} in the test set), but {chat.name} reads text "
                           f"only. Predict image samples with a LLaVA model (a HF LLaVA folder or a LLaVA run's "
                           f"checkpoint, docs/MULTIMODAL.md), or leave them out of the test set.")


def _say_tools_left_out(template, samples: list[TestSample]) -> None:
    """A warning naming the samples whose tool definitions the template has no place for: their prompts go without
    them, as the template renders them (training reports them as not used)."""
    from tunelab.data.templates import templates_writing_tool_calls, tool_support

    with_tools = [s.where for s in samples if s.tools]
    if with_tools and not tool_support(template).definitions:
        say(f"warning: {len(with_tools)} sample(s) carry tool definitions (first at {with_tools[0]}), which template "
            f"{template.name!r} has no place for: predicted without them. Use a template that writes them "
            f"({', '.join(templates_writing_tool_calls())}) to predict with the tools.")


def write_metrics(out: Path, settings: dict, result: dict | None) -> Path:
    """OUT.metrics.json: the run's settings (what a resume is checked against) and, once done, its scores."""
    path = metrics_path(out)
    path.write_text(json.dumps({**(result or {}), "finished": result is not None, "settings": settings},
                               ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def read_lines(out: Path) -> list[dict]:
    # split at "\n" alone: a prediction may hold U+2028 or U+0085, which str.splitlines() also breaks at
    return [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line.strip()]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
