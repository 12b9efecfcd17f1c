"""The scores `tunelab predict` gives predictions against their references, computed as LLaMA-Factory's `do_predict`
computes them (src/llamafactory/train/sft/metric.py, `ComputeSimilarity`), so the numbers compare with its
`predict_results.json`:

* BLEU-4: nltk's `sentence_bleu` over the characters of the prediction and the reference (one reference), with
  `SmoothingFunction().method3`;
* ROUGE-1 / ROUGE-2 / ROUGE-L: the F1 of `rouge_chinese.Rouge` over both texts cut into words by jieba (Chinese into
  words, English at spaces and punctuation) and joined by spaces; 0 when either has no word;
* each a percentage (x 100, rounded to 4 places per sample), averaged over the samples (ROUGE over those of at most
  `ROUGE_MAX_WORDS` words; `rouge_skipped` counts the others);
* exact match (ours; LLaMA-Factory has none): the prediction equals the reference, spaces around them aside.

Where the template writes reasoning, `tunelab predict` writes the answers alone as prediction and reference (the
reasoning beside them), so these score the answers; `with_reasoning` counts the predictions that held reasoning.

The libraries are optional (`pip install 'tunelab[metrics]'`): without them the predictions and exact match are still
written, and `missing_libraries` names what to install for the rest.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

LIBRARIES = {"jieba": "jieba", "nltk": "nltk", "rouge_chinese": "rouge-chinese"}
"""module -> the package that installs it."""
SIMILARITY = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
ROUGE_MAX_WORDS = 5000
"""Longer texts get no ROUGE: rouge_chinese finds ROUGE-L's common subsequence by recursion, two levels a word of a
sentence, and in time that grows with the square of the words (12 s at 3,000 words); past ~10,000 words it would
stop the scoring with a RecursionError. Such a sample's ROUGE is left out of the means, and counted."""


def missing_libraries() -> list[str]:
    """The packages to pip install for BLEU and ROUGE (none: all there)."""
    return [package for module, package in LIBRARIES.items() if importlib.util.find_spec(module) is None]


def install_hint() -> str:
    return f"pip install 'tunelab[metrics]' (or: pip install {' '.join(LIBRARIES.values())})"


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 if prediction.strip() == reference.strip() else 0.0


def similarity(prediction: str, reference: str) -> dict[str, float | None]:
    """{"bleu-4", "rouge-1", "rouge-2", "rouge-l"} of one prediction, as LLaMA-Factory scores it (in percent); the
    ROUGE scores None past `ROUGE_MAX_WORDS`."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.CRITICAL)  # not its "Building prefix dict" lines on every run
    hypothesis, words = list(jieba.cut(prediction)), list(jieba.cut(reference))
    counts = len(" ".join(hypothesis).split()), len(" ".join(words).split())  # the words ROUGE reads
    if max(counts) > ROUGE_MAX_WORDS:
        rouge = {k: None for k in SIMILARITY[1:]}
    elif not min(counts):
        rouge = {k: 0.0 for k in SIMILARITY[1:]}
    else:
        # rouge_chinese finds ROUGE-L's common subsequence by recursion, one level a word of a sentence: a long
        # English reply (no 。？！ to cut it into sentences) would pass Python's default limit of 1000
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 20_000))
        try:
            scores = Rouge().get_scores(" ".join(hypothesis), " ".join(words))[0]
        finally:
            sys.setrecursionlimit(limit)
        rouge = {k: round(v["f"] * 100, 4) for k, v in scores.items()}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return {"bleu-4": round(float(bleu) * 100, 4), **rouge}


def summarise(rows: list[dict]) -> dict:
    """The run's scores from its output lines: counts, and the mean of each score over the samples with a reference
    and a prediction."""
    scored = [r for r in rows if r.get("reference") is not None and r.get("prediction") is not None]
    result: dict = {"count": len(rows), "scored": len(scored),
                    "without_reference": sum(r.get("reference") is None for r in rows),
                    "failed": sum(r.get("prediction") is None for r in rows)}
    if any("reasoning" in r for r in rows):  # left out of the prediction scored (its answer)
        result["with_reasoning"] = sum("reasoning" in r for r in rows)
    if not scored:
        return result
    result["exact_match"] = round(sum(exact_match(r["prediction"], r["reference"]) for r in scored) / len(scored), 4)
    missing = missing_libraries()
    if missing:
        result["missing_libraries"] = missing
        return result
    values: dict[str, list[float]] = {k: [] for k in SIMILARITY}
    for r in scored:
        for k, v in similarity(r["prediction"], r["reference"]).items():
            if v is not None:
                values[k].append(v)
    result.update({k: round(sum(v) / len(v), 4) for k, v in values.items() if v})
    if len(values["rouge-l"]) < len(scored):
        result["rouge_skipped"] = len(scored) - len(values["rouge-l"])
    return result
