"""How often a quantized LM folder says what its FP32 export says: the first NEW greedy tokens of each prompt,
for the default sample prompts of `dlopt package`, sentences of held-out text (continued as plain text) and
chat instructions (through the folder's chat template), each quantized folder against the FP32 export.

    nice python benchmarks/lm_agreement.py --fp32 lm/ --text held_out.txt NAME=FOLDER [NAME=FOLDER ...]

Per variant: the mean count of equal first tokens, how many prompts agree on all NEW, and, where a variant parts
from FP32, the FP32 model's logit gap between its own token and the variant's at that step (a near-tie the
quantization tipped is a small gap), beside the FP32 top-2 gap over all its steps for scale. All through
onnxruntime-genai's generator (dlopt.genai), one thread, the same token ids for every folder; JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from dlopt.genai import check_lm_folder, equal_prefix, open_lm
from dlopt.package.lm import DEFAULT_PROMPTS

CHAT = (
    "What is the capital of Japan?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for better sleep.",
    "How do I reverse a list in Python?",
    "What is 17 times 23?",
    "Translate 'good morning' into French.",
    "Summarize the plot of Romeo and Juliet.",
    "What are the primary colors?",
    "Write a short email declining a meeting invitation.",
    "Why is the sky blue?",
    "List three benefits of regular exercise.",
    "What does HTTP stand for?",
    "Suggest a name for a coffee shop.",
    "How many legs does a spider have?",
    "What is machine learning?",
    "Write a limerick about a cat.",
    "Explain what a black hole is to a child.",
    "What is the boiling point of water in Fahrenheit?",
    "Give me a recipe for a simple salad.",
)


def prompts(text: str, held_out: int) -> list[tuple[str, str]]:
    """The default sample prompts, `held_out` two-sentence passages spread over `text`, the chat instructions."""
    sentences = re.split(r"(?<=[.!?])\s+", text)
    step = max(1, len(sentences) // held_out)
    passages = [" ".join(sentences[i : i + 2]).strip() for i in range(0, len(sentences) - 1, step)]
    passages = [p for p in passages if len(p) > 40][:held_out]
    return [("default", p) for p in DEFAULT_PROMPTS] + [("held-out", p) for p in passages] + [("chat", c) for c in CHAT]


def greedy_with_logits(og, model, ids: list[int], new: int, eos: int) -> tuple[list[int], list[np.ndarray]]:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new)
    generator = og.Generator(model, params)
    feed = np.asarray([ids], dtype=np.int32)
    tokens, logits = [], []
    for _ in range(new):
        generator.append_tokens(feed)
        step = np.asarray(generator.get_output("logits"), dtype=np.float32)[0, -1].copy()
        tokens.append(int(step.argmax()))
        logits.append(step)
        if tokens[-1] == eos:
            break
        feed = np.asarray([[tokens[-1]]], dtype=np.int32)
    del generator
    return tokens, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", required=True, help="the FP32 export (dlopt export --task text-generation)")
    parser.add_argument("--text", required=True, help="held-out UTF-8 text the prompts are drawn from")
    parser.add_argument("--held-out", type=int, default=25, help="passages of --text used as prompts")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--json", help="write the per-prompt rows here")
    parser.add_argument("variants", nargs="+", metavar="NAME=FOLDER")
    args = parser.parse_args()
    folders = dict(v.split("=", 1) for v in args.variants)
    cases = prompts(Path(args.text).read_text(encoding="utf-8"), args.held_out)
    og, model, tokenizer = open_lm(check_lm_folder(args.fp32), 1)
    eos = int(json.loads((Path(args.fp32) / "genai_config.json").read_text())["model"]["eos_token_id"])
    encoded = []
    for kind, prompt in cases:
        if kind == "chat":
            prompt = tokenizer.apply_chat_template(
                json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True
            )
        encoded.append([int(t) for t in tokenizer.encode(prompt)])
    fp32 = [greedy_with_logits(og, model, ids, args.new_tokens, eos) for ids in encoded]
    del model
    rows = [{"kind": k, "prompt": p, "prompt_tokens": len(ids)} for (k, p), ids in zip(cases, encoded)]
    for name, folder in folders.items():
        og, model, _ = open_lm(check_lm_folder(folder), 1)
        for row, ids, (ref, ref_logits) in zip(rows, encoded, fp32):
            tokens, _ = greedy_with_logits(og, model, ids, args.new_tokens, eos)
            same = equal_prefix(ref, tokens)
            row[name] = {"equal_prefix": same}
            if same < min(len(ref), len(tokens)):
                row[name]["fp32_gap"] = float(ref_logits[same][ref[same]] - ref_logits[same][tokens[same]])
        del model
    top2 = [float(np.diff(np.sort(step)[-2:])[0]) for _, logits in fp32 for step in logits]
    print(
        f"{len(rows)} prompts, first {args.new_tokens} greedy tokens vs {args.fp32}; FP32 top-2 logit gap over "
        f"all its steps: quartiles {np.round(np.quantile(top2, [0.25, 0.5, 0.75]), 2).tolist()}"
    )
    print("| variant | prompts | mean equal first tokens | all equal | median FP32 gap where they part |")
    print("|---|---|---|---|---|")
    for name in folders:
        for kind in ("default", "held-out", "chat", "all"):
            chosen = [r[name] for r in rows if kind in ("all", r["kind"])]
            counts = [c["equal_prefix"] for c in chosen]
            gaps = [c["fp32_gap"] for c in chosen if "fp32_gap" in c]
            full = sum(c >= args.new_tokens for c in counts)
            gap = np.median(gaps) if gaps else float("nan")
            print(f"| {name} | {kind} ({len(chosen)}) | {np.mean(counts):.1f} | {full} | {gap:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"fp32": args.fp32, "variants": folders, "rows": rows, "fp32_top2_gaps": top2}, f, indent=1)


if __name__ == "__main__":
    main()
