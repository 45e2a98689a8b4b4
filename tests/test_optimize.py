"""dlopt optimize: the Pareto front and the choice on synthetic points, the timing rule, and a whole
search on a tiny seeded CNN (a candidate over budget dropped with its reason, a verified bundle, JSON
valid against its schema), then a warm re-run that transforms nothing and gives the same front."""

import json
from importlib.resources import files

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from test_quantize_int8 import cnn_model

from dlopt.cli import main
from dlopt.search.driver import timing_plan
from dlopt.search.scoring import accuracy_drop, drop_unit
from dlopt.search.pareto import Point, choose, dominated_by, dominates, pareto_front

SCHEMA = json.loads(files("dlopt").joinpath("schemas/optimize.schema.json").read_text())


# --------------------------------------------------------------------------- the front, synthetic


def test_dominance_needs_no_worse_everywhere_and_better_somewhere():
    a = Point("a", 1.0, 0.1, 100)
    assert dominates(a, Point("b", 1.0, 0.2, 100))
    assert not dominates(a, Point("c", 0.9, 0.2, 100))  # faster but less accurate: a trade-off
    assert not dominates(a, Point("a2", 1.0, 0.1, 100))  # identical: neither dominates


def test_front_keeps_trade_offs_and_ties_and_drops_dominated_points():
    points = [Point("fp32", 1.0, 0.0, 400), Point("int8", 0.5, 0.3, 100), Point("int8-twin", 0.5, 0.3, 100),
              Point("slow-int8", 0.7, 0.4, 100), Point("fp16", 1.05, 0.0, 200), Point("bad", 1.2, 0.5, 500)]
    assert [p.name for p in pareto_front(points)] == ["fp32", "int8", "int8-twin", "fp16"]
    assert dominated_by(points[3], points).name == "int8"
    assert dominated_by(points[5], points).name == "fp32"


def test_choice_is_the_fastest_within_budget_with_near_ties_going_to_the_smaller():
    points = [Point("fp32", 1.0, 0.0, 400), Point("fast", 0.50, 0.6, 100), Point("ok", 0.60, 0.3, 120),
              Point("ok-small", 0.605, 0.35, 90)]
    assert choose(points, 0.5).name == "ok-small"  # 0.605 is within 1 % of 0.60, and smaller
    assert choose(points, 1.0).name == "fast"
    assert choose(points, 0.0).name == "fp32"
    assert choose(points, 0.5, tie=0.0).name == "ok"
    assert choose(points, 1.0, max_latency=0.55) is not None and choose(points, 1.0, max_latency=0.55).name == "fast"
    assert choose([Point("x", 1.0, 2.0, 1)], 1.0) is None


def test_drops_are_in_the_metrics_own_unit_as_in_quantize_and_gate():
    # one meaning of --max-accuracy-drop (dlopt.metrics.metric_drop): no 100x "points" for fractions
    assert accuracy_drop("model:minilm:pang_lee_accuracy", 0.735, 0.730) == pytest.approx(0.005)
    assert accuracy_drop("model:smollm2:perplexity", 10.0, 10.4) == pytest.approx(0.4)  # lower is better
    assert accuracy_drop("detection", 1.0, 0.93) == pytest.approx(0.07)
    assert drop_unit("detection") == "fraction of boxes (Jaccard)" and "20 dB" in drop_unit("sqnr")


def test_timing_rule_skips_over_budget_candidates_and_less_accurate_twins():
    row = lambda drop, size, sig: {"status": "scored", "drop_points": drop, "bytes": size, "signature": sig}  # noqa: E731
    rows = {"fp32": row(0.0, 400, "f"), "a": row(0.2, 100, "q"), "b": row(0.3, 100, "q"), "c": row(0.9, 100, "r"),
            "d": row(0.3, 150, "q")}
    assert timing_plan(rows, 0.5) == ["fp32", "a", "d"]
    assert rows["b"]["status"] == "same-graph" and "same graph as a" in rows["b"]["reason"]
    assert rows["c"]["status"] == "over-budget" and "0.9 > 0.5" in rows["c"]["reason"]


def test_a_candidate_with_fp32s_graph_is_reported_as_fp32_and_not_timed_or_chosen():
    row = lambda drop, size, sig, graph: {"status": "scored", "precision": "int8", "drop_points": drop,  # noqa: E731
                                          "bytes": size, "signature": sig, "graph_sha256": graph}
    rows = {"fp32": row(0.0, 400, "f", "g32"), "int8-static-percentile": row(0.0, 420, "f", "g32"),
            "int8-auto": row(0.2, 100, "q", "g8")}
    rows["fp32"]["precision"] = "fp32"
    # the twin rule alone would time it (420 bytes is not within 1 % of 400): the content hash decides
    assert timing_plan(rows, 0.5) == ["fp32", "int8-auto"]
    same = rows["int8-static-percentile"]
    assert same["status"] == "fp32-graph" and same["precision"] == "fp32" and "FP32 graph" in same["reason"]


def test_graph_content_hash_ignores_names_metadata_and_shape_facts_but_not_weights(tmp_path):
    from dlopt.search.scoring import graph_content_hash

    model = cnn_model()
    onnx.save(model, tmp_path / "a.onnx")
    restamped = onnx.shape_inference.infer_shapes(cnn_model())  # adds value_info, as a quantizer's pass does
    restamped.graph.name = "other"
    for i, node in enumerate(restamped.graph.node):
        node.name = f"renamed_{i}"
    onnx.helper.set_model_props(restamped, {"onnx.infer": "onnxruntime.quant"})
    onnx.save(restamped, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "b.onnx").read_bytes()
    assert graph_content_hash(tmp_path / "a.onnx") == graph_content_hash(tmp_path / "b.onnx")
    changed = cnn_model()
    weight = onnx.numpy_helper.to_array(changed.graph.initializer[0]).copy()
    weight.flat[0] += 1e-3
    changed.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(weight, changed.graph.initializer[0].name))
    onnx.save(changed, tmp_path / "c.onnx")
    assert graph_content_hash(tmp_path / "c.onnx") != graph_content_hash(tmp_path / "a.onnx")


# --------------------------------------------------------------------------- a whole search


# Between FP16's noise and 8-bit's on every CPU, whatever its ISA (VNNI's full 8-bit range is the
# most accurate int8 there is): a budget near 8-bit's noise would make the test depend on the host.
BUDGET = 5e-6  # noise/signal power: 53 dB


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """One cold search on a tiny CNN: sqnr evaluator with a budget of BUDGET (noise 5e-6 of the
    signal power, 53 dB): FP16 meets it (~73 dB), 8-bit candidates do not on any CPU (~46 dB at best,
    with VNNI's full 8-bit range; less with AVX2's reduced range)."""
    work = tmp_path_factory.mktemp("optimize")
    onnx.save(cnn_model(), work / "cnn.onnx")
    rng = np.random.default_rng(1)
    np.savez(work / "calib.npz", image=rng.standard_normal((24, 3, 16, 16)).astype(np.float32))
    np.savez(work / "eval.npz", image=rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    result = run_optimize(work, "out.bundle")
    return work, result


def run_optimize(work, out, *extra):
    from dlopt.search import driver

    args = ["optimize", str(work / "cnn.onnx"), "--max-accuracy-drop", str(BUDGET), "--evaluator", "sqnr",
            "--calibration", str(work / "calib.npz"), "--eval-data", str(work / "eval.npz"), "--workers", "1",
            "-o", str(work / out), "--report", str(work / "report.html"), "--cache-dir", str(work / "cache"),
            "--json", *extra]
    fast = driver.OptimizeConfig.__init__.__kwdefaults__
    saved = dict(fast)
    fast.update(latency_budget_s=3.0, throughput_budget_s=1.0, batch_sizes=(1, 4), package_measure_s=0.0)
    try:
        result = CliRunner().invoke(main, args)
    finally:
        fast.clear()
        fast.update(saved)
    return result


def test_search_writes_a_front_a_verified_bundle_and_schema_valid_json(search):
    from dlopt.verify import verify_bundle

    work, result = search
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    jsonschema.validate(data, SCHEMA)
    by_name = {c["name"]: c for c in data["candidates"]}
    assert {"fp32", "int8-auto", "int8-static-minmax", "int8-static-entropy", "int8-static-percentile", "int4",
            "fp16"} <= set(by_name)
    assert by_name["fp32"]["drop_points"] == 0 and by_name["fp32"]["latency_ratio"] == pytest.approx(1.0)
    # 8-bit noise on this CNN is >= 2e-5 of the signal power on every CPU (46 dB): over the budget, dropped with the reason
    over = [c for c in data["candidates"] if c["status"] == "over-budget"]
    assert over and all(c["drop_points"] > BUDGET and "cannot be chosen" in c["reason"] for c in over)
    assert all(c["latency_ratio"] is None for c in over)  # never timed
    assert all(c["reason"] for c in data["candidates"] if c["name"] != data["chosen"] or c["status"] == "chosen")
    chosen = by_name[data["chosen"]]
    assert chosen["status"] == "chosen" and chosen["on_front"] and chosen["drop_points"] <= BUDGET
    assert data["chosen"] in data["front"] and set(data["front"]) <= {c["name"] for c in data["candidates"]
                                                                      if c["latency_ratio"] is not None}
    assert data["latency"]["input_shapes"] == {"image": [1, 3, 16, 16]} and data["latency"]["threads"] == 1
    assert data["server"]["best"]["batch"] in (1, 4)
    assert data["verified"] is True and verify_bundle(work / "out.bundle").passed
    manifest = json.loads((work / "out.bundle" / "manifest.json").read_text())
    assert [s["kind"] for s in manifest["lineage"]] == [s["kind"] for s in chosen["recipe"]]  # an .onnx source: no export
    assert data["cache"]["evaluations_run"] >= 8 and "applying and scoring" in result.stderr
    # no attention-mask input: padding removal is not tried, and the report says why
    assert data["trim_padding"]["applies"] is False and data["trim_padding"]["gain"] is None
    assert data["trim_padding"]["reason"].startswith("no attention-mask input")
    assert "padding removal does not apply: no attention-mask input" in by_name["trim-padding"]["reason"]
    assert not any(c["name"].endswith("+trim") for c in data["candidates"])
    # an 8-bit recipe whose kernel choice reverted every node is FP32's graph: FP32's one timing, never chosen
    fp32_graph = by_name["fp32"]["graph_sha256"]
    for c in data["candidates"]:
        if c["name"] != "fp32" and c.get("graph_sha256") == fp32_graph:
            assert c["status"] == "fp32-graph" and c["precision"] == "fp32" and c["name"] != data["chosen"]
            assert c["latency_ratio"] == by_name["fp32"]["latency_ratio"]


def test_warm_rerun_transforms_nothing_and_gives_the_same_front(search, monkeypatch):
    import dlopt.optimize.quantize as quantize
    import dlopt.search.scoring as evaluation

    work, cold = search
    first = json.loads(cold.stdout)

    def no_work(*args, **kwargs):
        raise AssertionError("a warm re-run transformed or scored a model")

    monkeypatch.setattr(quantize, "quantize", no_work)
    monkeypatch.setattr(evaluation, "score_model", no_work)
    warm = run_optimize(work, "warm.bundle")
    assert warm.exit_code == 0, warm.stderr
    data = json.loads(warm.stdout)
    assert data["cache"] == {**first["cache"], "evaluations_cached": first["cache"]["evaluations_run"],
                             "evaluations_run": 0}
    assert data["front"] == first["front"] and data["chosen"] == first["chosen"]
    assert data["latency"]["cached"] is True
    assert data["seconds"] <= 0.25 * first["seconds"]


@pytest.mark.parametrize(("args", "message"), [
    (["nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["{onnx}"], "no data to calibrate"),
    (["{onnx}", "--calibration", "{calib}", "--target", "mobile"], "does not search --target mobile"),
    (["fashion-cnn", "--calibration", "{calib}"], "calibrates and is scored on its own data"),
])
def test_bad_input_is_one_line_and_exit_2(search, args, message):
    work, _ = search
    args = [a.format(onnx=work / "cnn.onnx", calib=work / "calib.npz") for a in args]
    result = CliRunner().invoke(main, ["optimize", *args, "--max-accuracy-drop", "0.5", "-o", str(work / "bad.bundle"),
                                       "--cache-dir", str(work / "cache")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (work / "bad.bundle").exists()


def test_what_does_not_fit_the_time_budget_is_skipped_with_the_reason(search, tmp_path):
    from dlopt.verify import verify_bundle

    work, _ = search
    for name in ("cnn.onnx", "calib.npz", "eval.npz"):
        (tmp_path / name).write_bytes((work / name).read_bytes())
    result = run_optimize(tmp_path, "tight.bundle", "--time-budget", "0.001s")  # an empty cache: nothing to reuse
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    skipped = {c["name"]: c["reason"] for c in data["candidates"] if c["status"] == "skipped"}
    assert {"int8-auto", "int4", "fp16"} <= set(skipped) and "time budget" in skipped["int8-auto"]
    assert data["cache"]["evaluations_run"] == 1 and data["chosen"] == "fp32" and data["front"] == ["fp32"]
    assert "time budget" in data["server"]["skipped"]
    assert verify_bundle(tmp_path / "tight.bundle").passed
    # the same search again: the cached plan skips the same candidates (a warm re-run does not extend it)
    again = run_optimize(tmp_path, "tight.bundle", "--time-budget", "0.001s", "--overwrite")
    assert again.exit_code == 0, again.stderr
    repeat = json.loads(again.stdout)
    assert repeat["cache"]["evaluations_run"] == 0 and repeat["front"] == data["front"]
    assert all("first run of this search" in c["reason"] for c in repeat["candidates"]
               if c["status"] == "skipped" and c["name"] in skipped and "time budget" in skipped[c["name"]])


def test_torch_sources_with_training_data_get_prune_and_distill_candidates_before_their_export(tmp_path):
    """For a reference model with training data, each prune ratio is a candidate whose recipe prunes and
    distills the torch source (with the model's own distillation loss) and only then exports it; an .onnx
    source or a model without training data lists prune+distill as skipped with the reason."""
    from dlopt.search.candidates import DISTILL_KEYS, PRUNE_RATIOS, prune_candidates
    from dlopt.search.scoring import SearchContext, build_recipe

    found, skipped = prune_candidates("minilm", torch_source=True)
    assert [c.name for c in found] == [f"prune-{r:g}+distill" for r in PRUNE_RATIOS] and not skipped
    assert all(c.recipe() == [{"kind": "prune", "ratio": r}, {"kind": "distill", **DISTILL_KEYS, "loss": "cosine"}]
               for c, r in zip(found, PRUNE_RATIOS))
    assert prune_candidates("fashion-cnn", torch_source=True)[0][0].stages[1].config["loss"] == "kl"
    ctx = SearchContext(source="fashion-cnn", torch_source=True, source_id="0" * 64, target="cpu",
                        calibration="model:fashion-cnn", eval_data=None, evaluator="model:fashion-cnn:top1",
                        cache_root=str(tmp_path), name="fashion-cnn")
    kinds = [s.kind for s in build_recipe(ctx, found[0].stages + (found[0].stages[0].__class__("quantize"),)).stages]
    assert kinds == ["prune", "distill", "export", "quantize"]
    _, onnx_skip = prune_candidates(str(tmp_path / "m.onnx"), torch_source=False)
    assert "pruning and distillation need the torch model" in onnx_skip[0].reason
    assert "not asked for (--prune" in prune_candidates("minilm", torch_source=True, asked=False)[1][0].reason
    _, no_data = prune_candidates("smollm2", torch_source=True)
    assert "no training data to distill on" in no_data[0].reason and "fashion-cnn" in no_data[0].reason
