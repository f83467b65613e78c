"""The documentation holds together: README.md is a landing page (at most 15 KB) that links every page of
docs/, and every relative link of README.md and docs/*.md points to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from doc_snippets import DOCS, ROOT, doc_path, python_block

README_MAX_BYTES = 15_000
# [text](target) and ![alt](target), outside code spans and blocks; the target up to a space or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """`text` without fenced code blocks and inline code spans (a link inside code is not a link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(path: Path) -> list[str]:
    links = LINK.findall(_prose(path.read_text()))
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            broken.append(target)
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == [], f"{path.relative_to(ROOT)} links to missing files"


def test_the_link_check_sees_links_and_misses(tmp_path):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    (tmp_path / "README.md").write_text("x\n")
    page.write_text(
        "[up](../README.md#usage) ![pic](img.png) [web](https://example.com) [here](#top)\n"
        '`[not a link](nowhere.md)`\n```\n[nor this](nowhere.md)\n```\n[gone](missing.md "title")\n'
    )
    assert relative_links(page) == ["../README.md#usage", "img.png", "missing.md"]
    assert broken_links(page) == ["img.png", "missing.md"]


def test_readme_is_a_landing_page():
    readme = ROOT / "README.md"
    size = readme.stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (at most {README_MAX_BYTES}): move depth to docs/"
    )
    linked = {(readme.parent / t.split("#", 1)[0]).resolve() for t in relative_links(readme)}
    unlinked = [p.name for p in DOCS if p != readme and p.resolve() not in linked]
    assert unlinked == [], f"README.md does not link these pages of docs/: {unlinked}"
    assert len(DOCS) > 1


def test_snippets_come_from_the_pages_that_hold_them():
    assert "UNOStep(" in python_block("README.md", "## Usage")
    assert "add_adapter" in python_block("docs/usage.md", "## LoRA (the default way to train a denoiser)")
    with pytest.raises(ValueError, match="heading="):
        python_block("README.md", "## No such heading")
    with pytest.raises(ValueError, match="doc="):
        doc_path("docs/../setup.py")


def test_ci_runs_the_readme_commands_in_order():
    """.ci/run runs the README's main job exactly as its first command does, then the README's test command,
    so a main job that breaks the tests (e.g. by rewriting the committed results) fails CI."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    main_job, tests = (b.strip().split(" && ")[-1] for b in blocks[:2])
    assert main_job == "python benchmarks/step_throughput.py" and tests.startswith("pytest -q -n 2"), blocks[
        :2
    ]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert main_job in ci, "the README's main job is not a line of .ci/run"
    pytest_line = next(i for i, line in enumerate(ci) if line.startswith(tests))
    assert ci.index(main_job) < pytest_line
