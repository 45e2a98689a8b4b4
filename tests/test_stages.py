"""The Stage interface (dlopt.stage): every registered stage's config round-trips through JSON, unknown
kinds/types/versions/keys are input errors, requires/ensures failures name the check, the stage and the
chain before it, the registry imports stages lazily, and the quantize front door records its scheme."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from test_quantize_int8 import cnn_model, mlp_data, mlp_model

from dlopt.errors import InputError, StageError
from dlopt.images import ImagePreprocess
from dlopt.manifest import hash_path
from dlopt.stage import (STAGE_MODULES, Check, Stage, StageContext, StageResult, config_from_dict, config_to_dict,
                         get_stage, register_stage, stage_kinds)
from dlopt.stagecache import StageCache

IMAGE = ImagePreprocess(size=(2, 3), layout="nchw", scale=0.5, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), bgr=True)
SCHEME_COMMON = dict(exclude_nodes=("a", "b"), exclude_ops=("Gemm",), target="arm64", input_shapes=("x=1x16",),
                     image=IMAGE, calibration_samples=7, fidelity_samples=5, min_sqnr_db=12.5, holdout=0.3,
                     metric="detection", metric_floor=0.8, speed_check=False, layernorm_form="fused",
                     trim_padding="off", score_threshold=0.4, verdict_confidence=0.9,
                     strict_verdict=True)
INT8_COMMON = dict(SCHEME_COMMON, per_channel=False, preprocess=False, max_accuracy_drop=0.01, evaluator="top1",
                   recover=False, leave_one_out_limit=9, smoothing=0.5, smoothing_samples=3,
                   fuse_activations=False)
# Every field of every stage's config set to a value that is not its default (checked below).
NON_DEFAULT = {
    "export": dict(opset=17, exporter="torchscript", fallback=False, dynamic_shapes=False, atol=1e-3, rtol=1e-2,
                   verify_batches=(2, 5), verify_seq_lens=(3,), allow_mismatch=True, seed=3),
    "prune": dict(ratio=0.25, structure="channels", importance="taylor", global_pruning=True, ignore=("head",),
                  round_to=8),
    "distill": dict(epochs=1, temperature=2.0, alpha=0.5, loss="cosine", hidden_weight=0.1,
                    hidden_layers=(("encoder.0", "encoder.0"), ("encoder.5", "encoder.2")), lr=0.01,
                    weight_decay=0.1, batch_size=8, eval_batch_size=16, max_batches_per_epoch=4, patience=None,
                    freeze=("embeddings",), seed=1, device="cuda"),
    "quantize": dict(precision="int4", mode="static", method="entropy", per_channel=False, block_size=64,
                     exclude_nodes=("n1",), exclude_ops=("MatMul",), target="cuda", preprocess=False,
                     calibration_samples=9, percentile=99.9, max_accuracy_drop=0.02, evaluator="cosine",
                     fidelity_samples=8, input_shapes=("x=2x16",), image=IMAGE, min_sqnr_db=11.0, holdout=0.25,
                     metric="map", metric_floor=0.95,
                     recover=False, leave_one_out_limit=10, smoothing=0.75, smoothing_samples=4,
                     weight_rounding="nearest", bias_correction=False, rounding_samples=5, speed_check=False,
                     layernorm_form="unfused", node_forms="int8", trim_padding="on",
                     fuse_activations=False, score_threshold=0.5, verdict_confidence=0.9,
                     strict_verdict=True),
    "int8-dynamic": INT8_COMMON,
    "int8-weight-only": INT8_COMMON,
    "int8-static": dict(INT8_COMMON, method="percentile", percentile=99.9, weight_rounding="gptq",
                        bias_correction=False, rounding_samples=5, node_forms="int8"),
    "int4-weight-only": dict(SCHEME_COMMON, exclude_ops=("Gather",), block_size=64, symmetric=False, algorithm="mse",
                             quantize_embeddings=False, embedding_block_size=128, share_tied_embeddings=False,
                             keep_first=1, keep_last=2, sensitive_fraction=0.2, fallback_bits=32, accuracy_level=0,
                             sensitivity_samples=3, gptq_samples=4, gptq_act_order=False, gptq_clip_search=False),
    "fp16": dict(SCHEME_COMMON, keep_io_types=False, auto_fallback=False, transformer_fusion="on", check_samples=2,
                 max_rounds=3),
    "trim-padding": dict(mode="on", form="slice", mask_input="mask", min_cosine=0.99, samples=4),
    "package": dict(target="cpu", intended_ep=None, fix_shapes=("x=1x16",), type_reduction=True, coverage=False,
                    samples=3, batch=2, seq_len=8, input_shapes=("x=2x16",), atol=1e-3, rtol=1e-2, seed=4,
                    measure_s=0.0, threads=2, torch_source=None, pte_precisions=("fp32", "int8"),
                    pte_fp32_min_sqnr_db=50.0, pte_int8_min_sqnr_db=12.0, calibration="model:fashion-cnn",
                    pte_calibration_samples=4, pte_weight_rounding="nearest", pte_bias_correction=False,
                    name="m", overwrite=True),
    "export-lm": dict(decode_steps=4, atol=1e-4, rtol=1e-4),
    "int4-lm": dict(block_size=64, algorithm="rtn", accuracy_level=0, max_size_mb=50.0, fallback_block_size=32,
                    quantize_embeddings=False, float_offsets=False, window=128, calibration_windows=8,
                    sensitivity_windows=1, holdout_windows=1, offset_stages=2, head_block_size=32),
    "package-lm": dict(target="mobile", name="m", prompts=("hello",), new_tokens=5, measure_s=0.0, threads=2),
}
# Fields left at their default on purpose: a non-default value there is invalid with the others above.
DEFAULT_ON_PURPOSE = {("package", "intended_ep"), ("package", "torch_source"),  # both need target mobile
                      ("export-lm", "precision"), ("int4-lm", "fallback_bits")}  # fp32 and 8 are the only values


def test_every_registered_stage_has_a_non_default_example():
    assert sorted(NON_DEFAULT) == sorted(stage_kinds())


@pytest.mark.parametrize("kind", sorted(NON_DEFAULT))
def test_config_round_trips_through_json_with_every_field_set(kind):
    cls = get_stage(kind).config
    config = cls(**NON_DEFAULT[kind])
    default = cls()
    for f in dataclasses.fields(cls):
        if (kind, f.name) not in DEFAULT_ON_PURPOSE:
            assert getattr(config, f.name) != getattr(default, f.name), f"{kind}.{f.name} is its default"
    data = json.loads(json.dumps(config_to_dict(config)))
    assert data["type"] == cls.__name__ and data["version"] == getattr(cls, "VERSION", 1)
    back = config_from_dict(data, cls)
    assert back == config and type(back) is cls
    assert config_from_dict(data) == config  # found by its type name among the registered stages
    if "image" in data["fields"]:
        assert data["fields"]["image"]["type"] == "ImagePreprocess" and back.image.size == (2, 3)
    if kind == "distill":
        assert back.hidden_layers == (("encoder.0", "encoder.0"), ("encoder.5", "encoder.2"))


@dataclass(frozen=True, kw_only=True)
class _Paths:
    VERSION: ClassVar[int] = 3
    folder: Path = Path("a")
    maybe: Path | None = None
    pairs: tuple[tuple[str, int], ...] = ()
    nested: ImagePreprocess | None = None


def test_paths_tuples_of_tuples_and_versions_round_trip():
    config = _Paths(folder=Path("/x/y"), maybe=Path("z.npz"), pairs=(("a", 1), ("b", 2)), nested=IMAGE)
    data = json.loads(json.dumps(config_to_dict(config)))
    assert data["version"] == 3 and data["fields"]["folder"] == "/x/y"
    back = config_from_dict(data, _Paths)
    assert back == config and isinstance(back.folder, Path) and isinstance(back.maybe, Path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d | {"type": "Int8Turbo"}, r"config type 'Int8Turbo' where a Int8Static belongs"),
    (lambda d: d | {"version": 2}, r"config Int8Static has version 2 \(this dlopt reads version 1\)"),
    (lambda d: d | {"fields": d["fields"] | {"speed": 1}}, r"config Int8Static has unknown keys \['speed'\]"),
    (lambda d: d | {"fields": d["fields"] | {"image": d["fields"]["image"] | {"version": 9}}},
     r"config ImagePreprocess has version 9"),
    (lambda d: d | {"fields": d["fields"] | {"method": "fastest"}}, r"unknown calibration method 'fastest'"),
    (lambda d: [d], r"a config must be a table"),
])
def test_bad_config_dicts_are_input_errors(change, message):
    from dlopt.optimize.quantize import Int8Static

    data = json.loads(json.dumps(config_to_dict(Int8Static(image=IMAGE))))
    with pytest.raises(InputError, match=message):
        config_from_dict(change(data), Int8Static)


def test_unknown_kind_and_unknown_type_name():
    with pytest.raises(InputError, match=r"unknown stage kind 'int3' \(choose one of export, prune"):
        get_stage("int3")
    with pytest.raises(InputError, match=r"unknown config type 'Nope'"):
        config_from_dict({"type": "Nope", "version": 1, "fields": {}})


def test_registry_imports_no_stage_until_asked():
    code = ("import sys, dlopt.stage as s; kinds = s.stage_kinds(); "
            "print(len(kinds), sorted(m for m in sys.modules if m.startswith('dlopt.optimize') or m in "
            "('dlopt.package', 'dlopt.bundle_stage', 'torch', 'onnxruntime')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert out[0] == str(len(STAGE_MODULES)) and out[1].strip() == "[]"
    code = "import sys, dlopt.stage as s; s.get_stage('int8-static'); print('dlopt.optimize.quantize' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


def test_stages_register_by_decorator_and_carry_no_helpers():
    """A stage module registers its Stage with @register_stage; the registry maps a kind to that Stage only
    (no helpers by name: the core imports shared services as plain modules)."""
    import copy
    import pickle

    from dlopt.optimize import export, prune
    from dlopt.optimize.quantize import stages

    assert get_stage("export") is export.export_stage and get_stage("prune") is prune.prune_stage
    assert get_stage("int8-static") is stages.int8_static_stage and get_stage("int8-static").kind == "int8-static"
    for kind in STAGE_MODULES:
        stage = get_stage(kind)
        assert isinstance(stage, Stage) and stage.kind == kind
        with pytest.raises(AttributeError):
            stage.load_source  # noqa: B018 (no helper lookups by name)
    assert pickle.loads(pickle.dumps(get_stage("prune"))).kind == "prune"
    assert copy.copy(get_stage("prune")) == get_stage("prune")
    with pytest.raises(TypeError, match="not in dlopt.stage.STAGE_MODULES"):
        register_stage(kind="int3", config=object, takes="onnx", makes="onnx")


def _qdq_model() -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> Relu: an already quantized model."""
    scale, zero = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="d"),
             helper.make_node("Relu", ["d"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [scale, zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_failed_requires_check_names_the_check_the_stage_and_the_chain():
    from dlopt.optimize.quantize import Int8Static

    stage = get_stage("int8-static")
    with pytest.raises(InputError) as e:
        stage.apply(_qdq_model(), Int8Static(), StageContext(after=("export", "prune")))
    assert str(e.value).startswith("int8-static failed after export, prune: requires a float ONNX model: it already "
                                   "holds quantized ops (DequantizeLinear 1, QuantizeLinear 1)")
    with pytest.raises(InputError, match=r"^fp16 failed: requires an ONNX model: got a str"):
        get_stage("fp16").apply("model.onnx", get_stage("fp16").config())
    with pytest.raises(InputError, match=r"int8-static takes a Int8Static, not a Int8Dynamic"):
        from dlopt.optimize.quantize import Int8Dynamic

        stage.apply(mlp_model(), Int8Dynamic())


def test_a_failed_ensures_check_is_a_stage_error_naming_the_chain():
    @dataclass(frozen=True, kw_only=True)
    class Rename:
        output: str = "z"

    def rename(model, config, context):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.graph.output[0].name = config.output
        return StageResult(copy, {})

    from dlopt.optimize.quantize import SAME_OUTPUTS

    stage = Stage(kind="rename", config=Rename, run=rename, takes="onnx", makes="onnx", ensures=(SAME_OUTPUTS,))
    with pytest.raises(StageError) as e:
        stage.apply(mlp_model(), Rename(), StageContext(after=("int8-dynamic",)))
    assert e.value.message == ("rename failed after int8-dynamic: ensures the graph outputs of its input: its outputs "
                               "['z'] are not its input's ['y']")
    assert e.value.exit_code == 1
    ok = Check("anything", lambda model, config, before: None)
    assert dataclasses.replace(stage, ensures=(ok,)).apply(mlp_model(), Rename()).model.graph.output[0].name == "z"


def test_an_error_inside_a_stage_names_the_chain_and_keeps_its_class():
    from dlopt.optimize.quantize import Int8Dynamic

    with pytest.raises(InputError,
                       match=r"^int8-dynamic failed after prune: exclude_nodes=NAMES: nodes not in the model: nope"):
        get_stage("int8-dynamic").apply(mlp_model(), Int8Dynamic(exclude_nodes=("nope",), speed_check=False),
                                        StageContext(after=("prune",)))


def test_the_quantize_front_door_resolves_to_a_scheme_and_records_it():
    from dlopt.optimize.quantize import Int8Dynamic, Int8Static, QuantizeConfig, quantize, resolve_scheme

    model = cnn_model()
    scheme, reasons = resolve_scheme(QuantizeConfig(target="cpu"), model, has_data=True)
    assert type(scheme) is Int8Static and reasons[0].startswith("static QDQ: CNN")
    scheme, reasons = resolve_scheme(QuantizeConfig(exclude_nodes=("conv1",)), model, has_data=False)
    assert scheme.mode == "weight-only" and scheme.exclude_nodes == ("conv1",)
    assert type(resolve_scheme(QuantizeConfig(mode="dynamic"), model, has_data=True)[0]) is Int8Dynamic
    assert type(resolve_scheme(QuantizeConfig(precision="fp16"), model, has_data=True)[0]).__name__ == "Fp16"

    result = quantize(mlp_model(), QuantizeConfig(speed_check=False), mlp_data())
    assert result.report["config"]["type"] == "QuantizeConfig"
    assert result.report["scheme"]["kind"] == "int8-static" and result.report["scheme"]["resolved_from"] == "quantize"
    assert result.report["recipe"]["reasons"][0] == result.report["scheme"]["reasons"][0]
    direct = quantize(mlp_model(), Int8Dynamic(speed_check=False), mlp_data())
    assert direct.report["scheme"] == {"kind": "int8-dynamic", "config": config_to_dict(Int8Dynamic(speed_check=False)),
                                       "resolved_from": None, "reasons": []}
    assert direct.report["config"]["type"] == "Int8Dynamic"
    assert direct.report["recipe"]["mode"] == "dynamic" and direct.report["verdict"]["passed"]
    ops = {n.op_type for n in direct.model.graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}, ops


RECIPE = """\
source = "mlp.onnx"
target = "cpu"
eval_data = "eval.npz"

[[stage]]
kind = "{kind}"
speed_check = false
"""


def _recipe(tmp_path, kind):
    from test_safety import mlp_model as safety_mlp

    onnx.save(safety_mlp(), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((8, 16)).astype(np.float32))
    (tmp_path / "r.toml").write_text(RECIPE.format(kind=kind))
    from dlopt.cli import main

    return CliRunner().invoke(main, ["run", str(tmp_path / "r.toml"), "-o", str(tmp_path / "out.onnx"),
                                     "--cache-dir", str(tmp_path / "cache")])


def test_a_recipe_runs_a_scheme_stage_by_its_kind(tmp_path):
    result = _recipe(tmp_path, "int8-dynamic")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out.quantize.json").read_text())
    assert report["scheme"]["kind"] == "int8-dynamic" and report["config"]["type"] == "Int8Dynamic"


def test_a_recipe_keeps_a_failed_quantize_result_beside_the_output_and_caches_nothing(tmp_path):
    # the quantize stage's failed result (dlopt.optimize.quantize.files: failed_path, quantize_failure)
    assert _recipe(tmp_path, "int8-dynamic").exit_code == 0  # writes the model, data and recipe
    (tmp_path / "r.toml").write_text(RECIPE.format(kind="int8-dynamic") + "min_sqnr_db = 200.0\nrecover = false\n")
    from dlopt.cli import main

    failed = CliRunner().invoke(main, ["run", str(tmp_path / "r.toml"), "-o", str(tmp_path / "q.onnx"),
                                       "--cache-dir", str(tmp_path / "cache")])
    assert failed.exit_code == 1, failed.output
    assert "r.toml stage 1/1 int8-dynamic: the quantized model failed verification on 8 eval-data samples" in failed.stderr
    assert f"the best effort was kept as {tmp_path / 'q.failed.onnx'}" in failed.stderr  # not the staging folder
    assert "Traceback" not in failed.output
    assert (tmp_path / "q.failed.onnx").is_file() and (tmp_path / "q.failed.quantize.json").is_file()
    assert not (tmp_path / "q.onnx").exists()
    assert len(StageCache(tmp_path / "cache").entries()) == 1  # the passing run's only


PRUNE_RECIPE = """\
source = "net.py:build"

[[stage]]
kind = "prune"
ratio = {ratio}

[[stage]]
kind = "export"
"""


def _prune_run(tmp_path, ratio=0.5, text=PRUNE_RECIPE):
    from test_prune import FACTORY

    from dlopt.cli import main

    (tmp_path / "net.py").write_text(FACTORY)
    (tmp_path / "p.toml").write_text(text.format(ratio=ratio))
    return CliRunner().invoke(main, ["run", str(tmp_path / "p.toml"), "-o", str(tmp_path / "pruned.onnx"),
                                     "--cache-dir", str(tmp_path / "cache")])


def _statuses(result) -> list[str]:
    return [line.split()[2] for line in result.stdout.splitlines()[2:] if line[:1].isdigit()]


def test_a_recipe_prunes_a_torch_source_caches_the_checkpoint_and_exports_it(tmp_path):
    pytest.importorskip("torch_pruning")
    first = _prune_run(tmp_path)
    assert first.exit_code == 0, first.output
    assert _statuses(first) == ["ran", "ran"]
    graph = onnx.load(str(tmp_path / "pruned.onnx")).graph
    assert sorted(tuple(w.dims)[0] for w in graph.initializer if len(w.dims) == 4) == [8, 8]  # 16 -> 8 channels
    (entry,) = [e for e in StageCache(tmp_path / "cache").entries() if e.kind == "prune"]
    assert entry.info["artifact"] == "model.pt" and entry.info["report"]["parameters_after"] < \
        entry.info["report"]["parameters_before"]
    again = _prune_run(tmp_path)
    assert again.exit_code == 0 and _statuses(again) == ["cached", "cached"]
    other = _prune_run(tmp_path, ratio=0.25)  # the prune config changes both keys
    assert other.exit_code == 0 and _statuses(other) == ["ran", "ran"]
    graph = onnx.load(str(tmp_path / "pruned.onnx")).graph
    assert sorted(tuple(w.dims)[0] for w in graph.initializer if len(w.dims) == 4) == [12, 12]


DISTILL_RECIPE = """\
source = "net.py:build"
training_data = "{data}"

[[stage]]
kind = "prune"
ratio = {ratio}

[[stage]]
kind = "distill"
epochs = 4
batch_size = 32
lr = 0.01
loss = "mse"

[[stage]]
kind = "export"
"""


def _outputs(path, images):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]


def test_a_recipe_distills_the_pruned_student_against_the_source_and_caches_it(tmp_path):
    pytest.importorskip("torch_pruning")
    import torch
    from test_prune import FACTORY

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", image=rng.standard_normal((320, 1, 12, 12)).astype(np.float32))
    np.savez(tmp_path / "other.npz", image=rng.standard_normal((200, 1, 12, 12)).astype(np.float32))
    first = _prune_run(tmp_path, text=DISTILL_RECIPE.replace("{data}", "train.npz"))
    assert first.exit_code == 0, first.output
    assert _statuses(first) == ["ran", "ran", "ran"]
    (entry,) = [e for e in StageCache(tmp_path / "cache").entries() if e.kind == "distill"]
    assert entry.info["report"]["epochs_run"] >= 1 and entry.info["report"]["train_samples"] == 288  # 10 % held out
    assert entry.info["inputs"]["data"]["training_data"] == hash_path(tmp_path / "train.npz")["sha256"]
    distilled = _outputs(tmp_path / "pruned.onnx", held_out := rng.standard_normal((64, 1, 12, 12)).astype(np.float32))
    # the same recipe without distill: the pruned student as it was
    undistilled = _prune_run(tmp_path, text=PRUNE_RECIPE)
    assert undistilled.exit_code == 0 and _statuses(undistilled) == ["cached", "ran"]  # the prune stage is shared
    pruned = _outputs(tmp_path / "pruned.onnx", held_out)
    namespace: dict = {}
    exec(FACTORY, namespace)
    with torch.no_grad():
        teacher = namespace["build"]()[0](torch.from_numpy(held_out)).numpy()
    error, before = np.mean((distilled - teacher) ** 2), np.mean((pruned - teacher) ** 2)
    assert error < 0.5 * before, (error, before)  # distillation brought the student toward the teacher

    again = _prune_run(tmp_path, text=DISTILL_RECIPE.replace("{data}", "train.npz"))
    assert again.exit_code == 0 and _statuses(again) == ["cached", "cached", "cached"]
    other = _prune_run(tmp_path, text=DISTILL_RECIPE.replace("{data}", "other.npz"))  # new data: distill and after
    assert other.exit_code == 0 and _statuses(other) == ["cached", "ran", "ran"]


@pytest.mark.parametrize("text, message", [
    (DISTILL_RECIPE.replace('training_data = "{data}"\n', ""),
     r"p.toml:7 \(stage 2, distill\): distill needs training data and the source .*net.py:build ships none"),
    (DISTILL_RECIPE.replace("{data}", "missing.npz"), r"p.toml: training_data .*missing.npz does not exist"),
    (DISTILL_RECIPE.replace("{data}", "train.npz").replace('[[stage]]\nkind = "prune"\nratio = {ratio}\n\n', ""),
     r"p.toml:4 \(stage 1, distill\): distill trains the pruned student against the source: it follows a prune "
     "stage"),
])
def test_a_distill_stage_needs_a_prune_stage_before_it_and_training_data(tmp_path, text, message):
    np.savez(tmp_path / "train.npz", image=np.zeros((20, 1, 12, 12), np.float32))
    result = _prune_run(tmp_path, text=text)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.stderr), result.stderr


def test_a_recipe_cannot_end_with_a_torch_checkpoint(tmp_path):
    result = _prune_run(tmp_path, text=PRUNE_RECIPE.split("\n\n[[stage]]\nkind = \"export\"")[0] + "\n")
    assert result.exit_code == 2
    assert "p.toml:3 (stage 1, prune): a recipe ends with an ONNX model or a bundle, not a torch checkpoint" \
        in result.stderr


def test_quantize_asks_the_target_for_its_int8_form_not_its_name(monkeypatch):
    from dlopt.targets.cpu import HostCpu
    from dlopt.optimize.quantize import Int8Dynamic, Int8Static, QuantizeConfig, choose_recipe, quantize, resolve_scheme
    from dlopt.targets import TARGETS, CudaTarget, Int8Form

    class StaticOnly(CudaTarget):  # a new accelerator: only its declared capabilities say what it takes
        name = "npu-test"
        int8 = Int8Form(dynamic=False, activation="s8", per_channel=True, note="the NPU takes QDQ only")

    monkeypatch.setitem(TARGETS, "npu-test", StaticOnly())
    scheme, reasons = resolve_scheme(QuantizeConfig(target="npu-test"), mlp_model(), has_data=True)
    assert type(scheme) is Int8Static
    assert reasons[0] == ("static QDQ: the npu-test target runs static QDQ, not dynamic quantization (the NPU takes "
                          "QDQ only)")
    scheme, reasons = resolve_scheme(QuantizeConfig(target="npu-test"), mlp_model(), has_data=False)
    assert scheme.mode == "weight-only" and "the npu-test target runs static QDQ" in reasons[0]
    recipe = choose_recipe(mlp_model(), Int8Static(target="npu-test"), HostCpu.with_flags("x86_64", ("avx2",)))
    assert (recipe.activation_type, recipe.weight_type, recipe.reduce_range) == ("s8", "s8", False)
    assert "s8/s8: the NPU takes QDQ only" in recipe.reasons
    host = choose_recipe(mlp_model(), Int8Static(), HostCpu.with_flags("x86_64", ("avx2",)))
    assert (host.activation_type, host.reduce_range) == ("u8", True)  # target cpu: this (non-VNNI) host decides
    # a target whose kernels do not run here gets no kernel choices timed here
    result = quantize(mlp_model(), Int8Static(target="npu-test", speed_check=False), mlp_data())
    assert result.report["kernel_choice"] is None and "node_forms" not in result.report
    with pytest.raises(InputError, match=r"^int8-dynamic failed after export: requires a target that runs dynamic "
                                         r"INT8: the npu-test target runs static QDQ only \(the NPU takes QDQ only\)"):
        get_stage("int8-dynamic").apply(mlp_model(), Int8Dynamic(target="npu-test"), StageContext(after=("export",)))
    with pytest.raises(InputError, match=r"unknown target 'tpu' \(choose one of cpu, arm64, cuda, mobile, npu-test\)"):
        Int8Dynamic(target="tpu")
