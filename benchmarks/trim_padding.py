"""Padding removal on MiniLM: INT8 untrimmed, sliced and packed, and FP32 sliced, against FP32 on the same
padded inputs, in one interleaved run (issue 21's acceptance).

    python benchmarks/trim_padding.py [--samples 64] [--cycles 2] [--workdir out/trim_padding]
        [--baseline-workdir DIR]

--baseline-workdir: the INT8 models of an earlier build (another checkout's --workdir) timed in the same
run, as rows "... (baseline)": a change's gain measured side by side rather than across two runs.

Forms (dlopt.optimize.trim_padding): "sliced" cuts every row to the batch's longest real length; "packed"
computes only the real tokens of all rows (the per-token layers on [T, H], attention per row on [B, L]).
`dlopt quantize --trim-padding auto` chooses packed where the graph allows it and the check passes; its
packed model runs a batch with no padding once sliced (every batch of 1) through the sliced body (an If).

Then batch 8 again with the sentences sorted by real length before batching. Each run times every data
batch equally often (--cycles rounds per batch): batches differ in their longest real length, so a run
that stopped at a time budget part-way through the cycle would weigh the batches unevenly.

Inputs: model:minilm's real sentences (Pang-Lee), tokenized and padded to 128, cut into consecutive
batches of 1 and of 8 (dlopt.bench cycles through them, one real batch per call). Latency: dlopt.bench
(one intra-op thread, thread CPU time, models interleaved, ratio = median of per-round quotients with a
bootstrap 95 % CI). Fidelity: embedding cosine against FP32 on the same padded batches. Models: FP32 from
`dlopt export minilm`; INT8 from `dlopt quantize --calibration model:minilm` with `--trim-padding off`
and with the default `auto` (packed); INT8 sliced: the trim-padding transform with form slice on the
untrimmed INT8 model, checked against FP32 as quantize checks it; FP32 sliced with the trim-padding stage
(FP32's unfused attention cannot be packed). Cached in --workdir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build(workdir: Path) -> dict[str, Path]:
    import onnx

    from dlopt.api import export_model
    from dlopt.bench import load_data
    from dlopt.optimize.quantize import QuantizeConfig, quantize_file
    from dlopt.optimize.trim_padding import TrimPadding, trim_padding

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": workdir / "minilm_fp32.onnx", "int8": workdir / "minilm_int8.onnx",
             "int8 packed": workdir / "minilm_int8_trimmed.onnx", "int8 sliced": workdir / "minilm_int8_sliced.onnx",
             "fp32 sliced": workdir / "minilm_fp32_trimmed.onnx"}
    if not paths["fp32"].exists():
        log("dlopt export minilm")
        export_model("minilm", paths["fp32"])
    for name, mode in (("int8", "off"), ("int8 packed", "auto")):
        if not paths[name].exists():
            log(f"dlopt quantize --trim-padding {mode}")
            report = quantize_file(paths["fp32"], paths[name], QuantizeConfig(trim_padding=mode), "model:minilm",
                                   log=log).report
            if mode == "auto" and report["trim_padding"].get("form") != "pack":
                raise SystemExit(f"trim-padding auto did not pack: {report['trim_padding']}")
    samples = load_data("model:minilm", samples=16, seq_len=128)
    feeds = [{k: v[i:i + 1] for k, v in samples.items()} for i in range(16)]
    for name, source, reference in (("fp32 sliced", "fp32", None), ("int8 sliced", "int8", "fp32")):
        if not paths[name].exists():
            result = trim_padding(onnx.load(paths[source]), TrimPadding(form="slice"), feeds,
                                  reference=onnx.load(paths[reference]) if reference else None)
            if not result.report["applied"]:
                raise SystemExit(f"trim-padding did not apply to {source}: {result.report['reason']}")
            onnx.save(result.model, paths[name])
    return paths


def cosines(paths: dict[str, Path], data: dict[str, np.ndarray], batch: int) -> dict[str, float]:
    """Mean and worst embedding cosine of each model against FP32, on the padded batches benchmarked."""
    from dlopt.fidelity import cosine_per_sample
    from dlopt.sessions import cpu_session, run_outputs

    n = len(next(iter(data.values()))) // batch * batch
    feeds = [{k: v[i:i + batch] for k, v in data.items()} for i in range(0, n, batch)]
    ref = [r[0] for r in run_outputs(cpu_session(paths["fp32"]), feeds)]
    out = {}
    for name, path in paths.items():
        if name == "fp32":
            continue
        got = [r[0] for r in run_outputs(cpu_session(path), feeds)]
        c = np.concatenate([cosine_per_sample(g, r) for g, r in zip(got, ref)])
        out[name] = (float(c.mean()), float(c.min()))
    return out


def measure(paths: dict[str, Path], names: list[str], data: dict[str, np.ndarray], batch: int, cycles: int,
            source: str, figures: dict, tag: str = "") -> list[list]:
    """One interleaved dlopt.bench run at `batch`, rounds = `cycles` times the data's batches (each batch
    of a different longest length is timed equally often), and the rows of the speed-up table."""
    from dlopt.bench import MAX_DATA_BATCHES, BenchConfig, benchmark, format_bench

    batches = min(len(next(iter(data.values()))) // batch, MAX_DATA_BATCHES)
    result = benchmark([paths[k] for k in names], BenchConfig(threads=1, batch_sizes=(batch,), clock="cpu",
                                                             rounds=max(2, cycles * batches)),
                       data=data, data_source=source)
    print(format_bench(result) + "\n")
    quality = cosines({k: paths[k] for k in names}, data, batch)
    b = result.batches[0]
    rows = []
    for i, name in enumerate(names[1:], start=1):
        r = b.models[i].ratios["cpu"]
        speedup, low, high = 1 / r.estimate, 1 / r.high, 1 / r.low
        cos_mean, cos_min = quality[name]
        rows.append([name + tag, batch, f"{speedup:.2f}x", f"[{low:.2f}, {high:.2f}]", f"{cos_mean:.4f}",
                     f"{cos_min:.4f}", b.rounds])
        figures[f"{name}{tag} b{batch}"] = {"speedup": speedup, "ci": [low, high], "cos_mean": cos_mean,
                                            "cos_min": cos_min, "rounds": b.rounds}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="padded sentences (cycled in batches)")
    parser.add_argument("--cycles", type=int, default=2, help="timed rounds per data batch")
    parser.add_argument("--workdir", type=Path, default=Path("out/trim_padding"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--baseline-workdir", type=Path, default=None,
                        help="an earlier build's workdir: its INT8 models timed in the same run")
    args = parser.parse_args()

    import os

    from dlopt.bench import load_data, padding_share
    from dlopt.tables import format_table
    from dlopt.runtime import cpu_label

    paths = build(args.workdir)
    data = load_data("model:minilm", samples=args.samples, seq_len=128)
    lengths = data["attention_mask"].sum(axis=1)
    print(f"CPU: {cpu_label()}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"inputs: {args.samples} Pang-Lee sentences, input_ids/attention_mask [B, 128] (padded to 128), "
          f"{100 * padding_share([data]):.0f} % padding, real lengths {lengths.min()}-{lengths.max()} "
          f"(mean {lengths.mean():.1f})\n")
    names = ["fp32", "fp32 sliced", "int8", "int8 sliced", "int8 packed"]
    int8_names = ["int8", "int8 sliced", "int8 packed"]
    if args.baseline_workdir is not None:
        baseline = {"int8": "minilm_int8.onnx", "int8 sliced": "minilm_int8_sliced.onnx",
                    "int8 packed": "minilm_int8_trimmed.onnx"}
        for name, file in baseline.items():
            if not (args.baseline_workdir / file).exists():
                raise SystemExit(f"{args.baseline_workdir / file}: no such model; build the baseline first")
            paths[f"{name} (baseline)"] = args.baseline_workdir / file
            names.append(f"{name} (baseline)")
            int8_names.append(f"{name} (baseline)")
    figures: dict = {}
    rows = []
    for batch in (1, 8):
        rows += measure(paths, names, data, batch, args.cycles, "model:minilm padded to 128", figures)
    # The same sentences sorted by real length before batching (what a server that groups requests by
    # length sends): each batch of 8 is then trimmed to nearly its members' own lengths.
    order = np.argsort(lengths, kind="stable")
    sorted_data = {k: v[order] for k, v in data.items()}
    rows += measure(paths, ["fp32"] + int8_names, sorted_data, 8, args.cycles,
                    "model:minilm padded to 128, sorted by length", figures, tag=", sorted by length")
    print(f"## speed-up over FP32 on the same padded inputs [B, 128] (thread CPU time, one thread, {cpu_label()}), "
          "embedding cosine vs FP32")
    print(format_table(["model", "batch", "speed-up", "95% CI", "cos mean", "cos min", "rounds"], rows))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_label(), "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
