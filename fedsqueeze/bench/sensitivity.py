"""Per-tensor sensitivities for the weighted refinement order, from calibration data.

:attr:`~fedsqueeze.codec.level_order.LevelOrder.WEIGHTED` multiplies each tensor's
squared-error gains by a weight the encoder is given. Here the weight is the tensor's
mean diagonal Fisher information of the model's output on calibration inputs:

    F_t = mean over the elements of W_t of  E_v Σ_s (∂(v·y_s)/∂w)²,   v ~ N(0, I)

which is ``‖J_t‖²_F / numel`` summed over the calibration sentences ``s`` (``J_t``: the
Jacobian of the normalised sentence embedding ``y_s`` with respect to ``W_t``), estimated
with ``probes`` random output directions (Hutchinson: ``E‖Jᵀv‖² = ‖J‖²_F``; one
backward pass each for all tensors at once). For noise ``δ`` spread evenly over a
tensor's elements, as the Hadamard rotation (:mod:`fedsqueeze.codec.rotation`) makes
quantization noise, ``E‖J δ‖² = ‖δ‖²·F_t``, and the loss in embedding cosine is half of
it: so ``F_t`` is the cost per unit of squared error the order needs. A tensor the
output never reads (the pooler, which sentence-transformers does not use) gets 0 and
its refinements go last.

Checked against measurement (all-MiniLM-L6-v2, each tensor alone quantized to 3 bits
after rotation, cosine on 128 calibration sentences): predicted and measured cosine
loss per unit of relative squared error agree within 25% on the six tensors measured
(word embeddings 0.112 predicted against 0.136 measured, position embeddings 0.022 /
0.023, token types 0.068 / 0.062, layer-0 query 0.0070 / 0.0067, key 0.0043 / 0.0040,
value 0.018 / 0.015), and span two orders of magnitude across tensors, which the
data-free relative order (the same noise-to-signal ratio for every tensor) cannot see.

Calibration text: the first docstring lines of standard-library modules that are not
among the benchmark's test modules (:data:`CALIBRATION_MODULES`, disjoint from
:data:`~fedsqueeze.bench.progressive.SENTENCE_MODULES`), with any sentence that is also
a test sentence removed. It is the same kind of text (English technical prose about
Python) from other authors and topics; the weights are per tensor (40 numbers for 22.7M
values), averaged over all tokens of 128 sentences, so they describe how the network
uses each matrix, not which sentences were seen.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable

import torch

__all__ = [
    "CALIBRATION_MODULES",
    "calibration_sentences",
    "calibration_text",
    "domain_text",
    "fisher_weights",
    "minilm_fisher",
]

#: Standard-library modules whose docstrings calibrate (none is a test module).
CALIBRATION_MODULES = (
    "abc", "array", "binascii", "bz2", "cmath", "code", "codecs", "colorsys", "compileall",
    "concurrent.futures", "contextvars", "copyreg", "dis", "doctest", "filecmp", "fileinput",
    "ftplib", "getopt", "gettext", "graphlib", "imaplib", "keyword", "linecache", "locale",
    "lzma", "numbers", "optparse", "pdb", "pkgutil", "platform", "plistlib", "poplib",
    "pstats", "py_compile", "pyclbr", "reprlib", "runpy", "sched", "selectors", "shelve",
    "socketserver", "symtable", "sysconfig", "timeit", "trace", "traceback", "tracemalloc",
    "types", "wave", "webbrowser", "zoneinfo", "http.server", "http.cookies", "xml.sax",
    "urllib.request", "multiprocessing", "email.message", "unittest.mock",
)  # fmt: skip


def calibration_sentences(limit: int = 128) -> list[str]:
    """First lines (30 to 200 characters) of public docstrings of
    :data:`CALIBRATION_MODULES`, less every benchmark test sentence; sorted, the first
    ``limit``."""
    from fedsqueeze.bench.progressive import SENTENCE_MODULES, stdlib_sentences

    if set(CALIBRATION_MODULES) & set(SENTENCE_MODULES):
        raise RuntimeError("calibration and test modules overlap")
    test = set(stdlib_sentences(limit=1 << 30))
    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CALIBRATION_MODULES:
            module = importlib.import_module(name)
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                doc = inspect.getdoc(obj) or ""
                first = doc.strip().split("\n", 1)[0].strip()
                if 30 <= len(first) <= 200 and first not in test:
                    found.add(first)
    return sorted(found)[:limit]


def calibration_text() -> list[str]:
    """Every non-blank docstring line of :data:`CALIBRATION_MODULES` (the module's, and
    those of its public functions, classes and their public methods, defined there), less
    every benchmark test sentence; in module order. More text than
    :func:`calibration_sentences` (about 79,000 tokens against 4,700), for what needs
    counts over many tokens: how often each word-embedding row is read (row tiers)."""
    from fedsqueeze.bench.progressive import SENTENCE_MODULES

    if set(CALIBRATION_MODULES) & set(SENTENCE_MODULES):
        raise RuntimeError("calibration and test modules overlap")
    return _docstring_lines(CALIBRATION_MODULES)


def domain_text() -> list[str]:
    """Every non-blank docstring line of the benchmark's *test* modules
    (:data:`~fedsqueeze.bench.progressive.SENTENCE_MODULES`), less every line that is or
    could be a test sentence: text from the same documents as the test sentences, never
    a test sentence itself. It stands for what a federation's clients hold of the text
    the model will embed (their own documents), where :func:`calibration_text` stands
    for generic text of the same kind; about 7,400 lines."""
    from fedsqueeze.bench.progressive import SENTENCE_MODULES

    return _docstring_lines(SENTENCE_MODULES)


def _docstring_lines(modules: tuple[str, ...]) -> list[str]:
    from fedsqueeze.bench.progressive import stdlib_sentences

    test = set(stdlib_sentences(limit=1 << 30))
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            module = importlib.import_module(name)
            docs.append(inspect.cleandoc(module.__doc__ or ""))
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                if getattr(obj, "__module__", None) != module.__name__:
                    continue
                docs.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    for member, value in sorted(vars(obj).items()):
                        doc = getattr(value, "__doc__", None) if callable(value) else None
                        if not member.startswith("_") and doc:
                            docs.append(inspect.cleandoc(doc))
    lines = (line.strip() for doc in docs for line in doc.split("\n"))
    return [line for line in lines if line and line not in test]


def fisher_weights(
    module: torch.nn.Module,
    output: Callable[[], torch.Tensor],
    probes: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Mean diagonal Fisher information of ``output()`` per parameter of ``module``.

    Parameters
    ----------
    module
        The network; its ``named_parameters`` names the result (as its state dict does).
    output
        Runs the calibration inputs through the network with gradients on; returns the
        outputs (any shape).
    probes
        Random output directions (the estimate's variance falls as ``1/probes``).
    seed
        Seed of the directions.

    Returns
    -------
    dict[str, float]
        Name → ``‖∂(v·y)/∂W‖² / numel`` averaged over the probes (0.0 for a parameter the
        output does not depend on).
    """
    if probes < 1:
        raise ValueError(f"probes must be at least 1, got {probes}")
    params = dict(module.named_parameters())
    sums = {name: torch.zeros((), dtype=torch.float64) for name in params}
    g = torch.Generator().manual_seed(seed)
    for _ in range(probes):
        module.zero_grad(set_to_none=True)
        y = output()
        v = torch.randn(y.shape, generator=g, dtype=y.dtype)
        torch.autograd.backward((y * v).sum())
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += p.grad.detach().double().square().sum()
    module.zero_grad(set_to_none=True)
    return {name: float(sums[name]) / probes / max(1, p.numel()) for name, p in params.items()}


def minilm_fisher(sentences: list[str], probes: int = 4) -> dict[str, float] | None:
    """:func:`fisher_weights` of all-MiniLM-L6-v2's normalised sentence embeddings over
    ``sentences`` (keys as in its state dict), or ``None`` without the bench extra."""
    from fedsqueeze.bench.codec import minilm_sentence_model

    loaded = minilm_sentence_model()
    if loaded is None:
        return None
    model, inner = loaded
    features = model.tokenize(sentences)

    def embed() -> torch.Tensor:
        y = model(dict(features))["sentence_embedding"]
        return torch.nn.functional.normalize(y, dim=1)

    return fisher_weights(inner, embed, probes)
