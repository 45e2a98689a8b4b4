"""dlopt package: ORT-format output equal to the source, operator configs, coverage on a known
unsupported op, manifest against its schema, atomic writes, bad input."""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.cli import main
from dlopt.errors import InputError, VerificationError
from dlopt.manifest import load_schema, sha256_file, validate
from dlopt.package import PackageConfig, package

FAST = dict(measure_s=0.0)  # latency is measured in test_mobile; here it would only cost time


def mlp_model(batch="batch") -> onnx.ModelProto:
    """x[batch, 16] -> MatMul -> Add -> Relu -> MatMul -> Sigmoid -> y[batch, 8], seeded weights."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32) * 0.3, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def cumsum_model() -> onnx.ModelProto:
    """Relu -> CumSum -> Relu: CumSum is in none of NNAPI's or CoreML's operator lists."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("CumSum", ["a", "axis"], ["b"]),
             helper.make_node("Neg", ["b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "cumsum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor("axis", TensorProto.INT64, [], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "mlp.onnx"
    onnx.save_model(mlp_model(), str(path))
    return path


@pytest.fixture(scope="module")
def mlp_bundle(mlp_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "mlp-mobile"
    return package(mlp_path, out, PackageConfig(**FAST))


def test_ort_model_matches_source_on_fresh_inputs(mlp_path, mlp_bundle):
    bundle = mlp_bundle.bundle
    assert (bundle / "model.ort").read_bytes()[4:8] == b"ORTM"
    source = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    packaged = ort.InferenceSession(str(bundle / "model.ort"), providers=["CPUExecutionProvider"])
    assert [i.name for i in packaged.get_inputs()] == ["x"] and [o.name for o in packaged.get_outputs()] == ["y"]
    rng = np.random.default_rng(123)
    for batch in (1, 5):  # the dynamic batch axis survives the conversion
        x = rng.standard_normal((batch, 16)).astype(np.float32)
        np.testing.assert_allclose(packaged.run(None, {"x": x})[0], source.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_manifest_is_valid_and_hashes_every_file(mlp_path, mlp_bundle):
    bundle, manifest = mlp_bundle.bundle, mlp_bundle.manifest
    on_disk = json.loads((bundle / "manifest.json").read_text())
    assert on_disk == manifest
    assert validate(on_disk) == []
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(load_schema()).validate(on_disk)
    listed = {f["path"]: f for f in on_disk["files"]}
    assert set(listed) == {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert set(listed) == {"model.ort", "required_operators.config", "coverage.json", "samples.npz", "README.md"}
    for name, entry in listed.items():
        assert entry["sha256"] == sha256_file(bundle / name) and entry["bytes"] == (bundle / name).stat().st_size
    assert listed["model.ort"]["role"] == "model" and listed["required_operators.config"]["role"] == "operators-config"
    assert on_disk["source"] == {"file": "mlp.onnx", "sha256": sha256_file(mlp_path),
                                 "bytes": mlp_path.stat().st_size, "external_data": []}
    assert on_disk["runtime"] == {"onnxruntime": ort.__version__, "ort_format_version": "6"} or \
        on_disk["runtime"]["ort_format_version"].isdigit()
    assert on_disk["opset"] == {"ai.onnx": 17}
    assert on_disk["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}]
    assert on_disk["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 8]}]
    assert on_disk["model"]["optimization_style"] == "Fixed" and on_disk["model"]["intended_ep"] == "cpu"
    assert on_disk["configs"]["package"]["type"] == "PackageConfig"
    assert on_disk["verification"]["passed"] and on_disk["verification"]["checks"][0]["max_abs_diff"] <= 1e-5


def test_operator_config_lists_the_models_operators(mlp_bundle):
    text = (mlp_bundle.bundle / "required_operators.config").read_text()
    ops = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            domain, _opset, names = line.split(";")
            ops[domain] = set(names.split(","))
    # Fixed style at the "all" level fuses MatMul+Add+Relu (FusedGemm, a contrib op); Sigmoid and the
    # second MatMul stay as they are
    assert {"MatMul", "Sigmoid"} <= ops["ai.onnx"]
    assert "Relu" in ops["ai.onnx"] or "FusedGemm" in ops.get("com.microsoft", set())
    assert "/tmp" not in text  # no build paths in the bundle


def test_type_reduction_and_runtime_style_for_nnapi(mlp_path, tmp_path):
    result = package(mlp_path, tmp_path / "b", PackageConfig(intended_ep="nnapi", type_reduction=True, **FAST))
    model = result.manifest["model"]
    assert model["optimization_style"] == "Runtime"
    assert model["session_config"] == {"session.enable_saved_runtime_optimizations": "1"}
    assert model["operators_config"] == "required_operators_and_types.config"
    config = (result.bundle / "required_operators_and_types.config").read_text()
    assert 'Relu{"inputs": {"0": ["float"]}}' in config
    # basic optimizations only: MatMul and Add stay (NNAPI takes them), no CPU-only fused op
    assert "FusedMatMul" not in config and "MatMul" in config


def test_coverage_reports_an_unsupported_op_and_how_to_fix_shapes(tmp_path):
    path = tmp_path / "cumsum.onnx"
    onnx.save_model(cumsum_model(), str(path))
    result = package(path, tmp_path / "b", PackageConfig(**FAST))
    report = json.loads((result.bundle / "coverage.json").read_text())
    assert report["dynamic_inputs"] == {"x": ["n", 4]}
    nnapi = report["eps"]["NNAPI"]
    assert nnapi["unsupported_ops"] == ["ai.onnx:CumSum"] and nnapi["nodes"] == 4
    assert nnapi["supported_nodes"] == 0  # dynamic shapes: NNAPI takes nothing as it is
    assert nnapi["nodes_unsupported_due_to_dynamic_shape"] >= 3
    fixed = nnapi["if_shapes_fixed"]
    # with static shapes Relu | CumSum (CPU) | Neg, Relu: 3 of 4 nodes in 2 partitions
    assert (fixed["supported_nodes"], fixed["partitions"], fixed["partition_sizes"]) == (3, 2, [1, 2])
    assert fixed["supported_pct"] == 75.0 and fixed["verdict"] == "NO"  # 2 partitions need > 75 % for MAYBE
    for ep in ("CoreML-MLProgram", "CoreML-NeuralNetwork"):
        assert "ai.onnx:CumSum" in report["eps"][ep]["unsupported_ops"]
    advice = " ".join(report["advice"])
    assert "--fix-shape x=1x4" in advice and "CumSum" in advice
    assert result.manifest["coverage"]["eps"]["NNAPI"]["unsupported_ops"] == ["ai.onnx:CumSum"]


def test_fix_shape_makes_inputs_static(mlp_path, tmp_path):
    result = package(mlp_path, tmp_path / "b", PackageConfig(fix_shapes=("x=1x16",), **FAST))
    session = ort.InferenceSession(str(result.bundle / "model.ort"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 16] and session.get_outputs()[0].shape == [1, 8]
    assert result.manifest["model"]["fixed_shapes"] == {"x": [1, 16]}
    nnapi = json.loads((result.bundle / "coverage.json").read_text())["eps"]["NNAPI"]
    assert nnapi["nodes_unsupported_due_to_dynamic_shape"] == 0 and nnapi["if_shapes_fixed"] is None
    assert nnapi["supported_pct"] == 100.0 and nnapi["partitions"] == 1 and nnapi["verdict"] == "YES"


def test_cpu_bundle_keeps_the_onnx_file(mlp_path, tmp_path):
    result = package(mlp_path, tmp_path / "b", PackageConfig(target="cpu", **FAST))
    assert (result.bundle / "model.onnx").read_bytes() == mlp_path.read_bytes()
    assert result.manifest["coverage"] is None and result.manifest["model"]["format"] == "onnx"
    assert not (result.bundle / "coverage.json").exists()


def test_bundle_records_the_recommended_session_configuration_and_a_snippet_that_loads_it(mlp_path, tmp_path):
    result = package(mlp_path, tmp_path / "b", PackageConfig(target="cpu", threads=2, intended_ep=None, **FAST))
    recommended = result.manifest["runtime"]["recommended_session"]
    assert recommended["session_config"] == {"session.set_denormal_as_zero": "1"}
    assert recommended["intra_op_num_threads"] == 2 and recommended["inter_op_num_threads"] == 1
    assert "FIRST" in recommended["first_session_rule"]
    assert validate(json.loads((result.bundle / "manifest.json").read_text())) == []
    card = (result.bundle / "README.md").read_text()
    assert 'so.add_session_config_entry("session.set_denormal_as_zero", "1")' in card
    assert 'so.AddConfigEntry("session.set_denormal_as_zero", "1");' in card and "so.SetIntraOpNumThreads(2);" in card
    assert "**first** session" in card
    # the card's Python snippet loads the bundled model as written
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    cwd = os.getcwd()
    try:
        os.chdir(result.bundle)
        exec(snippet, scope)
    finally:
        os.chdir(cwd)
    session = scope["session"]
    assert session.get_session_options().intra_op_num_threads == 2
    assert session.get_session_options().get_session_config_entry("session.set_denormal_as_zero") == "1"


def test_a_runtime_style_bundle_recommends_its_own_entries_and_dlopts(mlp_path, tmp_path):
    result = package(mlp_path, tmp_path / "b", PackageConfig(intended_ep="nnapi", **FAST))
    assert result.manifest["runtime"]["recommended_session"]["session_config"] == {
        "session.set_denormal_as_zero": "1", "session.enable_saved_runtime_optimizations": "1"}


def test_stage_reports_and_calibration_hash_are_recorded(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(mlp_model(), str(path))
    config = {"type": "QuantizeConfig", "version": 1, "fields": {"mode": "static"}}
    (tmp_path / "m.quantize.json").write_text(json.dumps({"stage": "quantize", "config": config}))
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    np.savez(tmp_path / "same-content.npz", x=x)
    first = package(path, tmp_path / "b1", PackageConfig(calibration=str(tmp_path / "calib.npz"), **FAST)).manifest
    second = package(path, tmp_path / "b2", PackageConfig(calibration=str(tmp_path / "same-content.npz"),
                                                           **FAST)).manifest
    assert first["configs"]["stages"]["quantize"]["config"] == config
    assert first["calibration"]["samples"] == 4 and len(first["calibration"]["sha256"]) == 64
    assert first["calibration"]["sha256"] == second["calibration"]["sha256"]  # content, not file name
    np.savez(tmp_path / "other.npz", x=x + 1)
    third = package(path, tmp_path / "b3", PackageConfig(calibration=str(tmp_path / "other.npz"), **FAST)).manifest
    assert third["calibration"]["sha256"] != first["calibration"]["sha256"]


def test_a_failed_check_writes_nothing(mlp_path, tmp_path, monkeypatch):
    import dlopt.package as pkg

    real = pkg.run_onnx

    def perturbed(model_path, feeds_list):  # the source "computes" something else than the package
        return [{k: v + 0.01 for k, v in outs.items()} for outs in real(model_path, feeds_list)]

    monkeypatch.setattr(pkg, "run_onnx", perturbed)
    with pytest.raises(VerificationError, match="do not match the source"):
        package(mlp_path, tmp_path / "b", PackageConfig(**FAST))
    assert list(tmp_path.iterdir()) == []  # no bundle, no staging folder left behind


def test_an_existing_bundle_is_kept_unless_overwrite(mlp_path, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not empty"):
        package(mlp_path, out, PackageConfig(**FAST))
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces a bundle, never a folder of the user's own files (issue 13)
    with pytest.raises(InputError, match="is not a dlopt bundle"):
        package(mlp_path, out, PackageConfig(overwrite=True, **FAST))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    package(mlp_path, out, PackageConfig(**FAST))
    (out / "README.md").write_text("edited")
    package(mlp_path, out, PackageConfig(overwrite=True, **FAST))
    assert (out / "README.md").read_text() != "edited" and (out / "model.ort").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def _bad_inputs(tmp: Path, mlp: Path):
    text = tmp / "notes.onnx"
    text.write_bytes(b"not a model")
    a_file = tmp / "a-file"
    a_file.write_text("x")
    np.savez(tmp / "wrong.npz", other=np.zeros((1, 16), np.float32))
    return [
        ([str(tmp / "missing.onnx"), "-o", str(tmp / "b")], "does not exist"),
        ([str(text), "-o", str(tmp / "b")], "not a valid ONNX model"),
        ([str(mlp), "-o", str(tmp / "b"), "--fix-shape", "x"], "is not NAME=DIMS"),
        ([str(mlp), "-o", str(tmp / "b"), "--fix-shape", "x=1xq"], "must be integers"),
        ([str(mlp), "-o", str(tmp / "b"), "--fix-shape", "x=0x16"], "at least 1"),
        ([str(mlp), "-o", str(tmp / "b"), "--fix-shape", "image=1x16"], "not an input of the model"),
        ([str(mlp), "-o", str(tmp / "b"), "--fix-shape", "x=1x2x3"], "Rank mismatch"),
        ([str(mlp), "-o", str(tmp / "b"), "--fix-shape", "x=1x15"], "Can't replace existing fixed size"),
        ([str(mlp), "-o", str(tmp / "b"), "--fix-shape", "x=1x16", "--fix-shape", "x=2x16"], "name an input twice"),
        ([str(mlp), "-o", str(a_file)], "is a file"),
        ([str(mlp), "-o", str(tmp / "no" / "such" / "b")], "does not exist"),
        ([str(mlp), "-o", str(tmp / "b"), "--target", "cpu", "--intended-ep", "nnapi"], "is for --target mobile"),
        ([str(mlp), "-o", str(tmp / "b"), "--target", "cpu", "--torch-source", "x.py:build"], "is for --target mobile"),
        ([str(mlp), "-o", str(tmp / "b"), "--samples", "0"], "must be >= 1, not 0"),
        ([str(mlp), "-o", str(tmp / "b"), "--pte", "int4"], "unknown .pte precision"),
        ([str(mlp), "-o", str(tmp / "b"), "--data", str(tmp / "wrong.npz")], "missing ['x']"),
        ([str(mlp), "-o", str(tmp / "b"), "--calibration", str(tmp / "nope.npz")], "does not exist"),
    ]


def test_bad_input_exits_2_with_one_line(mlp_path, tmp_path):
    for args, message in _bad_inputs(tmp_path, mlp_path):
        result = CliRunner().invoke(main, ["package", *args, "--measure", "0"])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_cli_prints_checks_coverage_and_writes_the_bundle(mlp_path, tmp_path):
    result = CliRunner().invoke(main, ["package", str(mlp_path), "-o", str(tmp_path / "b"), "--measure", "0"])
    assert result.exit_code == 0, result.output
    assert "model.ort" in result.output and "NNAPI" in result.output and "CoreML-MLProgram" in result.output
    assert "--fix-shape x=1x16" in result.output
    assert os.path.isfile(tmp_path / "b" / "manifest.json")


def test_the_manifest_schema_is_itself_valid_and_rejects_a_bad_manifest(mlp_bundle):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(load_schema())
    bad = json.loads(json.dumps(mlp_bundle.manifest))
    bad["files"][0]["sha256"] = "not-a-digest"
    del bad["source"]
    problems = validate(bad)
    assert any(p.startswith("files/0/sha256") for p in problems) and any("'source'" in p for p in problems)


@pytest.mark.parametrize("changes, api, cli", [
    (dict(target="cpu", intended_ep="nnapi"), "an intended EP is for target=mobile, not cpu (drop intended_ep=EP)",
     "an intended EP is for --target mobile, not cpu (drop --intended-ep EP)"),
    (dict(samples=0), "samples must be at least 1, got 0 (pass samples=1 or more)",
     "samples must be at least 1, got 0 (pass --samples 1 or more)"),
    (dict(atol=-1.0), "tolerances must be non-negative (pass atol=TOL and rtol=TOL >= 0)",
     "tolerances must be non-negative (pass --atol TOL and --rtol TOL >= 0)"),
    (dict(target="cpu", torch_source="mlp"),
     "a torch source (ExecuTorch/XNNPACK programs) is for target=mobile (use target=mobile, or drop "
     "torch_source=SOURCE)",
     "a torch source (ExecuTorch/XNNPACK programs) is for --target mobile (use --target mobile, or drop "
     "--torch-source SOURCE)"),
])
def test_config_errors_name_keyword_arguments_for_api_users_and_flags_on_the_cli(changes, api, cli):
    from dlopt.package import validate_config

    with pytest.raises(InputError) as e:
        validate_config(PackageConfig(**changes))
    assert (str(e.value), e.value.cli_text()) == (api, cli)


def test_existing_folder_error_names_overwrite_and_output_for_the_reader(tmp_path):
    from dlopt.package import check_bundle_path

    out = tmp_path / "b"
    out.mkdir()
    (out / "x.txt").write_text("keep")
    with pytest.raises(InputError) as e:
        check_bundle_path(out, overwrite=False)
    assert str(e.value).endswith("(pass overwrite=True, or choose another output=DIR)")
    assert e.value.cli_text().endswith("(pass --overwrite, or choose another --output DIR)")
    with pytest.raises(InputError) as e:
        check_bundle_path(out, overwrite=True)
    assert str(e.value).startswith("overwrite=True: ") and e.value.cli_text().startswith("--overwrite: ")
    assert (out / "x.txt").read_text() == "keep"
