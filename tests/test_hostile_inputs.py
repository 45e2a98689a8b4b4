"""Issue 20, "exit codes that lie", "unbounded work" and "signing gaps": the compiler layer tried as a
hostile user would. Each case is one row of a table, run through the CLI, and asserts:

- the exit code (2: the input is at fault; 1: a bundle failed verification);
- one error line on stderr (with at most a hint after it), and no traceback;
- every input byte-identical (sha256 before and after) and nothing left behind;
- for work that must be refused before it starts (a 1e308 s measurement, 10^12 samples, a 6 TB input),
  that it is refused at once.

The data-loss and stage-cache rows are in their own file (tests/test_hostile_compiler.py, from h-cache).
A SIGKILL test checks that no process of a killed `dlopt optimize` outlives it by 5 s.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from dlopt.cli import main
from test_safety import mlp_model


FACTORY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        {forward}
        return self.fc(x)

{module}
def build():
    {build}
    torch.manual_seed(0)
    return Net().eval(), {{"x": torch.randn(2, 8)}}
'''


def factory(build: str = "pass", forward: str = "pass", module: str = "") -> str:
    return FACTORY.format(build=build, forward=forward, module=module)


FACTORIES = {
    "exit0.py": factory(build="import sys; sys.exit(0)"),
    "exit3.py": factory(build="import sys; sys.exit(3)"),
    "exitnone.py": factory(build="raise SystemExit"),
    "base.py": factory(module="class Stop(BaseException):\n    pass\n", build="raise Stop('no model today')"),
    "exitimport.py": factory(module="import sys\nsys.exit(4)\n"),
    "exitforward.py": factory(forward="import sys; sys.exit(5)"),
    "evalexit.py": "import sys\n\ndef score(reference, outputs):\n    sys.exit(0)\n",
    "readexit.py": ("import sys\nimport numpy as np\n\ndef samples():\n    yield {'x': np.zeros((1, 16), np.float32)}\n"
                    "    sys.exit(3)\n"),
}


def onnx_recipe(*stage_lines: str, top: str = "") -> str:
    return f'source = "m.onnx"\ncalibration = "c.npz"\n{top}\n[[stage]]\n' + "\n".join(stage_lines) + "\n"


RECIPES = {
    "per_channel.toml": onnx_recipe('kind = "int8-dynamic"', "per_channel = \"false\""),
    "name5.toml": onnx_recipe('kind = "int8-dynamic"', top="name = 5"),
    "samples_text.toml": onnx_recipe('kind = "package"', 'target = "cpu"', 'samples = "2"'),
    "calibration3.toml": 'source = "m.onnx"\ncalibration = 3\n[[stage]]\nkind = "int8-static"\n',
    "stage_list.toml": 'source = "m.onnx"\nstage = [1, 2]\n',
    "kind5.toml": 'source = "m.onnx"\n[[stage]]\nkind = 5\n',
    "fp16_twice.toml": onnx_recipe('kind = "fp16"', '[[stage]]', 'kind = "fp16"'),
    "quantize_after_fp16.toml": onnx_recipe('kind = "quantize"', 'precision = "fp16"', '[[stage]]',
                                            'kind = "int8-dynamic"'),
    "toml_source.toml": 'source = "x.toml:build"\n[[stage]]\nkind = "export"\n',
    "measure_nan.toml": onnx_recipe('kind = "package"', 'target = "cpu"', "measure_s = nan"),
    "atol_inf.toml": onnx_recipe('kind = "package"', 'target = "cpu"', "atol = inf"),
    "block_float.toml": onnx_recipe('kind = "int4-weight-only"', "block_size = 32.5"),
    "exclude_text.toml": onnx_recipe('kind = "int8-dynamic"', 'exclude_nodes = "MatMul_1"'),
    "measure_huge.toml": onnx_recipe('kind = "package"', 'target = "cpu"', "measure_s = 1e308"),
    "samples_huge.toml": onnx_recipe('kind = "package"', 'target = "cpu"', "samples = 1000000000000"),
    "exit0.toml": 'source = "exit0.py:build"\n[[stage]]\nkind = "export"\n',
    "exit3.toml": 'source = "exit3.py:build"\n[[stage]]\nkind = "export"\n',
    "base.toml": 'source = "base.py:build"\n[[stage]]\nkind = "export"\n',
    "exitforward.toml": 'source = "exitforward.py:build"\n[[stage]]\nkind = "export"\n',
}


@pytest.fixture()
def work(tmp_path, monkeypatch):
    """A folder of inputs, as a user would have them; the CLI runs in it, its cache outside it."""
    root = tmp_path / "work"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("DLOPT_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("DLOPT_MAX_SAMPLES", "DLOPT_MAX_BATCH", "DLOPT_MAX_INPUT_BYTES", "DLOPT_MAX_MEASURE_S"):
        monkeypatch.delenv(name, raising=False)
    onnx.save_model(mlp_model(), "m.onnx")
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    np.savez("c.npz", x=x)
    for name, text in {**FACTORIES, **RECIPES}.items():
        Path(name).write_text(text)
    Path("x.toml").write_text("")
    Path("latin1.toml").write_bytes(onnx_recipe('kind = "int8-dynamic"').encode() + b"# caf\xe9\n")
    Path("deep.toml").write_text('source = "m.onnx"\nx = ' + "[" * 5000 + "]" * 5000 + "\n")
    return root


def snapshot(*roots: Path, files_only: bool = False) -> dict[str, str]:
    """Every file, folder and link under the roots (hidden ones too), with its content's sha256."""
    found = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            key = str(path)
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                if not files_only:
                    found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, code: int, message: str) -> None:
    """Exit `code`, one error line matching `message` (then at most a hint), no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "internal error"))]
    assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr
    assert re.search(message, errors[0]), errors[0]
    after = result.stderr.split(errors[0], 1)[1].strip().splitlines()
    assert len(after) <= 1 and all(line.startswith("hint:") for line in after), result.stderr


BIG = "9" * 400
RUN = ["run", "-o", "out.onnx"]

# (group, arguments, exit code, the message)
CASES = [
    # -- user code: what a factory raises or exits with is exit 2 naming the factory
    ("user code", ["run", "exit0.toml", "-o", "out.onnx"], 2, r"factory .*exit0.py:build called sys.exit\(0\)"),
    ("user code", ["run", "exit3.toml", "-o", "out.onnx"], 2, r"factory .*exit3.py:build called sys.exit\(3\)"),
    ("user code", ["run", "base.toml", "-o", "out.onnx"], 2,
     r"factory .*base.py:build raised Stop \(a BaseException\): no model today"),
    ("user code", ["run", "exitforward.toml", "-o", "out.onnx"], 2,
     r"the model of .*exitforward.py:build called sys.exit\(5\)"),
    ("user code", ["export", "exitnone.py:build", "-o", "e.onnx"], 2, r"exitnone.py:build called sys.exit\(None\)"),
    ("user code", ["eval", "m.onnx", "--data", "c.npz", "--reference", "m.onnx", "--evaluator", "evalexit.py:score"], 2,
     r"evaluator evalexit.py:score called sys.exit\(0\)"),
    ("user code", ["quantize", "m.onnx", "-o", "q.onnx", "--calibration", "readexit.py:samples"], 2,
     r"data reader \S*readexit.py:samples at item 1 called sys.exit\(3\)"),
    ("user code", ["export", "exitimport.py:build", "-o", "e.onnx"], 2,
     r"importing factory file exitimport.py called sys.exit\(4\)"),
    # -- recipes: checked against the stage configs' types before any work, naming the line
    ("recipe", ["run", "per_channel.toml", "-o", "out.onnx"], 2,
     r"per_channel.toml:6 \(stage 1, int8-dynamic\): Int8Dynamic.per_channel must be true or false, not 'false'"),
    ("recipe", ["run", "name5.toml", "-o", "out.onnx"], 2, r"name5.toml:3: name must be a non-empty string, not 5"),
    ("recipe", ["run", "samples_text.toml", "-o", "b"], 2,
     r"samples_text.toml:7 \(stage 1, package\): PackageConfig.samples must be an integer, not '2'"),
    ("recipe", ["run", "calibration3.toml", "-o", "out.onnx"], 2, r"calibration3.toml:2: calibration must be a"),
    ("recipe", ["run", "stage_list.toml", "-o", "out.onnx"], 2, r"stage_list.toml:2: stage 1 is 1, not a table"),
    ("recipe", ["run", "kind5.toml", "-o", "out.onnx"], 2, r"kind5.toml:3 \(stage 1\): unknown stage kind 5"),
    ("recipe", ["run", "fp16_twice.toml", "-o", "out.onnx"], 2,
     r"fp16_twice.toml:6 \(stage 2, fp16\): the stage before made an FP16 model"),
    ("recipe", ["run", "quantize_after_fp16.toml", "-o", "out.onnx"], 2, r"the stage before made an FP16 model"),
    ("recipe", ["run", "toml_source.toml", "-o", "out.onnx"], 2,
     r"toml_source.toml:1: source module 'x.toml' cannot be found"),
    ("recipe", ["run", "latin1.toml", "-o", "out.onnx"], 2, r"latin1.toml:6: not UTF-8 text \(byte 0xe9"),
    ("recipe", ["run", "deep.toml", "-o", "out.onnx"], 2, r"deep.toml: values nested too deeply"),
    ("recipe", ["run", "measure_nan.toml", "-o", "b"], 2, r"measure_nan.toml:7 .*measure_s must be a finite number"),
    ("recipe", ["run", "atol_inf.toml", "-o", "b"], 2, r"atol_inf.toml:7 .*atol must be a finite number, not inf"),
    ("recipe", ["run", "block_float.toml", "-o", "out.onnx"], 2, r"block_size must be an integer, not 32.5"),
    ("recipe", ["run", "exclude_text.toml", "-o", "out.onnx"], 2, r"exclude_nodes must be a list of strings"),
    # -- numeric options: NaN, infinity, out of range, 400 digits: exit 2 before any work
    ("numbers", ["package", "m.onnx", "-o", "b", "--atol", "nan"], 2, r"'--atol'.*finite number, not nan"),
    ("numbers", ["package", "m.onnx", "-o", "b", "--rtol", "-1"], 2, r"'--rtol'.*>= 0, not -1"),
    ("numbers", ["package", "m.onnx", "-o", "b", "--measure", "nan"], 2, r"'--measure'.*finite number"),
    ("numbers", ["package", "m.onnx", "-o", "b", "--samples", "0"], 2, r"'--samples'.*>= 1, not 0"),
    ("numbers", ["optimize", "m.onnx", "--max-accuracy-drop", "nan", "-o", "b"], 2, r"'--max-accuracy-drop'.*nan"),
    ("numbers", ["optimize", "m.onnx", "--max-accuracy-drop", "1", "--max-latency", "inf", "-o", "b"], 2,
     r"'--max-latency'.*finite number, not inf"),
    ("numbers", ["optimize", "m.onnx", "--max-accuracy-drop", "1", "--workers", "0", "-o", "b"], 2,
     r"'--workers'.*>= 1, not 0"),
    ("numbers", ["optimize", "m.onnx", "--max-accuracy-drop", "1", "--workers", "-1", "-o", "b"], 2,
     r"'--workers'.*>= 1, not -1"),
    ("numbers", ["optimize", "m.onnx", "--max-accuracy-drop", "1", "--time-budget", BIG, "-o", "b"], 2,
     r"duration 9+… is not a finite number"),
    ("numbers", ["bench", "m.onnx", "--batch", "1,,2"], 2, r"cannot read batch sizes from '1,,2'"),
    ("numbers", ["bench", "m.onnx", "--rounds", "nan"], 2, r"'--rounds'.*'nan' is not an integer"),
    ("numbers", ["bench", "m.onnx", "--budget", BIG], 2, r"duration 9+… is not a finite number"),
    ("numbers", ["cache", "prune", "--max-size", BIG], 2, r"size 9+… is too large"),
    ("numbers", ["cache", "prune", "--older-than", BIG + "d"], 2, r"age 9+… is too large"),
    ("numbers", ["quantize", "m.onnx", "-o", "q.onnx", "--holdout", "nan"], 2, r"'--holdout'.*finite"),
    ("numbers", ["quantize", "m.onnx", "-o", "q.onnx", "--percentile", "101"], 2, r"'--percentile'.*<= 100"),
    ("numbers", ["quantize", "m.onnx", "-o", "q.onnx", "--block-size", BIG + "x"], 2,
     r"'--block-size'.*is not an integer"),
    ("numbers", ["verify", "m.onnx", "--atol", "inf"], 2, r"'--atol'.*finite number, not inf"),
    ("numbers", ["gate", "--baseline", "m.onnx", "--candidate", "m.onnx", "--confidence", "nan"], 2,
     r"'--confidence'.*finite"),
    ("numbers", ["gate", "--baseline", "m.onnx", "--candidate", "m.onnx", "--max-accuracy-drop", "inf",
                 "--budget", "1s"], 2, r"--max-accuracy-drop DROP must be a finite number, not inf"),
    ("numbers", ["export", "exit0.py:build", "-o", "e.onnx", "--rtol", "nan"], 2, r"'--rtol'.*finite"),
    ("numbers", ["prune", "exit0.py:build", "-o", "p", "--ratio", "nan"], 2, r"'--ratio'.*finite"),
    ("numbers", ["distill", "--teacher", "exit0.py:build", "--student", "s.pt", "--data", "c.npz", "-o", "d",
                 "--lr", "0"], 2, r"'--lr'.*> 0, not 0"),
    # -- bounded resources: refused before anything is allocated or started, naming the limit to raise
    ("limits", ["run", "measure_huge.toml", "-o", "b"], 2, r"measure_s .*1e\+308 is above the limit of 3600 seconds"),
    ("limits", ["run", "samples_huge.toml", "-o", "b"], 2, r"samples 1000000000000 is above the limit of 100000"),
    ("limits", ["package", "m.onnx", "-o", "b", "--target", "cpu", "--measure", "1e308"], 2,
     r"measure_s .*1e\+308 is above the limit of 3600 seconds"),
    ("limits", ["package", "m.onnx", "-o", "b", "--target", "cpu", "--samples", "1000000000000"], 2,
     r"samples 1000000000000 is above the limit of 100000 samples"),
    ("limits", ["bench", "m.onnx", "--batch", "100000000"], 2, r"batch size 100000000 is above the limit of 65536"),
    ("limits", ["prune", "exit0.py:build", "-o", "p", "--bench-seconds", "1e308"], 2,
     r"bench_seconds 1e\+308 is above the limit of 3600 seconds"),
    ("limits", ["prune", "exit0.py:build", "-o", "p", "--batch", "100000000"], 2,
     r"batch 100000000 is above the limit of 65536"),
    ("limits", ["bench", "m.onnx", "--budget", "1000000000"], 2, r"the time budget 1e\+09 is above the limit of 3600"),
    ("limits", ["quantize", "m.onnx", "-o", "q.onnx", "--mode", "dynamic", "--input-shape", "x=99999999999x16"], 2,
     r"generated inputs of shape x=99999999999x16 would take 6.4 TB, above the limit"),
    ("limits", ["gate", "--baseline", "m.onnx", "--candidate", "m.onnx", "--batch", "100000000", "--budget", "1s"],
     2, r"batch size 100000000 is above the limit of 65536"),
    ("limits", ["gate", "--baseline", "m.onnx", "--candidate", "m.onnx", "--budget", "2000000s"], 2,
     r"the time budget 2e\+06 is above the limit of 3600 seconds"),
    ("limits", ["optimize", "m.onnx", "--max-accuracy-drop", "1", "--time-budget", "100000m", "-o", "b"], 2,
     r"the time budget 6e\+06 is above the limit of 604800 seconds"),
]


@pytest.mark.parametrize("group, args, code, message", CASES,
                         ids=[f"{g}: {' '.join(a[:4])}" for g, a, _, _ in CASES])
def test_hostile_input_is_one_line_exit_2_and_leaves_everything_as_it_was(work, group, args, code, message):
    before, cache_before = snapshot(work), snapshot(work.parent / "cache", files_only=True)
    started = time.perf_counter()
    result = run(args)
    assert_refused(result, code, message)
    assert snapshot(work) == before  # inputs byte-identical, no output, no temp file, no __pycache__
    cache_after = {k: v for k, v in snapshot(work.parent / "cache", files_only=True).items() if "/.locks/" not in k}
    assert cache_after == cache_before  # no entry, no staging left (the cache's empty lock files are its own)
    if group in ("numbers", "limits"):  # refused before the work, not after it (a 1e308 s measurement hangs)
        assert time.perf_counter() - started < 30


def test_a_limit_is_raised_by_its_environment_variable(work, monkeypatch):
    monkeypatch.setenv("DLOPT_MAX_BATCH", "8")
    assert_refused(run(["bench", "m.onnx", "--batch", "16"]), 2, r"batch size 16 is above the limit of 8 .*")
    monkeypatch.setenv("DLOPT_MAX_BATCH", "nan")
    assert_refused(run(["bench", "m.onnx", "--batch", "16"]), 2, r"\$DLOPT_MAX_BATCH='nan' is not a positive number")


def test_a_well_typed_recipe_still_runs(work):
    """The strict types refuse only what is wrong: bools, ints, floats (ints where floats belong), strings."""
    Path("ok.toml").write_text(onnx_recipe('kind = "int8-dynamic"', "per_channel = false",
                                           '[[stage]]', 'kind = "package"', 'target = "cpu"', "measure_s = 0",
                                           "atol = 1", "samples = 2"))
    result = run(["run", "ok.toml", "-o", "ok.bundle"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((work / "ok.bundle" / "manifest.json").read_text())
    config = manifest["lineage"][0]["config"]["fields"]
    assert config["per_channel"] is False
    assert run(["verify", "ok.bundle"]).exit_code == 0


def _api(call: str):
    import dlopt.api as api

    return {
        "package atol nan": lambda: api.package_model("m.onnx", "b", api.PackageConfig(target="cpu", atol=math.nan)),
        "package samples text": lambda: api.package_model("m.onnx", "b", api.PackageConfig(target="cpu", samples="2")),
        "package measure 1e308": lambda: api.package_model("m.onnx", "b", api.PackageConfig(target="cpu",
                                                                                            measure_s=1e308)),
        "quantize holdout inf": lambda: api.quantize_model("m.onnx", "q.onnx", api.QuantizeConfig(holdout=math.inf),
                                                           "c.npz"),
        "optimize workers 0": lambda: api.optimize_model("m.onnx", "b", api.OptimizeConfig(max_accuracy_drop=1,
                                                                                           calibration="c.npz"),
                                                         workers=0),
        "optimize drop nan": lambda: api.optimize_model("m.onnx", "b", api.OptimizeConfig(max_accuracy_drop=math.nan,
                                                                                          calibration="c.npz")),
        "bench batch 1e8": lambda: api.bench(["m.onnx"], api.BenchConfig(batch_sizes=(100_000_000,))),
    }[call]


API = [
    ("package atol nan", r"atol must be a finite number, not nan"),
    ("package samples text", r"samples must be an integer, not '2'"),
    ("package measure 1e308", r"measure_s .*1e\+308 is above the limit of 3600 seconds"),
    ("quantize holdout inf", r"holdout must be a finite number, not inf"),
    ("optimize workers 0", r"workers=N must be >= 1, not 0"),
    ("optimize drop nan", r"max_accuracy_drop=DROP must be a finite number, not nan"),
    ("bench batch 1e8", r"batch size 100000000 is above the limit of 65536"),
]


@pytest.mark.parametrize("call, message", API, ids=[c for c, _ in API])
def test_the_api_holds_numbers_to_the_same_rules(work, call, message):
    from dlopt.errors import InputError

    before = snapshot(work)
    with pytest.raises(InputError, match=message):
        _api(call)()
    assert snapshot(work) == before


def test_a_stray_exit_from_library_code_is_one_line_not_its_exit_code(work, monkeypatch, tmp_path):
    """dlopt never exits from library code; a SystemExit that still reaches the CLI (a dependency's) is a bug:
    one line, exit 1, the traceback saved, never the exit code it carried (3 would read as gate's verdict)."""
    import tempfile

    import dlopt.api

    def exits(*args, **kwargs):
        raise SystemExit(3)

    monkeypatch.setattr(dlopt.api, "bench", exits)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run(["bench", "m.onnx", "--rounds", "3"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[0] == "internal error in bench: SystemExit: 3"


# -- a full disk -------------------------------------------------------------------------------------------

def test_package_on_a_full_disk_is_exit_2_and_leaves_nothing(work, monkeypatch):
    import dlopt.package

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(dlopt.package, "write_samples", full)
    before = snapshot(work)
    result = run(["package", "m.onnx", "-o", "b", "--target", "cpu", "--measure", "0"])
    assert_refused(result, 2, rf"no space left on the device holding {re.escape(str(work))} ")
    assert snapshot(work) == before


# -- signing -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A signed cpu bundle of the MLP, its key pair, and an identical copy of the bundle elsewhere."""
    root = tmp_path_factory.mktemp("signed")
    onnx.save_model(mlp_model(), root / "m.onnx")
    keys = root / "keys"
    keys.mkdir()
    assert run(["keygen", "-o", keys]).exit_code == 0
    private, public = keys / "dlopt-signing.key", keys / "dlopt-signing.pub"
    result = run(["package", root / "m.onnx", "-o", root / "b", "--target", "cpu", "--measure", "0",
                  "--sign-key", private])
    assert result.exit_code == 0, result.output
    shutil.copytree(root / "b", root / "other.bundle")
    return {"root": root, "bundle": root / "b", "other": root / "other.bundle", "private": private, "public": public}


def _link(bundle: Path, other: Path, name: str) -> None:
    """Replace bundle/name with a symlink to the same bytes outside the bundle (every hash still matches)."""
    (bundle / name).unlink()
    os.symlink(other / name, bundle / name)


def _outside_model_path(bundle: Path, other: Path, name: str) -> None:
    """The manifest's model path leaves the bundle (its file list is left as it was)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model"]["file"] = f"../{other.name}/{manifest['model']['file']}"
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


SIGNING = [
    # (how the bundle is changed, with the trusted key?, the message)
    (lambda b, o: _link(b, o, "model.onnx"), True, r"model.onnx: changed \(model.onnx is a symlink"),
    (lambda b, o: _link(b, o, "model.onnx"), False, r"model.onnx: changed \(model.onnx is a symlink"),
    (lambda b, o: _link(b, o, "manifest.json"), True, r"manifest.json is a symlink"),
    (lambda b, o: _link(b, o, "manifest.json"), False, r"manifest.json is a symlink"),
    (lambda b, o: _link(b, o, "manifest.sig"), True, r"signature: manifest.sig is a symlink"),
    (lambda b, o: _link(b, o, "manifest.sig"), False, r"manifest.sig: changed \(a symlink"),
    (lambda b, o: _outside_model_path(b, o, "model.onnx"), False, r"\.\./other.bundle/model.onnx: changed \(path "
                                                                  r"leaves the bundle"),
    (lambda b, o: _outside_model_path(b, o, "model.onnx"), True, r"signature: the signature does not match"),
]


@pytest.mark.parametrize("change, with_key, message", SIGNING,
                         ids=[f"{m[:30]} key={k}" for _, k, m in SIGNING])
def test_verify_refuses_symlinks_and_paths_outside_the_bundle(signed, tmp_path, change, with_key, message):
    bundle = tmp_path / "b"
    shutil.copytree(signed["bundle"], bundle, symlinks=True)
    change(bundle, signed["other"])
    before = snapshot(tmp_path, signed["other"])
    result = run(["verify", bundle, *(["--trusted-key", signed["public"]] if with_key else [])])
    assert_refused(result, 1, message)
    assert snapshot(tmp_path, signed["other"]) == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_private_key_others_can_read_is_refused_with_the_chmod(signed, tmp_path, mode):
    key = tmp_path / "k.key"
    shutil.copyfile(signed["private"], key)
    key.chmod(mode)
    before = snapshot(tmp_path)
    result = run(["package", signed["root"] / "m.onnx", "-o", tmp_path / "b", "--target", "cpu", "--measure", "0",
                  "--sign-key", key])
    assert_refused(result, 2, rf"signing key .*k.key is readable by others \(mode 0{mode:o}\)")
    assert f"hint: chmod 600 {key}" in result.stderr
    assert snapshot(tmp_path) == before


def test_a_private_key_of_mode_0400_signs(signed, tmp_path):
    key = tmp_path / "k.key"
    shutil.copyfile(signed["private"], key)
    key.chmod(0o400)
    result = run(["package", signed["root"] / "m.onnx", "-o", tmp_path / "b", "--target", "cpu", "--measure", "0",
                  "--sign-key", key])
    assert result.exit_code == 0, result.output
    assert run(["verify", tmp_path / "b", "--trusted-key", signed["public"]]).exit_code == 0


# -- time budgets and workers ------------------------------------------------------------------------------

def test_a_search_past_its_time_budget_says_why():
    from dlopt.search.html_report import overrun_text

    result = {"seconds": 12.1, "time_budget_s": 1.0,
              "phases_s": {"source_s": 0.3, "evaluate_s": 0.5, "latency_s": 10.0, "throughput_s": 0.0, "bundle_s": 1.3}}
    text = overrun_text(result)
    assert text.startswith("time budget: overran, 12.1 s of 1 s") and "10.0 s for timing the candidates" in text
    assert "a budget of 17 s or more" in text and "-" not in text.split("of 1 s")[0]
    assert overrun_text(result | {"seconds": 1.09}) is None  # within 10 %


def _session_members(session: int) -> list[int]:
    """Live (not zombie) processes of a session, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc: Linux")
def test_sigkill_of_optimize_leaves_no_process_of_the_run(work, tmp_path):
    """`dlopt optimize` with two pool workers, killed by SIGKILL once its pool is up: 5 s later no process of
    its session (workers, the resource tracker) is alive."""
    env = dict(os.environ, DLOPT_CACHE_DIR=str(tmp_path / "kill-cache"))
    run_ = subprocess.Popen([sys.executable, "-m", "dlopt", "optimize", "m.onnx", "--calibration", "c.npz",
                             "--max-accuracy-drop", "1", "-o", "k.bundle", "--workers", "2", "--time-budget", "2m"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 90
        while len(_session_members(run_.pid)) < 4 and time.monotonic() < deadline and run_.poll() is None:
            time.sleep(0.1)  # the parent, two workers and the resource tracker
        members = _session_members(run_.pid)
        assert len(members) >= 4, f"the pool never started: {members}"
        os.kill(run_.pid, signal.SIGKILL)
        run_.wait()
        time.sleep(5)
        assert _session_members(run_.pid) == []
    finally:
        for pid in _session_members(run_.pid):
            os.kill(pid, signal.SIGKILL)
