"""Parity verification: does a compressed model still compute what the original did?

One function, :func:`compare_models`, used by ``compress()``, by ``tools/compare.py`` and by the tests.
This package depends on no pass (only numpy, onnx, onnxruntime, :mod:`onnxcompress.errors` and
:mod:`onnxcompress.data`), so ``tools/compare.py`` stands alone.

* :mod:`~onnxcompress.verify.session` — providers and onnxruntime sessions from any model form;
* :mod:`~onnxcompress.verify.metrics` — per-output error metrics;
* :mod:`~onnxcompress.verify.tolerance` — when a candidate is close enough, and presets;
* :mod:`~onnxcompress.verify.layers` — layer-by-layer parity and the first divergence;
* :mod:`~onnxcompress.verify.report` — :class:`ParityReport`, JSON and a text table;
* :mod:`~onnxcompress.verify.compare` — :func:`compare_models`.
"""

from onnxcompress.verify.compare import compare_models, output_steps
from onnxcompress.verify.layers import analyse_layers, shared_tensors
from onnxcompress.verify.metrics import MetricAccumulator, OutputMetrics, compute_metrics
from onnxcompress.verify.report import LayerParity, OutputParity, ParityReport, ProviderRun
from onnxcompress.verify.session import (
    ProviderChoice,
    available_providers,
    make_session,
    resolve_providers,
    run_session,
)
from onnxcompress.verify.tolerance import LOSSLESS, LOSSY, LOSSY_RANDOM, POLICIES, Tolerance, policy_for, quantized

__all__ = [
    "compare_models",
    "output_steps",
    "analyse_layers",
    "shared_tensors",
    "MetricAccumulator",
    "OutputMetrics",
    "compute_metrics",
    "LayerParity",
    "OutputParity",
    "ParityReport",
    "ProviderRun",
    "ProviderChoice",
    "available_providers",
    "make_session",
    "resolve_providers",
    "run_session",
    "LOSSLESS",
    "LOSSY",
    "LOSSY_RANDOM",
    "POLICIES",
    "Tolerance",
    "policy_for",
    "quantized",
]
