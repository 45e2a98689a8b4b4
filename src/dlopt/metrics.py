"""The task metrics: how a candidate's outputs (quantized, pruned, ...) agree with the FP32 model's on the
same inputs, judged by what the model is for. One table (METRIC_TABLE) that quantize's verdict, its
accuracy budget and floor recovery, `dlopt eval`, `dlopt gate` and `dlopt optimize` all read.

Every metric compares the candidate with the FP32 reference on the same feeds, so FP32 itself scores the
metric's best value (1.0 for the agreement metrics, which are fractions of FP32's own answers). A metric
is computed streaming: an accumulator takes one run (the outputs of one feed) at a time.

- top1 / topk / cosine: per sample (first axis), as dlopt.fidelity defines them;
- detection: both runs decoded (decode_detections: YOLO-family single outputs, boxes + scores pairs,
  per-level anchor-free maps), confidence threshold, class-wise NMS, then boxes matched at IoU >= 0.5
  with the same class. Jaccard = matched / (ref + cand - matched);
- map: probability maps binarized at a threshold, the fraction of pixels that agree;
- sequence: argmax or CTC greedy decode per sample, the fraction of samples whose sequence is equal;
- embedding: cosine per sample, and retrieval agreement (each sample's nearest neighbour among the
  other samples is the one FP32's embeddings give);
- perplexity: of the next tokens in the feeds' input_ids, and next-token agreement;
- sqnr: a diagnostic, per channel group (channel_groups): a detector's boxes and scores separately.

Why hand-written: the decoders and matching are a few dozen lines of numpy, and the libraries that have
them (ultralytics, torchmetrics, pycocotools) pull in torch or need a dataset's ground truth format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError
from dlopt.fidelity import cosine_per_sample, sample_rows, sqnr_from_energy
from dlopt.usercode import import_user_file, user_code

IOU_MATCH = 0.5  # a candidate box matches an FP32 box at IoU >= this, with the same class
NMS_IOU = 0.45
CONFIDENCE = 0.25
MAP_THRESHOLD = 0.3  # PP-OCR's DB post-processing binarizes its probability map at 0.3
BLANK = 0  # CTC blank index (PP-OCR, most CTC heads)
TOPK = 5
MAX_BOXES_BEFORE_NMS = 3000  # highest-scoring candidates per image kept for NMS (ultralytics: 30000 / 300 out)
MAX_BOXES = 300  # per image after NMS
# SQNR floors by precision, for the sqnr metric (the generic fallback): see optimize/quantize/schemes.py
SQNR_FLOORS_DB = {"int8": 15.0, "int4": 10.0, "fp16": 30.0}


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Metric:
    """One row of the metric table. `floor` is the default floor of quantize's verdict (None: no default,
    the metric is reported only); `checks` are further (component, floor) pairs the verdict also needs.
    drop = how much worse than FP32, in `unit` (agreement fractions: FP32 is 1.0, drop = 1 - value)."""

    name: str
    higher_is_better: bool
    unit: str
    floor: float | None
    description: str
    checks: tuple[tuple[str, float], ...] = ()
    floors: tuple[tuple[str, float], ...] = ()  # (precision, floor) where a precision needs its own

    def drop(self, baseline: float, value: float) -> float:
        return baseline - value if self.higher_is_better else value - baseline

    def floor_for(self, precision: str = "int8") -> float | None:
        return dict(self.floors).get(precision, self.floor)


METRIC_TABLE: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "top1",
            True,
            "fraction of samples",
            0.95,
            "top-1 agreement: the candidate's argmax equals FP32's (classifiers [B, classes])",
        ),
        Metric(
            "topk",
            True,
            "fraction of top-k entries",
            0.9,
            f"top-{TOPK} agreement: share of FP32's top-{TOPK} classes also in the candidate's top-{TOPK}",
        ),
        Metric("cosine", True, "cosine", 0.98, "mean cosine similarity per sample of the first float output"),
        Metric(
            "detection",
            True,
            "fraction of boxes (Jaccard)",
            0.9,
            "decoded boxes after NMS matched at IoU >= 0.5 with the same class: matched / (FP32 + candidate - "
            "matched); also class agreement (matched at IoU ignoring class: same class), recall, false boxes",
            checks=(("class_agreement", 0.99),),
        ),
        Metric(
            "map",
            True,
            "fraction of pixels",
            0.99,
            f"probability map binarized at {MAP_THRESHOLD}: share of pixels equal to FP32's; and no false positive "
            "on a sample where FP32 has none (empty_samples_kept_empty = 1)",
            checks=(("empty_samples_kept_empty", 1.0),),
        ),
        Metric(
            "sequence",
            True,
            "fraction of samples",
            0.97,
            f"per-step argmax, CTC-collapsed (repeats merged, blank {BLANK} removed): share of samples whose "
            "sequence equals FP32's",
        ),
        Metric(
            "embedding",
            True,
            "cosine",
            0.98,
            "mean cosine per sample of L2-normalized embeddings; also retrieval agreement (each sample's nearest "
            "neighbour among the others is FP32's)",
            checks=(("retrieval_agreement", 0.9),),
        ),
        Metric(
            "probability",
            False,
            "probability",
            0.05,
            "largest |p - p_FP32| of a probability output [B, 1] or [B] in [0, 1] (a VAD's speech probability, "
            "a binary classifier); FP32 = 0; also the mean and the share of samples that change side of 0.5",
        ),
        # int4 1.10: SmolLM2-135M's 4-bit GPTQ measured +6.9 % (README), ORT's RTN +20.8 %
        Metric(
            "perplexity",
            False,
            "perplexity ratio to FP32",
            1.05,
            "perplexity of the next tokens of input_ids over FP32's (FP32 = 1.0; drop = ratio - 1); also "
            "next-token agreement; floor int4 1.10, fp16 1.01",
            floors=(("int4", 1.10), ("fp16", 1.01)),
        ),
        Metric(
            "sqnr",
            True,
            "dB",
            SQNR_FLOORS_DB["int8"],
            "lowest SQNR over float outputs and channel groups (boxes and scores apart); floor by precision "
            f"{SQNR_FLOORS_DB}",
            floors=tuple(SQNR_FLOORS_DB.items()),
        ),
    )
}


# Metrics outside the table (a reference model's, a user's) take their direction from their name.
LOWER_IS_BETTER = ("mse", "perplexity", "loss", "error", "rmse", "mae")
HIGHER_IS_BETTER = ("top1", "accuracy", "agreement", "cosine", "sqnr", "pearson", "spearman", "f1", "auc")


def higher_is_better(metric: str) -> bool | None:
    """The table's direction for its metrics; else from the metric's name (reference evaluators name
    theirs, e.g. pang_lee_accuracy, perplexity; model:NAME:metric is read by its last part); None when the
    name does not say."""
    name = metric.split(":")[-1]
    if name in METRIC_TABLE:
        return METRIC_TABLE[name].higher_is_better
    name = name.lower()
    if any(word in name for word in LOWER_IS_BETTER):
        return False
    if any(word in name for word in HIGHER_IS_BETTER):
        return True
    return None


def metric_drop(metric: str, baseline: float, value: float) -> float:
    """How much worse `value` is than `baseline`, in the metric's own unit (positive = worse): the one
    meaning of --max-accuracy-drop in quantize, gate and optimize. Higher is better unless the table or
    the name says otherwise."""
    return value - baseline if higher_is_better(metric) is False else baseline - value


def metric_info(name: str) -> Metric:
    if name not in METRIC_TABLE:
        raise InputError(
            f"unknown metric {name!r}", f"choose from {', '.join(METRIC_TABLE)}, or give --evaluator FILE.py:FUNCTION"
        )
    return METRIC_TABLE[name]


@dataclass(frozen=True)
class SampleCounts:
    """What a metric is made of, per sample: one row of additive counts per sample (a detector's FP32,
    candidate and matched boxes on one image), and `statistics`, which computes the metric's value
    ("value") and its table checks (e.g. "class_agreement") from column sums ([..., k] -> arrays [...];
    NaN where a check has nothing to judge). The bootstrap interval (metric_bounds) resamples the rows."""

    rows: np.ndarray
    statistics: Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class MetricValue:
    """A metric measured: its value, the parts it is made of (counts, secondary fractions) and whether
    the data could judge it at all (`evidence`: False when e.g. FP32 found no box on any sample).
    `counts`: its per-sample counts where the metric is a function of sums over samples (None for a max,
    SQNR, a user's evaluator): what its confidence interval is computed from."""

    name: str
    value: float
    components: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    evidence: bool = True
    note: str = ""
    counts: SampleCounts | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.name,
            "value": _json(self.value),
            "samples": self.samples,
            "evidence": self.evidence,
            "components": {k: _json(v) for k, v in self.components.items()},
            "note": self.note,
        }


def _json(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (np.floating, np.integer)):
        return _json(v.item())
    return v


def judge(value: MetricValue, floor: float | None = None, precision: str = "int8") -> list[dict[str, Any]]:
    """The failed checks of `value` against its floor (default: the table's; the sqnr metric's by
    precision) and its table checks: rows of check, measured, required. Empty: passed."""
    info = METRIC_TABLE.get(value.name)
    if info is None:  # a user's evaluator: higher is better, floor given by the caller
        checks = [(value.name, value.value, floor, True)] if floor is not None else []
    else:
        if floor is None:
            floor = info.floor_for(precision)
        checks = [(value.name, value.value, floor, info.higher_is_better)] if floor is not None else []
        checks += [(c, got, f, True) for c, f in info.checks if (got := value.components.get(c)) is not None]
    failed = []
    for check, measured, required, higher in checks:
        ok = (
            measured is not None
            and math.isfinite(measured)
            and (measured >= required if higher else measured <= required)
        )
        if not ok:
            failed.append(
                {"check": check, "measured": measured, "required": f"{'>=' if higher else '<='} {required:g}"}
            )
    return failed


def margin(value: MetricValue, floor: float | None = None, precision: str = "int8") -> float:
    """The smallest distance above its floors (negative: below one), in the metric's units: what floor
    recovery maximizes. -inf for a non-finite value."""
    info = METRIC_TABLE.get(value.name)
    if info is None:
        return value.value - (floor if floor is not None else value.value)
    if floor is None:
        floor = info.floor_for(precision)
    margins = []
    if floor is not None:
        margins.append(value.value - floor if info.higher_is_better else floor - value.value)
    margins += [value.components[c] - f for c, f in info.checks if value.components.get(c) is not None]
    result = min(margins) if margins else 0.0
    return result if math.isfinite(result) else float("-inf")


# --------------------------------------------------------------------------- uncertainty

VERDICT_CONFIDENCE = 0.95  # one-sided: the verdict's bound is the 5th percentile of the bootstrap replicates
VERDICT_BOOTSTRAP = 2000


def metric_bounds(
    value: MetricValue, confidence: float = VERDICT_CONFIDENCE, *, n_boot: int = VERDICT_BOOTSTRAP, seed: int = 0
) -> dict[str, Any] | None:
    """How far the metric may move on other samples of the same kind: a percentile bootstrap over the
    samples (value.counts: images, sentences; dlopt.stats.resampled_sums) of the value and of each table
    check. For each, `bound` is the pessimistic one-sided bound at `confidence` (the lower one where higher
    is better) and `interval` the (2 confidence - 1) two-sided interval whose pessimistic end it is.
    None where the metric has no per-sample counts (SQNR, a max, a user's evaluator).

    Why: a verdict on few samples is noisy. A layout detector judged on 4 held-out pages (46 boxes) read
    Jaccard 0.92 and passed; 12 other pages read 0.883. The sample-to-sample spread is what a point estimate
    hides; a bound that must clear the floor prices it in. Where every sample agrees exactly, the bootstrap
    has no spread to show and the bound is the value."""
    from dlopt.stats import resampled_sums

    counts = value.counts
    if counts is None or len(counts.rows) == 0:
        return None
    info = METRIC_TABLE.get(value.name)
    higher = info.higher_is_better if info is not None else True
    replicates = counts.statistics(resampled_sums(counts.rows, n_boot=n_boot, seed=seed))
    point = counts.statistics(np.asarray(counts.rows, np.float64).sum(axis=0))
    quantiles = (1.0 - confidence, confidence)
    checks: dict[str, Any] = {}
    for name, draws in replicates.items():
        draws = np.asarray(draws, np.float64)
        draws = draws[~np.isnan(draws)]
        estimate = float(np.asarray(point[name]))
        if draws.size == 0 or math.isnan(estimate):
            continue
        low, high = (float(q) for q in np.quantile(draws, quantiles))
        bound = low if (higher or name != "value") else high  # the table's checks are all higher-is-better
        checks[name] = {"estimate": estimate, "bound": bound, "interval": [low, high]}
    return {
        "confidence": confidence,
        "samples": int(len(counts.rows)),
        "method": f"percentile bootstrap over the {len(counts.rows)} samples ({n_boot} resamples, seed {seed})",
        "checks": checks,
    }


def bounded(value: MetricValue, bounds: Mapping[str, Any] | None) -> MetricValue:
    """`value` with its value and table checks replaced by their pessimistic bounds (metric_bounds), for
    judge() and margin(): the verdict on the bound. Unchanged where there are no bounds."""
    if not bounds:
        return value
    checks = bounds["checks"]
    components = dict(value.components)
    for name, entry in checks.items():
        if name != "value" and name in components:
            components[name] = entry["bound"]
    return dataclasses.replace(
        value, value=checks["value"]["bound"] if "value" in checks else value.value, components=components
    )


# --------------------------------------------------------------------------- detection: decoding


@dataclass(frozen=True)
class Detections:
    """One image's detections after NMS: boxes [M, 4] as x1, y1, x2, y2; scores [M]; classes [M]."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass(frozen=True)
class DetectionLayout:
    """How a detector's outputs hold its boxes and scores.

    kind: "yolo"         one output [B, 4+C, N] (channels_first) or [B, N, 4+C]: cx, cy, w, h, class scores
          "yolo-obj"     one output [B, 5+C, N] / [B, N, 5+C]: cx, cy, w, h, objectness, class scores (v5)
          "boxes-scores" decoded boxes [B, N, 4] (x1, y1, x2, y2) at `outputs[0]` + scores [B, N, C] or
                         [B, C, N] at `outputs[1]` (PicoDet/NanoDet exports with post-processing)
          "levels"       per-level maps: scores [B, C, H, W] paired with box distances [B, 4, H, W]
                         (l, t, r, b in cells) or [B, 4*R, H, W] (distribution over R bins, GFL/DFL);
                         `outputs` lists (scores, boxes) index pairs flattened: s0, b0, s1, b1, ...
                         Levels flattened to scores [B, H*W, C] + boxes [B, H*W, 4 or 4*R] (PP-PicoDet's
                         export) name each level's (H, W) in `grids`.
          "yolox"        one output [B, N, 5+C] of raw grid rows (YOLOX without decode_in_inference): x, y
                         offsets in cells, log w, log h, objectness, class scores; N = the cells of the
                         levels in `grids` (strides 8, 16, 32 of the input)
    outputs: the indices of the model's outputs used, in the order above.
    logits: scores are logits (sigmoid applied before thresholding)."""

    kind: str
    outputs: tuple[int, ...] = (0,)
    channels_first: bool = True
    logits: bool = False
    grids: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        body = {
            "kind": self.kind,
            "outputs": list(self.outputs),
            "channels_first": self.channels_first,
            "logits": self.logits,
        }
        if self.grids:
            body["grids"] = [list(g) for g in self.grids]
        return body


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def _xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [M, 4] with every box in b [K, 4] (x1, y1, x2, y2): [M, K]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float = NMS_IOU, max_boxes: int = MAX_BOXES
) -> np.ndarray:
    """Indices kept by class-wise greedy NMS, highest score first. Class-wise by offsetting each class's
    boxes far apart (torchvision's batched_nms trick), so one pass serves every class; each step drops
    all boxes overlapping the kept one at once (vectorised IoU of one box against the rest)."""
    if scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    boxes = np.asarray(boxes, np.float64)
    offset = classes.astype(np.float64)[:, None] * (float(np.abs(boxes).max()) * 2 + 1)
    shifted = boxes + offset
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = shifted.T
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep: list[int] = []
    while order.size and len(keep) < max_boxes:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = area[i] + area[rest] - inter
        overlap = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def _select(boxes: np.ndarray, scores: np.ndarray, confidence: float, iou: float) -> Detections:
    """One image: boxes [N, 4] xyxy, class scores [N, C] -> thresholded, NMS'ed detections. Each box
    takes its best class (ultralytics' default, multi_label=False)."""
    classes = scores.argmax(axis=1) if scores.shape[1] else np.zeros(len(scores), np.int64)
    best = scores[np.arange(len(scores)), classes] if scores.shape[1] else np.zeros(len(scores))
    # boxes of no area are no detection (and could match nothing, not even themselves)
    real = np.all(np.isfinite(boxes), axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = np.flatnonzero(np.isfinite(best) & (best >= confidence) & real)
    if keep.size > MAX_BOXES_BEFORE_NMS:
        keep = keep[np.argsort(-best[keep], kind="stable")[:MAX_BOXES_BEFORE_NMS]]
    b, s, c = boxes[keep], best[keep], classes[keep]
    kept = nms(b, s, c, iou)
    return Detections(b[kept], s[kept], c[kept])


def _level_boxes(box_map: np.ndarray) -> np.ndarray:
    """[4 or 4R, H, W] distances (cells) from each cell's centre -> [H*W, 4] x1, y1, x2, y2 in cells."""
    channels, h, w = box_map.shape
    if channels != 4:  # a distribution over R bins per side (GFL / DFL): its expectation
        bins = channels // 4
        logits = box_map.reshape(4, bins, h, w)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        dist = (e / e.sum(axis=1, keepdims=True) * np.arange(bins)[None, :, None, None]).sum(axis=1)
    else:
        dist = box_map
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    left, top, right, bottom = dist.astype(np.float64)
    return np.stack([xs - left, ys - top, xs + right, ys + bottom], axis=-1).reshape(-1, 4) / np.array([w, h, w, h])


def decode_detections(
    outputs: Sequence[np.ndarray], layout: DetectionLayout, *, confidence: float = CONFIDENCE, iou: float = NMS_IOU
) -> list[Detections]:
    """Per image of the batch, the detections of one run of a detector (its outputs in model order)
    decoded by `layout`, thresholded at `confidence` and reduced by class-wise NMS at `iou`. Boxes are in
    the model's own coordinates (pixels for YOLO; cell-normalized for per-level maps): only compared with
    the same model's FP32 boxes, so any consistent decoding serves."""
    kind = layout.kind
    if kind in ("yolo", "yolo-obj"):
        out = np.asarray(outputs[layout.outputs[0]], np.float64)
        if out.ndim == 2:
            out = out[None]
        rows = np.swapaxes(out, 1, 2) if layout.channels_first else out  # [B, N, 4+C]
        result = []
        for r in rows:
            scores = r[:, 4:]
            if layout.logits:
                scores = _sigmoid(scores)
            if kind == "yolo-obj":
                scores = scores[:, 1:] * scores[:, :1]
            result.append(_select(_xywh_to_xyxy(r[:, :4]), scores, confidence, iou))
        return result
    if kind == "boxes-scores":
        boxes = np.asarray(outputs[layout.outputs[0]], np.float64)
        scores = np.asarray(outputs[layout.outputs[1]], np.float64)
        if boxes.ndim == 2:
            boxes, scores = boxes[None], scores[None]
        if layout.channels_first:  # scores [B, C, N]
            scores = np.swapaxes(scores, 1, 2)
        if layout.logits:
            scores = _sigmoid(scores)
        return [_select(b, s, confidence, iou) for b, s in zip(boxes, scores)]
    if kind == "yolox":
        out = np.asarray(outputs[layout.outputs[0]], np.float64)
        if out.ndim == 2:
            out = out[None]
        cells = np.concatenate(
            [np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).reshape(-1, 2) for h, w in layout.grids]
        ).astype(np.float64)
        # each level's stride relative to the first: cells of level l are grids[0] / grids[l] times larger
        scale = np.concatenate([np.full(h * w, layout.grids[0][0] / h) for h, w in layout.grids])[:, None]
        result = []
        for r in out:
            xy = (r[:, :2] + cells) * scale
            wh = np.exp(np.clip(r[:, 2:4], -30, 30)) * scale
            scores = r[:, 5:] * r[:, 4:5]
            result.append(_select(_xywh_to_xyxy(np.concatenate([xy, wh], axis=1)), scores, confidence, iou))
        return result
    if kind == "levels":
        pairs = list(zip(layout.outputs[0::2], layout.outputs[1::2]))
        batch = np.asarray(outputs[pairs[0][0]]).shape[0]
        result = []
        for i in range(batch):
            all_boxes, all_scores = [], []
            for level, (s_idx, b_idx) in enumerate(pairs):
                s = np.asarray(outputs[s_idx][i], np.float64)  # [C, H, W], or [H*W, C] with grids
                b = np.asarray(outputs[b_idx][i], np.float64)
                if layout.grids:
                    h, w = layout.grids[level]
                    s = s.T.reshape(-1, h, w)
                    b = b.T.reshape(-1, h, w)
                all_scores.append(s.reshape(s.shape[0], -1).T)
                all_boxes.append(_level_boxes(b))
            scores = np.concatenate(all_scores)
            if layout.logits:
                scores = _sigmoid(scores)
            result.append(_select(np.concatenate(all_boxes), scores, confidence, iou))
        return result
    raise InputError(f"unknown detection layout {kind!r}", "use yolo, yolo-obj, yolox, boxes-scores or levels")


# --------------------------------------------------------------------------- detection: agreement


def match_pairs(
    reference: Detections, candidate: Detections, iou: float = IOU_MATCH, same_class: bool = True
) -> list[tuple[int, int]]:
    """(reference index, candidate index) of boxes matched one to one at IoU >= iou (with the same class
    when same_class): greedy, highest IoU pair first, as COCO-style matching does."""
    if not len(reference) or not len(candidate):
        return []
    overlaps = box_iou(reference.boxes, candidate.boxes)
    if same_class:
        overlaps = np.where(reference.classes[:, None] == candidate.classes[None, :], overlaps, 0.0)
    pairs = np.argwhere(overlaps >= iou)
    pairs = pairs[np.argsort(-overlaps[pairs[:, 0], pairs[:, 1]], kind="stable")]
    used_r, used_c, matched = set(), set(), []
    for r, c in pairs:
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            matched.append((int(r), int(c)))
    return matched


def match_detections(
    reference: Detections, candidate: Detections, iou: float = IOU_MATCH, same_class: bool = True
) -> int:
    """How many candidate boxes match a reference box one to one (match_pairs)."""
    return len(match_pairs(reference, candidate, iou, same_class))


def _subset(detections: Detections, index: Sequence[int]) -> Detections:
    rows = np.asarray(index, np.int64)
    return Detections(detections.boxes[rows].reshape(-1, 4), detections.scores[rows], detections.classes[rows])


class DetectionAgreement:
    """Streaming detection agreement (see detection_agreement)."""

    name = "detection"

    def __init__(
        self, layout: DetectionLayout, confidence: float = CONFIDENCE, iou: float = IOU_MATCH, nms_iou: float = NMS_IOU
    ) -> None:
        self.layout, self.confidence, self.iou, self.nms_iou = layout, confidence, iou, nms_iou
        self.ref = self.cand = self.matched = self.located = self.class_equal = self.images = 0
        self.rows: list[tuple[int, int, int, int, int]] = []  # per image: ref, cand, matched, located, class_equal

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], feeds=None) -> None:
        refs = decode_detections(reference, self.layout, confidence=self.confidence, iou=self.nms_iou)
        cands = decode_detections(outputs, self.layout, confidence=self.confidence, iou=self.nms_iou)
        for r, c in zip(refs, cands):
            self.images += 1
            self.ref += len(r)
            self.cand += len(c)
            same = match_pairs(r, c, self.iou, same_class=True)
            self.matched += len(same)
            # of the boxes found at the same place, how many kept their class: a box matched with its own
            # class kept it; only the rest are paired ignoring class. Pairing all boxes ignoring class at
            # once crossed FP32's own overlapping boxes of two classes (class-wise NMS keeps a Text and a
            # List-item box on one paragraph): DocLayNet INT8 read 0.957 with 141 of 142 boxes matched
            r_rest = [i for i in range(len(r)) if i not in {i for i, _ in same}]
            c_rest = [j for j in range(len(c)) if j not in {j for _, j in same}]
            moved = match_pairs(_subset(r, r_rest), _subset(c, c_rest), self.iou, same_class=False)
            self.located += len(same) + len(moved)
            self.class_equal += len(same)
            self.rows.append((len(r), len(c), len(same), len(same) + len(moved), len(same)))

    def result(self) -> MetricValue:
        union = self.ref + self.cand - self.matched
        jaccard = self.matched / union if union else 1.0
        return MetricValue(
            "detection",
            jaccard,
            {
                "class_agreement": self.class_equal / self.located if self.located else None,  # None: no box to judge
                "recall": self.matched / self.ref if self.ref else 1.0,
                "false_boxes": self.cand - self.matched,
                "fp32_boxes": self.ref,
                "candidate_boxes": self.cand,
                "matched": self.matched,
                "confidence": self.confidence,
                "iou": self.iou,
                "layout": self.layout.to_dict(),
            },
            samples=self.images,
            evidence=self.ref > 0,
            note="" if self.ref else f"FP32 found no box at confidence {self.confidence:g} on any sample",
            counts=SampleCounts(np.asarray(self.rows, np.float64).reshape(-1, 5), _detection_statistics),
        )


def _detection_statistics(sums: np.ndarray) -> dict[str, np.ndarray]:
    ref, cand, matched, located, same = (sums[..., i] for i in range(5))
    union = ref + cand - matched
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "value": np.where(union > 0, matched / np.where(union > 0, union, 1), 1.0),
            "class_agreement": np.where(located > 0, same / np.where(located > 0, located, 1), np.nan),
        }


def detection_agreement(
    reference_runs: Sequence[Sequence[np.ndarray]],
    runs: Sequence[Sequence[np.ndarray]],
    layout: DetectionLayout,
    *,
    confidence: float = CONFIDENCE,
    iou: float = IOU_MATCH,
) -> MetricValue:
    """Detections of `runs` (outputs per run, model order) against those of `reference_runs` (FP32):
    value = Jaccard = matched / (FP32 boxes + candidate boxes - matched), matched one to one at IoU >= iou
    with the same class; components class_agreement (of boxes matched at IoU ignoring class, the share
    with FP32's class), recall (matched / FP32 boxes), false_boxes (candidate boxes unmatched)."""
    acc = DetectionAgreement(layout, confidence, iou)
    for ref, got in zip(reference_runs, runs):
        acc.add(ref, got)
    return acc.result()


# --------------------------------------------------------------------------- probability maps


class MapAgreement:
    name = "map"

    def __init__(self, output: int = 0, threshold: float = MAP_THRESHOLD) -> None:
        self.output, self.threshold = output, threshold
        self.equal = self.pixels = self.false_pixels = self.false_samples = self.samples = self.positives = 0
        self.empty_samples = 0
        self.rows: list[tuple[int, int, int, int]] = []  # per sample: equal, pixels, false_samples, empty_samples

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], feeds=None) -> None:
        r = sample_rows(reference[self.output]) > self.threshold
        c = sample_rows(outputs[self.output]) > self.threshold
        empty = [not bool(row.any()) for row in r]
        self.rows += [
            (int(np.count_nonzero(a == b)), a.size, int(e and bool(b.any())), int(e)) for a, b, e in zip(r, c, empty)
        ]
        self.samples += r.shape[0]
        self.pixels += r.size
        self.equal += int(np.count_nonzero(r == c))
        self.positives += int(np.count_nonzero(r))
        self.false_pixels += int(np.count_nonzero(c & ~r))
        self.false_samples += int(np.count_nonzero(~r.any(axis=1) & c.any(axis=1)))
        self.empty_samples += int(np.count_nonzero(~r.any(axis=1)))

    def result(self) -> MetricValue:
        return MetricValue(
            "map",
            self.equal / self.pixels if self.pixels else 1.0,
            {
                "false_positive_pixels": self.false_pixels,
                "false_positive_share": self.false_pixels / max(self.pixels, 1),
                "samples_with_false_positives_where_fp32_has_none": self.false_samples,
                # false text on an image where FP32 finds none is what a user sees first: every such sample must stay
                # empty (None when no held-out sample is empty for FP32)
                "empty_samples_kept_empty": (1.0 - self.false_samples / self.empty_samples)
                if self.empty_samples
                else None,
                "fp32_positive_pixels": self.positives,
                "threshold": self.threshold,
                "output": self.output,
            },
            samples=self.samples,
            evidence=self.positives > 0,
            note="" if self.positives else f"FP32's map is below {self.threshold:g} everywhere",
            counts=SampleCounts(np.asarray(self.rows, np.float64).reshape(-1, 4), _map_statistics),
        )


def _map_statistics(sums: np.ndarray) -> dict[str, np.ndarray]:
    equal, pixels, false_samples, empty = (sums[..., i] for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "value": np.where(pixels > 0, equal / np.where(pixels > 0, pixels, 1), 1.0),
            "empty_samples_kept_empty": np.where(
                empty > 0, 1.0 - false_samples / np.where(empty > 0, empty, 1), np.nan
            ),
        }


def _share_statistics(sums: np.ndarray) -> dict[str, np.ndarray]:
    """[agreeing, samples] -> the agreeing share (top-1, sequences, mean cosine as [sum, count])."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"value": np.where(sums[..., 1] > 0, sums[..., 0] / np.where(sums[..., 1] > 0, sums[..., 1], 1), 1.0)}


def map_agreement(
    reference_runs: Sequence[Sequence[np.ndarray]],
    runs: Sequence[Sequence[np.ndarray]],
    *,
    output: int = 0,
    threshold: float = MAP_THRESHOLD,
) -> MetricValue:
    """Probability maps (output `output`, e.g. [B, 1, H, W] in [0, 1]) binarized at > threshold: value =
    share of pixels equal to FP32's; components false_positive_pixels (candidate on, FP32 off) and
    samples_with_false_positives_where_fp32_has_none (false text on an empty image)."""
    acc = MapAgreement(output, threshold)
    for ref, got in zip(reference_runs, runs):
        acc.add(ref, got)
    return acc.result()


# --------------------------------------------------------------------------- sequences


def decode_sequence(scores: np.ndarray, *, ctc: bool = True, blank: int = BLANK) -> list[tuple[int, ...]]:
    """Per sample of [B, T, V] scores: the per-step argmax; with ctc, repeats merged and blanks removed
    (greedy CTC decoding)."""
    s = np.asarray(scores)
    if s.ndim == 2:
        s = s[None]
    best = s.argmax(axis=-1)
    result = []
    for row in best:
        if ctc:
            keep = np.ones(row.shape, bool)
            keep[1:] = row[1:] != row[:-1]
            row = row[keep & (row != blank)]
        result.append(tuple(int(v) for v in row))
    return result


def _edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


class SequenceAgreement:
    name = "sequence"

    def __init__(self, output: int = 0, ctc: bool = True, blank: int = BLANK) -> None:
        self.output, self.ctc, self.blank = output, ctc, blank
        self.equal = self.samples = self.edits = self.length = 0
        self.rows: list[tuple[int, int]] = []

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], feeds=None) -> None:
        refs = decode_sequence(reference[self.output], ctc=self.ctc, blank=self.blank)
        cands = decode_sequence(outputs[self.output], ctc=self.ctc, blank=self.blank)
        for r, c in zip(refs, cands):
            self.samples += 1
            self.equal += r == c
            self.rows.append((int(r == c), 1))
            self.edits += _edit_distance(r, c) if r != c else 0
            self.length += len(r)

    def result(self) -> MetricValue:
        return MetricValue(
            "sequence",
            self.equal / self.samples if self.samples else 1.0,
            {
                "token_error_rate": self.edits / self.length if self.length else float(self.edits > 0),
                "decode": "ctc" if self.ctc else "argmax",
                "blank": self.blank if self.ctc else None,
                "output": self.output,
            },
            samples=self.samples,
            evidence=self.samples > 0,
            counts=SampleCounts(np.asarray(self.rows, np.float64).reshape(-1, 2), _share_statistics),
        )


def sequence_agreement(
    reference_runs: Sequence[Sequence[np.ndarray]],
    runs: Sequence[Sequence[np.ndarray]],
    *,
    output: int = 0,
    ctc: bool = True,
    blank: int = BLANK,
) -> MetricValue:
    """Sequences decoded from output `output` ([B, T, V]) per sample (decode_sequence): value = share of
    samples whose sequence equals FP32's; component token_error_rate (edit distance / FP32 length)."""
    acc = SequenceAgreement(output, ctc, blank)
    for ref, got in zip(reference_runs, runs):
        acc.add(ref, got)
    return acc.result()


# --------------------------------------------------------------------------- classes, cosine, embeddings


class TopKAgreement:
    def __init__(self, output: int = 0, k: int = 1) -> None:
        self.output, self.k = output, k
        self.name = "top1" if k == 1 else "topk"
        self.total = 0.0
        self.samples = 0
        self.rows: list[tuple[float, int]] = []

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], feeds=None) -> None:
        r, c = sample_rows(reference[self.output]), sample_rows(outputs[self.output])
        k = min(self.k, r.shape[1])
        if k == 1:
            per_sample = (r.argmax(1) == c.argmax(1)).astype(np.float64)
        else:
            top_r = np.argpartition(-r, k - 1, axis=1)[:, :k]
            top_c = np.argpartition(-c, k - 1, axis=1)[:, :k]
            per_sample = (top_r[:, :, None] == top_c[:, None, :]).any(axis=2).mean(axis=1)
        self.total += float(np.sum(per_sample))
        self.rows += [(float(v), 1) for v in per_sample]
        self.samples += r.shape[0]

    def result(self) -> MetricValue:
        return MetricValue(
            self.name,
            self.total / self.samples if self.samples else 1.0,
            {"k": self.k, "output": self.output},
            samples=self.samples,
            counts=SampleCounts(np.asarray(self.rows, np.float64).reshape(-1, 2), _share_statistics),
        )


class ProbabilityDifference:
    """The largest |p - p_FP32| over every sample of a probability output (and the mean; the share of
    samples whose decision at 0.5 flips)."""

    name = "probability"

    def __init__(self, output: int = 0) -> None:
        self.output = output
        self.worst = self.total = 0.0
        self.count = self.flipped = 0

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], feeds=None) -> None:
        r = np.asarray(reference[self.output], np.float64).reshape(-1)
        c = np.asarray(outputs[self.output], np.float64).reshape(-1)
        diff = np.abs(r - c)
        diff = np.where(np.isfinite(diff), diff, np.inf)
        self.worst = max(self.worst, float(diff.max(initial=0.0)))
        self.total += float(np.sum(np.where(np.isfinite(diff), diff, 1.0)))
        self.count += r.size
        self.flipped += int(np.count_nonzero((r > 0.5) != (c > 0.5)))

    def result(self) -> MetricValue:
        return MetricValue(
            "probability",
            self.worst,
            {
                "mean_abs_difference": self.total / self.count if self.count else 0.0,
                "decisions_flipped_share": self.flipped / self.count if self.count else 0.0,
                "output": self.output,
            },
            samples=self.count,
            evidence=self.count > 0,
        )


class CosineAgreement:
    def __init__(self, output: int = 0, name: str = "cosine", retrieval: bool = False) -> None:
        self.output, self.name, self.retrieval = output, name, retrieval
        self.cosines: list[np.ndarray] = []
        self.refs: list[np.ndarray] = []
        self.cands: list[np.ndarray] = []

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], feeds=None) -> None:
        r, c = sample_rows(reference[self.output]), sample_rows(outputs[self.output])
        self.cosines.append(cosine_per_sample(c, r))
        if self.retrieval:
            self.refs.append(r)
            self.cands.append(c)

    def result(self) -> MetricValue:
        cos = np.concatenate(self.cosines) if self.cosines else np.ones(1)
        cos = np.where(np.isfinite(cos), cos, -1.0)
        components: dict[str, Any] = {"cosine_min": float(cos.min()), "output": self.output}
        if self.retrieval:
            components["retrieval_agreement"] = (
                retrieval_agreement(np.concatenate(self.refs), np.concatenate(self.cands)) if self.refs else None
            )
        counts = SampleCounts(np.stack([cos, np.ones_like(cos)], axis=1), _share_statistics) if self.cosines else None
        return MetricValue(self.name, float(cos.mean()), components, samples=int(cos.size), counts=counts)


def retrieval_agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Share of samples whose nearest neighbour (cosine, among the other samples) under the candidate's
    embeddings is the one under FP32's; None below 3 samples (one neighbour leaves no choice)."""
    r, c = sample_rows(reference), sample_rows(candidate)
    if r.shape[0] < 3:
        return None

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    return float(np.mean(neighbours(r) == neighbours(c)))


class Perplexity:
    """Perplexity of the next tokens of the feeds' input_ids (masked by attention_mask when given), over
    FP32's own perplexity on the same tokens; and next-token agreement (argmax equal to FP32's)."""

    name = "perplexity"

    def __init__(self, output: int = 0, ids_input: str = "input_ids") -> None:
        self.output, self.ids_input = output, ids_input
        self.nll_ref = self.nll_cand = 0.0
        self.tokens = self.agree = self.samples = 0

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], feeds=None) -> None:
        if feeds is None or self.ids_input not in feeds:
            raise InputError(
                f"perplexity needs the feeds' {self.ids_input!r} (the next tokens are the labels)",
                "give data with input_ids, or choose another --metric",
            )
        ids = np.asarray(feeds[self.ids_input])
        r, c = np.asarray(reference[self.output], np.float64), np.asarray(outputs[self.output], np.float64)
        if r.ndim != 3 or ids.shape != r.shape[:2]:
            raise InputError(
                f"perplexity needs logits [B, T, V] beside input_ids [B, T], got {list(r.shape)} and {list(ids.shape)}",
                "choose the LM's logits output, or another --metric",
            )
        labels = ids[:, 1:]
        mask = np.ones(labels.shape, bool)
        if "attention_mask" in feeds:
            mask = np.asarray(feeds["attention_mask"])[:, 1:].astype(bool)
        self.samples += r.shape[0]
        for logits, name in ((r[:, :-1], "ref"), (c[:, :-1], "cand")):
            top = logits.max(axis=-1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
            picked = np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
            nll = float(np.sum((logz - picked)[mask]))
            if name == "ref":
                self.nll_ref += nll
            else:
                self.nll_cand += nll
        self.agree += int(np.count_nonzero((r[:, :-1].argmax(-1) == c[:, :-1].argmax(-1))[mask]))
        self.tokens += int(mask.sum())

    def result(self) -> MetricValue:
        n = max(self.tokens, 1)
        ppl_ref, ppl_cand = math.exp(min(self.nll_ref / n, 700)), math.exp(min(self.nll_cand / n, 700))
        ratio = ppl_cand / ppl_ref if ppl_ref > 0 else float("inf")
        if not math.isfinite(self.nll_cand):
            ratio = float("inf")
        return MetricValue(
            "perplexity",
            ratio,
            {
                "fp32_perplexity": ppl_ref,
                "candidate_perplexity": ppl_cand,
                "next_token_agreement": self.agree / self.tokens if self.tokens else 1.0,
                "tokens": self.tokens,
            },
            samples=self.samples,
            evidence=self.tokens > 0,
        )


# --------------------------------------------------------------------------- SQNR per channel group


def channel_axis(shape: Sequence[int]) -> int | None:
    """The axis along which an output may concatenate channels of different kinds: axis 1 of a rank-4
    map [B, C, H, W]; the shorter non-batch axis of a rank-3 [B, K, N] / [B, N, K] (a detector's 4+C rows
    beside N anchors); None for other ranks."""
    if len(shape) == 4:
        return 1
    if len(shape) == 3 and shape[1] != shape[2]:
        return 1 if shape[1] < shape[2] else 2
    return None


def channel_groups(reference: np.ndarray, axis: int | None = None) -> list[tuple[str, slice]]:
    """Contiguous channel groups of very different ranges along `axis` (default channel_axis): when the
    last channels all lie in [0, 1] (scores, probabilities) and the first k do not (pixel boxes, a
    YOLO head's 4 or 5 leading rows), [("channels 0-(k-1)", ...), ("channels k-..", ...)]; else one
    group. So a collapsed class channel shows in the scores' SQNR, not hidden by the boxes' energy."""
    r = np.asarray(reference)
    axis = channel_axis(r.shape) if axis is None else axis
    if axis is None or r.shape[axis] < 3:
        return [("all", slice(None))]
    moved = np.moveaxis(r, axis, 0).reshape(r.shape[axis], -1)
    low, high = moved.min(axis=1), moved.max(axis=1)
    in_unit = (low >= 0) & (high <= 1)
    k = r.shape[axis]
    first_unit = k
    while first_unit > 0 and in_unit[first_unit - 1]:
        first_unit -= 1
    if first_unit == 0 or first_unit == k or first_unit > k // 2 + 1:
        return [("all", slice(None))]
    absmax = np.abs(moved[:first_unit]).max()
    if absmax <= 1.5:  # the leading channels share the scores' range: nothing to tell apart
        return [("all", slice(None))]
    return [
        (f"channels 0-{first_unit - 1}", slice(0, first_unit)),
        (f"channels {first_unit}-{k - 1}", slice(first_unit, k)),
    ]


class GroupSqnr:
    """Streaming SQNR per float output and per channel group (groups from the first run's reference)."""

    name = "sqnr"

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.groups: dict[int, tuple[int | None, list[tuple[str, slice]]]] = {}
        self.energy: dict[tuple[int, str], list[float]] = {}
        self.samples = 0

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], feeds=None) -> None:
        for i, (r, c) in enumerate(zip(reference, outputs)):
            r = np.asarray(r)
            if not np.issubdtype(r.dtype, np.floating):
                continue
            if i not in self.groups:
                axis = channel_axis(r.shape)
                self.groups[i] = (axis, channel_groups(r, axis))
            axis, groups = self.groups[i]
            r64, c64 = r.astype(np.float64), np.asarray(c, np.float64)
            for label, part in groups:
                if axis is not None and label != "all":
                    index = [slice(None)] * r64.ndim
                    index[axis] = part
                    rp, cp = r64[tuple(index)], c64[tuple(index)]
                else:
                    rp, cp = r64, c64
                sums = self.energy.setdefault((i, label), [0.0, 0.0])
                sums[0] += float(np.sum(rp * rp))
                finite = bool(np.all(np.isfinite(cp)))
                sums[1] += float(np.sum((rp - cp) ** 2)) if finite else float("inf")
        self.samples += 1

    def per_output(self) -> dict[str, dict[str, float]]:
        """{output name: {group label: SQNR dB}} (label "all" when the output has one group)."""
        result: dict[str, dict[str, float]] = {}
        for (i, label), (signal, noise) in self.energy.items():
            result.setdefault(self.names[i] if i < len(self.names) else str(i), {})[label] = sqnr_from_energy(
                signal, noise
            )
        return result

    def result(self) -> MetricValue:
        table = self.per_output()
        values = [v for groups in table.values() for v in groups.values()]
        lowest = min(values) if values else float("inf")
        return MetricValue("sqnr", lowest, {"per_group_db": table}, samples=self.samples, evidence=bool(values))


def group_sqnr(
    reference_runs: Sequence[Sequence[np.ndarray]], runs: Sequence[Sequence[np.ndarray]], names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """SQNR in dB per float output and channel group (channel_groups), over every run."""
    acc = GroupSqnr(names)
    for ref, got in zip(reference_runs, runs):
        acc.add(ref, got)
    return acc.per_output()


# --------------------------------------------------------------------------- choosing the metric


@dataclass(frozen=True)
class MetricChoice:
    """Which metric judges a model, on which outputs, and why. `params` configure its accumulator
    (layout for detection, output index, ctc ...); `evaluator` is a user's FILE.py:FUNCTION."""

    name: str
    reason: str
    params: Mapping[str, Any] = field(default_factory=dict)
    evaluator: str | None = None
    evaluator_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        params = {k: (v.to_dict() if isinstance(v, DetectionLayout) else v) for k, v in self.params.items()}
        body: dict[str, Any] = {"metric": self.name, "why": self.reason, "params": params}
        if self.evaluator:
            body |= {"evaluator": self.evaluator, "evaluator_sha256": self.evaluator_sha256}
        return body

    def accumulator(self, names: Sequence[str] = ()):
        """A fresh streaming accumulator for this metric: add(reference, outputs, feeds), result()."""
        p = dict(self.params)
        if self.evaluator:
            return UserEvaluator(self.evaluator, names, self.name)
        if self.name == "detection":
            return DetectionAgreement(p["layout"], p.get("confidence", CONFIDENCE))
        if self.name == "map":
            return MapAgreement(p.get("output", 0), p.get("threshold", MAP_THRESHOLD))
        if self.name == "sequence":
            return SequenceAgreement(p.get("output", 0), p.get("ctc", True), p.get("blank", BLANK))
        if self.name == "top1":
            return TopKAgreement(p.get("output", 0), 1)
        if self.name == "topk":
            return TopKAgreement(p.get("output", 0), p.get("k", TOPK))
        if self.name == "cosine":
            return CosineAgreement(p.get("output", 0))
        if self.name == "embedding":
            return CosineAgreement(p.get("output", 0), "embedding", retrieval=True)
        if self.name == "probability":
            return ProbabilityDifference(p.get("output", 0))
        if self.name == "perplexity":
            return Perplexity(p.get("output", 0), p.get("ids_input", "input_ids"))
        if self.name == "sqnr":
            return GroupSqnr(names)
        raise InputError(f"unknown metric {self.name!r}", f"choose from {', '.join(METRIC_TABLE)}")


def measure(
    choice: MetricChoice,
    reference_runs: Sequence[Sequence[np.ndarray]],
    runs: Sequence[Sequence[np.ndarray]],
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    names: Sequence[str] = (),
) -> MetricValue:
    """The chosen metric of `runs` against `reference_runs` (outputs per run in model order), streaming."""
    acc = choice.accumulator(names)
    for k, (ref, got) in enumerate(zip(reference_runs, runs)):
        acc.add(ref, got, feeds[k] if feeds is not None else None)
    return acc.result()


def _unit(a: np.ndarray) -> bool:
    return a.size > 0 and float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def _image_size(feeds: Mapping[str, np.ndarray] | None) -> tuple[int, int] | None:
    """(H, W) of the first image-like input [B, 3, H, W] / [B, H, W, 3] among the feeds."""
    for value in (feeds or {}).values():
        a = np.asarray(value)
        if a.ndim == 4 and np.issubdtype(a.dtype, np.floating):
            return (a.shape[2], a.shape[3]) if a.shape[1] in (1, 3, 4) else (a.shape[1], a.shape[2])
    return None


def _grid(cells: int, image: tuple[int, int] | None) -> tuple[int, int] | None:
    """(H, W) of a level of `cells` cells: the power-of-two stride that tiles the image (ceil, as a
    strided conv pads: 800 x 608 at stride 64 is 13 x 10), else a square grid."""
    if image is not None:
        for k in range(1, 9):
            h, w = -(-image[0] // 2**k), -(-image[1] // 2**k)
            if h * w == cells:
                return h, w
    side = math.isqrt(cells)
    return (side, side) if side * side == cells else None


def _detect_layout(
    outputs: Sequence[np.ndarray], requested: bool = False, feeds: Mapping[str, np.ndarray] | None = None
) -> tuple[DetectionLayout, str] | None:
    arrays = [np.asarray(o) for o in outputs]
    floats = [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating)]
    image = _image_size(feeds)
    # YOLOX's raw grid rows: [B, N, 5+C], N the cells of strides 8, 16, 32, log sizes (negative somewhere)
    if image is not None:
        grids = tuple((-(-image[0] // s), -(-image[1] // s)) for s in (8, 16, 32))
        for i in floats:
            a = arrays[i]
            if (
                a.ndim == 3
                and a.shape[1] == sum(h * w for h, w in grids)
                and a.shape[2] >= 6
                and _unit(a[..., 4:])
                and float(a[..., 2:4].min()) < 0
            ):
                return (
                    DetectionLayout("yolox", (i,), False, grids=grids),
                    f"output {i} {list(a.shape)} is YOLOX's raw grid rows [B, N, 5+C]: N = the cells of strides "
                    f"8, 16, 32 of the {image[0]}x{image[1]} input, log sizes, objectness and scores in [0, 1]",
                )
    # decoded boxes [B, N, 4] beside scores [B, N, C] / [B, C, N]
    for i in floats:
        a = arrays[i]
        if a.ndim != 3 or a.shape[2] != 4:
            continue
        for j in floats:
            s = arrays[j]
            if j == i or s.ndim != 3 or s.shape[0] != a.shape[0] or not _unit(s):
                continue
            if s.shape[1] == a.shape[1]:
                return DetectionLayout("boxes-scores", (i, j), False), (
                    f"outputs {i} {list(a.shape)} (boxes) and {j} {list(s.shape)} (scores in [0, 1], [B, N, C])"
                )
            if s.shape[2] == a.shape[1]:
                return DetectionLayout("boxes-scores", (i, j), True), (
                    f"outputs {i} {list(a.shape)} (boxes) and {j} {list(s.shape)} (scores in [0, 1], [B, C, N])"
                )
    # levels flattened: scores [B, H*W, C] in [0, 1] beside boxes [B, H*W, 4 or 4R] (PP-PicoDet's export)
    flat = [i for i in floats if arrays[i].ndim == 3]
    pairs, used = [], set()
    for i in flat:
        s_arr = arrays[i]
        if i in used or not _unit(s_arr):
            continue
        for j in flat:
            b = arrays[j]
            if (
                j != i
                and j not in used
                and b.shape[:2] == s_arr.shape[:2]
                and b.shape[2] % 4 == 0
                and b.shape[2] >= 4
                and not _unit(b)
            ):
                pairs.append((i, j))
                used |= {i, j}
                break
    grids = tuple(grid for s_i, _ in pairs if (grid := _grid(arrays[s_i].shape[1], image)) is not None)
    if len(pairs) >= 2 and len(grids) == len(pairs):  # every level's grid known
        flat_outputs = tuple(x for p in pairs for x in p)
        return DetectionLayout("levels", flat_outputs, grids=grids), (
            f"{len(pairs)} levels of scores [B, H*W, C] in [0, 1] beside boxes [B, H*W, 4R]: outputs "
            + ", ".join(f"{s_i}+{b_i} {list(g)}" for (s_i, b_i), g in zip(pairs, grids))
        )
    # per-level maps: scores [B, C, H, W] in [0, 1] beside boxes [B, 4 or 4R, H, W] of the same H, W
    maps = [i for i in floats if arrays[i].ndim == 4]
    pairs, used = [], set()
    for i in maps:
        s = arrays[i]
        if not _unit(s) or i in used:
            continue
        for j in maps:
            b = arrays[j]
            if j != i and j not in used and b.shape[2:] == s.shape[2:] and b.shape[1] % 4 == 0 and not _unit(b):
                pairs.append((i, j))
                used |= {i, j}
                break
    if len(pairs) >= 2:
        flat_maps = tuple(x for p in pairs for x in p)
        return DetectionLayout("levels", flat_maps), (
            f"{len(pairs)} levels of score maps in [0, 1] beside box maps of the same size: outputs "
            + ", ".join(f"{s}+{b} {list(arrays[s].shape[2:])}" for s, b in pairs)
        )
    # Multi-output heads are matched first: PP-PicoDet's flattened score level [1, 7600, 10] alone also
    # reads as a [B, N, 5+C] single output once --metric detection lifts the box-range test.
    # one output [B, 4+C, N] / [B, N, 4+C]: score rows in [0, 1] behind box rows that are not. Channels
    # first is YOLOv8 and later (no objectness); channels last is YOLOv5/v7/YOLOX's [1, N, 5+C] unless
    # 4+C = 84 (a transposed YOLOv8 COCO head), since the values cannot tell an objectness row apart
    for i in floats:
        a = arrays[i]
        if a.ndim != 3 or a.shape[1] == a.shape[2]:
            continue
        first = a.shape[1] < a.shape[2]
        k = min(a.shape[1], a.shape[2])
        if k < 5:
            continue
        rows = np.moveaxis(a, 1 if first else 2, 0).reshape(k, -1)
        side = "[B, 4+C, N]" if first else "[B, N, 4+C]"
        # box rows in pixels: a tensor entirely in [0, 1] (a CTC head's softmax [1, T, V], normalized boxes)
        # is not taken for a detector unless --metric detection says so
        boxes_outside = float(np.abs(rows[:4]).max()) > 1.5
        if _unit(rows[4:]) and (boxes_outside or (requested and k >= 6 and _unit(rows[:4]))):
            if k >= 6 and not first and k - 4 != 80:
                return (
                    DetectionLayout("yolo-obj", (i,), first),
                    f"output {i} {list(a.shape)} is {side.replace('4+C', '5+C')}: box rows 0-3 "
                    f"({'outside' if boxes_outside else 'inside'} [0, 1]), objectness and class scores in [0, 1] "
                    "(channels last: the YOLOv5/v7/YOLOX export layout, which has an objectness row)",
                )
            return (
                DetectionLayout("yolo", (i,), first),
                f"output {i} {list(a.shape)} is {side}: box rows 0-3 (range up to "
                f"{float(np.abs(rows[:4]).max()):.3g}), {k - 4} class-score rows in [0, 1]",
            )
    return None


def _is_ctc_like(a: np.ndarray, name: str) -> tuple[bool, str]:
    """[B, T, V] of per-step class scores (probabilities, log-probabilities, or an output named like
    logits/probs) whose per-step argmax is one index (a blank) in at least half of the steps: a text line
    of 10 characters in PP-OCR's 40 steps leaves 75 % blanks. Hidden states [B, T, D] can have one dominant
    dimension too: their rows are neither distributions nor named so. A token classifier whose "other"
    class fills half the steps is taken for CTC: name --metric for it."""
    a64 = a.astype(np.float64)
    probs = bool(np.all(a64 >= 0)) and bool(np.allclose(a64.sum(axis=-1), 1.0, atol=1e-2))
    log_probs = bool(np.all(a64 <= 0)) and bool(np.allclose(np.log(np.exp(a64).sum(axis=-1)), 0.0, atol=1e-2))
    named = any(word in name.lower() for word in ("logit", "prob", "ctc", "softmax"))
    best = a.argmax(axis=-1).reshape(-1)
    values, counts = np.unique(best, return_counts=True)
    top = int(values[counts.argmax()])
    share = float(counts.max() / best.size)
    kind = "probabilities" if probs else "log-probabilities" if log_probs else f"scores named {name!r}"
    return (
        (probs or log_probs or named) and share >= 0.5 and a.shape[1] >= 4,
        f"per-step {kind}; index {top} is the argmax of {share:.0%} of the steps (a CTC blank)",
    )


def choose_metric(
    outputs: Sequence[np.ndarray],
    names: Sequence[str] = (),
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    requested: str | None = None,
    evaluator: str | None = None,
) -> MetricChoice:
    """The task metric for a model whose FP32 outputs on one (or a few stacked) feed(s) are `outputs`,
    with the reason. `requested` (a METRIC_TABLE name) or `evaluator` (FILE.py:FUNCTION) override the
    choice; a requested metric still takes its parameters (layout, output) from the outputs."""
    if evaluator:
        path, func = _split_evaluator(evaluator)
        name = requested or Path(path).stem
        return MetricChoice(name, f"--evaluator {evaluator}", evaluator=evaluator, evaluator_sha256=_file_sha256(path))
    arrays = [np.asarray(o) for o in outputs]
    label = [names[i] if i < len(names) else str(i) for i in range(len(arrays))]
    if requested is not None:
        metric_info(requested)
    floats = [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating) and a.size]
    if not floats:
        if requested in (None, "sqnr"):
            return MetricChoice("sqnr", "no floating-point output")
        raise InputError(
            f"metric {requested} needs a floating-point output, and the model has none",
            "choose another --metric, or give --evaluator FILE.py:FUNCTION",
        )
    found = _detect_layout(arrays, requested=requested == "detection", feeds=feeds)
    if requested in (None, "detection") and found is not None:
        layout, why = found
        return MetricChoice("detection", why, {"layout": layout})
    if requested == "detection":
        raise InputError(
            "--metric detection: no detector head found in outputs "
            + ", ".join(f"{label[i]} {list(arrays[i].shape)}" for i in floats),
            "detection reads [B, 4+C, N] / [B, N, 4+C], boxes [B, N, 4] + scores, or per-level maps",
        )
    first = floats[0]
    a = arrays[first]
    shape = f"output {label[first]} {list(a.shape)}"
    ids = feeds.get("input_ids") if feeds else None
    if (
        a.ndim == 3
        and ids is not None
        and np.asarray(ids).shape == a.shape[:2]
        and requested in (None, "perplexity")
        and np.issubdtype(np.asarray(ids).dtype, np.integer)
        and 0 <= int(np.asarray(ids).max()) < a.shape[2]
    ):
        # hidden states [B, T, D] beside input_ids are told apart by the ids: a token id above D names no logit
        return MetricChoice(
            "perplexity",
            f"{shape} is logits [B, T, V] over the feeds' input_ids {list(ids.shape)} (every id < V = {a.shape[2]})",
            {"output": first},
        )
    if requested not in (None, "map", "sequence", "top1", "topk", "cosine", "embedding", "sqnr"):
        return MetricChoice(requested, "--metric " + requested, {"output": first})
    if a.ndim == 3 and a.shape[2] >= 2 and requested in (None, "sequence"):
        ctc, why = _is_ctc_like(a, label[first])
        if ctc or requested == "sequence":
            return MetricChoice(
                "sequence",
                f"{shape} is [B, T, V]: {why}" if ctc else "--metric sequence",
                {"output": first, "ctc": True, "blank": BLANK},
            )
    if requested in (None, "map") and a.ndim == 4 and a.shape[1] == 1 and _unit(a) and min(a.shape[-2:]) >= 8:
        return MetricChoice(
            "map",
            f"{shape} is a one-channel map in [0, 1] (binarized at {MAP_THRESHOLD})",
            {"output": first, "threshold": MAP_THRESHOLD},
        )
    if requested == "map":
        return MetricChoice("map", "--metric map", {"output": first, "threshold": MAP_THRESHOLD})
    if requested in (None, "probability") and a.ndim <= 2 and (a.ndim < 2 or a.shape[1] == 1) and _unit(a) and a.size:
        return MetricChoice("probability", f"{shape} is one probability per sample in [0, 1]", {"output": first})
    if a.ndim == 2 and a.shape[1] >= 2:
        norms = np.linalg.norm(a.astype(np.float64), axis=1)
        normalized = bool(np.allclose(norms, 1.0, atol=1e-3)) and bool((a < 0).any())
        if normalized and requested in (None, "embedding"):
            return MetricChoice(
                "embedding", f"{shape} has L2-normalized rows with negative entries: embeddings", {"output": first}
            )
        if requested in (None, "top1") and not normalized:
            return MetricChoice("top1", f"{shape} is [B, classes]: class scores", {"output": first})
    if requested is not None:
        return MetricChoice(requested, "--metric " + requested, {"output": first})
    return MetricChoice(
        "sqnr",
        f"{', '.join(f'{label[i]} {list(arrays[i].shape)}' for i in floats)}: no task "
        "the outputs' shapes and ranges name; lowest SQNR per output and channel group",
    )


def metric_request(metric: str | None, evaluator: str | None) -> tuple[str | None, str | None]:
    """(table metric, FILE.py:FUNCTION) named by a config's metric and evaluator fields: an evaluator that
    is a table name is a metric (--evaluator cosine), a model:NAME evaluator is the budget's alone."""
    if evaluator and evaluator in METRIC_TABLE and metric is None:
        return evaluator, None
    if evaluator and evaluator.partition(":")[0].endswith(".py"):
        return metric, evaluator
    return metric, None


def assess(
    choice: MetricChoice,
    reference_runs: Sequence[Sequence[np.ndarray]],
    runs: Sequence[Sequence[np.ndarray]],
    feeds: Sequence[Mapping[str, np.ndarray]] | None,
    names: Sequence[str],
    *,
    sqnr_floor: float,
    metric_floor: float | None = None,
    sqnr_too: bool = False,
    precision: str = "int8",
    confidence: float | None = VERDICT_CONFIDENCE,
    bound_decides: bool = True,
) -> dict[str, Any]:
    """The verdict's view of a candidate: the chosen metric measured, its floor and the failed checks.
    When the data cannot judge the metric (FP32 found no box, its map is empty) the lowest SQNR per output
    and channel group is judged instead, and `judged_by` says so. A user's evaluator's default floor is
    its FP32-against-FP32 value minus 0.01. `sqnr_too` (a floor in dB the user set): SQNR per group must
    hold its floor as well. `confidence` (None or 0: the point estimate decides): where the metric has
    per-sample counts, the value and each table check are judged by their pessimistic one-sided bound at
    that confidence (metric_bounds, under "uncertainty"), so that a result that clears its floor here
    clears it on other samples of the same kind too; `margin` is the bound's distance to the floor.
    `bound_decides` False: the bound is computed and reported (`confirmed`: whether it clears the floor
    too) but the estimate decides, as it should for a single model measured once (see
    dlopt.optimize.quantize.heldout.task_metric)."""
    value = measure(choice, reference_runs, runs, feeds, names)
    floor = metric_floor
    if choice.evaluator and floor is None:
        floor = measure(choice, reference_runs, reference_runs, feeds, names).value - 0.01
    elif choice.name == "sqnr" and floor is None:
        floor = sqnr_floor
    elif floor is None:
        floor = METRIC_TABLE[choice.name].floor_for(precision)
    judged, judged_floor, note = value, floor, value.note
    if not value.evidence and choice.name != "sqnr":
        judged = measure(MetricChoice("sqnr", ""), reference_runs, runs, feeds, names)
        judged_floor = sqnr_floor
        note = f"{value.note}: the {choice.name} metric cannot judge these samples, so SQNR per group does"
    bounds = metric_bounds(judged, confidence) if confidence and not choice.evaluator else None
    confirmed = None if bounds is None else not judge(bounded(judged, bounds), judged_floor)
    if bounds is not None and bound_decides:
        points = {"value": judged.value, **judged.components}
        failures = [
            {
                **row,
                "estimate": points.get("value" if row["check"] == judged.name else row["check"]),
                "bound": f"one-sided {bounds['confidence'] * 100:g}% bound, {bounds['method']}",
            }
            for row in judge(bounded(judged, bounds), judged_floor)
        ]
    else:
        failures = judge(judged, judged_floor)
    if choice.evaluator:
        assert floor is not None, "set above from the evaluator's own FP32 value when not given"
        failures = (
            []
            if value.value >= floor
            else [{"check": value.name, "measured": value.value, "required": f">= {floor:g}"}]
        )
        lowest = value.value - floor
    else:
        lowest = margin(bounded(judged, bounds) if bound_decides else judged, judged_floor)
    if sqnr_too and judged.name != "sqnr":
        sqnr = measure(MetricChoice("sqnr", ""), reference_runs, runs, feeds, names)
        failures += [{**row, "check": "sqnr"} for row in judge(sqnr, sqnr_floor)]
        lowest = min(lowest, margin(sqnr, sqnr_floor))
        judged_components: dict[str, Any] | None = dict(sqnr.components)
    else:
        judged_components = dict(judged.components) if judged.name == "sqnr" else None
    named = {"metric": value.name} if choice.evaluator else {}  # a user's function names its own metric
    return {
        **choice.to_dict(),
        **named,
        "value": value.value,
        "floor": floor,
        "higher_is_better": METRIC_TABLE[choice.name].higher_is_better if choice.name in METRIC_TABLE else True,
        "components": dict(value.components),
        "samples": value.samples,
        "evidence": value.evidence,
        "judged_by": judged.name,
        "judged_value": judged.value,
        "judged_floor": judged_floor,
        "note": note,
        "judged_components": judged_components,
        "uncertainty": bounds,
        # what decided: the bound (where the metric has one and it decides) or the estimate
        "decided_by": "bound" if bounds is not None and bound_decides else "estimate",
        "confirmed": confirmed,
        "failures": failures,
        "margin": lowest,
    }


# --------------------------------------------------------------------------- a user's evaluator


def _split_evaluator(spec: str) -> tuple[str, str]:
    path, sep, func = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not func.isidentifier():
        raise InputError(f"cannot read --evaluator {spec!r}", "write FILE.py:FUNCTION, e.g. my_eval.py:score")
    if not Path(path).is_file():
        raise InputError(f"evaluator file {path} does not exist", "give the path of an existing .py file")
    return path, func


def _file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_evaluator(spec: str) -> Callable[..., Any]:
    """The function FUNCTION of FILE.py (--evaluator FILE.py:FUNCTION)."""
    path, func = _split_evaluator(spec)
    module = import_user_file(path, role="evaluator", hint="fix the file (it is imported as a module)")
    function = getattr(module, func, None)
    if not callable(function):
        raise InputError(f"evaluator file {path} has no function {func!r}", f"define def {func}(reference, outputs)")
    return function


class UserEvaluator:
    """A user's function(reference_outputs, outputs) -> float (higher is better) or a dict of named
    metrics (the first is the value, the rest are components); each argument maps output name ->
    the runs' outputs concatenated along the batch axis."""

    def __init__(self, spec: str, names: Sequence[str], name: str) -> None:
        self.spec, self.names, self.name = spec, list(names), name
        self.function = load_evaluator(spec)
        self.refs: list[Sequence[np.ndarray]] = []
        self.cands: list[Sequence[np.ndarray]] = []

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], feeds=None) -> None:
        self.refs.append(reference)
        self.cands.append(outputs)

    def _stack(self, runs: list[Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
        if not runs:
            return {}
        names = self.names or [str(i) for i in range(len(runs[0]))]
        return {
            n: np.concatenate(
                [
                    np.asarray(r[i]).reshape((-1,) + np.asarray(r[i]).shape[1:])
                    if np.asarray(r[i]).ndim
                    else np.asarray(r[i])[None]
                    for r in runs
                ]
            )
            for i, n in enumerate(names)
        }

    def result(self) -> MetricValue:
        with user_code(f"evaluator {self.spec}", hint="fix the evaluator"):  # SystemExit included: exit 2
            got = self.function(self._stack(self.refs), self._stack(self.cands))
        if isinstance(got, Mapping):
            if not got:
                raise InputError(f"evaluator {self.spec} returned an empty dict", "return a float or {name: value}")
            name, value = next(iter(got.items()))
            components = {k: v for k, v in got.items() if k != name}
        else:
            name, value, components = self.name, got, {}
        try:
            value = float(value)
        except (TypeError, ValueError) as e:
            raise InputError(
                f"evaluator {self.spec} returned {type(got).__name__}, not a number",
                "return a float (higher is better) or {name: value}",
            ) from e
        return MetricValue(str(name), value, dict(components), samples=len(self.refs))


__all__ = [
    "BLANK",
    "CONFIDENCE",
    "CosineAgreement",
    "DetectionAgreement",
    "DetectionLayout",
    "Detections",
    "GroupSqnr",
    "HIGHER_IS_BETTER",
    "IOU_MATCH",
    "LOWER_IS_BETTER",
    "MAP_THRESHOLD",
    "METRIC_TABLE",
    "MapAgreement",
    "Metric",
    "MetricChoice",
    "MetricValue",
    "Perplexity",
    "ProbabilityDifference",
    "SQNR_FLOORS_DB",
    "SampleCounts",
    "VERDICT_CONFIDENCE",
    "SequenceAgreement",
    "TopKAgreement",
    "UserEvaluator",
    "assess",
    "bounded",
    "box_iou",
    "channel_axis",
    "channel_groups",
    "choose_metric",
    "decode_detections",
    "decode_sequence",
    "detection_agreement",
    "group_sqnr",
    "higher_is_better",
    "judge",
    "load_evaluator",
    "map_agreement",
    "margin",
    "match_detections",
    "match_pairs",
    "measure",
    "metric_drop",
    "metric_bounds",
    "metric_info",
    "metric_request",
    "nms",
    "retrieval_agreement",
    "sequence_agreement",
]
