"""mkdocs hooks: add the pages generated from the registry (methods, taxonomy) and the bench results
to the site at build time. Nothing is written into the source tree; `mkdocs build --strict` fails on
a broken link in any of them as in the hand-written pages."""

from __future__ import annotations

import pathlib
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree from building the docs
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import docgen  # noqa: E402
from mkdocs.structure.files import File  # noqa: E402


def _generated() -> dict[str, str]:
    pages = {"taxonomy.md": docgen.taxonomy_page(), "methods/index.md": docgen.methods_index()}
    for m in docgen.methods():
        pages[f"methods/{m.name}.md"] = docgen.method_page(m)
    pages["results/index.md"] = docgen.results_index()
    for p in sorted(docgen.RESULTS.glob("*.md")):
        pages[f"results/{p.name}"] = docgen.result_page(p)
    return pages


def on_config(config):
    """Put the generated pages into the nav: `methods/index.md` and `results/index.md` become sections."""
    methods: list = [{"All methods": "methods/index.md"}]
    for family, title in docgen.FAMILY_TITLES.items():  # a section per family, in the registry's order
        pages = [{m.name: f"methods/{m.name}.md"} for m in docgen.methods() if m.family == family]
        if pages:
            methods.append({title: pages})
    results = [{"All results": "results/index.md"}] + [
        {p.stem: f"results/{p.name}"} for p in sorted(docgen.RESULTS.glob("*.md"))
    ]
    nav = []
    for item in config["nav"]:
        ((title, target),) = item.items()
        if target == "methods/index.md":
            item = {title: methods}
        elif target == "results/index.md":
            item = {title: results}
        nav.append(item)
    config["nav"] = nav
    return config


def on_files(files, config):
    for uri, text in _generated().items():
        files.append(File.generated(config, uri, content=text))
    for png in sorted(docgen.RESULTS.glob("*.png")):  # the plots the results pages show
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files
