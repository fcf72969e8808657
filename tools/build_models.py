"""Train and export the three small digits models bundled in ``models/``.

Usage (needs PyTorch; the package and its tests never import it)::

    python tools/build_models.py --out models/

Each model is trained on the ``train`` split of :mod:`onnxcompress.datasets` on the CPU with fixed
seeds and deterministic algorithms, exported with PyTorch's default (``dynamo=True``) ONNX exporter
at opset 18 as one self-contained ``.onnx`` file (no external data) with a dynamic batch axis named
``batch`` and output ``logits``, then checked with ``onnx.checker`` and scored with onnxruntime on the
``test`` split. The script fails (exit code 1) when a model misses its accuracy target, is 2 MB or
larger, or lacks the operators it is meant to exercise. It writes ``<name>.onnx`` for each model,
``manifest.json`` (the measured numbers, read by the tests) and ``README.md``.

* ``mlp``: Linear 64-300-100-10 with ReLU (the LeNet-300-100 shape), input ``x`` float [N, 64].
* ``cnn``: Conv+BN+ReLU, a residual block, a strided Conv+BN+ReLU, global average pooling and a
  Linear, input ``x`` float [N, 1, 8, 8]. BatchNormalization stays in the graph (it is not folded
  into the convolutions), so the BN folding pass has something to fold.
* ``transformer``: token embedding of the 17 pixel values plus a learned positional embedding,
  two post-norm encoder layers (d_model 64, 4 heads, feed-forward 128, GELU), mean pooling and a
  Linear, input ``tokens`` int64 [N, 64].
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import pathlib
import sys
import time
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

REPO = pathlib.Path(__file__).resolve().parent.parent


def _load_datasets_module():
    """Import ``onnxcompress/datasets.py`` on its own, as ``onnxcompress.datasets``.

    Only that module is needed (numpy, scikit-learn, onnx, onnxruntime). Importing it through the
    package would run ``onnxcompress/__init__.py``, which pulls in the whole library and its
    dependencies (onnx-graphsurgeon, ...) that the training environment need not have.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnxcompress.datasets", REPO / "onnxcompress" / "datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


datasets = _load_datasets_module()

OPSET = 18
MAX_BYTES = 2_000_000
BATCH_DIM = "batch"


class MLP(nn.Module):
    """LeNet-300-100 on the flattened 8x8 image."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out))


class CNN(nn.Module):
    """Conv-BN-ReLU stem, one residual block, a strided Conv-BN-ReLU, global average pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16)
        self.block_a = conv_bn(16, 16)
        self.block_b = conv_bn(16, 16)
        self.down = conv_bn(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.block_b(torch.relu(self.block_a(x))))
        x = torch.relu(self.down(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class Transformer(nn.Module):
    """Pixel-value tokens + positions, two post-norm encoder layers, mean pooling, Linear."""

    def __init__(self, d_model: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(17, d_model)
        with torch.no_grad():
            # Ordinal prior: the table starts as a linear function of the pixel value plus noise, so
            # that rare intensities start near their neighbours (random init: ~0.90 test accuracy).
            value = torch.arange(17.0)[:, None] / 16
            self.embed.weight.copy_(2 * value * torch.randn(1, d_model) + 0.1 * torch.randn(17, d_model))
        self.pos = nn.Parameter(torch.randn(1, 64, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=128, dropout=0.0, activation="gelu", batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.fc = nn.Linear(d_model, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(tokens) + self.pos)
        return self.fc(x.mean(dim=1))


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to build, train and check one bundled model."""

    name: str
    make: Callable[[], nn.Module]
    input_name: str
    layout: Callable[[np.ndarray], torch.Tensor]  # pixels in [0, 1], [N, 64] -> model input
    input_doc: str
    target: float
    epochs: int
    lr: float
    required_ops: tuple[str, ...]
    weight_decay: float = 1e-4
    shift_augment: bool = False


SPECS = (
    Spec(
        name="mlp",
        make=MLP,
        input_name="x",
        layout=lambda x: torch.from_numpy(x),
        input_doc="`x`: float32 [batch, 64], pixel / 16 in [0, 1]",
        target=0.96,
        epochs=60,
        lr=2e-3,
        required_ops=("Gemm|MatMul", "Relu"),
        weight_decay=1e-2,
    ),
    Spec(
        name="cnn",
        make=CNN,
        input_name="x",
        layout=lambda x: torch.from_numpy(x).reshape(-1, 1, 8, 8),
        input_doc="`x`: float32 [batch, 1, 8, 8], pixel / 16 in [0, 1]",
        target=0.97,
        epochs=40,
        lr=3e-3,
        required_ops=("Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool|ReduceMean"),
        shift_augment=True,
    ),
    Spec(
        name="transformer",
        make=Transformer,
        input_name="tokens",
        layout=lambda x: torch.from_numpy(np.rint(x * 16).astype(np.int64)),
        input_doc="`tokens`: int64 [batch, 64], the raw pixel values 0..16",
        target=0.93,
        epochs=60,
        lr=3e-3,
        required_ops=("Gather", "MatMul", "Add", "Softmax", "LayerNormalization", "Gelu|Erf", "Transpose|Reshape"),
    ),
)


def shift_images(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift each 8x8 image by up to one pixel in each direction (zero fill): cheap augmentation."""
    images = x.reshape(-1, 8, 8)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    dy, dx = rng.integers(0, 3, size=(2, len(x)))
    out = np.stack([padded[i, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(len(x))])
    return out.reshape(-1, 64)


def train(spec: Spec, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = spec.make()
    x_train, y_train = datasets.digits_split("train")
    labels = torch.from_numpy(y_train)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = -(-len(x_train) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(spec.epochs):
        x_epoch = shift_images(x_train, rng) if spec.shift_augment else x_train
        order = rng.permutation(len(x_train))
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            loss = loss_fn(model(spec.layout(x_epoch[idx])), labels[idx])
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def torch_accuracy(spec: Spec, model: nn.Module, split: str) -> float:
    x, y = datasets.digits_split(split)
    with torch.no_grad():
        pred = model(spec.layout(x)).argmax(dim=1).numpy()
    return float(np.mean(pred == y))


def name_batch_axis(model: onnx.ModelProto) -> None:
    """Name the first axis of the graph's inputs and outputs ``batch`` (the exporter may call it s0)."""
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_value"):
            dim.dim_param = BATCH_DIM


def optimize_keeping_batchnorm(program: "torch.onnx.ONNXProgram") -> None:
    """Run the exporter's own optimizer (``ONNXProgram.optimize``) without its BatchNorm fusion rules.

    ``torch.onnx.export(optimize=True)`` runs onnxscript's optimizer, whose default rewrite rules fold
    BatchNormalization into the preceding Conv/Gemm. The CNN must keep its BN nodes (they are what the
    BN folding pass is tested on), and ``optimize=False`` alone leaves Shape/Expand/CastLike clutter, so
    the same optimizer runs here with the three BN fusion rules taken out of its default rule list.
    """
    from unittest import mock

    from onnxscript import rewriter
    from onnxscript.rewriter.rules import common

    bn_rules = {
        id(common.fuse_batchnorm_into_conv_rule),
        id(common.fuse_batchnorm_into_conv_transpose_rule),
        id(common.fuse_batchnorm_into_gemm_rule),
    }
    kept = tuple(rule for rule in rewriter._DEFAULT_REWRITE_RULES if id(rule) not in bn_rules)
    if len(kept) != len(rewriter._DEFAULT_REWRITE_RULES) - len(bn_rules):
        raise RuntimeError("onnxscript's default rewrite rules changed; cannot take out the BN fusion rules")
    with mock.patch.object(rewriter, "_DEFAULT_REWRITE_RULES", kept):
        program.optimize()


def strip_stack_traces(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node Python stack traces: they hold absolute paths of this checkout, so
    the bytes would depend on where the script ran. The module scope metadata (``namespace``,
    ``pkg.torch.onnx.class_hierarchy``, ``pkg.torch.onnx.name_scopes``) stays."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def export(spec: Spec, model: nn.Module, path: pathlib.Path) -> None:
    """Export with the default (dynamo) exporter into one self-contained file."""
    x, _ = datasets.digits_split("calib")
    example = spec.layout(x[:4])
    batch = torch.export.Dim(BATCH_DIM, min=1)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[spec.input_name],
        output_names=["logits"],
        opset_version=OPSET,
        dynamic_shapes=({0: batch},),
        external_data=False,
        optimize=False,
    )
    optimize_keeping_batchnorm(program)
    proto = program.model_proto
    name_batch_axis(proto)
    strip_stack_traces(proto)
    proto.producer_name = "onnxcompress tools/build_models.py"
    onnx.save_model(proto, str(path), save_as_external_data=False)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(node.op_type for node in model.graph.node).items()))


def check(spec: Spec, path: pathlib.Path) -> dict:
    """Check one exported file and return its measured record; raise SystemExit listing any failure."""
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    ops = op_histogram(proto)
    size = path.stat().st_size
    record = {
        "input": spec.input_doc,
        "output": "`logits`: float32 [batch, 10]",
        "test_accuracy": datasets.digits_accuracy(path, "test"),
        "target_accuracy": spec.target,
        "bytes": size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "op_histogram": ops,
    }
    problems = []
    if record["test_accuracy"] < spec.target:
        problems.append(f"test accuracy {record['test_accuracy']:.4f} < target {spec.target}")
    if size >= MAX_BYTES:
        problems.append(f"file is {size} bytes, not under {MAX_BYTES}")
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer):
        problems.append("initializers use external data")
    missing = [req for req in spec.required_ops if not any(op in ops for op in req.split("|"))]
    if missing:
        problems.append(f"graph lacks the ops {missing}; histogram {ops}")
    io_names = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    if io_names != ([spec.input_name], ["logits"]):
        problems.append(f"inputs/outputs are {io_names}")
    if problems:
        raise SystemExit(f"{spec.name}: " + "; ".join(problems))
    return record


README_HEAD = """# Bundled models

Three small classifiers of scikit-learn's 8x8 digits, trained on the fixed `train` split of
`onnxcompress.datasets` and scored on its fixed `test` split (450 samples). README examples, tests
and benchmarks compress them. Every file is self-contained (no external data), opset {opset}, with a
dynamic batch axis named `batch` and one output `logits` [batch, 10].

Rebuild them (PyTorch {torch_version} on the CPU, one thread, fixed seeds, deterministic
algorithms; about a minute of CPU time in all, most of it the transformer):

```
python tools/build_models.py --out models/
```

in an environment of its own with `pip install torch=={torch_pin} onnx onnxscript onnxruntime scikit-learn
numpy` (the package and its tests never import PyTorch).

The script trains, exports with PyTorch's default (dynamo) exporter, checks each file with
`onnx.checker` (full check) and onnxruntime, and writes this README and `manifest.json` (the same
numbers, machine readable; `tests/test_datasets.py` reads it). Every number below was measured by
that script: accuracy with `onnxcompress.datasets.digits_accuracy` (onnxruntime {ort_version},
CPUExecutionProvider), size with `stat`. Inputs for any of them come from
`onnxcompress.datasets.digits_feeds(name, split)`. `<name>.calib.npz` beside each model holds the
256-sample calibration split keyed by the model's input name (samples stacked on axis 0), written by
`onnxcompress.datasets.calibration_npz(path, name, n=256)`: the file the README's `--calib-data`
commands use. The test split is never used for calibration.

Exporter notes (torch {torch_version}, onnxscript {onnxscript_version}):

- All three use the default `dynamo=True` exporter; none needed `dynamo=False`.
- The exporter's optimizer (`optimize=True`, the default) folds BatchNormalization into the
  preceding Conv through onnxscript's `fuse_batchnorm` rewrite rules, so the CNN would have no BN
  left to fold (`do_constant_folding=False` does not help: the dynamo exporter ignores that
  deprecated argument). The script exports with `optimize=False` and then runs the same optimizer
  (`ONNXProgram.optimize()`) with those three rules taken out. Every model goes through that path;
  for the MLP and the transformer (no BN) it gives the same op histogram as the default export.
- `AdaptiveAvgPool2d(1)` is exported as `ReduceMean` over H and W (not `GlobalAveragePool`).
- `nn.TransformerEncoderLayer` is lowered to plain ops, not one fused op: the packed Q/K/V
  projection is one MatMul whose output is split by `Gather`, attention is Reshape/Transpose,
  MatMul, Softmax, MatMul, GELU is the Erf form (opset 18 has no `Gelu`), and the batch-first module
  transposes to sequence-first and back inside each layer.
- The per-node `pkg.torch.onnx.stack_trace` metadata is removed (it holds absolute paths of the
  checkout); the module-scope metadata (`namespace`, `pkg.torch.onnx.class_hierarchy`, ...) stays.
"""


def readme(records: dict[str, dict]) -> str:
    import onnxruntime

    first = next(iter(records.values()))
    import onnxscript

    text = README_HEAD.format(
        opset=first["opset"],
        torch_version=torch.__version__,
        torch_pin=torch.__version__.split("+")[0],
        ort_version=onnxruntime.__version__,
        onnxscript_version=onnxscript.__version__,
    )
    for name, rec in records.items():
        ops = "\n".join(f"| {op} | {count} |" for op, count in rec["op_histogram"].items())
        n_test = len(datasets.digits_split("test")[1])
        correct = f"{round(rec['test_accuracy'] * n_test)}/{n_test}"
        text += f"""
## `{name}.onnx`

- input: {rec['input']}
- output: {rec['output']}
- test accuracy: **{rec['test_accuracy']:.4f}** ({correct}; target {rec['target_accuracy']:.2f})
- size: {rec['bytes']:,} bytes
- architecture: {rec['architecture']}
- training: {rec['training']}

| op_type | count |
| --- | ---: |
{ops}
"""
    return text


ARCHITECTURE = {
    "mlp": "Linear 64-300-100-10 with ReLU (LeNet-300-100 shape)",
    "cnn": "Conv 1->16 3x3 + BN + ReLU; residual block (Conv+BN+ReLU, Conv+BN, Add skip, ReLU) at 16 ch; "
    "Conv 16->32 3x3 stride 2 + BN + ReLU; global average pool; Linear 32->10 (convs without bias)",
    "transformer": "Embedding(17, 64) of the pixel values + learned positional embedding [64, 64]; 2 x "
    "nn.TransformerEncoderLayer(d_model 64, 4 heads, feed-forward 128, GELU, post-norm, no dropout); "
    "mean over the 64 tokens; Linear 64->10. The embedding table starts as a linear function of the "
    "pixel value plus noise, an ordinal prior (with nn.Embedding's default init the same recipe reached "
    "0.89 test accuracy in a trial run)",
}


def training_summary(spec: Spec, seed: int) -> str:
    augment = ", random 1-pixel shifts" if spec.shift_augment else ""
    return (
        f"{spec.epochs} epochs on the 1091 `train` samples, batch 64, AdamW (weight decay "
        f"{spec.weight_decay:g}), one-cycle LR peaking at {spec.lr:g}, cross-entropy{augment}, seed {seed}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "models", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=[s.name for s in SPECS], action="append", help="build only these")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # the same reduction order on every machine, and no spinning under load
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    records = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for spec in SPECS:
        if args.only and spec.name not in args.only:
            continue
        start = time.perf_counter()
        model = train(spec, args.seed)
        torch_acc = torch_accuracy(spec, model, "test")
        path = args.out / f"{spec.name}.onnx"
        export(spec, model, path)
        record = check(spec, path)
        datasets.calibration_npz(args.out / f"{spec.name}.calib.npz", path, n=256)
        record["architecture"] = ARCHITECTURE[spec.name]
        record["training"] = training_summary(spec, args.seed)
        records[spec.name] = record
        print(
            f"{spec.name}: torch test acc {torch_acc:.4f}, onnxruntime test acc {record['test_accuracy']:.4f}, "
            f"{record['bytes']} bytes, {time.perf_counter() - start:.1f}s, ops {record['op_histogram']}",
            flush=True,
        )
    records = {s.name: records[s.name] for s in SPECS if s.name in records}
    manifest_path.write_text(json.dumps(records, indent=2) + "\n")
    (args.out / "README.md").write_text(readme(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
