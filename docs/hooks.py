"""MkDocs hook: the site carries the repository files outside docs/ that its pages show.

Pages link such files by their path in the repository (``../benchmarks/MEASUREMENTS.md``), so the
links also work where the Markdown is read as files (GitHub, an editor). The site carries those
files at their repository path (``benchmarks/MEASUREMENTS.md``), and every relative link is
resolved in the repository and pointed at the file's place in the site, where ``mkdocs build
--strict`` checks it like any other.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
CARRIED = ["benchmarks/MEASUREMENTS.md", *(path.relative_to(ROOT).as_posix() for path in sorted(ROOT.glob("benchmarks/results/*.png")))]
LINK = re.compile(r"(\]\()([^)\s#]+)")  # the path of a Markdown link or image, before any #anchor
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def on_files(files, config):
    for path in CARRIED:
        files.append(File(path, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    in_repo = Path(page.file.abs_src_path).relative_to(ROOT).parent.as_posix()
    in_site = posixpath.dirname(page.file.src_uri) or "."

    def to_site(match: re.Match) -> str:
        target = match.group(2)
        if SCHEME.match(target) or target.startswith("/"):
            return match.group(0)
        path = posixpath.normpath(posixpath.join(in_repo, target))
        path = path.removeprefix("docs/")  # docs/X is X in the site; other files keep their path
        return match.group(1) + posixpath.relpath(path, in_site)

    return LINK.sub(to_site, markdown)
