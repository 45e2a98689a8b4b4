"""dlopt.metrics: each task metric against hand-computed values, the metric choice on each kind of output,
whole-output SQNR that passes while detections are lost, and the verdict and CLI on a tiny detector."""

from __future__ import annotations

import dataclasses

import json
import math
from importlib.resources import files

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.cli import main
from dlopt.errors import InputError
from dlopt.fidelity import sqnr_db
from dlopt.metrics import (METRIC_TABLE, CosineAgreement, DetectionLayout, MetricChoice, Perplexity, TopKAgreement,
                           assess, bounded, box_iou, channel_groups, choose_metric, decode_detections, decode_sequence,
                           detection_agreement, group_sqnr, judge, map_agreement, match_pairs, measure, metric_bounds,
                           metric_drop, nms, retrieval_agreement, sequence_agreement)


# --------------------------------------------------------------------------- the table


def test_every_metric_has_a_direction_unit_floor_and_description():
    for name, m in METRIC_TABLE.items():
        assert m.name == name and m.unit and m.description and isinstance(m.higher_is_better, bool)
    assert METRIC_TABLE["detection"].floor == 0.9 and dict(METRIC_TABLE["detection"].checks) == {"class_agreement": 0.99}
    assert METRIC_TABLE["map"].floor == 0.99 and METRIC_TABLE["sequence"].floor == 0.97
    # one drop: agreement fractions against FP32's 1.0, perplexity's ratio above FP32's 1.0
    assert metric_drop("detection", 1.0, 0.93) == pytest.approx(0.07)
    assert metric_drop("perplexity", 1.0, 1.2) == pytest.approx(0.2)
    assert metric_drop("model:minilm:pang_lee_accuracy", 0.735, 0.730) == pytest.approx(0.005)


# --------------------------------------------------------------------------- classes, cosine, embeddings


def test_top1_topk_and_cosine_by_hand():
    ref = np.array([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], np.float32)
    cand = np.array([[6, 1, 5, 3, 2, 0], [1, 2, 3, 4, 6, 5]], np.float32)
    top1 = TopKAgreement(k=1)
    top1.add([ref], [cand])
    assert top1.result().value == 0.5  # sample 0 keeps class 0; sample 1 moves from 5 to 4
    top2 = TopKAgreement(k=2)
    top2.add([ref], [cand])
    assert top2.result().value == pytest.approx(0.75)  # {0,1} vs {0,2}: 1/2; {5,4} vs {4,5}: 2/2
    cos = CosineAgreement()
    cos.add([ref], [cand])
    expected = np.mean([r @ c / np.linalg.norm(r) / np.linalg.norm(c) for r, c in zip(ref, cand)])
    assert cos.result().value == pytest.approx(expected)


def test_embedding_cosine_and_retrieval_agreement_by_hand():
    def unit(degrees):
        return np.stack([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], axis=1)

    ref = unit(np.array([0.0, 10.0, 90.0, 100.0]))  # nearest neighbours 1, 0, 3, 2
    same = retrieval_agreement(ref, unit(np.array([1.0, 11.0, 91.0, 99.0])))
    moved = unit(np.array([0.0, 10.0, 90.0, 3.0]))  # sample 3 moved next to 0: neighbours 3, 3, 1, 0
    assert same == 1.0 and retrieval_agreement(ref, moved) == 0.0
    value = measure(MetricChoice("embedding", "test", {"output": 0}), [[ref]], [[moved]])
    assert value.value == pytest.approx((3 + np.cos(np.radians(97.0))) / 4)
    assert value.components["retrieval_agreement"] == 0.0
    assert judge(value) and not judge(measure(MetricChoice("embedding", "t"), [[ref]], [[ref]]))
    assert retrieval_agreement(ref[:2], moved[:2]) is None  # one neighbour each: no choice to agree on


def test_perplexity_and_next_token_agreement_by_hand():
    ids = np.array([[0, 1, 1]], np.int64)  # labels: tokens 1 and 1
    ref = np.array([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 0.0]]])  # p(label) 1/2, 3/4
    cand = np.array([[[0.0, 0.0], [0.0, 0.0], [0.0, 5.0]]])  # p(label) 1/2, 1/2
    acc = Perplexity()
    acc.add([ref], [cand], {"input_ids": ids})
    value = acc.result()
    assert value.components["fp32_perplexity"] == pytest.approx(1 / math.sqrt(0.375))
    assert value.components["candidate_perplexity"] == pytest.approx(2.0)
    assert value.value == pytest.approx(math.sqrt(1.5))  # the ratio; the last step has no label
    assert value.components["next_token_agreement"] == 0.5  # step 0: both 0 (a tie); step 1: 1 vs 0
    assert judge(value)[0]["check"] == "perplexity"  # 1.22 > 1.05 x FP32
    with pytest.raises(InputError, match="perplexity needs the feeds' 'input_ids'"):
        Perplexity().add([ref], [cand], {})


def test_probability_difference_by_hand():
    ref = [[np.array([[0.1], [0.6], [0.9]], np.float32)], [np.array([[0.2]], np.float32)]]
    cand = [[np.array([[0.12], [0.45], [0.9]], np.float32)], [np.array([[0.2]], np.float32)]]
    value = measure(MetricChoice("probability", "test", {"output": 0}), ref, cand)
    assert value.value == pytest.approx(0.15) and value.components["decisions_flipped_share"] == 0.25
    assert value.components["mean_abs_difference"] == pytest.approx(0.17 / 4)
    assert judge(value)[0]["required"] == "<= 0.05" and metric_drop("probability", 0.0, 0.15) == pytest.approx(0.15)


# --------------------------------------------------------------------------- maps and sequences


def test_false_text_on_an_image_where_fp32_finds_none_fails_the_map_floor():
    # 99.9 % of pixels agree, but one empty image gets text: the verdict a user sees first
    empty = np.zeros((1, 1, 32, 32), np.float32)
    text = empty.copy()
    text[0, 0, 4:8, 4:20] = 0.9
    spot = empty.copy()
    spot[0, 0, 30, 30] = 0.5
    value = map_agreement([[text], [empty]], [[text], [spot]])
    assert value.value > 0.999 and value.components["empty_samples_kept_empty"] == 0.0
    assert [f["check"] for f in judge(value)] == ["empty_samples_kept_empty"]
    kept = map_agreement([[text], [empty]], [[text], [empty]])
    assert kept.components["empty_samples_kept_empty"] == 1.0 and judge(kept) == []
    assert map_agreement([[text]], [[text]]).components["empty_samples_kept_empty"] is None


def test_map_agreement_and_false_positives_where_fp32_has_none():
    ref = np.full((2, 1, 4, 4), 0.1, np.float32)
    ref[0, 0, :2, :2] = 0.9  # sample 0: 4 text pixels; sample 1: none
    cand = ref.copy()
    cand[0, 0, 0, 0] = 0.2  # one text pixel lost
    cand[1, 0, 3, 3] = 0.5  # false text on an empty image
    value = map_agreement([[ref]], [[cand]])
    assert value.value == pytest.approx(30 / 32)
    assert value.components["false_positive_pixels"] == 1
    assert value.components["samples_with_false_positives_where_fp32_has_none"] == 1
    assert [f["check"] for f in judge(value)] == ["map", "empty_samples_kept_empty"]
    assert map_agreement([[ref]], [[ref]]).value == 1.0


def test_ctc_decoding_and_sequence_agreement_by_hand():
    def scores(*steps):
        return np.stack([np.eye(4)[list(s)] * 5 for s in steps]).astype(np.float32)

    ref = scores([0, 1, 1, 0, 2, 2], [3, 3, 0, 3, 0, 0])
    cand = scores([1, 1, 0, 0, 2, 0], [3, 0, 0, 0, 0, 0])
    assert decode_sequence(ref) == [(1, 2), (3, 3)]  # repeats merged, blank 0 removed, 3 0 3 kept twice
    assert decode_sequence(cand) == [(1, 2), (3,)]
    value = sequence_agreement([[ref]], [[cand]])
    assert value.value == 0.5 and value.components["token_error_rate"] == pytest.approx(1 / 4)
    assert sequence_agreement([[ref]], [[cand]], ctc=False).value == 0.0  # per-step argmax differs in both


# --------------------------------------------------------------------------- detection


def _yolo(boxes_xywh, scores):
    """One image's [1, 4+C, N] YOLOv8-style output from N boxes (cx, cy, w, h) and [N, C] scores."""
    return np.concatenate([np.asarray(boxes_xywh, np.float32).T, np.asarray(scores, np.float32).T])[None]


YOLO = DetectionLayout("yolo", (0,), channels_first=True)


def test_nms_is_class_wise_and_keeps_the_best_box():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], float)
    kept = nms(boxes, np.array([0.9, 0.8, 0.7, 0.6]), np.array([0, 0, 1, 0]))
    assert list(kept) == [0, 2, 3]  # box 1 overlaps box 0 (IoU 0.81, same class); box 2 is another class
    assert box_iou(boxes[:1], boxes[1:2])[0, 0] == pytest.approx(81 / 100)


def test_detection_agreement_by_hand():
    boxes = [[10, 10, 10, 10], [50, 50, 10, 10], [100, 100, 20, 20], [10, 10, 10, 10]]
    ref = _yolo(boxes, [[0.9, 0.0], [0.0, 0.8], [0.7, 0.0], [0.6, 0.0]])  # box 3 duplicates box 0: NMS drops it
    cand_boxes = [[10, 10, 10, 10], [50, 50, 10, 10], [130, 130, 20, 20], [10, 10, 10, 10]]
    cand = _yolo(cand_boxes, [[0.9, 0.0], [0.8, 0.1], [0.7, 0.0], [0.1, 0.0]])  # box 1 changes class, box 2 moves
    assert [len(d) for d in decode_detections([ref], YOLO)] == [3]
    value = detection_agreement([[ref]], [[cand]], YOLO)
    # matched (same class, IoU >= 0.5): box 0 only. Jaccard 1 / (3 + 3 - 1)
    assert value.value == pytest.approx(0.2)
    assert value.components["class_agreement"] == pytest.approx(0.5)  # boxes 0 and 1 found, box 1 lost its class
    assert value.components["recall"] == pytest.approx(1 / 3) and value.components["false_boxes"] == 2
    assert {f["check"] for f in judge(value)} == {"detection", "class_agreement"}
    assert detection_agreement([[ref]], [[ref]], YOLO).value == 1.0


def test_class_agreement_does_not_cross_fp32s_own_overlapping_boxes_of_two_classes():
    # FP32 keeps two boxes of different classes on one region (class-wise NMS: a layout model's Text and
    # List-item on one paragraph); the candidate keeps both with their classes, shifted a little so that
    # pairing ignoring class would match each FP32 box with the other class's box (IoU 0.975 vs 0.928)
    ref = _yolo([[50, 50, 40, 40], [52, 50, 40, 40]], [[0.9, 0.0], [0.0, 0.8]])
    cand = _yolo([[51.5, 50, 40, 40], [50.5, 50, 40, 40]], [[0.9, 0.0], [0.0, 0.8]])
    (r,), (c,) = decode_detections([ref], YOLO), decode_detections([cand], YOLO)
    assert match_pairs(r, c, same_class=False) == [(0, 1), (1, 0)]  # the crossing this metric must not count
    value = detection_agreement([[ref]], [[cand]], YOLO)
    assert value.value == 1.0 and value.components["class_agreement"] == 1.0
    # a box found only with another class still counts as a class flip
    flipped = _yolo([[50, 50, 40, 40], [200, 200, 10, 10]], [[0.0, 0.9], [0.5, 0.0]])
    lone = _yolo([[50, 50, 40, 40], [200, 200, 10, 10]], [[0.9, 0.0], [0.5, 0.0]])
    value = detection_agreement([[lone]], [[flipped]], YOLO)
    assert value.components["class_agreement"] == pytest.approx(0.5) and value.value == pytest.approx(1 / 3)


def test_whole_output_sqnr_passes_while_collapsed_score_rows_lose_every_detection():
    rng = np.random.default_rng(0)
    n, classes = 400, 3
    boxes = np.stack([rng.uniform(40, 600, n), rng.uniform(40, 600, n), rng.uniform(20, 80, n), rng.uniform(20, 80, n)], 1)
    scores = rng.uniform(0, 0.05, (n, classes))
    scores[:30, 0], scores[30:50, 2] = 0.9, 0.8
    ref = _yolo(boxes, scores)
    cand = ref + rng.normal(0, 0.5, ref.shape).astype(np.float32)  # box noise of half a pixel
    cand[:, 4:] = 0.02  # the score rows collapse, as a shared INT8 scale sized for pixels does to them
    assert sqnr_db(cand, ref) > 25  # the whole output's SQNR passes any SQNR floor
    groups = group_sqnr([[ref]], [[cand]], ["output0"])["output0"]
    assert list(groups) == ["channels 0-3", "channels 4-6"] and groups["channels 4-6"] < 3
    choice = choose_metric([ref], ["output0"])
    assert choice.name == "detection" and choice.params["layout"] == YOLO
    task = assess(choice, [[ref]], [[cand]], None, ["output0"], sqnr_floor=15.0)
    assert task["value"] == 0.0 and task["components"]["fp32_boxes"] > 0 and task["failures"]
    assert task["judged_by"] == "detection" and task["margin"] < 0

    from dlopt.optimize.quantize.heldout import verdict

    fidelity = {"samples": 1, "data": "held-out", "task_metric": task,
                "outputs": {"output0": {"sqnr_db": sqnr_db(cand, ref), "finite": True}}}
    result = verdict({"fidelity": fidelity}, 15.0)
    assert not result["passed"] and result["metric"] == "detection"
    assert result["failures"][0]["check"] == "detection (95% bound)" and "matched" in result["failures"][0]["why"]


def test_the_other_detector_heads_decode_to_the_same_boxes():
    boxes_xyxy = np.array([[10, 10, 30, 30], [50, 50, 90, 70]], np.float32)
    scores = np.array([[0.9, 0.1], [0.2, 0.7]], np.float32)
    expected = decode_detections([_yolo(np.c_[(boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2,
                                              boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], scores)], YOLO)[0]
    last = decode_detections([np.swapaxes(_yolo(np.c_[(boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2,
                                                      boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], scores), 1, 2)],
                             DetectionLayout("yolo", (0,), channels_first=False))[0]
    pair = decode_detections([boxes_xyxy[None], scores.T[None]], DetectionLayout("boxes-scores", (0, 1), True))[0]
    for got in (last, pair):
        np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-5)
        assert list(got.classes) == list(expected.classes) == [0, 1]
    # v5 style: objectness times class score; 0.5 x 0.9 = 0.45 stays, 0.2 x 0.7 = 0.14 is below 0.25
    v5 = np.c_[(boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2, boxes_xyxy[:, 2:] - boxes_xyxy[:, :2], [0.5, 0.2], scores]
    got = decode_detections([v5[None]], DetectionLayout("yolo-obj", (0,), channels_first=False))[0]
    assert len(got) == 1 and got.scores[0] == pytest.approx(0.45)


def test_per_level_score_and_distance_maps_decode_around_the_cell():
    score = np.zeros((1, 2, 4, 4), np.float32)
    score[0, 1, 1, 2] = 0.9  # class 1 at row 1, column 2
    dist = np.ones((1, 4, 4, 4), np.float32)  # one cell to each side
    small = np.zeros((1, 2, 2, 2), np.float32)
    got = decode_detections([score, dist, small, np.ones((1, 4, 2, 2), np.float32)],
                            DetectionLayout("levels", (0, 1, 2, 3)))[0]
    assert len(got) == 1 and got.classes[0] == 1
    np.testing.assert_allclose(got.boxes[0], [(2.5 - 1) / 4, (1.5 - 1) / 4, (2.5 + 1) / 4, (1.5 + 1) / 4])


def test_flattened_levels_decode_as_their_maps_and_are_found_from_the_input_size():
    rng = np.random.default_rng(0)
    image = {"image": np.zeros((1, 3, 80, 48), np.float32)}  # strides 8 and 16: 10 x 6 and 5 x 3 cells
    maps, flat = [], []
    for h, w in ((10, 6), (5, 3)):
        score = rng.uniform(0, 0.3, (1, 2, h, w)).astype(np.float32)
        score[0, 1, h // 2, w // 2] = 0.9
        dfl = rng.normal(0, 2, (1, 32, h, w)).astype(np.float32)  # 4 sides x 8 bins
        maps += [score, dfl]
        flat += [score.reshape(1, 2, -1).transpose(0, 2, 1), dfl.reshape(1, 32, -1).transpose(0, 2, 1)]
    choice = choose_metric(flat, [f"o{i}" for i in range(4)], image)
    assert choice.params["layout"] == DetectionLayout("levels", (0, 1, 2, 3), grids=((10, 6), (5, 3)))
    got = decode_detections(flat, choice.params["layout"], confidence=0.5)[0]
    expected = decode_detections(maps, DetectionLayout("levels", (0, 1, 2, 3)), confidence=0.5)[0]
    assert len(got) >= 1 and np.allclose(got.boxes, expected.boxes) and list(got.classes) == list(expected.classes)


def test_yolox_raw_grid_rows_are_decoded_on_their_cells():
    image = {"images": np.zeros((1, 3, 32, 32), np.float32)}  # strides 8, 16, 32: 16 + 4 + 1 cells
    rows = np.zeros((1, 21, 6), np.float32)
    rows[0, :, 2:4] = -1.0  # log sizes
    rows[0, 5, :] = [0.5, 0.5, math.log(2.0), math.log(2.0), 0.9, 0.8]  # cell (x 1, y 1) of the 4 x 4 level
    choice = choose_metric([rows], ["output"], image)
    layout = choice.params["layout"]
    assert layout.kind == "yolox" and layout.grids == ((4, 4), (2, 2), (1, 1)) and "YOLOX" in choice.reason
    (got,) = decode_detections([rows], layout)
    np.testing.assert_allclose(got.boxes, [[0.5, 0.5, 2.5, 2.5]])  # centre (1.5, 1.5) cells, size 2 cells
    assert got.scores[0] == pytest.approx(0.72)


# --------------------------------------------------------------------------- choosing the metric


def _choice(outputs, feeds=None, **kwargs):
    return choose_metric(outputs, [f"out{i}" for i in range(len(outputs))], feeds, **kwargs)


def test_the_metric_is_chosen_from_each_kind_of_output():
    rng = np.random.default_rng(0)
    yolo = np.concatenate([rng.uniform(0, 640, (1, 4, 100)), rng.uniform(0, 1, (1, 80, 100))], axis=1)
    assert _choice([yolo]).params["layout"] == DetectionLayout("yolo", (0,), True)
    v5 = np.concatenate([rng.uniform(0, 640, (1, 100, 4)), rng.uniform(0, 1, (1, 100, 81))], axis=2)
    assert _choice([v5]).params["layout"].kind == "yolo-obj"
    pair = _choice([rng.uniform(0, 300, (1, 50, 4)), rng.uniform(0, 1, (1, 50, 3))])
    assert pair.name == "detection" and pair.params["layout"] == DetectionLayout("boxes-scores", (0, 1), False)
    levels = []
    for size in (8, 4, 2):
        levels += [rng.uniform(0, 1, (1, 3, size, size)), rng.uniform(0, 5, (1, 4, size, size))]
    assert _choice(levels).params["layout"] == DetectionLayout("levels", (0, 1, 2, 3, 4, 5))
    prob = _choice([rng.uniform(0, 1, (1, 1, 32, 32))])
    assert prob.name == "map" and "one-channel map in [0, 1]" in prob.reason
    ctc = np.full((1, 20, 30), -5.0)
    ctc[0, :, 0] = 5.0
    ctc[0, ::4, 7] = 9.0
    softmax = np.exp(ctc) / np.exp(ctc).sum(axis=-1, keepdims=True)  # PP-OCR's recogniser: [1, T, 6625] probs
    seq = _choice([softmax])
    assert seq.name == "sequence" and "probabilities; index 0 is the argmax of 75% of the steps" in seq.reason
    assert choose_metric([ctc], ["logits"]).name == "sequence"  # raw CTC logits, named so
    assert _choice([ctc]).name != "sequence"  # hidden states with one dominant dimension
    assert _choice([rng.normal(size=(4, 10))]).name == "top1"
    emb = rng.normal(size=(4, 8))
    assert _choice([emb / np.linalg.norm(emb, axis=1, keepdims=True)]).name == "embedding"
    ids = rng.integers(0, 50, (1, 5))
    assert _choice([rng.normal(size=(1, 5, 50))], {"input_ids": ids}).name == "perplexity"
    # hidden states beside input_ids: an id above the width names no logit
    assert _choice([rng.normal(size=(1, 5, 16))], {"input_ids": ids + 16}).name != "perplexity"
    vad = _choice([np.array([[0.1], [0.9]], np.float32), rng.normal(size=(2, 1, 128)).astype(np.float32)])
    assert vad.name == "probability" and "one probability per sample" in vad.reason
    generic = _choice([rng.normal(size=(4, 3, 5, 5))])
    assert generic.name == "sqnr" and "no task" in generic.reason
    assert _choice([rng.normal(size=(4, 10))], requested="cosine").name == "cosine"


def test_channel_groups_split_pixel_rows_from_score_rows_only():
    rng = np.random.default_rng(0)
    det = np.concatenate([rng.uniform(0, 640, (1, 4, 50)), rng.uniform(0, 1, (1, 3, 50))], axis=1)
    assert [g for g, _ in channel_groups(det)] == ["channels 0-3", "channels 4-6"]
    assert [g for g, _ in channel_groups(rng.uniform(0, 1, (1, 7, 50)))] == ["all"]
    assert [g for g, _ in channel_groups(rng.normal(size=(2, 16)))] == ["all"]


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(requested="bogus"), "unknown metric 'bogus'"),
    (dict(requested="detection"), "no detector head found"),
    (dict(evaluator="missing.py:score"), "evaluator file missing.py does not exist"),
    (dict(evaluator="nofunction"), "cannot read --evaluator"),
])
def test_bad_metric_requests_say_what_to_do(kwargs, message):
    with pytest.raises(InputError, match=message):
        _choice([np.zeros((2, 10), np.float32)], **kwargs)


def test_a_user_evaluator_returns_a_float_or_named_metrics(tmp_path):
    (tmp_path / "ev.py").write_text(
        "import numpy as np\n"
        "def score(reference, outputs):\n"
        "    return float(np.mean(reference['out0'].argmax(1) == outputs['out0'].argmax(1)))\n"
        "def named(reference, outputs):\n"
        "    return {'my_accuracy': 0.75, 'samples': len(outputs['out0'])}\n"
        "def broken(reference, outputs):\n"
        "    raise ValueError('bad labels')\n")
    ref = [[np.eye(4, dtype=np.float32)[[0, 1]]], [np.eye(4, dtype=np.float32)[[2, 3]]]]
    cand = [[np.eye(4, dtype=np.float32)[[0, 1]]], [np.eye(4, dtype=np.float32)[[2, 0]]]]
    choice = _choice(ref[0], evaluator=f"{tmp_path / 'ev.py'}:score")
    assert choice.evaluator_sha256 and measure(choice, ref, cand, names=["out0"]).value == 0.75  # 3 of 4 runs
    named = measure(_choice(ref[0], evaluator=f"{tmp_path / 'ev.py'}:named"), ref, cand, names=["out0"])
    assert (named.name, named.value, named.components) == ("my_accuracy", 0.75, {"samples": 4})
    with pytest.raises(InputError, match="raised ValueError: bad labels"):
        measure(_choice(ref[0], evaluator=f"{tmp_path / 'ev.py'}:broken"), ref, cand, names=["out0"])
    task = assess(choice, ref, cand, None, ["out0"], sqnr_floor=15.0)  # default floor: FP32's 1.0 - 0.01
    assert task["floor"] == pytest.approx(0.99) and task["failures"][0]["measured"] == 0.75


# --------------------------------------------------------------------------- quantize and eval on a tiny detector


def detector(classes: int = 3, size: int = 16, seed: int = 0) -> onnx.ModelProto:
    """A YOLOv8-shaped head: [N, 4+C, H*W], box centres 0-320 px and sizes 4-64 px beside sigmoid class scores."""
    rng = np.random.default_rng(seed)
    k = 4 + classes
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.6, (k, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.r_[np.zeros(4), np.full(classes, -1.5)].astype(np.float32), "b2"),
             numpy_helper.from_array(np.array([0, k, size * size], np.int64), "shape"),
             numpy_helper.from_array(np.array([2, 2, classes], np.int64), "split"),
             numpy_helper.from_array(np.array(320.0, np.float32), "px"),
             numpy_helper.from_array(np.array(60.0, np.float32), "wh"),
             numpy_helper.from_array(np.array(4.0, np.float32), "four")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="head"),
             helper.make_node("Reshape", ["c2", "shape"], ["flat"], name="flat"),
             helper.make_node("Split", ["flat", "split"], ["xy", "whr", "cls"], axis=1, name="split"),
             helper.make_node("Sigmoid", ["xy"], ["xys"], name="sig_xy"),
             helper.make_node("Mul", ["xys", "px"], ["xyp"], name="mul_xy"),
             helper.make_node("Sigmoid", ["whr"], ["whs"], name="sig_wh"),
             helper.make_node("Mul", ["whs", "wh"], ["whm"], name="mul_wh"),
             helper.make_node("Add", ["whm", "four"], ["whp"], name="add_wh"),
             helper.make_node("Sigmoid", ["cls"], ["scores"], name="sig_cls"),
             helper.make_node("Concat", ["xyp", "whp", "scores"], ["output0"], axis=1, name="concat")]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", k, size * size])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def det_files(tmp_path_factory):
    work = tmp_path_factory.mktemp("det")
    onnx.save(detector(), work / "det.onnx")
    rng = np.random.default_rng(1)
    np.savez(work / "images.npz", x=rng.uniform(0, 1, (12, 3, 16, 16)).astype(np.float32))
    return work


def test_optimize_names_the_task_metric_auto_chose_and_its_unit(det_files):
    from dlopt.search.scoring import SearchContext, resolved_metric

    ctx = SearchContext(source=str(det_files / "det.onnx"), torch_source=False, source_id="det", target="cpu",
                        calibration=None, eval_data=str(det_files / "images.npz"), evaluator="auto",
                        cache_root=str(det_files / "cache"), name="det")
    metric = resolved_metric(ctx)
    assert metric["name"] == "detection" and metric["drop_unit"] == "fraction of boxes (Jaccard)"
    assert "4+C" in metric["reason"] or "yolo" in metric["reason"].lower(), metric["reason"]
    assert resolved_metric(dataclasses.replace(ctx, evaluator="sqnr")) is None  # named by the user already


def test_quantize_reports_and_judges_the_detection_metric(det_files):
    work = det_files
    out = work / "det.int8.onnx"
    result = CliRunner().invoke(main, ["quantize", str(work / "det.onnx"), "-o", str(out), "--calibration",
                                       str(work / "images.npz"), "--node-forms", "int8"])
    assert result.exit_code in (0, 1), result.output
    report_path = out.with_suffix(".quantize.json") if result.exit_code == 0 else work / "det.int8.failed.quantize.json"
    report = json.loads(report_path.read_text())
    jsonschema.validate(report, json.loads(files("dlopt").joinpath("schemas/quantize.schema.json").read_text()))
    assert report["metric"]["metric"] == "detection" and "[B, 4+C, N]" in report["metric"]["why"]
    task = report["fidelity"]["task_metric"]
    assert task["judged_by"] == "detection" and task["components"]["fp32_boxes"] > 0 and task["samples"] == 4
    assert report["verdict"]["metric"] == "detection" and report["verdict"]["metric_floor"] == 0.9
    # judged on the estimates of a single model, or on the one-sided bounds of one recovery chose among
    # candidates compared on these images; the bounds are reported either way
    bounds = task["uncertainty"]["checks"]
    assert bounds["value"]["bound"] <= task["value"] and bounds["value"]["estimate"] == task["value"]
    judged = "bound" if "floor_recovery" in report else "estimate"
    assert task["decided_by"] == report["verdict"]["decided_by"] == judged
    assert report["verdict"]["passed"] == (bounds["value"][judged] >= 0.9 and bounds["class_agreement"][judged] >= 0.99)
    assert result.exit_code == (0 if report["verdict"]["passed"] else 1)
    groups = report["fidelity"]["outputs"]["output0"]["sqnr_db_by_group"]
    assert set(groups) == {"channels 0-3", "channels 4-6"}
    assert "task metric: detection" in result.output and "SQNR by channel group" in result.output


def test_a_floor_the_detector_cannot_meet_exits_1_naming_the_metric(det_files):
    work = det_files
    result = CliRunner().invoke(main, ["quantize", str(work / "det.onnx"), "-o", str(work / "strict.onnx"),
                                       "--calibration", str(work / "images.npz"), "--node-forms", "int8",
                                       "--metric", "detection", "--metric-floor", "1.5", "--no-recover"])
    assert result.exit_code == 1, result.output
    assert "detection" in result.output and "FAILED" in result.output and not (work / "strict.onnx").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--metric", "bogus"], "unknown metric 'bogus'"),
    (["--evaluator", "missing_eval.py:score"], "evaluator file missing_eval.py does not exist"),
    (["--evaluator", "{work}/raises.py:score"], "raised RuntimeError: no labels here"),
    (["--evaluator", "{work}/raises.py:absent"], "has no function 'absent'"),
])
def test_bad_metric_input_is_one_line_and_exit_2(det_files, args, message):
    work = det_files
    (work / "raises.py").write_text("def score(reference, outputs):\n    raise RuntimeError('no labels here')\n")
    args = [a.format(work=work) for a in args]
    result = CliRunner().invoke(main, ["quantize", str(work / "det.onnx"), "-o", str(work / "bad.onnx"),
                                       "--calibration", str(work / "images.npz"), "--node-forms", "int8", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (work / "bad.onnx").exists()


@pytest.fixture(scope="module")
def collapsed(det_files):
    """The detector with every class row of its head collapsed to its bias: boxes intact, scores flat."""
    model = detector()
    w2 = numpy_helper.to_array(model.graph.initializer[2]).copy()
    w2[4:] = 0.0
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w2, "w2"))
    onnx.save(model, det_files / "collapsed.onnx")
    return det_files / "collapsed.onnx"


def test_eval_reports_task_metrics_against_the_reference(det_files, collapsed):
    work = det_files
    result = CliRunner().invoke(main, ["eval", str(work / "collapsed.onnx"), "--data", str(work / "images.npz"),
                                       "--reference", str(work / "det.onnx"), "--metric", "auto,sqnr",
                                       "--json", str(work / "eval.json")])
    assert result.exit_code == 0, result.output
    rows = {r["metric"]: r for r in json.loads((work / "eval.json").read_text())["metrics"]}
    assert rows["detection"]["reference"] == 1.0 and rows["detection"]["value"] < 0.5
    assert "[B, 4+C, N]" in rows["detection"]["note"]
    assert "by channel group channels 0-3 inf dB, channels 4-6" in rows["sqnr"]["note"]  # only the scores changed
    bad = CliRunner().invoke(main, ["eval", str(work / "det.onnx"), "--data", str(work / "images.npz"),
                                    "--metric", "detection"])
    assert bad.exit_code == 2 and "compares every output with a reference model's" in bad.stderr


def test_gate_judges_the_detection_drop_in_the_same_unit(det_files, collapsed):
    work = det_files
    common = ["--baseline", str(work / "det.onnx"), "--eval-data", str(work / "images.npz"), "--metric", "detection",
              "--max-slowdown", "500%", "--batch", "1", "--budget", "2s"]
    same = CliRunner().invoke(main, ["gate", *common, "--candidate", str(work / "det.onnx"),
                                     "--max-accuracy-drop", "0.0", "--json", str(work / "same.json")])
    assert same.exit_code == 0, same.output
    bad = CliRunner().invoke(main, ["gate", *common, "--candidate", str(work / "collapsed.onnx"),
                                    "--max-accuracy-drop", "0.05", "--json", str(work / "gate.json")])
    assert bad.exit_code == 1, bad.output
    check = {c["name"]: c for c in json.loads((work / "gate.json").read_text())["checks"]}["accuracy: detection"]
    assert check["verdict"] == "fail" and check["baseline"] == 1.0 and check["candidate"] < 0.5
    assert check["change"] == f"drop {1.0 - check['candidate']:+.4g}"  # 1 - Jaccard: the fraction of boxes lost


def test_quantize_with_a_user_evaluator_names_its_metric_and_keys_the_cache_on_its_file(det_files, tmp_path):
    from pathlib import Path

    from dlopt.recipe import Recipe, StageSpec, build_config, key_inputs

    work = det_files
    evaluator = tmp_path / "my_eval.py"
    evaluator.write_text("import numpy as np\n"
                         "def score(reference, outputs):\n"
                         "    r, o = reference['output0'][:, 4:], outputs['output0'][:, 4:]\n"
                         "    return {'score_rows_within_0.05': float(np.mean(np.abs(r - o) < 0.05))}\n")
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["quantize", str(work / "det.onnx"), "-o", str(out), "--calibration",
                                       str(work / "images.npz"), "--node-forms", "int8", "--evaluator",
                                       f"{evaluator}:score"])
    assert result.exit_code in (0, 1), result.output
    report = json.loads((out.with_suffix(".quantize.json") if result.exit_code == 0
                         else tmp_path / "q.failed.quantize.json").read_text())
    task = report["fidelity"]["task_metric"]
    assert report["metric"] == {"metric": "score_rows_within_0.05", "why": f"--evaluator {evaluator}:score"}
    assert task["floor"] == pytest.approx(0.99) and report["verdict"]["passed"] == (task["value"] >= 0.99)

    def key(text: str):
        evaluator.write_text(text)
        config = build_config("quantize", {"evaluator": f"{evaluator}:score"}, where="test", target="cpu")
        recipe = Recipe(path=Path("r.toml"), source=str(work / "det.onnx"), target="cpu", calibration=None,
                            eval_data=None, name="det", stages=(StageSpec(1, "quantize", config, None),))
        return key_inputs(recipe, recipe.stages[0], "0" * 64)["evaluator"]

    assert key("def score(r, o):\n    return 1.0\n") != key("def score(r, o):\n    return 0.5\n")


# --------------------------------------------------------------------------- the verdict's bound on few samples


def _pages(lost: dict[int, int], pages: int = 10) -> tuple[list, list]:
    """FP32 and candidate runs of `pages` images with 5 boxes each; on page i the candidate loses lost[i]."""
    reference, candidate = [], []
    for i in range(pages):
        boxes = [[40 + 60 * k, 40, 30, 30] for k in range(5)]
        drop = lost.get(i, 0)
        reference.append([_yolo(boxes, [[0.9, 0.0]] * 5)])
        candidate.append([_yolo(boxes, [[0.9, 0.0]] * (5 - drop) + [[0.1, 0.0]] * drop)])
    return reference, candidate


def test_an_estimate_on_few_pages_clears_the_floor_but_its_bound_does_not():
    # 10 pages, 2 of them lose 2 of their 5 boxes: Jaccard 46 / 50 = 0.92 clears 0.9, but how the losses fall
    # on pages is what other pages would show: resampling the pages, the 5th percentile is 0.84
    choice = MetricChoice("detection", "test", {"layout": YOLO})
    reference, candidate = _pages({3: 2, 7: 2})
    task = assess(choice, reference, candidate, None, ["out"], sqnr_floor=15.0)
    assert task["value"] == pytest.approx(0.92)
    checks = task["uncertainty"]["checks"]
    assert checks["value"]["bound"] == pytest.approx(0.84) and checks["value"]["interval"] == pytest.approx([0.84, 1.0])
    assert checks["class_agreement"] == {"estimate": 1.0, "bound": 1.0, "interval": [1.0, 1.0]}
    assert task["uncertainty"]["samples"] == 10 and task["uncertainty"]["confidence"] == 0.95
    (row,) = task["failures"]
    assert row["check"] == "detection" and row["measured"] == pytest.approx(0.84) and row["estimate"] == pytest.approx(0.92)
    assert task["margin"] == pytest.approx(0.84 - 0.9)
    # judged on the estimate alone (the rule before): accepted
    point = assess(choice, reference, candidate, None, ["out"], sqnr_floor=15.0, confidence=0)
    # margin: the nearer of Jaccard 0.92 - 0.9 and class agreement 1.0 - 0.99
    assert point["failures"] == [] and point["margin"] == pytest.approx(0.01) and point["uncertainty"] is None
    # the bound reported, the estimate deciding (a single model): accepted, not confirmed
    single = assess(choice, reference, candidate, None, ["out"], sqnr_floor=15.0, bound_decides=False)
    assert single["failures"] == [] and single["margin"] == pytest.approx(0.01)
    assert single["decided_by"] == "estimate" and single["confirmed"] is False
    assert single["uncertainty"]["checks"]["value"]["bound"] == pytest.approx(0.84)
    assert task["decided_by"] == "bound" and task["confirmed"] is False
    # the same losses on 8x the pages narrow the bound (0.89), still below; one lost box on 4 of 40 pages clears it
    many = _pages({i: 2 for i in range(80) if i % 10 in (3, 7)}, pages=80)
    assert assess(choice, *many, None, ["out"], sqnr_floor=15.0)["uncertainty"]["checks"]["value"]["bound"] == (
        pytest.approx(0.89))
    few_lost = assess(choice, *_pages({i: 1 for i in range(0, 40, 10)}, pages=40), None, ["out"], sqnr_floor=15.0)
    assert few_lost["value"] == pytest.approx(196 / 200) and few_lost["failures"] == []
    assert 0.9 < few_lost["uncertainty"]["checks"]["value"]["bound"] < few_lost["value"]


def test_bounds_of_each_kind_of_counted_metric():
    # top-1 on 20 samples, 19 agree: 0.95 at its floor; one disagreement drawn three times or more is 5 % likely
    reference = [[np.eye(4, dtype=np.float32)[[i % 4]]] for i in range(20)]
    candidate = [[np.eye(4, dtype=np.float32)[[(i + (i == 5)) % 4]]] for i in range(20)]
    value = measure(MetricChoice("top1", "test", {"output": 0}), reference, candidate)
    bounds = metric_bounds(value)
    assert value.value == pytest.approx(0.95) and bounds["checks"]["value"]["bound"] == pytest.approx(0.85)
    assert judge(value) == [] and judge(bounded(value, bounds))[0]["measured"] == pytest.approx(0.85)
    # every sample agrees: the bootstrap has no spread to show, the bound is the value
    same = metric_bounds(measure(MetricChoice("top1", "test", {"output": 0}), reference, reference))
    assert same["checks"]["value"] == {"estimate": 1.0, "bound": 1.0, "interval": [1.0, 1.0]}
    # no per-sample counts (SQNR, a max): no bounds, the estimate is judged
    assert metric_bounds(measure(MetricChoice("sqnr", "test"), reference, candidate, names=["p"])) is None


def test_a_single_models_estimate_decides_with_its_bound_beside_it_and_strict_verdict_judges_the_bound(tmp_path):
    # 24 images: the 16 beyond the first 8 are held out, at most half: 12 (about 100 boxes each)
    onnx.save(detector(), tmp_path / "det.onnx")
    np.savez(tmp_path / "images.npz", x=np.random.default_rng(1).uniform(0, 1, (24, 3, 16, 16)).astype(np.float32))

    def run(name: str, *extra: str) -> tuple[int, dict, str]:
        out = tmp_path / f"{name}.onnx"
        result = CliRunner().invoke(main, ["quantize", str(tmp_path / "det.onnx"), "-o", str(out), "--calibration",
                                           str(tmp_path / "images.npz"), "--node-forms", "int8", "--no-recover",
                                           "--metric", "detection", *extra])
        path = out.with_suffix(".quantize.json") if result.exit_code == 0 else tmp_path / f"{name}.failed.quantize.json"
        return result.exit_code, json.loads(path.read_text()), result.output

    # the estimate and its bound on this CPU's kernels (they differ between ISAs, their order does not)
    code, report, _ = run("free", "--metric-floor", "0")
    task = report["fidelity"]["task_metric"]
    estimate, bound = task["value"], task["uncertainty"]["checks"]["value"]["bound"]
    assert code == 0 and task["samples"] == 12 and task["uncertainty"]["samples"] == 12
    assert bound < estimate < 1.0 and report["verdict"]["metric_bound"] == bound
    floor = round((estimate + bound) / 2, 4)  # between them: the estimate clears it, the bound does not
    # a single model (no candidates compared): its estimate decides, the bound is reported as not confirming it
    code, report, output = run("single", "--metric-floor", str(floor))
    assert code == 0 and report["verdict"]["passed"] and report["verdict"]["decided_by"] == "estimate"
    assert report["verdict"]["metric_bound"] == bound and report["verdict"]["confirmed"] is False
    assert "not confirmed at 95%" in output and "--strict-verdict" in output
    jsonschema.validate(report, json.loads(files("dlopt").joinpath("schemas/quantize.schema.json").read_text()))
    # --strict-verdict: the bound decides for it too
    code, report, output = run("bound", "--metric-floor", str(floor), "--strict-verdict")
    assert code == 1 and not (tmp_path / "bound.onnx").exists()
    assert report["verdict"]["decided_by"] == "bound" and report["verdict"]["confirmed"] is False
    (row,) = report["verdict"]["failures"]
    assert row["check"] == "detection (95% bound)" and row["measured"] == bound and row["estimate"] == estimate
    assert "--verdict-confidence 0" in row["why"] and "detection (95% bound)" in output
    jsonschema.validate(report, json.loads(files("dlopt").joinpath("schemas/quantize.schema.json").read_text()))
    # judged on the estimate, as before: accepted
    code, report, _ = run("point", "--metric-floor", str(floor), "--verdict-confidence", "0", "--strict-verdict")
    assert code == 0 and report["verdict"]["passed"] and report["verdict"]["metric_bound"] is None
    assert report["verdict"]["decided_by"] == "estimate" and report["verdict"]["confirmed"] is None
    assert report["fidelity"]["task_metric"]["value"] == estimate


def test_recovery_is_judged_at_the_confidence_its_comparisons_leave_and_at_the_users_score_threshold(tmp_path):
    from dlopt.optimize.quantize.schemes import RECOVERY_COMPARISONS, selection_confidence

    assert selection_confidence(0.95) == pytest.approx(1 - 0.05 / RECOVERY_COMPARISONS) == pytest.approx(0.995)
    assert selection_confidence(0.0) == 0.0  # the estimate stays the estimate
    onnx.save(detector(), tmp_path / "det.onnx")
    np.savez(tmp_path / "images.npz", x=np.random.default_rng(1).uniform(0, 1, (24, 3, 16, 16)).astype(np.float32))
    # a floor no INT8 candidate reaches: recovery runs, compares its candidates and fails
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "det.onnx"), "-o", str(tmp_path / "q.onnx"),
                                       "--calibration", str(tmp_path / "images.npz"), "--node-forms", "int8",
                                       "--metric-floor", "1.0", "--score-threshold", "0.3"])
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "q.failed.quantize.json").read_text())
    task = report["fidelity"]["task_metric"]
    assert report["floor_recovery"]["candidates"] and report["verdict"]["confidence"] == pytest.approx(0.995)
    assert task["uncertainty"]["confidence"] == pytest.approx(0.995) and "99.5% bound" in result.output
    assert task["decided_by"] == "bound" and report["verdict"]["decided_by"] == "bound"
    assert task["components"]["confidence"] == 0.3 and "--score-threshold" in task["why"]
    jsonschema.validate(report, json.loads(files("dlopt").joinpath("schemas/quantize.schema.json").read_text()))
