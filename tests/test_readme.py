"""The README's commands run as written on a fresh clone, in order.

Marker: a fenced ```bash block of README.md or docs/**/*.md whose line just above the fence is exactly

    <!-- test: cheap -->

is *cheap*: this test runs it, whole, with ``bash -e -o pipefail``, and it must exit 0. Mark only blocks that take
at most a minute or two on 2 CPU cores; the rest (training, the study, servers, other environments) are not run.

Fresh clone: the repository's files (``git ls-files``: tracked, plus untracked ones not ignored, as a commit would
hold them) copied into a temporary folder, so there is no ``data/``, ``eval/`` or run state, but the shipped
``models/`` weights are there. Its ``.venv`` is a symlink to the environment running this test (what ``bash run.sh
setup`` creates), and ``.venv/bin`` comes first on ``PATH`` (an activated environment), so blocks written with
``python`` or with ``.venv/bin/python`` both work.

Order: the files are read in order (README.md first, then docs/README.md, then the other docs/**/*.md by path) and
their blocks top to bottom. A block that is not run (``bash`` or ``python``) is checked instead: every file or
folder it names by a path inside the repository (``configs/``, ``data/``, ``docs/``, ``eval/``, ``models/``,
``scripts/``, ``benchmarks/``, ``tests/``) must exist at that point, unless the path is what the command writes
(after ``-o``, ``--output``, ``--output_dir``, ``--work_dir``, ``--filepath`` or ``>``) or what an earlier line of the
block wrote: an example that reads
``data/...`` needs an earlier cheap block that writes it. Comments (``# ...``) are not read.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- test: cheap -->"
FENCE = re.compile(r"^```(\w*)\s*$")
REPO_PATH = re.compile(r"(?<![\w./-])(?:\./)?((?:configs|data|docs|eval|models|scripts|benchmarks|tests)/[\w./-]*\w)")
WRITTEN = re.compile(r"(?:^|\s)(?:-o|--output|--output_dir|--work_dir|--filepath|>)\s*[\"']?$")


def code_blocks(path: Path) -> list[dict]:
    """The fenced blocks of a Markdown file: language, first line number, text, cheap (marked) or not."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        start = FENCE.match(lines[i])
        if start is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append({"file": path.relative_to(ROOT).as_posix(), "line": i + 1, "language": start.group(1),
                       "text": "\n".join(lines[i + 1:end]) + "\n", "cheap": i > 0 and lines[i - 1].strip() == MARKER})
        i = end + 1
    return blocks


def paths_read(text: str) -> list[str]:
    """The repository paths a block names, less the ones its commands write (and what a later line reads of them)
    and those in comments."""
    found, written = [], set()
    for line in text.splitlines():
        line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]
        for match in REPO_PATH.finditer(line):
            if WRITTEN.search(line[:match.start()]):
                written.add(match.group(1))
            elif match.group(1) not in written:
                found.append(match.group(1))
    return found


def fresh_clone(dest: Path) -> Path:
    """The repository's files (as a commit would hold them) copied into ``dest``, with ``.venv`` this environment."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() or source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name, follow_symlinks=False)
    (dest / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return dest


def documents() -> list[Path]:
    """README.md, the model card (docs/README.md), then every other Markdown file under docs/, sorted by path."""
    card = ROOT / "docs" / "README.md"
    return [ROOT / "README.md", card, *sorted(p for p in (ROOT / "docs").rglob("*.md") if p != card)]


def test_marker_is_found():
    blocks = code_blocks(ROOT / "README.md")
    assert any(b["cheap"] and b["language"] == "bash" for b in blocks), f"no block of README.md is marked {MARKER}"


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs a virtual environment to stand in for .venv")
def test_readme_commands_run_in_order_on_a_fresh_clone(tmp_path):
    clone = fresh_clone(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PRETERM_")}
    env.update(PATH=f"{clone / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(clone / ".venv"))
    ran = []
    for document in documents():
        for block in code_blocks(document):
            if block["language"] not in ("bash", "python"):
                continue
            where = f"{block['file']} line {block['line']}"
            if not (block["cheap"] and block["language"] == "bash"):
                missing = [p for p in paths_read(block["text"]) if not (clone / p).exists()]
                assert not missing, (f"{where} names {missing}, which a fresh clone does not have at that point (no "
                                     f"earlier block marked {MARKER} writes it):\n{block['text']}")
            else:
                proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block["text"]], cwd=clone, env=env,
                                      capture_output=True, text=True, timeout=1200)
                assert proc.returncode == 0, (f"{where} exited {proc.returncode}:\n{block['text']}\n"
                                              f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                ran.append(where)
    assert ran, f"no block is marked {MARKER}"


def test_a_path_written_by_an_earlier_line_of_the_block_is_not_missing():
    block = ("python -m tool --input eval/a.pt\n"
             "git show HEAD:models/model.pt > eval/a.pt   # writes it\n"
             "python -m tool --weights eval/a.pt --config configs/x.json\n")
    # the first line reads eval/a.pt before the second writes it; the third reads what the second wrote
    assert paths_read(block) == ["eval/a.pt", "models/model.pt", "configs/x.json"]
