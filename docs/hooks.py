"""mkdocs hook: adds the pages generated from the code (bench.docs_reference) to the site at build time, and a
short stand-in for each page another part of the project owns until that page exists."""

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]

# Pages in the nav that their owners write; until they exist the site shows where the subject is covered today.
STAND_INS = {
    "backbones.md": "# Backbones\n\n`model.name=embedded` (default, shipped, offline), `model.path=` a diffusers "
                    "Stable Diffusion 1.x/2.x folder, `model.id=` a hub id from the local cache, "
                    "`model.name=sd21-base-arch` (SD 2.1-base's architecture with random weights, for cost). "
                    "Keys: [configuration reference](reference/config.md#model).\n",
    "cluster.md": "# Running on a cluster\n\n`ray.address=auto` joins a running Ray cluster. Install this package "
                  "(same commit) on every node; the run directory of trained methods must be on storage every "
                  "node reaches. Keys: [configuration reference](reference/config.md#ray).\n",
    "reproduce.md": "# Reproducing the committed numbers\n\nSee [Reports](reports.md) for where a committed number "
                    "comes from and what can move it between machines.\n",
}


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
    for path, text in STAND_INS.items():
        if files.get_file_from_path(path) is None:
            files.append(File.generated(config, path, content=text))
    return files
