"""SmolLM2-135M-Instruct generation, side by side, one thread: PyTorch FP32 (transformers with its KV
cache), dlopt's fp32 export (dlopt export --task text-generation: onnxruntime-genai's fused decoder,
verified), dlopt's 4-bit (dlopt quantize LM --precision int4 --max-size 100: GPTQ, fractional zero points,
the most perplexity-sensitive layers at 8 bits under the budget; and the same weights at accuracy_level 0)
and, when onnxruntime-genai's builder is installed, its default int4 build as a reference row.

    nice python benchmarks/llm.py [--prompt-len 128] [--new-tokens 128] [--rounds 3] [--no-int4]
                                  [--max-size 100] [--lm FOLDER] [--lm4 FOLDER] [--genai-int4 FOLDER]

--lm / --lm4 / --genai-int4 reuse folders made earlier (dlopt export smollm2 --task text-generation; dlopt
quantize LM --precision int4 --calibration TEXT; the genai builder's -p int4) instead of building them in the run
(export ~3 min, quantize ~15 min on 2 loaded cores). dlopt's int4 is calibrated on lee_background.cor after the
tokens perplexity is measured on (dlopt.models.smollm2.calibration_data's text), never on them.

Prefill ms, decode tokens/s: one greedy generation of NEW_TOKENS after a PROMPT_LEN-token prompt (seeded
random ids), thread CPU time, median over rounds. All rows run interleaved in one InterleavedSampler (the
one `dlopt bench --generate` uses; the exports through its GenerationRun, PyTorch through a runner timed
the same way), after one warm-up round; ratios to PyTorch with 95 % bootstrap CIs.
Perplexity: gensim's lee_background.cor, the first 2,048 tokens in 512-token windows (the issue's
table; dlopt.models.smollm2's evaluation). The "FP32" weights are the packaged Q4_1 GGUF dequantized.
Size: the weights on disk (safetensors for PyTorch; model.onnx + .data for the exports).
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

PPL_TOKENS = 2048


def _median(values):
    return float(np.median(np.asarray(values)))


class TorchGenerationRun:
    """PyTorch's greedy generation with its KV cache, timed by phase like dlopt.bench.generate's
    GenerationRun (prefill; first token; decode per token), so both run in one InterleavedSampler."""

    def __init__(self, model, prompt: np.ndarray, new_tokens: int):
        from dlopt.bench.config import CLOCKS
        from dlopt.bench.generate import PHASES

        self.model, self.new_tokens = model, new_tokens
        self.ids = __import__("torch").from_numpy(prompt.astype(np.int64))
        self.phases = {p: {c: [] for c in CLOCKS} for p in PHASES}

    def clear(self) -> None:
        for per_clock in self.phases.values():
            for values in per_clock.values():
                values.clear()

    def __call__(self) -> None:
        import torch

        from dlopt.bench.config import read_clocks

        with torch.no_grad():
            t0 = read_clocks()
            out = self.model(input_ids=self.ids, use_cache=True)
            t1 = read_clocks()
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = read_clocks()
            cache = out.past_key_values
            for _ in range(self.new_tokens - 1):
                out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            t3 = read_clocks()
        # read_clocks() is (wall, cpu): by name (CLOCKS' order is ("cpu", "wall"), the other one)
        for k, clock in enumerate(("wall", "cpu")):
            self.phases["prefill"][clock].append(t1[k] - t0[k])
            self.phases["first_token"][clock].append(t2[k] - t0[k])
            self.phases["decode_per_token"][clock].append((t3[k] - t2[k]) / (self.new_tokens - 1))


class PteGenerationRun:
    """An ExecuTorch LM program's greedy generation (dlopt.optimize.executorch_lm.PteLm, XNNPACK on one
    thread: it runs on the calling thread), timed by phase like TorchGenerationRun; keeps its tokens."""

    def __init__(self, program, prompt: np.ndarray, new_tokens: int):
        from dlopt.bench.config import CLOCKS
        from dlopt.bench.generate import PHASES

        self.program, self.new_tokens = program, new_tokens
        self.prompt = [int(t) for t in prompt[0]]
        self.phases = {p: {c: [] for c in CLOCKS} for p in PHASES}
        self.tokens: list[int] = []

    def clear(self) -> None:
        for per_clock in self.phases.values():
            for values in per_clock.values():
                values.clear()

    def __call__(self) -> None:
        from dlopt.bench.config import read_clocks

        t0 = read_clocks()
        logits = self.program.logits(self.prompt, 0)
        t1 = read_clocks()
        tokens = [int(logits.argmax())]
        t2 = read_clocks()
        for k in range(self.new_tokens - 1):
            tokens.append(int(self.program.logits(tokens[-1:], len(self.prompt) + k).argmax()))
        t3 = read_clocks()
        self.tokens = tokens
        for k, clock in enumerate(("wall", "cpu")):  # read_clocks() is (wall, cpu)
            self.phases["prefill"][clock].append(t1[k] - t0[k])
            self.phases["first_token"][clock].append(t2[k] - t0[k])
            self.phases["decode_per_token"][clock].append((t3[k] - t2[k]) / (self.new_tokens - 1))


def torch_greedy(model, prompt: np.ndarray, new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(prompt.astype(np.int64)), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(new_tokens - 1):
            out = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def pte_runner(program):
    """A dlopt.models.smollm2 runner over an ExecuTorch LM program: every position's logits, one token per
    call (the program returns the last position's only), the cache restarted at each window."""

    def run(feeds):
        ids = [int(t) for t in np.asarray(feeds["input_ids"])[0]]
        return {"logits": np.stack([program.logits([t], k) for k, t in enumerate(ids)])[None]}

    return run


def genai_runner(folder: Path):
    """A dlopt.models.smollm2 runner over an exported folder: the prefill's logits for every position."""
    import onnx
    import onnxruntime_genai as og

    from dlopt.lm import all_position_logits, is_last_position_only

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    if is_last_position_only(graph):  # dlopt int4 computes the head for the last position: perplexity reads every one
        copy = Path(tempfile.mkdtemp(prefix="llm-every-position-")) / folder.name
        atexit.register(shutil.rmtree, copy.parent, True)
        shutil.copytree(folder, copy)
        onnx.save(all_position_logits(graph), str(copy / "model.onnx"))
        folder = copy
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}}))
    model = og.Model(config)

    def run(feeds):
        ids = np.asarray(feeds["input_ids"], dtype=np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=ids.shape[1] + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        return {"logits": np.asarray(generator.get_output("logits"))}

    return run


def torch_runner(model):
    import torch

    def run(feeds):
        with torch.no_grad():
            ids = torch.from_numpy(np.asarray(feeds["input_ids"], dtype=np.int64))
            return {"logits": model(input_ids=ids, use_cache=False).logits.numpy()}

    return run


def weights_mb(folder: Path, prefix: str) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(prefix)) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-int4", action="store_true", help="skip onnxruntime-genai's int4 reference row")
    parser.add_argument("--max-size", type=float, default=100.0, help="dlopt int4's --max-size (MB)")
    parser.add_argument("--lm", type=Path, default=None, help="reuse this fp32 export")
    parser.add_argument("--lm4", type=Path, default=None, help="reuse this dlopt int4 folder")
    parser.add_argument("--genai-int4", type=Path, default=None, help="reuse this genai int4 build")
    parser.add_argument("--hf", type=Path, default=None, help="reuse this SmolLM2 Hugging Face folder")
    parser.add_argument("--executorch", default="8da4w",
                        help="ExecuTorch programs to lower and time, comma-separated (fp32, 8da4w; '' for none)")
    parser.add_argument("--pte", type=Path, action="append", default=[],
                        help="reuse this ExecuTorch program (lowered by dlopt.optimize.executorch_lm) instead")
    parser.add_argument("--pte-context", type=int, default=512, help="static cache of the programs lowered here")
    parser.add_argument("--no-perplexity", action="store_true", help="skip perplexity (greedy agreement only)")
    parser.add_argument("--only-executorch", action="store_true",
                        help="time PyTorch and the ExecuTorch programs only (no ONNX folders)")
    parser.add_argument("--also", type=Path, action="append", default=[],
                        help="another dlopt int4 folder (e.g. integer zero points only) timed beside the rest")
    args = parser.parse_args()

    import torch
    import transformers

    from dlopt.api import export_lm
    from dlopt.bench import InterleavedSampler
    from dlopt.bench.generate import GenerationRun, load_lm, prompt_tokens, read_lm_folder
    from dlopt.bench.harness import machine_fingerprint
    from dlopt.models import smollm2
    from dlopt.stats import ratio_ci

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)  # transformers' note on the past_key_values keyword
    transformers.logging.set_verbosity_error()
    machine = machine_fingerprint(1)
    scratch = tempfile.TemporaryDirectory(prefix="dlopt-llm-bench-")  # ~1.1 GB: removed at exit
    work = Path(scratch.name)
    started = time.perf_counter()
    print(f"CPU: {machine['cpu_model']}, {machine['cpu_isa']}; one thread; work folder {work}", file=sys.stderr)
    hf = args.hf or smollm2.save_hf_folder(work / "hf")
    print(f"SmolLM2 saved as a Hugging Face folder in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    folders: dict[str, Path] = {}
    genai_label = "onnxruntime-genai builder, int4 (default)"
    report4: dict | None = None
    verification, export_s = None, 0.0
    fp32 = args.lm
    if not args.only_executorch:
        t = time.perf_counter()
        fp32 = fp32 or export_lm(hf, work / "lm_fp32", log=lambda m: print(m, file=sys.stderr)).folder
        export_s = time.perf_counter() - t
        verification = json.loads((fp32 / "export.json").read_text())["verification"]
        folders = {"dlopt export, fp32 (genai builder + verification)": fp32}
        if not args.no_int4:
            t = time.perf_counter()
            int4 = args.genai_int4 or work / "lm_int4"
            if args.genai_int4 is None:
                subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(int4),
                                "-p", "int4", "-e", "cpu", "-c", str(work / "cache")], check=True, capture_output=True)
                print(f"genai int4 built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            folders[genai_label] = int4
        lm4 = args.lm4
        if lm4 is None:
            from dlopt.api import lm_quantize_config, quantize_lm

            t = time.perf_counter()
            text = work / "calibration.txt"  # lee_background.cor after the perplexity tokens (smollm2's calibration text)
            text.write_text(smollm2.tokenizer().decode(smollm2._tokens("lee_background.cor")[smollm2.MAX_TOKENS:].tolist()))
            lm4 = work / "lm_int4_dlopt"
            quantize_lm(fp32, lm4, lm_quantize_config(max_size_mb=args.max_size), text,
                        log=lambda m: print(m, file=sys.stderr))
            print(f"dlopt int4 quantized in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        def label_of(report: dict) -> str:
            stages = report["config"].get("offset_stages")
            zero_points = ("integer zero points" if not report["config"].get("float_offsets")
                           else "fractional zero points" + (" (appended offset blocks)" if stages else " (correction MatMuls)"))
            budget = report["config"].get("max_size_mb")
            return (f"dlopt int4 {report['algorithm']} b{report['block_size']}, {zero_points}"
                    + (f", --max-size {budget:g}" if budget else "") + f", accuracy_level {report['accuracy_level']}"
                    + (", head on the last position" if report.get("logits") == "last position" else "")
                    + (f", lm head {report['lm_head']['form']}" if report.get("lm_head") else ""))

        report4 = json.loads((lm4 / "quantize.json").read_text())
        label4 = label_of(report4)
        folders[label4] = lm4
        for other in args.also:
            folders[label_of(json.loads((other / "quantize.json").read_text()))] = other
        if report4["accuracy_level"] == 4:  # the same weights with float compute: what int8 activations cost
            acc0 = work / "lm_int4_dlopt_acc0"
            acc0.mkdir()
            for item in lm4.iterdir():
                if item.name != "model.onnx":  # copies: ORT refuses external data reached through a link
                    shutil.copy2(item, acc0 / item.name)
            import onnx

            graph = onnx.load(str(lm4 / "model.onnx"), load_external_data=False)
            for node in graph.graph.node:
                for a in node.attribute:
                    if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                        a.i = 0
            onnx.save(graph, str(acc0 / "model.onnx"))
            folders[label4.replace("accuracy_level 4", "accuracy_level 0 (same weights)")] = acc0

    # every variant in one InterleavedSampler (dlopt bench's): rotated rounds, so PyTorch and the exports see
    # the same machine states; ratios are per-round quotients with bootstrap CIs (dlopt.stats.ratio_ci)
    # ExecuTorch programs (the mobile path: XNNPACK on this CPU, one thread), lowered here or reused
    from dlopt.optimize.executorch_lm import PteLm, PteLmConfig, lower_lm_to_pte

    pte_files = list(args.pte)
    for precision in [p.strip() for p in args.executorch.split(",") if p.strip()] if not args.pte else []:
        t = time.perf_counter()
        data, _ = lower_lm_to_pte(hf, PteLmConfig(precision=precision, context=args.pte_context))
        pte_files.append(work / f"model.xnnpack-{precision}.pte")
        pte_files[-1].write_bytes(data)
        print(f"ExecuTorch {precision} lowered in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    # loaded after any lowering and before the other runs: the thread pool is sized (1) at load, once
    programs = {f"ExecuTorch XNNPACK, {f.stem.split('-', 1)[-1]} ({f.name})": PteLm(f, threads=1) for f in pte_files}

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, args.prompt_len))
    if fp32 is not None:
        prompt = prompt_tokens(read_lm_folder(fp32), 1, args.prompt_len, seed=0)
    torch_label = "PyTorch FP32, transformers with its KV cache"
    runs = {torch_label: TorchGenerationRun(model, prompt, args.new_tokens)}
    if folders:
        import onnxruntime_genai as og

        for label, folder in folders.items():
            runs[label] = GenerationRun(og, load_lm(og, read_lm_folder(folder), 1), prompt, args.new_tokens)
    for label, program in programs.items():
        runs[label] = PteGenerationRun(program, prompt, args.new_tokens)
    sampler = InterleavedSampler(list(runs.values()))
    sampler.run_rounds(1)  # warm-up: first runs allocate caches and buffers
    for run in runs.values():
        run.clear()
    InterleavedSampler(list(runs.values())).run_rounds(args.rounds)

    reference_tokens = torch_greedy(model, prompt, args.new_tokens)
    agreement = {}
    for label, run in runs.items():
        if isinstance(run, PteGenerationRun):
            same = next((k for k, (a, b) in enumerate(zip(run.tokens, reference_tokens)) if a != b), len(reference_tokens))
            agreement[label] = min(same, 20)
    perplexity = {label: float("nan") for label in runs}
    if not args.no_perplexity:
        perplexity[torch_label] = smollm2.evaluate(torch_runner(model), max_tokens=PPL_TOKENS)["perplexity"]
        for label, folder in folders.items():
            perplexity[label] = smollm2.evaluate(genai_runner(folder), max_tokens=PPL_TOKENS)["perplexity"]
        for label, program in programs.items():
            perplexity[label] = smollm2.evaluate(pte_runner(program), max_tokens=PPL_TOKENS)["perplexity"]
    sizes = {torch_label: weights_mb(hf, "model"), **{k: weights_mb(f, "model") for k, f in folders.items()},
             **{label: f.stat().st_size / 1e6 for label, f in zip(programs, pte_files)}}
    if report4 is not None:
        print(f"dlopt int4: {report4['matmuls_4bit']} MatMuls 4-bit, 8-bit layers: "
              + (", ".join(f"{k} (alone at 4 bits: +{v['perplexity_effect_pct']:.2f} % calibration perplexity)"
                           for k, v in report4["layers_8bit"].items()) or "none"), file=sys.stderr)
    rows = {}
    for label, run in runs.items():
        prefill = _median(run.phases["prefill"]["cpu"])
        decode = _median(run.phases["decode_per_token"]["cpu"])
        rows[label] = (sizes[label], prefill * 1e3, 1 / decode, perplexity[label])

    from dlopt.tables import format_table

    torch_decode = rows[torch_label][2]
    fp32_ppl = rows["dlopt export, fp32 (genai builder + verification)"][3] if folders else rows[torch_label][3]
    print(f"SmolLM2-135M-Instruct, {machine['cpu_model']} ({machine['cpu_isa']}), one thread, thread CPU time; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens greedy, median of {args.rounds} rounds; "
          f"perplexity on {PPL_TOKENS} tokens of lee_background.cor in 512-token windows")
    print(format_table(["variant", "size MB", "prefill ms", "decode tok/s", "decode vs PyTorch", "perplexity",
                        "vs fp32", "first 20 greedy = PyTorch"],
                       [[k, f"{v[0]:.1f}", f"{v[1]:.0f}", f"{v[2]:.1f}", f"{v[2] / torch_decode:.2f}x", f"{v[3]:.2f}",
                         f"{(v[3] / fp32_ppl - 1) * 100:+.1f} %", f"{agreement[k]}/{min(20, args.new_tokens)}" if k in agreement else "-"]
                        for k, v in rows.items()]))
    references = [(torch_label, "PyTorch's")]
    if genai_label in runs:  # the bar: decode tokens/s >= genai int4's, prefill <= genai int4's
        references.append((genai_label, "genai int4's"))
    for reference, whose in references:
        base = runs[reference].phases
        for label, run in runs.items():
            if label == reference:
                continue
            parts = []
            for phase in ("prefill", "decode_per_token"):
                r = ratio_ci(base[phase]["cpu"], run.phases[phase]["cpu"], paired=True)
                parts.append(f"{phase.replace('_', ' ')} {r.estimate:.3f}x (95% CI {r.low:.3f}-{r.high:.3f})")
            print(f"{label}: time of {whose}, {args.rounds} interleaved rounds: " + "; ".join(parts))
    if verification is None:
        return
    worst = max(s["max_abs_diff"] for s in verification["steps"])
    print(f"dlopt's export: verified against transformers in {export_s:.0f} s (prefill + {verification['decode_steps']} "
          f"decode steps, max |logit diff| {worst:.2g}, greedy tokens equal: {verification['greedy_equal']})")


if __name__ == "__main__":
    main()
