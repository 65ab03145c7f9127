"""Write ``docs/run-config.md``, the reference of every run-config key, from :class:`Settings`.

Usage: ``python -m fl_app.config.reference`` (writes the file) or ``python -m fl_app.config.reference
--check`` (exits 1 when the committed file differs). The table lists each key's default (the one in
:class:`~fl_app.config.settings.Settings`, which ``pyproject.toml`` repeats), what it allows and
its meaning, all taken from the Settings fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from fl_app.config.settings import Settings, allowed_of

DOCS_PATH = Path(__file__).resolve().parents[2] / "docs" / "run-config.md"

HEADER = """# Run-config reference

Every key of `[tool.flwr.app.config]` in `pyproject.toml` (override with `flwr run . -c "key=value"`).
Generated from `fl_app/config/settings.py` by `python -m fl_app.config.reference`; do not edit by hand.
The server checks every key before training; a ClientApp checks the keys it uses.
Every numeric key has a range with both bounds (`[` `]` closed, `(` `)` open), generous for real use
but short of what hangs, exhausts memory or overflows float32; a value outside it, or a fraction for an
integer key, fails before training with an error that names the key, the value and the range.

| key | default | allowed | meaning |
| --- | --- | --- | --- |
"""


def format_default(value: Any) -> str:
    """A default as it is written in TOML, in code font (``""`` for the empty string)."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value}`"


def reference_markdown() -> str:
    """The Markdown text of ``docs/run-config.md``."""
    rows = []
    for field in dataclasses.fields(Settings):
        key = field.name.replace("_", "-")
        cells = (f"`{key}`", format_default(field.default), allowed_of(field), field.metadata["help"])
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return HEADER + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the reference, or with ``--check`` report whether the committed one is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/run-config.md is out of date")
    parser.add_argument("--out", type=Path, default=DOCS_PATH, help="the file to write or check")
    args = parser.parse_args(argv)
    text = reference_markdown()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m fl_app.config.reference", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
