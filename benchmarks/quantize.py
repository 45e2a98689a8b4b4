"""dlopt quantize against FP32 and ORT's own quantizers, on the reference models, in one run.

    python benchmarks/quantize.py [--models minilm,efficientnet-lite0,fashion-cnn] [--budget 20]
                                  [--workdir DIR] [--skip-rss] [--with-budget]

Latency: dlopt.bench (one intra-op thread, thread CPU time, models interleaved; ratios are medians of
per-round quotients against FP32, so they hold on a busy machine). Quality: each reference model's
own metrics, plus for MiniLM the embedding cosine against FP32 over the 200 evaluation sentences.
Artifacts are cached in --workdir; delete it to rebuild them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dlopt.tables import format_table


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def export(name: str, path: Path, *, exporter: str | None = None) -> Path:
    """FP32 ONNX through `dlopt export` (the model's preferred exporter unless one is named)."""
    if path.exists():
        return path
    from dlopt.api import export_model
    from dlopt.optimize.export import Export

    log(f"exporting {name} -> {path}")
    export_model(name, path, Export(exporter=exporter))
    return path


def dlopt_quantize(src: Path, out: Path, calibration: str | None, **options) -> dict:
    from dlopt.optimize.quantize import QuantizeConfig, quantize_file

    report_path = out.with_name(out.name[:-5] + ".quantize.json")
    if out.exists() and report_path.exists():
        return json.loads(report_path.read_text())
    log(f"dlopt quantize {src.name} -> {out.name} {options}")
    return quantize_file(src, out, QuantizeConfig(**options), calibration, log=log).report


def ort_dynamic_fused(src: Path, out: Path, num_heads: int, hidden: int) -> None:
    """The peer recipe from the issue: ORT transformer optimizer, then quantize_dynamic per-channel."""
    if out.exists():
        return
    import onnx
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden).model
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(fused, f"{tmp}/fused.onnx")
        quantize_dynamic(f"{tmp}/fused.onnx", str(out), per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def ort_static_default(src: Path, out: Path, name: str, samples: int = 64) -> None:
    """ORT quantize_static with its defaults (QDQ, u8 activations, s8 per-tensor weights, MinMax)."""
    if out.exists():
        return
    from onnxruntime.quantization import quantize_static

    from dlopt.models import get_reference_model

    feeds = list(get_reference_model(name).calibration_data(samples))

    class Reader:
        def get_next(self):
            return feeds.pop(0) if feeds else None

    quantize_static(str(src), str(out), Reader())


def latency(paths: dict[str, Path], batches: tuple[int, ...], budget_s: float, reference: str
            ) -> dict[str, dict[int, tuple]]:
    """{label: {batch: (median ms, speedup vs the first model, CI low, CI high)}}, on the reference model's
    real inputs (MiniLM: real sentences padded to 128 tokens; CNNs: photos, test images), one batch per call."""
    from dlopt.bench import BenchConfig, benchmark, format_bench, load_data

    labels = list(paths)
    data = load_data(f"model:{reference}", samples=4 * max(batches), seq_len=128)
    result = benchmark([paths[k] for k in labels], BenchConfig(batch_sizes=batches, seq_len=128, threads=1,
                                                             clock="cpu", budget_s=budget_s),
                       data=data, data_source=f"model:{reference}")
    print(format_bench(result).split("\n\n")[-1])  # CPU, session config, inputs with shapes and padding
    table: dict[str, dict[int, tuple]] = {k: {} for k in labels}
    for batch_run in result.batches:
        for label, run in zip(labels, batch_run.models):
            ms = run.summaries["cpu"].median * 1e3
            ratio = run.ratios["cpu"]
            # ratio = time / FP32 time; speedup is its inverse (the CI bounds swap)
            speed = (1.0, 1.0, 1.0) if ratio is None else (1 / ratio.estimate, 1 / ratio.high, 1 / ratio.low)
            table[label][batch_run.batch] = (ms, *speed)
    return table


def session(path: Path):
    from dlopt.fileio import load_onnx
    from dlopt.sessions import cpu_session

    return cpu_session(load_onnx(path))


# -- MiniLM -------------------------------------------------------------------------------------------
def bench_minilm(work: Path, budget_s: float) -> None:
    from dlopt.models import get_reference_model, onnx_runner
    from dlopt.models import minilm

    # dlopt export's default for minilm is torchscript: ORT fuses Attention only in that graph
    fp32 = export("minilm", work / "minilm_fp32.onnx")
    dynamo = export("minilm", work / "minilm_fp32_dynamo.onnx", exporter="dynamo")
    variants = {"FP32 export": fp32}
    reports = {}
    # what the LayerNorm form alone is worth, so the INT8 rows' speedups can be attributed
    variants["FP32 export, LayerNorm form chosen by dlopt"] = fp32_forms = work / "minilm_fp32_layernorm.onnx"
    if not fp32_forms.exists():
        from dlopt.fileio import load_onnx, save_onnx_atomic
        from dlopt.optimize.kernel_choice import choose_layernorm_form

        chosen = choose_layernorm_form(load_onnx(fp32))
        log(f"FP32 LayerNorm form: {chosen.report['decision']}")
        save_onnx_atomic(chosen.model, fp32_forms)
    variants["ORT quantize_dynamic per-channel, fused graph"] = work / "minilm_ort_dyn.onnx"
    ort_dynamic_fused(fp32, variants["ORT quantize_dynamic per-channel, fused graph"], 12, 384)
    for label, src, path, opts in (
            ("dlopt int8 auto", fp32, "minilm_int8_auto.onnx", {}),
            ("dlopt int8 auto, --layernorm fused (ORT's SkipLayerNormalization)", fp32,
             "minilm_int8_auto_sln.onnx", {"layernorm_form": "fused"}),
            ("dlopt int8 auto on a dynamo export (Attention not fused)", dynamo, "minilm_int8_auto_dynamo.onnx", {}),
            ("dlopt int8 auto + SmoothQuant 0.75", fp32, "minilm_int8_sq.onnx", {"smoothing": 0.75}),
            ("dlopt int8 static QDQ u8, percentile", fp32, "minilm_int8_static.onnx",
             {"mode": "static", "method": "percentile"})):
        reports[label] = dlopt_quantize(src, work / path, "model:minilm", calibration_samples=100, **opts)
        variants[label] = work / path
    log("measuring MiniLM latency (b1, b8, seq 128, one thread)")
    lat = latency(variants, (1, 8), budget_s, "minilm")
    texts = list(minilm.evaluation_texts())
    ref_emb = minilm.embed(onnx_runner(session(fp32)), texts)
    ref_model = get_reference_model("minilm")
    rows = []
    for label, path in variants.items():
        runner = onnx_runner(session(path))
        emb = minilm.embed(runner, texts)
        cos = np.sum(emb * ref_emb, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref_emb, axis=1))
        metrics = ref_model.evaluate(runner)
        rows.append([label, path.stat().st_size / 1e6, f"{lat[label][1][1]:.2f}", f"{lat[label][8][1]:.2f}",
                     f"{lat[label][1][0]:.1f} / {lat[label][8][0]:.0f}", f"{cos.mean():.4f} / {cos.min():.4f}",
                     f"{metrics['pang_lee_accuracy']:.3f}", f"{metrics['lee50_pearson']:.3f}"])
    print("\nMiniLM-L6, real sentences padded to 128 tokens, one thread, thread-CPU-time medians "
          "(speedup CI in the JSON)")
    print(format_table(["variant", "MB", "x b1", "x b8", "ms b1 / b8", "cos mean / min", "Pang-Lee acc",
                        "Lee50 r"], rows))
    (work / "minilm_results.json").write_text(json.dumps({"latency": lat, "rows": rows}, indent=1, default=str))


# -- CNNs -------------------------------------------------------------------------------------------
def bench_cnn(name: str, work: Path, budget_s: float, with_budget: bool = False) -> None:
    from dlopt.models import get_reference_model, onnx_runner

    fp32 = export(name, work / f"{name}_fp32.onnx")
    variants = {"FP32 export": fp32}
    ort_path = work / f"{name}_ort_static.onnx"
    ort_static_default(fp32, ort_path, name)
    variants["ORT quantize_static defaults"] = ort_path
    runs = [("dlopt int8 auto (static QDQ, node forms timed here)", f"{name}_int8_auto.onnx", {}),
            # every node INT8: what the per-node kernel choice is measured against
            ("dlopt int8 auto, --node-forms int8", f"{name}_int8_allint8.onnx", {"node_forms": "int8"}),
            # the recipe before GPTQ rounding and bias correction, for the before/after comparison
            ("dlopt int8, minmax + nearest rounding (old auto)", f"{name}_int8_nearest.onnx",
             {"method": "minmax", "weight_rounding": "nearest", "bias_correction": False})]
    if name == "efficientnet-lite0" and with_budget:  # slow: one re-quantization per node
        runs.append(("dlopt int8 auto + budget SQNR >= 20 dB", f"{name}_int8_budget.onnx",
                     {"max_accuracy_drop": 0.01, "evaluator": "sqnr"}))
    for label, path, opts in runs:
        dlopt_quantize(fp32, work / path, f"model:{name}", calibration_samples=64, **opts)
        variants[label] = work / path
    log(f"measuring {name} latency (b1, one thread)")
    lat = latency(variants, (1,), budget_s, name)
    ref = get_reference_model(name)
    rows = []
    for label, path in variants.items():
        metrics = ref.evaluate(onnx_runner(session(path)))
        rows.append([label, path.stat().st_size / 1e6, f"{lat[label][1][1]:.2f}", f"{lat[label][1][0]:.2f}",
                     *[f"{metrics[m]:.4g}" for m in ref.metrics]])
    print(f"\n{name}, b1 (real images), one thread, thread-CPU-time medians")
    print(format_table(["variant", "MB", "x b1", "ms b1", *ref.metrics], rows))


# -- calibration memory -----------------------------------------------------------------------------
# Peak RSS from /proc/self/status VmHWM, not getrusage: Linux carries ru_maxrss across fork and exec,
# so a child of this (2 GB) benchmark process would report the parent's peak (it did: 2090 MB for all).
_RSS_CHILD = """
import sys
from dlopt.fileio import load_onnx
from dlopt.data import load_data
from dlopt.optimize.quantize import calibrate

def peak_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

model = load_onnx(sys.argv[1])
data = load_data("model:minilm", model, limit=int(sys.argv[2]))
before = peak_kb()
calibrate(model, data, method=sys.argv[3], op_types=["MatMul"])
print(before, peak_kb())
"""


def bench_rss(work: Path) -> None:
    src = export("minilm", work / "minilm_fp32.onnx")
    rows = []
    for method in ("minmax", "percentile"):
        peaks = {}
        for n in (100, 1000):
            log(f"calibrating MiniLM on {n} samples ({method}) in a fresh process")
            out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(src), str(n), method], check=True,
                                 capture_output=True, text=True).stdout.split()
            peaks[n] = (int(out[-2]) / 1024, int(out[-1]) / 1024)  # before calibrating, peak after
        growth = [(peaks[n][1] - peaks[n][0]) for n in (100, 1000)]
        rows.append([method, f"{peaks[100][1]:.0f}", f"{peaks[1000][1]:.0f}", f"{peaks[1000][1] / peaks[100][1]:.3f}",
                     f"{growth[0]:.0f} / {growth[1]:.0f}"])
    print("\nMiniLM calibration peak RSS (MB, VmHWM of a fresh process), streamed statistics")
    print(format_table(["method", "100 samples", "1000 samples", "ratio", "calibration's own MB (100 / 1000)"],
                       rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,efficientnet-lite0,fashion-cnn")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing per model group")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dlopt-bench-quantize"))
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--with-budget", action="store_true",
                        help="also EfficientNet-Lite0 with --max-accuracy-drop 0.01 --evaluator sqnr (slow)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from dlopt.runtime import cpu_label

    print(f"CPU: {cpu_label()}")  # every figure below was measured on it
    for name in args.models.split(","):
        if name == "minilm":
            bench_minilm(work, args.budget)
        else:
            bench_cnn(name, work, args.budget, args.with_budget)
    if not args.skip_rss:
        bench_rss(work)


if __name__ == "__main__":
    main()
