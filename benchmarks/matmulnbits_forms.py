"""What a Q4_1 weight (a scale and a fractional zero point per block of 32, as SmolLM2's packaged GGUF holds its
layers) costs ONNX Runtime's MatMulNBits at one decode step, in each form it can be written (issue 22's decode bar).

    python benchmarks/matmulnbits_forms.py [--layers 30] [--rounds 40]

One decode step of SmolLM2-135M's 30 decoder layers: per layer the fused QKV [576 -> 960], the output projection
[576 -> 576], gate and up [576 -> 1536] and down [1536 -> 576], all at M = 1, every layer's weights distinct (21 MB
and more per step: read from memory, as in a real decode step, not from cache). Random Q4_1 blocks (codes 0-15,
scale, fractional zero point). Forms, each one graph of 150 MatMulNBits (accuracy_level 4: int8 activations):

- symmetric: no zero points (onnxruntime-genai's builder int4): the float weights rounded to nearest on a
  symmetric grid per block.
- integer zero points: uint8 zero points, the float weights rounded to nearest on an asymmetric grid.
- float zero points: the zero points as float, which MatMulNBits accepts; exact.
- offset rows (dlopt quantize --precision int4): integer zero points, the fractional rest as 4-bit rows appended
  along K, read against the input's block sums ([x, S(x)] @ [W; E]: one indicator MatMul and a Concat per
  distinct input, as quantize_lm writes them); exact to the offsets' own 4-bit rounding.

Prints per form: the initializers' MB, ms per step (median over rounds; forms interleaved round by round, one
thread, thread CPU time), the ratio to the symmetric form, and the max error against the float Q4_1 weights
relative to the output's max.
"""

from __future__ import annotations

import argparse

import numpy as np

BLOCK = 32
SHAPES = ((576, 960), (576, 576), (576, 1536), (576, 1536), (1536, 576))  # qkv, o, gate, up, down: (K, N)
INPUTS = ("qkv", "o", "mlp", "mlp", "down")  # which of a layer's 4 distinct inputs each reads (gate and up share)


def input_names(layers: int) -> list[str]:
    """The input each MatMul reads, in weight order: per layer its own 4 (a decode step's are all distinct)."""
    return [f"x{layer}_{role}" for layer in range(layers) for role in INPUTS]


def q4_1_weight(rng: np.random.Generator, k: int, n: int) -> dict[str, np.ndarray]:
    """Random Q4_1 blocks of one [K, N] weight: codes [N, K/32, 32], scales and fractional zero points [N, K/32]."""
    codes = rng.integers(0, 16, size=(n, k // BLOCK, BLOCK)).astype(np.uint8)
    scales = (rng.random((n, k // BLOCK)) * 0.02 + 0.005).astype(np.float32)
    zeros = (rng.random((n, k // BLOCK)) * 15).astype(np.float32)
    return {"codes": codes, "scales": scales, "zeros": zeros}


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values a byte along the last axis, the first in the low nibble (MatMulNBits' layout)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def float_weight(w: dict[str, np.ndarray]) -> np.ndarray:
    """The Q4_1 weight in float, [K, N]."""
    n, blocks, _ = w["codes"].shape
    return (w["scales"][..., None] * (w["codes"] - w["zeros"][..., None])).reshape(n, blocks * BLOCK).T


def build(form: str, weights: list[dict[str, np.ndarray]], inputs: list[str]):
    """One model of every weight's MatMulNBits in `form`, weight i reading inputs[i]; outputs y0, y1, ..."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    summed: dict[str, str] = {}  # input -> [x, S(x)] for the offset rows, one per distinct input as quantize_lm does
    for i, (w, x) in enumerate(zip(weights, inputs)):
        n, blocks, _ = w["codes"].shape
        k = blocks * BLOCK
        codes, scales = w["codes"], w["scales"]
        zero_points = None
        blocked = float_weight(w).T.reshape(n, blocks, BLOCK)
        if form == "symmetric":  # the float weights rounded to nearest on a symmetric grid (genai's builder)
            scales = (np.abs(blocked).max(-1) / 7).astype(np.float32)
            codes = np.clip(np.round(blocked / scales[..., None]) + 8, 0, 15).astype(np.uint8)
        elif form == "integer zero points":  # rounded to nearest on an asymmetric grid with integer zero points
            low, high = blocked.min(-1), blocked.max(-1)
            scales = ((high - low) / 15).astype(np.float32)
            integer = np.clip(np.round(-low / scales), 0, 15)
            codes = np.clip(np.round(blocked / scales[..., None]) + integer[..., None], 0, 15).astype(np.uint8)
            zero_points = _pack_nibbles(integer.astype(np.uint8)).reshape(-1)
        elif form == "offset rows":
            integer = np.clip(np.round(w["zeros"]), 0, 15).astype(np.uint8)
            zero_points = _pack_nibbles(integer).reshape(-1)
        elif form == "float zero points":
            zero_points = w["zeros"].reshape(-1)
        if form == "offset rows":
            # the rest of each block's zero point, (round(z) - z) * scale, as one 4-bit row per block: codes of
            # the offsets over the N columns in blocks of 32 rows of the appended K, absmax-scaled per block
            rest = (np.clip(np.round(w["zeros"]), 0, 15) - w["zeros"]) * w["scales"]  # [N, blocks]
            pad = (-blocks) % BLOCK
            rest = np.pad(rest, ((0, 0), (0, pad)))
            extra = rest.reshape(n, -1, BLOCK)
            extra_scale = np.maximum(np.abs(extra).max(-1), 1e-12) / 7.0
            extra_codes = np.clip(np.round(extra / extra_scale[..., None]) + 8, 0, 15).astype(np.uint8)
            codes = np.concatenate([codes, extra_codes], axis=1)
            scales = np.concatenate([scales, extra_scale.astype(np.float32)], axis=1)
            zero_points = _pack_nibbles(
                np.concatenate([np.clip(np.round(w["zeros"]), 0, 15), np.full(extra_scale.shape, 8)], axis=1).astype(
                    np.uint8
                )
            ).reshape(-1)
            k = codes.shape[1] * BLOCK
            if x not in summed:
                indicator = f"indicator{blocks * BLOCK}"  # one 0/1 matrix per K, shared
                if not any(t.name == indicator for t in inits):
                    ones = np.zeros((blocks * BLOCK, blocks + pad), np.float32)
                    for b in range(blocks):
                        ones[b * BLOCK : (b + 1) * BLOCK, b] = 1.0
                    inits.append(numpy_helper.from_array(ones, indicator))
                nodes.append(helper.make_node("MatMul", [x, indicator], [f"{x}_sums"]))
                nodes.append(helper.make_node("Concat", [x, f"{x}_sums"], [f"{x}_with_sums"], axis=-1))
                summed[x] = f"{x}_with_sums"
            x = summed[x]
        inits += [
            numpy_helper.from_array(_pack_nibbles(codes), f"w{i}"),
            numpy_helper.from_array(scales.reshape(-1), f"s{i}"),
        ]
        node_inputs = [x, f"w{i}", f"s{i}"]
        if zero_points is not None:
            inits.append(numpy_helper.from_array(zero_points, f"z{i}"))
            node_inputs.append(f"z{i}")
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                node_inputs,
                [f"y{i}"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=BLOCK,
                accuracy_level=4,
            )
        )
    graph = helper.make_graph(
        nodes,
        "decode_step",
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, w["codes"].shape[1] * BLOCK])
            for name, w in dict(zip(inputs, weights)).items()
        ],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(weights))],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    from dlopt.bench import InterleavedSampler
    from dlopt.runtime import cpu_label
    from dlopt.sessions import cpu_session

    rng = np.random.default_rng(0)
    weights = [q4_1_weight(rng, k, n) for _ in range(args.layers) for k, n in SHAPES]
    inputs = input_names(args.layers)
    feeds = {
        x: rng.standard_normal((1, w["codes"].shape[1] * BLOCK)).astype(np.float32) for x, w in zip(inputs, weights)
    }
    reference = [feeds[x] @ float_weight(w) for x, w in zip(inputs, weights)]
    forms = ["symmetric", "integer zero points", "float zero points", "offset rows"]
    models = {form: build(form, weights, inputs) for form in forms}
    sessions = {form: cpu_session(m, threads=1) for form, m in models.items()}
    errors = {}
    for form, session in sessions.items():
        outputs = session.run(None, feeds)
        errors[form] = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(outputs, reference))

    def step(session):
        return lambda: session.run(None, feeds)

    sampler = InterleavedSampler([step(s) for s in sessions.values()])
    sampler.warm_up(max_seconds=2.0, clock="cpu")
    sampler.run_rounds(args.rounds)
    ms = {form: sampler.samples(i, "cpu") * 1e3 for i, form in enumerate(forms)}
    print(f"CPU: {cpu_label()}")
    print(
        f"one decode step of {args.layers} layers x 5 MatMulNBits at M = 1 (K, N: {list(SHAPES)}), block 32, "
        f"accuracy_level 4; one thread, thread CPU time, {args.rounds} interleaved rounds"
    )
    print(f"{'form':22s} {'MB':>7s} {'ms/step':>8s} {'vs symmetric [95% CI]':>24s} {'max rel error':>14s}")
    for form in forms:
        mb = sum(t.ByteSize() for t in models[form].graph.initializer) / 1e6
        ratio = ms[form] / ms["symmetric"]
        boot = [np.median(ratio[rng.integers(0, len(ratio), len(ratio))]) for _ in range(2000)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        print(
            f"{form:22s} {mb:7.2f} {np.median(ms[form]):8.3f} {np.median(ratio):9.3f}x [{lo:.3f}, {hi:.3f}]"
            f" {errors[form]:14.4f}"
        )


if __name__ == "__main__":
    main()
