"""The HTML report of dlopt optimize: self-contained, and its plot really drawn, checked on a screenshot
taken by headless Chromium (Debian's `chromium`; scripts/test.sh installs it)."""

import json
import re
import shutil
import subprocess
from importlib.resources import files

import jsonschema
import numpy as np
import pytest

from dlopt.search.html_report import CHOSEN_COLOR, FRONT_COLOR, MARGIN, PLOT_H, PLOT_W, render_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCHEMA = json.loads(files("dlopt").joinpath("schemas/optimize.schema.json").read_text())


def candidate(name, ratio, drop, size, status, front=False):
    return {"name": name, "precision": "int8" if name.startswith("int8") else "fp32", "why": f"{name} <test>",
            "recipe": [] if name == "fp32" else [{"kind": "quantize", "precision": "int8", "mode": "dynamic"}],
            "status": status, "reason": f"{status} because <b>reasons</b>", "score": 0.9 - drop / 100,
            "drop_points": drop, "bytes": size, "latency_ratio": ratio,
            "latency_ci": None if ratio is None else [ratio * 0.99, ratio * 1.01],
            "median_ms": None if ratio is None else ratio * 2, "on_front": front, "cached": False, "seconds": 1.0,
            "stage_keys": []}


def result():
    cands = [candidate("fp32", 1.0, 0.0, 4_000_000, "front", True),
             candidate("int8-auto", 0.42, 0.21, 1_100_000, "chosen", True),
             candidate("int8-static-minmax", 0.55, 0.35, 1_100_000, "dominated"),
             candidate("fp16", 1.3, 0.0, 2_000_000, "dominated"),
             candidate("int8-static-entropy", None, 0.9, 1_100_000, "over-budget")]
    return {"schema": "dlopt.optimize", "schema_version": 1, "model": "tiny", "name": "tiny", "target": "cpu",
            "evaluator": "model:tiny:accuracy", "drop_unit": "percentage points", "max_accuracy_drop": 0.5,
            "max_latency_ms": None, "baseline_score": 0.9, "cpu": "test CPU", "time_budget_s": 1200.0,
            "seconds": 12.5, "phases_s": {"evaluate_s": 10.0}, "executor": {"kind": "local", "workers": 2},
            "cache": {"root": "/tmp/c", "evaluations_cached": 0, "evaluations_run": 5},
            "latency": {"input_shapes": {"x": [1, 3, 8, 8]}, "clock": "thread CPU time", "threads": 1, "batch": 1,
                        "data": "test", "rounds": 40, "cpu": "test CPU", "cached": False},
            "candidates": cands, "front": ["fp32", "int8-auto"], "chosen": "int8-auto",
            "server": {"rows": [{"threads": 1, "batch": 4, "median_ms": 3.0, "p90_ms": 3.5, "items_per_s": 1333.0,
                                 "input_shapes": {"x": [4, 3, 8, 8]}}],
                       "best": {"threads": 1, "batch": 4, "median_ms": 3.0, "p90_ms": 3.5, "items_per_s": 1333.0},
                       "why": "the highest throughput", "max_latency_ms": None},
            "bundle": "/tmp/b", "verified": True, "report": None}


def test_report_is_self_contained_and_escapes_what_it_shows():
    data = result()
    jsonschema.validate(data, SCHEMA)
    page = render_report(data)
    assert "<svg" in page and page.count("<circle") == 4  # the four timed candidates; the untimed one is not plotted
    assert not re.search(r"<script|<link|<img|src=|url\(|@import", page)  # nothing fetched: it opens offline
    assert "&lt;b&gt;reasons&lt;/b&gt;" in page and "<b>reasons</b>" not in page
    for c in data["candidates"]:
        assert c["name"] in page and c["status"] in page
    assert '"mode": "dynamic"' in page.replace("&quot;", '"')  # every candidate's recipe
    assert "batch 4, 1 thread(s)" in page


def _pixels_near(image: np.ndarray, hex_color: str, tolerance: int = 30) -> np.ndarray:
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return np.all(np.abs(image[..., :3].astype(int) - rgb) <= tolerance, axis=-1)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test.sh installs Debian's chromium)")
def test_headless_chromium_screenshot_shows_the_plotted_front(tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(render_report(result()))
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1000,1200", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (1200, 1000)
    front = _pixels_near(image, FRONT_COLOR)
    rows, cols = np.nonzero(front)
    assert rows.size > 300, "no front markers in the screenshot"
    # the markers lie inside one plot-sized box (the SVG), not spread over the page
    assert rows.max() - rows.min() < PLOT_H - MARGIN["bottom"] and cols.max() - cols.min() < PLOT_W
    # the chosen candidate's ring, and the grey of the dominated ones, in the same box
    ring = np.nonzero(_pixels_near(image, CHOSEN_COLOR))
    assert ring[0].size > 50 and rows.min() - 40 <= np.median(ring[0]) <= rows.max() + 40
    assert _pixels_near(image, "#8c8c8c", 10).sum() > 300
