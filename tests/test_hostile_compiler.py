"""The compiler layer as a hostile user tries it (issue 20): `dlopt run`, the stage cache, `dlopt optimize`.

Groups of the table (issue 20's), counted in CASES at the end:
- data loss: every path a verb writes (outputs, reports, HTML, the cache, OUT.failed.onnx, the report
  beside -o) is refused when it is, contains or lies inside an input, the cache or the bundle: exit 2,
  one error line, every input byte-identical, nothing left behind; `cache prune` removes only entries
  dlopt wrote;
- the cache serves only what it made: a tampered entry is a miss, rebuilt, with one line saying why, and
  what is delivered equals the untampered result; a factory's local modules are in its key; concurrent
  runs of one recipe all succeed with identical outputs; dead processes' staging folders are swept;
- interrupts and links: the interrupt message names only files that exist; a symlink as a bundle's -o
  is refused and nothing is left beside it.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from test_safety import mlp_model, snapshot

from dlopt.cli import main
from dlopt.stagecache import StageCache

QUANTIZE = """\
source = "{source}"
target = "cpu"

[[stage]]
kind = "quantize"
mode = "dynamic"
speed_check = false
"""
PACKAGE = """
[[stage]]
kind = "package"
measure_s = 0
"""
FAILING = QUANTIZE + "min_sqnr_db = 200.0\nrecover = false\n"
OPTIMIZE = ["optimize", "mlp.onnx", "--calibration", "c.npz", "--eval-data", "e.npz", "--max-accuracy-drop", "1",
            "--cache-dir", "cache"]


def other_model() -> onnx.ModelProto:
    """mlp_model with other weights: what a tamperer puts in place of a cached model."""
    model = mlp_model()
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0.5, init.name))
    return model


@pytest.fixture()
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(mlp_model(), "mlp.onnx")
    onnx.save(other_model(), "other.onnx")
    rng = np.random.default_rng(3)
    np.savez("c.npz", x=rng.standard_normal((8, 16)).astype(np.float32))
    np.savez("e.npz", x=rng.standard_normal((8, 16)).astype(np.float32))
    Path("r.toml").write_text(QUANTIZE.format(source="mlp.onnx"))
    Path("b.toml").write_text(QUANTIZE.format(source="mlp.onnx") + PACKAGE)
    return tmp_path


def dlopt(*args: str):
    return CliRunner().invoke(main, list(args))


def one_error(result, message: str) -> None:
    """One `error:` line matching `message` (and at most its hint) on stderr, no traceback, nothing on stdout."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output, result.output
    assert [line for line in lines if not line.startswith("hint: ")] == [lines[0]], result.output
    assert lines[0].startswith("error: ") and re.search(message, lines[0]), result.output
    assert len(lines) <= 2 and result.stdout == "", result.output


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(root: Path) -> list[str]:
    """Hidden names in a folder other than the cache's lock folder: staging folders, temp files."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".locks")


def entry_of(cache: Path, kind: str) -> Path:
    (entry,) = [e for e in StageCache(cache).entries() if e.kind == kind]
    return entry.path


# -- data loss: refused before anything is written ---------------------------------------------------------

def _read_only(work: Path) -> None:
    os.chmod(work / "mlp.onnx", 0o444)


def _failed_source(work: Path) -> None:
    onnx.save(mlp_model(), work / "Q.failed.onnx")
    (work / "f.toml").write_text(FAILING.format(source="Q.failed.onnx"))


def _recipe_named_like_a_report(work: Path) -> None:
    (work / "R.quantize.json").write_text(QUANTIZE.format(source="mlp.onnx"))


def _empty_folder(work: Path) -> None:
    (work / "B").mkdir()


def _cache_folder(work: Path) -> None:
    (work / "cache").mkdir()


def _recipe_in_a_folder(work: Path) -> None:
    (work / "proj").mkdir()
    (work / "proj" / "r.toml").write_text(QUANTIZE.format(source="../mlp.onnx"))


def _export_report_recipe(work: Path) -> None:
    (work / "x.export.json").write_text(QUANTIZE.format(source="mlp.onnx"))


REFUSED = [
    # (id, set-up, arguments, the error's message)
    ("optimize --report is the model", None, OPTIMIZE + ["-o", "a.bundle", "--report", "mlp.onnx"],
     r"output mlp.onnx is the input .*mlp.onnx"),
    ("optimize --report is the calibration", None, OPTIMIZE + ["-o", "a.bundle", "--report", "c.npz"],
     r"output c.npz is the input .*c.npz"),
    ("optimize --report is the eval data", None, OPTIMIZE + ["-o", "a.bundle", "--report", "e.npz"],
     r"output e.npz is the input .*e.npz"),
    ("optimize --report is a read-only model", _read_only, OPTIMIZE + ["-o", "a.bundle", "--report", "mlp.onnx"],
     r"output mlp.onnx is the input"),
    ("optimize -o inside the cache", _cache_folder, OPTIMIZE + ["-o", "cache/B"],
     r"output cache/B lies inside the stage cache cache"),
    ("optimize --report inside the bundle", _empty_folder, OPTIMIZE + ["-o", "B", "--report", "B/r.html"],
     r"--report B/r.html lies inside the bundle B"),
    ("optimize -o contains the cache", None, OPTIMIZE[:-2] + ["--cache-dir", "B/cache", "-o", "B"],
     r"output B contains the stage cache B/cache"),
    ("run: OUT.failed.onnx is the source", _failed_source, ["run", "f.toml", "-o", "Q.onnx", "--cache-dir", "cache"],
     r"output .*Q.failed.onnx is the input .*Q.failed.onnx"),
    ("run: the report beside -o is the recipe", _recipe_named_like_a_report,
     ["run", "R.quantize.json", "-o", "R.onnx", "--cache-dir", "cache"], r"output .*R.quantize.json is the input"),
    ("run: the export report beside -o is the recipe", _export_report_recipe,
     ["run", "x.export.json", "-o", "x.onnx", "--cache-dir", "cache"], r"output .*x.export.json is the input"),
    ("run: -o is the source", None, ["run", "r.toml", "-o", "mlp.onnx", "--cache-dir", "cache"],
     r"output mlp.onnx is the input"),
    ("run: -o is the recipe", None, ["run", "r.toml", "-o", "r.toml", "--cache-dir", "cache"],
     r"output r.toml is the input"),
    ("run: bundle -o contains the cache", None, ["run", "b.toml", "-o", "B", "--cache-dir", "B/cache"],
     r"output B contains the stage cache B/cache"),
    ("run: -o inside the cache", _empty_folder, ["run", "r.toml", "-o", "B/q.onnx", "--cache-dir", "B"],
     r"output B/q.onnx lies inside the stage cache B"),
    ("run: the cache contains the recipe", _recipe_in_a_folder,
     ["run", "proj/r.toml", "-o", "q.onnx", "--cache-dir", "proj"],
     r"the stage cache proj contains the input .*r.toml"),
    ("run: the cache inside the source", None, ["run", "r.toml", "-o", "q.onnx", "--cache-dir", "mlp.onnx/cache"],
     r"the stage cache mlp.onnx/cache lies inside the input .*mlp.onnx"),
]


@pytest.mark.parametrize("setup, args, message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_data_loss_is_refused_before_anything_is_written(work, setup, args, message):
    if setup is not None:
        setup(work)
    before = snapshot(work)
    result = dlopt(*args)
    assert result.exit_code == 2, result.output
    one_error(result, message)
    assert snapshot(work) == before  # every input byte-identical, no cache, no staging folder, no report


def test_cache_prune_removes_only_entries_dlopt_wrote(work):
    assert dlopt("run", "r.toml", "-o", "q.onnx", "--cache-dir", "cache").exit_code == 0
    mine = work / "cache" / ("a" * 64)  # a user's folder under a 64-hex name, with an entry.json of their own
    mine.mkdir()
    (mine / "entry.json").write_text(json.dumps({"kind": "quantize", "created_unix": 0}))
    (mine / "notes.txt").write_text("keep me")
    other_key = work / "cache" / ("b" * 64)  # one whose entry.json names another key
    other_key.mkdir()
    (other_key / "entry.json").write_text(json.dumps({"key": "c" * 64, "created_unix": 0}))
    before = {p: sha(p) for p in [*mine.iterdir(), *other_key.iterdir()]}
    result = dlopt("cache", "prune", "--all", "--cache-dir", "cache")
    assert result.exit_code == 0 and "removed 1 entries" in result.stdout, result.output
    assert {p: sha(p) for p in [*mine.iterdir(), *other_key.iterdir()]} == before
    assert StageCache(work / "cache").entries() == []


# -- the cache serves only what it made ------------------------------------------------------------------------

def _weight_changed(cache: Path, work: Path) -> None:
    model_path = entry_of(cache, "quantize") / "model.onnx"
    model = onnx.load(model_path)
    init = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1.0, init.name))
    onnx.save(model, model_path)


def _symlinked_model(cache: Path, work: Path) -> None:
    model_path = entry_of(cache, "quantize") / "model.onnx"
    model_path.unlink()
    model_path.symlink_to(work / "other.onnx")


def _samples_byte_flipped(cache: Path, work: Path) -> None:
    samples = entry_of(cache, "package") / "bundle" / "samples.npz"
    data = bytearray(samples.read_bytes())
    data[len(data) // 2] ^= 0xFF
    samples.write_bytes(bytes(data))


def _file_added(cache: Path, work: Path) -> None:
    (entry_of(cache, "package") / "bundle" / "extra.onnx").write_bytes((work / "other.onnx").read_bytes())


def _file_removed(cache: Path, work: Path) -> None:
    (entry_of(cache, "quantize") / "model.quantize.json").unlink()


def _entry_symlinked(cache: Path, work: Path) -> None:
    entry = entry_of(cache, "quantize")
    elsewhere = work / "elsewhere"
    entry.rename(elsewhere)
    onnx.save(other_model(), elsewhere / "model.onnx")
    entry.symlink_to(elsewhere, target_is_directory=True)


def _no_file_hashes(cache: Path, work: Path) -> None:
    entry = entry_of(cache, "quantize")
    info = json.loads((entry / "entry.json").read_text())
    del info["files"]  # as an older dlopt wrote entries
    (entry / "entry.json").write_text(json.dumps(info))
    onnx.save(other_model(), entry / "model.onnx")


def _edit_entry_json(edit):
    def tamper(cache: Path, work: Path) -> None:
        entry = entry_of(cache, "quantize")
        info = json.loads((entry / "entry.json").read_text())
        edit(info)
        (entry / "entry.json").write_text(json.dumps(info))
    return tamper


def _claims_other_inputs(info) -> None:
    info["inputs"]["config"]["fields"]["per_channel"] = not info["inputs"]["config"]["fields"]["per_channel"]


TAMPERED = [
    # (id, recipe, tampering, the reason `run` gives)
    ("a weight changed in the cached model", "b.toml", _weight_changed, r"model.onnx changed since it was written"),
    ("the cached model replaced by a symlink", "b.toml", _symlinked_model, r"model.onnx is a symlink"),
    ("a byte flipped in a cached bundle's samples.npz", "b.toml", _samples_byte_flipped,
     r"bundle/samples.npz changed since it was written"),
    ("a file added to a cached bundle", "b.toml", _file_added, r"bundle/extra.onnx is not a file dlopt wrote"),
    ("a cached report removed", "r.toml", _file_removed, r"model.quantize.json is missing"),
    ("the entry folder replaced by a symlink", "r.toml", _entry_symlinked, r"is a symlink"),
    ("an entry without file hashes", "r.toml", _no_file_hashes, r"records no file hashes"),
    ("entry.json missing a field", "r.toml", _edit_entry_json(lambda info: info.pop("artifact")),
     r"its entry.json was edited since it was written"),
    ("entry.json claiming other key inputs", "r.toml", _edit_entry_json(_claims_other_inputs),
     r"its entry.json was edited since it was written"),
]


def _delivered(work: Path, out: str) -> dict[str, str]:
    """What -o holds, by file: a model's sha256 and its report's; a bundle's files but the manifest (it
    records when it was made), samples.npz (a zip stamped with the time), whose arrays are compared, and
    the model card README.md, which states the latencies measured when the bundle was built."""
    path = work / out
    if path.is_file():
        return {"model": sha(path)}
    found = {p.name: sha(p) for p in path.iterdir() if p.name not in ("manifest.json", "samples.npz", "README.md")}
    with np.load(path / "samples.npz") as samples:
        found |= {f"samples/{k}": hashlib.sha256(samples[k].tobytes()).hexdigest() for k in samples.files}
    manifest = json.loads((path / "manifest.json").read_text())
    found["lineage"] = json.dumps(manifest["lineage"], sort_keys=True)
    return found


@pytest.mark.parametrize("recipe, tamper, reason", [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED])
def test_a_tampered_entry_is_rebuilt_and_the_delivery_equals_the_untampered_one(work, recipe, tamper, reason):
    out = "q.onnx" if recipe == "r.toml" else "B"
    first = dlopt("run", recipe, "-o", out, "--cache-dir", "cache")
    assert first.exit_code == 0, first.output
    untampered = _delivered(work, out)
    tamper(work / "cache", work)
    inputs = {name: sha(work / name) for name in ("mlp.onnx", "c.npz", "e.npz", recipe)}
    again = dlopt("run", recipe, "-o", "again" if out == "B" else "again.onnx", "--cache-dir", "cache")
    assert again.exit_code == 0, again.output
    said = [line for line in again.stderr.splitlines() if "not used" in line]
    assert len(said) == 1 and re.search(reason, said[0]) and said[0].endswith("rebuilding it"), again.stderr
    assert _delivered(work, "again" if out == "B" else "again.onnx") == untampered
    assert {name: sha(work / name) for name in inputs} == inputs
    assert leftovers(work / "cache") == [] and leftovers(work) == []
    if out == "B":
        assert dlopt("verify", "again").exit_code == 0
        manifest = json.loads((work / "again" / "manifest.json").read_text())
        (step,) = manifest["lineage"]
        assert step["output_sha256"] == manifest["source"]["sha256"]  # the lineage names the bytes packaged
    else:
        quantized = entry_of(work / "cache", "quantize")
        assert sha(quantized / "model.onnx") == sha(work / "again.onnx")  # the entry was rebuilt, not left
    third = dlopt("run", recipe, "-o", "third" if out == "B" else "third.onnx", "--cache-dir", "cache")
    assert third.exit_code == 0 and "not used" not in third.stderr, third.output  # the rebuilt entry is served


HELPER_FACTORY = '''
import torch
from torch import nn

from helper import WIDTH


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, WIDTH)).eval(), (torch.randn(2, 8),), {"exporter": "torchscript"}
'''


def test_a_factorys_local_helper_module_is_in_its_key(work, monkeypatch):
    monkeypatch.syspath_prepend(str(work))  # as `python -m dlopt` or PYTHONPATH=. would have it
    (work / "net.py").write_text(HELPER_FACTORY)
    (work / "helper.py").write_text("WIDTH = 4\n")
    (work / "t.toml").write_text('source = "net.py:build"\n\n[[stage]]\nkind = "export"\n')
    first = dlopt("run", "t.toml", "-o", "t.onnx", "--cache-dir", "cache")
    assert first.exit_code == 0, first.output
    assert onnx.load(work / "t.onnx").graph.output[0].type.tensor_type.shape.dim[1].dim_value == 4
    (work / "helper.py").write_text("WIDTH = 6\n")
    monkeypatch.delitem(sys.modules, "helper")  # a new process would import it afresh
    second = dlopt("run", "t.toml", "-o", "t2.onnx", "--cache-dir", "cache")
    assert second.exit_code == 0, second.output
    assert "stage 1/1 export: running" in second.stderr, second.stderr  # a new key: not served from the cache
    assert onnx.load(work / "t2.onnx").graph.output[0].type.tensor_type.shape.dim[1].dim_value == 6


def test_local_modules_follows_imports_but_not_installed_packages(tmp_path):
    from dlopt.recipe import local_modules, source_hash

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "layers.py").write_text("from . import sizes\nimport numpy\n")
    (tmp_path / "pkg" / "sizes.py").write_text("WIDTH = 4\n")
    (tmp_path / "helper.py").write_text("from pkg.layers import *\n")
    factory = tmp_path / "f.py"
    factory.write_text("import torch\nimport helper\ndef build(): ...\n")
    expected = [tmp_path / "helper.py", tmp_path / "pkg" / "__init__.py", tmp_path / "pkg" / "layers.py",
                tmp_path / "pkg" / "sizes.py"]
    assert local_modules(factory) == sorted(p.resolve() for p in expected)
    before = source_hash(f"{factory}:build")
    (tmp_path / "pkg" / "sizes.py").write_text("WIDTH = 6\n")  # two imports away
    assert source_hash(f"{factory}:build") != before


CONCURRENT = r'''
import sys
from dlopt.cli import main
main(sys.argv[1:], prog_name="dlopt")
'''


def test_six_concurrent_forced_runs_of_one_recipe_all_succeed_with_identical_outputs(work):
    runs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, "run", "r.toml", "-o", f"o{i}.onnx", "--cache-dir",
                              "cache", "--force", "1"], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(6)]
    done = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    for p in runs:
        p.stdout.close()
        p.stderr.close()
    assert [code for code, _ in done] == [0] * 6, [err for _, err in done]
    assert len({sha(work / f"o{i}.onnx") for i in range(6)}) == 1
    reports = [json.loads((work / f"o{i}.quantize.json").read_text()) for i in range(6)]
    assert [r.pop("output") for r in reports] == [f"o{i}.onnx" for i in range(6)]  # -o, as given
    for r in reports:
        r.pop("seconds")  # two runs that both rebuilt (the second started after the first's commit) took their time
    assert all(r == reports[0] for r in reports)
    assert [e.kind for e in StageCache(work / "cache").entries()] == ["quantize"]
    assert leftovers(work / "cache") == [] and leftovers(work) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("verb", [["cache", "ls"], ["cache", "prune", "--older-than", "7d"],
                                  ["run", "r.toml", "-o", "q.onnx"]])
def test_staging_folders_of_dead_processes_are_swept(work, verb):
    assert dlopt("run", "r.toml", "-o", "first.onnx", "--cache-dir", "cache").exit_code == 0
    cache = work / "cache"
    dead = _dead_pid()
    key = StageCache(cache).entries()[0].key
    left = [cache / f".{key[:16]}.building-{dead}-x1y2", cache / f".{key[:16]}.old-{dead}-123",
            cache / f".run-{dead}-abc"]
    for folder in left:
        (folder / "bundle").mkdir(parents=True)
        (folder / "bundle" / "model.onnx").write_bytes(b"half")
    alive = cache / f".run-{os.getppid()}-live"  # a live process's: kept
    alive.mkdir()
    result = dlopt(*verb, "--cache-dir", "cache")
    assert result.exit_code == 0, result.output
    assert leftovers(cache) == [alive.name]


# -- interrupts and links -------------------------------------------------------------------------------------

def test_the_interrupt_message_names_only_files_that_exist(work, monkeypatch):
    """`run` interrupted after a stage was built: the stage's model was renamed into the cache's staging
    folder, which is an entry now; it is not named as written."""
    from dlopt import recipe

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "_deliver", interrupted)
    result = dlopt("run", "r.toml", "-o", "q.onnx", "--cache-dir", "cache")
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().splitlines()[-1] == "interrupted: nothing was written", result.stderr
    assert not (work / "q.onnx").exists() and leftovers(work / "cache") == []


def test_written_paths_leaves_out_removed_files(tmp_path):
    from dlopt.fileio import record_written, reset_written, written_paths

    reset_written()
    (tmp_path / "kept.onnx").write_bytes(b"x")
    record_written(tmp_path / "kept.onnx")
    record_written(tmp_path / ".staging" / "model.onnx")  # renamed into a folder removed since
    record_written(tmp_path / "kept.onnx")
    assert written_paths() == [tmp_path / "kept.onnx"]
    reset_written()


@pytest.mark.parametrize("verb", [["package", "mlp.onnx", "--measure", "0"], ["run", "b.toml", "--cache-dir", "cache"]])
def test_a_symlink_as_the_bundle_folder_is_refused(work, verb):
    assert dlopt("package", "mlp.onnx", "-o", "real", "--measure", "0").exit_code == 0
    (work / "LINK").symlink_to("real", target_is_directory=True)
    before = snapshot(work)
    result = dlopt(*verb, "-o", "LINK", "--overwrite")
    assert result.exit_code == 2, result.output
    one_error(result, r"bundle path LINK is a symlink \(to real\)")
    assert snapshot(work) == before  # the link, its bundle, and no .LINK.old-PID


CASES = {
    "data loss": len(REFUSED) + 1,  # + cache prune
    "the cache serves what it did not make": len(TAMPERED) + 2 + 1 + 3,  # + factory helpers, concurrency, sweeps
    "interrupts and links": 2 + 2,
}
