"""dlopt verify: an intact bundle passes; a flipped byte, a missing file, an extra file, a damaged
manifest or a model that no longer computes the source's outputs fail with exit code 1."""

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from dlopt.cli import main
from dlopt.errors import InputError, VerificationError
from dlopt.manifest import sha256_file
from dlopt.package import PackageConfig, package
from dlopt.verify import verify_bundle

from test_package import mlp_model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    onnx.save_model(mlp_model(), str(root / "mlp.onnx"))
    package(root / "mlp.onnx", root / "bundle", PackageConfig(measure_s=0.0))
    return root / "bundle"


@pytest.fixture
def bundle(built, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(built, copy)
    return copy


def _verify_cli(path):
    return CliRunner().invoke(main, ["verify", str(path)])


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_bundle_passes(bundle):
    result = verify_bundle(bundle)
    assert result.passed and result.problems() == []
    assert {f["path"] for f in result.files} == {"model.ort", "required_operators.config", "coverage.json",
                                                 "samples.npz", "README.md"}
    assert [o["output"] for o in result.outputs] == ["y"] and result.outputs[0]["max_abs_diff"] <= 1e-5
    cli = _verify_cli(bundle)
    assert cli.exit_code == 0, cli.output
    assert cli.output.strip().splitlines()[-1].startswith("ok:")


@pytest.mark.parametrize("name", ["model.ort", "samples.npz", "required_operators.config", "README.md",
                                  "coverage.json"])
def test_a_flipped_byte_fails(bundle, name):
    path = bundle / name
    _flip(path, path.stat().st_size // 2)
    result = verify_bundle(bundle)
    assert not result.passed
    assert [(f["path"], f["status"]) for f in result.files if f["status"] != "ok"] == [(name, "changed")]
    assert "sha256" in next(f["detail"] for f in result.files if f["path"] == name)
    assert result.outputs == [] and "not re-checked" in result.skipped[0]
    cli = _verify_cli(bundle)
    assert cli.exit_code == 1 and f"{name}: changed" in cli.output


def test_a_missing_file_fails(bundle):
    (bundle / "model.ort").unlink()
    cli = _verify_cli(bundle)
    assert cli.exit_code == 1 and "model.ort: missing" in cli.output


def test_an_extra_file_fails(bundle):
    (bundle / "payload.so").write_bytes(b"\x7fELF")
    cli = _verify_cli(bundle)
    assert cli.exit_code == 1 and "payload.so: unlisted" in cli.output


def test_a_truncated_file_fails_on_its_size(bundle):
    path = bundle / "model.ort"
    path.write_bytes(path.read_bytes()[:-10])
    result = verify_bundle(bundle)
    detail = next(f["detail"] for f in result.files if f["path"] == "model.ort")
    assert "manifest says" in detail and "bytes" in detail


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.unlink(), "manifest.json is missing"),
    (lambda m: m.write_text(m.read_text()[:-40]), "not valid JSON"),
    (lambda m: m.write_text(json.dumps(json.loads(m.read_text()) | {"schema_version": 99})), "schema_version"),
    (lambda m: m.write_text(json.dumps({k: v for k, v in json.loads(m.read_text()).items() if k != "files"})),
     "files"),
])
def test_a_damaged_manifest_fails(bundle, damage, message):
    damage(bundle / "manifest.json")
    with pytest.raises(VerificationError, match=message):
        verify_bundle(bundle)
    cli = _verify_cli(bundle)
    assert cli.exit_code == 1 and "Traceback" not in cli.output


def test_changed_weights_with_a_rehashed_manifest_fail_on_outputs(bundle):
    """Tampering that also updates the manifest's hash is caught by re-running the samples."""
    w1 = numpy_helper.to_array(next(t for t in mlp_model().graph.initializer if t.name == "w1"))
    path = bundle / "model.ort"
    data = bytearray(path.read_bytes())
    start = bytes(data).find(w1.tobytes())
    assert start > 0, "the weights are stored raw in the ORT file"
    changed = w1.copy()
    changed[:, :4] *= -3.0
    data[start:start + w1.nbytes] = changed.tobytes()
    path.write_bytes(bytes(data))
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        if entry["path"] == "model.ort":
            entry["sha256"] = sha256_file(path)
    manifest_path.write_text(json.dumps(manifest))
    result = verify_bundle(bundle)
    assert all(f["status"] == "ok" for f in result.files)
    assert not result.passed and not result.outputs[0]["passed"] and result.outputs[0]["max_abs_diff"] > 1e-3
    cli = _verify_cli(bundle)
    assert cli.exit_code == 1 and "model.ort y" in cli.output


def test_hashes_only_skips_the_model_run(bundle):
    result = CliRunner().invoke(main, ["verify", str(bundle), "--hashes-only"])
    assert result.exit_code == 0 and "max abs diff" not in result.output


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nothing-here", "does not exist"),
    (lambda tmp: (tmp / "file.txt", (tmp / "file.txt").write_text("x"))[0], "is not a folder"),
])
def test_not_a_bundle_folder_is_an_input_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message):
        verify_bundle(path)
    assert _verify_cli(path).exit_code == 2


def test_samples_hold_the_source_outputs(bundle):
    from dlopt.package import read_samples

    inputs, expected = read_samples(bundle / "samples.npz")
    assert len(inputs) == 2 and inputs[0]["x"].shape == (1, 16)
    import onnxruntime as ort

    source = ort.InferenceSession(mlp_model().SerializeToString(), providers=["CPUExecutionProvider"])
    for feeds, outs in zip(inputs, expected):
        np.testing.assert_array_equal(outs["y"], source.run(None, feeds)[0])
