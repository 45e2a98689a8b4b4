"""An arithmetic bound on MiniLM's INT8 speed-up with padding trimmed (issue 21): how far could the ratio to
FP32 on the padded inputs go if the INT8 model spent time only on its GEMMs?

    python benchmarks/minilm_bound.py [--workdir out/trim_padding] [--samples 64] [--repeats 30]

What it counts and measures (one intra-op thread, thread CPU time, median of --repeats runs):
- MACs per token of the weight GEMMs, read from the FP32 graph (MatMuls with a constant weight), and the
  attention products QK^T and P.V: 2 * hidden * L^2 per layer for a sequence of L tokens.
- The INT8 GEMM floor: ORT's MatMulInteger (u8 x s8, MLAS's VNNI kernel on a CPU with it) on the layer's
  four weight shapes at M rows, times the layer count, measured at a grid of M and interpolated. The
  attention products are counted at the rate those GEMMs reach at the same M (as if they ran in INT8 too:
  ORT's QAttention runs them in float, slower). Nothing else (LayerNorm, softmax, GELU, quantization of
  activations, the trim prefix) is counted: the floor is below anything a real model can reach.
- The FP32 baseline: the FP32 model (ORT's default fusions, as dlopt.bench runs it) on one padded sentence
  [1, 128] and on a padded batch [8, 128]. Its time does not depend on the real lengths.

Per configuration the bound is FP32 time / floor, median over the benchmark's batches (as dlopt.bench's
ratio is a median over rounds that cycle through the batches): batch 1 sliced (L = the sentence's length),
batch 8 sliced (8 rows of the batch's longest length), batch 8 packed (the sum of the real lengths, attention
per row on its own length), and batch 8 sorted by length. A second, tighter bound counts what ORT's own kernels
take for one layer's projections and attention (QAttention or DynamicQuantizeMatMul + MultiHeadAttention,
DynamicQuantizeMatMul, MatMulIntegerToFloat: see kernel_session), measured alone on each batch's shapes, times
the layer count: the speed-up left if LayerNorm, GELU, residual sums, per-token scales, embeddings and
pooling took no time. Needs the FP32 model built by
benchmarks/trim_padding.py in --workdir.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def thread_time_ms(session, feeds: dict[str, np.ndarray], repeats: int) -> float:
    """Median thread CPU time of one run (ORT with one intra-op thread runs on the calling thread)."""
    from dlopt.bench import median_cpu_ms

    return median_cpu_ms(lambda: session.run(None, feeds), repeats)


def weight_shapes(fp32: Path) -> tuple[list[tuple[int, int]], int, int]:
    """The (K, N) of every MatMul with a constant weight, the hidden size and the layer count."""
    import onnx

    model = onnx.load(fp32)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes = [
        (int(inits[n.input[1]][0]), int(inits[n.input[1]][1]))
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]]) == 2
    ]
    layers = sum(1 for n in model.graph.node if n.op_type == "Softmax")
    hidden = min(k for k, _ in shapes)
    return shapes, hidden, layers


def gemm_session(shapes: list[tuple[int, int]]):
    """One graph of independent MatMulInteger nodes, one per weight shape, u8 activations x s8 weights."""
    from onnx import TensorProto, helper, numpy_helper

    from dlopt.sessions import cpu_session

    rng = np.random.default_rng(0)
    nodes, inputs, outputs, inits = [], [], [], []
    for i, (k, n) in enumerate(shapes):
        inputs.append(helper.make_tensor_value_info(f"a{i}", TensorProto.UINT8, ["M", k]))
        inits.append(numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), f"w{i}"))
        inits.append(numpy_helper.from_array(np.array(128, np.uint8), f"azp{i}"))
        nodes.append(helper.make_node("MatMulInteger", [f"a{i}", f"w{i}", f"azp{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.INT32, ["M", n]))
    graph = helper.make_graph(nodes, "gemms", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return cpu_session(model.SerializeToString())


def kernel_session(hidden: int, ffn: int, heads: int, packed: bool):
    """One layer's GEMM-bearing kernels as dlopt's INT8 MiniLM runs them, side by side (independent nodes):
    sliced: QAttention (QKV projection and float attention) on [B, L, H]; packed: the QKV projection as
    DynamicQuantizeMatMul on [T, H] and MultiHeadAttention on [B, L, H]; both: DynamicQuantizeMatMul for the
    output projection and FFN1, MatMulIntegerToFloat (u8 input) for FFN2."""
    from onnx import TensorProto, helper, numpy_helper

    from dlopt.sessions import cpu_session

    rng = np.random.default_rng(0)
    h, f = hidden, ffn
    inits = [
        numpy_helper.from_array(rng.integers(-127, 128, shape, dtype=np.int8), name)
        for name, shape in (("w_qkv", (h, 3 * h)), ("w_out", (h, h)), ("w_ffn1", (h, f)), ("w_ffn2", (f, h)))
    ] + [
        numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
        numpy_helper.from_array(np.full(h, 0.01, np.float32), "scale_h"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(128, np.uint8), "a_zp"),
        numpy_helper.from_array(np.zeros(3 * h, np.float32), "b_qkv"),
    ]
    node, info = helper.make_node, helper.make_tensor_value_info
    rows = ["T", h] if packed else ["B", "L", h]
    inputs = [info("x", TensorProto.FLOAT, rows), info("ffn_u8", TensorProto.UINT8, rows[:-1] + [f])]
    nodes = [
        node("DynamicQuantizeMatMul", ["x", "w_out", "scale", "w_zp"], ["y_out"], domain="com.microsoft"),
        node("DynamicQuantizeMatMul", ["x", "w_ffn1", "scale", "w_zp"], ["y_ffn1"], domain="com.microsoft"),
        node("MatMulIntegerToFloat", ["ffn_u8", "w_ffn2", "scale", "scale_h", "a_zp", "w_zp"], ["y_ffn2"],
             domain="com.microsoft"),
    ]
    outputs = ["y_out", "y_ffn1", "y_ffn2"]
    if packed:
        inputs += [info(n, TensorProto.FLOAT, ["B", "L", h]) for n in ("q", "k", "v")]
        inputs.append(info("mask", TensorProto.INT32, ["B", "L"]))
        nodes += [
            node("DynamicQuantizeMatMul", ["x", "w_qkv", "scale", "w_zp", "b_qkv"], ["y_qkv"], domain="com.microsoft"),
            node("MultiHeadAttention", ["q", "k", "v", "", "mask"], ["y_att"], domain="com.microsoft", num_heads=heads),
        ]
    else:
        inputs += [info("x_u8", TensorProto.UINT8, rows), info("mask", TensorProto.INT32, ["B", "L"])]
        nodes.append(node("QAttention", ["x_u8", "w_qkv", "b_qkv", "scale", "scale", "mask", "a_zp", "w_zp"],
                          ["y_att"], domain="com.microsoft", num_heads=heads))
    outputs += ["y_qkv", "y_att"] if packed else ["y_att"]
    graph = helper.make_graph(nodes, "layer_kernels", inputs,
                              [info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return cpu_session(model.SerializeToString())


def kernel_feeds(lens: np.ndarray, hidden: int, ffn: int, packed: bool, batch: int) -> dict[str, np.ndarray]:
    """Inputs for kernel_session: the batch's real lengths, padded to its longest (sliced) or packed."""
    rng = np.random.default_rng(int(lens.sum()))
    longest = int(lens.max())
    mask = (np.arange(longest)[None, :] < lens[:, None]).astype(np.int32)
    if not packed:
        mask = np.ones((batch, longest), np.int32) if batch == 1 else mask
        rows = [batch, longest]
    else:
        rows = [int(lens.sum())]
    feeds = {"x": rng.standard_normal(rows + [hidden]).astype(np.float32),
             "ffn_u8": rng.integers(0, 256, rows + [ffn], dtype=np.uint8), "mask": mask}
    if packed:
        for name in ("q", "k", "v"):
            feeds[name] = rng.standard_normal((batch, longest, hidden)).astype(np.float32)
    else:
        feeds["x_u8"] = rng.integers(0, 256, rows + [hidden], dtype=np.uint8)
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("out/trim_padding"))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--heads", type=int, default=12, help="attention heads (MiniLM-L6: 12)")
    args = parser.parse_args()

    from dlopt.bench import load_data
    from dlopt.runtime import cpu_label
    from dlopt.sessions import cpu_session
    from dlopt.tables import format_table

    fp32 = args.workdir / "minilm_fp32.onnx"
    if not fp32.exists():
        raise SystemExit(f"{fp32}: no such model; run benchmarks/trim_padding.py first")
    shapes, hidden, layers = weight_shapes(fp32)
    per_layer = shapes[: len(shapes) // layers]
    macs_token = sum(k * n for k, n in shapes)
    data = load_data("model:minilm", samples=args.samples, seq_len=128)
    lengths = data["attention_mask"].sum(axis=1).astype(int)
    print(f"CPU: {cpu_label()}; load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"weight GEMMs: {len(shapes)} ({layers} layers of {per_layer}), {macs_token / 1e6:.2f} M MACs per token; "
          f"attention products {2 * hidden * layers} * L^2 MACs per sequence of L")
    print(f"real lengths of the {args.samples} sentences: mean {lengths.mean():.1f}, median {np.median(lengths):.1f}, "
          f"{lengths.min()}-{lengths.max()}")

    # the INT8 GEMM floor at M rows, on a grid, interpolated (time is close to linear in M beyond a few rows)
    session = gemm_session(per_layer)
    grid = [4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 128, 192, 256, 320, 384, 448, 512]
    layer_ms = []
    for m in grid:
        feeds = {f"a{i}": np.random.default_rng(m).integers(0, 256, (m, k), dtype=np.uint8)
                 for i, (k, _) in enumerate(per_layer)}
        layer_ms.append(thread_time_ms(session, feeds, args.repeats))
    layer_macs = sum(k * n for k, n in per_layer)
    rates = [m * layer_macs / (t * 1e6) for m, t in zip(grid, layer_ms)]
    print("INT8 GEMM rate (MatMulInteger, one layer's four weight GEMMs), GMAC/s: "
          + ", ".join(f"M={m}: {r:.0f}" for m, r in zip(grid, rates)))

    def floor_ms(rows: int, attention_macs: float) -> float:
        # beyond the grid, the largest M's rate (np.interp would hold its time constant)
        t = float(np.interp(rows, grid, layer_ms)) if rows <= grid[-1] else layer_ms[-1] * rows / grid[-1]
        t *= layers
        rate = float(np.interp(rows, grid, rates)) * 1e6  # MACs per ms
        return t + attention_macs / rate

    fp32_session = cpu_session(fp32)
    fp32_ms = {}
    for batch in (1, 8):
        feeds = {k: v[:batch] for k, v in data.items()}
        fp32_ms[batch] = thread_time_ms(fp32_session, feeds, max(5, args.repeats // (2 * batch)))
    attn = 2 * hidden * layers
    total_macs_128 = macs_token * 128 + attn * 128**2
    print(f"FP32 padded [1, 128]: {fp32_ms[1]:.2f} ms ({total_macs_128 / fp32_ms[1] / 1e6:.0f} GMAC/s); "
          f"[8, 128]: {fp32_ms[8]:.2f} ms ({8 * total_macs_128 / fp32_ms[8] / 1e6:.0f} GMAC/s)\n")

    rows = []
    ffn = max(n for _, n in shapes)
    kernels = {packed: kernel_session(hidden, ffn, args.heads, packed) for packed in (False, True)}

    def add(name: str, batches: list[np.ndarray], packed: bool, batch: int, target: str) -> None:
        floors, tokens, kernel_ms = [], [], []
        for lens in batches:
            feeds = kernel_feeds(lens, hidden, ffn, packed, batch)
            kernel_ms.append(layers * thread_time_ms(kernels[packed], feeds, max(5, args.repeats // batch)))
            if packed:
                rows_, attention = int(lens.sum()), attn * float((lens.astype(float) ** 2).sum())
            else:
                rows_, attention = batch * int(lens.max()), attn * batch * float(lens.max()) ** 2
            floors.append(floor_ms(rows_, attention))
            tokens.append(rows_)
        ratios = fp32_ms[batch] / np.array(floors)
        kernel_ratios = fp32_ms[batch] / np.array(kernel_ms)
        rows.append([name, f"{np.median(tokens):.0f}", f"{fp32_ms[batch]:.2f}", f"{np.median(floors):.2f}",
                     f"{np.median(ratios):.1f}x", f"{np.median(kernel_ms):.2f}", f"{np.median(kernel_ratios):.1f}x",
                     target])

    untrimmed = np.full(1, 128)
    add("batch 1, untrimmed [1, 128]", [untrimmed], False, 1, ">= 3.2x")
    add("batch 1, sliced", [np.array([x]) for x in lengths], False, 1, ">= 12x")
    n8 = len(lengths) // 8 * 8
    b8 = [lengths[i:i + 8] for i in range(0, n8, 8)]
    add("batch 8, untrimmed [8, 128]", [np.full(8, 128)], False, 8, ">= 3.2x")
    add("batch 8, sliced", b8, False, 8, ">= 20x")
    add("batch 8, packed", b8, True, 8, ">= 20x")
    s8 = np.sort(lengths)[:n8]
    add("batch 8 sorted, sliced", [s8[i:i + 8] for i in range(0, n8, 8)], False, 8, "")
    add("batch 8 sorted, packed", [s8[i:i + 8] for i in range(0, n8, 8)], True, 8, "")
    print(f"## INT8 GEMM-only floor and the speed-up it bounds ({cpu_label()}, one thread, thread CPU time)")
    print(format_table(["configuration", "GEMM rows", "FP32 padded ms", "INT8 GEMM floor ms", "bound",
                        "ORT GEMM+attention kernels ms", "bound with them", "target"], rows))
    print("(medians over the benchmark's batches; the second bound counts ORT's own kernels for the projections "
          "and the attention, measured alone, and nothing else)")


if __name__ == "__main__":
    main()
