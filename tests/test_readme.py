"""README.md's code blocks run as a user pastes them, so the docs cannot drift from the code.

- Every ```python block of README.md runs top to bottom in a fresh namespace (in a temporary
  folder), on the packaged real models. A block that cannot run offline is preceded by
  ``<!-- no-test: reason -->``, one that takes minutes by ``<!-- slow: reason -->`` (it runs in
  ``make test-slow``); the reason is required.
- Blocks of docs/*.md run when preceded by ``<!-- runnable -->`` (``slow``: they prune SmolLM2
  three times); the other blocks there are fragments that use the names of their page's text.
- Every other ```python block of docs/*.md compiles.
- Every ``prunekit ...`` line of a ```bash block parses with the CLI's own argparse parser.
- Every relative link of README.md and docs/*.md points at a file that exists (or a page the docs
  build generates).

The real-parts VLM's first ``zoo.llava_dino_smol()`` trains for about an hour. When its trained
projector is not cached, the README block runs on the same model with an untrained projector
(``assemble()``): that checks the block's code path, not its answers.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKER = re.compile(r"^<!--\s*(no-test|slow|runnable)\b:?\s*(.*?)\s*-->$")


def blocks(path: pathlib.Path) -> list[dict]:
    """Fenced blocks of a markdown file: line, language, code, and the marker on the line before
    (blank lines between allowed)."""
    out, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = MARKER.match(lines[k].strip()) if k >= 0 else None
        out.append(
            {
                "line": i + 1,
                "lang": m.group(1),
                "code": "\n".join(lines[i + 1 : j]),
                "marker": marker.group(1) if marker else None,
                "reason": marker.group(2) if marker else None,
            }
        )
        i = j + 1
    return out


def _pages() -> list[pathlib.Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


README_PY = [b for b in blocks(README) if b["lang"] == "python"]
DOCS_PY = [(p, b) for p in sorted(DOCS.glob("*.md")) for b in blocks(p) if b["marker"] == "runnable"]


@pytest.fixture
def vlm_without_training(monkeypatch):
    """``zoo.llava_dino_smol`` as the README calls it, on an untrained projector when the trained
    one is not cached (training takes about an hour)."""
    from prunekit import zoo
    from prunekit.assets import cache_dir
    from prunekit.zoo.llava_dino_smol import Recipe, assemble

    real = zoo.llava_dino_smol

    def load(*args, **kwargs):
        recipe = kwargs.get("recipe", Recipe())
        if (cache_dir("llava-dino-smol") / f"projector-{recipe.key()}.safetensors").exists():
            return real(*args, **kwargs)
        return assemble()

    monkeypatch.setattr(zoo, "llava_dino_smol", load)


def _run(code: str, where: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)  # blocks that write (bench results, checkpoints) write here
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, where, "exec"), namespace)
    return namespace


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, marks=pytest.mark.slow) if b["marker"] == "slow" else b for b in README_PY],
    ids=[f"README.md:{b['line']}" for b in README_PY],
)
def test_readme_python_block_runs(block, tmp_path, monkeypatch, vlm_without_training):
    if block["marker"] == "no-test":
        pytest.skip(f"marked no-test: {block['reason']}")
    _run(block["code"], f"README.md:{block['line']}", tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize(
    "page,block", DOCS_PY, ids=[f"{p.relative_to(ROOT)}:{b['line']}" for p, b in DOCS_PY]
)
def test_docs_runnable_block_runs(page, block, tmp_path, monkeypatch, vlm_without_training):
    _run(block["code"], f"{page.relative_to(ROOT)}:{block['line']}", tmp_path, monkeypatch)


def test_every_python_block_in_the_docs_compiles():
    """Fragments (blocks that use names from their page's text) are not run, but must be Python."""
    n = 0
    for page in _pages():
        for b in blocks(page):
            if b["lang"] == "python":
                compile(b["code"], f"{page.name}:{b['line']}", "exec")
                n += 1
    assert n >= 15


def test_readme_has_python_blocks_and_docs_have_runnable_ones():
    """The parametrized tests above cannot pass by finding nothing."""
    assert len(README_PY) >= 5
    assert len(DOCS_PY) >= 3


def test_markers_carry_a_reason_and_precede_a_block():
    for page in _pages():
        lines = page.read_text().splitlines()
        marked = {b["line"] for b in blocks(page) if b["marker"]}
        for n, line in enumerate(lines, 1):
            if not line.strip().startswith("<!--") or not re.search(r"no-test|slow|runnable", line):
                continue
            m = MARKER.match(line.strip())
            assert m, (
                f"{page.name}:{n}: malformed marker {line!r}; "
                "use <!-- no-test: reason -->, <!-- slow: reason --> or <!-- runnable -->"
            )
            if m.group(1) in ("no-test", "slow"):
                assert len(m.group(2)) >= 10, f"{page.name}:{n}: a {m.group(1)} marker must say why: {line!r}"
            nxt = next((k for k in range(n, len(lines)) if lines[k].strip()), None)
            assert nxt is not None and lines[nxt].startswith("```") and nxt + 1 in marked, (
                f"{page.name}:{n}: marker not followed by a code block"
            )


def test_no_test_marker_is_seen_by_the_block_parser(tmp_path):
    page = tmp_path / "x.md"
    page.write_text(
        "text\n\n<!-- no-test: needs the hub -->\n\n```python\nraise SystemExit\n```\n```bash\nls\n```\n"
    )
    got = blocks(page)
    assert [(b["lang"], b["marker"], b["reason"]) for b in got] == [
        ("python", "no-test", "needs the hub"),
        ("bash", None, None),
    ]


def _prunekit_lines():
    for page in _pages():
        for b in blocks(page):
            if b["lang"] in ("bash", "sh", "shell", "console"):
                for k, line in enumerate(b["code"].splitlines()):
                    words = shlex.split(line, comments=True)
                    if words[:1] == ["prunekit"]:
                        yield f"{page.name}:{b['line'] + 1 + k}", words[1:]


PRUNEKIT_LINES = list(_prunekit_lines())


@pytest.mark.parametrize("where,argv", PRUNEKIT_LINES, ids=[w for w, _ in PRUNEKIT_LINES])
def test_prunekit_commands_in_docs_parse(where, argv):
    from prunekit.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `prunekit {shlex.join(argv)}` does not parse (exit {e.code})")


def _generated_pages() -> set[str]:
    """Paths (relative to docs/) that the mkdocs hooks add at build time."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import docgen

    pages = {"taxonomy.md", "methods/index.md", "results/index.md"}
    pages |= {f"methods/{m.name}.md" for m in docgen.methods()}
    pages |= {f"results/{p.name}" for p in docgen.RESULTS.glob("*")}
    return pages


def test_relative_links_point_at_files():
    generated = _generated_pages()
    bad = []
    for page in _pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#")[0]
            full = (page.parent / path).resolve()
            rel = os.path.relpath(full, DOCS)
            if not full.exists() and rel not in generated:
                bad.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not bad, f"broken links: {bad}"
