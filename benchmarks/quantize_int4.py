"""4-bit weight-only quantization of the reference models against FP32 and ORT's own 4-bit quantizer.

    python benchmarks/quantize_int4.py [--models smollm2,minilm] [--workdir DIR] [--budget 20]
                                       [--smollm2-variants default,gptq4,...] [--tokens 4096]

Prints one table: model, recipe, size MB, quality, latency ratio against FP32.
- SmolLM2-135M: perplexity on the first 4,096 tokens of lee_background.cor (512-token windows; FP32
  33.06). Its GGUF weights already sit on an asymmetric block-32 4-bit grid, so only symmetric or
  block-64/128 recipes are honest 4-bit results (asymmetric block 32 would be lossless by construction).
- MiniLM-L6: sentence-embedding cosine against FP32 (mean / min over 200 sentences) and Pang-Lee
  accuracy (logistic regression, 10-fold).
Latency: dlopt.bench, one intra-op thread, calling-thread CPU time, all variants of a model interleaved;
the ratio is the median of per-round quotients against FP32 (< 1: faster). SmolLM2 at b1 x 64 tokens
(one forward over a short prompt, no KV cache), MiniLM at b1 x 128.
Quantized models, their reports and metrics are cached in --workdir (delete a file to redo it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dlopt.tables import format_table

# label, Int4WeightOnly options; every SmolLM2 recipe here is symmetric or uses blocks of 64+ (honest 4-bit)
SMOLLM2_VARIANTS = {
    "gptq_all4": ("dlopt GPTQ sym b32, all 4-bit (tied head/embedding too)",
                  {"keep_last": 0, "sensitive_fraction": 0.0}),
    "rtn": ("dlopt RTN sym b32, tied head/embedding 8-bit", {"algorithm": "rtn", "sensitive_fraction": 0.0}),
    "gptq_head8": ("dlopt GPTQ sym b32, tied head/embedding 8-bit", {"sensitive_fraction": 0.0}),
    "default": ("dlopt default: GPTQ sym b32, tied head/embedding + 10 % most sensitive 8-bit", {}),
    "default_acc0": ("dlopt default, accuracy_level 0 (fp32 compute)", {"accuracy_level": 0}),  # from default
    "gptq_asym64": ("dlopt GPTQ asym b64, tied head/embedding + 10 % most sensitive 8-bit",
                    {"symmetric": False, "block_size": 64}),
    "gptq_asym128": ("dlopt GPTQ asym b128, tied head/embedding + 10 % most sensitive 8-bit",
                     {"symmetric": False, "block_size": 128}),
}
MINILM_VARIANTS = {
    "default": ("dlopt default: GPTQ sym b32, last MatMul + 10 % most sensitive 8-bit", {}),
    "rtn_asym": ("last session's default: RTN asym b32, 10 % most sensitive 8-bit, fp32 compute",
                 {"symmetric": False, "algorithm": "rtn", "keep_last": 0, "accuracy_level": None}),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cached_json(path: Path, make):
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    path.write_text(json.dumps(value, indent=1))
    return value


def export(name: str, path: Path) -> Path:
    if not path.exists():
        from dlopt.api import export_model
        from dlopt.optimize.export import Export
        from dlopt.sources import load_source

        log(f"exporting {name} -> {path} (SmolLM2: minutes)")
        export_model(load_source(name), path, Export())
    return path


def dlopt_int4(src: Path, out: Path, options: dict, calibration: str) -> dict:
    """`dlopt quantize --precision int4` through the Python API, with an explicit Int4WeightOnly scheme
    config when the variant overrides the defaults (the CLI's defaults otherwise)."""
    report_path = out.with_name(out.name[:-5] + ".quantize.json")
    if out.exists() and report_path.exists():
        return json.loads(report_path.read_text())
    from dlopt.optimize.quantize import Int4WeightOnly, QuantizeConfig, quantize_file

    log(f"dlopt int4 {src.name} -> {out.name} {options or '(defaults)'}")
    config = Int4WeightOnly(**options) if options else QuantizeConfig(precision="int4")
    return quantize_file(src, out, config, calibration, log=log).report


def with_accuracy_level(src: Path, out: Path, level: int) -> None:
    """The same weights with MatMulNBits' accuracy_level set (what Int4WeightOnly(accuracy_level=...) writes),
    without quantizing again."""
    if out.exists():
        return
    import onnx

    from dlopt.fileio import load_onnx, save_onnx_atomic

    model = load_onnx(src)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            node.ClearField("attribute")
            node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", level)])
    save_onnx_atomic(model, out)


def ort_rtn(src: Path, out: Path, block_size: int = 32, symmetric: bool = True) -> None:
    """The peer: ONNX Runtime's MatMulNBitsQuantizer as documented (RTN, default options)."""
    if out.exists():
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from dlopt.fileio import load_onnx, save_onnx_atomic

    log(f"ORT MatMulNBitsQuantizer {src.name} -> {out.name}")
    q = MatMulNBitsQuantizer(load_onnx(src), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric))
    q.process()
    save_onnx_atomic(q.model.model, out)


def session(path: Path):
    from dlopt.sessions import cpu_session

    return cpu_session(path)


def latency(paths: dict[str, Path], seq_len: int, budget_s: float) -> dict[str, float]:
    """{label: median per-round time ratio against the first model (FP32)}."""
    from dlopt.bench import BenchConfig, benchmark

    labels = list(paths)
    result = benchmark([paths[k] for k in labels], BenchConfig(batch_sizes=(1,), seq_len=seq_len, threads=1,
                                                             clock="cpu", budget_s=budget_s))
    out = {}
    for label, run in zip(labels, result.batches[0].models):
        ratio = run.ratios["cpu"]
        out[label] = 1.0 if ratio is None else ratio.estimate
    return out


def size_mb(path: Path) -> float:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return (total + (data.stat().st_size if data.exists() else 0)) / 1e6


def bench_smollm2(work: Path, variants: list[str], tokens: int, budget_s: float) -> list[list]:
    from dlopt.models import get_reference_model, onnx_runner

    ref = get_reference_model("smollm2")
    fp32 = export("smollm2", work / "smollm2_fp32.onnx")
    paths = {"FP32 export": fp32}
    ort_path = work / "smollm2_ort_rtn_sym32.onnx"
    ort_rtn(fp32, ort_path)
    paths["ORT MatMulNBits RTN sym b32 (peer; head + embedding left FP32)"] = ort_path
    for key in variants:
        label, options = SMOLLM2_VARIANTS[key]
        out = work / f"smollm2_{key}.onnx"
        if key == "default_acc0":
            dlopt_int4(fp32, work / "smollm2_default.onnx", {}, "model:smollm2")
            with_accuracy_level(work / "smollm2_default.onnx", out, options["accuracy_level"])
        else:
            dlopt_int4(fp32, out, options, "model:smollm2")
        paths[label] = out
    metrics = {}
    for label, path in paths.items():
        def evaluate(path=path, label=label):
            log(f"SmolLM2 perplexity over {tokens} tokens: {label}")
            return ref.evaluate(onnx_runner(session(path)), max_tokens=tokens)

        metrics[label] = cached_json(path.with_name(f"{path.stem}.ppl{tokens}.json"), evaluate)
    log("measuring SmolLM2 latency (b1 x 64 tokens, one thread, interleaved)")
    ratios = latency(paths, 64, budget_s)
    base = metrics["FP32 export"]["perplexity"]
    rows = []
    for label, path in paths.items():
        ppl = metrics[label]["perplexity"]
        rows.append(["SmolLM2-135M", label, f"{size_mb(path):.1f}",
                     f"ppl {ppl:.2f} ({100 * (ppl / base - 1):+.1f} %)", f"{ratios[label]:.2f}"])
    return rows


def bench_minilm(work: Path, variants: list[str], budget_s: float) -> list[list]:
    from dlopt.models import get_reference_model, onnx_runner

    ref = get_reference_model("minilm")
    fp32 = export("minilm", work / "minilm_fp32.onnx")
    paths = {"FP32 export": fp32}
    for key in variants:
        label, options = MINILM_VARIANTS[key]
        out = work / f"minilm_{key}.onnx"
        dlopt_int4(fp32, out, options, "model:minilm")
        paths[label] = out
    metrics = {}
    for label, path in paths.items():
        metrics[label] = cached_json(path.with_name(f"{path.stem}.metrics.json"),
                                     lambda path=path: ref.evaluate(onnx_runner(session(path))))
    log("measuring MiniLM latency (b1 x 128, one thread, interleaved)")
    ratios = latency(paths, 128, budget_s)
    rows = []
    for label, path in paths.items():
        m = metrics[label]
        cos = f"cos {m['cosine_vs_reference']:.3f} / min {m['cosine_min']:.3f}"
        rows.append(["MiniLM-L6", label, f"{size_mb(path):.1f}",
                     f"{cos}, Pang-Lee {m['pang_lee_accuracy']:.3f}", f"{ratios[label]:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--smollm2-variants", default="rtn,gptq_all4,gptq_head8,default,default_acc0,gptq_asym64")
    parser.add_argument("--minilm-variants", default="default,rtn_asym")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "dlopt" / "bench-int4"))
    parser.add_argument("--tokens", type=int, default=4096, help="SmolLM2 evaluation tokens (4096: the full set)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of latency measurement per model")
    args = parser.parse_args()
    from dlopt.runtime import cpu_label

    print(f"CPU: {cpu_label()}")  # every figure below was measured on it
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    models = args.models.split(",")
    if "smollm2" in models:
        rows += bench_smollm2(work, [v for v in args.smollm2_variants.split(",") if v], args.tokens, args.budget)
    if "minilm" in models:
        rows += bench_minilm(work, [v for v in args.minilm_variants.split(",") if v], args.budget)
    print(format_table(["model", "recipe", "size MB", "quality vs FP32", "latency vs FP32"], rows))


if __name__ == "__main__":
    main()
