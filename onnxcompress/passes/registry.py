"""The table of passes: pass name -> Pass class.

A static table (no import-time side effects elsewhere, no registration decorators): adding a pass
means adding its class to ``_PASS_CLASSES``. The CLI generates its flags from the config classes
listed here, in this order.
"""

from __future__ import annotations

from onnxcompress.errors import RecipeError, did_you_mean
from onnxcompress.passes.base import Pass
from onnxcompress.passes.cleanup import CleanupPass, DedupeInitializersPass, FoldConstantsPass
from onnxcompress.fuse.lossless import FusePass
from onnxcompress.fuse.low_rank import LowRankPass
from onnxcompress.fuse.weight_sharing import ShareWeightsPass
from onnxcompress.encode.compact import CompactStoragePass
from onnxcompress.prune.sparsity import SparsifyPass
from onnxcompress.quantize.static import QuantizeInt8Pass
from onnxcompress.quantize.storage import StoragePass
from onnxcompress.prune.channels import PruneChannelsPass
from onnxcompress.prune.dead import DropDeadChannelsPass
from onnxcompress.fuse.neuron_merge import MergeNeuronsPass
from onnxcompress.transfer.reconstruct import DistillPass, RefitPrunedPass
from onnxcompress.transfer.replay import ApplyPlanPass, WidthPass
from onnxcompress.transfer.stages import CompressionStagesPass
from onnxcompress.quantize.int4 import QuantizeInt4Pass
from onnxcompress.quantize.embed import QuantizeEmbeddingPass
from onnxcompress.quantize.fp16 import ConvertFp16Pass
from onnxcompress.recipe import StepConfig

__all__ = ["pass_classes", "step_config_class", "make_pass", "pass_names"]


def _pass_classes() -> tuple[type[Pass], ...]:
    return (
        CleanupPass,
        DedupeInitializersPass,
        FoldConstantsPass,
        QuantizeInt8Pass,
        StoragePass,
        QuantizeInt4Pass,
        QuantizeEmbeddingPass,
        ConvertFp16Pass,
        FusePass,
        ShareWeightsPass,
        LowRankPass,
        SparsifyPass,
        CompactStoragePass,
        PruneChannelsPass,
        DropDeadChannelsPass,
        MergeNeuronsPass,
        DistillPass,
        RefitPrunedPass,
        ApplyPlanPass,
        WidthPass,
        CompressionStagesPass,
    )


def pass_classes() -> tuple[type[Pass], ...]:
    return _pass_classes()


def pass_names() -> list[str]:
    return [p.config_cls.name for p in _pass_classes()]


def _by_name(name: str) -> type[Pass]:
    for p in _pass_classes():
        if p.config_cls.name == name:
            return p
    raise RecipeError(f"unknown pass {name!r}{did_you_mean(name, pass_names())}", where="recipe",
                      hint=f"valid passes: {', '.join(pass_names())}")


def step_config_class(name: str) -> type[StepConfig]:
    return _by_name(name).config_cls


def make_pass(step: StepConfig) -> Pass:
    return _by_name(step.name)(step)
