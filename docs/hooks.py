"""MkDocs hooks (``hooks:`` in mkdocs.yml): what the site takes from the code and the recorded results when it builds.

* ``<!-- cli-reference -->`` in a page becomes the ``--help`` of every ``postdiff`` command and subcommand, and of
  ``python -m postdiff_onnx``, from their argparse parsers: the reference cannot drift from the code.
* ``docs/index.md`` is README.md, so the home page and the repository's front page say the same.
* The pictures under ``benchmarks/results/`` join the site at that path, so pages show the recorded figures
  without a copy in ``docs/``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _help_sections(parser: argparse.ArgumentParser, level: int) -> list[str]:
    out = [f"{'#' * level} `{parser.prog}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for _, sub in _subcommands(parser):
        out += _help_sections(sub, level + 1)
    return out


def cli_reference() -> str:
    os.environ["COLUMNS"] = "110"  # argparse wraps to the terminal's width: one width for every build
    from postdiff_cli.main import build_parser
    from postdiff_onnx.__main__ import build_parser as onnx_parser

    return "\n".join(_help_sections(build_parser(), 3) + _help_sections(onnx_parser(), 3))


def on_files(files, config):
    for path in sorted((ROOT / RESULTS).glob("*.png")):
        files.append(
            File(f"{RESULTS}/{path.name}", src_dir=str(ROOT), dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"])
        )
    return files


def home_page() -> str:
    """README.md, with its links into ``docs/`` made relative to the site's root: one text for both."""
    return (ROOT / "README.md").read_text().replace("](docs/", "](")


def on_page_markdown(markdown, page, config, files):
    if markdown.startswith("<!-- readme"):
        markdown = home_page()
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", cli_reference())
    return markdown
