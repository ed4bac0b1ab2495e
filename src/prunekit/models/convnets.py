"""Small vision networks for the training-aware demonstrations, their channel groups, and surgery.

The networks (spec ``training-aware.md`` §5, §6, §8, §9) are plain ``nn.Module`` classifiers whose
``forward(pixel_values, labels=None)`` returns a :class:`ClassifierOutput` (``.logits``, and
``.loss`` = cross-entropy when labels are given), so the transformers ``Trainer`` trains them
through :func:`prunekit.training.train_batches`:

- :class:`MLP` ``sizes=(784, 128, 256, 10)``: Linear-ReLU layers (the PQI/SAP paper's MLP, §6);
- :class:`ConvNet` ``widths=(32, 64, 128, 128)``: conv3x3-BN-ReLU, a 2x2 max-pool after the convs
  named in ``pool_after`` (default the first two: 28 -> 14 -> 7), then the feature map flattened
  into one Linear (§8's 4-conv CNN);
- :class:`ResNetLite` ``stages=3, blocks=2 (or 4), widths=(16, 32, 64)``: a CIFAR-style ResNet
  (a 3x3 stem, post-activation basic blocks, stride 2 at the first block of every later stage,
  global average pooling, one Linear). A 1x1-conv+BN projection shortcut only where a block
  changes width or stride (§5, §9).

Construction is seeded (``seed=``) and leaves the global RNG untouched.

**Groups** (the structure, like the transformer adapters' heads and channels): :func:`groups`
lists every prunable channel group and every tensor slice it couples, as :class:`Member` s:

- ``hidden.i`` (MLP): row ``j`` (and bias) of Linear ``i``, column ``j`` of Linear ``i+1``;
- ``conv.i`` (ConvNet): output channel ``j`` of conv ``i``, BN ``i``'s feature ``j`` (weight,
  bias, running statistics), input channel ``j`` of conv ``i+1``; for the last conv the FC's
  input columns ``[j*S, (j+1)*S)`` instead (``S`` = the flattened map's size: PyTorch's flatten
  is channel-major);
- ``inner.s.b`` (ResNetLite): a basic block's middle width (conv1 out, bn1, conv2 in);
- ``stream.s`` (ResNetLite): the residual stream of stage ``s``. Every tensor *added* into it is
  in the group (the stem conv+BN for stage 0 or the projection conv+BN of the stage's first
  block, and every block's conv2+bn2), and every tensor *reading* it (each block's conv1, the next
  stage's first conv1 and projection, or the FC): a channel of the stream is removed everywhere at
  once, since an addition needs equal widths.

:func:`blocks` lists the residual blocks; a block is **removable** when its shortcut is the
identity (input and output shapes match), i.e. not the first block of a later stage (Layers
Lottery, §9 A.1). A removed block is the identity: the network without it.

**Masks first, surgery last** (``DESIGN.md``). :func:`mask_channels` / :func:`mask_blocks` zero
the coupled slices reversibly (``torch.nn.utils.parametrize`` parametrizations ``W * keep``; the
original Parameter objects stay, and come back unchanged on :meth:`Masks.restore`, on leaving
the ``with`` block, also after an exception); :func:`remove_channels` / :func:`remove_blocks`
slice the tensors physically. They compute the same function: a masked channel's BN weight and
bias are zero, so after the ReLU the channel is exactly 0 (also on a residual stream: every
addend is 0, and ``relu(0) = 0``); a masked block's bn2 is zero, so it returns ``relu(x) = x``
(its input is the output of a ReLU). Masks do not touch BN running statistics; a forward in
training mode updates them as it would without masks.

:func:`count_params`, :func:`count_flops` (multiply-accumulates of convs and Linears, per sample)
and :func:`with_widths` (a new, narrower or wider network of the same family from per-group widths
or ratios: PreCrop's build step, §8) complete the surgery. :func:`fashion_batches` and
:func:`evaluate_classifier` read the packaged Fashion-MNIST (:func:`prunekit.assets.fashion_mnist`).

All of this is ours (the papers' own code is for torchvision-style CIFAR ResNets and is not used).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..errors import PrunekitError, UnsupportedModelError

#: Fashion-MNIST pixel mean and std over the training set (pixels in [0, 1])
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class ClassifierOutput(dict):
    """``{"logits": (B, classes), "loss": scalar or absent}`` with attribute access; a dict, so the
    transformers ``Trainer`` reads ``outputs["loss"]``."""

    def __getattr__(self, name: str):
        if name in ("logits", "loss"):
            return self.get(name)
        raise AttributeError(name)


def _output(logits: torch.Tensor, labels: torch.Tensor | None) -> ClassifierOutput:
    out = ClassifierOutput(logits=logits)
    if labels is not None:
        out["loss"] = F.cross_entropy(logits, labels)
    return out


@contextmanager
def _seeded(seed: int):
    """Seed torch's CPU generator for a construction and give the caller's state back after."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _init_conv(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _positive_ints(name: str, values, min_len: int = 1) -> tuple[int, ...]:
    vals = tuple(values)
    if len(vals) < min_len or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
        raise ValueError(f"{name} must be at least {min_len} int(s) >= 1; got {values!r}")
    return vals


# ------------------------------------------------------------------ the networks
class MLP(nn.Module):
    """Linear-ReLU layers on the flattened image: ``sizes[0]`` inputs (784 for 28x28), the last
    size the classes. The hidden units of Linear ``i`` are the group ``hidden.i``."""

    def __init__(self, sizes: Sequence[int] = (784, 128, 256, 10), seed: int = 0) -> None:
        super().__init__()
        sizes = _positive_ints("sizes", sizes, 2)
        with _seeded(seed):
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def arch(self) -> dict:
        """The constructor's keyword arguments for this (maybe pruned) network's shape."""
        return {"sizes": (self.layers[0].in_features, *(lin.out_features for lin in self.layers))}

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        x = pixel_values.flatten(1)  # (B, 784)
        for i, lin in enumerate(self.layers):
            x = lin(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return _output(x, labels)


class ConvNet(nn.Module):
    """conv3x3(pad 1, no bias)-BN-ReLU per width, a 2x2 max-pool after the convs in
    ``pool_after``, the map flattened into one Linear to ``classes``. With the defaults on 28x28:
    28 -> 14 -> 7, FC ``128*7*7 -> 10``; about 0.30 M parameters and 14.7 M multiply-accumulates."""

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128, 128),
        classes: int = 10,
        pool_after: Sequence[int] = (0, 1),
        image_size: int = 28,
        in_channels: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        widths = _positive_ints("widths", widths)
        for name, v in (("classes", classes), ("image_size", image_size), ("in_channels", in_channels)):
            _positive_ints(name, (v,))
        pools = tuple(sorted(set(pool_after)))
        if any(not isinstance(p, int) or not 0 <= p < len(widths) for p in pools):
            raise ValueError(f"pool_after must name convs in [0, {len(widths) - 1}]; got {pool_after!r}")
        side = image_size
        for _ in pools:
            side //= 2
        if side < 1:
            raise ValueError(f"{len(pools)} poolings leave nothing of a {image_size}x{image_size} image")
        self.pool_after, self.image_size, self.side = pools, image_size, side
        with _seeded(seed):
            chans = (in_channels, *widths)
            self.convs = nn.ModuleList(
                nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in itertools.pairwise(chans)
            )
            self.bns = nn.ModuleList(nn.BatchNorm2d(w) for w in widths)
            self.fc = nn.Linear(widths[-1] * side * side, classes)
            self.apply(_init_conv)

    def arch(self) -> dict:
        return {
            "widths": tuple(c.out_channels for c in self.convs), "classes": self.fc.out_features,
            "pool_after": self.pool_after, "image_size": self.image_size,
            "in_channels": self.convs[0].in_channels,
        }  # fmt: skip

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        x = pixel_values  # (B, C, H, W)
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            x = F.relu(bn(conv(x)))
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
        return _output(self.fc(x.flatten(1)), labels)  # flatten: (B, C*h*w), channel-major


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is the identity, or
    a 1x1 conv + BN (``shortcut.0``, ``shortcut.1``) where the width or the stride changes."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNetLite(nn.Module):
    """A CIFAR-style ResNet for 1x28x28 inputs: stem conv3x3-BN-ReLU to ``widths[0]``; ``stages``
    stages of :class:`BasicBlock` s (``blocks`` per stage: an int, or one per stage), the first
    block of stage ``s > 0`` with stride 2 and a projection shortcut; global average pooling;
    Linear to ``classes``. Blocks sit in a ``ModuleDict`` per stage under their original index
    (``stages.1["0"]``), so names stay stable when blocks are removed.

    ``inner``: the middle width of some blocks, ``{"s.b": width}`` (default: the stage width);
    ``dropped``: blocks ``"s.b"`` not built (a network after :func:`remove_blocks`)."""

    def __init__(
        self,
        stages: int = 3,
        blocks: int | Sequence[int] = 2,
        widths: Sequence[int] = (16, 32, 64),
        inner: Mapping[str, int] | None = None,
        dropped: Iterable[str] = (),
        classes: int = 10,
        in_channels: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        (stages,) = _positive_ints("stages", (stages,))
        per = (blocks,) * stages if isinstance(blocks, int) and not isinstance(blocks, bool) else blocks
        per = _positive_ints("blocks", per)
        widths = _positive_ints("widths", widths)
        if len(per) != stages or len(widths) != stages:
            raise ValueError(
                f"stages={stages} needs {stages} widths and {stages} block counts; got widths={widths!r}, "
                f"blocks={blocks!r}"
            )
        names = {f"{s}.{b}" for s in range(stages) for b in range(per[s])}
        inner = dict(inner or {})
        bad = sorted(set(inner) - names)
        if bad:
            raise ValueError(f"inner names unknown blocks {bad}; blocks are {sorted(names)}")
        _positive_ints("inner widths", inner.values(), 0)
        dropped = tuple(sorted(set(dropped)))
        fixed = {f"{s}.0" for s in range(1, stages)}  # projection shortcuts: the shape changes
        bad = [d for d in dropped if d not in names or d in fixed]
        if bad:
            raise ValueError(f"dropped names blocks that cannot be removed or do not exist: {bad}")
        self.blocks_per_stage, self.dropped = per, dropped
        with _seeded(seed):
            self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
            self.stem_bn = nn.BatchNorm2d(widths[0])
            self.stem.apply(_init_conv)
            self.stem_bn.apply(_init_conv)
            self.stages = nn.ModuleList()
            c_in = widths[0]
            for s in range(stages):
                stage = nn.ModuleDict()
                for b in range(per[s]):
                    stride = 2 if s > 0 and b == 0 else 1
                    block = BasicBlock(c_in, inner.get(f"{s}.{b}", widths[s]), widths[s], stride)
                    block.apply(_init_conv)  # here, so a dropped block draws its init too
                    if f"{s}.{b}" not in dropped:  # built anyway, so the seed gives the same weights
                        stage[str(b)] = block
                    c_in = widths[s]
                self.stages.append(stage)
            self.fc = nn.Linear(widths[-1], classes)

    def stream_width(self, s: int) -> int:
        """The residual width of stage ``s`` (read from the weights)."""
        if s == 0:
            return self.stem.out_channels
        return self.stages[s]["0"].conv2.out_channels

    def arch(self) -> dict:
        n = len(self.stages)
        widths = tuple(self.stream_width(s) for s in range(n))
        inner = {
            f"{s}.{k}": blk.conv1.out_channels
            for s, stage in enumerate(self.stages)
            for k, blk in stage.items()
            if blk.conv1.out_channels != widths[s]
        }
        return {
            "stages": n, "blocks": self.blocks_per_stage, "widths": widths, "inner": inner,
            "dropped": self.dropped, "classes": self.fc.out_features, "in_channels": self.stem.in_channels,
        }  # fmt: skip

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        x = F.relu(self.stem_bn(self.stem(pixel_values)))  # (B, w0, 28, 28)
        for stage in self.stages:
            for block in stage.values():
                x = block(x)
        x = x.mean(dim=(2, 3))  # (B, w_last)
        return _output(self.fc(x), labels)


NETWORKS = (MLP, ConvNet, ResNetLite)


# ------------------------------------------------------------------ structure
@dataclass(frozen=True)
class Member:
    """One tensor slice a channel group couples. ``role``: ``"out"`` (a conv's output channels or
    a Linear's rows, with the bias), ``"bn"`` (a BatchNorm's features: weight, bias, running
    statistics), ``"in"`` (a conv's input channels or a Linear's columns), ``"flat"`` (a Linear's
    columns after a flatten: channel ``j`` owns columns ``[j*span, (j+1)*span)``)."""

    module: str
    role: str
    span: int = 1


@dataclass(frozen=True)
class Group:
    """A prunable channel group: ``kind`` is ``hidden`` (MLP), ``conv`` (conv -> conv),
    ``flatten`` (conv -> FC through the flatten), ``inner`` (inside a residual block) or
    ``residual`` (a residual stream)."""

    name: str
    kind: str
    width: int
    members: tuple[Member, ...]

    @property
    def producers(self) -> tuple[str, ...]:
        """Modules whose outputs are these channels (convs and Linears)."""
        return tuple(m.module for m in self.members if m.role == "out")

    @property
    def consumers(self) -> tuple[str, ...]:
        """Modules that read these channels."""
        return tuple(m.module for m in self.members if m.role in ("in", "flat"))


@dataclass(frozen=True)
class Block:
    """A residual block: ``name`` ``block.s.b``, its module path, whether it is removable (an
    identity shortcut), and its two convolutions' parameter count."""

    name: str
    module: str
    stage: int
    removable: bool
    params: int


def _network(model: nn.Module) -> nn.Module:
    if not isinstance(model, NETWORKS):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not one of prunekit's small vision networks; supported: "
            + ", ".join(c.__name__ for c in NETWORKS)
        )
    return model


def groups(model: nn.Module) -> dict[str, Group]:
    """Every prunable channel group of ``model`` (an :class:`MLP`, :class:`ConvNet` or
    :class:`ResNetLite`), in forward order, with its current width."""
    model = _network(model)
    out: dict[str, Group] = {}
    if isinstance(model, MLP):
        for i in range(len(model.layers) - 1):
            w = model.layers[i].out_features
            out[f"hidden.{i}"] = Group(
                f"hidden.{i}", "hidden", w, (Member(f"layers.{i}", "out"), Member(f"layers.{i + 1}", "in"))
            )
    elif isinstance(model, ConvNet):
        n = len(model.convs)
        for i in range(n):
            w = model.convs[i].out_channels
            mem = [Member(f"convs.{i}", "out"), Member(f"bns.{i}", "bn")]
            if i < n - 1:
                mem.append(Member(f"convs.{i + 1}", "in"))
                kind = "conv"
            else:
                mem.append(Member("fc", "flat", model.fc.in_features // w))
                kind = "flatten"
            out[f"conv.{i}"] = Group(f"conv.{i}", kind, w, tuple(mem))
    else:
        n = len(model.stages)
        streams: list[list[Member]] = [[] for _ in range(n)]
        streams[0] += [Member("stem", "out"), Member("stem_bn", "bn")]
        for s, stage in enumerate(model.stages):
            for k, blk in stage.items():
                p = f"stages.{s}.{k}"
                reads = s - 1 if blk.shortcut is not None else s
                out[f"inner.{s}.{k}"] = Group(
                    f"inner.{s}.{k}", "inner", blk.conv1.out_channels,
                    (Member(f"{p}.conv1", "out"), Member(f"{p}.bn1", "bn"), Member(f"{p}.conv2", "in")),
                )  # fmt: skip
                streams[reads].append(Member(f"{p}.conv1", "in"))
                if blk.shortcut is not None:
                    streams[reads].append(Member(f"{p}.shortcut.0", "in"))
                    streams[s] += [Member(f"{p}.shortcut.0", "out"), Member(f"{p}.shortcut.1", "bn")]
                streams[s] += [Member(f"{p}.conv2", "out"), Member(f"{p}.bn2", "bn")]
        streams[-1].append(Member("fc", "in"))
        inner = dict(out)
        out = {}
        for s in range(n):
            out[f"stream.{s}"] = Group(f"stream.{s}", "residual", model.stream_width(s), tuple(streams[s]))
        out.update(inner)
    return out


def blocks(model: nn.Module) -> dict[str, Block]:
    """The residual blocks of a :class:`ResNetLite` (none for the other networks)."""
    model = _network(model)
    out: dict[str, Block] = {}
    if isinstance(model, ResNetLite):
        for s, stage in enumerate(model.stages):
            for k, blk in stage.items():
                params = blk.conv1.weight.numel() + blk.conv2.weight.numel()
                out[f"block.{s}.{k}"] = Block(
                    f"block.{s}.{k}", f"stages.{s}.{k}", s, blk.shortcut is None, params
                )
    return out


def layer_groups(model: nn.Module) -> dict[str, tuple[str | None, str | None]]:
    """For each conv and Linear, ``(group of its input channels, group of its output channels)``;
    ``None`` for the image channels and the classes (PreCrop's ``alpha_0 = 1``). Layers tied by a
    residual addition name the same group."""
    model = _network(model)
    out: dict[str, list[str | None]] = {
        name: [None, None] for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    for g in groups(model).values():
        for m in g.members:
            if m.role == "out":
                out[m.module][1] = g.name
            elif m.role in ("in", "flat"):
                out[m.module][0] = g.name
    return {k: (v[0], v[1]) for k, v in out.items()}


# ------------------------------------------------------------------ checking a keep
def _keep_index(g: Group, kept) -> torch.Tensor:
    try:
        idx = kept if isinstance(kept, torch.Tensor) else torch.as_tensor(list(kept))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"group {g.name!r}: keep must be a sequence of integer channel indices; got {kept!r}"
        ) from e
    if idx.dim() != 1 or (idx.numel() and (idx.is_floating_point() or idx.dtype == torch.bool)):
        raise ValueError(
            f"group {g.name!r}: keep must be a 1-D sequence of integer channel indices; got "
            f"{idx.dtype} of shape {tuple(idx.shape)}"
        )
    idx = idx.long().cpu()
    if idx.numel() == 0:
        raise ValueError(
            f"group {g.name!r}: keeping no channel would remove every channel (width {g.width}); keep at "
            "least 1"
        )
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= g.width:
        bad = lo if lo < 0 else hi
        raise ValueError(f"group {g.name!r}: channel index {bad} is out of range [0, {g.width - 1}]")
    idx = idx.sort().values
    if bool((idx[1:] == idx[:-1]).any()):
        raise ValueError(f"group {g.name!r}: keep repeats a channel index")
    return idx


def _check_keeps(model: nn.Module, keep: Mapping[str, object]) -> dict[str, tuple[Group, torch.Tensor]]:
    known = groups(model)
    if not isinstance(keep, Mapping):
        raise ValueError(f"keep must be a dict group name -> kept channel indices; got {type(keep).__name__}")
    out = {}
    for name, kept in keep.items():
        if name not in known:
            raise ValueError(f"unknown channel group {name!r}; {type(model).__name__} has {sorted(known)}")
        out[name] = (known[name], _keep_index(known[name], kept))
    return out


def _check_blocks(model: nn.Module, names: Iterable[str]) -> list[Block]:
    known = blocks(model)
    names = [names] if isinstance(names, str) else list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"blocks repeat a name: {names}")
    removable = sorted(n for n, b in known.items() if b.removable)
    out = []
    for n in names:
        if n not in known:
            raise ValueError(f"unknown block {n!r}; {type(model).__name__} has removable blocks {removable}")
        if not known[n].removable:
            raise ValueError(
                f"block {n!r} changes shape (projection shortcut, first block of stage {known[n].stage}) and "
                f"cannot be removed; removable blocks are {removable}"
            )
        out.append(known[n])
    return out


# ------------------------------------------------------------------ reversible masks
class _Keep(nn.Module):
    """The parametrization ``W -> W * keep`` (``keep`` a bool mask broadcasting against ``W``)."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", keep, persistent=False)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W * self.keep.to(W.dtype)


def _vector_shape(role: str, dim: int) -> tuple[int, ...]:
    """How a channel mask of a member broadcasts against a weight of ``dim`` dims."""
    if role == "out":
        return (-1,) + (1,) * (dim - 1)
    return (1, -1) + (1,) * (dim - 2)


def _member_masks(
    model: nn.Module, m: Member, vec: torch.Tensor
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    mod = model.get_submodule(m.module)
    dev = mod.weight.device
    vec = vec.to(dev)
    if m.role == "bn":
        return [(mod, "weight", vec), (mod, "bias", vec)]
    if m.role == "out":
        out = [(mod, "weight", vec.view(_vector_shape("out", mod.weight.dim())))]
        if getattr(mod, "bias", None) is not None:
            out.append((mod, "bias", vec))
        return out
    if m.role == "flat":
        vec = vec.repeat_interleave(m.span)
    return [(mod, "weight", vec.view(_vector_shape("in", mod.weight.dim())))]


class Masks:
    """Reversible channel/block masks on a network, applied on construction. :meth:`restore`
    (or leaving the ``with`` block, also by an exception) removes exactly these masks and gives
    back the very same Parameter objects, unchanged; other parametrizations on the same tensors
    stay. Masks stack: several :class:`Masks` may be active at once."""

    def __init__(
        self, model: nn.Module, entries: list[tuple[nn.Module, str, torch.Tensor]], what: dict
    ) -> None:
        self.model, self.what = model, what
        self._ours: list[tuple[nn.Module, str, _Keep]] = []
        merged: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}
        for mod, pname, mask in entries:
            key = (id(mod), pname)
            if key in merged:
                mask = merged[key][2] & mask
            merged[key] = (mod, pname, mask)
        try:
            for mod, pname, mask in merged.values():
                keep = _Keep(mask)
                parametrize.register_parametrization(mod, pname, keep)
                self._ours.append((mod, pname, keep))
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Remove these masks (idempotent)."""
        while self._ours:
            mod, pname, keep = self._ours.pop()
            plist = mod.parametrizations[pname]
            if len(plist) == 1:
                parametrize.remove_parametrizations(mod, pname, leave_parametrized=False)
            else:
                del plist[next(i for i, p in enumerate(plist) if p is keep)]

    @property
    def active(self) -> bool:
        return bool(self._ours)

    def __enter__(self) -> Masks:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def channel_masks(model: nn.Module, keep: Mapping[str, object]) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """``(module, parameter name, bool mask)`` for every tensor slice the groups in ``keep`` lose."""
    entries = []
    for g, idx in _check_keeps(model, keep).values():
        vec = torch.zeros(g.width, dtype=torch.bool)
        vec[idx] = True
        for m in g.members:
            entries += _member_masks(model, m, vec)
    return entries


def mask_channels(model: nn.Module, keep: Mapping[str, object]) -> Masks:
    """Zero every channel of each group in ``keep`` (``{group name: kept channel indices}``) that
    is not kept, in every tensor slice the group couples; reversible (:class:`Masks`; use it as a
    context manager). The masked network computes what :func:`remove_channels` gives."""
    return Masks(model, channel_masks(model, keep), {"channels": dict(keep)})


def mask_blocks(model: nn.Module, names: Iterable[str]) -> Masks:
    """Make each named residual block (``block.s.b``, removable ones only) the identity by zeroing
    its convolutions and BatchNorms; reversible (:class:`Masks`). Equal to :func:`remove_blocks`."""
    checked = _check_blocks(model, names)
    entries = []
    for b in checked:
        blk = model.get_submodule(b.module)
        for mod in (blk.conv1, blk.bn1, blk.conv2, blk.bn2):
            for pname in ("weight", "bias"):
                if getattr(mod, pname, None) is not None:
                    entries.append((mod, pname, torch.zeros((), dtype=torch.bool, device=mod.weight.device)))
    return Masks(model, entries, {"blocks": [b.name for b in checked]})


# ------------------------------------------------------------------ surgery
@dataclass
class SurgeryReport:
    """What :func:`remove_channels` / :func:`remove_blocks` removed: per group ``(width before,
    width after)`` and the removed channel indices, the removed blocks, the parameters before and
    after."""

    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _refuse_masked(model: nn.Module) -> None:
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PrunekitError(
            "the network holds reversible masks (parametrizations): restore() them before physical surgery"
        )


def _param(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)


def _slice_member(model: nn.Module, m: Member, idx: torch.Tensor) -> None:
    mod = model.get_submodule(m.module)
    idx = idx.to(mod.weight.device)
    n = len(idx)
    if m.role == "bn":
        mod.weight = _param(mod.weight, mod.weight[idx])
        mod.bias = _param(mod.bias, mod.bias[idx])
        for buf in ("running_mean", "running_var"):
            if getattr(mod, buf, None) is not None:
                setattr(mod, buf, getattr(mod, buf)[idx].contiguous())
        mod.num_features = n
    elif m.role == "out":
        mod.weight = _param(mod.weight, mod.weight[idx])
        if mod.bias is not None:
            mod.bias = _param(mod.bias, mod.bias[idx])
        if isinstance(mod, nn.Conv2d):
            mod.out_channels = n
        else:
            mod.out_features = n
    else:
        if m.role == "flat":  # channel j owns columns [j*span, (j+1)*span)
            idx = (idx[:, None] * m.span + torch.arange(m.span, device=idx.device)).flatten()
        mod.weight = _param(mod.weight, mod.weight[:, idx])
        if isinstance(mod, nn.Conv2d):
            mod.in_channels = n
        else:
            mod.in_features = len(idx)


def remove_channels(model: nn.Module, keep: Mapping[str, object]) -> SurgeryReport:
    """Physically remove, in place, every channel of each group in ``keep`` (``{group name: kept
    channel indices}``, e.g. ``{"conv.1": [0, 3, 5], "stream.0": torch.tensor([...])}``) that is not
    kept, from every tensor slice the group couples. The network then computes what
    :func:`mask_channels` computes. An optimizer built before holds the old Parameters: build a
    new one."""
    _refuse_masked(model)
    checked = _check_keeps(model, keep)
    report = SurgeryReport(params_before=count_params(model))
    with torch.no_grad():
        for name, (g, idx) in checked.items():
            for m in g.members:
                _slice_member(model, m, idx)
            gone = torch.ones(g.width, dtype=torch.bool)
            gone[idx] = False
            report.channels[name] = (g.width, len(idx))
            report.removed[name] = gone.nonzero().flatten().tolist()
    report.params_after = count_params(model)
    return report


def remove_blocks(model: nn.Module, names: Iterable[str]) -> SurgeryReport:
    """Physically delete, in place, the named removable residual blocks (``block.s.b``) of a
    :class:`ResNetLite`: the network without them, i.e. each replaced by its identity shortcut.
    Kept blocks keep their names and weights."""
    _refuse_masked(model)
    checked = _check_blocks(model, names)
    report = SurgeryReport(params_before=count_params(model))
    for b in checked:
        s, k = b.module.split(".")[1:]
        del model.stages[int(s)][k]
        report.blocks.append(b.name)
    model.dropped = tuple(sorted({*model.dropped, *(b.name.split(".", 1)[1] for b in checked)}))
    report.params_after = count_params(model)
    return report


# ------------------------------------------------------------------ sizes
def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (every element; masked ones included, since they are still stored)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: Sequence[int] = (1, 1, 28, 28)) -> int:
    """Multiply-accumulates of the convolutions and Linears for one sample of ``input_shape``
    ``(B, C, H, W)`` (per sample: divided by ``B``); BatchNorm, pooling, activations and residual
    additions are not counted. Measured by forward hooks on a zero input, in eval mode (the
    model's mode is restored). Masks do not lower the count (the zeros are still multiplied):
    count a sliced copy (:func:`remove_channels`, :func:`remove_blocks`) for the pruned cost."""
    shape = tuple(input_shape)
    if len(shape) != 4 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
        raise ValueError(f"input_shape must be 4 ints >= 1 (B, C, H, W); got {input_shape!r}")
    total = [0]

    def hook(mod: nn.Module, args, out: torch.Tensor) -> None:
        per_out = mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else mod.in_features  # (C_in/g)*kh*kw
        total[0] += out.numel() // out.shape[0] * per_out

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was = model.training
    p = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return total[0]


def group_widths(model: nn.Module) -> dict[str, int]:
    """``{group name: current width}``."""
    return {n: g.width for n, g in groups(model).items()}


def with_widths(
    model: nn.Module,
    widths: Mapping[str, int] | None = None,
    *,
    ratios: Mapping[str, float] | None = None,
    seed: int = 0,
) -> nn.Module:
    """A new network of ``model``'s family and shape, freshly initialised (``seed``), with some
    groups' widths changed: ``widths`` ``{group: width}`` or ``ratios`` ``{group: ratio > 0}``
    (width ``max(1, round(ratio * width))``; ratios above 1 widen, PreConfig). Layers tied by a
    residual addition are one group, so they change together. Groups not named keep their width."""
    known = group_widths(model)
    new = dict(known)
    for arg, table in (("widths", widths), ("ratios", ratios)):
        for name, v in (table or {}).items():
            if name not in known:
                raise ValueError(
                    f"{arg}: unknown channel group {name!r}; {type(model).__name__} has {sorted(known)}"
                )
            if arg == "widths":
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"widths[{name!r}] must be an int >= 1; got {v!r}")
                new[name] = v
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    raise ValueError(f"ratios[{name!r}] must be a number > 0; got {v!r}")
                new[name] = max(1, round(v * known[name]))
    kw = model.arch()
    if isinstance(model, MLP):
        sizes = list(kw["sizes"])
        for i in range(len(sizes) - 2):
            sizes[i + 1] = new[f"hidden.{i}"]
        kw["sizes"] = tuple(sizes)
    elif isinstance(model, ConvNet):
        kw["widths"] = tuple(new[f"conv.{i}"] for i in range(len(kw["widths"])))
    else:
        kw["widths"] = tuple(new[f"stream.{s}"] for s in range(kw["stages"]))
        kw["inner"] = {
            name.split(".", 1)[1]: w
            for name, w in new.items()
            if name.startswith("inner.") and w != kw["widths"][int(name.split(".")[1])]
        }
    return type(model)(**kw, seed=seed)


# ------------------------------------------------------------------ Fashion-MNIST
def _fashion(split: str, limit: int | None):
    from ..assets import fashion_mnist

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1; got {limit!r}")
    return fashion_mnist(split)


def _pixels(images) -> torch.Tensor:
    x = torch.from_numpy(images).float().div_(255.0)  # (N, 28, 28)
    return x.sub_(FASHION_MEAN).div_(FASHION_STD).unsqueeze(1)  # (N, 1, 28, 28)


def fashion_batches(
    split: str, batch_size: int, limit: int | None = None, seed: int | None = 0
) -> list[dict]:
    """Fashion-MNIST ``split`` ('train' or 'test') as a list of ``{"pixel_values": (B, 1, 28, 28)
    float32 normalised by the training set's mean and std, "labels": (B,) int64}`` batches for
    :func:`prunekit.training.train_batches`. The images are shuffled by ``seed`` (``None``: file
    order), the first ``limit`` kept (default all); the last batch may be smaller."""
    images, labels = _fashion(split, limit)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    n = len(labels) if limit is None else min(limit, len(labels))
    if seed is None:
        order = torch.arange(n)
    else:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(labels), generator=g)[:n]
    order = order.numpy()
    x, y = _pixels(images[order]), torch.from_numpy(labels[order].astype("int64"))
    return [
        {"pixel_values": x[i : i + batch_size], "labels": y[i : i + batch_size]}
        for i in range(0, n, batch_size)
    ]


def evaluate_classifier(
    model: nn.Module, split: str = "test", limit: int | None = None, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``model`` on the first ``limit`` images (default all) of Fashion-MNIST
    ``split``, in eval mode without gradients (the model's mode is restored)."""
    batches = fashion_batches(split, batch_size, limit, seed=None)
    p = next(model.parameters())
    was, correct, total = model.training, 0, 0
    try:
        model.eval()
        with torch.no_grad():
            for b in batches:
                logits = model(pixel_values=b["pixel_values"].to(device=p.device, dtype=p.dtype)).logits
                correct += int((logits.argmax(-1).cpu() == b["labels"]).sum())
                total += len(b["labels"])
    finally:
        model.train(was)
    return correct / total
