"""Fusion and layer merging: lossless merges (``fuse``), k-means weight sharing (``share_weights``),
low-rank factorization (``low_rank``).

* :mod:`.lossless` — the ``fuse`` pass, built from the rules in :mod:`.bn_folding`,
  :mod:`.linear_merge` and :mod:`.weight_fold` (shared pattern questions in :mod:`.patterns`).
* :mod:`.weight_sharing` — snap each large float weight to ``K`` cluster centres (1-D k-means).
* :mod:`.low_rank` — truncated SVD of large MatMul/Gemm weights into two thinner layers.
* :mod:`.activations` — calibration statistics (mean squared input per feature) for the
  activation-aware variants.
"""
