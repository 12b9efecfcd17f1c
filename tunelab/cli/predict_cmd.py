"""`tunelab predict`: a model's replies to a test set, scored against the references (tunelab.chat.predict)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from tunelab.cli.data_cmds import _positive_int, _warn

DESCRIPTION = """\
Answer every prompt of a test set with a model and score the replies against the references, as LLaMA-Factory's
do_predict does: BLEU-4 and ROUGE-1/2/L (jieba words, nltk, rouge-chinese) and exact match. Run it on the base model
and on the trained one to see what training taught.

Each record is read as training reads it (any supported format, or a LLaMA-Factory dataset_info.json with
--dataset). A conversation's prompt is everything before its last assistant reply, which is the reference; one that
ends before its reply is predicted without a reference. A preference pair's reference is its chosen reply.
Image (LLaVA) samples are read as LLaVA training reads them and predicted by a LLaVA model with their pictures:
relative image paths start at --image-folder, else at the data file's folder.

OUT gets one JSON line per sample, in data order, as the replies come: index, source (file and line), the prompt
messages as sent (system prompt included), an image sample's images, reference, prediction. A reasoning model's
(qwen3_chat, deepseek_r1) prediction and reference are the answers after its <think> block, which is what is
scored; the reasoning is kept in the line. OUT.metrics.json gets the scores and the run's settings. Run the same
command again after an interruption to resume; another run's OUT is refused unless --overwrite. The template, system
prompt and context come from the model's tunelab.json, as in `tunelab chat`.

example:
  tunelab predict Qwen/Qwen2.5-0.5B-Instruct --data data/test.jsonl --out base.jsonl
  tunelab predict work_dirs/run1 --data data/test.jsonl --out tuned.jsonl
  tunelab predict Qwen/Qwen2.5-0.5B-Instruct --adapter hf_adapter --data data/test.jsonl -n 200 --out tuned.jsonl
  tunelab predict merged --data data/dataset_info.json --dataset identity --out identity.jsonl --batch-size 16
  tunelab predict llava_hf --data llava_test.json --image-folder data/llava_images --out llava.jsonl
"""


def register(subparsers) -> None:
    from tunelab.chat.engine import add_model_arguments

    p = subparsers.add_parser("predict", help="answer a test set and score it (BLEU-4, ROUGE)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--data", required=True, metavar="FILE_OR_DIR", help="test data: a file or a folder of them "
                   "(.json / .jsonl / .csv / .tsv / .parquet), or a LLaMA-Factory dataset_info.json with --dataset")
    p.add_argument("--dataset", metavar="NAMES", help="the datasets of a dataset_info.json to predict (e.g. "
                   "identity,alpaca_en_demo)")
    p.add_argument("--image-folder", metavar="DIR", help="where the image samples' relative image paths start (a "
                   "LLaVA config's image_folder; default: the data file's folder)")
    p.add_argument("-n", type=_positive_int, metavar="N", help="predict only the first N samples")
    p.add_argument("--out", required=True, metavar="FILE", help="the predictions, one JSON line per sample "
                   "(scores in FILE.metrics.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an OUT another run wrote (the same run "
                   "resumes without it)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=512, metavar="N",
                   help="longest reply (default 512; cut to the model's context)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                   help="replies generated together (default 8)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when --temperature is above 0")
    p.add_argument("--seed", type=int, default=None, help="a seed per reply when sampling")
    p.set_defaults(func=predict_cmd)


def predict_cmd(args) -> int:
    from tunelab.chat.metrics import ROUGE_MAX_WORDS, install_hint, summarise
    from tunelab.chat.predict import (data_content, done_lines, predict, read_lines, read_test_samples, say,
                                      write_metrics)
    from tunelab.errors import TunelabError
    from tunelab.export.adapters import model_to_load
    from tunelab.model.generate import GenerationSettings, check_settings

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=0,
                                  top_p=args.top_p, seed=args.seed)
    check_settings(settings, {"temperature": "--temperature", "top_p": "--top-p", "seed": "--seed",
                              "max_new_tokens": "--max-new-tokens"})
    out = _check_out(Path(args.out), Path(args.data))
    image_folder = _image_folder(args.image_folder)
    # a bad record (or a missing image) stops it here, at once
    samples = read_test_samples(args.data, args.n, args.dataset, warn=_warn, image_folder=image_folder)
    if not samples:
        raise TunelabError(f"--data {args.data}: no sample to predict.")
    _say_references(samples)
    to_load = model_to_load(args.model, args.adapter)  # what is loaded, recorded: a resume must load the same
    run = {"model": _local(to_load.base), "adapter": _local(to_load.adapter_dir), "data": _local(args.data),
           "dataset": args.dataset, "n": args.n, "data_content": data_content(samples),
           "image_folder": _local(image_folder),
           "max_new_tokens": args.max_new_tokens,
           "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
           "prompt_template": args.prompt_template, "system": args.system, "bits": args.bits, "dtype": args.dtype}
    start = done_lines(out, run, samples, args.overwrite)
    if start == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("", encoding="utf-8")
    elif start < len(samples):
        say(f"resuming: {out} holds the first {start} of {len(samples)} predictions")
    else:
        say(f"{out} holds all {len(samples)} predictions already: scoring them")
    write_metrics(out, run, None)
    speed = None
    if start < len(samples):
        from tunelab.chat.engine import load_from_args

        chat = load_from_args(args, max_batch_size=args.batch_size, to_load=to_load)  # checked above: once
        if chat.reasoning is not None:
            say(f"note: template {chat.template.name!r} writes reasoning ({chat.reasoning.open}..."
                f"{chat.reasoning.close}): each prediction and reference is the answer after it, which is what is "
                f"scored; a prediction's reasoning is kept in its line's 'reasoning'")
        try:
            speed = predict(chat, samples, out, settings, start=start)
        finally:
            chat.close()
    result = summarise(read_lines(out))
    if speed is not None:
        result["samples_per_second"] = round(speed, 3)
    metrics_file = write_metrics(out, run, result)
    for key, value in result.items():
        if key != "missing_libraries":
            print(f"{key:<20} {value}")
    say(f"predictions: {out}; scores: {metrics_file}")
    if result["failed"]:
        say(f"warning: {result['failed']} sample(s) not predicted (a prompt longer than the model's context, or one "
            f"the template refuses): their lines say why.")
    if result.get("rouge_skipped"):
        say(f"note: {result['rouge_skipped']} sample(s) longer than {ROUGE_MAX_WORDS} words have no ROUGE (the "
            f"scoring library's recursion would not finish them); the ROUGE means are over the others.")
    if result.get("missing_libraries"):
        say(f"note: BLEU-4 and ROUGE need {', '.join(result['missing_libraries'])}: {install_hint()}, then run the "
            f"same command again (the predictions are kept).")
    return 0


def _check_out(out: Path, data: Path) -> Path:
    """OUT is a file that is not the test data (nor inside a --data folder, whose files would be read next time)."""
    from tunelab.errors import TunelabError

    if out.is_dir():
        raise TunelabError(f"--out {out}: a folder; give a file name such as {out / 'preds.jsonl'}.")
    target, source = out.resolve(), data.resolve()
    if target == source or (data.is_dir() and source in target.parents):
        what = "the test data" if target == source else "inside the --data folder, whose files are read as test data"
        raise TunelabError(f"--out {out} is {what}: give a file elsewhere.")
    return out


def _image_folder(folder: str | None) -> Path | None:
    """--image-folder as an absolute folder (None when not given), or an error naming it."""
    from tunelab.errors import TunelabError

    if folder is None:
        return None
    path = Path(folder)
    if not path.is_dir():
        what = "a file, not a folder" if path.exists() else "no such folder"
        raise TunelabError(f"--image-folder {folder}: {what}. Give the folder the image samples' relative image paths "
                           f"start from (LLaVA's image_folder).")
    return path.resolve()


def _local(path) -> str | None:
    """A path as an absolute one where it is on this machine (a hub id as it is), for comparing runs."""
    if path is None:
        return None
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def _say_references(samples) -> None:
    from tunelab.chat.predict import say

    notes = Counter(s.note for s in samples if s.note)
    say(f"{len(samples)} sample(s) to predict")
    for note, count in notes.items():
        say(f"  {count} sample(s): {note}")
    missing = sum(count for note, count in notes.items() if note.startswith("no reference"))
    if missing:
        say(f"note: {missing} sample(s) have no reference: predicted and written, not scored")
