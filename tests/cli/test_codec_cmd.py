"""`fedsqueeze codec ...` from the command line: happy paths and user errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedsqueeze.cli import main
from fedsqueeze.statefile import load_state


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(32, 16, generator=g), "fc.bias": torch.randn(32, generator=g)}


def test_encode_decode_inspect_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "model.pt"
    torch.save(_model(), src)
    assert (
        main(
            ["codec", "encode", str(src), str(tmp_path / "m.fsq"), "--spec", "prune=l1:0.5,quant=4"]
        )
        == 0
    )
    assert "smaller" in capsys.readouterr().out
    assert (
        main(["codec", "decode", str(tmp_path / "m.fsq"), str(tmp_path / "out.safetensors")]) == 0
    )
    restored = load_state(tmp_path / "out.safetensors")
    assert set(restored) == set(_model())
    assert int((restored["fc.weight"] != 0).sum()) == 256
    assert main(["codec", "inspect", str(tmp_path / "m.fsq"), "--original", str(src)]) == 0
    out = capsys.readouterr().out
    assert "fc.weight" in out and "affine 4-bit" in out and "max error" in out


def test_safetensors_input_and_lossless_delta(tmp_path: Path) -> None:
    old, new = _model(), {k: v + 0.01 for k, v in _model().items()}
    save_file(old, str(tmp_path / "old.safetensors"))
    save_file(new, str(tmp_path / "new.safetensors"))
    assert (
        main(
            [
                "codec",
                "encode",
                str(tmp_path / "new.safetensors"),
                str(tmp_path / "d.fsq"),
                "--base",
                str(tmp_path / "old.safetensors"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "codec",
                "decode",
                str(tmp_path / "d.fsq"),
                str(tmp_path / "n.pt"),
                "--base",
                str(tmp_path / "old.safetensors"),
            ]
        )
        == 0
    )
    got = load_state(tmp_path / "n.pt")
    assert all(torch.equal(got[k], new[k]) for k in new)


@pytest.mark.parametrize(
    "argv",
    [
        ["codec", "encode", "missing.pt", "out.fsq"],
        ["codec", "encode", "{model}", "out.fsq", "--spec", "quant=5"],
        ["codec", "encode", "{model}", "out.fsq", "--spec", "nonsense"],
        ["codec", "decode", "{garbage}", "out.pt"],
        ["codec", "inspect", "{garbage}"],
        ["codec", "encode", "{garbage}", "out.fsq"],
    ],
)
def test_user_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    model = tmp_path / "model.pt"
    torch.save(_model(), model)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"FSQ\x01not really")
    args = [a.format(model=model, garbage=garbage) for a in argv]
    args = [str(tmp_path / a) if a in ("out.fsq", "out.pt") else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedsqueeze codec: error:") and "\n" not in err and "Traceback" not in err


def test_delta_without_base_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(_model(), tmp_path / "a.pt")
    torch.save({k: v + 1 for k, v in _model().items()}, tmp_path / "b.pt")
    assert (
        main(
            [
                "codec",
                "encode",
                str(tmp_path / "b.pt"),
                str(tmp_path / "d.fsq"),
                "--base",
                str(tmp_path / "a.pt"),
            ]
        )
        == 0
    )
    assert main(["codec", "decode", str(tmp_path / "d.fsq"), str(tmp_path / "x.pt")]) == 2
    assert "pass its base" in capsys.readouterr().err


def test_help_and_presets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["codec", "--help"])
    assert exc.value.code == 0
    assert "spec" in capsys.readouterr().out.lower()
    assert main(["codec", "encode", "x", "y", "--list-presets"]) == 0
    assert "prune95-kmeans3" in capsys.readouterr().out
    assert main([]) == 2
