"""What the tests of the Markdown documentation (README.md, docs/) share: its code blocks, and
running them as a reader would.

A block is fenced at the start of a line, ```` ```python ```` or ```` ```pycon ````. The
untitled `python` and `pycon` blocks of one file form one session: they run in order in one
namespace, the `python` ones executed, the `pycon` ones (outputs and error messages) checked
as doctests. A titled block (```` ```python title="multiprocess.py" ````) is a file of its
own, for another process: it is not part of the session, and its test runs it as a file."""

import doctest
import re
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_BLOCK = re.compile(r'^```(\w+)(?: title="([^"]*)")?\n(.*?)^```$', re.MULTILINE | re.DOTALL)


class Block(NamedTuple):
    kind: str  # the fence's language
    source: str
    line: int  # of the block's first line of code, 1-based
    title: str | None


def code_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [
        Block(m.group(1), m.group(3), text.count("\n", 0, m.start()) + 2, m.group(2))
        for m in _BLOCK.finditer(text)
    ]


def titled_block(path: Path, title: str) -> str:
    (source,) = [block.source for block in code_blocks(path) if block.title == title]
    return source


def session(path: Path) -> list[Block]:
    """The blocks a reader runs in order: the untitled `python` and `pycon` ones."""
    return [b for b in code_blocks(path) if b.kind in ("python", "pycon") and b.title is None]


def run_session(path: Path) -> None:
    """Runs `path`'s session (see the module docstring); fails on the first `python` block that
    raises, or after the doctests with the number of `pycon` examples that failed."""
    namespace: dict = {"__name__": path.stem}
    parser = doctest.DocTestParser()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags)
    for block in session(path):
        if block.kind == "python":
            exec(compile(block.source, f"{path}:{block.line}", "exec"), namespace)
        else:
            name = f"{path.name}:{block.line}"
            test = parser.get_doctest(block.source, namespace, name, str(path), block.line)
            runner.run(test, clear_globs=False)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} example(s) of {path} failed; see the output"
