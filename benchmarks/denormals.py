"""MiniLM FP32 vs INT8 with and without denormals flushed to zero, on padded real sentences.

    python benchmarks/denormals.py [--workdir DIR] [--batches 1,8] [--seq-len 128] [--rounds 12] [--repeats 2]

Why separate processes: ONNX Runtime sets flush-to-zero / denormals-are-zero on the calling thread
once per process, from the first session created (see dlopt.runtime). So each setting runs in a child
process of its own, whose first session does or does not carry `session.set_denormal_as_zero`; a probe
graph in the child reports what really held. Inside a child, FP32 and INT8 are interleaved round by
round (one intra-op thread, thread CPU time); the children alternate (with, without, with, …) and
each cell is the median over the repeats. Feeds: real Pang-Lee sentences tokenized and padded to
--seq-len (what users run), and the random ids with an all-ones mask that `dlopt bench` generates.

Models: FP32 from `dlopt export minilm`, INT8 from `dlopt quantize` (auto), cached in --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD_FLAG = "--child"


def _feeds(session, kind: str, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    from dlopt.inputs import session_inputs, synthetic_feeds

    specs = session_inputs(session)
    if kind == "random ids, mask all ones":  # what dlopt bench generates for it
        return synthetic_feeds(specs, batch=batch, seq_len=seq_len, seed=0)[0]
    from dlopt.models import minilm

    texts = [t for t in minilm.evaluation_texts()][:batch]
    tokens = minilm.tokenize(texts, seq_len=seq_len)
    return {s.name: tokens[s.name] for s in specs}


def child(args) -> None:
    """One process, one denormal setting: every feed and batch, FP32 and INT8 interleaved."""
    import onnxruntime as ort

    from dlopt import runtime
    from dlopt.bench import InterleavedSampler
    from dlopt.sessions import session_options

    flush = args.child == "on"
    runtime.initialize(denormal_as_zero=flush)  # this process's first session decides the calling thread
    sessions = [ort.InferenceSession(str(p), session_options(denormal_as_zero=flush),
                                     providers=["CPUExecutionProvider"]) for p in (args.fp32, args.int8)]
    out = {"flushed": runtime.flush_denormals(), "cells": []}
    for kind in ("padded real sentences", "random ids, mask all ones"):
        for batch in args.batches:
            feeds = _feeds(sessions[0], kind, batch, args.seq_len)
            padding = float(1 - feeds["attention_mask"].mean()) if "attention_mask" in feeds else 0.0
            runners = [lambda s=s: s.run(None, feeds) for s in sessions]
            for run in runners:
                run(), run()
            sampler = InterleavedSampler(runners)
            sampler.run_rounds(args.rounds if batch == 1 else max(4, args.rounds // 2))
            fp32, int8 = (sampler.samples(i, "cpu") for i in range(2))
            out["cells"].append({"feed": kind, "batch": batch, "shape": list(feeds["input_ids"].shape),
                                 "padding": padding, "fp32_ms": float(np.median(fp32) * 1e3),
                                 "int8_ms": float(np.median(int8) * 1e3),
                                 "speedup": float(np.median(fp32 / np.maximum(int8, 1e-9)))})
    print(json.dumps(out))


def models(work: Path) -> tuple[Path, Path]:
    fp32, int8 = work / "minilm_fp32.onnx", work / "minilm_int8_auto.onnx"
    if not fp32.exists():
        from dlopt.api import export_model

        export_model("minilm", fp32)
    if not int8.exists():
        from dlopt.optimize.quantize import QuantizeConfig, quantize_file

        quantize_file(fp32, int8, QuantizeConfig(calibration_samples=32), "model:minilm")
    return fp32, int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dlopt-bench-quantize"))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds at batch 1 (half at larger)")
    parser.add_argument("--repeats", type=int, default=2, help="child processes per setting, alternating")
    parser.add_argument(CHILD_FLAG, choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--fp32", help=argparse.SUPPRESS)
    parser.add_argument("--int8", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batches = tuple(int(b) for b in str(args.batches).split(","))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        child(args)
        return
    from dlopt.tables import format_table
    from dlopt.runtime import cpu_label

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    fp32, int8 = models(work)
    print(f"CPU: {cpu_label()}; one intra-op thread, thread-CPU-time medians; MiniLM-L6 FP32 "
          f"({fp32.name}) vs INT8 auto ({int8.name}) interleaved in each process")
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(args.repeats):
        for setting in ("on", "off"):
            command = [sys.executable, __file__, CHILD_FLAG, setting, "--fp32", str(fp32), "--int8", str(int8),
                       "--batches", ",".join(map(str, args.batches)), "--seq-len", str(args.seq_len),
                       "--rounds", str(args.rounds)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    cells = runs["on"][0]["cells"]
    for k, cell in enumerate(cells):
        med = {s: {key: float(np.median([r["cells"][k][key] for r in runs[s]])) for key in
                   ("fp32_ms", "int8_ms", "speedup")} for s in runs}
        flushed = {s: all(r["flushed"] for r in runs[s]) for s in runs}
        for s in ("off", "on"):
            rows.append([cell["feed"], f"{cell['batch']}x{cell['shape'][1]}", f"{100 * cell['padding']:.0f} %",
                         "flushed" if flushed[s] else "kept", med[s]["fp32_ms"], med[s]["int8_ms"],
                         f"{med[s]['speedup']:.2f}x",
                         f"{med['off']['fp32_ms'] / med['on']['fp32_ms']:.2f} / "
                         f"{med['off']['int8_ms'] / med['on']['int8_ms']:.2f}" if s == "on" else ""])
    print(format_table(["input", "batch x seq", "padding", "denormals", "FP32 ms", "INT8 ms", "INT8 speedup",
                        "kept/flushed FP32 / INT8"], rows))
    print("denormals 'flushed': session.set_denormal_as_zero on the process's first session (dlopt's default); "
          "'kept': the first session without it. Cross-process ratios are from processes run one after the other.")


if __name__ == "__main__":
    main()
