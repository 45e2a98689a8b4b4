"""Block quantization in numpy: the 4-bit grid per block, clip-ratio search (mse), nibble packing and the
embedding tables (GatherBlockQuantized)."""

from __future__ import annotations

import numpy as np

from dlopt.optimize.int4.config import MS_DOMAIN
from dlopt.optimize.int4.graph import initializers_by_name


# -- block quantization in numpy (embeddings, and the error model used to rank nodes) -----------------
def block_grid(
    blocks: np.ndarray, symmetric: bool, ratio: float = 1.0, bits: int = 4, positive_scale: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (float arrays, shape blocks.shape[:-1]) of each block along the last axis.

    Symmetric: the zero point is fixed at 2^(bits-1) (what the contrib ops assume without one) and the
    scale is *signed*, v/-2^(bits-1) for the block's largest-magnitude weight v, so that weight lands
    exactly on the code that has no positive twin (-8); the other sign gets 7 steps. An unsigned
    amax/8 would clip a positive extreme to 7/8 of itself (ORT's MLAS quantizer uses the signed
    scale too). Asymmetric: min/max including zero, an integer zero point. `ratio` < 1 shrinks the
    range (the clip search of quantize_blocks_mse and of GPTQ). `positive_scale` (symmetric only): the scale
    kept >= 0, max(-min/8, max/7), so a positive extreme lands on 7 and a negative one on -8 (XNNPACK's
    4-bit kernels refuse a negative scale at load: xnn_status_invalid_parameter)."""
    top = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        if positive_scale:
            low = -np.minimum(blocks.min(axis=-1), 0.0) / mid
            high = np.maximum(blocks.max(axis=-1), 0.0) / (mid - 1)
            return np.maximum(low, high) * ratio, np.full(low.shape, float(mid))
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
        return extreme * (ratio / -mid), np.full(extreme.shape, float(mid))
    lo = np.minimum(blocks.min(axis=-1), 0.0) * ratio
    hi = np.maximum(blocks.max(axis=-1), 0.0) * ratio
    scale = (hi - lo) / top
    zp = np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, top)
    return scale, zp


def _round_to_grid(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int = 4) -> np.ndarray:
    safe = np.where(scale == 0, 1, scale)[..., None]
    return np.clip(np.round(blocks / safe + zp[..., None]), 0, (1 << bits) - 1)


def quantize_blocks(
    w: np.ndarray, block_size: int, symmetric: bool, bits: int = 4, positive_scale: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest block quantization of w [rows, cols] along its last axis.

    Returns (q uint8 [rows, cols] in [0, 2^bits), scales float32 [rows, cols/block], zero points uint8
    [rows, cols/block]); w ≈ (q - zp) · scale (see block_grid for the grid)."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // block_size, block_size).astype(np.float32)
    scale, zp = block_grid(blocks, symmetric, bits=bits, positive_scale=positive_scale)
    q = _round_to_grid(blocks, scale, zp, bits).astype(np.uint8)
    return q.reshape(rows, cols), scale.astype(np.float32), zp.astype(np.uint8)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, block_size: int) -> np.ndarray:
    rows, cols = q.shape
    blocks = q.reshape(rows, cols // block_size, block_size).astype(np.float32) - zp[..., None]
    return (blocks * scale[..., None]).reshape(rows, cols)


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65)


def search_grid(
    blocks: np.ndarray,
    symmetric: bool,
    ratios=CLIP_RATIOS,
    weights: np.ndarray | None = None,
    positive_scale: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """block_grid with, per block, the ratio of `ratios` that gives the smallest squared error of the
    rounded block (each position weighted by `weights`, broadcast against blocks, when given)."""
    best: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (error, scale, zero point) per block
    for ratio in ratios:
        scale, zp = block_grid(blocks, symmetric, ratio, positive_scale=positive_scale)
        diff = (_round_to_grid(blocks, scale, zp) - zp[..., None]) * scale[..., None] - blocks
        err = (np.square(diff) if weights is None else np.square(diff) * weights).sum(axis=-1)
        if best is None:
            best = err, scale, zp
        else:
            better = err < best[0]
            best = np.where(better, err, best[0]), np.where(better, scale, best[1]), np.where(better, zp, best[2])
    if best is None:
        raise ValueError("search_grid needs at least one clip ratio")
    return best[1], best[2]


def quantize_blocks_mse(
    w: np.ndarray, block_size: int, symmetric: bool, ratios=CLIP_RATIOS, rows_per_chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like quantize_blocks, but each block's range is shrunk by the ratio (of `ratios`) that gives the
    smallest squared error: clipping a block's one or two extreme weights buys a finer grid for the
    other 30. Same output format as quantize_blocks."""
    rows, cols = w.shape
    nb = cols // block_size
    q_all = np.empty((rows, cols), np.uint8)
    s_all = np.empty((rows, nb), np.float32)
    z_all = np.empty((rows, nb), np.uint8)
    for start in range(0, rows, rows_per_chunk):
        blocks = w[start : start + rows_per_chunk].reshape(-1, nb, block_size).astype(np.float32)
        scale, zp = search_grid(blocks, symmetric, ratios)
        end = start + blocks.shape[0]
        q_all[start:end] = _round_to_grid(blocks, scale, zp).reshape(blocks.shape[0], cols).astype(np.uint8)
        s_all[start:end] = scale
        z_all[start:end] = zp.astype(np.uint8)
    return q_all, s_all, z_all


def float_grid(blocks: np.ndarray, ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric 4-bit grid with a real-valued zero point: the block's min and max (their range shrunk
    by `ratio` around its middle) on codes 0 and 15, w ≈ (q - zp)·scale with zp = -min/scale any float.
    Unlike block_grid's integer zero point, 0 need not lie on the grid: a Q4_1 (GGUF) block, min m and
    step d, is reproduced exactly. Returns (scale, zero point), float arrays of shape blocks.shape[:-1]."""
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    mid, half = (hi + lo) / 2, (hi - lo) / 2 * ratio
    scale = 2 * half / 15
    zp = -(mid - half) / np.where(scale == 0, 1, scale)
    return scale, np.where(scale == 0, -lo, zp)  # a constant block: all codes 0, scale 0, value via the offset


def search_float_grid(
    blocks: np.ndarray, weights: np.ndarray | None = None, ratios=CLIP_RATIOS
) -> tuple[np.ndarray, np.ndarray]:
    """float_grid with, per block, the ratio of `ratios` of smallest (weighted) squared rounding error."""
    best: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # error, scale, zero point
    for ratio in ratios:
        scale, zp = float_grid(blocks, ratio)
        safe = np.where(scale == 0, 1, scale)[..., None]
        q = np.clip(np.round(blocks / safe + zp[..., None]), 0, 15)
        diff = (q - zp[..., None]) * scale[..., None] - blocks
        err = (np.square(diff) if weights is None else np.square(diff) * weights).sum(axis=-1)
        if best is None:
            best = (err, scale, zp)
        else:
            better = err < best[0]
            best = (np.where(better, err, best[0]), np.where(better, scale, best[1]), np.where(better, zp, best[2]))
    assert best is not None, "ratios is empty"
    return best[1], best[2]


def quantize_blocks_float(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest on float_grid (min/max, real zero point): (codes uint8, scales, zero points float32)."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // block_size, block_size).astype(np.float32)
    scale, zp = float_grid(blocks)
    safe = np.where(scale == 0, 1, scale)[..., None]
    q = np.clip(np.round(blocks / safe + zp[..., None]), 0, 15).astype(np.uint8)
    return q.reshape(rows, cols), scale.astype(np.float32), zp.astype(np.float32)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, low nibble first (odd lengths padded)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def quantize_embedding(model, node, block_size: int, symmetric: bool, clip_search: bool) -> None:
    """Replace Gather(table, ids) by GatherBlockQuantized on uint8-packed 4-bit data (see module doc)."""
    import onnx
    from onnx import numpy_helper

    inits = initializers_by_name(model)
    table = inits[node.input[0]]
    w = numpy_helper.to_array(table)
    q, scale, zp = (quantize_blocks_mse if clip_search else quantize_blocks)(w, block_size, symmetric)
    prefix = f"{table.name}__q4_{node.name}"
    new_inits = [
        numpy_helper.from_array(pack_nibbles(q), f"{prefix}_data"),
        numpy_helper.from_array(scale, f"{prefix}_scales"),
    ]
    inputs = [new_inits[0].name, node.input[1], new_inits[1].name]
    if not symmetric:
        new_inits.append(numpy_helper.from_array(pack_nibbles(zp), f"{prefix}_zero_points"))
        inputs.append(new_inits[2].name)
    model.graph.initializer.extend(new_inits)
    replacement = onnx.helper.make_node(
        "GatherBlockQuantized",
        inputs,
        list(node.output),
        name=node.name,
        domain=MS_DOMAIN,
        bits=4,
        block_size=block_size,
        gather_axis=0,
        quantize_axis=1,
    )
    position = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    model.graph.node.insert(position, replacement)
