"""Model files coded one tensor at a time: same bytes and tensors as the in-memory API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedsqueeze.cli import main
from fedsqueeze.codec import EncodedModel, decode_state, encode_state
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import BaseMismatchError, ConfigError, FormatError
from fedsqueeze.modelfile import decode_file, encode_file, open_model
from fedsqueeze.statefile import load_state

SPECS = [
    "lossless",
    "int8",
    "quant=4:nf4:block64",
    "prune=global:0.7,quant=8",
    "quant=8,levels=4+4",
]


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(48, 30, generator=g),
        "a.bias": torch.randn(48, generator=g),
        "h.weight": torch.randn(5, 48, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(3 + seed),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_files_round_trip_as_the_in_memory_api(tmp_path: Path, text: str, suffix: str) -> None:
    state = _state(0)
    source = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        torch.save(state, source)
    else:
        save_file(state, str(source))
    spec = parse_spec(text)
    done = encode_file(source, tmp_path / "m.fsq", spec, seed=0, workers=2)
    data = (tmp_path / "m.fsq").read_bytes()
    # safetensors files keep their tensors in name order: the file's order is the state's
    assert data == encode_state(load_state(source), spec, seed=0).to_bytes()
    assert (done.nbytes, done.tensors) == (len(data), len(state))
    expected = decode_state(EncodedModel.from_bytes(data))
    for out_suffix in (".safetensors", ".pt"):
        out = tmp_path / f"out{out_suffix}"
        decode_file(tmp_path / "m.fsq", out)
        got = load_state(out)
        assert list(got) == list(expected) or set(got) == set(expected)
        for name, t in expected.items():
            assert torch.equal(got[name], t), name


def test_delta_files_with_frozen_tensors(tmp_path: Path) -> None:
    old, new = _state(1), _state(2)
    save_file(old, str(tmp_path / "old.safetensors"))
    save_file(new, str(tmp_path / "new.safetensors"))
    spec = parse_spec("int8,freeze=a.bias")
    encode_file(
        tmp_path / "new.safetensors", tmp_path / "d.fsq", spec, base=tmp_path / "old.safetensors"
    )
    data = (tmp_path / "d.fsq").read_bytes()
    loaded_new, loaded_old = (
        load_state(tmp_path / "new.safetensors"),
        load_state(tmp_path / "old.safetensors"),
    )
    assert data == encode_state(loaded_new, spec, loaded_old).to_bytes()
    decode_file(tmp_path / "d.fsq", tmp_path / "out.safetensors", base=tmp_path / "old.safetensors")
    expected = decode_state(EncodedModel.from_bytes(data), old)
    got = load_state(tmp_path / "out.safetensors")
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    with pytest.raises(BaseMismatchError):
        decode_file(
            tmp_path / "d.fsq", tmp_path / "x.safetensors", base=tmp_path / "new.safetensors"
        )
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_files_raise_one_clear_error(tmp_path: Path) -> None:
    save_file(_state(0), str(tmp_path / "m.safetensors"))
    whole = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[:-10])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for name in ("cut", "junk"):
        with pytest.raises(ConfigError, match="not a readable safetensors file"):
            encode_file(tmp_path / f"{name}.safetensors", tmp_path / "x.fsq", parse_spec("int8"))
    encode_file(tmp_path / "m.safetensors", tmp_path / "m.fsq", parse_spec("int8"))
    data = (tmp_path / "m.fsq").read_bytes()
    (tmp_path / "cut.fsq").write_bytes(data[:-9])
    (tmp_path / "flip.fsq").write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])
    for name in ("cut", "flip"):
        with pytest.raises(FormatError, match="checksum mismatch"):
            decode_file(tmp_path / f"{name}.fsq", tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        decode_file(tmp_path / "m.fsq", tmp_path / "x.txt")
    with pytest.raises(ConfigError, match="encoded model"), open_model(tmp_path / "m.fsq"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "x"))) == []


def test_cli_refuses_bad_files_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_file(_state(0), str(tmp_path / "m.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes()[:-10])
    cut = str(tmp_path / "cut.safetensors")
    assert main(["codec", "encode", cut, str(tmp_path / "x.fsq")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable safetensors file" in err[0]
    same = str(tmp_path / "m.safetensors")
    assert main(["codec", "encode", same, same, "--force"]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert main(["codec", "encode", same, str(tmp_path / "m.fsq"), "--workers", "2"]) == 0
    assert (
        main(["codec", "decode", str(tmp_path / "m.fsq"), str(tmp_path / "m.fsq"), "--force"]) == 2
    )
    assert "is also an input" in capsys.readouterr().err
