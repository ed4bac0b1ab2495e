"""Hypothesis strategies for the property tests (tests/test_properties.py): tiny random model
configs (heads, GQA ratio, depth, vocabulary), padded prompts (batch, side, amount) and budgets
(a count or a ratio), plus a counter of the cases each property ran."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from tiny import DECODERS, VLMS
from tiny_encoders import build as build_encoder

#: cases run per property (printed in pytest's terminal summary by tests/conftest.py)
CASES: Counter[str] = Counter()
#: the largest error measured under each tolerance (printed beside it in the summary)
MAX_ERR: dict[str, float] = {}

# Default: few derandomized examples per (property, method), so CI is reproducible and fast.
# PRUNEKIT_PROPERTIES: a comma-separated list of "slow" (40 examples per test) and "noshrink" (no
# shrinking phase: quicker to list failures while exploring), e.g. PRUNEKIT_PROPERTIES=slow.
settings.register_profile(
    "prunekit",
    max_examples=3,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
MODES = set(os.environ.get("PRUNEKIT_PROPERTIES", "").split(","))
SLOW_EXAMPLES = 40


def examples(n: int) -> settings:
    """``n`` examples per test (``SLOW_EXAMPLES`` in slow mode)."""
    base = settings.get_profile("prunekit")
    phases = [Phase.explicit, Phase.generate] if "noshrink" in MODES else base.phases
    return settings(base, max_examples=SLOW_EXAMPLES if "slow" in MODES else n, phases=phases)


# ------------------------------------------------------------------ models
@dataclass(frozen=True)
class DecoderSpec:
    """A tiny random causal LM: ``heads = kv_heads * gqa`` query heads of ``head_dim``."""

    family: str
    kv_heads: int
    gqa: int
    head_dim: int
    depth: int
    vocab: int
    seed: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.gqa

    def config(self) -> dict:
        hidden = self.heads * self.head_dim
        return dict(
            vocab_size=self.vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=self.depth,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
        )

    def build(self, attn: str = "sdpa") -> torch.nn.Module:
        return DECODERS[self.family](attn, self.seed, **self.config())


@st.composite
def decoders(draw, families=tuple(DECODERS), min_depth: int = 2) -> DecoderSpec:
    return DecoderSpec(
        family=draw(st.sampled_from(families)),
        kv_heads=draw(st.integers(1, 2)),
        gqa=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([8, 16])),
        depth=draw(st.integers(min_depth, 4)),
        vocab=draw(st.sampled_from([64, 256])),
        seed=draw(st.integers(0, 2**16)),
    )


@dataclass(frozen=True)
class VLMSpec:
    """A tiny random VLM of tests/tiny.py with a random language model (heads, GQA, depth)."""

    family: str
    text: DecoderSpec
    seed: int

    def build(self, attn: str = "sdpa") -> torch.nn.Module:
        cfg = self.text.config()
        cfg.pop("vocab_size")  # the image placeholder ids need the default vocabulary
        return VLMS[self.family](attn, self.seed, **cfg)


@st.composite
def vlms(draw) -> VLMSpec:
    """Tiny LLaVA (CLIP tower fixed: 3 layers, 4 x 4 patches) with a random language model."""
    return VLMSpec(family="llava", text=draw(decoders(families=("llama",))), seed=draw(st.integers(0, 2**16)))


@dataclass(frozen=True)
class EncoderSpec:
    """A tiny random ViT (``grid x grid`` patches of 4 pixels) or BERT."""

    family: str
    heads: int
    head_dim: int
    depth: int
    grid: int
    seed: int

    def build(self, attn: str = "sdpa") -> torch.nn.Module:
        cfg = dict(
            hidden_size=self.heads * self.head_dim,
            num_attention_heads=self.heads,
            num_hidden_layers=self.depth,
            intermediate_size=2 * self.heads * self.head_dim,
        )
        if self.family == "vit":
            cfg.update(image_size=4 * self.grid, patch_size=4)
        return build_encoder(self.family, attn, self.seed, **cfg)


@st.composite
def encoders(draw, families=("vit", "bert")) -> EncoderSpec:
    return EncoderSpec(
        family=draw(st.sampled_from(families)),
        heads=draw(st.sampled_from([1, 2, 4])),
        head_dim=draw(st.sampled_from([4, 8])),
        depth=draw(st.integers(2, 4)),
        grid=draw(st.integers(2, 4)),
        seed=draw(st.integers(0, 2**16)),
    )


# ------------------------------------------------------------------ inputs and budgets
@dataclass(frozen=True)
class Prompt:
    """``batch`` rows of ``length`` positions; row ``b`` has ``pads[b]`` pad tokens (id 0) on ``side``."""

    length: int
    pads: tuple[int, ...]
    side: str
    seed: int

    def inputs(self, vocab: int, first: int = 3) -> dict:
        g = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(first, vocab, (len(self.pads), self.length), generator=g)
        pos = torch.arange(self.length)
        pads = torch.tensor(self.pads)[:, None]
        am = (pos >= pads) if self.side == "left" else (pos < self.length - pads)
        return dict(input_ids=ids.masked_fill(~am, 0), attention_mask=am.long())

    @property
    def right_padded(self) -> bool:
        return self.side == "right" and any(self.pads)

    @property
    def left_padded(self) -> bool:
        return self.side == "left" and any(self.pads)


@st.composite
def prompts(draw, min_length: int = 4, max_length: int = 14, sides=("left", "right")) -> Prompt:
    length = draw(st.integers(min_length, max_length))
    batch = draw(st.integers(1, 3))
    pads = tuple(draw(st.lists(st.integers(0, length - 2), min_size=batch, max_size=batch)))
    return Prompt(length, pads, draw(st.sampled_from(sides)), draw(st.integers(0, 2**16)))


def keeps(max_count: int = 24):
    """A budget: a count ``>= 1`` or a ratio in (0, 1]."""
    return st.one_of(st.integers(1, max_count), st.floats(0.01, 1.0))


def keep_everything(n: int):
    """A budget that keeps all of ``n`` candidates: the ratio 1.0 or any count ``>= n``."""
    return st.one_of(st.just(1.0), st.integers(max(n, 1), n + 8))
