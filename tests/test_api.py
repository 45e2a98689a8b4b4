"""dlopt.api: every verb as a function returning a result object with real numbers, and input errors
that speak in keyword arguments (the API's words), not in CLI flags."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlopt import api
from dlopt.cli import results  # the text the CLI prints for these results
from dlopt.errors import InputError, VerificationError


def mlp(hidden: int = 32, seed: int = 0, *, noise: float = 0.0) -> onnx.ModelProto:
    """x[N, 16] -> MatMul -> Add -> Relu -> MatMul -> logits[N, 4], seeded; `noise` perturbs the last layer."""
    rng = np.random.default_rng(seed)
    w2 = rng.standard_normal((hidden, 4)).astype(np.float32) * 0.3
    w2 += noise * np.random.default_rng(seed + 100).standard_normal(w2.shape).astype(np.float32)
    inits = [numpy_helper.from_array(rng.standard_normal((16, hidden)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["logits"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run_onnx(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    onnx.save(mlp(), root / "fp32.onnx")
    onnx.save(mlp(noise=0.05), root / "near.onnx")
    onnx.save(mlp(hidden=256), root / "big.onnx")
    x = np.random.default_rng(7).standard_normal((64, 16)).astype(np.float32)
    labels = run_onnx(root / "fp32.onnx", x).argmax(axis=1)
    labels[:8] = (labels[:8] + 1) % 4  # 8 of 64 wrong: the source's top1 is exactly 0.875
    np.savez(root / "val.npz", x=x, labels=labels)
    return root


def _keyword_spelled(error: InputError, *words: str) -> None:
    text = str(error.value)
    assert "--" not in text, text
    for word in words:
        assert word in text, text


# ------------------------------------------------------------------------------------------------- bench

def test_bench_measures_a_ratio_and_writes_json_and_baseline(work, tmp_path):
    config = api.BenchConfig(rounds=30, seed=3)
    measured = api.bench([work / "fp32.onnx", work / "big.onnx"], config, json_path=tmp_path / "b.json",
                         baseline_path=tmp_path / "base.json")
    result = measured.result
    assert [m.label for m in result.models] == ["fp32.onnx", "big.onnx"]
    (batch,) = result.batches
    assert batch.rounds == 30 and batch.models[0].ratios[result.clock] is None
    ratio = batch.models[1].ratios[result.clock]
    assert ratio.low <= ratio.estimate <= ratio.high and ratio.estimate > 0
    assert measured.written == (tmp_path / "b.json", tmp_path / "base.json")
    written = json.loads((tmp_path / "b.json").read_text())
    assert written["batches"][0]["results"][1]["ratio"][result.clock]["estimate"] == pytest.approx(ratio.estimate)
    stored = json.loads((tmp_path / "base.json").read_text())
    assert stored["model"]["path"] == str(work / "fp32.onnx") and len(stored["batches"][0]["samples_ms"]["cpu"]) == 30
    assert "fp32.onnx" in api.format_bench(result)


def test_bench_takes_arrays_as_data(work):
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    result = api.bench([work / "fp32.onnx"], api.BenchConfig(rounds=5), data={"x": x}).result
    assert result.data_source == "data" and result.batches[0].data_batches == 4
    assert result.batches[0].models[0].summaries[result.clock].median > 0


def test_bench_refuses_to_overwrite_its_input(work):
    with pytest.raises(InputError, match="fp32.onnx"):
        api.bench([work / "fp32.onnx"], api.BenchConfig(rounds=5), json_path=work / "fp32.onnx")
    assert onnx.load(work / "fp32.onnx").graph.name == "mlp"  # untouched


# -------------------------------------------------------------------------------------------------- eval

def test_evaluate_on_data_against_a_reference(work, tmp_path):
    config = api.EvalConfig(metrics=("top1", "cosine", "sqnr"))
    result = api.evaluate(work / "near.onnx", data=work / "val.npz", reference=work / "fp32.onnx", config=config,
                          json_path=tmp_path / "e.json")
    data = np.load(work / "val.npz")
    near = run_onnx(work / "near.onnx", data["x"])
    source = run_onnx(work / "fp32.onnx", data["x"])
    assert result.samples == 64
    assert result.value("top1") == pytest.approx(float((near.argmax(1) == data["labels"]).mean()))
    top1 = next(r for r in result.rows if r.metric == "top1")
    assert top1.reference == pytest.approx(0.875)
    cosine = np.mean(np.sum(near * source, 1) / (np.linalg.norm(near, axis=1) * np.linalg.norm(source, axis=1)))
    assert result.value("cosine") == pytest.approx(float(cosine), rel=1e-5)
    sqnr = 20 * np.log10(np.linalg.norm(source) / np.linalg.norm(source - near))
    assert result.value("sqnr") == pytest.approx(float(sqnr), rel=1e-4)
    assert json.loads((tmp_path / "e.json").read_text())["samples"] == 64


@pytest.mark.parametrize("kwargs", [{}, {"data": "val.npz", "reference_model": "minilm"}])
def test_evaluate_needs_data_or_a_reference_model(work, kwargs):
    kwargs = {k: work / v if k == "data" else v for k, v in kwargs.items()}
    with pytest.raises(InputError) as e:
        api.evaluate(work / "fp32.onnx", **kwargs)
    _keyword_spelled(e, "data=FILE.npz", "reference_model=NAME")


def test_evaluate_errors_name_keyword_arguments(work):
    np.savez(work / "nolabels.npz", x=np.zeros((2, 16), np.float32))
    with pytest.raises(InputError) as e:
        api.evaluate(work / "fp32.onnx", data=work / "nolabels.npz")
    _keyword_spelled(e, "reference=REF.onnx")
    assert "--reference REF.onnx" in e.value.cli_text()


# -------------------------------------------------------------------------------------------------- gate

def test_gate_passes_a_model_against_itself(work, tmp_path):
    config = api.GateConfig(max_slowdown=0.5, budget_s=4.0)
    gated = api.gate(work / "fp32.onnx", work / "fp32.onnx", config, json_path=tmp_path / "g.json")
    result = gated.result
    assert result.verdict == "pass" and result.exit_code == 0
    latency = next(c for c in result.checks if c.name == "latency")
    assert latency.verdict == "pass" and 0.5 < result.latency.interval.estimate < 1.5
    assert gated.written == (tmp_path / "g.json",)
    assert json.loads((tmp_path / "g.json").read_text())["verdict"] == "pass"


def test_gate_fails_a_size_regression(work):
    config = api.GateConfig(max_slowdown=9.0, max_size_growth=0.1, budget_s=4.0)
    result = api.gate(work / "fp32.onnx", work / "big.onnx", config).result
    size = next(c for c in result.checks if c.name == "size")
    big, small = (work / "big.onnx").stat().st_size, (work / "fp32.onnx").stat().st_size
    assert (size.verdict, size.baseline, size.candidate) == ("fail", small / 1e6, big / 1e6)  # MB
    assert result.verdict == "fail" and result.exit_code == 1
    assert api.format_gate(result).startswith("FAIL (exit 1)")


def test_gate_accuracy_on_data(work):
    config = api.GateConfig(max_slowdown=9.0, max_accuracy_drop=0.0, budget_s=2.0)
    evaluator = api.EvalSpec(data=str(work / "val.npz"), metrics=("top1",))
    result = api.gate(work / "fp32.onnx", work / "near.onnx", config, evaluator=evaluator).result
    accuracy = next(c for c in result.checks if c.name.startswith("accuracy"))
    data = np.load(work / "val.npz")
    near_top1 = float((run_onnx(work / "near.onnx", data["x"]).argmax(1) == data["labels"]).mean())
    assert accuracy.baseline == pytest.approx(0.875) and accuracy.candidate == pytest.approx(near_top1)
    assert accuracy.verdict == ("pass" if near_top1 >= 0.875 else "fail")


# ------------------------------------------------------------------------------- package, keygen, verify

@pytest.fixture(scope="module")
def signed(work, tmp_path_factory):
    root = tmp_path_factory.mktemp("signed")
    keys = api.keygen(output=root)
    result = api.package_model(work / "fp32.onnx", root / "bundle", api.PackageConfig(target="cpu", measure_s=0.0),
                               sign_key=keys.private_key)
    return keys, result


def test_keygen_writes_a_key_pair(signed):
    keys, _ = signed
    assert keys.private_key.name == "dlopt-signing.key" and keys.public_key.name == "dlopt-signing.pub"
    assert keys.private_key.stat().st_mode & 0o777 == 0o600
    assert len(keys.fingerprint) == 64 and int(keys.fingerprint, 16) >= 0


@pytest.mark.parametrize("kwargs, words", [
    ({}, ("no key paths", "output=DIR", "private=KEY", "public=PUB")),
    ({"output": ".", "private": "a.key"}, ("both given", "output=DIR")),
])
def test_keygen_input_errors_use_keywords(kwargs, words):
    with pytest.raises(InputError) as e:
        api.keygen(**kwargs)
    _keyword_spelled(e, *words)


def test_package_then_verify_passes_with_the_trusted_key(signed):
    keys, packaged = signed
    assert packaged.bundle.is_dir() and packaged.manifest["target"] == "cpu"
    assert "wrote" in results.package_text(packaged) and "model.onnx" in results.package_text(packaged)
    result = api.verify(packaged.bundle, trusted_key=keys.public_key)
    assert result.passed and result.signature.passed and result.problems() == []
    (row,) = result.outputs
    assert row["passed"] and row["max_abs_diff"] <= 1e-5
    assert api.verified_text(result).startswith(f"ok: {packaged.bundle}")
    assert "signed by the trusted key" in api.verified_text(result)


def test_verify_fails_a_tampered_bundle(signed, tmp_path):
    import shutil

    _, packaged = signed
    copy = tmp_path / "bundle"
    shutil.copytree(packaged.bundle, copy)
    samples = copy / "samples.npz"
    data = bytearray(samples.read_bytes())
    data[len(data) // 2] ^= 0x01
    samples.write_bytes(bytes(data))
    result = api.verify(copy)
    assert not result.passed
    assert [(f["path"], f["status"]) for f in result.files if f["status"] != "ok"] == [("samples.npz", "changed")]
    error = api.verification_error(result)
    assert isinstance(error, VerificationError) and error.exit_code == 1
    assert "samples.npz: changed" in str(error) and "do not ship it" in str(error)


def test_verify_tolerance_errors_use_keywords(signed):
    _, packaged = signed
    with pytest.raises(InputError) as e:
        api.verify(packaged.bundle, atol=-1.0)
    _keyword_spelled(e, "atol=1e-4")
    assert "--atol 1e-4" in e.value.cli_text()


def test_unsigned_origin_note_speaks_to_its_reader(work, tmp_path):
    packaged = api.package_model(work / "fp32.onnx", tmp_path / "b", api.PackageConfig(target="cpu", measure_s=0.0))
    result = api.verify(packaged.bundle, check_outputs=False)
    assert result.passed and result.outputs == [] and result.signature is None
    assert "integrity only" in api.origin_text(result)


# ------------------------------------------------------------------------------------------------ models

def test_models_lists_the_reference_models():
    entries = api.models()
    names = [e.name for e in entries]
    assert {"minilm", "efficientnet-lite0", "fashion-cnn"} <= set(names)
    fashion = next(e for e in entries if e.name == "fashion-cnn")
    assert fashion.evaluation is None and fashion.summary["metrics"] == ["test_top1"]
    assert fashion.to_dict()["fp32_megabytes"] == pytest.approx(0.104 * 4, abs=0.01)
    assert "fashion-cnn" in results.models_text(entries)


def test_models_input_errors_use_keywords():
    with pytest.raises(InputError) as e:
        api.models(evaluate=True)
    _keyword_spelled(e, "evaluate=True needs model names")
    assert e.value.cli_text().startswith("--evaluate needs model names")
    with pytest.raises(InputError, match="unknown reference model 'nope'"):
        api.models(["nope"])


# ------------------------------------------------------------------------------------------ run and cache

RECIPE = """\
source = "fp32.onnx"
target = "cpu"

[[stage]]
kind = "quantize"
mode = "dynamic"
speed_check = false
"""


def test_run_caches_and_cache_prunes(work, tmp_path):
    import shutil

    shutil.copy(work / "fp32.onnx", tmp_path / "fp32.onnx")
    (tmp_path / "r.toml").write_text(RECIPE)
    cache = tmp_path / "cache"
    first = api.run(tmp_path / "r.toml", tmp_path / "q.onnx", cache_dir=cache)
    assert [s.cached for s in first.stages] == [False] and (tmp_path / "q.onnx").is_file()
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    again = api.run(tmp_path / "r.toml", tmp_path / "q2.onnx", cache_dir=cache)
    assert [s.cached for s in again.stages] == [True] and again.stages[0].key == first.stages[0].key
    assert "cached" in results.run_text(again)

    listing = api.cache_ls(cache)
    assert listing.root == cache and [e.key for e in listing.entries] == [first.stages[0].key]
    assert listing.bytes > 0 and first.stages[0].key[:12] in results.cache_text(listing)
    assert api.cache_root(cache) == cache

    kept = api.cache_prune(older_than=3600.0, cache_dir=cache)
    assert kept.removed == () and len(kept.left) == 1
    pruned = api.cache_prune(all=True, cache_dir=cache)
    assert [e.key for e in pruned.removed] == [first.stages[0].key] and pruned.left == ()
    assert api.cache_ls(cache).entries == ()


def test_cache_prune_needs_a_criterion(tmp_path):
    with pytest.raises(InputError) as e:
        api.cache_prune(cache_dir=tmp_path)
    _keyword_spelled(e, "older_than=AGE", "max_size=SIZE", "all=True")


# ------------------------------------------------------------------------------------------- the module

def test_every_public_name_resolves_and_unknown_ones_do_not():
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        api.nope  # noqa: B018


def test_importing_the_api_stays_light():
    code = "import sys, dlopt.api; print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime', 'torch') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
