"""dlopt's own MatMulNBits writer (the codes of mse and GPTQ) and GPTQ with streamed Hessians."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dlopt.optimize.int4.blocks import (
    CLIP_RATIOS,
    block_grid,
    pack_nibbles,
    quantize_blocks,
    quantize_blocks_float,
    search_float_grid,
    search_grid,
)
from dlopt.optimize.int4.config import MS_DOMAIN, Int4WeightOnly
from dlopt.optimize.int4.graph import initializers_by_name
from dlopt.optimize.int4.sensitivity import stage_session
from dlopt.optimize.rounding import gptq_factor
from dlopt.sessions import feeds_for


def _progress(items: list[Any], description: str, total: int, counts) -> Iterator[Any]:
    """Yield items; on a terminal, a progress bar on stderr advancing on the items `counts` selects."""
    import sys

    from dlopt.data import progress_bar

    with progress_bar(total, description, sys.stderr.isatty() and total >= 4) as advance:
        for item in items:
            yield item
            if counts(item):
                advance()


def write_matmul_nbits(model, include: set[str], config: Int4WeightOnly, quantize) -> Any:
    """4-bit MatMulNBits written by dlopt (algorithms 'mse' and 'gptq').

    `quantize(node, wt)` gets the weight transposed and zero-padded to whole blocks along K, [N, K'],
    and returns (codes uint8 [N, K'], scales [N, K'/block], zero points [N, K'/block]) as
    quantize_blocks does. The layout is the contrib op's: B [N, K'/block, block/2] with two weights per
    byte along K (low nibble first), scales [N·K'/block], zero points packed two per byte
    [N·ceil(K'/block / 2)]; checked against ONNX Runtime's kernel in the tests."""
    import onnx
    from onnx import numpy_helper

    inits = initializers_by_name(model)
    block = config.block_size
    nodes = []
    for node in _progress(
        list(model.graph.node), f"int4 {config.algorithm}", total=len(include), counts=lambda n: n.name in include
    ):
        if node.name not in include:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        k, n = w.shape
        pad = (-k) % block
        wt = np.ascontiguousarray(np.pad(w, ((0, pad), (0, 0))).T)  # [N, K'], blocks along K
        q, scale, zp = quantize(node, wt)
        kb = wt.shape[1] // block
        prefix = f"{node.input[1]}__q4_{node.name}"
        new = [
            numpy_helper.from_array(pack_nibbles(q.reshape(n, kb, block)), f"{prefix}_B"),
            numpy_helper.from_array(scale.astype(np.float32).reshape(-1), f"{prefix}_scales"),
        ]
        if not config.symmetric:
            new.append(numpy_helper.from_array(pack_nibbles(zp).reshape(-1), f"{prefix}_zero_points"))
        model.graph.initializer.extend(new)
        attrs = {"K": k, "N": n, "bits": 4, "block_size": block}
        if config.accuracy_level:
            attrs["accuracy_level"] = config.accuracy_level
        nodes.append(
            onnx.helper.make_node(
                "MatMulNBits",
                [node.input[0]] + [t.name for t in new],
                list(node.output),
                name=f"{node.name}_Q4",
                domain=MS_DOMAIN,
                **attrs,
            )
        )
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return model


def gptq_blocks(
    w: np.ndarray,
    hessian: np.ndarray,
    block_size: int,
    symmetric: bool,
    percdamp: float = 0.01,
    lazy: int = 128,
    act_order: bool = False,
    clip_search: bool = False,
    factor: tuple[np.ndarray, np.ndarray | None] | None = None,
    float_zero_points: bool = False,
    positive_scale: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022) for w [K, N] given H = 2·XᵀX/n [K, K], K a multiple of block_size.

    Columns of K are quantized in order; each one's rounding error is spread over the columns not yet
    quantized through the inverse Hessian's Cholesky factor, so the layer's output error, not the weight
    error, is minimized. Written after ORT's port of neural-compressor's `gptq`, with two differences: the
    error is spread with rows of the upper Cholesky factor (ORT 1.32 indexes its columns, Hinv[i:, i], which
    are zero below the diagonal, so its GPTQ compensates nothing and equals plain rounding), and the
    integer codes and grid are returned as chosen (ORT re-derives a grid from fake-quantized weights).

    Without `act_order` a block's scale and zero point are fixed from the (updated) weights when the
    block starts. With it, rows are visited by decreasing H diagonal (the inputs with the most energy
    first, while there is still room to compensate their error) and every block's grid is fixed up front
    from the original weights ("static groups"), so blocks stay contiguous along K, the MatMulNBits
    layout. `clip_search` picks each block's range by the clip ratio with the smallest squared error,
    weighted by the H diagonal (an input's energy), instead of the full min/max. `factor` is
    gptq_factor(hessian, percdamp, act_order), passed in when several weights share one input (q/k/v).
    `float_zero_points`: asymmetric grids whose zero point is any real number (blocks.float_grid: the
    block's min and max on the end codes, 0 need not be on the grid); zero points are then float32.
    `positive_scale`: symmetric grids whose scale is >= 0 (blocks.block_grid), as XNNPACK's 4-bit kernels take.
    Returns (codes uint8 [N, K], scales [N, K/block], zero points uint8 [N, K/block])."""
    k, n = w.shape
    lazy = max(block_size, lazy - lazy % block_size)
    perm, hinv = factor if factor is not None else gptq_factor(hessian, percdamp, act_order)
    if hinv is None:  # not positive definite even after damping: plain rounding
        if float_zero_points:
            return quantize_blocks_float(np.ascontiguousarray(w.T), block_size)
        return quantize_blocks(np.ascontiguousarray(w.T), block_size, symmetric, positive_scale=positive_scale)
    weights = w.astype(np.float32).copy()
    energy = np.diag(hessian).astype(np.float64)
    # Inputs that were always zero in calibration keep their weights (gptq_factor gives them a unit diagonal
    # and no coupling, so they are rounded to nearest and nothing is compensated through them): an input dead
    # on the calibration samples can fire on others. Zeroing them cost EfficientNet-Lite0's INT8 6 dB on
    # held-out photos (optimize/rounding.py's gptq_round, the same rule).
    nb = k // block_size
    scales = np.zeros((nb, n), np.float32)
    zeros = np.zeros((nb, n), np.float32)

    def fix_grid(g: int, group: np.ndarray) -> None:  # group [block, N] -> the grid of block g, per column
        blocks = np.ascontiguousarray(group.T)
        if float_zero_points:
            e = energy[g * block_size : (g + 1) * block_size]
            scales[g], zeros[g] = search_float_grid(
                blocks,
                weights=e / max(e.mean(), 1e-30) if clip_search else None,
                ratios=CLIP_RATIOS if clip_search else (1.0,),
            )
        elif clip_search:
            e = energy[g * block_size : (g + 1) * block_size]
            scales[g], zeros[g] = search_grid(
                blocks, symmetric, weights=e / max(e.mean(), 1e-30), positive_scale=positive_scale
            )
        else:
            scales[g], zeros[g] = block_grid(blocks, symmetric, positive_scale=positive_scale)

    if act_order:
        for g in range(nb):
            fix_grid(g, weights[g * block_size : (g + 1) * block_size])
    weights = weights[perm]
    codes = np.zeros((k, n), np.uint8)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        block = weights[i1:i2].copy()
        errors = np.zeros_like(block)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // block_size
            if not act_order and col % block_size == 0:  # the group lies inside this lazy block
                fix_grid(g, block[i : i + block_size])
            safe = np.where(scales[g] == 0, 1, scales[g])
            q = np.clip(np.round(block[i] / safe + zeros[g]), 0, 15)
            codes[col] = q.astype(np.uint8)
            err = (block[i] - (q - zeros[g]) * scales[g]) / hinv1[i, i]
            block[i:] -= np.outer(hinv1[i, i:], err)  # a row of the upper Cholesky factor
            errors[i] = err
        weights[i2:] -= hinv[i1:i2, i2:].T @ errors
    return codes.T.copy(), scales.T.astype(np.float32), zeros.T.astype(np.float32 if float_zero_points else np.uint8)


def collect_hessians(model, nodes: list[Any], feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """H = 2·XᵀX / rows for each distinct MatMul input X, accumulated one sample at a time (one run of
    the model per sample for all layers; ORT's GPTQ driver runs it once per input per sample)."""
    from dlopt.optimize.preprocess import with_outputs

    inputs = sorted({n.input[0] for n in nodes})
    session = stage_session(with_outputs(model, inputs))
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for sample in feeds:
        values = dict(zip(names, session.run(None, feeds_for(session, sample))))
        for name in inputs:
            x = values[name].astype(np.float64).reshape(-1, values[name].shape[-1])
            sums[name] = sums.get(name, 0.0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
    return {name: 2.0 * sums[name] / max(rows[name], 1) for name in inputs}
