"""The documentation's code, as the tests run it: README.md and docs/*.md.

`python_block(doc, heading)` is the first ```python block after a heading of README.md or a page of docs/,
so a test executes the snippet a reader copies, wherever the page now holds it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])


def doc_path(doc: str) -> Path:
    """`doc`: "README.md" or "docs/<page>.md" (relative to the repository root)."""
    path = ROOT / doc
    if path not in DOCS:
        raise ValueError(
            f"doc={doc!r} is neither README.md nor a page of docs/ ({[str(p.relative_to(ROOT)) for p in DOCS]})"
        )
    return path


def python_block(doc: str, heading: str) -> str:
    """The first ```python block after the line `heading` (e.g. "## Usage") in `doc`."""
    text = doc_path(doc).read_text()
    parts = re.split(rf"^{re.escape(heading)}$", text, maxsplit=1, flags=re.M)
    if len(parts) != 2:
        raise ValueError(f"heading={heading!r} is not a line of {doc}")
    m = re.search(r"```python\n(.*?)```", parts[1], re.S)
    if m is None:
        raise ValueError(f"no python block after {heading!r} in {doc}")
    return m.group(1)
