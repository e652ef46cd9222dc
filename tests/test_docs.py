"""The documentation site's examples are true: each page of docs/ is run as README.md is
(`markdown_support`): its ```python blocks in order in one namespace, its ```pycon blocks as
doctests. A titled block there is a copy of the README's block of that title, which
tests/test_multiprocess.py runs."""

import pytest

import markdown_support
from markdown_support import README, ROOT

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def test_the_site_has_examples():
    assert sum(len(markdown_support.session(page)) for page in PAGES) >= 20


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(DOCS)))
def test_page_examples_run(page):
    if markdown_support.session(page):
        markdown_support.run_session(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(DOCS)))
def test_titled_blocks_are_the_readmes(page):
    for block in markdown_support.code_blocks(page):
        if block.title is not None:
            assert block.source == markdown_support.titled_block(README, block.title)
