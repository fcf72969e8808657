"""Shared by the benchmark scripts: write one section of docs/benchmarks.md, load a sibling script.

Each script owns the text between ``<!-- section: NAME -->`` and ``<!-- end: NAME -->``; the rest of
the file is left as it is (read, replace, write back in one go).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Callable

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


def load_bench(name: str):
    """Import ``bench/<name>.py`` (bench/ is scripts, not a package) as module ``bench_<name>``, once."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def docs_main(script: str, section: str, doc: str, make_text: Callable[[str], str], argv=None) -> int:
    """The ``main()`` of a script whose one option is ``--write-docs``: ``make_text(command)`` runs it and
    renders its tables, which are printed and, with ``--write-docs``, written into ``section``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    text = make_text(f"python bench/{script}.py" + (" --write-docs" if args.write_docs else ""))
    print(text)
    if args.write_docs:
        write_section(section, text)
    return 0
