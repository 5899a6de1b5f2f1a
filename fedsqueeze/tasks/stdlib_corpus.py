"""A labelled text corpus every machine has offline: the Python standard library's docstrings.

Each example is one docstring (of a module, class, function or method), labelled by the
*module family* it comes from (the top-level package, or the single module, of the standard
library). Nobody in this project wrote it, it needs no download, and it is naturally
non-IID: every source file (a *module*, the example's group) covers a few topics.

Extraction (deterministic; nothing is imported, the sources are parsed with :mod:`ast`):

1. For every family of :data:`FAMILIES`, in that order, the files are ``FAMILY.py`` or every
   ``*.py`` under ``FAMILY/`` outside the test folders (``test``, ``tests``, ``idle_test``),
   sorted by relative path, read as UTF-8 from the running interpreter's standard library
   (``sysconfig.get_paths()["stdlib"]``).
2. In each file, the module, class, function and method docstrings in source order
   (:func:`ast.walk` of the tree, breadth first), cleaned by :func:`ast.get_docstring`;
   whitespace is collapsed to single spaces.
3. A docstring with fewer than :data:`MIN_WORDS` words is dropped (``"Return self."``).
4. Near-duplicates are dropped: the *key* of a docstring is its first :data:`KEY_WORDS`
   lower-cased alphabetic words; only the first docstring with a given key is kept
   (first in the order above, across families).
5. The split is a property of the text, not of the order: an example is in the test split
   when the first byte of the SHA-256 of its text is below ``256 * TEST_FRACTION``, so it is
   fixed, disjoint from the training split and stable if other docstrings come or go.

On Python 3.11.7 (the version here and in CI) this yields the counts in
:data:`EXPECTED_COUNTS_3_11`: 2,588 examples in 10 classes from 142 modules (2,062 train,
526 test; from 81 examples of ``typing`` to 695 of ``tkinter``). Another Python version
gives other counts (the standard library changes).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "EXPECTED_COUNTS_3_11",
    "FAMILIES",
    "KEY_WORDS",
    "MIN_WORDS",
    "TEST_FRACTION",
    "CorpusCounts",
    "Docstring",
    "corpus_counts",
    "extract_corpus",
]

FAMILIES = (
    "asyncio",
    "email",
    "http",
    "importlib",
    "logging",
    "multiprocessing",
    "tkinter",
    "typing",
    "unittest",
    "xml",
)
"""The module families, in label order (label ``i`` is ``FAMILIES[i]``)."""

MIN_WORDS = 5
KEY_WORDS = 32
TEST_FRACTION = 0.2
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_WORD = re.compile(r"[a-z]+")
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class Docstring:
    """One example of the corpus.

    Attributes
    ----------
    text : str
        The cleaned docstring, whitespace collapsed.
    label : int
        Index of its family in :data:`FAMILIES`.
    module : str
        Its source file relative to the standard library, e.g. ``"asyncio/events.py"``.
    test : bool
        Whether it belongs to the test split.
    """

    text: str
    label: int
    module: str
    test: bool


@dataclass(frozen=True)
class CorpusCounts:
    """The sizes of an extracted corpus."""

    examples: int
    train: int
    test: int
    classes: int
    modules: int


EXPECTED_COUNTS_3_11 = CorpusCounts(examples=2588, train=2062, test=526, classes=10, modules=142)
"""What :func:`extract_corpus` yields on Python 3.11.7."""


@functools.lru_cache(maxsize=4)
def extract_corpus(stdlib: Path | None = None) -> tuple[Docstring, ...]:
    """Extract the labelled docstrings as described in the module docstring.

    Parameters
    ----------
    stdlib : Path or None, optional
        The standard library's folder (default: the running interpreter's).

    Returns
    -------
    tuple[Docstring, ...]
        The examples in extraction order. Cached per process.

    Raises
    ------
    FileNotFoundError
        If a family of :data:`FAMILIES` has no source in ``stdlib``.
    """
    root = Path(sysconfig.get_paths()["stdlib"]) if stdlib is None else stdlib
    seen: set[str] = set()
    out: list[Docstring] = []
    for label, family in enumerate(FAMILIES):
        for path in _family_files(root, family):
            module = path.relative_to(root).as_posix()
            for text in _docstrings(path):
                words = _WORD.findall(text.lower())
                key = " ".join(words[:KEY_WORDS])
                if len(words) < MIN_WORDS or key in seen:
                    continue
                seen.add(key)
                out.append(Docstring(text=text, label=label, module=module, test=_is_test(text)))
    return tuple(out)


def corpus_counts(corpus: tuple[Docstring, ...]) -> CorpusCounts:
    """Count the examples, splits, classes and modules of ``corpus``."""
    num_test = sum(d.test for d in corpus)
    return CorpusCounts(
        examples=len(corpus),
        train=len(corpus) - num_test,
        test=num_test,
        classes=len({d.label for d in corpus}),
        modules=len({d.module for d in corpus}),
    )


def _family_files(root: Path, family: str) -> list[Path]:
    single = root / f"{family}.py"
    if single.is_file():
        return [single]
    folder = root / family
    if not folder.is_dir():
        raise FileNotFoundError(f"the standard library in {root} has no {family!r}")
    return sorted(
        (p for p in folder.rglob("*.py") if not _TEST_DIRS & set(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, _DOCUMENTED):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                texts.append(" ".join(doc.split()))
    return texts


def _is_test(text: str) -> bool:
    return hashlib.sha256(text.encode("utf-8")).digest()[0] < int(256 * TEST_FRACTION)
