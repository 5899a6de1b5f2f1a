"""`fedsqueeze codec encode --calibration`: calibrated codes of a progressive spec from the
command line (the API is tested in tests/codec/test_calibrated_levels.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedsqueeze.codec import EncodedModel, decode_prefix, decode_state, smallest_prefix
from tests.cli.inproc import run_cli

SPEC = "quant=8,levels=2+2+4"


def _files(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    """A model with a 12×32 Linear weight, and its input moments on correlated inputs."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 32, generator=g)
    mix = torch.randn(32, 32, generator=g)
    inputs = torch.randn(400, 32, generator=g) @ mix  # correlated: GPTQ has work to do
    model = tmp_path / "model.safetensors"
    save_file({"fc.weight": weight, "fc.bias": torch.zeros(12)}, str(model))
    moments = tmp_path / "moments.safetensors"
    save_file({"fc.weight": (inputs.T.double() @ inputs.double()).float()}, str(moments))
    return model, moments, inputs


def _encode(tmp_path: Path, name: str, *flags: str) -> bytes:
    model = _files(tmp_path)[0]
    out = tmp_path / name
    proc = run_cli("codec", "encode", str(model), str(out), "--spec", SPEC, *flags)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def test_calibrated_codes_cut_the_first_levels_output_error(tmp_path: Path) -> None:
    model, moments, inputs = _files(tmp_path)
    plain = _encode(tmp_path, "plain.fsq")
    same = _encode(tmp_path, "zero.fsq", "--calibration", str(moments), "--calibration-margin", "0")
    assert same == plain  # margin 0: nearest rounding
    calibrated = _encode(tmp_path, "gptq.fsq", "--calibration", str(moments))
    assert calibrated != plain
    w = load_file(str(model))["fc.weight"]
    errors = []
    for data in (plain, calibrated):
        encoded = EncodedModel.from_bytes(data)
        first = decode_prefix(data[:-4][: smallest_prefix(encoded)]).state["fc.weight"]
        errors.append(float(((first - w) @ inputs.T).norm()))  # the first level's output
        # the whole stream: 8-bit codes, each within the margin's 2 codes of nearest
        step = float(w.max() - w.min()) / 255
        assert float((decode_state(encoded)["fc.weight"] - w).abs().max()) <= 2.5 * step
    assert errors[1] < errors[0]


@pytest.mark.parametrize(
    ("make", "flags", "wanted"),
    [
        (None, ("--spec", "int8"), "needs a progressive spec"),
        ({"other.weight": torch.eye(32)}, (), "'other.weight', which the model does not have"),
        ({"fc.weight": torch.eye(12)}, (), "is 12×12, but 'fc.weight' has shape (12, 32)"),
        ({"fc.weight": torch.ones(32, 3)}, (), "must be a square matrix"),
        ({"fc.weight": torch.full((32, 32), float("nan"))}, (), "is not finite"),
    ],
)
def test_bad_calibration_is_one_line_and_writes_nothing(
    tmp_path: Path, make: dict[str, torch.Tensor] | None, flags: tuple[str, ...], wanted: str
) -> None:
    model, moments, _ = _files(tmp_path)
    if make is not None:
        save_file(make, str(moments))
    out = tmp_path / "out.fsq"
    argv = ["codec", "encode", str(model), str(out), "--spec", SPEC, "--calibration"]
    proc = run_cli(*argv, str(moments), *flags)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and wanted in lines[-1], proc.stderr
    assert not out.exists()


def test_a_missing_calibration_file_is_named(tmp_path: Path) -> None:
    model, _, _ = _files(tmp_path)
    out = tmp_path / "out.fsq"
    missing = tmp_path / "nowhere.safetensors"
    proc = run_cli(
        "codec", "encode", str(model), str(out), "--spec", SPEC, "--calibration", str(missing)
    )
    assert proc.returncode == 2 and str(missing) in proc.stderr and not out.exists()


def _table_files(tmp_path: Path) -> tuple[Path, Path]:
    """A model with a 200-row lookup table, and row weights that read a few rows often."""
    g = torch.Generator().manual_seed(1)
    model = tmp_path / "table.safetensors"
    save_file(
        {"emb.weight": torch.randn(200, 16, generator=g), "fc.weight": torch.randn(4, 16)},
        str(model),
    )
    counts = torch.zeros(200)
    counts[:40] = torch.arange(40, 0, -1).float() ** 2
    rows = tmp_path / "rows.safetensors"
    save_file({"emb.weight": counts}, str(rows))
    return model, rows


@pytest.mark.parametrize(("flags", "version"), [((), 11), (("--defer-tiers",), 14)])
def test_row_weights_send_a_tables_rows_in_tiers(
    tmp_path: Path, flags: tuple[str, ...], version: int
) -> None:
    model, rows = _table_files(tmp_path)
    out = tmp_path / "tiers.fsq"
    proc = run_cli(
        "codec", "encode", str(model), str(out), "--spec", SPEC, "--calibration", str(rows),
        *flags,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[3] == version
    encoded = EncodedModel.from_bytes(data)
    (split,) = encoded.splits
    assert split.name == "emb.weight" and split.count >= 3
    # deferred: the least-read band cut into eight tiers (more than 8 in all: version 14)
    assert split.deferred == (8 if version == 14 else 0)
    decoded = tmp_path / "decoded.safetensors"
    proc = run_cli("codec", "decode", str(out), str(decoded))
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(decoded))
    want = decode_state(encoded)
    assert set(got) == {"emb.weight", "fc.weight"}
    assert all(torch.equal(got[n], want[n]) for n in got)
    w = load_file(str(model))["emb.weight"]
    assert float((got["emb.weight"] - w).norm() / w.norm()) < 0.02


@pytest.mark.parametrize(
    ("entries", "wanted"),
    [
        ({"emb.weight": torch.ones(199)}, "199 row weights for 'emb.weight'"),
        ({"emb.weight": -torch.ones(200)}, "row weights of 'emb.weight': row weights must be"),
        ({"nowhere.weight": torch.ones(200)}, "'nowhere.weight', which the model does not have"),
        ({"emb.weight": torch.zeros(200)}, "all 0"),
    ],
)
def test_bad_row_weights_are_one_line_and_write_nothing(
    tmp_path: Path, entries: dict[str, torch.Tensor], wanted: str
) -> None:
    model, rows = _table_files(tmp_path)
    save_file(entries, str(rows))
    out = tmp_path / "out.fsq"
    argv = ["codec", "encode", str(model), str(out), "--spec", SPEC, "--calibration", str(rows)]
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and wanted in lines[-1], proc.stderr
    assert not out.exists()


def test_defer_tiers_without_row_weights_is_one_line(tmp_path: Path) -> None:
    model, _, _ = _files(tmp_path)
    out = tmp_path / "out.fsq"
    proc = run_cli("codec", "encode", str(model), str(out), "--spec", SPEC, "--defer-tiers")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--defer-tiers needs row weights" in lines[0], proc.stderr
    assert not out.exists()


def test_tier_costs_in_the_calibration_file_reorder_the_deferred_tier(tmp_path: Path) -> None:
    model, rows = _table_files(tmp_path)
    counts = load_file(str(rows))["emb.weight"]
    smoothed = counts.clone()
    smoothed[counts == 0] = 0.01  # the unread rows weigh a little, as smoothed counts do
    positions: list[int] = []
    for costs in (None, [1e-4, 1.0]):
        entries = {"emb.weight": smoothed}
        if costs is not None:
            entries["emb.weight#tier_costs"] = torch.tensor(costs)
        calib = tmp_path / "calib.safetensors"
        save_file(entries, str(calib))
        out = tmp_path / f"{len(positions)}.fsq"
        proc = run_cli(
            "codec", "encode", str(model), str(out), "--spec", SPEC, "--calibration",
            str(calib), "--defer-tiers",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        encoded = EncodedModel.from_bytes(out.read_bytes())
        late = set(encoded.splits[0].deferred_parts())
        positions.append(
            next(i for i, r in enumerate(encoded.records) if r.level == 0 and r.name in late)
        )
    assert positions[1] > positions[0]  # a low unread cost sends those rows later
    save_file({"emb.weight": smoothed, "emb.weight#tier_costs": torch.ones(3)}, str(calib))
    bad = tmp_path / "bad.fsq"
    proc = run_cli(
        "codec", "encode", str(model), str(bad), "--spec", SPEC, "--calibration", str(calib),
        "--defer-tiers",
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "must hold 2 values" in lines[0]
    assert not bad.exists()
