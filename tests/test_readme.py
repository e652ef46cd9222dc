"""README.md's examples are true: its ```python blocks run, and its ```pycon blocks (outputs
and error messages) are doctests. All blocks share one namespace, in order, as a reader would
run them."""

import doctest
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```(python|pycon)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, str, int]]:
    text = README.read_text()
    return [
        (m.group(1), m.group(2), text.count("\n", 0, m.start()) + 2) for m in _BLOCK.finditer(text)
    ]


def test_readme_has_examples():
    kinds = [kind for kind, _, _ in _blocks()]
    assert kinds.count("python") >= 2 and kinds.count("pycon") >= 3, kinds


def test_readme_examples_run():
    namespace: dict = {"__name__": "readme"}
    parser = doctest.DocTestParser()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags)
    for kind, source, line in _blocks():
        if kind == "python":
            exec(compile(source, f"{README}:{line}", "exec"), namespace)
        else:
            test = parser.get_doctest(source, namespace, f"README.md:{line}", str(README), line)
            runner.run(test, clear_globs=False)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0
    assert results.failed == 0, f"{results.failed} README example(s) failed; see the output"
