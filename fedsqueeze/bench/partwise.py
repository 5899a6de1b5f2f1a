"""Peak memory of decoding a model whole (``decode_state``) or part by part (``decode_into``).

Each way runs in a fresh process that first loads the model it decodes into (the edge's
parameters) and reads nothing else; the figure is the process's peak resident memory
beyond that point, as a fraction of the model's size. ``decode_state`` needs the whole
stream in memory and builds a second copy of the model; ``decode_into`` reads the stream
segment by segment from a file and writes into the loaded tensors.

Run by ``fedsqueeze bench progressive``; ``python -m fedsqueeze.bench.partwise MODE
STATE STREAM`` is the child process.
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

State = Mapping[str, torch.Tensor]
SEGMENT_BYTES = 1 << 20


def _rss() -> int:
    """Resident memory now (Linux), in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


class _PeakSampler:
    """Samples the resident memory every millisecond in a thread; keeps the largest."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _segments(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(SEGMENT_BYTES):
            yield chunk


def _warm_up() -> None:
    """One small decode each way first: the process's one-time allocations (allocator
    arenas, torch's operator set-up, zstd contexts) are not the decoder's."""
    from fedsqueeze.codec import EncodedModel, decode_state, encode_state
    from fedsqueeze.codec.spec_text import parse_spec
    from fedsqueeze.codec.streaming import decode_into

    small = {"w.weight": torch.randn(1024, 1024)}
    for spec in ("quant=8:channel", "lossless", "prune=l1:0.9,quant=4"):
        stream = encode_state(small, parse_spec(spec)).to_bytes()[:-4]
        decode_state(EncodedModel.parse_stream(stream))
        decode_into([stream], {"w.weight": torch.zeros(1024, 1024)})


def _child(mode: str, state_path: Path, stream_path: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    from fedsqueeze.codec import EncodedModel, decode_state
    from fedsqueeze.codec.streaming import decode_into

    target = {k: v.clone() for k, v in load_file(str(state_path)).items()}
    _warm_up()
    gc.collect()
    size = sum(t.numel() * t.element_size() for t in target.values())
    before = _rss()
    with _PeakSampler() as sampler:
        if mode == "whole":
            stream = stream_path.read_bytes()
            decoded = decode_state(EncodedModel.parse_stream(stream))
            for name, tensor in decoded.items():
                target[name].copy_(tensor)
            del decoded, stream
        else:
            decode_into(_segments(stream_path), target)
    return {"model_bytes": size, "extra_peak_bytes": sampler.peak - before}


def measure(state: State, spec_text: str) -> dict[str, float | str]:
    """Peak memory beyond the loaded model, whole against part by part, for one spec."""
    from safetensors.torch import save_file

    from fedsqueeze.codec import encode_state
    from fedsqueeze.codec.spec_text import parse_spec

    out: dict[str, float | str] = {"spec": spec_text}
    with tempfile.TemporaryDirectory(prefix="fsq-partwise-") as tmp:
        state_path = Path(tmp) / "model.safetensors"
        stream_path = Path(tmp) / "model.stream"
        save_file({k: v.contiguous() for k, v in state.items()}, str(state_path))
        stream_path.write_bytes(encode_state(state, parse_spec(spec_text)).to_bytes()[:-4])
        out["stream_bytes"] = stream_path.stat().st_size
        for mode in ("whole", "partwise"):
            done = subprocess.run(
                [sys.executable, "-m", "fedsqueeze.bench.partwise", mode, str(state_path),
                 str(stream_path)],
                capture_output=True, text=True, timeout=900, check=True,
            )  # fmt: skip
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            out["model_bytes"] = figures["model_bytes"]
            out[f"{mode}_extra_peak_bytes"] = figures["extra_peak_bytes"]
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = _child(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
    print(json.dumps(result))
