"""Encode, decode and inspect model files with the fedsqueeze codec (and make the
calibration file of a calibrated encode from a model and text).

Examples::

    fedsqueeze codec encode model.pt model.fsq --spec prune=global:0.9,quant=4
    fedsqueeze codec encode new.pt delta.fsq --base old.pt --spec int8
    fedsqueeze codec decode model.fsq restored.pt
    fedsqueeze codec inspect model.fsq --original model.pt
    fedsqueeze codec presets
    fedsqueeze codec warm
    fedsqueeze codec calibrate MODEL_DIR corpus.txt calib.safetensors
    fedsqueeze codec encode model.safetensors model.fsq --spec quant=8,levels=2+2+4 \
        --calibration calib.safetensors

Specs are a preset name (see `fedsqueeze codec presets`) or comma-separated key=value
pairs, each key at most once: prune=none|l1:S|global:S|channel:S|threshold:T, topk=F,
rank=R (low-rank factors of matrices, for updates), quant=none|BITS[:affine|
symmetric|pow2|kmeans|nf4][:tensor|channel|blockB][:fp16|bf16|fp32|dq][:nearest|
stochastic][:hadamard], float=fp32|fp16|bf16, entropy=LEVEL (zstd 0..22, 0 off) or
ans[:LEVEL] (rANS of quantization codes where it beats zstd), targets=PATTERN|PATTERN,
min-ndim=N (0..8), levels=2+2+4 (progressive), grow=S1+S2 (progressive sparsity),
freeze=PATTERN|PATTERN (tensors sent once). The full grammar:
fedsqueeze/codec/spec_text.py; examples: quant=4:nf4:block64, quant=8,levels=2+2+4.

Files are read and written one tensor at a time: .safetensors and zip-format .pt inputs
are memory-mapped, encoded records go to a spool file beside the output, and a decode
maps its output file, so a model larger than memory encodes and decodes. encode runs on
every core (--workers); its bytes do not depend on the number of workers.

An output that is one of the inputs is refused; an existing output is refused
unless --force. Outputs are written atomically, with the usual permissions (a new file
gets 0666 minus the umask, a replaced one keeps its mode). decode writes by extension:
.pt, .pth, .bin (PyTorch) or .safetensors; other extensions are refused.

Non-finite values: a tensor with NaN or Inf (or values its spec cannot hold, such as
beyond fp16's range) is refused, naming it; --allow-nonfinite sends such tensors
losslessly instead, whatever the spec.

Refused with exit status 2: a --base that shares no tensor (name, shape, dtype) with the
model, --base for a file that is not a delta, a key given twice in --spec. A targets=
pattern that matches no tensor is a warning (specs are reused across models).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from fedsqueeze.cli.argtypes import count
from fedsqueeze.errors import ConfigError

if TYPE_CHECKING:  # the heavy modules are imported by the actions, so --help stays fast
    import torch
    from rich.console import Console

    from fedsqueeze.codec import CodecSpec, EncodedModel
    from fedsqueeze.codec.nested_gptq import Calibration

T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``encode``, ``decode``, ``inspect``, ``presets``, ``warm`` and
    ``calibrate``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="codec_command", metavar="ACTION", required=True)
    enc = sub.add_parser("encode", help="compress a state_dict (.pt) or .safetensors file")
    # optional only so that the older `encode --list-presets` needs no dummy arguments
    enc.add_argument(
        "input", nargs="?", help="PyTorch state_dict file or .safetensors file (required)"
    )
    enc.add_argument("output", nargs="?", help="where to write the encoded model (required)")
    enc.add_argument(
        "--spec", default="lossless", help="preset name or key=value list (default: lossless)"
    )
    enc.add_argument("--base", help="encode as a delta against this model file")
    enc.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for stochastic rounding (default 0): each tensor draws from a generator "
        "seeded by it and the tensor's name, so the same seed gives the same output",
    )
    enc.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    enc.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="send tensors with NaN/Inf (or values the spec cannot hold) losslessly "
        "instead of refusing them",
    )
    enc.add_argument(
        "--workers",
        type=count(1),
        default=None,
        help="threads encoding tensors at once (default: every core); the output is the "
        "same for any number",
    )
    enc.add_argument(
        "--calibration",
        metavar="FILE",
        help="with a progressive spec (levels=...): a .safetensors or .pt file of input "
        "moments, weight name -> [cols, cols] matrix sum(x x^T) of that Linear's inputs on "
        "calibration data; those matrices' codes are then chosen by GPTQ at every level, "
        "for a lower output error at every prefix (the decoder needs nothing of it; "
        "README, 'Calibrated codes'). A 1-D entry [rows] names a lookup table (an "
        "embedding) and weighs its rows, e.g. how often calibration text reads each: the "
        "rows then travel in tiers, the most-read refined first (format version 11; "
        "README, 'Row tiers')",
    )
    enc.add_argument(
        "--defer-tiers",
        action="store_true",
        help="with row weights in --calibration, a full model of a dense spec: cut the "
        "least-read band of rows into up to eight tiers and defer each one's base level to "
        "where the rate-distortion order puts it; until then its rows decode to their mean "
        "row, so much smaller prefixes decode (format version 14; README, 'Deferred "
        "tiers'). An entry NAME#tier_costs = [unread, fill] in the calibration file (codec "
        "calibrate --tier-costs writes it) corrects the order for table NAME with costs "
        "measured on held-out text (default 1, 1)",
    )
    enc.add_argument(
        "--calibration-margin",
        type=count(0),
        default=2,
        metavar="N",
        help="how many codes (of the full width) a calibrated code may move from nearest "
        "rounding (default 2; larger helps the coarse prefixes and costs the fine ones; "
        "0: nearest rounding)",
    )
    enc.add_argument(
        "--list-presets",
        action="store_true",
        help="print the presets and exit (same as `fedsqueeze codec presets`)",
    )
    dec = sub.add_parser("decode", help="decompress an .fsq file into a state_dict file")
    dec.add_argument("input", help="encoded model (.fsq)")
    dec.add_argument("output", help="file to write: .pt, .pth, .bin (PyTorch) or .safetensors")
    dec.add_argument("--base", help="the base model, for a delta")
    dec.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    ins = sub.add_parser("inspect", help="per-tensor table of stages, sizes and errors")
    ins.add_argument("input", help="encoded model (.fsq)")
    ins.add_argument("--original", help="the uncompressed model, for max error")
    ins.add_argument("--base", help="the base model, for a delta")
    sub.add_parser("presets", help="list the spec presets and what they stand for")
    sub.add_parser(
        "warm",
        help="compile the codec's kernels into numba's cache now",
        description="Compile every compiled kernel of the codec (numba) now and keep its "
        "machine code in the package's __pycache__, where later processes load it. "
        "Without this, the first encode or decode of a large tensor (64K values or more) "
        "compiles the kernels it uses, up to about a minute on a fresh install; run it "
        "once after installing (an image build, before timing anything). Nothing is "
        "compiled with FEDSQUEEZE_JIT=0 or without numba.",
    )
    cal = sub.add_parser(
        "calibrate",
        help="input moments and row weights from a model and text, for encode --calibration",
        description="Run a Hugging Face model folder over lines of text (offline) and write "
        "what a calibrated progressive encode uses: every Linear's input moments "
        "(weight name -> [cols, cols]) and how often the text reads each row of the input "
        "embeddings (name -> [rows]; rows never read share a small Good-Turing weight). "
        "Give it the text the model will serve: row weights counted on the users' own "
        "text pay far more than generic text (README, 'Row tiers').",
    )
    cal.add_argument("model", help="Hugging Face model folder: config, weights and tokenizer")
    cal.add_argument("text", help="UTF-8 text file, one example per non-blank line")
    cal.add_argument("output", help="file to write: .safetensors, or .pt / .pth / .bin")
    cal.add_argument(
        "--batch", type=count(1), default=32, help="lines per forward pass (default 32)"
    )
    cal.add_argument(
        "--max-length",
        type=count(1),
        default=128,
        help="tokens kept of each line (default 128)",
    )
    cal.add_argument(
        "--prior-text",
        metavar="FILE",
        help="generic text of the model's kind (UTF-8, a line per example): the rows TEXT "
        "never reads share their small weight in proportion to how often this text reads "
        "them (a back-off), so a row common elsewhere is refined before one nothing reads",
    )
    cal.add_argument(
        "--tier-costs",
        action="store_true",
        help="also measure the input embeddings' deferred-tier costs for encode "
        "--defer-tiers (the entry NAME#tier_costs): row weights from the even lines, the "
        "model's mean-pooled output on up to 512 odd lines under three changes of the "
        "table (four more passes over those lines; needs 4 lines or more)",
    )
    cal.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")


def main(args: argparse.Namespace) -> int:
    """Run one codec action."""
    if args.codec_command == "presets" or getattr(args, "list_presets", False):
        return _presets()
    if args.codec_command == "encode":
        return _encode(args)
    if args.codec_command == "decode":
        return _decode(args)
    if args.codec_command == "calibrate":
        return _calibrate(args)
    if args.codec_command == "warm":
        return _warm()
    return _inspect(args)


def _warm() -> int:
    import time

    from fedsqueeze.codec import jit

    start = time.perf_counter()
    if not jit.ready():
        print("compiled kernels are off (FEDSQUEEZE_JIT=0, or numba is not installed)")
        return 0
    jit.warm()
    took = time.perf_counter() - start
    print(f"every codec kernel compiled or loaded from the cache in {took:.1f} s")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from fedsqueeze.calibrate import TIER_COSTS, check_model_dir, read_lines, text_calibration
    from fedsqueeze.statefile import check_readable, save_state, state_format

    model_dir, text = Path(args.model), Path(args.text)
    prior_text = Path(args.prior_text) if args.prior_text is not None else None
    output = _check_output(args.output, [text, prior_text], args.force)
    state_format(output)  # an extension we cannot write: before any work
    check_model_dir(model_dir)
    check_readable(text)
    if prior_text is not None:
        check_readable(prior_text)

    lines = read_lines(text)
    prior = read_lines(prior_text) if prior_text is not None else []
    console = _console()
    shown = [0]

    def progress(done: int, total: int) -> None:
        if done * 10 // total > shown[0] or done == total:
            shown[0] = done * 10 // total
            console.print(f"calibrating: {done:,} of {total:,} lines", highlight=False)
            if done == total and args.tier_costs:
                console.print("measuring tier costs on the held-out lines", highlight=False)

    result = text_calibration(
        model_dir,
        lines,
        batch=args.batch,
        max_length=args.max_length,
        progress=progress,
        prior=prior,
        tier_costs=args.tier_costs,
    )
    _write(output, args.force, lambda overwrite: save_state(result, output, overwrite=overwrite))
    costs = {k: v for k, v in result.items() if k.endswith(TIER_COSTS)}
    tables = sum(1 for k, t in result.items() if t.ndim == 1 and k not in costs)
    linears = len(result) - tables - len(costs)
    console.print(
        f"{text} ({len(lines):,} lines) → {output}: input moments of {linears} "
        f"Linears, row weights of {tables} table(s)",
        highlight=False,
    )
    for name, value in costs.items():
        unread, fill = value.tolist()
        console.print(
            f"tier costs of {name.removesuffix(TIER_COSTS)}: unread rows {unread:.2f}× a read "
            f"row's cost per unit of squared error, at their mean row {fill:.2f}× their "
            "noise's",
            highlight=False,
        )
    return 0


def _presets() -> int:
    from fedsqueeze.cli.console import make_console
    from fedsqueeze.codec import PRESETS
    from fedsqueeze.codec.spec_text import format_spec

    console = make_console()
    for name, spec in PRESETS.items():
        console.print(f"[bold]{name}[/bold]: {format_spec(spec)}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    if args.input is None or args.output is None:
        raise ConfigError("encode needs INPUT and OUTPUT (see fedsqueeze codec encode --help)")
    source, base_path = Path(args.input), _optional(args.base)
    output = _check_output(args.output, [source, base_path], args.force)
    from fedsqueeze.codec import NonFinite
    from fedsqueeze.codec.spec_text import format_spec, parse_spec
    from fedsqueeze.errors import NonFiniteError
    from fedsqueeze.modelfile import encode_file

    spec = parse_spec(args.spec)
    calibration_path = _optional(args.calibration)
    _check_inputs(source, base_path, calibration_path)
    calibration = _calibration(
        calibration_path, args.calibration_margin, spec, defer=args.defer_tiers
    )
    policy = NonFinite.CARRY if args.allow_nonfinite else NonFinite.REFUSE
    try:
        done = _warning_lines(
            lambda: _write(
                output,
                args.force,
                lambda overwrite: encode_file(
                    source,
                    output,
                    spec,
                    base=base_path,
                    seed=args.seed,
                    nonfinite=policy,
                    workers=args.workers,
                    overwrite=overwrite,
                    calibration=calibration,
                ),
            )
        )
    except NonFiniteError as exc:
        advice = "pass --allow-nonfinite to send such tensors losslessly"
        raise NonFiniteError(exc.tensor, exc.reason, advice) from exc
    raw, size = done.raw_bytes, done.nbytes
    _console().print(
        f"{source} → {output}: {raw:,} → {size:,} bytes "
        f"({raw / max(1, size):.1f}× smaller), spec {format_spec(spec)}"
    )
    return 0


def _calibration(
    path: Path | None, margin: int, spec: CodecSpec, defer: bool = False
) -> Calibration | None:
    """The calibration a ``--calibration`` file holds, checked (``None`` without one;
    ``defer``: :attr:`~fedsqueeze.codec.nested_gptq.Calibration.defer`)."""
    if path is None:
        if defer:
            raise ConfigError("--defer-tiers needs row weights in --calibration")
        return None
    if spec.levels is None:
        raise ConfigError("--calibration needs a progressive spec (levels=...)")
    from fedsqueeze.calibrate import TIER_COSTS
    from fedsqueeze.codec.nested_gptq import Calibration
    from fedsqueeze.modelfile import open_model

    with open_model(path) as moments:
        entries = {name: t.detach().clone() for name, t in moments.items()}
    costs = {
        name.removesuffix(TIER_COSTS): t for name, t in entries.items() if name.endswith(TIER_COSTS)
    }
    entries = {name: t for name, t in entries.items() if not name.endswith(TIER_COSTS)}
    hessians = {name: t for name, t in entries.items() if t.dim() != 1}
    rows = {name: t for name, t in entries.items() if t.dim() == 1}
    for name, t in costs.items():
        if t.shape != (2,):
            raise ConfigError(
                f"--calibration {path}: {name}{TIER_COSTS} must hold 2 values (unread, fill)"
            )
    try:
        return Calibration(
            hessians,
            margin=margin,
            rows=rows,
            defer=defer,
            tier_costs={name: (float(t[0]), float(t[1])) for name, t in costs.items()},
        )
    except ValueError as exc:
        raise ConfigError(f"--calibration {path}: {exc}") from exc


def _decode(args: argparse.Namespace) -> int:
    from fedsqueeze.statefile import state_format

    source, base_path = Path(args.input), _optional(args.base)
    output = _check_output(args.output, [source, base_path], args.force)
    fmt = state_format(output)  # an extension we cannot write: before any work
    from fedsqueeze.modelfile import decode_file

    _check_inputs(source, base_path)
    done = _write(
        output,
        args.force,
        lambda overwrite: decode_file(source, output, base=base_path, overwrite=overwrite),
    )
    _console().print(f"{source} → {output}: {done.tensors} tensors ({fmt.value})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from fedsqueeze.codec import decode_state
    from fedsqueeze.statefile import load_state

    source, base_path = Path(args.input), _optional(args.base)
    encoded = _read_encoded(source)
    _check_base_for(encoded, source, base_path)
    base = load_state(base_path) if base_path is not None else None
    original = load_state(args.original) if args.original else None
    decoded = decode_state(encoded, base) if (original is not None) else None
    _print_inspect(_console(), encoded, base, original, decoded)
    return 0


# ---------------------------------------------------------------------- checks
def _optional(path: str | None) -> Path | None:
    return Path(path) if path is not None else None


def _check_output(given: str, inputs: list[Path | None], force: bool) -> Path:
    """The output path, checked before any work: not empty, not an input, not an existing
    file (unless ``force``), in a folder that exists."""
    if not given.strip():
        raise ConfigError("the output path is empty; give a file name")
    output = Path(given)
    for path in inputs:
        if path is not None and _same_file(path, output):
            raise ConfigError(f"{given} is also an input; write the output to another file")
    if output.is_dir():
        raise ConfigError(f"{given} is a directory; give a file name")
    if output.exists() and not force:
        raise ConfigError(f"{given} exists; pass --force to replace it")
    parent = output.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {given}: no such directory {parent}")
    return output


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (same path, a link, or a hard link)."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass  # one does not exist (yet): compare the paths
    return a.resolve() == b.resolve()


def _check_inputs(*paths: Path | None) -> None:
    """Missing or directory inputs, worded alike, before any work."""
    from fedsqueeze.statefile import check_readable

    for path in paths:
        if path is not None:
            check_readable(path)


def _read_encoded(path: Path) -> EncodedModel:
    """An encoded model from ``path``; a missing file is worded as for any input."""
    from fedsqueeze.codec import EncodedModel
    from fedsqueeze.statefile import check_readable

    check_readable(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return EncodedModel.from_bytes(data)


def _check_base_for(encoded: EncodedModel, source: Path, base: Path | None) -> None:
    if base is not None and encoded.base_digest is None:
        raise ConfigError(
            f"{source} is a full model, not a delta: it has no base, drop --base {base}"
        )


def _write(output: Path, force: bool, write: Callable[[bool], T]) -> T:
    """Run ``write(overwrite)``; errors name ``output`` in one line."""
    try:
        return write(force)
    except FileExistsError as exc:  # created while we worked
        raise ConfigError(f"{output} exists; pass --force to replace it") from exc
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename) != output:
            raise  # an input's error: reported as such
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from exc


def _warning_lines(work: Callable[[], T]) -> T:
    """Run ``work``; print each :class:`~fedsqueeze.errors.CodecWarning` as one line."""
    from fedsqueeze.errors import CodecWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CodecWarning)
        result = work()
    for w in caught:
        if issubclass(w.category, CodecWarning):
            print(f"fedsqueeze codec: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return result


# ---------------------------------------------------------------------- output
def _console() -> Console:
    from fedsqueeze.cli.console import make_console

    return make_console()


def _print_inspect(
    console: Console,
    encoded: EncodedModel,
    base: dict[str, torch.Tensor] | None,
    original: dict[str, torch.Tensor] | None,
    decoded: dict[str, torch.Tensor] | None,
) -> None:
    from rich.table import Table

    from fedsqueeze.codec.inspect import describe
    from fedsqueeze.codec.row_tiers import split_state
    from fedsqueeze.codec.spec_text import format_spec

    rows = describe(encoded, base)
    table = Table(title=f"{len(rows)} tensors · spec {format_spec(encoded.spec)}")
    for col in ("tensor", "shape", "stages", "bytes before", "bytes after", "ratio", "max error"):
        table.add_column(col, justify="right" if col.startswith(("bytes", "ratio")) else "left")
    if original is not None and decoded is not None and encoded.splits:
        # a table in row tiers has a row per tier: compare the tiers' rows
        original = split_state(original, encoded.splits)
        decoded = split_state(decoded, encoded.splits)
    for row in rows:
        err = "n/a (pass --original)"
        if original is not None and decoded is not None and row.name in original:
            diff = decoded[row.name].double() - original[row.name].double()
            err = f"{diff.abs().max().item():.3g}" if diff.numel() else "0"
        table.add_row(
            row.name,
            "×".join(map(str, row.shape)) or "scalar",
            row.stages,
            f"{row.raw_bytes:,}",
            f"{row.encoded_bytes:,}",
            f"{row.raw_bytes / max(1, row.encoded_bytes):.1f}×",
            err,
        )
    console.print(table)
    total_raw = sum(r.raw_bytes for r in rows)
    total = encoded.nbytes
    console.print(
        f"total: {total_raw:,} → {total:,} bytes ({total_raw / max(1, total):.1f}×); "
        f"headers and metadata {total - sum(r.payload_bytes for r in rows):,} bytes"
    )
