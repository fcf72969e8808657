"""The onnxcompress error hierarchy.

Every error the library raises on purpose is an :class:`OnnxCompressError`. Each carries

* ``what``  – the problem, in one sentence;
* ``where`` – the place in the pipeline or the model (``"load"``, ``"pass quantize_int8, node /fc1/MatMul"``);
* ``hint``  – how to fix it.

``str(err)`` renders all three on one line, so the CLI can print it as it is. The CLI maps each class
to an exit code (``exit_code``): 1 parity failed, 2 usage or recipe error, 3 model or precondition
error, 4 internal error.

::

    OnnxCompressError
    ├── RecipeError        bad or unknown option, impossible combination (raised before the model is touched)
    ├── ModelError         the input is unusable (not ONNX, truncated, unsafe external data path, bad opset)
    │   └── PreconditionError   one pass cannot run on this graph, with the reason
    ├── CalibrationError   no data, wrong feed names or shapes, empty ranges
    ├── PassError          unexpected failure inside a pass, raised ``from`` its cause, naming the pass
    └── ParityError        verification failed; carries the ParityReport
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

__all__ = [
    "OnnxCompressError",
    "RecipeError",
    "ModelError",
    "PreconditionError",
    "CalibrationError",
    "PassError",
    "ParityError",
    "did_you_mean",
]


class OnnxCompressError(Exception):
    """Base class: ``what`` happened, ``where`` it happened, and a ``hint`` to fix it."""

    exit_code = 4

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.what = " ".join(str(what).split())
        self.where = where
        self.hint = " ".join(str(hint).split()) if hint else None
        super().__init__(self.what)

    def with_where(self, where: str) -> "OnnxCompressError":
        """Prefix ``where`` (outermost context first) and return self, for re-raising."""
        self.where = f"{where}: {self.where}" if self.where else where
        return self

    def __str__(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class RecipeError(OnnxCompressError):
    """A bad or unknown option or an impossible combination; raised before the model is touched."""

    exit_code = 2


class ModelError(OnnxCompressError):
    """The input model is unusable: not ONNX, truncated, unsafe external data, unsupported opset."""

    exit_code = 3


class PreconditionError(ModelError):
    """One pass cannot run on this graph at all (as opposed to a per-node Skip)."""


class CalibrationError(OnnxCompressError):
    """Calibration or evaluation data is missing or does not fit the model."""

    exit_code = 2


class PassError(OnnxCompressError):
    """An unexpected failure inside a pass; always raised ``from`` the original exception."""

    exit_code = 4


class ParityError(OnnxCompressError):
    """Verification failed. ``parity`` holds the :class:`~onnxcompress.verify.ParityReport`."""

    exit_code = 1

    def __init__(self, what: str, *, parity: Any = None, where: str | None = None, hint: str | None = None):
        super().__init__(what, where=where, hint=hint)
        self.parity = parity


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
