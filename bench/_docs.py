"""Shared by the benchmark scripts: write one section of docs/benchmarks.md.

Each script owns the text between ``<!-- section: NAME -->`` and ``<!-- end: NAME -->``; the rest of
the file is left as it is (read, replace, write back in one go).
"""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(section: str, text: str, *, heading: str | None = None) -> None:
    """Replace the body of ``section`` with ``text`` (after an optional ``## heading``)."""
    s = DOC.read_text(encoding="utf-8")
    start, end = f"<!-- section: {section} -->", f"<!-- end: {section} -->"
    i, j = s.index(start) + len(start), s.index(end)
    head = f"\n## {heading}\n\n" if heading else "\n"
    DOC.write_text(s[:i] + head + text + s[j:], encoding="utf-8")


def machine() -> str:
    """``<CPU model>, <n> cores (shared), onnxruntime <version>`` for a table's "Machine:" line."""
    import os
    import platform

    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores (shared), onnxruntime {onnxruntime.__version__}"
