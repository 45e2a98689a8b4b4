"""EfficientNet-Lite0 INT8 on the mobile kernels: ExecuTorch/XNNPACK (.pte) vs ONNX Runtime CPU (.ort).

    python benchmarks/mobile.py [--workdir DIR] [--seconds 30] [--calibration-samples 32]

Builds (or reuses, in --workdir) the FP32 ONNX export and its static INT8 quantization (`dlopt
quantize --mode static`, calibrated on the reference model's photo crops; the `--target mobile`
recipe (s8 activations) measured 1.7 dB SQNR on this x86 host, so the default recipe), lowers the
same torch model through ExecuTorch with the XNNPACK backend in FP32 and INT8 (XNNPACKQuantizer,
calibrated on the same crops), then:
- output agreement on the real photos that ship with scikit-image / scikit-learn / matplotlib:
  top-1 agreement and logit SQNR of every variant against the FP32 ONNX model;
- latency on ONE thread, all four variants interleaved round by round (ORT's ORT-format models via
  the `mobile` target's session, ExecuTorch's pool sized to 1 before loading), timed with the
  calling thread's CPU time; ratios are medians of per-round ratios to ORT INT8 with a bootstrap
  95 % CI. Both are CPU kernels of this host (x86), not a phone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_models(workdir: Path, calibration_samples: int) -> tuple[Path, Path]:
    fp32 = workdir / "efficientnet-lite0.onnx"
    int8 = workdir / "efficientnet-lite0-int8.onnx"
    if not fp32.exists():
        _log("exporting efficientnet-lite0")
        subprocess.run([sys.executable, "-m", "dlopt", "export", "efficientnet-lite0", "-o", str(fp32)], check=True)
    if not int8.exists():
        _log("quantizing to INT8 (static, calibrated)")
        subprocess.run([sys.executable, "-m", "dlopt", "quantize", str(fp32), "-o", str(int8), "--mode", "static",
                        "--calibration", "model:efficientnet-lite0", "--calibration-samples",
                        str(calibration_samples)], check=True)
    return fp32, int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("build/mobile-bench"))
    parser.add_argument("--seconds", type=float, default=30.0, help="timed interleaved rounds")
    parser.add_argument("--calibration-samples", type=int, default=32)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    from dlopt.bench import InterleavedSampler, machine_fingerprint
    from dlopt.models import efficientnet_lite0 as eff  # noqa: F401 - fails early without the models extra
    from dlopt.models import get_reference_model
    from dlopt.optimize.export import load_source
    from dlopt.package import compare
    from dlopt.report import format_table
    from dlopt.targets import get_target
    from dlopt.targets.xnnpack import PteProgram, lower_to_pte, require_executorch

    require_executorch()
    fp32_onnx, int8_onnx = ensure_models(args.workdir, args.calibration_samples)
    mobile = get_target("mobile")
    ort_fp32 = mobile.create_session(fp32_onnx, threads=1)  # converted to ORT format (Fixed style)
    ort_int8 = mobile.create_session(int8_onnx, threads=1)

    source = load_source("efficientnet-lite0")
    ref = get_reference_model("efficientnet-lite0")
    calibration = list(ref.calibration_data(args.calibration_samples))
    # batch 1 (the build() example may hold several photos): a .pte has the example's static shape
    example = {k: v.numpy() for k, v in ref.example_inputs(batch=1).items()}
    programs = {}
    for precision in ("fp32", "int8"):
        path = args.workdir / f"efficientnet-lite0.xnnpack-{precision}.pte"
        if not path.exists():
            _log(f"lowering to ExecuTorch/XNNPACK {precision}")
            started = time.perf_counter()
            data = lower_to_pte(source.module, example, input_names=["image"], precision=precision,
                                calibration=calibration if precision == "int8" else None)
            path.write_bytes(data)
            _log(f"  {time.perf_counter() - started:.0f} s, {len(data) / 1e6:.1f} MB")
        programs[precision] = PteProgram(path, ["image"], threads=1)

    variants = {
        "ORT CPU FP32 (.ort)": lambda feeds: ort_fp32.session.run(None, feeds)[0],
        "ORT CPU INT8 (.ort)": lambda feeds: ort_int8.session.run(None, feeds)[0],
        "XNNPACK FP32 (.pte)": lambda feeds: programs["fp32"].run(feeds)[0],
        "XNNPACK INT8 (.pte)": lambda feeds: programs["int8"].run(feeds)[0],
    }
    names, images = eff.evaluation_images()
    _log(f"output agreement on {len(names)} photos")
    outputs = {label: np.concatenate([run({"image": images[i:i + 1]}) for i in range(len(names))])
               for label, run in variants.items()}
    reference = outputs["ORT CPU FP32 (.ort)"]
    agreement = {label: compare(out, reference) for label, out in outputs.items()}

    feeds = {"image": example["image"]}
    runners = [lambda run=run: run(feeds) for run in variants.values()]
    sampler = InterleavedSampler(runners)
    _log("warming up")
    warm = sampler.warm_up(max_seconds=max(5.0, args.seconds / 4), clock="cpu")
    _log(f"timing, interleaved, {args.seconds:g} s")
    sampler.run_for(args.seconds, min_rounds=20)
    baseline = list(variants).index("ORT CPU INT8 (.ort)")
    rows = []
    for k, label in enumerate(variants):
        cpu = sampler.summary(k, "cpu")
        wall = sampler.summary(k, "wall")
        ratio = sampler.ratio(k, "cpu", baseline=baseline)
        a = agreement[label]
        rows.append([label, cpu.median * 1e3, cpu.p90 * 1e3, wall.median * 1e3,
                     f"{ratio.estimate:.3f} [{ratio.low:.3f}, {ratio.high:.3f}]",
                     a["top1_agreement"], "inf" if a["sqnr_db"] == float("inf") else a["sqnr_db"]])
    machine = machine_fingerprint(1, mobile)
    print(f"EfficientNet-Lite0, batch 1, 224x224, ONE thread, {sampler.rounds} interleaved rounds "
          f"(warm-up {warm.rounds} rounds, settled: {warm.settled}); CPU {machine['cpu_model']}, "
          f"onnxruntime {machine['onnxruntime']}")
    print(format_table(["variant", "median ms (cpu)", "p90 ms (cpu)", "median ms (wall)", "ratio to ORT INT8 [95% CI]",
                        f"top-1 agree vs FP32 ({len(names)} photos)", "SQNR dB vs FP32"], rows))
    print("Both runtimes run this host's x86 CPU kernels (ONNX Runtime MLAS; ExecuTorch's XNNPACK, the library "
          "Android/iOS run); a phone's ARM cores will differ in absolute terms.")


if __name__ == "__main__":
    main()
