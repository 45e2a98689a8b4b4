"""dlopt run RECIPE: configs from TOML, the content-addressed stage cache, --force, lineage, bad recipes."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from test_safety import mlp_model

from dlopt.cli import main
from dlopt.manifest import sha256_file, validate
from dlopt.recipe import build_config, load_recipe, run_recipe
from dlopt.stage import config_to_dict, config_from_dict
from dlopt.stagecache import StageCache

QUANTIZE_PACKAGE = """\
source = "mlp.onnx"
target = "cpu"
eval_data = "eval.npz"

[[stage]]
kind = "quantize"
mode = "dynamic"
speed_check = false

[[stage]]
kind = "package"
measure_s = 0
"""

QUANTIZE_ONLY = """\
source = "mlp.onnx"
target = "cpu"

[[stage]]
kind = "quantize"
mode = "dynamic"
speed_check = false
"""


@pytest.fixture()
def work(tmp_path):
    onnx.save(mlp_model(), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((8, 16)).astype(np.float32))
    (tmp_path / "r.toml").write_text(QUANTIZE_PACKAGE)
    return tmp_path


def run(work, *args, recipe="r.toml", out="out"):
    return CliRunner().invoke(main, ["run", str(work / recipe), "-o", str(work / out), "--cache-dir",
                                     str(work / "cache"), *args])


def statuses(result) -> list[str]:
    """The status column of `dlopt run`'s table."""
    lines = result.stdout.splitlines()
    return [line.split()[2] for line in lines[2:] if line[:1].isdigit()]


def test_configs_round_trip_from_toml():
    import tomllib

    stages = tomllib.loads("""
[[stage]]
kind = "quantize"
precision = "int8"
mode = "static"
method = "percentile"
percentile = 99.9
exclude_nodes = ["a", "b"]
image = { size = [224, 224], mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }
[[stage]]
kind = "export"
opset = 17
verify_batches = [1, 2]
[[stage]]
kind = "package"
target = "cpu"
fix_shapes = ["x=1x16"]
""")["stage"]
    for keys in stages:
        kind = keys.pop("kind")
        config = build_config(kind, keys, where="t.toml")
        assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    quantize = build_config("quantize", {"exclude_nodes": ["a"], "image": {"size": [2, 3]}}, where="t", target="cpu")
    assert quantize.exclude_nodes == ("a",) and quantize.image.size == (2, 3) and quantize.target == "cpu"


def test_first_run_misses_then_hits_and_outputs_match(work):
    first = run(work, "--overwrite")
    assert first.exit_code == 0, first.output
    assert statuses(first) == ["ran", "ran"]
    second = run(work, "--overwrite")
    assert second.exit_code == 0, second.output
    assert statuses(second) == ["cached", "cached"]
    assert "stage 1/2 quantize: cached" in second.stderr
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    model = work / "out" / manifest["model"]["file"]
    ops = {n.op_type for n in onnx.load(model).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops
    x = np.load(work / "eval.npz")["x"]
    ref = ort.InferenceSession(str(work / "mlp.onnx")).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    sqnr = 20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - got))
    assert sqnr > 25, sqnr  # dynamic INT8 of a 2-layer MLP


def _cached(work, recipe_text=QUANTIZE_ONLY):
    recipe = work / "q.toml"
    recipe.write_text(recipe_text)
    result = run_recipe(load_recipe(recipe), work / "q.onnx", cache=StageCache(work / "cache"))
    return result.stages[0]


def test_invalidation_by_input_config_data_and_isa(work, monkeypatch):
    base = _cached(work)
    assert not base.cached
    assert _cached(work).cached and _cached(work).key == base.key

    changed = _cached(work, QUANTIZE_ONLY.replace('mode = "dynamic"', 'mode = "dynamic"\nper_channel = false'))
    assert not changed.cached and changed.key != base.key  # config

    with_data = _cached(work, 'eval_data = "eval.npz"\n' + QUANTIZE_ONLY)
    assert not with_data.cached
    np.savez(work / "eval.npz", x=np.ones((8, 16), np.float32))
    other_data = _cached(work, 'eval_data = "eval.npz"\n' + QUANTIZE_ONLY)
    assert not other_data.cached and other_data.key != with_data.key  # data bytes

    # Another host's ISA class, made to differ from whatever this host is (a fixed string such as
    # "AVX-512, VNNI" would be this very host on a VNNI CPU).
    from dlopt.runtime import isa_line
    from dlopt.targets.cpu import host_cpu

    this_host = isa_line(host_cpu())
    monkeypatch.setattr("dlopt.runtime.isa_line", lambda cpu: "riscv64: no int8 dot product (faked for a test)")
    assert this_host != "riscv64: no int8 dot product (faked for a test)"
    other_host = _cached(work)
    assert not other_host.cached and other_host.key != base.key  # ISA class
    monkeypatch.undo()
    assert _cached(work).cached

    model = mlp_model()
    model.graph.initializer[0].raw_data = np.full((16, 32), 0.5, np.float32).tobytes()
    onnx.save(model, work / "mlp.onnx")
    other_input = _cached(work)
    assert not other_input.cached and other_input.key != base.key  # input bytes


def test_force_redoes_the_stage_and_the_ones_after(work):
    assert run(work).exit_code == 0
    assert statuses(run(work, "--overwrite", "--force", "quantize")) == ["ran", "ran"]
    assert statuses(run(work, "--overwrite", "--force", "2")) == ["cached", "ran"]
    bad = run(work, "--overwrite", "--force", "prune")
    assert bad.exit_code == 2 and "--force prune" in bad.stderr and "has no such stage" in bad.stderr


def test_lineage_in_the_manifest(work):
    result = run(work)
    assert result.exit_code == 0, result.output
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert validate(manifest) == []
    (step,) = manifest["lineage"]
    assert step["kind"] == "quantize" and step["index"] == 1
    assert step["config"]["type"] == "QuantizeConfig" and step["config"]["fields"]["mode"] == "dynamic"
    assert step["input_sha256"] == sha256_file(work / "mlp.onnx")
    entry = StageCache(work / "cache").get(step["cache_key"])
    assert entry is not None and entry.kind == "quantize"
    assert step["output_sha256"] == sha256_file(entry.path / "model.onnx")
    assert manifest["source"]["sha256"] == step["output_sha256"]  # the bundle packaged that very output


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('kind = "quantize"', 'kind = "quantise"'),
     r"r\.toml:6 \(stage 1\): unknown stage kind 'quantise'"),
    (lambda t: t.replace("measure_s = 0", "measure_s = 0\nmesure = 1"),
     r"r\.toml:13 \(stage 2, package\): unknown PackageConfig key\(s\) mesure"),
    (lambda t: "sorce = 1\n" + t, r"r\.toml:1: unknown recipe key\(s\) sorce"),
    (lambda t: t.replace('source = "mlp.onnx"', 'source = "minilm"'),
     r"r\.toml:5 \(stage 1, quantize\): the source minilm is a torch model"),
    (lambda t: t.replace('mode = "dynamic"', 'mode = "fast"'), r"r\.toml:5 \(stage 1, quantize\): .*fast"),
])
def test_bad_recipes_are_input_errors_naming_the_line(work, edit, message):
    (work / "r.toml").write_text(edit(QUANTIZE_PACKAGE))
    result = run(work)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.stderr), result.stderr
    assert not (work / "cache").exists() and not (work / "out").exists()


@pytest.mark.parametrize("stages, top, message", [
    # the rules each stage declares on its place in a recipe (Stage.recipe_check, quantizes, precision)
    (["prune", "prune", "export"], 'source = "fashion-cnn"',
     r"r\.toml:\d+ \(stage 2, prune\): one prune stage per recipe"),
    (["distill", "export"], 'source = "fashion-cnn"',
     r"r\.toml:\d+ \(stage 1, distill\): distill trains the pruned student .* it follows a prune stage"),
    (["prune", "distill", "export"], 'source = "fashion-cnn"\ntraining_data = "missing.npz"',
     r"training_data .*missing\.npz does not exist"),
    (["fp16", "quantize"], 'source = "mlp.onnx"',
     r"r\.toml:\d+ \(stage 2, quantize\): the stage before made an FP16 model"),
    (["quantize:fp16", "int8-dynamic"], 'source = "mlp.onnx"',
     r"r\.toml:\d+ \(stage 2, int8-dynamic\): the stage before made an FP16 model"),
])
def test_stage_order_rules_are_input_errors_naming_the_stage(work, stages, top, message):
    tables = []
    for stage in stages:
        kind, _, precision = stage.partition(":")
        tables.append(f'[[stage]]\nkind = "{kind}"' + (f'\nprecision = "{precision}"' if precision else ""))
    (work / "r.toml").write_text(top + '\ntarget = "cpu"\n\n' + "\n\n".join(tables) + "\n")
    result = run(work)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.stderr), result.stderr
    assert not (work / "cache").exists() and not (work / "out").exists()


def test_inputs_are_never_overwritten(work):
    (work / "q.toml").write_text(QUANTIZE_ONLY)
    before = sha256_file(work / "mlp.onnx")
    result = run(work, recipe="q.toml", out="mlp.onnx")
    assert result.exit_code == 2 and "mlp.onnx" in result.stderr
    assert sha256_file(work / "mlp.onnx") == before
    result = run(work, recipe="q.toml", out="q.toml")
    assert result.exit_code == 2 and "q.toml" in result.stderr


def test_onnx_output_and_a_failed_stage_leaves_no_entry(work):
    (work / "q.toml").write_text(QUANTIZE_ONLY)
    result = run(work, recipe="q.toml", out="q.onnx")
    assert result.exit_code == 0, result.output
    assert (work / "q.onnx").is_file() and (work / "q.quantize.json").is_file()
    (work / "f.toml").write_text(QUANTIZE_ONLY + "min_sqnr_db = 200.0\nrecover = false\n")
    failed = run(work, recipe="f.toml", out="f.onnx")
    assert failed.exit_code == 1, failed.output
    assert "f.toml stage 1/1 quantize: the quantized model failed verification" in failed.stderr
    assert f"kept as {work / 'f.failed.onnx'}" in failed.stderr and (work / "f.failed.onnx").is_file()
    cache = StageCache(work / "cache")
    assert len(cache.entries()) == 1
    assert sorted(p.name for p in cache.root.iterdir() if p.name.startswith(".")) == [".locks"]  # flock files only
    assert not (work / "f.onnx").exists()


def test_cache_ls_and_prune(work):
    assert run(work).exit_code == 0
    cache_dir = str(work / "cache")
    listing = CliRunner().invoke(main, ["cache", "ls", "--cache-dir", cache_dir])
    assert listing.exit_code == 0
    rows = listing.stdout.splitlines()[2:-1]
    assert sorted(r.split()[1] for r in rows) == ["package", "quantize"]
    assert all(str(work / "mlp.onnx") in r for r in rows)
    keep = CliRunner().invoke(main, ["cache", "prune", "--older-than", "7d", "--cache-dir", cache_dir])
    assert keep.exit_code == 0 and "removed 0 entries" in keep.stdout
    small = CliRunner().invoke(main, ["cache", "prune", "--max-size", "1B", "--cache-dir", cache_dir])
    assert small.exit_code == 0 and "removed 2 entries" in small.stdout
    assert StageCache(cache_dir).entries() == []
    bad = CliRunner().invoke(main, ["cache", "prune", "--max-size", "lots", "--cache-dir", cache_dir])
    assert bad.exit_code == 2 and "--max-size 2GB" in bad.stderr


def test_an_existing_folder_is_replaced_only_when_it_is_a_bundle(work):
    (work / "out").mkdir()
    (work / "out" / "notes.txt").write_text("mine")
    refused = run(work)
    assert refused.exit_code == 2 and "exists and is not empty" in refused.stderr
    refused = run(work, "--overwrite")
    assert refused.exit_code == 2 and "is not a dlopt bundle" in refused.stderr
    assert (work / "out" / "notes.txt").read_text() == "mine"
    (work / "out" / "notes.txt").unlink()
    assert run(work).exit_code == 0 and (work / "out" / "manifest.json").is_file()


def test_cache_dir_from_the_environment(work, monkeypatch):
    monkeypatch.setenv("DLOPT_CACHE_DIR", str(work / "envcache"))
    (work / "q.toml").write_text(QUANTIZE_ONLY)
    result = CliRunner().invoke(main, ["run", str(work / "q.toml"), "-o", str(work / "q.onnx")])
    assert result.exit_code == 0, result.output
    assert [e.kind for e in StageCache(work / "envcache").entries()] == ["quantize"]
