"""Never lose a user's file, never a traceback (issue 13): every verb refuses an output that is, contains
or lies inside one of its inputs before writing anything; bad input is one line and exit 2 with
nothing left behind; an unexpected error is one line and a saved traceback; a checkpoint imports
only the source file it was saved with."""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.cli import main
from dlopt.errors import InputError

FACTORY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.body(x))

def build():
    torch.manual_seed(0)
    return Net().eval(), {"x": torch.randn(2, 8)}
'''


def mlp_model() -> onnx.ModelProto:
    """x[batch, 16] -> MatMul -> Relu -> MatMul -> y[batch, 4], seeded weights."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def unknown_op_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("FooBar", ["x"], ["y"])], "unknown",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture()
def work(tmp_path, monkeypatch):
    """A folder of inputs, as a user would have it; the tests run in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    onnx.save_model(mlp_model(), "m.onnx")
    onnx.save_model(mlp_model(), "m2.onnx")
    onnx.save_model(mlp_model(), "ext.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    onnx.save_model(mlp_model(), "m.quantize.json")  # a model under an odd name: quantize's report path
    onnx.save_model(mlp_model(), "gone.onnx", save_as_external_data=True, location="gone.bin", size_threshold=0)
    os.remove("gone.bin")
    onnx.save_model(unknown_op_model(), "unknown.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    np.savez("data.npz", x=x, labels=x[:, :4].argmax(1))
    nan = x.copy()
    nan[0, 0] = np.nan
    np.savez("nan.npz", x=nan, labels=x[:, :4].argmax(1))
    calibration = x.copy()
    calibration[3, 5] = np.inf
    np.savez("calibration_inf.npz", x=calibration)
    np.savez("empty.npz", x=np.zeros((0, 16), np.float32))
    np.savez("badlabels.npz", x=x, labels=np.array([0, 1, 2, 3, 9, 1, 2, -1]))
    Path("net.py").write_text(FACTORY)
    tx = rng.standard_normal((64, 8)).astype(np.float32)
    np.savez("train.npz", x=tx, labels=tx[:, :4].argmax(1))
    tx[5, 1] = np.inf
    np.savez("train_nan.npz", x=tx, labels=np.zeros(64, np.int64))
    Path("a-file").write_text("a regular file, not a folder")
    os.makedirs("out/pk")
    onnx.save_model(mlp_model(), "out/pk/m.onnx")
    os.makedirs("mine")
    Path("mine/notes.txt").write_text("the user's own files")
    os.symlink("m.onnx", "link.onnx")
    _checkpoint(tmp_path / "ckpt", "net.py:build")
    return tmp_path


def _checkpoint(folder: Path, spec: str) -> Path:
    """A checkpoint of the factory's (unpruned) model, written as `dlopt prune` writes them."""
    from dlopt.sources import load_source
    from dlopt.checkpoint import save_checkpoint

    folder.mkdir(exist_ok=True)
    source = load_source(spec)
    return save_checkpoint(folder / "pruned.pt", source.module, spec, {"pruning_history": [], "module_attributes": {}})


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root (hidden ones too) with its content's sha256."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run(args, env=None):
    return CliRunner().invoke(main, args, env=env)


# -- 1. inputs are sacred -------------------------------------------------------------------------------

DISTILL = ["distill", "--teacher", "net.py:build", "--student", "ckpt/pruned.pt", "--data", "train.npz", "--no-bench"]

GUARDED = [
    # (arguments, the message)
    (["quantize", "ext.onnx", "-o", "weights.bin", "--mode", "dynamic"], "weights.bin is the input .*weights.bin"),
    (["quantize", "m.onnx", "-o", "m.onnx", "--mode", "dynamic"], "output m.onnx is the input"),
    (["quantize", "m.onnx", "-o", "out/../m.onnx", "--mode", "dynamic"], "is the input .*m.onnx"),
    (["quantize", "m.onnx", "-o", "link.onnx", "--mode", "dynamic"], "output link.onnx is the input .*m.onnx"),
    (["quantize", "m.quantize.json", "-o", "m.onnx", "--mode", "dynamic"], "output m.quantize.json is the input"),
    (["quantize", "m.onnx", "-o", "q.onnx", "--calibration", "q.quantize.json"], "q.quantize.json is the input"),
    (["export", "net.py:build", "-o", "net.py"], "output net.py is the input"),
    (["bench", "m.onnx", "--rounds", "3", "--json", "m.onnx"], "output m.onnx is the input"),
    (["bench", "m.onnx", "--rounds", "3", "--json", "weights.bin", "ext.onnx"], "weights.bin is the input"),
    (["bench", "m.onnx", "--rounds", "3", "--save-baseline", "m.onnx"], "output m.onnx is the input"),
    (["bench", "m.onnx", "--data", "data.npz", "--rounds", "3", "--json", "data.npz"], "data.npz is the input"),
    (["eval", "m.onnx", "--data", "data.npz", "--json", "m.onnx"], "output m.onnx is the input"),
    (["eval", "m.onnx", "--data", "data.npz", "--json", "data.npz"], "output data.npz is the input"),
    (["eval", "m.onnx", "--data", "data.npz", "--reference", "m2.onnx", "--json", "m2.onnx"], "m2.onnx is the input"),
    (["gate", "--baseline", "m.onnx", "--candidate", "m2.onnx", "--json", "m.onnx"], "output m.onnx is the input"),
    (["gate", "--baseline", "m.onnx", "--candidate", "m2.onnx", "--junit", "m2.onnx"], "output m2.onnx is the input"),
    (["gate", "--baseline", "m.onnx", "--candidate", "m2.onnx", "--summary", "m2.onnx"], "output m2.onnx is the input"),
    (["package", "m.onnx", "-o", "."], "output . contains the input .*m.onnx"),
    (["package", "out/pk/m.onnx", "-o", "out/pk", "--overwrite"], "output out/pk contains the input"),
    (["package", "out/pk/m.onnx", "-o", "out", "--overwrite"], "output out contains the input"),
    (["package", "m.onnx", "-o", "mine", "--overwrite"], "mine is not a dlopt bundle"),
    (["package", "m.onnx", "-o", "data.npz/b", "--data", "data.npz"], "lies inside the input .*data.npz"),
    (["prune", "net.py:build", "-o", ".", "--no-bench"], "output . contains the input .*net.py"),
    (["prune", "net.py:build", "-o", "net.py/sub", "--no-bench"], "output net.py/sub lies inside the input .*net.py"),
    (DISTILL + ["-o", "ckpt"], "output ckpt contains the input .*pruned.pt"),
    (DISTILL + ["-o", "."], "output . contains the input"),
]


@pytest.mark.parametrize("args, message", GUARDED, ids=[" ".join(a[:1] + a[-2:]) for a, _ in GUARDED])
def test_no_verb_writes_over_its_inputs(work, args, message):
    before = snapshot(work)
    result = run(args)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 2  # error + hint
    assert snapshot(work) == before  # inputs unchanged, nothing written, nothing left behind


def test_gate_refuses_a_step_summary_that_is_an_input(work):
    before = snapshot(work)
    result = run(["gate", "--baseline", "m.onnx", "--candidate", "m2.onnx"],
                 env={"GITHUB_STEP_SUMMARY": str(work / "m2.onnx")})
    assert result.exit_code == 2 and "is the input" in result.output, result.output
    assert snapshot(work) == before


def test_hard_links_count_as_the_input(tmp_path):
    from dlopt.fileio import guard_outputs

    (tmp_path / "m.onnx").write_bytes(b"model")
    os.link(tmp_path / "m.onnx", tmp_path / "same.onnx")
    with pytest.raises(InputError, match="is the input"):
        guard_outputs([tmp_path / "m.onnx"], [tmp_path / "same.onnx"])
    guard_outputs([tmp_path / "m.onnx"], [tmp_path / "other.onnx", None])  # no overlap: no error


def test_package_overwrite_replaces_only_a_bundle(work):
    first = run(["package", "m.onnx", "-o", "bundle", "--measure", "0"])
    assert first.exit_code == 0, first.output
    (work / "bundle" / "README.md").write_text("edited")
    again = run(["package", "m.onnx", "-o", "bundle", "--measure", "0", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert (work / "bundle" / "README.md").read_text() != "edited"
    (work / "bundle" / "manifest.json").write_text('{"schema": "not dlopt"}')
    refused = run(["package", "m.onnx", "-o", "bundle", "--measure", "0", "--overwrite"])
    assert refused.exit_code == 2 and "not a dlopt bundle" in refused.output, refused.output


# -- 3. item 7: each case one line and exit 2 (or 1), nothing left behind ---------------------------------

def _negative_batch_baseline(work: Path) -> None:
    result = run(["bench", "m.onnx", "--rounds", "5", "--save-baseline", "base.json", "--no-progress"])
    assert result.exit_code == 0, result.output
    document = json.loads((work / "base.json").read_text())
    document["batches"][0]["batch"] = -4
    (work / "base.json").write_text(json.dumps(document))


BAD_INPUT = [
    # (arguments, exit code, the message, set-up)
    (["quantize", "m.onnx", "-o", "q.onnx", "--mode", "static", "--calibration", "calibration_inf.npz"], 2,
     r"data calibration_inf.npz \(sample 3\): input 'x' holds 1 NaN or infinite", None),
    (["eval", "m.onnx", "--data", "empty.npz"], 2, "data empty.npz holds no samples", None),
    (["gate", "--baseline", "m.onnx", "--candidate", "m2.onnx", "--eval-data", "empty.npz", "--max-accuracy-drop",
      "0.01", "--budget", "1s", "--no-progress"], 2, "data empty.npz holds no samples", None),
    (["prune", "net.py:build", "-o", "a-file/out", "--no-bench"], 2, "a-file, is not a folder", None),
    (DISTILL + ["-o", "a-file/out"], 2, "a-file, is not a folder", None),
    (["quantize", "m.onnx", "-o", "q.onnx", "--mode", "dynamic"], 2, "output path q.quantize.json is a directory",
     lambda work: (work / "q.quantize.json").mkdir()),
    (["gate", "--baseline", "base.json", "--candidate", "m2.onnx", "--budget", "1s", "--no-progress"], 2,
     "base.json is not a dlopt baseline: batch -4: the batch size .* must be positive", _negative_batch_baseline),
    (["quantize", "unknown.onnx", "-o", "q.onnx", "--mode", "dynamic"], 2, "does not define: FooBar", None),
    (["package", "unknown.onnx", "-o", "b", "--measure", "0"], 2, "does not define: FooBar", None),
    (["quantize", "gone.onnx", "-o", "q.onnx", "--mode", "dynamic"], 2, "external data file gone.bin is missing", None),
    (["package", "gone.onnx", "-o", "b", "--measure", "0"], 2, "external data file gone.bin is missing", None),
    (["prune", "net.py:build", "--ratio", "1.5", "-o", "new", "--no-bench"], 2, "ratio 1.5 is out of range", None),
    (["prune", "net.py:nothing", "-o", "new", "--no-bench"], 2, "has no attribute 'nothing'", None),
    (["distill", "--teacher", "net.py:build", "--student", "ckpt/pruned.pt", "--data", "train_nan.npz", "-o", "new",
      "--no-bench", "--no-progress"], 2, r"train_nan.npz: input 'x' holds 1 NaN or infinite value", None),
]


@pytest.mark.parametrize("args, code, message, setup", BAD_INPUT, ids=[" ".join(a[:3]) for a, *_ in BAD_INPUT])
def test_bad_input_is_one_line_and_leaves_nothing(work, args, code, message, setup):
    if setup is not None:
        setup(work)
    before = snapshot(work)
    result = run(args)
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith(("error:", "internal error"))]
    assert len(errors) == 1 and re.search(message, errors[0]), result.output
    assert "Traceback" not in result.output
    assert snapshot(work) == before  # no output folder, no temp file, inputs unchanged


@pytest.mark.parametrize("data, warning", [
    ("nan.npz", "nan.npz: input 'x' holds 1 NaN or infinite value"),
    ("badlabels.npz", r"badlabels.npz: 2 label\(s\) are not a class index in \[0, 4\)"),
])
def test_eval_warns_about_doubtful_data(work, data, warning):
    result = run(["eval", "m.onnx", "--data", data, "--json", "e.json"])
    assert result.exit_code == 0, result.output
    assert re.search("warning: " + warning, result.output), result.output
    assert any(re.search(warning, w) for w in json.loads((work / "e.json").read_text())["warnings"])


# -- 4. one top-level handler ------------------------------------------------------------------------------

def test_an_unexpected_error_is_one_line_and_a_saved_traceback(work, monkeypatch):
    import tempfile

    import dlopt.evaluate

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(dlopt.evaluate, "evaluate_data", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(work / "logs"))
    (work / "logs").mkdir()
    result = run(["eval", "m.onnx", "--data", "data.npz"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "internal error in eval: ZeroDivisionError: division by zero"
    log = Path(re.search(r"the full traceback is in (\S+)", lines[1]).group(1))
    assert log.parent == work / "logs" and "Traceback" in log.read_text() and "broken" in log.read_text()
    debug = run(["--debug", "eval", "m.onnx", "--data", "data.npz"])
    assert debug.exit_code == 1 and "Traceback" in debug.output and "internal error in eval" in debug.output


# -- 5. checkpoints import only the source they were saved with -------------------------------------------

def test_checkpoint_records_an_absolute_source_and_its_hash(work):
    from dlopt.manifest import sha256_file
    from dlopt.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(work / "ckpt" / "pruned.pt")  # saved with the relative spec net.py:build
    assert checkpoint.source == f"{work.resolve() / 'net.py'}:build"
    assert checkpoint.source_sha256 == sha256_file(work / "net.py")


def _distill(work: Path, *extra: str):
    return run(["distill", "--teacher", str(work / "teacher.py") + ":build", "--student", "ckpt/pruned.pt",
                "--data", "train.npz", "-o", "d", "--epochs", "1", "--no-bench", "--no-progress", *extra])


@pytest.mark.parametrize("change, message", [
    (lambda work: (work / "net.py").write_text(FACTORY + "\nMARKER = 1\n"), "net.py changed since the checkpoint"),
    (lambda work: (work / "net.py").unlink(), "net.py does not exist"),
])
def test_distill_refuses_a_changed_or_missing_source(work, change, message):
    (work / "teacher.py").write_text(FACTORY)
    change(work)
    before = snapshot(work)
    result = _distill(work)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output) and "--student-source" in result.output, result.output
    assert snapshot(work) == before
    named = _distill(work, "--student-source", "teacher.py:build")  # the user names the source: used
    assert named.exit_code == 0, named.output
    assert (work / "d" / "distilled.onnx").is_file()


def test_distill_never_imports_an_unhashed_source(work):
    import torch

    from dlopt.checkpoint import CHECKPOINT_FORMAT

    (work / "teacher.py").write_text(FACTORY)
    (work / "evil.py").write_text("open('IMPORTED', 'w').write('ran')\n" + FACTORY)
    payload = torch.load(work / "ckpt" / "pruned.pt", weights_only=True)
    assert payload["format"] == CHECKPOINT_FORMAT
    payload["source"] = f"{work / 'evil.py'}:build"  # a weights-only checkpoint naming another file
    del payload["source_sha256"]
    torch.save(payload, work / "ckpt" / "pruned.pt")
    result = _distill(work)
    assert result.exit_code == 2 and "records no sha256" in result.output, result.output
    payload["source_sha256"] = "0" * 64
    torch.save(payload, work / "ckpt" / "pruned.pt")
    result = _distill(work)
    assert result.exit_code == 2 and "evil.py changed since" in result.output, result.output
    assert not (work / "IMPORTED").exists() and not (work / "d").exists()
