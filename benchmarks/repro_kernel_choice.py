"""Reproducible kernel choice and the quick speed check against `dlopt bench` (issue 21, items 3-4).

    python benchmarks/repro_kernel_choice.py [--model efficientnet-lite0] [--runs 4] [--budget 30]

1. The same static INT8 quantize with --node-forms auto, `--runs` times one after another and then as
   many at once, while a busy-loop process loads the CPU, into one fresh decision cache; prints each
   run's model sha256 and where its decisions came from (timed / cache).
2. The first run's quick speed check (its figure and CI, from the report) beside `dlopt bench` on the
   same model pair, inputs and thread count (one thread, thread CPU time).
Labels every figure with the CPU (dlopt.runtime.cpu_label).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUANTIZE = """
import sys
from dlopt.optimize.quantize import QuantizeConfig, quantize_file
quantize_file(sys.argv[1], sys.argv[2], QuantizeConfig(mode="static", calibration_samples=int(sys.argv[4])),
              sys.argv[3])
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def report_of(path: Path) -> dict:
    return json.loads(path.with_name(path.name[:-5] + ".quantize.json").read_text())


def sources(report: dict) -> str:
    decisions = (report.get("node_forms") or {}).get("decisions", []) + \
        (report.get("kernel_choice") or {}).get("decisions", [])
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d["source"]] = counts.get(d["source"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--budget", type=float, default=30.0, help="dlopt bench's budget in seconds")
    parser.add_argument("--work", default=None, help="folder for the models (default: a temporary one)")
    args = parser.parse_args()

    from dlopt.tables import format_table
    from dlopt.runtime import cpu_label

    work = Path(args.work or tempfile.mkdtemp(prefix="repro-"))
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / f"{args.model}_fp32.onnx"
    if not fp32.exists():
        from dlopt.api import export_model

        log(f"exporting {args.model}")
        export_model(args.model, fp32)
    env = {**os.environ, "DLOPT_CACHE_DIR": str(work / "cache")}
    calibration = f"model:{args.model}"

    def quantize(outputs: list[Path]) -> None:
        processes = [subprocess.Popen([sys.executable, "-c", QUANTIZE, str(fp32), str(out), calibration,
                                       str(args.samples)], env=env, stderr=subprocess.PIPE) for out in outputs]
        for p in processes:
            _, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(err.decode()[-3000:])

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    rows = []
    try:
        sequential = [work / f"seq{i}.onnx" for i in range(args.runs)]
        for out in sequential:
            log(f"quantize -> {out.name} (under load)")
            quantize([out])
        concurrent = [work / f"par{i}.onnx" for i in range(args.runs)]
        log(f"{args.runs} quantizes at once (under load)")
        quantize(concurrent)
    finally:
        busy.kill()
        busy.wait()
    for out in sequential + concurrent:
        report = report_of(out)
        forms = report.get("node_forms") or {}
        rows.append([out.name, sha(out)[:16], sources(report), ", ".join(forms.get("float_classes", [])) or "-",
                     f"{report['fidelity']['outputs'][next(iter(report['fidelity']['outputs']))]['sqnr_db']:.2f}"])
    print(f"\n{args.model}: static INT8, --node-forms auto, a busy-loop process running; one decision cache "
          f"({cpu_label()})")
    print(format_table(["run", "model sha256", "decisions", "float classes", "SQNR dB"], rows))
    hashes = {r[1] for r in rows}
    print(f"{len(hashes)} distinct model hash(es) over {len(rows)} runs")

    # the quick check beside dlopt bench, same pair, same feed, no load
    first = report_of(sequential[0])
    speed = first["speed_check"]
    from dlopt.bench import BenchConfig, benchmark
    from dlopt.fileio import load_onnx
    from dlopt.inputs import take_samples  # noqa: F401  (the held-out feed is read the way quantize reads it)
    from dlopt.optimize.quantize.heldout import split_holdout
    from dlopt.data import load_data as load_calibration
    from dlopt.optimize.quantize import QuantizeConfig

    model = load_onnx(fp32)
    data = load_calibration(calibration, model, limit=args.samples)
    _, held_out, _ = split_holdout(data, None, QuantizeConfig())
    feed = {k: v for k, v in held_out[0].items()}
    log(f"dlopt bench {fp32.name} vs {sequential[0].name} ({args.budget:.0f} s, one thread, thread CPU time)")
    result = benchmark([fp32, sequential[0]], BenchConfig(threads=1, clock="cpu", budget_s=args.budget),
                       data={k: v for k, v in feed.items()}, data_source="the quick check's feed")
    run = result.batches[0]
    ratio = run.models[1].ratios["cpu"]
    bench_speedup, bench_ci = 1 / ratio.estimate, (1 / ratio.high, 1 / ratio.low)
    ci = speed.get("speedup_ci")
    print(f"\n{args.model}: the quick speed check beside dlopt bench, b1, one thread, thread CPU time "
          f"({cpu_label()})")
    print(format_table(["measure", "rounds", "FP32 ms", "INT8 ms", "speed-up", "95% CI"], [
        ["quantize's quick check" + (" (rough)" if speed.get("rough") else ""), speed["rounds"],
         f"{speed['float_ms']:.2f}", f"{speed['quantized_ms']:.2f}", f"{speed['speedup']:.3f}",
         f"[{ci[0]:.3f}, {ci[1]:.3f}]"],
        [f"dlopt bench ({args.budget:.0f} s)", run.rounds, f"{run.models[0].summaries['cpu'].median * 1e3:.2f}",
         f"{run.models[1].summaries['cpu'].median * 1e3:.2f}", f"{bench_speedup:.3f}",
         f"[{bench_ci[0]:.3f}, {bench_ci[1]:.3f}]"]]))
    overlap = ci[0] <= bench_ci[1] and bench_ci[0] <= ci[1]
    print(f"the quick check's CI {'overlaps' if overlap else 'does NOT overlap'} dlopt bench's; bench's estimate "
          f"{'is' if ci[0] <= bench_speedup <= ci[1] else 'is NOT'} inside the quick check's CI")


if __name__ == "__main__":
    main()
