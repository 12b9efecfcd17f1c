"""What a setting's value may be beyond its type: a `Rule` per setting (`schema.TrainConfig` puts each in its field's
metadata), checked by `tunelab.config.checks.check_setting`.

Lists of names owned by other steps (data formats, templates, the data_path check, DeepSpeed presets, trackers, DPO
losses and references) are read from those steps when a value is checked, so there is one copy of each.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Rule:
    """What a setting's value must be beyond its type: `test(value)` holds; `must_be` says it in words.

    `choices`, where given, returns the allowed names (read when checking, from the module that owns them): errors
    then suggest the closest one.
    """

    test: Callable[[Any], bool]
    must_be: str | Callable[[], str]
    choices: Callable[[], typing.Collection[str]] | None = None
    problem: Callable[[Any], str | None] | None = None
    """Where given: what exactly is wrong with a value that fails `test` (said instead of `must_be`)."""
    aliases: Callable[[], dict[str, str]] | None = None
    """Where given: other tools' names for the choices (name -> ours), suggested before the closest spelling."""

    def requirement(self) -> str:
        return self.must_be() if callable(self.must_be) else self.must_be


def setting(default: Any = MISSING, rule: Rule | None = None, *, factory: Callable[[], Any] | None = None):
    """A TrainConfig field with its rule in the field's metadata."""
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def _quoted(names) -> str:
    return ", ".join(repr(n) for n in names)


def fraction(example: str = "") -> Rule:
    return Rule(lambda v: 0 <= v < 1, "at least 0 and below 1" + (f" ({example})" if example else ""))


def _data_formats() -> tuple[str, ...]:
    from tunelab.data.formats import FORMATS

    return ("auto", *FORMATS)


def _deepspeed_presets() -> tuple[str, ...]:
    from tunelab.train.deepspeed_configs import PRESETS

    return tuple(PRESETS)


def _templates() -> tuple[str, ...]:
    """Template names from the data step ('hf' among them: the tokenizer's own)."""
    from tunelab.data.templates import TEMPLATES

    return tuple(sorted(TEMPLATES))


def _template_names_elsewhere() -> dict[str, str]:
    from tunelab.data.templates import LLAMAFACTORY_NAMES

    return LLAMAFACTORY_NAMES


def _dpo_losses() -> tuple[str, ...]:
    from tunelab.model.preference_losses import DPO_LOSSES

    return DPO_LOSSES


def _references() -> tuple[str, ...]:
    from tunelab.model.preference import REFERENCES

    return ("auto", *REFERENCES)


def _trackers() -> tuple[str, ...]:
    from tunelab.train.trackers import TRACKERS

    return tuple(TRACKERS)


POSITIVE = Rule(lambda v: v > 0, "a positive whole number")


def _activations() -> tuple[str, ...]:
    from transformers.activations import ACT2FN

    return tuple(sorted(ACT2FN))


ACTIVATION = Rule(lambda v: v in _activations(), lambda: "an activation transformers knows, e.g. 'gelu'", _activations)
EVALUATION_IMAGES = Rule(lambda v: isinstance(v, (str, type(None))) or all(isinstance(p, str) for p in v),
                         "None, a path, or a list of paths (one per evaluation question)")


def _evaluation_inputs_problem(value) -> str | None:
    """The first question that is not a string, or is empty (a blank question asks the model nothing)."""
    for i, question in enumerate(value):
        if not isinstance(question, str):
            return (f"must be a list of questions (strings); evaluation_inputs[{i}] is {question!r} "
                    f"({type(question).__name__}). Write it as text in quotes.")
        if not question.strip():
            return (f"evaluation_inputs[{i}] is an empty question ({question!r}): the model would be asked nothing. "
                    f"Write the question, or remove it from the list (evaluation_inputs = [] asks none).")
    return None


EVALUATION_INPUTS = Rule(lambda v: _evaluation_inputs_problem(v) is None, "a list of questions (strings, none empty)",
                         problem=_evaluation_inputs_problem)
POSITIVE_OR_NONE = Rule(lambda v: v is None or v > 0, "None or a positive whole number")
QUANT_BITS = Rule(lambda v: v in (None, 4, 8), "None, 4 or 8")
BETAS = Rule(lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v),
             "two numbers in [0, 1), e.g. (0.9, 0.999)")
# an empty list puts no adapter anywhere (peft refuses it only once the model is loaded)
TARGET_MODULES = Rule(lambda v: isinstance(v, str) or (len(v) > 0 and all(isinstance(m, str) for m in v)),
                      "'all-linear' or a list of module names like ['q_proj', 'v_proj']")
MODULE_NAMES = Rule(lambda v: v is None or (all(isinstance(m, str) and m.strip() and m != "all" for m in v)),
                    "None or a list of module names like ['embed_tokens', 'lm_head']")
TRAINABLE_MODULES = Rule(lambda v: v == "all" or (isinstance(v, list) and v and all(
    isinstance(m, str) and m.strip() and m != "all" for m in v)), "'all' or a list of module names within a decoder "
    "layer like ['mlp'] or ['self_attn', 'mlp']")
def _data_path_problem(value) -> str | None:
    from tunelab.data.data_path import data_path_problem

    return data_path_problem(value) if value not in (None, "", []) else None


DATA_PATH = Rule(lambda v: _data_path_problem(v) is None,
                 "a path, or a list of paths / {'path': ..., 'format': ..., 'ratio': ...} dicts",
                 problem=_data_path_problem)
DATA_FORMAT = Rule(lambda v: v in _data_formats(), lambda: "one of " + _quoted(_data_formats()), _data_formats)
PROMPT_TEMPLATE = Rule(lambda v: v in _templates(),
                       lambda: "a known template: one of " + _quoted(_templates()), _templates,
                       aliases=_template_names_elsewhere)
REPORT_TO = Rule(lambda v: all(t in _trackers() for t in v), lambda: "a list of any of " + _quoted(_trackers()),
                 _trackers)
POSITIVE_NUMBER = Rule(lambda v: v > 0, "a positive number")
DPO_LOSS = Rule(lambda v: v in _dpo_losses(), lambda: "one of " + _quoted(_dpo_losses()), _dpo_losses)
REFERENCE = Rule(lambda v: v in _references(), lambda: "one of " + _quoted(_references()), _references)
DEEPSPEED = Rule(lambda v: v is None or v in _deepspeed_presets() or v.endswith(".json"),
                 lambda: f"None, one of {_quoted(_deepspeed_presets())} or a path to a DeepSpeed .json",
                 _deepspeed_presets)
