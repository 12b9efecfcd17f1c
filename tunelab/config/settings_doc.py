"""The table of every setting in docs/CONFIG.md, made from the schema: names, types, defaults, docstrings.

    python -m tunelab.config.settings_doc    # prints the table
"""

from __future__ import annotations

from tunelab.config.loader import RANGES, default_value, describe_type, field_docs, field_types


def settings_markdown() -> str:
    """The table of settings in docs/CONFIG.md, made from the schema (name, type, default, docstring)."""
    docs, hints = field_docs(), field_types()
    rows = ["| setting | type | default | what it does |", "|---|---|---|---|"]
    for name in field_types():
        default = default_value(name)
        rule = f" Must be {RANGES[name][1]}." if name in RANGES and name not in ("data_format", "deepspeed") else ""
        text = (docs.get(name, "") + rule).strip().replace("|", "\\|")
        rows.append(f"| `{name}` | {describe_type(hints[name]).replace('|', '/')} | `{default!r}` | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_markdown())
