"""The transformers versions prunekit supports: one declared range, the cache keyword of either
release line, and a clear warning outside the range."""

from __future__ import annotations

import pathlib
import re
import tomllib
import warnings

import pytest
import torch
import transformers

from prunekit.models import compat
from tiny import llama

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_declares_what_ci_proves():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("transformers")]
    assert spec == "transformers" + compat.tested_range() == "transformers>=5.23.0,<5.26"
    make = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^TRANSFORMERS\s+\?=\s*(\S+)", make, re.M).group(1)
    newest = re.search(r"^TRANSFORMERS_NEWEST\s+\?=\s*(\S+)", make, re.M).group(1)
    assert (pinned, newest) == compat.TESTED


def test_installed_version_is_a_tested_one():
    assert transformers.__version__ in compat.TESTED


@pytest.mark.parametrize(
    ("version", "inside"),
    [("5.23.0", True), ("5.24.1", True), ("5.25.0.dev0", True), ("5.22.2", False), ("5.26.0", False),
     ("6.0.0", False), ("4.57.1", False)],
)  # fmt: skip
def test_tested_range_by_minor_release(version, inside):
    assert compat.in_tested_range(version) is inside


def test_outside_the_range_warns_with_the_fix():
    expected = r"tested with transformers >=5\.23\.0,<5\.26.*you have 5\.99\.0.*pip install"
    with pytest.warns(UserWarning, match=expected):
        assert compat.warn_if_untested("5.99.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not compat.warn_if_untested("5.24.0")
        compat.check_transformers()  # the installed version is a tested one: silent


def test_cache_found_under_either_keyword():
    cache = object()
    assert compat.cache_of({"cache": cache}) is cache
    assert compat.cache_of({"past_key_values": cache}) is cache
    assert compat.cache_of({"cache": None, "past_key_values": cache}) is cache
    assert compat.cache_of({}) is None


def test_output_cache_and_keyword_continue_a_prefill():
    model = llama("sdpa")
    ids = torch.randint(3, 200, (1, 6))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        out = model(ids[:, :5], use_cache=True)
        cache = compat.output_cache(out)
        assert cache.get_seq_length() == 5
        step = model(ids[:, 5:], **{compat.cache_keyword(): cache}).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
