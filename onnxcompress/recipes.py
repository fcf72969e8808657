"""Presets: what ``--int8``, ``--int4``, ``--fp16`` ... mean, as lists of step configs.

Every preset starts with the lossless steps (cleanup, deduplication, constant folding and the
lossless merges) unless ``lossless=False``. A preset is a plain function of no data: whether
calibration data is present is decided at run time by the passes themselves (and reported), so a
recipe built from presets stays printable and replayable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from onnxcompress.passes.cleanup import CleanupConfig, DedupeConfig, FoldConstantsConfig
from onnxcompress.fuse.lossless import FuseConfig
from onnxcompress.encode.compact import CompactStorageConfig
from onnxcompress.quantize.config import QuantizeInt8Config
from onnxcompress.quantize.int4 import QuantizeInt4Config
from onnxcompress.quantize.embed import QuantizeEmbeddingConfig
from onnxcompress.quantize.fp16 import ConvertFp16Config
from onnxcompress.transfer.stages import deep_compression_steps
from onnxcompress.errors import RecipeError
from onnxcompress.recipe import Recipe, StepConfig

__all__ = ["Preset", "PRESETS", "lossless_steps", "preset_recipe", "default_recipe", "with_preset_output",
           "with_preset_steps"]


def lossless_steps() -> list[StepConfig]:
    """The lossless prefix of every preset (deduplication after the merges: a bias shared by two
    layers after dedupe would make BatchNormalization folding decline)."""
    return [CleanupConfig(), FoldConstantsConfig(), FuseConfig(), DedupeConfig(), CompactStorageConfig()]


@dataclass(frozen=True)
class Preset:
    """A named bundle of steps behind one CLI switch."""

    name: str
    flag: str
    help: str
    steps: Callable[[], list[StepConfig]]
    #: output settings the preset changes (explicit flags and recipe files still win)
    output: dict[str, Any] = field(default_factory=dict)


def _presets() -> tuple[Preset, ...]:
    return (
        Preset("int8", "--int8", "int8 quantization: static QDQ with --calib-data, else dynamic MatMul/Gemm + int8 Conv "
               "storage", lambda: [QuantizeInt8Config()]),
        Preset("int4", "--int4", "4-bit block-wise weights for MatMul/Gemm (MatMulNBits; GPTQ with --calib-data, "
               "else round-to-nearest, hqq zero points from block 64; a small input layer in 8 bits) and 4-bit "
               "embedding tables (8-bit when small)",
               lambda: [QuantizeInt4Config(), QuantizeEmbeddingConfig()]),
        Preset("fp16", "--fp16", "compute in float16 where safe; inputs/outputs keep their types",
               lambda: [ConvertFp16Config()]),
        Preset("bf16", "--bf16", "bfloat16 where onnxruntime runs it (few CPU kernels: elsewhere float32 compute "
               "with bfloat16 weights)", lambda: [ConvertFp16Config(dtype="bfloat16")]),
        Preset("deep_compression", "--deep-compression", "Deep Compression: 90%% magnitude pruning (channels "
               "left unread dropped) -> layer-wise repair from the original model (with --calib-data) -> k-means "
               "weight sharing (8 values per tensor) -> repair again -> compact sparse storage; the summary shows "
               "each stage's ratio. The plan is not embedded (it would double a tiny model's file): --report "
               "FILE keeps it, --embed-plan embeds it", deep_compression_steps, {"embed_plan": False}),
    )


PRESETS: tuple[Preset, ...] = _presets()


def preset_recipe(names: list[str], *, lossless: bool = True) -> Recipe:
    """A recipe made of the lossless prefix (optional) and the named presets' steps, in order."""
    recipe = Recipe()
    if lossless:
        for s in lossless_steps():
            recipe = recipe.with_step(s)
    by_name = {p.name: p for p in PRESETS}
    presets = [by_name[n] for n in names]
    return with_preset_output(with_preset_steps(recipe, presets), presets)


def with_preset_steps(recipe: Recipe, presets: list[Preset]) -> Recipe:
    """``recipe`` with the presets' steps; two presets that set one step differently (``--fp16
    --bf16``) are a RecipeError, not the later one silently winning."""
    set_by: dict[str, tuple[Preset, StepConfig]] = {}
    for pre in presets:
        for s in pre.steps():
            earlier = set_by.get(s.name)
            if earlier is not None and earlier[0] is not pre and earlier[1] != s:
                raise RecipeError(f"{earlier[0].flag} and {pre.flag} both set the {s.name} step, differently",
                                  where="presets", hint="give one of them")
            set_by[s.name] = (pre, s)
            recipe = recipe.with_step(s)
    return recipe


def with_preset_output(recipe: Recipe, presets: list[Preset]) -> Recipe:
    """``recipe`` with the output settings the presets change."""
    changes = {k: v for p in presets for k, v in p.output.items()}
    if not changes:
        return recipe
    return recipe.replace(output=dataclasses.replace(recipe.output, **changes))


def default_recipe() -> Recipe:
    """What ``onnxcompress in.onnx out.onnx`` does with no technique flags: the lossless passes."""
    return preset_recipe([])
