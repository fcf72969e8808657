"""Quantization: int8 (static QDQ with streaming calibration, dynamic) and size-only integer storage.

Modules: ``config`` (options), ``policy`` (op table), ``plan`` (the inspectable plan), ``calibrate``
(streamed statistics and ranges), ``params`` (scale / zero-point math), ``qdq`` (Q/DQ materialized in
one place), ``static`` (the ``quantize_int8`` pass), ``dynamic``, ``smoothquant``, ``storage`` (the
``storage`` pass and :func:`encode_weight`, reusable by other passes).
"""

from onnxcompress.quantize.config import QuantizeInt8Config, StorageConfig
from onnxcompress.quantize.static import QuantizeInt8Pass
from onnxcompress.quantize.storage import StoragePass, encode_weight

__all__ = ["QuantizeInt8Config", "StorageConfig", "QuantizeInt8Pass", "StoragePass", "encode_weight"]
