"""Fault injection (issue 13): `dlopt quantize` and `dlopt package` in a subprocess get SIGINT, SIGTERM or
SIGKILL at chosen points: while working, with a temp file half-way, and between the renames that put
the outputs in place. Afterwards no half-written file is visible, a model never sits beside a stale
report, the message says what was written, and the next run removes what a killed one left."""

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from test_safety import mlp_model

# Runs the CLI after patching one point to send the process a signal (the hook lives here, not in dlopt).
DRIVER = r'''
import os, signal, sys

signum, point, args = getattr(signal, sys.argv[1]), sys.argv[2], sys.argv[3:]
fire = lambda: os.kill(os.getpid(), signum)

if point == "work":  # quantize: while the model is being quantized; nothing staged yet
    import dlopt.optimize.quantize.stages as q  # the quantize stages' run calls quantize from here
    real_quantize = q.quantize
    def quantize(*a, **k):
        fire()
        return real_quantize(*a, **k)
    q.quantize = quantize
elif point == "staged":  # quantize: the model's temp file is written, the report's not yet
    from dlopt import fileio
    real_stage = fileio.StagedOutputs.stage
    def stage(self, path):
        if self.main is not None:
            fire()
        return real_stage(self, path)
    fileio.StagedOutputs.stage = stage
elif point == "commit":  # quantize: between renaming the model and renaming its report into place
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if os.path.basename(dst) == "q.onnx":
            fire()
    os.replace = replace
elif point == "build":  # package: the bundle is half-built in its staging folder
    import dlopt.package as p
    real_verify = p.verify_outputs
    def verify_outputs(*a, **k):
        fire()
        return real_verify(*a, **k)
    p.verify_outputs = verify_outputs
elif point == "swap":  # package: the old bundle is moved aside, the new one not yet renamed into place
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in os.path.basename(dst):
            fire()
    os.rename = rename

from dlopt.cli import main
main(args, prog_name="dlopt")
'''

EXIT = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -signal.SIGKILL}


def dlopt(folder: Path, *args: str, signal_name: str | None = None, point: str | None = None):
    command = [sys.executable, "-c", DRIVER, signal_name or "SIGINT", point or "none", *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A folder with m.onnx and an earlier fp16 result (q.onnx + q.quantize.json, kept as old.*), and
    the sha256 of what a completed dynamic int8 run writes (the faulted runs write that over q.onnx)."""
    folder = tmp_path_factory.mktemp("quantize")
    onnx.save_model(mlp_model(), str(folder / "m.onnx"))
    for args in (("-o", "ref.onnx", "--mode", "dynamic"), ("-o", "old.onnx", "--precision", "fp16")):
        done = dlopt(folder, "quantize", "m.onnx", *args)
        assert done.returncode == 0, done.stderr
    return folder, sha(folder / "ref.onnx")


def _fresh_old_result(folder: Path) -> tuple[str, str]:
    (folder / "q.onnx").write_bytes((folder / "old.onnx").read_bytes())
    report = json.loads((folder / "old.quantize.json").read_text()) | {"output": "q.onnx"}
    (folder / "q.quantize.json").write_text(json.dumps(report))
    return sha(folder / "q.onnx"), sha(folder / "q.quantize.json")


def _consistent(folder: Path, new_sha: str) -> None:
    """q.onnx and q.quantize.json belong together: a report only ever describes the model beside it."""
    model = folder / "q.onnx"
    report_path = folder / "q.quantize.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        assert report["bytes_written"] == model.stat().st_size
        assert (report.get("precision") == "fp16") == (sha(model) != new_sha)


@pytest.mark.parametrize("point", ["work", "staged", "commit"])
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_quantize_interrupted(quantized, point, signal_name):
    folder, new_sha = quantized
    old_model, old_report = _fresh_old_result(folder)
    run = dlopt(folder, "quantize", "m.onnx", "-o", "q.onnx", "--mode", "dynamic", signal_name=signal_name,
                point=point)
    assert run.returncode == EXIT[signal_name], run.stderr
    assert "Traceback" not in run.stderr
    _consistent(folder, new_sha)
    if point == "commit":  # the renames finish before the interrupt is taken; SIGKILL cannot wait
        assert sha(folder / "q.onnx") == new_sha
        if signal_name == "SIGKILL":
            assert not (folder / "q.quantize.json").exists()  # removed before the model was replaced
        else:
            assert "wrote only q.onnx, q.quantize.json" in run.stderr
            assert json.loads((folder / "q.quantize.json").read_text())["recipe"]["mode"] == "dynamic"
    else:
        assert (sha(folder / "q.onnx"), sha(folder / "q.quantize.json")) == (old_model, old_report)
        if signal_name != "SIGKILL":
            assert f"interrupted{' (SIGTERM)' if signal_name == 'SIGTERM' else ''}: nothing was written" in run.stderr
    if signal_name != "SIGKILL" or point == "work":
        assert hidden(folder) == []
    elif point == "staged":
        left, = hidden(folder)  # the model's complete temp file, under a hidden name only
        assert left.startswith(".q.onnx.") and left.endswith(".tmp")
    if signal_name != "SIGKILL":
        return
    again = dlopt(folder, "quantize", "m.onnx", "-o", "q.onnx", "--mode", "dynamic")
    assert again.returncode == 0, again.stderr
    assert hidden(folder) == []  # the killed run's temp files are gone
    assert sha(folder / "q.onnx") == new_sha
    _consistent(folder, new_sha)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("package")
    onnx.save_model(mlp_model(), str(folder / "m.onnx"))
    return folder


def _verify(folder: Path) -> None:
    from dlopt.verify import verify_bundle

    assert verify_bundle(folder / "bundle").passed


@pytest.mark.parametrize("point", ["build", "swap"])
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_package_interrupted(packaged, point, signal_name):
    folder = packaged
    args = ("package", "m.onnx", "-o", "bundle", "--measure", "0", "--no-coverage", "--overwrite", "--name", "new")
    if not (folder / "bundle").exists():
        first = dlopt(folder, *args)
        assert first.returncode == 0, first.stderr
    manifest = json.loads((folder / "bundle" / "manifest.json").read_text())
    manifest_name = manifest["name"]
    run = dlopt(folder, *args, signal_name=signal_name, point=point)
    assert run.returncode == EXIT[signal_name], run.stderr
    assert "Traceback" not in run.stderr
    if signal_name == "SIGKILL":
        if point == "build":
            assert (folder / "bundle" / "manifest.json").is_file()
            left, = hidden(folder)
            assert left.startswith(".bundle.building-")
        else:  # killed between the two renames: the old bundle waits under a hidden name
            assert not (folder / "bundle").exists()
            building, old = hidden(folder)  # and the new bundle, complete, in its staging folder
            assert building.startswith(".bundle.building-") and old.startswith(".bundle.old-")
    else:
        assert hidden(folder) == []
        _verify(folder)
        if point == "build":
            assert "nothing was written" in run.stderr
            assert json.loads((folder / "bundle" / "manifest.json").read_text()) == manifest
        else:
            assert "wrote only bundle" in run.stderr
            assert json.loads((folder / "bundle" / "manifest.json").read_text())["created"] != manifest["created"]
        return
    again = dlopt(folder, *args)
    assert again.returncode == 0, again.stderr
    assert hidden(folder) == []
    assert json.loads((folder / "bundle" / "manifest.json").read_text())["name"] == manifest_name
    _verify(folder)


def test_a_killed_package_run_gives_the_old_bundle_back(packaged):
    """Killed between moving the old bundle aside and renaming the new one in: the next run for the
    same output puts the old one back before anything else (here: it refuses, and the bundle is there)."""
    folder = packaged
    args = ("package", "m.onnx", "-o", "bundle", "--measure", "0", "--overwrite")
    if not (folder / "bundle").exists():
        assert dlopt(folder, *args).returncode == 0
    before = sha(folder / "bundle" / "manifest.json")
    killed = dlopt(folder, *args, signal_name="SIGKILL", point="swap")
    assert killed.returncode == -signal.SIGKILL and not (folder / "bundle").exists()
    refused = dlopt(folder, "package", "m.onnx", "-o", "bundle", "--measure", "0")  # no --overwrite
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr, refused.stderr
    assert sha(folder / "bundle" / "manifest.json") == before and hidden(folder) == []
    _verify(folder)
