"""Atomicity (issue 7 item 5): two processes writing the same output never leave a torn file, and an
interrupt (SIGINT or SIGTERM) at any point of a run leaves no partial output: no output file, no data
file, no temporary file, and an output that existed before untouched.

The interrupt tests run the real command line in a child process that announces on stdout when it
has reached the phase to interrupt (a hook wrapped around one internal function, in the child only),
so the signal lands mid-save deterministically instead of by timing luck.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import builders

SIZES = (256, 1024, 512, 16)  # about 3 MB of float32 weights: a save takes a noticeable moment
FEED = {"x": np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        p = d / f"{name}.onnx"
        onnx.save(builders.mlp(SIZES, seed=seed), str(p))
        paths[name] = p
    return paths


def _expected(path: Path) -> np.ndarray:
    return builders.run(str(path), FEED)[0]


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "onnxcompress", *map(str, args), "--no-verify", "-q"]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_two_writers_never_leave_a_torn_file(models, tmp_path, external):
    out = tmp_path / "out.onnx"
    want = {k: _expected(p) for k, p in models.items()}
    seen, problems, stop = [], [], threading.Event()

    def reader():
        # while the writers race, whatever sits at out.onnx is always a whole model
        while not stop.is_set():
            time.sleep(0.002)
            try:
                data = out.read_bytes()
            except FileNotFoundError:
                continue
            m = onnx.ModelProto()
            try:
                m.ParseFromString(data)
                assert m.graph.node and len(m.graph.initializer) == 6
            except Exception as e:  # noqa: BLE001 - any failure here is a torn file
                problems.append(f"torn read of {len(data)} bytes: {e}")
            seen.append(len(data))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        for _ in range(2):
            extra = ["--external-data"] if external else []
            procs = [subprocess.Popen(_cmd(models[k], out, *extra), stderr=subprocess.PIPE, text=True) for k in "ab"]
            for p in procs:
                _, err = p.communicate(timeout=120)
                assert p.returncode == 0, err
            # the pair on disk comes from one save: it loads and computes exactly what a or b does
            got = builders.run(str(out), FEED)[0]
            assert sum(builders.lossless_close(w, got) for w in want.values()) == 1
            onnx.checker.check_model(str(out))
            assert _leftovers(tmp_path) == []
    finally:
        stop.set()
        t.join()
    assert not problems, problems[:3]
    assert seen  # the reader really looked while they wrote


_CHILD = textwrap.dedent("""
    import sys, time
    import onnxcompress.graph.io as gio
    import onnxcompress.passes.base as base
    from onnxcompress import cli

    phase = sys.argv[1]

    def pause():
        print("REACHED", flush=True)
        time.sleep(60)  # the parent signals us here

    if phase == "passes":
        real_run = base.Pipeline.run
        def run(self, *a, **k):
            pause()
            return real_run(self, *a, **k)
        base.Pipeline.run = run
    elif phase == "save-data":  # the data file is fully written to its temporary name, the model not yet
        real_stream = gio._stream_external
        def stream(*a, **k):
            real_stream(*a, **k)
            pause()
        gio._stream_external = stream
    elif phase == "save-model":  # the model is written to its temporary name, not yet renamed
        real_fsync = gio.os.fsync
        calls = []
        def fsync(fd):
            real_fsync(fd)
            calls.append(fd)
            if len(calls) == (2 if "--external-data" in sys.argv else 1):
                pause()
        gio.os.fsync = fsync
    sys.exit(cli.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", ["passes", "save-data", "save-model"])
def test_interrupt_leaves_no_partial_output(models, tmp_path, sig, phase):
    out = tmp_path / "out.onnx"
    (tmp_path / "child.py").write_text(_CHILD)
    before = models["a"].read_bytes()
    args = [sys.executable, str(tmp_path / "child.py"), phase, models["a"], out, "--no-verify", "-q"]
    if phase != "save-model" or sig == signal.SIGTERM:
        args.append("--external-data")
    p = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "REACHED", p.stderr.read()
        if phase != "passes":  # a temporary file is really there when the signal lands
            assert _leftovers(tmp_path), "the hook fired before anything was written"
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["child.py"]  # no output, no data, no temp file
    assert models["a"].read_bytes() == before


def test_interrupt_keeps_the_previous_output(models, tmp_path):
    """Re-running onto an existing output and interrupting it mid-save keeps the old file whole."""
    out = tmp_path / "out.onnx"
    r = subprocess.run(_cmd(models["b"], out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    old = out.read_bytes()
    (tmp_path / "child.py").write_text(_CHILD)
    p = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), "save-model", str(models["a"]), str(out),
                          "--no-verify", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "REACHED"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert out.read_bytes() == old
    assert _leftovers(tmp_path) == []


def test_signals_are_held_between_the_two_renames(tmp_path, monkeypatch):
    """The data file and the model are published together: a signal arriving between the two renames
    is handled only after both (so an interrupt never leaves a new data file beside an old model)."""
    from onnxcompress.graph import io as gio

    got = []
    real_replace = os.replace

    def replace(a, b):
        real_replace(a, b)
        if str(b).endswith(".data"):
            os.kill(os.getpid(), signal.SIGINT)  # arrives right between the two renames
            time.sleep(0.05)
            got.append("data renamed")

    monkeypatch.setattr(gio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        gio.save(builders.mlp(), tmp_path / "o.onnx", external_data=True)
    assert got == ["data renamed"]
    assert (tmp_path / "o.onnx").exists() and (tmp_path / "o.onnx.data").exists()  # both, not half
    assert _leftovers(tmp_path) == []
    builders.run(str(tmp_path / "o.onnx"), {"x": np.zeros((1, 16), np.float32)})
