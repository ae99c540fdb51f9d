from pathlib import Path

import pytest
import torch

from harness.config import DataConfig
from harness.data import DataError, batchify, get_batch, load_corpus, read_lines, tokenize


def test_wikitext2_train_split_matches_the_published_counts(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_HARNESS_DATA", str(shared_data))
    corpus = load_corpus(DataConfig())
    assert corpus.train.numel() == 2_088_628
    assert corpus.validation.numel() == 217_646
    assert corpus.test.numel() == 245_569
    # 33,278 word types in train (incl. <unk> and <eos>), plus the <pad> special.
    assert torch.unique(corpus.train).numel() == 33_278
    assert corpus.vocab_size == 33_279
    assert corpus.vocab[:3] == ["<pad>", "<unk>", "<eos>"]


def test_min_freq_and_max_vocab_shrink_the_vocabulary(tiny_data: Path) -> None:
    full = load_corpus(DataConfig(path=str(tiny_data)))
    pruned = load_corpus(DataConfig(path=str(tiny_data), min_freq=3))
    capped = load_corpus(DataConfig(path=str(tiny_data), max_vocab=100))
    assert pruned.vocab_size < full.vocab_size
    assert capped.vocab_size == 100
    unk = capped.vocab.index("<unk>")
    assert (capped.train == unk).sum() > (full.train == unk).sum()


def test_numericalised_splits_are_cached_and_not_retokenised(
    tiny_data: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_corpus(DataConfig(path=str(tiny_data)))
    monkeypatch.setattr("harness.data.tokenize", lambda lines: pytest.fail("tokenised again despite the cache"))
    second = load_corpus(DataConfig(path=str(tiny_data)))
    assert torch.equal(first.train, second.train) and first.vocab == second.vocab
    assert first.digest == second.digest
    # Different tokeniser settings are a different cache entry.
    monkeypatch.setattr("harness.data.tokenize", tokenize)
    assert load_corpus(DataConfig(path=str(tiny_data), min_freq=2)).digest != first.digest


def test_every_line_ends_with_eos(tiny_data: Path) -> None:
    lines = read_lines(tiny_data / "wikitext-2-v1" / "train-00000-of-00001.parquet")
    words = tokenize(lines)
    assert words.count("<eos>") == len(lines)


def test_batchify_and_get_batch_give_shifted_windows() -> None:
    stream = torch.arange(103)
    rows = batchify(stream, 4)
    assert rows.shape == (4, 25)
    assert torch.equal(rows[1], torch.arange(25, 50))
    x, y = get_batch(rows, 0, 10)
    assert x.shape == y.shape == (4, 10)
    assert torch.equal(y, x + 1)
    x, y = get_batch(rows, 20, 10)  # the last window is shorter
    assert x.shape == (4, 4)


def test_missing_and_corrupt_files_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_HARNESS_DATA")
    with pytest.raises(DataError, match="data file not found"):
        load_corpus(DataConfig(path=str(tmp_path)))
    folder = tmp_path / "wikitext-2-v1"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}-00000-of-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"train-00000-of-00001\.parquet: not a readable parquet file"):
        load_corpus(DataConfig(path=str(tmp_path)))
