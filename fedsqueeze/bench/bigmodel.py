"""Large models in bounded memory: encode and decode files of 25M to 1B parameters.

For each size in ``--params`` a synthetic fp32 model is written as a safetensors file,
tensor by tensor in chunks (making it is itself bounded): ``--layers`` transformer
blocks of width ``d`` (attention ``3d×d`` and ``d×d``, MLP ``4d×d`` and ``d×4d``, their
biases, two layer norms), a ``4d×d`` embedding and a final norm, ``d`` a multiple of 32
chosen for the size; values N(0, 0.02²). Then, each in a fresh subprocess:

* ``clone``: every tensor of the mapped file cloned, one at a time (the reference speed:
  reading the model and writing a copy), at the start and at the end of the size;
* per spec, ``encode`` (:func:`fedsqueeze.modelfile.encode_file`, what ``fedsqueeze codec
  encode`` runs) and ``decode`` (:func:`fedsqueeze.modelfile.decode_file` into a
  safetensors file).

Memory is the child's peak anonymous memory beyond its baseline after imports
(:mod:`fedsqueeze.bench.memprobe`: polled every 2 ms from the parent), which leaves out
the mapped input and output; it is given as a percentage of the model's size. Throughput
is model bytes (fp32) per second of the child's work, and its ratio to the mean of the
two clone runs. The lossless rows also check that the decoded file is bit-exact.
The files are deleted at the end.

With ``--dataplane`` each spec goes through the data plane instead, a server process
serving the model and a client process fetching it into a file
(:mod:`fedsqueeze.bench.bigfetch`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_SPECS", "main", "model_shapes", "write_model"]

#: Specs measured by default: every stage family (label → spec text).
DEFAULT_SPECS: dict[str, str] = {
    "lossless": "lossless",
    "fp16": "fp16",
    "int8": "int8",
    "block4": "quant=4:symmetric:block64",
    "nf4": "quant=4:nf4:block64",
    "prune90-int4": "prune90-int4",
    "global90-int8": "prune=global:0.9,quant=8",
    "topk10-int4": "topk10-int4",
    "prune95-kmeans3": "prune95-kmeans3",
    "levels2+2+4": "quant=8,levels=2+2+4",
}
_MB = 1e6
_STD = 0.02


def model_shapes(params: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a transformer-like model of about ``params`` parameters."""
    per_d2 = 12 * layers + 4  # weights; the vectors add O(d)
    d = max(32, round(math.sqrt(params / per_d2) / 32) * 32)
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (4 * d, d))]
    for i in range(layers):
        p = f"blocks.{i}."
        shapes += [
            (p + "ln1.weight", (d,)),
            (p + "ln1.bias", (d,)),
            (p + "attn.qkv.weight", (3 * d, d)),
            (p + "attn.qkv.bias", (3 * d,)),
            (p + "attn.out.weight", (d, d)),
            (p + "attn.out.bias", (d,)),
            (p + "ln2.weight", (d,)),
            (p + "ln2.bias", (d,)),
            (p + "mlp.up.weight", (4 * d, d)),
            (p + "mlp.up.bias", (4 * d,)),
            (p + "mlp.down.weight", (d, 4 * d)),
            (p + "mlp.down.bias", (d,)),
        ]
    shapes += [("final_ln.weight", (d,)), ("final_ln.bias", (d,))]
    return shapes


def write_model(path: Path, shapes: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> int:
    """Write a float32 safetensors file of N(0, 0.02²) values, 4 Mi values at a time;
    returns its parameter count."""
    import torch

    meta: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes:
        size = 4 * math.prod(shape)
        meta[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-(len(head) + 8) % 8)
    gen = torch.Generator().manual_seed(seed)
    with path.open("wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for _name, shape in shapes:
            left = math.prod(shape)
            while left:
                n = min(left, 1 << 22)
                fh.write((torch.randn(n, generator=gen) * _STD).numpy().tobytes())
                left -= n
    return offset // 4


# ------------------------------------------------------------------------- child
def _child(argv: list[str]) -> int:
    """One measured action in this (fresh) process; prints its report as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=("clone", "encode", "decode"))
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path, nargs="?")
    parser.add_argument("--spec", default="lossless")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)

    from fedsqueeze.bench.memprobe import settled_baseline, status_bytes
    from fedsqueeze.codec.spec_text import parse_spec
    from fedsqueeze.modelfile import decode_file, encode_file, open_model

    spec = parse_spec(args.spec)
    # the allocator's first use and the compiled kernels, outside the measured part
    baseline = settled_baseline()
    started = time.perf_counter()
    out_bytes = 0
    if args.action == "clone":
        with open_model(args.source) as state:
            for t in state.values():
                copy = t.clone()
                out_bytes += copy.numel() * copy.element_size()
                del copy
    elif args.action == "encode":
        done = encode_file(
            args.source, args.output, spec, workers=args.workers, overwrite=True, seed=0
        )
        out_bytes = done.nbytes
    else:
        decoded = decode_file(args.source, args.output, overwrite=True)
        out_bytes = decoded.nbytes
    seconds = time.perf_counter() - started
    report = {
        "baseline_anon": baseline,
        "seconds": seconds,
        "out_bytes": out_bytes,
        "hwm": status_bytes("VmHWM"),
    }
    print(json.dumps(report))
    return 0


# ------------------------------------------------------------------------ parent
def _measure(args: list[str]) -> dict[str, Any]:
    from fedsqueeze.bench.memprobe import run_measured

    measured = run_measured(["-m", "fedsqueeze.bench.bigmodel", "--child", *args])
    if measured.returncode != 0:
        last = (measured.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RuntimeError(f"{' '.join(args[:1])} failed: {last}")
    return {**measured.report, "extra": measured.extra, "peak_anon": measured.peak_anon}


def _identical(a: Path, b: Path) -> bool:
    import torch

    from fedsqueeze.modelfile import open_model

    with open_model(a) as x, open_model(b) as y:
        return set(x) == set(y) and all(torch.equal(x[n], y[n]) for n in x)


def run_dataplane(
    sizes: list[int], specs: dict[str, str], layers: int, folder: Path, spool: Path | None
) -> list[dict[str, Any]]:
    """Serve and fetch every spec at every size (:mod:`fedsqueeze.bench.bigfetch`)."""
    from rich.console import Console

    from fedsqueeze.bench.bigfetch import measure

    console = Console(stderr=True)
    rows: list[dict[str, Any]] = []
    for params in sizes:
        model = folder / f"model-{params}.safetensors"
        shapes = model_shapes(params, layers)
        console.print(f"writing a {params:,}-parameter model ({len(shapes)} tensors)…")
        count = write_model(model, shapes)
        raw = 4 * count
        for label, text in specs.items():
            console.print(f"{count:,} parameters · {label} through the data plane…")
            got = measure(model, text, folder if spool is None else spool)
            rows.append(
                {
                    "params": count,
                    "tensors": len(shapes),
                    "spec": label,
                    "spec_text": text,
                    "raw_bytes": raw,
                    **got,
                }
            )
            s, c = got["server"], got["client"]
            console.print(
                f"  server: prepare {s['prepare_seconds']:.1f} s +{100 * s['extra'] / raw:.1f}%;"
                f" client: fetch+decode {c['seconds']:.1f} s +{100 * c['extra'] / raw:.1f}% "
                "of the model beyond the mapped files"
            )
        model.unlink(missing_ok=True)
    return rows


def run_via_edge(
    sizes: list[int], specs: dict[str, str], layers: int, folder: Path, spool: Path | None
) -> list[dict[str, Any]]:
    """Every spec at every size between the coordinator's and the edge's own code
    (:mod:`fedsqueeze.bench.edgefetch`)."""
    from rich.console import Console

    from fedsqueeze.bench.edgefetch import measure_edge

    console = Console(stderr=True)
    rows: list[dict[str, Any]] = []
    for params in sizes:
        model = folder / f"model-{params}.safetensors"
        shapes = model_shapes(params, layers)
        console.print(f"writing a {params:,}-parameter model ({len(shapes)} tensors)…")
        raw = 4 * write_model(model, shapes)
        for label, text in specs.items():
            console.print(f"{raw // 4:,} parameters · {label}: coordinator → edge…")
            got = measure_edge(model, text, folder if spool is None else spool)
            rows.append({"params": raw // 4, "spec": label, "spec_text": text, "raw_bytes": raw})
            rows[-1].update(got)
        model.unlink(missing_ok=True)
    return rows


def _edge_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title="coordinator → edge: peak anonymous memory beyond each baseline")
    for col in ("params", "spec", "coordinator extra", "edge extra", "full s", "delta s"):
        out.add_column(col, justify="left" if col == "spec" else "right")
    for r in rows:
        raw, c, e = r["raw_bytes"], r["coordinator"], r["edge"]
        out.add_row(
            f"{r['params'] / 1e6:,.0f}M",
            r["spec"],
            f"{100 * c['extra'] / raw:.1f}% ({c['extra'] / 1e6:,.0f} MB)",
            f"{100 * e['extra'] / raw:.1f}% ({e['extra'] / 1e6:,.0f} MB)",
            f"{e['seconds'][0]:.1f}",
            f"{e['seconds'][1]:.1f}",
        )
    Console(width=160).print(out)


def run(
    sizes: list[int], specs: dict[str, str], layers: int, folder: Path, workers: int | None
) -> list[dict[str, Any]]:
    """Measure every spec at every size; one row per (size, spec)."""
    from rich.console import Console

    console = Console(stderr=True)
    rows: list[dict[str, Any]] = []
    for params in sizes:
        model = folder / f"model-{params}.safetensors"
        encoded = folder / f"model-{params}.fsq"
        decoded = folder / f"model-{params}.out.safetensors"
        shapes = model_shapes(params, layers)
        console.print(f"writing a {params:,}-parameter model ({len(shapes)} tensors)…")
        count = write_model(model, shapes)
        raw = 4 * count
        largest = max(4 * math.prod(s) for _n, s in shapes)
        clones = [_measure(["clone", str(model)])]
        for label, text in specs.items():
            console.print(f"{count:,} parameters · {label}…")
            flags = ["--spec", text] + (["--workers", str(workers)] if workers else [])
            enc = _measure(["encode", str(model), str(encoded), *flags])
            dec = _measure(["decode", str(encoded), str(decoded)])
            exact = _identical(model, decoded) if label == "lossless" else None
            rows.append(
                {
                    "params": count,
                    "tensors": len(shapes),
                    "largest_tensor_pct": 100 * largest / raw,
                    "spec": label,
                    "spec_text": text,
                    "raw_bytes": raw,
                    "encoded_bytes": enc["out_bytes"],
                    "encode": enc,
                    "decode": dec,
                    "exact": exact,
                }
            )
            row = rows[-1]
            console.print(
                f"  ratio {raw / row['encoded_bytes']:.2f}×, encode {enc['seconds']:.1f} s "
                f"+{100 * enc['extra'] / raw:.1f}%, decode {dec['seconds']:.1f} s "
                f"+{100 * dec['extra'] / raw:.1f}% of the model beyond the mapped files"
            )
            encoded.unlink(missing_ok=True)
            decoded.unlink(missing_ok=True)
        clones.append(_measure(["clone", str(model)]))
        clone_s = sum(c["seconds"] for c in clones) / len(clones)
        for row in rows:
            if row["params"] == count:
                row["clone_seconds"] = [c["seconds"] for c in clones]
                row["clone_mbps"] = raw / _MB / clone_s
        model.unlink(missing_ok=True)
    return rows


def _table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bounded memory: peak anonymous memory beyond the mapped files")
    for col in (
        "params",
        "spec",
        "ratio",
        "enc MB/s",
        "enc ×clone",
        "enc extra",
        "dec MB/s",
        "dec ×clone",
        "dec extra",
        "exact",
    ):
        table.add_column(col, justify="left" if col in ("spec", "exact") else "right")
    for r in rows:
        raw = r["raw_bytes"]
        enc_mbps = raw / _MB / r["encode"]["seconds"]
        dec_mbps = raw / _MB / r["decode"]["seconds"]
        table.add_row(
            f"{r['params'] / 1e6:,.0f}M",
            r["spec"],
            f"{raw / r['encoded_bytes']:.2f}×",
            f"{enc_mbps:,.0f}",
            f"{enc_mbps / r['clone_mbps']:.2f}",
            f"{100 * r['encode']['extra'] / raw:.1f}%",
            f"{dec_mbps:,.0f}",
            f"{dec_mbps / r['clone_mbps']:.2f}",
            f"{100 * r['decode']['extra'] / raw:.1f}%",
            "" if r["exact"] is None else ("yes" if r["exact"] else "NO"),
        )
    Console(width=160).print(table)
    for params in sorted({r["params"] for r in rows}):
        first = next(r for r in rows if r["params"] == params)
        print(
            f"{params:,} params, {first['tensors']} tensors (largest "
            f"{first['largest_tensor_pct']:.1f}% of the model): clone "
            f"{first['clone_mbps']:,.0f} MB/s (runs: "
            + ", ".join(f"{s:.2f} s" for s in first["clone_seconds"])
            + ")"
        )


def main(args: argparse.Namespace) -> int:
    """Run from ``fedsqueeze bench bigmodel`` (flags in :mod:`fedsqueeze.bench.flags`)."""
    from fedsqueeze.codec.spec_text import parse_spec

    specs = DEFAULT_SPECS
    if args.specs:
        specs = {label: DEFAULT_SPECS.get(label, label) for label in args.specs}
    for text in specs.values():
        parse_spec(text)  # a bad spec fails before any model is written
    dataplane = getattr(args, "dataplane", False)
    if not dataplane and getattr(args, "spool_dir", None) is not None:
        raise SystemExit("--spool-dir goes with --dataplane")
    via_edge = getattr(args, "via_edge", False)
    if via_edge and not dataplane:
        raise SystemExit("--via-edge goes with --dataplane")
    folder = Path(tempfile.mkdtemp(prefix="fsq-bigmodel-", dir=args.dir))
    try:
        load = os.getloadavg()
        if dataplane:
            spool = None
            if args.spool_dir is not None:
                spool = Path(tempfile.mkdtemp(prefix="fsq-dataplane-", dir=args.spool_dir))
            try:
                run_rows = run_via_edge if via_edge else run_dataplane
                rows = run_rows(args.params, specs, args.layers, folder, spool)
            finally:
                if spool is not None:
                    shutil.rmtree(spool, ignore_errors=True)
        else:
            rows = run(args.params, specs, args.layers, folder, args.workers)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if via_edge:
        _edge_table(rows)
    elif dataplane:
        from fedsqueeze.bench.bigfetch import table

        table(rows)
    else:
        _table(rows)
    after = os.getloadavg()
    print(
        f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, "
        f"at end {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f}; "
        f"{os.cpu_count()} cores"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    from fedsqueeze.bench.flags import add_bigmodel_arguments

    _parser = argparse.ArgumentParser(description="large models in bounded memory")
    add_bigmodel_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
