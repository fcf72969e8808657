"""Per-run state that is not configuration: data, providers, seed, scratch folder, models.

A :class:`Context` is created for one ``compress()`` call and closed at its end; nothing in
onnxcompress keeps state between runs. Passes read calibration data, the teacher (original) model
and the random seed from it, and write scratch files only into :meth:`Context.scratch_dir` (a
temporary folder, never the current directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.graph.io import ModelSource, graph_to_model

__all__ = ["Context"]


@dataclass
class Context:
    """What a run needs besides the recipe.

    ``data``: calibration data in any form :func:`onnxcompress.data.as_feed_source` accepts (an
    ``.npz`` path, a folder of ``.npz`` files, an iterable of feed dicts, a CalibrationDataReader).
    ``source``: a second model for transfer passes. ``progress``: show progress bars on stderr.
    """

    data: Any = None
    providers: tuple[str, ...] = ("cpu",)
    seed: int = 0
    progress: bool = False
    scratch_root: Path | None = None
    source: Any = None
    #: the original model, set by compress(): the teacher for repair, the reference for verify
    original: ModelSource | None = None
    notes: list[str] = field(default_factory=list)
    #: where large new weights are spilled between passes (None: keep them in memory); see graph.io.spill
    spill_dir: Path | None = None
    spill_bytes: int = 1 << 20
    _scratch: Path | None = field(default=None, repr=False)
    #: the feed source made from ``data`` when it is an object (see :meth:`feeds`)
    _source: Any = field(default=None, repr=False)

    # -- models ---------------------------------------------------------------------------------

    @property
    def base_dir(self) -> Path | None:
        return self.original.base_dir if self.original is not None else None

    def model_of(self, graph: gs.Graph) -> onnx.ModelProto:
        """Export the current graph as a ModelProto (external tensors still refer to base_dir)."""
        return graph_to_model(graph.copy(), self.original.model if self.original is not None else None)

    # -- data -----------------------------------------------------------------------------------

    def feeds(self, model: onnx.ModelProto | None = None, *, batch_size: int | None = None):
        """The calibration data as a feed source, or None when no data was given; with ``model``, each
        feed is checked against its inputs as it is read.

        A file or folder is read afresh, batched for ``model``; any other data (a reader, an iterator,
        a list) is one object read by every pass, so every call wraps the same source: a reader with
        ``rewind()`` is rewound for each pass that reads it, and a one-shot iterator (a generator, a
        reader without ``rewind()``) is spooled to the run's scratch folder as it is first read
        (:func:`~onnxcompress.data.spooled`), so every pass and the verification read the same feeds."""
        if self.data is None:
            return None
        from onnxcompress.data import as_feed_source, checked_source, spooled

        if isinstance(self.data, (str, os.PathLike)):
            source = as_feed_source(self.data, model=model, batch_size=batch_size)
        else:  # batch_size and model only shape how a file is cut into batches
            if self._source is None:  # a one-shot source is spooled to disk as first read, for every pass
                source = as_feed_source(self.data)
                self._source = spooled(source, self.scratch_dir() / "feeds") if source._one_shot else source
            source = self._source
        return checked_source(source, model) if model is not None else source

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator seeded from the run's seed and ``salt`` (stable across runs and passes)."""
        digest = hashlib.sha256(f"{self.seed}:{salt}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    # -- scratch and progress -------------------------------------------------------------------

    def scratch_dir(self) -> Path:
        """A private temporary folder for this run, removed by :meth:`close`."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="onnxcompress-", dir=self.scratch_root))
        return self._scratch

    def note(self, text: str) -> None:
        """A line for the user in the summary (e.g. which int8 form was chosen and why)."""
        if text not in self.notes:
            self.notes.append(text)

    def progress_bar(self, iterable: Iterable, **kwargs):
        if not self.progress:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, leave=False, disable=None, **kwargs)

    def close(self) -> None:
        if self._scratch is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._scratch)
            self._scratch = None

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
