"""mkdocs hook: adds the pages generated from the code (bench.docs_reference) to the site at build time."""

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]

def _use_this_checkout():
    """This checkout's bench and methods ahead of any installed copy (mkdocs restores sys.path after loading
    hooks, so this runs in each event)."""
    if sys.path[0] != str(ROOT):
        sys.path.insert(0, str(ROOT))


def on_config(config):
    """A registered method missing from the nav's Methods section is appended to it, so a new method's
    generated page is never left out of the site."""
    _use_this_checkout()
    from methods import METHODS

    for entry in config["nav"] or []:
        if isinstance(entry, dict) and "Methods" in entry:
            listed = {next(iter(item.values())) if isinstance(item, dict) else item for item in entry["Methods"]}
            entry["Methods"] += [{name: f"methods/{name}.md"} for name in METHODS.names()
                                 if f"methods/{name}.md" not in listed]
    return config


def on_files(files, config):
    _use_this_checkout()
    from bench.docs_reference import pages

    for path, text in pages(ROOT).items():
        files.append(File.generated(config, path, content=text))
    return files
