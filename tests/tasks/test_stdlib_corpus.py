"""The standard library's docstrings as a labelled corpus: deterministic, de-duplicated, sized."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from fedsqueeze.tasks.stdlib_corpus import (
    EXPECTED_COUNTS_3_11,
    FAMILIES,
    KEY_WORDS,
    MIN_WORDS,
    corpus_counts,
    extract_corpus,
)


def test_extraction_is_deterministic() -> None:
    first = extract_corpus()
    extract_corpus.cache_clear()
    again = extract_corpus()
    assert first is not again and first == again


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the counts are for Python 3.11")
def test_counts_on_python_3_11() -> None:
    counts = corpus_counts(extract_corpus())
    assert counts == EXPECTED_COUNTS_3_11
    assert counts.examples >= 2000 and counts.classes >= 8


def test_near_duplicates_and_short_docstrings_are_dropped() -> None:
    corpus = extract_corpus()
    words = [re.findall("[a-z]+", d.text.lower()) for d in corpus]
    keys = [" ".join(w[:KEY_WORDS]) for w in words]
    assert len(set(keys)) == len(keys)
    assert all(len(w) >= MIN_WORDS for w in words)


def test_splits_are_disjoint_and_every_class_is_in_both() -> None:
    corpus = extract_corpus()
    train = {d.text for d in corpus if not d.test}
    test = {d.text for d in corpus if d.test}
    assert not train & test
    for split in (True, False):
        assert {d.label for d in corpus if d.test is split} == set(range(len(FAMILIES)))


def test_extraction_of_a_tiny_library(tmp_path: Path) -> None:
    for family in FAMILIES:
        (tmp_path / f"{family}.py").write_text('"""x"""\n')
    (tmp_path / "typing.py").write_text(
        '"""The module docstring has enough words."""\n'
        "def f():\n    '''The module docstring has enough words.'''\n"
        "def g():\n    '''Another   docstring,\n    over two lines.'''\n"
    )
    corpus = extract_corpus(tmp_path)
    assert [d.text for d in corpus] == [
        "The module docstring has enough words.",
        "Another docstring, over two lines.",
    ]
    assert {d.label for d in corpus} == {FAMILIES.index("typing")}
    assert {d.module for d in corpus} == {"typing.py"}
