"""WikiText-2 from Hugging Face-layout parquet: tokenise, build the vocabulary, cache, batchify.

The pipeline is the classic word-level one (PyTorch's word_language_model, Shazeer et al. 2017):
each line is split on whitespace and ends with ``<eos>``; the vocabulary comes from the train
split. Numericalised splits are cached on disk keyed by the parquet files' content and the
tokeniser settings, so a study tokenises 2M words once, not once per trial.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from harness.config import DataConfig, SpecError

SPLITS = ("train", "validation", "test")
PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
CACHE_ENV = "MOE_HARNESS_CACHE"
CACHE_VERSION = 1
HF_URL = "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/{name}/{split}-00000-of-00001.parquet"
# sha256 of the Hugging Face parquet files (Salesforce/wikitext), checked after download.
KNOWN_SHA256 = {
    "wikitext-2-v1": {
        "train": "93e9527b9468149d061eac1bd5425de6749716a14b941132c2e5e0bffe482b1b",
        "validation": "6d9bf6a66d35b2ba77736420ea2b7dc5626c4dd22ca6314501883ffab2374ce4",
        "test": "96a67bd0f276a641d8084977100f397cd93f2ccde732e2ca93a2a6a4ab670cbe",
    },
}


class DataError(SpecError):
    """Missing, corrupt or unreadable data; the message names the file."""


@dataclass(frozen=True)
class Corpus:
    """Numericalised splits (1-D int64 tensors) and the vocabulary (index -> word).

    Word ids are sorted by train frequency after the specials, which the adaptive softmax needs.
    """

    name: str
    vocab: list[str]
    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    digest: str  # of the split files' content and the tokeniser settings: the cache's key
    sha256: dict[str, str] = field(default_factory=dict)  # split -> its parquet file's sha256

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def train_counts(self) -> torch.Tensor:
        """How often each word id occurs in the train split: (vocab_size,) int64."""
        return torch.bincount(self.train, minlength=self.vocab_size)

    def split(self, name: str) -> torch.Tensor:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    def summary(self) -> dict[str, int | str]:
        return {
            "name": self.name,
            "digest": self.digest,
            "vocab_size": self.vocab_size,
            **{f"{s}_tokens": int(self.split(s).numel()) for s in SPLITS},
        }


def split_files(config: DataConfig) -> dict[str, Path]:
    folder = config.root() / config.name
    return {split: folder / f"{split}-00000-of-00001.parquet" for split in SPLITS}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(
            f"{path}: data file not found (set $MOE_HARNESS_DATA or data.path, or run 'harness data download')"
        )
    try:
        table = pq.read_table(path, columns=["text"])
    except Exception as error:  # pyarrow raises several types for truncated or foreign files
        first_line = (str(error).strip().splitlines() or [""])[0][:200]  # pyarrow lists the whole schema
        raise DataError(
            f"{path}: not a readable parquet file with a 'text' column ({type(error).__name__}: {first_line})"
        ) from None
    return table.column("text").to_pylist()


def tokenize(lines: list[str]) -> list[str]:
    words: list[str] = []
    for line in lines:
        words.extend(line.split())
        words.append(EOS)
    return words


def build_vocab(train_words: list[str], min_freq: int, max_vocab: int | None) -> list[str]:
    counts = Counter(train_words)
    for special in (PAD, UNK, EOS):
        counts.pop(special, None)
    ranked = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
    specials = [PAD, UNK, EOS]
    if max_vocab is not None:
        ranked = ranked[: max(0, max_vocab - len(specials))]
    return specials + ranked


def _numericalise(words: list[str], index: dict[str, int]) -> np.ndarray:
    unk = index[UNK]
    return np.fromiter((index.get(w, unk) for w in words), dtype=np.int32, count=len(words))


def cache_dir() -> Path:
    """Where the harness keeps what it can rebuild: tokenised splits, an empty store of this MLflow version."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moe-harness")


def load_corpus(config: DataConfig) -> Corpus:
    """Load (from cache when possible) the numericalised splits for ``config``, caching them on a miss."""
    corpus = read_corpus(config)
    save_to_cache(corpus)
    return corpus


def _cache_file(name: str, digest: str) -> Path:
    return cache_dir() / f"{name}-{digest}.npz"


def read_corpus(config: DataConfig) -> Corpus:
    """The numericalised splits for ``config``, from the cache or tokenised here; writes nothing (a command that may
    still refuse, e.g. a rerun on changed data, must leave no new cache file behind)."""
    files = split_files(config)
    hashes = {}
    for split, path in files.items():
        if not path.is_file():
            raise DataError(
                f"{path}: data file not found (set $MOE_HARNESS_DATA or data.path, or run 'harness data download')"
            )
        hashes[split] = _sha256(path)
    key = json.dumps({"v": CACHE_VERSION, "files": hashes, "min_freq": config.min_freq, "max_vocab": config.max_vocab})
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cached = _cache_file(config.name, digest)
    if cached.is_file():
        try:
            with np.load(cached) as saved:
                arrays = {s: torch.from_numpy(saved[s].astype(np.int64)) for s in SPLITS}
                vocab = saved["vocab"].tolist()
            return Corpus(config.name, vocab, arrays["train"], arrays["validation"], arrays["test"], digest, hashes)
        except Exception:  # torn or foreign (BadZipFile, EOFError, ...): a miss, rebuilt below, never trusted
            cached.unlink(missing_ok=True)
    words = {split: tokenize(read_lines(path)) for split, path in files.items()}
    vocab = build_vocab(words["train"], config.min_freq, config.max_vocab)
    index = {w: i for i, w in enumerate(vocab)}
    arrays = {split: torch.from_numpy(_numericalise(w, index).astype(np.int64)) for split, w in words.items()}
    return Corpus(config.name, vocab, arrays["train"], arrays["validation"], arrays["test"], digest, hashes)


def save_to_cache(corpus: Corpus) -> None:
    """Cache ``corpus``'s splits (int32, as tokenised) unless the cache holds them already."""
    cached = _cache_file(corpus.name, corpus.digest)
    if cached.is_file():
        return
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp.npz")
    arrays = {split: corpus.split(split).numpy().astype(np.int32) for split in SPLITS}
    np.savez(partial, vocab=np.array(corpus.vocab), **arrays)
    os.replace(partial, cached)  # atomic: concurrent trials never read a half-written cache


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``batch_size`` contiguous rows: ``[batch, n]``."""
    n = stream.numel() // batch_size
    if n < 2:
        raise DataError(f"split of {stream.numel()} tokens is too short for batch size {batch_size}")
    return stream[: n * batch_size].view(batch_size, n)


def get_batch(rows: torch.Tensor, start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input/target windows ``[batch, <=seq_len]`` starting at column ``start`` (truncated BPTT)."""
    length = min(seq_len, rows.size(1) - 1 - start)
    return rows[:, start : start + length], rows[:, start + 1 : start + 1 + length]


def download(name: str, dest: Path) -> list[Path]:
    """Fetch the three parquet files from the Hugging Face hub and verify their sha256."""
    folder = dest / name
    folder.mkdir(parents=True, exist_ok=True)
    fetched = []
    for split in SPLITS:
        target = folder / f"{split}-00000-of-00001.parquet"
        partial = target.with_suffix(".part")
        urllib.request.urlretrieve(HF_URL.format(name=name, split=split), partial)
        expected = KNOWN_SHA256.get(name, {}).get(split)
        if expected and _sha256(partial) != expected:
            partial.unlink()
            raise DataError(f"{target}: checksum mismatch after download (expected sha256 {expected})")
        read_lines(partial)  # the raw variant has no pinned checksum: at least it must parse
        os.replace(partial, target)
        fetched.append(target)
    return fetched
