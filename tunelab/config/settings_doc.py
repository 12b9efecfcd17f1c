"""The table of every setting in docs/CONFIG.md, made from the schema: names, types, defaults, docstrings, rules.

    python -m tunelab.config.settings_doc    # prints the table
"""

from __future__ import annotations

from tunelab.config.schema import default_value, field_docs, field_rule, field_types
from tunelab.config.typecheck import describe_type


def settings_markdown() -> str:
    """The table of settings in docs/CONFIG.md (name, type, default, docstring and the rule of its values).

    Rules whose values come from another step (data formats, templates, DeepSpeed presets) are left to the docstring,
    so the table does not go stale when that step gains one."""
    docs, hints = field_docs(), field_types()
    rows = ["| setting | type | default | what it does |", "|---|---|---|---|"]
    for name in field_types():
        rule = field_rule(name)
        must = f" Must be {rule.requirement()}." if rule is not None and rule.choices is None else ""
        text = (docs.get(name, "") + must).strip().replace("|", "\\|")
        rows.append(f"| `{name}` | {describe_type(hints[name]).replace('|', '/')} | `{default_value(name)!r}` | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_markdown())
