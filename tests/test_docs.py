"""The per-command pages are the current --help text; the README's set-up commands stay first."""

import re
from pathlib import Path

import pytest

from docs.make_command_pages import PAGES, help_texts, page

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("name,text", sorted(help_texts().items()))
def test_command_page_matches_help(name, text):
    path = PAGES / f"{name}.md"
    assert path.exists(), f"run python docs/make_command_pages.py to add {path.name}"
    assert path.read_text() == page(name, text), f"{path.name} is stale: run python docs/make_command_pages.py"


def test_readme_opens_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert block == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/lenet-tune tune --smoke",
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest",
    ]
    assert text.index("```bash") < 40  # right under the title
    assert ".venv/bin/python -m pytest" in (ROOT / ".ci/run").read_text()
