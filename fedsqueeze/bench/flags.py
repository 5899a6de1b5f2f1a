"""The flags of each ``fedsqueeze bench`` benchmark, kept apart from the benchmarks.

``fedsqueeze bench transport --help`` needs the flags and the benchmark's docstring, not
torch or grpc: both come from here (the docstring read from the module's source without
importing it), and the benchmark module itself is imported only to run it. Each
benchmark module re-exports its ``add_arguments`` from here.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path

from fedsqueeze.errors import ConfigError

__all__ = [
    "add_bigmodel_arguments",
    "add_codec_arguments",
    "add_simulate_arguments",
    "add_transport_arguments",
    "check_transport_flags",
    "flower_sizes",
    "module_docstring",
]


def add_codec_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``bench codec``'s flags."""
    parser.add_argument("--seeds", type=int, default=3, help="recipe seeds (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="short schedule, 1 seed, 2 runs (smoke test)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument("--skip-minilm", action="store_true", help="leave out the MiniLM part")
    parser.add_argument(
        "--tensor-mb", type=float, default=100.0, help="size of the timed tensor (default 100)"
    )
    parser.add_argument(
        "--tensor-seed",
        type=int,
        default=0,
        help="torch seed of the timed tensor's values (default 0; seed 2 puts three equal "
        "magnitudes at the 90%% cut of the 100 MB tensor, a tie pruning must break)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timing runs per figure (default 5)")
    parser.add_argument(
        "--blockwise-only",
        action="store_true",
        help="only the block-wise/NF4 section on MiniLM (per-tensor errors, bytes/param)",
    )
    parser.add_argument(
        "--tensor-only",
        action="store_true",
        help="only the big-tensor section: encode/decode throughput of each spec on one "
        "random fp32 tensor of --tensor-mb MB, beside clone() and plain zstd",
    )
    parser.add_argument(
        "--lossless-only",
        action="store_true",
        help="only the lossless section: fedsqueeze beside ZipNN on MiniLM in fp32 and bf16, "
        "full models and deltas (ratio, compress/decompress MB/s; the coders timed turn "
        "by turn, our throughput ÷ ZipNN's per round)",
    )


def add_progressive_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fedsqueeze bench progressive``."""
    parser.add_argument(
        "--skip-minilm", action="store_true", help="leave out the all-MiniLM-L6-v2 part"
    )
    parser.add_argument(
        "--parts",
        metavar="PART,...",
        help="run only these parts: designs, digits, minilm, partwise (default: all); "
        "gptq (only when named): MiniLM first levels, nearest vs GPTQ rounding at byte "
        "budgets, fake quantization (5-10 min); rows (only when named): the same with "
        "bits per row of the word embeddings by calibration use (5-10 min)",
    )
    parser.add_argument(
        "--minilm-curves",
        metavar="SPEC@ORDER[+gptq][+rows[=domain|backoff|test]][+defer];...",
        help="MiniLM curves to draw instead of the built-in list, e.g. "
        "'quant=8:channel:hadamard,levels=2+1+1+1+1+2@weighted' (orders: by-level, squared, "
        "relative, weighted: Fisher sensitivities on calibration sentences); a '+gptq' "
        "suffix ('...@weighted+gptq', or '+gptq4' for a margin of 4 codes) chooses the "
        "codes by GPTQ at every level with input moments on the calibration text; "
        "a '+rows' suffix sends the word embeddings' rows in tiers by how often the "
        "calibration text (every docstring line of the calibration modules) reads them "
        "(format version 11); '+rows=domain' counts the reads on the test modules' other "
        "docstring lines instead (never a test sentence: what a federation's clients would "
        "count on their own text); '+rows=backoff' counts them there too and shares the "
        "unread rows' weight by the calibration text's counts (generic text the server "
        "holds); '+rows=test' counts them on the test sentences themselves "
        "(an upper bound on what row weights buy, not a method); '+defer' (with '+rows') "
        "defers the least-read band, cut into up to eight tiers: until the order sends a "
        "tier's base level its rows decode to their mean row (format version 14), the "
        "order corrected by tier costs measured on the row-weight text held out from "
        "itself (about a minute). A tiered curve also "
        "prints, at 1/8 and 1/16, the cosine "
        "with only the word embeddings from the prefix and with only the rest",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")


def _sizes(text: str) -> list[int]:
    """``25M,250M,1B`` → parameter counts."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    out = []
    for item in (v.strip().upper() for v in text.split(",") if v.strip()):
        try:
            value = float(item[:-1]) * scale[item[-1]] if item[-1] in scale else float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected sizes like 25M,1B, got {text!r}") from None
        if value < 1000:
            raise argparse.ArgumentTypeError(f"{item}: at least 1K parameters")
        out.append(int(value))
    if not out:
        raise argparse.ArgumentTypeError("no size given")
    return out


def add_bigmodel_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fedsqueeze bench bigmodel``."""
    parser.add_argument(
        "--params",
        type=_sizes,
        default=[25 * 10**6, 250 * 10**6],
        metavar="N,N,...",
        help="model sizes in parameters, e.g. 25M,250M,1B (default 25M,250M)",
    )
    parser.add_argument(
        "--specs",
        type=lambda text: [v.strip() for v in text.split(";") if v.strip()],
        metavar="SPEC;SPEC",
        help="specs to measure, ';'-separated: labels of the default list (lossless, fp16, "
        "int8, block4, nf4, prune90-int4, global90-int8, topk10-int4, prune95-kmeans3, "
        "levels2+2+4) or spec texts (default: all of those)",
    )
    parser.add_argument(
        "--layers", type=int, default=8, help="transformer blocks of the model (default 8)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="encoding threads (default: every core)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the model files go (default: the temp dir)"
    )
    parser.add_argument(
        "--dataplane",
        action="store_true",
        help="measure the data plane instead of the codec commands: a server process "
        "serves each model (mapped, encoded into spool files) on 127.0.0.1 and a client "
        "process fetches it into a mapped safetensors file (verified, decoded part by "
        "part); reports each process's peak memory beyond the mapped files",
    )
    parser.add_argument(
        "--via-edge",
        action="store_true",
        help="with --dataplane: go through the coordinator's and the edge's own code "
        "instead of the bare server and client: the coordinator's data plane over its "
        "version store serves each model and its next version, the edge's connector "
        "(what the fedsqueeze mod uses) fetches both (full, then a delta); reports each "
        "process's peak memory beyond its baseline (the coordinator's after it loaded "
        "its versions)",
    )
    parser.add_argument(
        "--spool-dir",
        type=Path,
        default=None,
        help="with --dataplane: where the spool files and the fetched model go (default: "
        "--dir; another disk, or /dev/shm, when one disk cannot hold the model twice)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")


def _client_counts(text: str) -> list[int]:
    try:
        return [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 100,1000, got {text!r}") from None


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``bench simulate``'s flags."""
    parser.add_argument(
        "--clients",
        type=_client_counts,
        default=[100, 1000, 10000],
        metavar="N,N,...",
        help="numbers of virtual clients (default 100,1000,10000)",
    )
    parser.add_argument(
        "--arms",
        default="flower,fedavg-fp32,adaptive",
        help="what to run: flower (plain Flower app), fedavg-fp32, adaptive (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each (default 2)")
    parser.add_argument(
        "--config",
        default="scale",
        metavar="FILE|NAME",
        help="experiment TOML, or a name in simulations/configs/ (default: scale)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key for every run (repeatable)",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=900.0, help="limit per simulation (default 900)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="20 clients, 2 rounds of 2, 1 epoch, once (smoke test)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")


def add_transport_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``bench transport``'s flags."""
    parser.add_argument(
        "--payload-mb",
        type=float,
        default=64.0,
        help="size of the streamed model in MB (default 64)",
    )
    parser.add_argument(
        "--chunk-kib",
        type=int,
        default=1024,
        help="segment and bare chunk size in KiB (default 1024)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per stream (default 5)")
    parser.add_argument(
        "--clients", type=int, default=100, help="concurrent clients of the fan-out (default 100)"
    )
    parser.add_argument(
        "--fanout-mb", type=float, default=2.0, help="size of the fan-out model in MB (default 2)"
    )
    parser.add_argument(
        "--flower-mb",
        default="64,512",
        metavar="MB[,MB...]",
        help="model sizes in MB sent through Flower's own path (a SuperLink, a SuperNode "
        "and `flwr run` on loopback) and through the data plane, side by side "
        "(default 64,512; 'none' leaves the part out)",
    )
    parser.add_argument(
        "--flower-only",
        action="store_true",
        help="only the Flower part (--flower-mb): no bare stream, resume, fan-out or framing",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")


def flower_sizes(args: argparse.Namespace) -> tuple[float, ...]:
    """``--flower-mb`` as sizes in MB (``none``: no size).

    Raises
    ------
    ConfigError
        Not a comma-separated list of sizes > 0.
    """
    text = str(args.flower_mb)
    if text.strip().lower() == "none":
        return ()
    try:
        sizes = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--flower-mb must be sizes in MB like 64,512, got {text!r}") from None
    if not sizes or not all(v > 0 for v in sizes):  # also refuses nan
        raise ConfigError(f"--flower-mb sizes must be > 0, got {text!r}")
    return sizes


def check_transport_flags(args: argparse.Namespace) -> None:
    """Refuse values the transport benchmark cannot use, naming the flag.

    Raises
    ------
    ConfigError
        A size that is not positive, fewer than one run or client, chunks under 1 KiB.
    """
    for flag, value in (("--payload-mb", args.payload_mb), ("--fanout-mb", args.fanout_mb)):
        if not value > 0:  # also refuses nan
            raise ConfigError(f"{flag} must be > 0, got {value}")
    for flag, value, least in (
        ("--runs", args.runs, 1),
        ("--clients", args.clients, 1),
        ("--chunk-kib", args.chunk_kib, 1),
    ):
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    if args.flower_only and not flower_sizes(args):
        raise ConfigError("--flower-only needs sizes in --flower-mb")


def module_docstring(module_name: str) -> str | None:
    """A module's docstring, read from its source file without importing the module."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).read_text(encoding="utf-8")
    return ast.get_docstring(ast.parse(source), clean=False)
