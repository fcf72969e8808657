"""Compact, exact storage of weights that stock onnxruntime loads: codebooks, bitmask and
gap-encoded sparse tensors, packed small integers — all decoded by plain ops folded at load.

* :mod:`.packing`: bit packing and its unpacking ops (native UINT4/UINT2 where the opset allows).
* :mod:`.codebook`: value streams (raw, codebook).
* :mod:`.sparse`: layouts (full, bitmask, gaps).
* :mod:`.compact`: the ``compact_storage`` pass choosing the smallest per weight.
"""

from onnxcompress.encode.compact import CompactStorageConfig, CompactStoragePass, Encoding, choose_encoding

__all__ = ["CompactStorageConfig", "CompactStoragePass", "Encoding", "choose_encoding"]
