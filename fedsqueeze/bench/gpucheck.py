"""`make gpu-check`: the codec on a GPU against a device-to-device copy, CPU/GPU byte
equality, and a short digits simulation with GPU clients, in one table.

What it runs, in one process:

1. **Throughput** at each size (25M, 250M and 1B parameters by default: one fp32 tensor
   of 4096-wide rows): a device-to-device copy (``clone``), then the codec's hot paths
   (:mod:`fedsqueeze.codec.fused`) on the same tensor, timed the same way (median of
   several runs, the device synchronized around each): 8-bit per tensor, block-wise
   4-bit (NF4, blocks of 64), 90% magnitude pruning + block-wise 4-bit, top-k 1% +
   8-bit, rank 8 (randomized SVD on the device) + 8-bit, and the 90% selection alone,
   then its stages ("stage" rows: the band pass, the compaction of the kept mask, the
   gather of the kept values) and the sparse decode's floor (zero-fill + scatter).
   Encode is values → packed codes
   (+ kept indices) on the device; decode is packed codes → dense float32 on the device
   (kept indices given: the position coder and zstd run on the host and are not timed
   here). GB/s count fp32 input bytes; "x copy" is the copy's time over the stage's. Eager
   and ``torch.compile`` rows (``--compile both``).
2. **Equality**: ``encode_state`` of a smaller model on the device against the CPU
   reference, byte for byte, for every deterministic spec (rank is not: an SVD differs
   between devices), and ``decode_state`` on the device against the CPU's values.
   Where Triton imports (CUDA only), the selecting cases and specs again with the
   selection by Triton kernels (:mod:`fedsqueeze.codec.triton_select`, off by default):
   "triton" rows, beside the torch ones.
3. **Simulation**: a short digits sweep (4 IID clients, 2 a round, 3 rounds of 2 epochs,
   fedavg-fp32 and int8) with ``client-gpus = 0.25`` and ``coordinator-device = cuda``
   (needs flwr and Ray); it passes when every arm ends at least 0.2 above its start.

It prints one table and exits 1 on any mismatch or failed step, 0 otherwise (targets
missed are reported, not failures). Without CUDA it says so in one line and exits 2,
unless run as a dry run on the CPU: ``--device cpu --params 1M,4M`` (the same code, the
fused paths forced onto the CPU; the figures then mean nothing for a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["build_parser", "main", "parse_params"]

#: The issue's targets for prune + 4-bit: encode and decode against the copy, at these sizes.
ENCODE_TARGET, DECODE_TARGET = 0.5, 0.6
TARGET_SIZES = (250_000_000, 1_000_000_000)
_WIDTH = 4096
_TARGET_CASE = "prune90+nf4"
EQUALITY_SPECS = (
    "quant=8",
    "quant=8:channel",
    "quant=4:nf4",
    "quant=4:nf4:block64:bf16",
    "quant=4:symmetric:block32",
    "quant=4:block64",
    "quant=8:block64",
    "quant=8:block64:dq",
    "prune=l1:0.9,quant=4:nf4",
    "topk=0.01,quant=8",
    "topk=0.01,quant=4:block64",
)
#: The specs whose bytes the Triton selection could change.
_SELECTING_SPECS = tuple(s for s in EQUALITY_SPECS if s.startswith(("prune", "topk")))
_SUFFIX = {"K": 1_000, "M": 1_000_000, "B": 1_000_000_000, "G": 1_000_000_000}


def parse_params(text: str) -> list[int]:
    """``"25M,250M,1B"`` → ``[25_000_000, 250_000_000, 1_000_000_000]``.

    Raises
    ------
    ValueError
        An empty list, a size that is not a positive count (``K``, ``M``, ``B`` allowed)
        or smaller than 8 rows of 4096 (rank 8 needs them).
    """
    out = []
    for part in (p.strip().upper() for p in text.split(",")):
        if not part:
            continue
        scale = _SUFFIX.get(part[-1], 1)
        digits = part[:-1] if part[-1] in _SUFFIX else part
        try:
            value = float(digits) * scale
        except ValueError:
            raise ValueError(f"--params: {part!r} is not a count like 25M or 1B") from None
        if not value >= 8 * _WIDTH:
            raise ValueError(f"--params: {part!r} is below 8 rows of {_WIDTH} values (32768)")
        out.append(int(value))
    if not out:
        raise ValueError("--params needs at least one size")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m fedsqueeze.bench.gpucheck",
        description=(__doc__ or "").replace("``", "`").replace("**", ""),
        epilog=(
            "examples:\n"
            "  make gpu-check                                  # on a CUDA machine\n"
            "  python -m fedsqueeze.bench.gpucheck --device cpu --params 1M,4M --no-sim\n"
            "exit status: 0 all equal, 1 a mismatch or a failed step, 2 no CUDA device"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"),
        help="where to run (cpu: a dry run of the same logic; default cuda)",
    )  # fmt: skip
    parser.add_argument(
        "--params", default="25M,250M,1B", metavar="N1,N2,...",
        help="tensor sizes of the throughput rows (default 25M,250M,1B)",
    )  # fmt: skip
    parser.add_argument(
        "--reps", type=int, default=5, help="timed runs per figure (median; default 5)"
    )
    parser.add_argument(
        "--compile", default="both", choices=("both", "on", "off"),
        help="torch.compile for the fused kernels: both rows, compiled only or eager only",
    )  # fmt: skip
    parser.add_argument(
        "--equality-params", default="4M", metavar="N",
        help="values of the equality check's largest tensor (default 4M: sampled pruning)",
    )  # fmt: skip
    parser.add_argument(
        "--no-sim", action="store_true", help="skip the digits simulation (needs flwr and Ray)"
    )
    return parser


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    step: str
    case: str
    params: int
    mode: str
    enc_s: float | None = None
    dec_s: float | None = None
    copy_s: float | None = None
    out_bytes: int | None = None
    verdict: str = ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit status (0 ok, 1 mismatch or failure, 2 no CUDA)."""
    args = build_parser().parse_args(argv)
    try:
        sizes = parse_params(args.params)
        eq_size = parse_params(args.equality_params)[0]
    except ValueError as exc:
        print(f"gpucheck: {exc}", file=sys.stderr)
        return 1
    if args.reps < 1:
        print("gpucheck: --reps must be >= 1", file=sys.stderr)
        return 1
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpucheck: no CUDA device (torch.cuda.is_available() is False); nothing measured. "
            "A dry run on the CPU: --device cpu --params 1M,4M"
        )
        return 2
    from fedsqueeze.codec import fused

    device = torch.device(args.device)
    if device.type == "cpu":
        fused.DEVICE_TYPES.add("cpu")  # a dry run: the fused paths on the CPU
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)"
    print(f"gpucheck: torch {torch.__version__}, {name}, sizes {args.params}", flush=True)
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]
    rows: list[Row] = []
    failed = False
    for compiled in modes:
        fused.set_compile(compiled)
        for n in sizes:
            rows += _throughput(device, n, args.reps, "compiled" if compiled else "eager")
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the size's tensors are gone: give their memory back
        if compiled and fused.failed_kernels():
            names = ", ".join(sorted(fused.failed_kernels()))
            print(f"gpucheck: torch.compile failed here on {names}: those ran eager")
    fused.set_compile(None)
    for compiled in modes:
        fused.set_compile(compiled)
        eq_rows = _equality(device, eq_size, "compiled" if compiled else "eager")
        failed |= any(r.verdict != "equal" for r in eq_rows)
        rows += eq_rows
    fused.set_compile(None)
    from fedsqueeze.codec import triton_select

    if device.type == "cuda" and triton_select.available():
        # The selection by the two Triton kernels (off by default until timed here),
        # beside the torch rows above: speed and bytes.
        triton_select.set_enabled(True)
        fused.set_compile(modes[-1])
        try:
            for n in sizes:
                rows += _throughput(device, n, args.reps, "triton", selection_only=True)
                torch.cuda.empty_cache()
            eq_rows = _equality(device, eq_size, "triton", _SELECTING_SPECS)
            failed |= any(r.verdict != "equal" for r in eq_rows)
            rows += eq_rows
            if not triton_select.enabled():
                print("gpucheck: the Triton selection failed here; its rows ran the torch form")
        finally:
            triton_select.set_enabled(None)
            fused.set_compile(None)
    if not args.no_sim:
        sim = _simulation(device)
        failed |= not sim.verdict.startswith("ok")
        rows.append(sim)
    _print_table(rows)
    for line in target_lines(rows):
        print(line)
    print("gpucheck: " + ("MISMATCH or FAILURE (see the table)" if failed else "all equal"))
    return 1 if failed else 0


# ---------------------------------------------------------------------- throughput
def _timer(device: torch.device, reps: int) -> Callable[[Callable[[], Any]], float]:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn: Callable[[], Any]) -> float:
        fn()  # warm-up (and compilation)
        sync()
        times = []
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return run


def _throughput(
    device: torch.device, n: int, reps: int, mode: str, selection_only: bool = False
) -> list[Row]:
    """The copy and every case at ``n`` parameters (``selection_only``: the copy and the
    cases that select, as the Triton rows time them)."""
    import torch

    from fedsqueeze.codec import fused
    from fedsqueeze.codec.kernels import Runs
    from fedsqueeze.codec.lowrank import factorize
    from fedsqueeze.codec.spec import Granularity, QuantScheme, QuantSpec

    timed = _timer(device, reps)
    rows_n = n // _WIDTH
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(rows_n, _WIDTH, generator=gen, device=device).mul_(0.02)
    flat = w.reshape(-1)
    count = flat.numel()
    copy_s = timed(lambda: w.clone())
    q8 = QuantSpec(8)
    nf4 = QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=64)
    blocks = Runs(64)
    out: list[Row] = []

    def dense(q: QuantSpec, runs: Runs | None, label: str) -> None:
        sets = 1 if runs is None else runs.count(count)
        done = fused.quantize_packed(flat, q, runs, sets).checked()
        enc = timed(lambda: fused.quantize_packed(flat, q, runs, sets).checked())
        dec = timed(lambda: fused.dequantize_packed(done.packed, done.qp, count, runs))
        out.append(Row("speed", label, count, mode, enc, dec, copy_s, done.packed.numel()))

    def sparse(sparsity: float, q: QuantSpec, runs: Runs | None, label: str) -> None:
        def encode() -> tuple[torch.Tensor, fused.FusedCodes]:
            idx = fused.magnitude_indices(flat, sparsity)
            values = flat[idx]
            sets = 1 if runs is None else runs.count(values.numel())
            return idx, fused.quantize_packed(values, q, runs, sets).checked()

        idx, done = encode()

        def decode() -> torch.Tensor:
            values = fused.dequantize_packed(done.packed, done.qp, idx.numel(), runs)
            dense_out = torch.zeros(count, dtype=torch.float32, device=device)
            dense_out[idx] = values
            return dense_out

        enc, dec = timed(encode), timed(decode)
        size = done.packed.numel() + idx.numel() * 8
        out.append(Row("speed", label, count, mode, enc, dec, copy_s, size))

    def lowrank() -> None:
        def encode() -> tuple[torch.Tensor, torch.Tensor, fused.FusedCodes]:
            a, b = factorize(w, 8)
            values = torch.cat((a.reshape(-1), b.reshape(-1)))
            return a, b, fused.quantize_packed(values, q8, None).checked()

        a, b, done = encode()
        split = a.numel()

        def decode() -> torch.Tensor:
            v = fused.dequantize_packed(done.packed, done.qp, done.count, None)
            return v[:split].view(a.shape) @ v[split:].view(b.shape)

        enc, dec = timed(encode), timed(decode)
        out.append(Row("speed", "rank8+int8", count, mode, enc, dec, copy_s, done.packed.numel()))

    out.append(Row("speed", "copy (clone)", count, mode, copy_s, copy_s, copy_s, count * 4))
    if not selection_only:
        dense(q8, None, "int8")
        dense(nf4, blocks, "nf4-block64")
    # The selection alone (the indices), to tell its share of the prune row's time.
    select_s = timed(lambda: fused.magnitude_indices(flat, 0.9))
    out.append(Row("speed", "select 90% (indices only)", count, mode, select_s, None, copy_s))
    if not selection_only:
        _stages(flat, timed, copy_s, mode, out)
    sparse(0.9, nf4, blocks, _TARGET_CASE)
    sparse(0.99, q8, None, "topk1%+int8")
    if not selection_only:
        lowrank()
    return out


def _stages(
    flat: torch.Tensor,
    timed: Callable[[Callable[[], Any]], float],
    copy_s: float,
    mode: str,
    out: list[Row],
) -> None:
    """Rows for the 90% selection's stages and the sparse decode's floor, so that a run
    tells where the prune path's time goes: the band pass (one read of the values, both
    masks), the compaction of the kept mask (``nonzero_static``), the gather of the kept
    values, and zero-fill + scatter of 10% of the values into a dense tensor."""
    import torch

    from fedsqueeze.codec import fused_select, pruning

    count = flat.numel()
    lo, hi, _ = fused_select.band_bounds(flat, pruning.count_to_prune(count, 0.9))
    band_s = timed(lambda: fused_select._band_pass(flat, lo, hi))
    out.append(Row("stage", "select: band pass", count, mode, band_s, None, copy_s))
    kept = fused_select._band_pass(flat, lo, hi)[2]
    keep = int(kept.sum())
    compact_s = timed(lambda: fused_select._nonzero_static(kept, keep))
    out.append(Row("stage", "select: compact kept mask", count, mode, compact_s, None, copy_s))
    idx = fused_select._nonzero_static(kept, keep)
    gather_s = timed(lambda: flat[idx])
    out.append(Row("stage", "select: gather kept", count, mode, gather_s, None, copy_s))
    values = flat[idx]

    def scatter() -> torch.Tensor:
        dense = torch.zeros(count, dtype=torch.float32, device=flat.device)
        dense[idx] = values
        return dense

    out.append(Row("stage", "decode: zeros + scatter", count, mode, None, timed(scatter), copy_s))


# ---------------------------------------------------------------------- equality
def _equality(device: torch.device, size: int, mode: str, specs: Sequence[str] = ()) -> list[Row]:
    """``encode_state`` on ``device`` against the CPU reference, per spec (``specs``, or
    :data:`EQUALITY_SPECS`)."""
    import torch

    from fedsqueeze.codec import decode_state, encode_state, fused
    from fedsqueeze.codec.spec_text import parse_spec

    gen = torch.Generator().manual_seed(1)
    rows_n = max(1, size // 1000)
    state = {
        "big.weight": torch.randn(rows_n, 1000, generator=gen) * 0.02,
        "fc.weight": torch.randn(64, 129, generator=gen),
        "fc.bias": torch.randn(64, generator=gen),
        "odd.weight": torch.randn(7, 13, generator=gen),
        "steps": torch.tensor(3),
    }
    base = {k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}
    on_device = {k: v.to(device) for k, v in state.items()}
    base_device = {k: v.to(device) for k, v in base.items()}
    numel = sum(t.numel() for t in state.values())
    out = []
    for text in specs or EQUALITY_SPECS:
        spec = parse_spec(text)
        started = time.perf_counter()
        try:
            types = set(fused.DEVICE_TYPES)
            fused.DEVICE_TYPES.discard("cpu")  # the reference: the CPU's own path
            try:
                reference = encode_state(state, spec, base)
                expected = decode_state(reference, base)
            finally:
                fused.DEVICE_TYPES.clear()
                fused.DEVICE_TYPES.update(types)
            encoded = encode_state(on_device, spec, base_device)
            same_bytes = encoded.to_bytes() == reference.to_bytes()
            decoded = decode_state(reference, base_device, device=device)
            same_values = all(torch.equal(decoded[k].cpu(), v) for k, v in expected.items())
            verdict = "equal" if same_bytes and same_values else (
                f"MISMATCH (bytes {'same' if same_bytes else 'differ'}, "
                f"decoded values {'same' if same_values else 'differ'})"
            )  # fmt: skip
            size_out = len(encoded.to_bytes())
        except Exception as exc:  # a crash is a failed check, reported in the table
            verdict, size_out = f"FAILED: {type(exc).__name__}: {exc}"[:120], 0
        took = time.perf_counter() - started
        out.append(Row("equal", text, numel, mode, took, None, None, size_out, verdict))
    return out


# ---------------------------------------------------------------------- simulation
def _simulation(device: torch.device) -> Row:
    """A short digits sweep with GPU clients and the coordinator on the GPU."""
    started = time.perf_counter()
    gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="gpucheck-") as tmp:
        sets = [
            "name=gpucheck",
            "num-clients=4",
            "clients-per-round=2",
            "num-rounds=3",
            "epochs=2",
            "partitioning=iid",
            "arms=fedavg-fp32,int8",
            "prefix-points=0",
            "links=wifi",
            f"cpus={min(8, os.cpu_count() or 1)}",
            f"client-gpus={0.25 if gpu else 0}",
            f"coordinator-device={device.type}",
            f"output-dir={tmp}",
        ]
        try:
            from fedsqueeze.cli.simulate_cmd import quiet_engines
            from simulations.config import load_config
            from simulations.runner import run_sweep

            quiet_engines(verbose=False)
            config = load_config(None, sets)
            outcome = run_sweep(config, plots=False)
            first = {r.arm: r.accuracy for r in outcome.rows if r.round == 0}
            last = {r.arm: r.accuracy for r in outcome.rows if r.round == config.num_rounds}
            accuracy = ", ".join(f"{k} {first[k]:.3f} -> {v:.3f}" for k, v in last.items())
            # The federation learns: every arm well above where it started.
            ok = len(last) == 2 and all(v >= first[k] + 0.2 for k, v in last.items())
            verdict = f"{'ok' if ok else 'DID NOT LEARN'}: {accuracy}"
        except Exception as exc:  # a crash is a failed check, reported in the table
            verdict = f"FAILED: {type(exc).__name__}: {exc}"[:160]
    took = time.perf_counter() - started
    label = "digits, client-gpus 0.25" if gpu else "digits, CPU clients (dry run)"
    return Row("simulate", label, 0, device.type, took, verdict=verdict)


# ---------------------------------------------------------------------- report
def target_lines(rows: Sequence[Row]) -> list[str]:
    """The issue's targets (prune + 4-bit at 250M and 1B) against the measured rows."""
    lines = []
    for r in rows:
        if r.step != "speed" or r.case != _TARGET_CASE or r.params not in TARGET_SIZES:
            continue
        if r.enc_s is None or r.dec_s is None or r.copy_s is None:
            continue
        enc, dec = r.copy_s / r.enc_s, r.copy_s / r.dec_s
        lines.append(
            f"target {r.case} at {_count(r.params)} ({r.mode}): encode {enc:.2f}x copy "
            f"({'met' if enc >= ENCODE_TARGET else 'MISSED'}, >= {ENCODE_TARGET}), decode "
            f"{dec:.2f}x ({'met' if dec >= DECODE_TARGET else 'MISSED'}, >= {DECODE_TARGET})"
        )
    return lines


def _count(n: int) -> str:
    for suffix, scale in (("B", 1_000_000_000), ("M", 1_000_000), ("K", 1_000)):
        if n >= scale:
            return f"{n / scale:g}{suffix}"
    return str(n)


def _print_table(rows: Sequence[Row]) -> None:
    head = (
        f"{'step':<9}{'case':<27}{'params':>8} {'mode':<9}{'enc ms':>10}{'enc GB/s':>10}"
        f"{'x copy':>8}{'dec ms':>10}{'dec GB/s':>10}{'x copy':>8}{'out MB':>9}  verdict"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = [f"{r.step:<9}{r.case:<27}{_count(r.params) if r.params else '':>8} {r.mode:<9}"]
        for t in (r.enc_s, r.dec_s):
            if t is None:
                cells.append(f"{'':>10}{'':>10}{'':>8}")
                continue
            speed = r.params * 4 / t / 1e9 if r.params and r.step in ("speed", "stage") else None
            ratio = r.copy_s / t if r.copy_s else None
            cells.append(
                f"{t * 1e3:>10.2f}"
                + (f"{speed:>10.1f}" if speed is not None else f"{'':>10}")
                + (f"{ratio:>8.2f}" if ratio is not None else f"{'':>8}")
            )
        cells.append(f"{r.out_bytes / 1e6:>9.2f}" if r.out_bytes is not None else f"{'':>9}")
        print("".join(cells) + f"  {r.verdict}")


if __name__ == "__main__":
    sys.exit(main())
