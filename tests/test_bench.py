"""The bench harness: interleaving, warm-up, inputs, a real run on tiny models, JSON schema, CLI."""

import json
import time
from importlib.resources import files

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.bench import BenchConfig, InterleavedSampler, benchmark, format_bench, parse_batch_sizes, parse_duration
from dlopt.inputs import InputSpec, feeds_from_arrays, make_feeds, resolve_shapes
from dlopt.cli import main
from dlopt.errors import InputError


WIDTH = 256  # the chains' input width


def _chain(path, layers: int, width: int = WIDTH):
    """`layers` MatMul+Tanh blocks: work proportional to `layers`. Wide enough that the MatMuls (65k
    multiply-adds each, microseconds on any CPU) outweigh ONNX Runtime's per-node and per-run overhead,
    so the long/short ratio is near 3 whatever the host's speed (at 128 wide, overhead set it: ~2 here),
    and narrow enough that the short chain stays far under a millisecond on a loaded machine."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((width, width)).astype(np.float32) * 0.1,
                                "w")
    nodes, prev = [], "x"
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [prev, "w"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    d = tmp_path_factory.mktemp("chains")
    return _chain(d / "short.onnx", 4), _chain(d / "long.onnx", 12)


@pytest.fixture(scope="module")
def schema():
    return json.loads(files("dlopt").joinpath("schemas/bench.schema.json").read_text())


class _FakeMachine:
    """A clock that advances only when a fake model runs: each model costs a known time."""

    def __init__(self, costs):
        self.now = 0.0
        self.calls = []
        self.costs = costs

    def clock(self):
        return self.now, self.now / 2  # CPU time runs at half the wall rate here

    def runner(self, name):
        def run():
            self.calls.append(name)
            self.now += self.costs[name]
        return run


def test_schema_is_a_valid_versioned_draft_2020_12_schema(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema_version"] == {"const": 1}
    assert all("description" in schema["properties"][k] for k in ("clock", "models", "machine", "peak_rss_bytes"))


def test_rounds_are_interleaved_with_a_rotating_order():
    m = _FakeMachine({"A": 1.0, "B": 2.0, "C": 3.0})
    sampler = InterleavedSampler([m.runner("A"), m.runner("B"), m.runner("C")], clock=m.clock)
    sampler.run_rounds(3)
    assert "".join(m.calls) == "ABC" "BCA" "CAB"  # every model in every position once
    assert sampler.rounds == 3
    sampler.run_rounds(2)  # more rounds can be added: the gate's sequential use
    assert "".join(m.calls[9:]) == "ABC" "BCA" and sampler.rounds == 5
    # samples stay attributed to their model whatever the position
    np.testing.assert_array_equal(sampler.samples(2, "wall"), np.full(5, 3.0))


def test_samples_and_ratios_come_from_the_clock():
    m = _FakeMachine({"A": 1.0, "B": 2.5})
    sampler = InterleavedSampler([m.runner("A"), m.runner("B")], clock=m.clock)
    sampler.run_rounds(10)
    np.testing.assert_array_equal(sampler.samples(1, "wall"), np.full(10, 2.5))
    np.testing.assert_array_equal(sampler.samples(1, "cpu"), np.full(10, 1.25))
    r = sampler.ratio(1, "cpu", n_boot=200)
    assert (r.estimate, r.low, r.high) == pytest.approx((2.5, 2.5, 2.5))
    assert sampler.summary(0, "wall").median == 1.0


def test_warm_up_stops_once_latency_settles_and_is_not_kept():
    costs = iter([9.0, 5.0, 3.0] + [1.0] * 100)
    now = [0.0]

    def run():
        now[0] += next(costs)

    sampler = InterleavedSampler([run], clock=lambda: (now[0], now[0]))
    report = sampler.warm_up(max_seconds=60, clock="wall", window=3, tolerance=0.05)
    # windows of 3: [5 3 1 | 1 1 1] -> medians 3 vs 1, not settled; [3 1 1 | 1 1 1] -> 1 vs 1 at round 8
    assert report.settled and report.rounds == 8
    assert sampler.rounds == 0 and sampler.warmup_samples(0).size == report.rounds


def test_warm_up_is_capped_and_says_it_did_not_settle():
    k = [0]
    now = [0.0]

    def run():  # keeps getting faster, forever (and slowly enough in real time to hit the cap early)
        k[0] += 1
        now[0] += 1000.0 * 0.8 ** k[0]
        time.sleep(0.005)

    sampler = InterleavedSampler([run], clock=lambda: (now[0], now[0]))
    report = sampler.warm_up(max_seconds=0.5, clock="wall", window=3)  # ~100 rounds on a quiet machine
    assert not report.settled and report.rounds >= 6


def test_generated_inputs_follow_the_metadata():
    specs = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq")),
             InputSpec("attention_mask", np.dtype(np.int64), ("batch", "seq")),
             InputSpec("token_type_ids", np.dtype(np.int64), ("batch", "seq")),
             InputSpec("pixel", np.dtype(np.float32), (None, 3, 4, 4)),
             InputSpec("half", np.dtype(np.float16), ("batch", 8)), InputSpec("flag", np.dtype(np.bool_), ("batch",))]
    shapes = resolve_shapes(specs, batch=2, seq_len=7)
    feeds = make_feeds(specs, shapes, seed=1)
    assert feeds["half"].dtype == np.float16 and feeds["half"].shape == (2, 8)  # FP16 models (CUDA)
    assert feeds["flag"].dtype == np.bool_ and feeds["flag"].all()
    assert feeds["input_ids"].shape == (2, 7) and feeds["input_ids"].dtype == np.int64
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 1000
    assert np.all(feeds["attention_mask"] == 1) and np.all(feeds["token_type_ids"] == 0)
    assert feeds["pixel"].shape == (2, 3, 4, 4) and feeds["pixel"].dtype == np.float32
    again = make_feeds(specs[::-1], shapes, seed=1)  # order of inputs does not matter
    np.testing.assert_array_equal(again["pixel"], feeds["pixel"])
    other = make_feeds(specs, shapes, seed=2)
    assert not np.array_equal(other["pixel"], feeds["pixel"])


def test_fixed_batch_axis_is_respected():
    spec = InputSpec("image", np.dtype(np.float32), (1, 3, 8, 8))
    assert resolve_shapes([spec], batch=1, seq_len=128) == {"image": (1, 3, 8, 8)}
    with pytest.raises(InputError, match="fixed batch of 1, cannot run batch 8"):
        resolve_shapes([spec], batch=8, seq_len=128)


def test_feeds_from_data_checks_names_types_and_shapes():
    specs = [InputSpec("x", np.dtype(np.float32), ("batch", 4))]
    out = feeds_from_arrays(specs, {"x": np.ones((3, 4), np.float64)}, "d.npz")
    assert out["x"].dtype == np.float32
    with pytest.raises(InputError, match="d.npz has no array 'x'"):
        feeds_from_arrays(specs, {"y": np.ones((3, 4))}, "d.npz")
    with pytest.raises(InputError, match="has shape \\[3, 5\\]"):
        feeds_from_arrays(specs, {"x": np.ones((3, 5), np.float32)}, "d.npz")
    with pytest.raises(InputError, match="is int64, the model wants float32|is float"):
        feeds_from_arrays([InputSpec("x", np.dtype(np.int64), ("b",))], {"x": np.ones(3, np.float32)}, "d.npz")


@pytest.mark.parametrize("text, seconds", [("30", 30.0), ("30s", 30.0), ("1.5m", 90.0), ("250ms", 0.25)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "-3s"])
def test_parse_duration_rejects(text):
    with pytest.raises(InputError, match="duration"):
        parse_duration(text)


def test_parse_batch_sizes():
    assert parse_batch_sizes("1,8,32") == (1, 8, 32)
    for bad in ("0", "a,b", ""):
        with pytest.raises(InputError, match="batch sizes"):
            parse_batch_sizes(bad)


def test_real_run_ranks_three_times_the_work_correctly(chains, schema):
    short, long = chains
    result = benchmark([short, long, short], BenchConfig(batch_sizes=(1, 4), rounds=150, n_boot=500))
    assert result.clock == "cpu"  # one thread on the CPU target
    for b in result.batches:
        assert b.rounds == 150
        three_x, same = b.models[1].ratios["cpu"], b.models[2].ratios["cpu"]
        assert 1.4 < three_x.low and three_x.high < 3.6, three_x  # 12 vs 4 blocks (fixed per-run costs dilute it)
        assert 0.85 < same.estimate < 1.15, same  # the same file measured twice
        s = b.models[0].summaries["cpu"]
        assert 0 < s.min <= s.median <= s.p90 <= s.p99 <= s.max
    assert [m.label for m in result.models] == ["short.onnx", "long.onnx", "short.onnx#2"]
    assert result.models[0].size_bytes == short.stat().st_size
    data = result.to_dict()
    jsonschema.validate(data, schema)
    assert len(data["batches"][0]["results"][1]["samples_ms"]["cpu"]) == 150
    table = format_bench(result)
    assert "1 (base)" in table and "long.onnx" in table and "95% CI" in table


def test_profile_attributes_the_time_to_the_op_types_that_ran(chains, schema):
    short, long = chains
    result = benchmark([short, long], BenchConfig(batch_sizes=(4,), rounds=20, n_boot=200, profile=True,
                                                  profile_runs=12))
    short_profile, long_profile = (r.profile for r in result.batches[0].models)
    for profile, blocks in ((short_profile, 4), (long_profile, 12)):
        by_op = {t.op_type: t for t in profile}
        assert by_op["MatMul"].nodes == blocks and by_op["Tanh"].nodes == blocks
        assert sum(t.share for t in profile) == pytest.approx(1.0)
        assert all(t.ms_per_run > 0 and t.provider == "CPUExecutionProvider" for t in profile)
        assert [t.ms_per_run for t in profile] == sorted((t.ms_per_run for t in profile), reverse=True)
    data = result.to_dict()
    jsonschema.validate(data, schema)
    assert data["batches"][0]["results"][0]["profile"][0]["op_type"] in ("MatMul", "Tanh")
    assert "where the time goes: long.onnx, batch 4" in format_bench(result)
    plain = benchmark([short], BenchConfig(rounds=5, n_boot=50)).to_dict()
    assert "profile" not in plain["batches"][0]["results"][0]


def test_op_times_skips_non_kernel_events_and_averages_per_run():
    from dlopt.profile import op_times

    events = [{"cat": "Session", "name": "model_run", "dur": 900},
              {"cat": "Node", "name": "mm_kernel_time", "dur": 300, "args": {"op_name": "MatMul", "provider": "CPU"}},
              {"cat": "Node", "name": "mm_fence_before", "dur": 5, "args": {"op_name": "MatMul"}},
              {"cat": "Node", "name": "mm_kernel_time", "dur": 500, "args": {"op_name": "MatMul", "provider": "CPU"}},
              {"cat": "Node", "name": "t_kernel_time", "dur": 200, "args": {"op_name": "Tanh", "provider": "CPU"}}]
    rows = op_times(events, runs=2)
    assert [(r.op_type, r.nodes) for r in rows] == [("MatMul", 1), ("Tanh", 1)]
    assert rows[0].ms_per_run == pytest.approx(0.4) and rows[0].share == pytest.approx(0.8)


def test_profile_drops_the_warm_up_runs():
    from dlopt.profile import _drop_first_runs

    events = []
    for run, start in enumerate((0, 100, 200)):
        events.append({"cat": "Node", "name": "mm_kernel_time", "ts": start + 10, "dur": 50 - 10 * run,
                       "args": {"op_name": "MatMul"}})
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": 80})
    kept = _drop_first_runs(events, 2)
    assert [e["dur"] for e in kept if e["cat"] == "Node"] == [30]  # only the third run's kernel


def test_budget_bounds_the_run(chains):
    seen = []
    start = time.perf_counter()
    result = benchmark([chains[0]], BenchConfig(budget_s=1.0, min_rounds=5, n_boot=200),
                       progress=lambda what, fraction: seen.append((what, fraction)))
    assert time.perf_counter() - start < 1.1
    assert result.batches[0].rounds >= 5 and result.batches[0].seconds < 1.0
    # the progress shows the time left, and its fraction is the budget's share spent
    assert seen and all(what.endswith(" s left") for what, _ in seen)
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1.0


def test_a_sub_millisecond_model_keeps_the_budget_and_gets_a_ci_of_real_width(chains, schema):
    """Everything (sessions, warm-up, rounds, bootstrap) ends within the budget + 10 %; runs of
    microseconds are timed in groups, so the ratio's CI has width, and stored samples stay capped."""
    config = BenchConfig(budget_s=2.0, max_samples=200)
    start = time.perf_counter()
    result = benchmark([chains[0], chains[1]], config, started=start)
    wall = time.perf_counter() - start
    assert wall <= 2.2, f"{wall:.2f} s for a 2 s budget"
    b = result.batches[0]
    assert b.models[0].summaries["cpu"].median < 1e-3  # the model is sub-millisecond per run
    # grouped to about a millisecond per sample, sized from the warm-up's latency: on a loaded host the
    # timed runs may be 15 % faster than the warm-up's (measured here at load 8 on 2 cores), so half of it
    assert b.runs_per_sample > 1 and b.models[0].summaries["cpu"].median * b.runs_per_sample >= 0.5e-3
    assert b.samples <= 200 and b.rounds >= b.samples  # merged past the cap, every round still counted
    assert b.rounds >= config.min_rounds
    ratio = b.models[1].ratios["cpu"]
    assert ratio.high > ratio.low and 1.4 < ratio.estimate < 3.6, ratio
    data = result.to_dict()
    jsonschema.validate(data, schema)
    entry = data["batches"][0]
    assert entry["runs_per_sample"] == b.runs_per_sample and entry["samples"] == b.samples
    assert len(entry["results"][1]["samples_ms"]["cpu"]) == b.samples
    assert f"each sample the mean of {b.runs_per_sample} runs" in format_bench(result)


def test_stored_samples_are_capped_by_merging_adjacent_rounds():
    m = _FakeMachine({"A": 1.0, "B": 3.0})
    costs = iter(range(1, 100))

    def a():
        m.calls.append("A")
        m.now += next(costs)
    sampler = InterleavedSampler([a, m.runner("B")], clock=m.clock, max_samples=4)
    sampler.run_rounds(9)
    # rounds 1-4 fill the cap and merge pairwise (1.5, 3.5); then each sample is the mean of two rounds
    # (5.5, 7.5), the cap is full again and merges (2.5, 6.5); round 9 starts a sample of four rounds
    assert sampler.timed_rounds == 9 and sampler.merged == 4 and sampler.rounds == 2
    np.testing.assert_allclose(sampler.samples(0, "wall"), [2.5, 6.5])
    np.testing.assert_allclose(sampler.samples(1, "wall"), [3.0, 3.0])
    assert sampler.ratio(1, "wall", n_boot=100).n == 2  # pairs stay pairs


def test_run_for_does_not_start_a_round_that_would_end_past_its_time():
    sampler = InterleavedSampler([lambda: time.sleep(0.15)])
    start = time.perf_counter()
    sampler.run_for(0.5)
    assert time.perf_counter() - start <= 0.5 and sampler.rounds == 3


def test_cli_bench_table_and_json(chains, schema, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(chains[0]), str(chains[1]), "--rounds", "30",
                                       "--batch", "1,2", "--json", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "long.onnx" in result.output and "ratio" in result.output
    data = json.loads(out.read_text())
    jsonschema.validate(data, schema)
    assert [b["batch"] for b in data["batches"]] == [1, 2]
    assert data["batches"][0]["results"][1]["ratio"]["cpu"]["estimate"] > 1.5


def test_cli_bench_times_data_one_batch_at_a_time_at_the_batch_sizes_asked(chains, tmp_path, schema):
    data, out = tmp_path / "in.npz", tmp_path / "r.json"
    np.savez(data, x=np.random.default_rng(0).standard_normal((9, WIDTH)).astype(np.float32))
    result = CliRunner().invoke(main, ["bench", str(chains[0]), "--data", str(data), "--batch", "1,4", "--rounds", "5",
                                       "--no-progress", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert f"inputs x[1, {WIDTH}] (9 real batch(es) from {data}, one per call in turn)" in result.output
    assert f"inputs x[4, {WIDTH}] (2 real batch(es) from {data}, one per call in turn)" in result.output
    document = json.loads(out.read_text())
    jsonschema.validate(document, schema)
    assert [(b["batch"], b["data_batches"], b["input_shapes"]) for b in document["batches"]] == [
        (1, 9, {"x": [1, WIDTH]}), (4, 2, {"x": [4, WIDTH]})]
    # the session configuration every model ran with, and the CPU the figures came from
    assert document["target"]["session"]["session_config"] == {"session.set_denormal_as_zero": "1"}
    assert "session config: session.set_denormal_as_zero=1; denormals " in result.output
    assert f"CPU: {document['machine']['cpu_model']}, {document['machine']['cpu_isa']}" in result.output


def test_bound_data_batches_are_run_in_turn(chains):
    import onnxruntime as ort

    from dlopt.bench import BenchConfig, bind_models, load_models

    x = np.random.default_rng(1).standard_normal((6, WIDTH)).astype(np.float32)
    target, models = load_models([chains[0]], BenchConfig())
    runner = bind_models(target, models, batch=2, data={"x": x}).runners[0]  # ran batch 0 once
    reference = ort.InferenceSession(str(chains[0]), providers=["CPUExecutionProvider"])
    for k in (1, 2, 0, 1):
        runner()
        np.testing.assert_allclose(runner.outputs()["y"], reference.run(None, {"x": x[2 * k:2 * k + 2]})[0],
                                   rtol=1e-5, atol=1e-6)


def _masked_model(path):
    """ids, attention_mask [batch, seq] int64 -> y = float(ids) * float(mask)."""
    nodes = [helper.make_node("Cast", ["input_ids"], ["i"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["i", "m"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
              for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "masked", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_speed_lines_state_the_shapes_and_the_padding_of_real_token_inputs(tmp_path):
    model, data = _masked_model(tmp_path / "m.onnx"), tmp_path / "tokens.npz"
    mask = np.zeros((4, 8), np.int64)
    mask[:, :6] = 1  # 6 real tokens padded to 8: a quarter of the tokens are padding
    np.savez(data, input_ids=np.arange(32, dtype=np.int64).reshape(4, 8) * mask, attention_mask=mask)
    result = CliRunner().invoke(main, ["bench", str(model), "--data", str(data), "--batch", "2", "--rounds", "3",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert ("inputs input_ids[2, 8], attention_mask[2, 8] (2 real batch(es) from "
            f"{data}, one per call in turn, 25 % of tokens padding)") in result.output


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "missing.onnx does not exist"),
    (["{m}", "--budget", "soon"], "cannot read 'soon' as a duration"),
    (["{m}", "--batch", "0"], "cannot read batch sizes"),
    (["{m}", "--target", "tpu"], "unknown target 'tpu'"),
    (["{m}", "--threads", "0"], "Invalid value for '--threads': value must be >= 1, not 0"),
    (["{m}", "--rounds", "1"], "hint: e.g. --rounds 200"),
    (["{m}", "--data", "{d}", "--batch", "2"], "holds 1 sample(s), fewer than batch 2"),
    (["{m}", "--data", "{bad}"], "not a readable .npz"),
    (["{m}", "--json", "{nodir}/x.json"], "does not exist"),
])
def test_cli_bench_bad_input_exits_2(chains, tmp_path, args, message):
    d = tmp_path / "in.npz"
    np.savez(d, x=np.ones((1, WIDTH), np.float32))
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    subs = {"m": str(chains[0]), "d": str(d), "bad": str(bad), "nodir": str(tmp_path / "nope")}
    result = CliRunner().invoke(main, ["bench", *[a.format(**subs) for a in args], "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_corrupt_model_file_exits_2(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    result = CliRunner().invoke(main, ["bench", str(bad), "--no-progress"])
    assert result.exit_code == 2 and "not a valid ONNX model" in result.output


def test_sequential_api_for_the_gate_narrows_the_interval_as_rounds_are_added(chains):
    from dlopt.bench import bind_models, load_models

    config = BenchConfig()
    target, models = load_models([chains[0], chains[1]], config)
    bound = bind_models(target, models, batch=1)
    assert len(bound.first_run_s) == 2 and bound.input_shapes == {"x": (1, WIDTH)}
    sampler = InterleavedSampler(bound.runners)
    sampler.warm_up(max_seconds=2.0, clock="cpu")
    sampler.run_rounds(20)
    early = sampler.ratio(1, "cpu", n_boot=500)
    sampler.run_rounds(300)
    late = sampler.ratio(1, "cpu", n_boot=500)
    assert sampler.rounds == 320 and late.n == 320
    assert late.high - late.low < early.high - early.low
    assert late.low > 1.4  # 12 vs 4 blocks, diluted by fixed per-run costs


def test_cli_clock_and_ratio_method_choices_are_recorded(chains, tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(main, ["bench", str(chains[0]), str(chains[1]), "--rounds", "20", "--clock", "wall",
                                       "--ratio-method", "median-ratio", "--json", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["clock"] == "wall" and data["clock_reason"] == "chosen with --clock"
    assert "median(other) / median(baseline)" in data["batches"][0]["results"][1]["ratio"]["wall"]["method"]
    assert "median ms (wall)" in result.output.splitlines()[0]


def test_progress_bar_is_silent_off_a_terminal(capsys):
    from dlopt.cli.bench import progress_bar

    with progress_bar() as report:  # pytest captures stderr: not a terminal
        report("loading", 0.5)
    assert capsys.readouterr().err == ""  # no control characters in CI logs


def test_ort_format_models_are_benchmarked_beside_onnx(chains, tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(chains[0]),
                    "--output_dir", str(tmp_path)], check=True, capture_output=True)
    ort_file = tmp_path / "short.ort"
    result = benchmark([chains[0], ort_file], BenchConfig(rounds=60, n_boot=300))
    assert result.models[1].size_bytes == ort_file.stat().st_size
    assert 0.7 < result.batches[0].models[1].ratios["cpu"].estimate < 1.4  # same graph, other container


def test_result_text_states_the_comparison_and_machine_fingerprint(chains):
    result = benchmark([chains[0], chains[1]], BenchConfig(rounds=40, n_boot=300))
    text = format_bench(result)
    assert "batch 1: long.onnx takes" in text and "x slower" in text and "95% CI" in text
    fingerprint = result.machine
    assert fingerprint["threads"] == 1 and len(fingerprint["cpu_flags_sha256"]) == 16
    import onnxruntime

    assert fingerprint["onnxruntime"] == onnxruntime.__version__ and fingerprint["logical_cores"] >= 1


@pytest.mark.parametrize("changes, api, cli", [
    (dict(threads=0), "threads must be at least 1, got 0 (pass threads=1 or more)",
     "threads must be at least 1, got 0 (pass --threads 1 or more)"),
    (dict(seq_len=0), "the sequence length must be at least 1, got 0 (e.g. seq_len=128)",
     "the sequence length must be at least 1, got 0 (e.g. --seq-len 128)"),
    (dict(rounds=1), "rounds must be at least 2, got 1 (e.g. rounds=200)",
     "rounds must be at least 2, got 1 (e.g. --rounds 200)"),
    (dict(budget_s=0), "the time budget must be positive, got 0 s (e.g. 30 s)",
     "the time budget must be positive, got 0 s (e.g. 30 s)"),
])
def test_config_errors_name_keyword_arguments_for_api_users_and_flags_on_the_cli(changes, api, cli):
    from dlopt.bench import validate_config

    with pytest.raises(InputError) as e:
        validate_config(BenchConfig(**changes))
    assert (str(e.value), e.value.cli_text()) == (api, cli)
