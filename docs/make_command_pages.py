"""Write docs/commands/<command>.md from each command's --help text.

    python docs/make_command_pages.py     # after changing a flag; tests/test_docs.py checks they agree
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from jobs.cli import build_parser

PAGES = Path(__file__).parent / "commands"


def help_texts() -> dict[str, str]:
    """{command: its --help text} at a fixed width, so pages do not depend on the terminal."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {name: sub.format_help() for name, sub in subparsers.choices.items()}
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def page(name: str, text: str) -> str:
    return f"# lenet-tune {name}\n\nGenerated from `lenet-tune {name} --help`.\n\n```text\n{text}```\n"


def main() -> None:
    PAGES.mkdir(exist_ok=True)
    for name, text in help_texts().items():
        (PAGES / f"{name}.md").write_text(page(name, text))


if __name__ == "__main__":
    main()
