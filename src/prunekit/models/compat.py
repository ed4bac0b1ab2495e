"""What differs between the transformers 5.x releases prunekit supports, in one place.

CI proves the range below: the default suite runs on the pinned version (``make test``) and on
the newest 5.x verified so far (``make test-newest``). ``make test-latest`` (not part of CI)
tries the newest release the package index offers and says what breaks.

Changes handled here:

- **5.24: ``past_key_values`` became ``cache``** (keyword of every model, decoder layer and
  attention forward, and the field of every output). ``generate()`` passes ``cache=``, so a
  hook reading ``kw["past_key_values"]`` saw no cache at any decoding step and took each step
  for a new prompt. The old keyword still works on calls until 5.40, with a deprecation warning.
"""

from __future__ import annotations

import functools
import re
import warnings

#: the transformers versions CI runs the default suite on (the Makefile's TRANSFORMERS and
#: TRANSFORMERS_NEWEST); pyproject.toml declares ``>=TESTED[0],<next minor of TESTED[-1]``
TESTED = ("5.23.0", "5.25.0")


def _release(version: str) -> tuple[int, ...]:
    """``"5.25.0.dev0"`` -> ``(5, 25, 0)``."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def tested_range() -> str:
    lo, hi = TESTED[0], TESTED[-1]
    return f">={lo},<{_release(hi)[0]}.{_release(hi)[1] + 1}"


def in_tested_range(version: str) -> bool:
    """Whether ``version`` lies between the oldest and the newest tested minor release."""
    v = _release(version)[:2]
    return _release(TESTED[0])[:2] <= v <= _release(TESTED[-1])[:2]


def warn_if_untested(version: str, stacklevel: int = 2) -> bool:
    """Warn (and return True) when transformers ``version`` lies outside the tested range."""
    if in_tested_range(version):
        return False
    warnings.warn(
        f"prunekit is tested with transformers {tested_range()} (CI runs {', '.join(TESTED)}); "
        f"you have {version}. Token, KV and weight pruning may fail or, worse, be silently wrong: "
        f"install a tested version (pip install 'transformers{tested_range()}') or run "
        "`make test-latest` to see what breaks.",
        UserWarning,
        stacklevel=stacklevel + 1,
    )
    return True


@functools.cache
def check_transformers() -> str:
    """The installed transformers version; warns once per process outside the tested range."""
    import transformers

    warn_if_untested(transformers.__version__, stacklevel=3)
    return transformers.__version__


def cache_of(kw: dict):
    """The KV cache a model, decoder layer or attention forward was called with, or None
    (keyword ``cache`` from 5.24 on, ``past_key_values`` before)."""
    cache = kw.get("cache")
    return kw.get("past_key_values") if cache is None else cache


@functools.cache
def cache_keyword() -> str:
    """The keyword the installed transformers' forwards take for the cache."""
    import inspect

    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(out):
    """The cache a model returned (``out.cache`` from 5.24 on, ``out.past_key_values`` before)."""
    fields = getattr(out, "__dataclass_fields__", {})
    return getattr(out, "cache" if "cache" in fields else "past_key_values", None)
