"""Bytes in, global batches out: a byte tokenizer, three corpora, and batches sharded over `data`.

A corpus can also be tokenised with a Hugging Face checkpoint's tokenizer (`tokenize`): batches then
hold its token ids, and the held-out tokens keep the UTF-8 bytes they cover, so held-out loss can still
be read in bits per byte.

Every row of every batch is a pure function of (seed, step, row), so any process can build exactly
the rows its devices hold (jax.make_array_from_callback asks only for those) and a resumed run sees
the same batches as an uninterrupted one.
"""

from __future__ import annotations

import bisect
import dataclasses
import pathlib
import sysconfig
import zlib

import jax
import numpy as np
from jax.sharding import NamedSharding

from .sharding import Layout, resolve_table

__all__ = [
    "HELDOUT_EVERY",
    "STDLIB_SKIP",
    "encode",
    "decode",
    "Corpus",
    "load_corpus",
    "tokenize",
    "synthetic_markov",
    "window_starts",
    "batch_sharding",
    "check_batch",
    "train_batch",
    "eval_starts",
    "eval_batches",
    "eval_bytes",
]

HELDOUT_EVERY = 20  # pystdlib: one file in 20 is held out (by a hash of its path)
STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(ids) -> str:
    return bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256).decode("utf-8", "replace")


@dataclasses.dataclass
class Corpus:
    name: str
    train: np.ndarray  # uint8 bytes, or int32 token ids
    heldout: np.ndarray  # uint8 bytes, or int32 token ids
    entropy_floor: float | None = None  # nats/byte, known only for the synthetic corpus
    heldout_token_bytes: np.ndarray | None = (
        None  # UTF-8 bytes each held-out token covers; None: tokens are bytes
    )

    def describe(self) -> str:
        if self.heldout_token_bytes is not None:
            return (
                f"{self.name}: {len(self.train):,} train tokens, {len(self.heldout):,} held-out tokens "
                f"({int(self.heldout_token_bytes.sum()):,} bytes)"
            )
        floor = f", entropy floor {self.entropy_floor:.3f} nats/byte" if self.entropy_floor else ""
        return f"{self.name}: {len(self.train):,} train bytes, {len(self.heldout):,} held-out bytes{floor}"


def load_corpus(spec: str = "pystdlib", *, max_bytes: int = 12_000_000, seed: int = 0) -> Corpus:
    """'pystdlib' (default), 'synthetic', or a path to a UTF-8 text file. Errors are one-line ValueErrors."""
    if spec == "pystdlib":
        return _pystdlib(max_bytes)
    if spec == "synthetic":
        return synthetic_markov(seed=seed)
    return _text_file(spec)


def _pystdlib(max_bytes: int) -> Corpus:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not STDLIB_SKIP & set(f.relative_to(root).parts))
    if not files:
        raise ValueError(f"no .py files found under the standard library at {root}; pass --data PATH")
    train, held, size = [], [], 0
    for f in files:
        data = f.read_bytes()
        rel = str(f.relative_to(root))
        (held if zlib.crc32(rel.encode()) % HELDOUT_EVERY == 0 else train).append(data)
        size += len(data)
        if size >= max_bytes:
            break
    join = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    return Corpus("pystdlib", join(train), join(held))


def _text_file(path: str) -> Corpus:
    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(
            f"data file {path!r} does not exist; pass --data pystdlib, synthetic or a UTF-8 text file"
        )
    raw = p.read_bytes()
    if not raw.strip():
        raise ValueError(f"data file {path!r} is empty; give a UTF-8 text file with some content")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data file {path!r} is not UTF-8 text (byte {e.start} is invalid); give a text file"
        ) from None
    if b"\x00" in raw:
        raise ValueError(f"data file {path!r} looks binary (contains NUL bytes); give a UTF-8 text file")
    cut = int(len(raw) * 0.9)
    while cut < len(raw) and raw[cut] & 0xC0 == 0x80:  # not inside a character: both splits stay valid UTF-8
        cut += 1
    return Corpus(p.name, np.frombuffer(raw[:cut], np.uint8), np.frombuffer(raw[cut:], np.uint8))


def tokenize(corpus: Corpus, tokenizer) -> Corpus:
    """`corpus` as token ids of `tokenizer` (a jaxtp.hf.Tokenizer): each split is encoded as one text, without
    special tokens; the held-out tokens keep the bytes they cover (for bits/byte)."""
    train_text, heldout_text = (
        bytes(split).decode("utf-8", "replace") for split in (corpus.train, corpus.heldout)
    )
    train = np.asarray(tokenizer.encode(train_text, add_special_tokens=False), np.int32)
    heldout, token_bytes = _ids_and_bytes(tokenizer, heldout_text)
    return Corpus(corpus.name, train, heldout, heldout_token_bytes=token_bytes)


def _ids_and_bytes(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `text` and the UTF-8 bytes each covers. Tokens split inside a character share its
    character offsets, so token t is given the characters between the furthest end before it and its own
    end: the tokens tile the text and their bytes sum to the bytes encoded."""
    ids, offsets = tokenizer.encode_with_offsets(text)
    ends_T = np.maximum.accumulate(np.array([end for _, end in offsets], np.int64).reshape(-1))
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    char_start_C1 = np.append(np.flatnonzero(raw & 0xC0 != 0x80), len(raw))  # byte offset of every character
    return np.asarray(ids, np.int32), np.diff(char_start_C1[ends_T], prepend=0)


def synthetic_markov(
    seed: int = 0, n_symbols: int = 16, n_bytes: int = 600_000, alpha: float = 0.3
) -> Corpus:
    """A random order-1 Markov chain over `n_symbols` letters with a known entropy rate (nats/byte).

    Transition rows are drawn from Dirichlet(alpha); the entropy rate is sum_i pi_i H(row_i) with pi the
    stationary distribution - the floor a perfect model reaches.
    """
    rng = np.random.default_rng(seed)
    T = rng.dirichlet(np.full(n_symbols, alpha), size=n_symbols)
    evals, evecs = np.linalg.eig(T.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
    pi = pi / pi.sum()
    row_entropy = -np.sum(np.where(T > 0, T * np.log(np.maximum(T, 1e-300)), 0.0), axis=1)
    floor = float(pi @ row_entropy)
    cdf = np.cumsum(T, axis=1).tolist()
    out = bytearray(n_bytes)
    s = int(rng.integers(n_symbols))
    for i, u in enumerate(rng.random(n_bytes).tolist()):  # a sequential chain: plain Python, ~0.5 s
        s = min(bisect.bisect_left(cdf[s], u), n_symbols - 1)
        out[i] = s + ord("a")
    letters = np.frombuffer(bytes(out), np.uint8)
    cut = int(n_bytes * 0.9)
    return Corpus("synthetic", letters[:cut], letters[cut:], entropy_floor=floor)


def window_starts(n_bytes: int, seq_len: int, seed: int, step: int, rows: range) -> np.ndarray:
    """Start offsets of the given rows of batch `step`: each a pure function of (seed, step, row)."""
    if n_bytes < seq_len + 2:
        raise ValueError(f"corpus has {n_bytes} bytes, fewer than one window of seq_len+1={seq_len + 1}")
    return np.array([np.random.default_rng((seed, step, r)).integers(0, n_bytes - seq_len - 1) for r in rows])


def batch_sharding(mesh, rules=None) -> NamedSharding:
    """Where a global batch goes: rows split as the rules table (default megatron) places "batch" - over
    data and fsdp in every preset - each window whole."""
    return Layout(mesh, resolve_table(mesh, rules)).sharding(("batch",))


def check_batch(batch_size: int, mesh, rules=None) -> None:
    """A one-line ValueError unless the batch's rows split evenly (see `batch_sharding`)."""
    split = Layout(mesh, resolve_table(mesh, rules)).split_of("batch")
    if batch_size % split:
        raise ValueError(
            f"global batch {batch_size} is not divisible by the data axis size {split}; use a multiple of {split}"
        )


def train_batch(data: np.ndarray, mesh, batch_size: int, seq_len: int, seed: int, step: int) -> jax.Array:
    """Global [B, S+1] int32 batch for `step`; each process materialises only its own rows."""
    check_batch(batch_size, mesh)

    def rows(index):
        r = index[0]
        starts = window_starts(len(data), seq_len, seed, step, range(*r.indices(batch_size)))
        return np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)[:, index[1]]

    return jax.make_array_from_callback((batch_size, seq_len + 1), batch_sharding(mesh), rows)


def eval_starts(n_tokens: int, batch_size: int, seq_len: int, max_batches: int = 8) -> np.ndarray:
    """Start offsets of the held-out windows `eval_batches` takes: non-overlapping, in order."""
    n_windows = min((n_tokens - 1) // seq_len, batch_size * max_batches) // batch_size * batch_size
    if n_windows == 0:
        raise ValueError(
            f"held-out split has {n_tokens} tokens, too few for one batch of {batch_size} "
            f"windows of {seq_len}; use a larger data file or smaller --batch-size/--seq-len"
        )
    return np.arange(n_windows) * ((n_tokens - seq_len - 1) // n_windows)


def eval_batches(data: np.ndarray, mesh, batch_size: int, seq_len: int, max_batches: int = 8) -> list:
    """Non-overlapping held-out windows, in order, as global batches (same on every mesh)."""
    check_batch(batch_size, mesh)
    starts = eval_starts(len(data), batch_size, seq_len, max_batches)
    out = []
    for b in range(len(starts) // batch_size):

        def rows(index, b=b):
            rs = range(*index[0].indices(batch_size))
            return np.stack(
                [data[starts[b * batch_size + r] : starts[b * batch_size + r] + seq_len + 1] for r in rs]
            ).astype(np.int32)[:, index[1]]

        out.append(jax.make_array_from_callback((batch_size, seq_len + 1), batch_sharding(mesh), rows))
    return out


def eval_bytes(corpus: Corpus, batch_size: int, seq_len: int, max_batches: int = 8) -> int:
    """UTF-8 bytes of the held-out text that the targets of `eval_batches` (tokens 1..S of each window) cover."""
    starts = eval_starts(len(corpus.heldout), batch_size, seq_len, max_batches)
    if corpus.heldout_token_bytes is None:
        return len(starts) * seq_len
    before = np.concatenate([[0], np.cumsum(corpus.heldout_token_bytes)])  # bytes before token t
    return int(np.sum(before[starts + seq_len + 1] - before[starts + 1]))
