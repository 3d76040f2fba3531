"""Replace (or append) one generated block of a Markdown file, between its start and end markers."""

from __future__ import annotations

from pathlib import Path


def write_block(path: Path, start: str, end: str, text: str) -> None:
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc += "\n" + block + "\n"
    path.write_text(doc)
