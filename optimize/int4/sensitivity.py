"""Which MatMuls lose most under 4-bit weights: output SQNR on real activations, one sample at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dlopt.errors import StageError
from dlopt.fidelity import sqnr_from_energy
from dlopt.optimize.int4.blocks import dequantize_blocks, quantize_blocks, quantize_blocks_mse
from dlopt.optimize.int4.graph import initializers_by_name
from dlopt.sessions import cpu_session, feeds_for


# -- running the float model -------------------------------------------------------------------------
def stage_session(model):
    """A CPU session on a model this stage reads or wrote; one that does not load is a StageError."""
    return cpu_session(model, error=StageError, hint="report this model")


def rank_sensitivity(
    model,
    nodes: list[Any],
    feeds: Sequence[Mapping[str, np.ndarray]],
    block_size: int,
    symmetric: bool,
    clip_search: bool = False,
) -> dict[str, float]:
    """SQNR (dB) of each MatMul's output with 4-bit weights against its float output, on real inputs.

    The node's input activations come from the float model (exposed as extra outputs); X·W and
    X·(W - Ŵ) are accumulated sample by sample, so memory does not grow with the number of samples."""
    from onnx import numpy_helper

    from dlopt.optimize.preprocess import with_outputs

    inits = initializers_by_name(model)
    weights, errors = {}, {}
    for node in nodes:
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        k = w.shape[0]
        pad = (-k) % block_size
        wt = np.pad(w, ((0, pad), (0, 0))).T  # [N, K'] so that blocks run along K, as MatMulNBits does
        q, s, z = (quantize_blocks_mse if clip_search else quantize_blocks)(wt, block_size, symmetric)
        weights[node.name] = w
        errors[node.name] = (wt - dequantize_blocks(q, s, z, block_size)).T[:k]
    session = stage_session(with_outputs(model, sorted({n.input[0] for n in nodes})))
    names = [o.name for o in session.get_outputs()]
    signal = {n.name: 0.0 for n in nodes}
    noise = {n.name: 0.0 for n in nodes}
    for sample in feeds:
        values = dict(zip(names, session.run(None, feeds_for(session, sample))))
        for node in nodes:
            x = values[node.input[0]].astype(np.float32)
            x = x.reshape(-1, x.shape[-1])
            signal[node.name] += float(np.square(x @ weights[node.name]).sum())
            noise[node.name] += float(np.square(x @ errors[node.name]).sum())
    return {name: sqnr_from_energy(signal[name], noise[name]) for name in signal}
