"""The command surface: version, verbs listed with one line each, files that are not models."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import dlopt
from dlopt.cli import main
from dlopt.errors import InputError
from dlopt.fileio import atomic_path, load_onnx, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and dlopt.__version__ in result.output


def test_help_lists_every_verb_with_one_line():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    verbs = re.findall(r"^  ([a-z-]+)\s{2,}\S", result.output.split("Commands:")[1], re.M)
    assert "export" in verbs
    for verb in verbs:
        assert CliRunner().invoke(main, [verb, "--help"]).exit_code == 0


@pytest.mark.parametrize("make_path, message", [
    (lambda tmp: tmp / "missing.onnx", "does not exist"),
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: _write(tmp / "text.onnx", b"this is not a protobuf at all \xff\xfe"), "not a valid ONNX model"),
    (lambda tmp: _write(tmp / "empty.onnx", b""), "not a valid ONNX model"),
])
def test_load_onnx_names_the_file_and_what_is_wrong(tmp_path, make_path, message):
    path = make_path(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        load_onnx(path)
    assert str(path) in info.value.message


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"whole")
    assert out.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [out]


def test_json_reports_are_standard_json_without_infinity(tmp_path):
    import json

    import numpy as np

    out = write_json_atomic(tmp_path / "r.json", {"sqnr_db": float("inf"), "noise": [np.float32("nan"), -np.inf],
                                                  "cos": np.float64(0.5), "shape": np.array([1, 2])})
    text = out.read_text()
    assert "Infinity" not in text and "NaN" not in text

    def strict(token):
        raise ValueError(token)

    assert json.loads(text, parse_constant=strict) == {"sqnr_db": None, "noise": [None, None], "cos": 0.5,
                                                       "shape": [1, 2]}


def test_mapped_folders_cannot_be_imported_as_top_level_packages():
    for folder in ("optimize", "targets", "models"):
        run = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode != 0 and f"dlopt.{folder}" in run.stderr


def test_models_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import dlopt.models as m; "
            "print(sorted(m.REFERENCE_MODELS))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "minilm" in run.stdout


def test_wheel_carries_the_mapped_packages(tmp_path):
    pytest.importorskip("build")
    run = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    wheel, = tmp_path.glob("dlopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("dlopt/__init__.py", "dlopt/cli/__init__.py", "dlopt/optimize/export.py",
                   "dlopt/targets/__init__.py", "dlopt/models/__init__.py", "dlopt/schemas/manifest.schema.json",
                   "dlopt/schemas/bench.schema.json"):
        assert module in names
    # no setuptools warnings of the project's own making (license form, undeclared packages)
    log = run.stdout + run.stderr
    for warning in ("project.license` as a TOML table is deprecated", "is absent from the `packages` configuration",
                    "SetuptoolsDeprecationWarning"):
        assert warning not in log
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    out = tmp_path / "m.bin"
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
