"""INT8 on the mobile kernels: ExecuTorch/XNNPACK (.pte) vs ONNX Runtime CPU (.ort), one thread.

    python benchmarks/mobile.py [--models efficientnet-lite0,fashion-cnn,minilm] [--workdir DIR]
                                [--seconds 30] [--calibration-samples 64] [--int8-rounding gptq|nearest]

For each reference model: builds (or reuses, in --workdir) the FP32 ONNX export and its INT8
quantization (`dlopt quantize`'s auto recipe for this CPU, calibrated on the model's own calibration
data: static QDQ for the CNNs, dynamic for minilm; not the `--target mobile` recipe, whose s8
activations measured 1.7 dB SQNR on EfficientNet-Lite0 in this x86 host's kernels), lowers the same
torch model through ExecuTorch with the XNNPACK backend in FP32 and INT8 (XNNPACKQuantizer,
calibrated on the same data, with GPTQ-rounded weights and bias correction, lower_to_pte's default;
`--int8-rounding nearest`: the stock nearest rounding, EfficientNet-Lite0 16.0 dB instead of
22.9 dB logit SQNR; for minilm its dynamic recipe, int8 linear layers with activations quantized
per run, no calibration: static per-tensor activations measured -1.4 dB SQNR there), then:
- output agreement against the FP32 ONNX model on real data (efficientnet-lite0: every view of the
  photos shipped with scikit-image / scikit-learn / matplotlib; fashion-cnn: Fashion-MNIST test
  images; minilm: Pang-Lee sentences at a fixed length): top-1 agreement (classifiers) and output
  SQNR;
- latency on ONE thread, all four variants interleaved round by round (ORT's ORT-format models via
  the `mobile` target's session with intra_op_num_threads=1, ExecuTorch's pool sized to 1 before
  loading), timed with the calling thread's CPU time; ratios are medians of per-round ratios to
  ORT INT8 with a bootstrap 95 % CI. Both are CPU kernels of this host (x86), not a phone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MINILM_SEQ_LEN = 64  # a .pte has static shapes: MiniLM runs at batch 1 x 64 tokens (padded, masked)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What the benchmark needs of a reference model: the batch-1 input names, the example that
    fixes the .pte's static shapes, real evaluation feeds (batch 1 each), and whether its output
    is class logits (top-1 agreement) or an embedding (SQNR only)."""
    model: str
    input_names: tuple[str, ...]
    example: Callable[[], dict[str, np.ndarray]]
    evaluation: Callable[[], tuple[str, list[dict[str, np.ndarray]]]]
    calibration: Callable[[int], list[dict[str, np.ndarray]]] | None = None  # static int8 only
    classifier: bool = True
    int8_activations: str = "static"  # "dynamic" for transformers (see lower_to_pte): no calibration


def _efficientnet() -> Workload:
    from dlopt.models import efficientnet_lite0 as eff

    def evaluation():
        names, images = eff.evaluation_images()
        return f"{len(names)} photo views", [{"image": images[i:i + 1]} for i in range(len(names))]

    return Workload(model="efficientnet-lite0", input_names=("image",),
                    example=lambda: {"image": eff.example_inputs(batch=1)["image"].numpy()},
                    evaluation=evaluation, calibration=lambda n: list(eff.calibration_data(n)))


def _fashion_cnn() -> Workload:
    from dlopt.models import fashion_cnn as fc

    def evaluation(n: int = 500):
        x, _ = fc.test_set()
        return f"{n} test images", [{"image": x[i:i + 1].numpy()} for i in range(n)]

    return Workload(model="fashion-cnn", input_names=("image",),
                    example=lambda: {"image": fc.example_inputs(batch=1)["image"].numpy()},
                    evaluation=evaluation, calibration=lambda n: list(fc.calibration_data(n)))


def _minilm() -> Workload:
    from dlopt.models import minilm

    def fixed(texts):
        return [minilm.tokenize([t], seq_len=MINILM_SEQ_LEN) for t in texts]

    def evaluation(n: int = 100):
        return f"{n} sentences x {MINILM_SEQ_LEN} tokens", fixed(minilm.evaluation_texts()[:n])

    return Workload(model="minilm", input_names=minilm.INPUT_NAMES,
                    example=lambda: {k: v.numpy() for k, v in
                                     minilm.example_inputs(batch=1, seq_len=MINILM_SEQ_LEN).items()},
                    evaluation=evaluation, classifier=False, int8_activations="dynamic")


WORKLOADS = {"efficientnet-lite0": _efficientnet, "fashion-cnn": _fashion_cnn, "minilm": _minilm}


def ensure_models(workdir: Path, model: str, calibration_samples: int) -> tuple[Path, Path]:
    fp32 = workdir / f"{model}.onnx"
    int8 = workdir / f"{model}-int8.onnx"
    if not fp32.exists():
        _log(f"exporting {model}")
        subprocess.run([sys.executable, "-m", "dlopt", "export", model, "-o", str(fp32)], check=True)
    if not int8.exists():
        _log(f"quantizing {model} to INT8 (auto recipe, calibrated)")
        subprocess.run([sys.executable, "-m", "dlopt", "quantize", str(fp32), "-o", str(int8),
                        "--calibration", f"model:{model}", "--calibration-samples",
                        str(calibration_samples)], check=True)
    return fp32, int8


def ensure_programs(workdir: Path, work: Workload, calibration_samples: int, rounding: str = "gptq"
                    ) -> dict[str, Path]:
    """The FP32 and INT8 .pte files, lowered at batch 1 (cached per lowering revision)."""
    from dlopt.sources import load_source
    from dlopt.optimize.pt2e import LOWERING_REVISION, lower_to_pte

    tag = {"fp32": "fp32", "int8": "int8" if work.int8_activations == "static" else "int8-dynamic"}
    if work.int8_activations == "static" and rounding != "gptq":
        tag["int8"] += f"-{rounding}"
    paths = {p: workdir / f"{work.model}.xnnpack-{tag[p]}.r{LOWERING_REVISION}.pte" for p in ("fp32", "int8")}
    source = None
    for precision, path in paths.items():
        if path.exists():
            continue
        source = source or load_source(work.model)
        _log(f"lowering {work.model} to ExecuTorch/XNNPACK {precision}")
        started = time.perf_counter()
        calibration = work.calibration(calibration_samples) if precision == "int8" and work.calibration else None
        data = lower_to_pte(source.module, work.example(), input_names=work.input_names, precision=precision,
                            calibration=calibration, int8_activations=work.int8_activations,
                            weight_rounding=rounding, bias_correction=rounding == "gptq")
        path.write_bytes(data)
        _log(f"  {time.perf_counter() - started:.0f} s, {len(data) / 1e6:.1f} MB")
    return paths


def bench_model(work: Workload, args) -> tuple[list[list], str]:
    from dlopt.bench import InterleavedSampler
    from dlopt.package import compare
    from dlopt.targets import get_target
    from dlopt.targets.xnnpack import PteProgram

    fp32_onnx, int8_onnx = ensure_models(args.workdir, work.model, args.calibration_samples)
    pte = ensure_programs(args.workdir, work, args.calibration_samples, args.int8_rounding)
    mobile = get_target("mobile")
    ort_fp32 = mobile.create_session(fp32_onnx, threads=1)  # converted to ORT format (Fixed style)
    ort_int8 = mobile.create_session(int8_onnx, threads=1)
    programs = {p: PteProgram(path, work.input_names, threads=1) for p, path in pte.items()}
    ort_inputs = {i.name for i in ort_fp32.session.get_inputs()}

    def ort(handle):
        return lambda feeds: handle.session.run(None, {k: v for k, v in feeds.items() if k in ort_inputs})[0]

    variants = {
        "ORT CPU FP32 (.ort)": ort(ort_fp32),
        "ORT CPU INT8 (.ort)": ort(ort_int8),
        "XNNPACK FP32 (.pte)": lambda feeds: programs["fp32"].run(feeds)[0],
        "XNNPACK INT8 (.pte)" if work.int8_activations == "static" else "XNNPACK INT8 dynamic (.pte)":
            lambda feeds: programs["int8"].run(feeds)[0],
    }
    data_label, feeds_list = work.evaluation()
    _log(f"{work.model}: output agreement on {data_label}")
    outputs = {label: np.concatenate([run(feeds) for feeds in feeds_list]) for label, run in variants.items()}
    reference = outputs["ORT CPU FP32 (.ort)"]
    agreement = {label: compare(out, reference) for label, out in outputs.items()}

    feeds = work.example()
    runners = [lambda run=run: run(feeds) for run in variants.values()]
    sampler = InterleavedSampler(runners)
    _log(f"{work.model}: warming up")
    warm = sampler.warm_up(max_seconds=max(5.0, args.seconds / 4), clock="cpu")
    _log(f"{work.model}: timing, interleaved, {args.seconds:g} s")
    sampler.run_for(args.seconds, min_rounds=20)
    baseline = list(variants).index("ORT CPU INT8 (.ort)")
    rows = []
    for k, label in enumerate(variants):
        cpu = sampler.summary(k, "cpu")
        ratio = sampler.ratio(k, "cpu", baseline=baseline)
        a = agreement[label]
        top1 = a["top1_agreement"] if work.classifier else "-"
        sqnr = "inf" if a["sqnr_db"] == float("inf") else a["sqnr_db"]
        rows.append([work.model, label, cpu.median * 1e3, cpu.p90 * 1e3,
                     f"{ratio.estimate:.3f} [{ratio.low:.3f}, {ratio.high:.3f}]", top1, sqnr])
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    note = (f"{work.model}: {shapes}; agreement on {data_label}; {sampler.rounds} interleaved rounds "
            f"(warm-up {warm.rounds}, settled: {warm.settled})")
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet-lite0",
                        help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--workdir", type=Path, default=Path("build/mobile-bench"))
    parser.add_argument("--seconds", type=float, default=30.0, help="timed interleaved rounds per model")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--int8-rounding", choices=("gptq", "nearest"), default="gptq",
                        help="static INT8 .pte weights: GPTQ + bias correction (default), or the stock nearest")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in WORKLOADS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)

    from dlopt.bench import machine_fingerprint
    from dlopt.tables import format_table
    from dlopt.targets import get_target
    from dlopt.targets.xnnpack import executorch_status, require_executorch

    require_executorch()
    rows, notes = [], []
    for model in models:
        model_rows, note = bench_model(WORKLOADS[model](), args)
        rows += model_rows
        notes.append(note)
    machine = machine_fingerprint(1, get_target("mobile"))
    print(f"ONE thread, batch 1; CPU {machine['cpu_model']}, {machine['cpu_isa']}; "
          f"onnxruntime {machine['onnxruntime']}; "
          f"{executorch_status()[1]}")
    print(format_table(["model", "variant", "median ms (cpu)", "p90 ms (cpu)", "ratio to ORT INT8 [95% CI]",
                        "top-1 agree vs FP32", "SQNR dB vs FP32"], rows))
    for note in notes:
        print(note)
    print("FP32 = the ONNX model on ORT. Both runtimes run this host's x86 CPU kernels (ONNX Runtime MLAS; "
          "ExecuTorch's XNNPACK, the library Android/iOS run); a phone's ARM cores will differ in absolute terms.")


if __name__ == "__main__":
    main()
