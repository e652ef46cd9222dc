"""README.md's examples are true: its ```python blocks run, and its ```pycon blocks (outputs
and error messages) are doctests. All blocks share one namespace, in order, as a reader would
run them (`markdown_support`); the titled multi-process script runs in
tests/test_multiprocess.py."""

import markdown_support
from markdown_support import README


def test_readme_has_examples():
    kinds = [block.kind for block in markdown_support.session(README)]
    assert kinds.count("python") >= 2 and kinds.count("pycon") >= 3, kinds


def test_readme_examples_run():
    markdown_support.run_session(README)
