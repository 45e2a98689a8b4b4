"""How often `dlopt gate` cries wolf, how often it catches a real slowdown, and how long it takes.

Builds a MiniLM-sized BERT encoder in ONNX directly (random weights, seeded: 6 layers, hidden 384,
12 heads, FFN 1536, vocabulary 30522; ~90 MB, the size and shape of all-MiniLM-L6-v2) and slowed
copies of it that do p % extra work: one extra MatMul [T, 384] x [384, W] from the embedding output,
whose (reduced) result is an extra graph output so that no optimizer can remove it.

Sizing W by multiply-accumulates undershoots (a large MatMul does more MACs per second than the
encoder's mix of small MatMuls, softmax, layer norms and reshapes: +20 % of the MACs measured as
+12 % of the time), so W is calibrated by time: the extra MatMul alone is timed against the encoder,
interleaved, and W is scaled so that it costs p % of the encoder's time. Each copy's real slowdown is
then measured (a long interleaved run against the original) and printed beside its nominal one.

Then it runs the gate, default settings, `--runs` times per level, levels interleaved (run 1 of every
level, then run 2 …) so that every level sees the same mix of machine states, and prints:
false alarms at +0 % (exit 1), the detection rate per level (exit 1), passes, inconclusives, and the
time per decision (loading, warm-up and sampling). Every decision is appended to
out/gate_power/runs.jsonl as it happens, so a long run can be cut short and still reported
(`--report-only`).

    python benchmarks/gate_power.py                               # 20 runs x 5 levels, seq 128
    python benchmarks/gate_power.py --runs 3 --levels 0,10        # a quick look
    python benchmarks/gate_power.py --report-only                 # the table from runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from dlopt.fileio import save_onnx_atomic
from dlopt.tables import format_table

OUT = Path(os.environ.get("DLOPT_GATE_POWER_OUT", "out/gate_power"))
LAYERS, HIDDEN, HEADS, FFN, VOCAB, MAX_POS = 6, 384, 12, 1536, 30522, 512


def model_macs_per_token(seq_len: int) -> int:
    """Multiply-accumulates per token of the encoder: Q, K, V, O and the two FFN matmuls, plus the
    attention scores and context (T each per hidden unit)."""
    per_layer = 4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN + 2 * seq_len * HIDDEN
    return LAYERS * per_layer


def build_bert(*, extra_width: int = 0, seed: int = 0):
    """The encoder as an onnx.ModelProto; with extra_width > 0, plus a [T, 384] x [384, extra_width] MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    initializers, nodes = [], []

    def weight(name, shape, scale=0.02, offset=0.0):
        array = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
        initializers.append(numpy_helper.from_array(array, name))
        return name

    def const(name, value):
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    head_dim = HIDDEN // HEADS
    const("zero", np.array(0, np.int64))
    const("one_i", np.array(1, np.int64))
    const("one_f", np.array(1.0, np.float32))
    const("neg_big", np.array(-10000.0, np.float32))
    const("scale", np.array(1 / np.sqrt(head_dim), np.float32))
    const("split_heads", np.array([0, 0, HEADS, head_dim], np.int64))
    const("merge_heads", np.array([0, 0, HIDDEN], np.int64))
    const("axes_12", np.array([1, 2], np.int64))
    const("axis_last", np.array([-1], np.int64))

    x = node("Gather", [weight("word_emb", (VOCAB, HIDDEN)), "input_ids"], "words")
    length = node("Gather", [node("Shape", ["input_ids"], "ids_shape"), "one_i"], "length", axis=0)
    positions = node("Range", ["zero", length, "one_i"], "positions")
    x = node("Add", [x, node("Gather", [weight("pos_emb", (MAX_POS, HIDDEN)), positions], "pos")], "e1")
    x = node("Add", [x, node("Gather", [weight("type_emb", (2, HIDDEN)), "zero"], "types")], "e2")
    x = node("LayerNormalization", [x, weight("emb_ln_g", (HIDDEN,), 0.02, 1.0), weight("emb_ln_b", (HIDDEN,))],
             "embeddings", axis=-1, epsilon=1e-12)
    embeddings = x
    mask = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    bias = node("Unsqueeze", [node("Mul", [node("Sub", ["one_f", mask], "unmasked"), "neg_big"], "bias2"),
                              "axes_12"], "bias4")
    for layer in range(LAYERS):
        p = f"l{layer}_"

        def linear(inp, n_in, n_out, name):
            product = node("MatMul", [inp, weight(p + name + "_w", (n_in, n_out))], p + name + "_mm")
            return node("Add", [product, weight(p + name + "_b", (n_out,))], p + name)

        def heads(inp, name, perm):
            return node("Transpose", [node("Reshape", [inp, "split_heads"], p + name + "_r")], p + name + "_t",
                        perm=perm)

        q = heads(linear(x, HIDDEN, HIDDEN, "q"), "q", [0, 2, 1, 3])
        k = heads(linear(x, HIDDEN, HIDDEN, "k"), "k", [0, 2, 3, 1])
        v = heads(linear(x, HIDDEN, HIDDEN, "v"), "v", [0, 2, 1, 3])
        scores = node("Add", [node("Mul", [node("MatMul", [q, k], p + "qk"), "scale"], p + "qk_s"), bias], p + "qk_b")
        context = node("MatMul", [node("Softmax", [scores], p + "probs", axis=-1), v], p + "ctx")
        context = node("Reshape", [node("Transpose", [context], p + "ctx_t", perm=[0, 2, 1, 3]), "merge_heads"],
                       p + "ctx_m")
        x = node("Add", [x, linear(context, HIDDEN, HIDDEN, "o")], p + "res1")
        x = node("LayerNormalization", [x, weight(p + "ln1_g", (HIDDEN,), 0.02, 1.0), weight(p + "ln1_b", (HIDDEN,))],
                 p + "ln1", axis=-1, epsilon=1e-12)
        ffn = linear(node("Gelu", [linear(x, HIDDEN, FFN, "f1")], p + "gelu"), FFN, HIDDEN, "f2")
        x = node("Add", [x, ffn], p + "res2")
        x = node("LayerNormalization", [x, weight(p + "ln2_g", (HIDDEN,), 0.02, 1.0), weight(p + "ln2_b", (HIDDEN,))],
                 p + "ln2", axis=-1, epsilon=1e-12)
    node("Identity", [x], "last_hidden_state")
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    if extra_width > 0:
        extra = node("MatMul", [embeddings, weight("extra_w", (HIDDEN, extra_width))], "extra_mm")
        node("ReduceMean", [extra, "axis_last"], "extra", keepdims=0)
        outputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["batch", "seq"]))
    graph = helper.make_graph(nodes, "minilm_sized_bert", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="dlopt gate_power")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def build_extra_only(width: int, seed: int = 1):
    """Just the extra work: embeddings [B, T, 384] -> MatMul [384, width] -> mean over the last axis."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((HIDDEN, width)) * 0.02).astype(np.float32), "extra_w")
    axis = numpy_helper.from_array(np.array([-1], np.int64), "axis_last")
    nodes = [helper.make_node("MatMul", ["embeddings", "extra_w"], ["extra_mm"]),
             helper.make_node("ReduceMean", ["extra_mm", "axis_last"], ["extra"], keepdims=0)]
    graph = helper.make_graph(nodes, "extra_only",
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT,
                                                             ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["batch", "seq"])],
                              initializer=[w, axis])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _interleaved(paths: list[Path], seq_len: int, seconds: float):
    from dlopt.bench import BenchConfig, InterleavedSampler, load_models, model_feeds

    target, models = load_models(paths, BenchConfig(threads=1, seq_len=seq_len))
    runners = [target.bind(m.handle, model_feeds(m, batch=1, seq_len=seq_len, seed=0, data=None)) for m in models]
    sampler = InterleavedSampler(runners)
    sampler.warm_up(max_seconds=min(10.0, seconds / 4), clock="cpu")
    sampler.run_for(seconds, min_rounds=20)
    return sampler


def calibrate(seq_len: int, seconds: float) -> float:
    """The extra MatMul width that costs as much thread-CPU time as the whole encoder (so width
    p * that costs p of it): a probe of the MACs-estimated +20 % width timed against the encoder."""
    cache = OUT / f"calibration_seq{seq_len}.json"
    if cache.exists():
        return float(json.loads(cache.read_text())["width_per_unit"])
    base = OUT / "bert_base.onnx"
    if not base.exists():
        save_onnx_atomic(build_bert(), base)
    probe_width = round(0.2 * model_macs_per_token(seq_len) / HIDDEN)
    probe = OUT / f"extra_only_w{probe_width}.onnx"
    save_onnx_atomic(build_extra_only(probe_width), probe)
    sampler = _interleaved([base, probe], seq_len, seconds)
    ratio = sampler.ratio(1, "cpu")
    width_per_unit = probe_width / ratio.estimate
    print(f"calibration: extra MatMul of width {probe_width} costs {ratio.estimate:.2%} "
          f"[{ratio.low:.2%}, {ratio.high:.2%}] of the encoder's CPU time ({sampler.rounds} rounds) -> "
          f"width {width_per_unit:.0f} per 100 %", file=sys.stderr)
    cache.write_text(json.dumps({"width_per_unit": width_per_unit, "probe_width": probe_width,
                                 "probe_ratio": ratio.as_dict(), "rounds": sampler.rounds}))
    return width_per_unit


def refine_calibration(seq_len: int) -> None:
    """Second calibration step, in the model: fit the width per 100 % through the origin to the
    slowdowns the copies really showed in the last verification (measured_seq*.json), weighting the
    larger copies more, and store it. The extra MatMul alone costs a bit more than it adds inside the
    encoder (the two share caches differently), so the first step alone undershoots by ~10 %."""
    cache = OUT / f"calibration_seq{seq_len}.json"
    measured_file = OUT / f"measured_seq{seq_len}.json"
    if not cache.exists() or not measured_file.exists():
        raise SystemExit("refining needs a calibration and a verification run first")
    calibration = json.loads(cache.read_text())
    measured = {float(k): v[0] - 1 for k, v in json.loads(measured_file.read_text()).items() if float(k) > 0}
    old = float(calibration["width_per_unit"])
    widths = np.array([round(level / 100 * old) for level in measured])
    slowdowns = np.array(list(measured.values()))
    per_width = float(np.sum(widths * slowdowns) / np.sum(widths ** 2))
    calibration["width_per_unit"] = 1 / per_width
    calibration["refined_from"] = {"width_per_unit": old, "measured": {str(k): v for k, v in measured.items()}}
    cache.write_text(json.dumps(calibration))
    print(f"calibration refined in the model: width per 100 % {old:.0f} -> {1 / per_width:.0f}", file=sys.stderr)


def model_paths(levels: list[float], seq_len: int, calibration_seconds: float) -> dict[float, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    width_per_unit = calibrate(seq_len, calibration_seconds)
    paths = {}
    for level in sorted(set([0.0] + levels)):
        width = round(level / 100 * width_per_unit)
        path = OUT / (f"bert_plus{level:g}_w{width}.onnx" if width else "bert_base.onnx")
        if not path.exists():
            print(f"building {path.name}", file=sys.stderr)
            save_onnx_atomic(build_bert(extra_width=width), path)
        paths[level] = path
    return paths


def verify_slowdowns(paths: dict[float, Path], seq_len: int, seconds: float) -> dict[float, tuple[float, float, float]]:
    """The real slowdown of each copy: the base and all copies interleaved for `seconds`,
    ratio of median thread-CPU times with a paired 95 % CI."""
    levels = sorted(paths)
    sampler = _interleaved([paths[level] for level in levels], seq_len, seconds)
    measured = {}
    for i, level in enumerate(levels):
        if i == 0:
            measured[level] = (1.0, 1.0, 1.0)
            continue
        r = sampler.ratio(i, "cpu")
        measured[level] = (r.estimate, r.low, r.high)
    base_ms = float(np.median(sampler.samples(0, "cpu"))) * 1e3
    print(f"verification: {sampler.rounds} interleaved rounds; base model {base_ms:.1f} ms CPU per run "
          f"(seq {seq_len}, 1 thread)", file=sys.stderr)
    return measured


def run_decisions(paths: dict[float, Path], levels: list[float], runs: int, seq_len: int, budget: float,
                  log: Path) -> None:
    from dlopt.gate import GateConfig, run_gate

    config = GateConfig(seq_len=seq_len, budget_s=budget)
    for r in range(runs):
        for level in levels:
            start = time.perf_counter()
            cpu_start = time.process_time()
            result = run_gate(paths[0.0], paths[level], config)
            wall = time.perf_counter() - start
            latency = result.latency
            interval = latency.interval
            record = {"level": level, "run": r, "verdict": result.verdict, "exit_code": result.exit_code,
                      "seconds": wall, "process_cpu_s": time.process_time() - cpu_start, "rounds": latency.rounds,
                      "looks": len(latency.looks), "sampling_s": latency.seconds,
                      "warmup_rounds": result.warmup["rounds"],
                      "estimate": interval.estimate if interval else None,
                      "low": interval.low if interval else None, "high": interval.high if interval else None,
                      "seq_len": seq_len, "budget_s": budget}
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"+{level:g}% run {r + 1}/{runs}: {result.verdict} (exit {result.exit_code}) in {wall:.1f} s, "
                  f"{latency.rounds} rounds, ratio {interval.estimate if interval else float('nan'):.3f}",
                  file=sys.stderr, flush=True)


def report(log: Path, measured: dict[float, tuple[float, float, float]] | None) -> str:
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    if not records:
        return "no decisions recorded yet"
    headers = ["extra work", "measured slowdown", "runs", "exit 1 (fail)", "pass", "inconclusive",
               "median s/decision", "p90 s", "max s", "median rounds", "median ratio"]
    rows = []
    for level in sorted({r["level"] for r in records}):
        rs = [r for r in records if r["level"] == level]
        n = len(rs)
        fails = sum(r["exit_code"] == 1 for r in rs)
        passes = sum(r["verdict"] == "pass" for r in rs)
        inconclusive = sum(r["verdict"] == "inconclusive" for r in rs)
        seconds = np.array([r["seconds"] for r in rs])
        estimates = [r["estimate"] for r in rs if r["estimate"] is not None]
        # the gate's default threshold is +5 %: failing a smaller slowdown is a false alarm
        label = "false alarms" if level < 5 else "at threshold" if level == 5 else "detected"
        m = (measured or {}).get(level)
        rows.append([f"+{level:g} %", f"{m[0] - 1:+.1%} [{m[1] - 1:+.1%}, {m[2] - 1:+.1%}]" if m else "n/a", n,
                     f"{fails}/{n} = {fails / n:.0%} ({label})", f"{passes}/{n}", f"{inconclusive}/{n}",
                     float(np.median(seconds)), float(np.percentile(seconds, 90)), float(seconds.max()),
                     float(np.median([r["rounds"] for r in rs])),
                     float(np.median(estimates)) if estimates else float("nan")])
    seq = sorted({r["seq_len"] for r in records})
    budget = sorted({r["budget_s"] for r in records})
    return (format_table(headers, rows) + f"\n(seq len {seq}, budget {budget} s, threshold +5 %, default settings; "
            f"all decisions: median {np.median([r['seconds'] for r in records]):.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="gate decisions per level (default 20)")
    parser.add_argument("--levels", default="0,3,5,10,20", help="extra work in %% (default 0,3,5,10,20)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per input (default 128)")
    parser.add_argument("--budget", type=float, default=60.0, help="the gate's budget in s (default 60, the default)")
    parser.add_argument("--calibration-seconds", type=float, default=30.0,
                        help="how long to time the extra MatMul against the encoder (once; cached)")
    parser.add_argument("--verify-seconds", type=float, default=60.0,
                        help="how long to measure the copies' real slowdowns (0: skip)")
    parser.add_argument("--refine-calibration", action="store_true",
                        help="rescale the extra work from the last verification's measured slowdowns first")
    parser.add_argument("--report-only", action="store_true", help="print the table from runs.jsonl and exit")
    parser.add_argument("--fresh", action="store_true", help="start a new runs.jsonl")
    args = parser.parse_args()
    from dlopt.runtime import cpu_label

    print(f"CPU: {cpu_label()}")  # every figure below was measured on it
    levels = [float(v) for v in args.levels.split(",")]
    log = OUT / "runs.jsonl"
    measured_file = OUT / f"measured_seq{args.seq_len}.json"
    measured = None
    if measured_file.exists():
        measured = {float(k): tuple(v) for k, v in json.loads(measured_file.read_text()).items()}
    if args.report_only:
        print(report(log, measured))
        return
    if args.refine_calibration:
        refine_calibration(args.seq_len)
    paths = model_paths(levels, args.seq_len, args.calibration_seconds)
    if args.verify_seconds > 0:
        measured = verify_slowdowns(paths, args.seq_len, args.verify_seconds)
        measured_file.write_text(json.dumps({str(k): v for k, v in measured.items()}))
        print(format_table(["extra work (nominal)", "measured slowdown", "95% CI"],
                           [[f"+{k:g} %", f"{v[0] - 1:+.2%}", f"[{v[1] - 1:+.2%}, {v[2] - 1:+.2%}]"]
                            for k, v in sorted(measured.items())]), flush=True)
    if args.fresh and log.exists():
        log.unlink()
    run_decisions(paths, levels, args.runs, args.seq_len, args.budget, log)
    print(report(log, measured))


if __name__ == "__main__":
    main()
