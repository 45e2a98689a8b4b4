"""SmolLM2-135M-Instruct generation, side by side, one thread: PyTorch FP32 (transformers with its KV
cache), dlopt's fp32 export (dlopt export --task text-generation: onnxruntime-genai's fused decoder,
verified) and, when onnxruntime-genai's builder is installed, its default int4 build as a reference row.

    nice python benchmarks/llm.py [--prompt-len 128] [--new-tokens 128] [--rounds 3] [--no-int4]

Prefill ms, decode tokens/s: one greedy generation of NEW_TOKENS after a PROMPT_LEN-token prompt (seeded
random ids), thread CPU time, median over rounds. The ONNX rows are measured interleaved by
`dlopt bench --generate` (dlopt.api.bench_generate: ratios to the fp32 export with 95 % CIs); PyTorch is
timed in the same process before them, with the same clock (it cannot join the ONNX sampler).
Perplexity: gensim's lee_background.cor, the first 2,048 tokens in 512-token windows (the issue's
table; dlopt.models.smollm2's evaluation). The "FP32" weights are the packaged Q4_1 GGUF dequantized.
Size: the weights on disk (safetensors for PyTorch; model.onnx + .data for the exports).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PPL_TOKENS = 2048


def _median(values):
    return float(np.median(np.asarray(values)))


def torch_generation(model, prompt: np.ndarray, new_tokens: int, rounds: int) -> tuple[float, float]:
    """(prefill s, decode s per token), medians over `rounds` greedy generations with the KV cache,
    thread CPU time (one thread)."""
    import torch

    prefill, decode = [], []
    ids = torch.from_numpy(prompt.astype(np.int64))
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first is a warm-up
            t0 = time.thread_time()
            out = model(input_ids=ids, use_cache=True)
            t1 = time.thread_time()
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = out.past_key_values
            for _ in range(new_tokens - 1):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.thread_time()
            prefill.append(t1 - t0)
            decode.append((t2 - t1) / (new_tokens - 1))
    return _median(prefill[1:]), _median(decode[1:])


def genai_runner(folder: Path):
    """A dlopt.models.smollm2 runner over an exported folder: the prefill's logits for every position."""
    import onnxruntime_genai as og

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
    args = parser.parse_args()

    import torch
    import transformers

    from dlopt.api import GenerateConfig, bench_generate, export_lm, format_generate
    from dlopt.bench.generate import prompt_tokens, read_lm_folder
    from dlopt.bench.harness import machine_fingerprint
    from dlopt.models import smollm2

    torch.set_num_threads(1)
    machine = machine_fingerprint(1)
    work = Path(tempfile.mkdtemp(prefix="dlopt-llm-bench-"))
    started = time.perf_counter()
    print(f"CPU: {machine['cpu_model']}, {machine['cpu_isa']}; one thread; work folder {work}", file=sys.stderr)
    hf = smollm2.save_hf_folder(work / "hf")
    print(f"SmolLM2 saved as a Hugging Face folder in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    t = time.perf_counter()
    fp32 = export_lm(hf, work / "lm_fp32", log=lambda m: print(m, file=sys.stderr)).folder
    export_s = time.perf_counter() - t
    verification = json.loads((fp32 / "export.json").read_text())["verification"]
    folders = {"dlopt export, fp32 (genai builder + verification)": fp32}
    if not args.no_int4:
        t = time.perf_counter()
        int4 = work / "lm_int4"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(int4),
                        "-p", "int4", "-e", "cpu", "-c", str(work / "cache")], check=True, capture_output=True)
        print(f"genai int4 built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        folders["onnxruntime-genai builder, int4 (default)"] = int4

    rows = {}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    prompt = prompt_tokens(read_lm_folder(fp32), 1, args.prompt_len, seed=0)
    prefill_s, decode_s = torch_generation(model, prompt, args.new_tokens, args.rounds)
    ppl = smollm2.evaluate(torch_runner(model), max_tokens=PPL_TOKENS)["perplexity"]
    rows["PyTorch FP32, transformers with its KV cache"] = (weights_mb(hf, "model"), prefill_s * 1e3, 1 / decode_s,
                                                            ppl)
    del model

    measured = bench_generate(list(folders.values()), GenerateConfig(prompt_len=args.prompt_len,
                                                                     new_tokens=args.new_tokens,
                                                                     rounds=args.rounds)).result
    print(format_generate(measured), file=sys.stderr)
    for (label, folder), run in zip(folders.items(), measured.batches[0].models):
        ppl = smollm2.evaluate(genai_runner(folder), max_tokens=PPL_TOKENS)["perplexity"]
        rows[label] = (weights_mb(folder, "model"), run.summaries["prefill"]["cpu"].median * 1e3,
                       1 / run.summaries["decode_per_token"]["cpu"].median, ppl)

    from dlopt.report import format_table

    torch_decode = rows["PyTorch FP32, transformers with its KV cache"][2]
    print(f"SmolLM2-135M-Instruct, {machine['cpu_model']} ({machine['cpu_isa']}), one thread, thread CPU time; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens greedy, median of {args.rounds} rounds; "
          f"perplexity on {PPL_TOKENS} tokens of lee_background.cor in 512-token windows")
    print(format_table(["variant", "size MB", "prefill ms", "decode tok/s", "decode vs PyTorch", "perplexity"],
                       [[k, f"{v[0]:.1f}", f"{v[1]:.0f}", f"{v[2]:.1f}", f"{v[2] / torch_decode:.2f}x", f"{v[3]:.2f}"]
                        for k, v in rows.items()]))
    b = measured.batches[0]
    for m, r in zip(measured.models[1:], b.models[1:]):
        ratio = r.ratios["decode_per_token"]["cpu"]
        print(f"{m.label}: decode time per token {ratio.estimate:.3f}x the fp32 export's "
              f"(95% CI {ratio.low:.3f}-{ratio.high:.3f}, {b.rounds} interleaved rounds)")
    worst = max(s["max_abs_diff"] for s in verification["steps"])
    print(f"dlopt's export: verified against transformers in {export_s:.0f} s (prefill + {verification['decode_steps']} "
          f"decode steps, max |logit diff| {worst:.2g}, greedy tokens equal: {verification['greedy_equal']})")


if __name__ == "__main__":
    main()
