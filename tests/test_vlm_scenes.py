"""The Fashion-MNIST scene generator (deterministic, answers true to the layout, held-out split),
the VQA task's scoring on hand-made answers, and the real-parts LLaVA assembled offline."""

from __future__ import annotations

import math
import re

import numpy as np

from prunekit.bench.tasks.vqa import normalize, score_answers
from prunekit.zoo.scenes import CLASSES, PLURAL, POSITIONS, SceneMaker, _paste, make_split


def _cell_pixels(image: np.ndarray, grid: int, cell: int) -> np.ndarray:
    size = 224 // grid
    r, c = divmod(cell, grid)
    return image[r * size : (r + 1) * size, c * size : (c + 1) * size]


def test_same_seed_same_scenes_other_seed_other_scenes():
    a, b, c = make_split("test", 12, seed=3), make_split("test", 12, seed=3), make_split("test", 12, seed=4)
    assert all(np.array_equal(x.images, y.images) for x, y in zip(a, b, strict=True))
    assert [q.question + q.answer for s in a for q in s.qas] == [
        q.question + q.answer for s in b for q in s.qas
    ]
    assert not all(np.array_equal(x.images, y.images) for x, y in zip(a, c, strict=True))


def test_answers_follow_from_the_layout_and_the_pixels():
    """Every answer re-derived here from the cell layout, by parsing the question."""
    maker = SceneMaker("test", seed=1)
    checked = {"what": 0, "presence": 0, "count": 0, "left": 0}
    for _ in range(60):
        s = maker.scene()
        cells = s.cells[0]
        grid = math.isqrt(len(cells))
        for cell, k in enumerate(cells):  # an empty cell is black; an item is not
            assert (_cell_pixels(s.images[0], grid, cell).max() == 0) == (k < 0)
        for qa in s.qas:
            checked[qa.kind] += 1
            if qa.kind == "what":
                pos = re.fullmatch(r"What is in the (.+) cell\?", qa.question).group(1)
                k = cells[POSITIONS[grid].index(pos)]
                assert qa.answer == ("nothing" if k < 0 else CLASSES[k])
            elif qa.kind == "presence":
                name = re.fullmatch(r"Is there (?:an? )?(.+)\?", qa.question).group(1)
                assert qa.answer == ("yes" if CLASSES.index(name) in cells else "no")
            elif qa.kind == "count":
                name = re.fullmatch(r"How many (.+) are there\?", qa.question).group(1)
                assert qa.answer == str(int((cells == PLURAL.index(name)).sum()))
            else:
                x, y = re.fullmatch(r"Which is further left, the (.+) or the (.+)\?", qa.question).groups()
                col = {n: int(np.flatnonzero(cells == CLASSES.index(n))[0]) % grid for n in (x, y)}
                assert col[x] != col[y] and qa.answer == min((x, y), key=col.get)
            assert qa.answer in qa.choices
    assert min(checked.values()) > 5, checked


def test_multi_image_and_frame_sequences():
    maker = SceneMaker("test", seed=2)
    for _ in range(10):
        s = maker.multi(n_images=3)
        name = re.fullmatch(r"Which image has (?:an? )?(.+)\?", s.qas[0].question).group(1)
        has = [CLASSES.index(name) in c for c in s.cells]
        assert (
            s.images.shape == (3, 224, 224) and sum(has) == 1 and s.qas[0].answer == str(has.index(True) + 1)
        )
        v = maker.video(frames=4)
        where, moves = v.qas
        name = re.fullmatch(r"Does the (.+) move\?", moves.question).group(1)
        k = CLASSES.index(name)
        track = [int(np.flatnonzero(c == k)[0]) for c in v.cells]
        assert all((c == k).sum() == 1 for c in v.cells)
        assert moves.answer == ("yes" if len(set(track)) > 1 else "no")
        assert where.answer == POSITIONS[2][track[-1]]
        static = [np.delete(c, [t]) for c, t in zip(v.cells, track, strict=True)]
        assert all(np.array_equal(static[0][static[0] != k], s_[s_ != k]) for s_ in static)


def test_test_scenes_use_only_the_test_split():
    from prunekit.assets import fashion_mnist

    train = {x.tobytes() for x in fashion_mnist("train")[0][:2000]}
    test_items = fashion_mnist("test")[0]
    maker = SceneMaker("test", seed=0)
    s = maker.single()
    item = test_items[maker.drawn[-1]]
    canvas = np.zeros_like(s.images[0])
    _paste(canvas, item, 1, 0)
    assert np.array_equal(canvas, s.images[0])  # the image is that test item, upscaled
    assert item.tobytes() not in train


def test_vqa_scoring_by_hand():
    assert normalize("  Shirt.\nmore text") == "shirt"
    pred = ["shirt", "Yes", "no", "2", "bag", " boot "]
    gold = ["shirt", "yes", "yes", "3", "bag", "sandal"]
    kinds = ["what", "presence", "presence", "count", "left", "single"]
    got = score_answers(pred, gold, kinds)
    assert got == {"acc": 3 / 6, "acc_count": 0.0, "acc_left": 1.0, "acc_presence": 0.5, "acc_single": 0.0,
                   "acc_what": 1.0}  # fmt: skip
