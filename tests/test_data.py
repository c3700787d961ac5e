"""Embedded corpus, file/folder data, batch sampling and its resumable state."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from specopt.data import (
    BatchSampler,
    DataError,
    bits_per_byte,
    decode,
    encode,
    eval_windows,
    load_corpus,
)


@pytest.fixture(scope="module")
def stdlib_corpus():
    return load_corpus(max_bytes=300_000)


def test_stdlib_corpus_is_deterministic_and_capped(stdlib_corpus):
    again = load_corpus(max_bytes=300_000)
    assert torch.equal(stdlib_corpus.train, again.train)
    assert torch.equal(stdlib_corpus.val, again.val)
    total = stdlib_corpus.train.numel() + stdlib_corpus.val.numel()
    # Each file adds a 2-byte separator after truncation to the cap.
    assert 0.9 * 300_000 < total <= 300_000 + 2
    assert stdlib_corpus.source.startswith("stdlib:")
    assert stdlib_corpus.val.numel() > 0 and stdlib_corpus.train.dtype == torch.uint8
    assert "def " in decode(stdlib_corpus.train[:20_000])  # it is Python source


def test_folder_split_is_independent_of_creation_order(tmp_path):
    texts = {f"m{i}.txt": f"module {i}\n" * (20 + i) for i in range(40)}
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, order in ((a, sorted(texts)), (b, sorted(texts, reverse=True))):
        folder.mkdir()
        for name in order:
            (folder / name).write_text(texts[name])
    ca, cb = load_corpus(a), load_corpus(b)
    assert torch.equal(ca.train, cb.train) and torch.equal(ca.val, cb.val)
    assert ca.n_files == 40 and ca.val.numel() > 0
    total = sum(len(t) + 2 for t in texts.values())
    assert ca.train.numel() + ca.val.numel() == total
    # Whole files go to one split: no validation text leaks into training windows.
    train, val = decode(ca.train), decode(ca.val)
    for text in texts.values():
        assert (text in train) != (text in val)


def test_single_file_holds_out_its_tail(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    c = load_corpus(f, val_fraction=0.25)
    assert c.val.numel() == 2560 and c.train.numel() == 7680
    assert torch.equal(torch.cat([c.train, c.val]), torch.tensor(list(range(256)) * 40,
                                                                   dtype=torch.uint8))


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "e.txt").write_bytes(b"") or p / "e.txt", "is empty"),
        (lambda p: (p / "d").mkdir() or p / "d", "contains no readable files"),
        (lambda p: ((p / "z").mkdir(), (p / "z" / "a").write_bytes(b""))[0] or p / "z",
         "holds only empty files"),
    ],
    ids=["missing", "empty-file", "empty-folder", "only-empty-files"],
)
def test_bad_data_errors(tmp_path, setup, match):
    with pytest.raises(DataError, match=match):
        load_corpus(setup(tmp_path))


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    f = tmp_path / "secret.txt"
    f.write_text("x" * 100)
    real_open = os.open

    def deny(path, *args, **kwargs):  # chmod does not stop root, so fail the open itself
        if Path(path) == f:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(DataError, match=r"cannot read data file .*secret\.txt.*Permission denied"):
        load_corpus(f)
    with pytest.raises(DataError, match=r"cannot read data file .*secret\.txt.*Permission denied"):
        load_corpus(tmp_path)  # a user's folder: the failing file is named, not skipped


def _bytes_read_by_this_process() -> int | None:
    """rchar of /proc/self/io (bytes read through read(2)), None where there is none."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "folder"])
def test_large_file_is_streamed_with_the_cap(tmp_path, as_folder):
    """A 1 GB (sparse) file under a 64 kB cap: only the cap is read and held."""
    import tracemalloc

    folder = tmp_path / "d"
    folder.mkdir()
    big = folder / "big.txt"
    with open(big, "wb") as f:
        f.write(b"head ")
        f.truncate(1_000_000_000)  # sparse: no disk used, reads return zeros
    cap = 64_000
    before = _bytes_read_by_this_process()
    tracemalloc.start()
    try:
        corpus = load_corpus(folder if as_folder else big, max_bytes=cap, val_fraction=0.1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    after = _bytes_read_by_this_process()
    total = corpus.train.numel() + corpus.val.numel()
    assert cap <= total <= cap + 2  # the folder reader appends a 2-byte file separator
    assert corpus.train.numel() > 0 and bytes(corpus.train[:5].tolist()) == b"head "
    assert peak < 20 * cap  # a whole-file read would hold 1e9 bytes
    if before is not None and after is not None:
        assert after - before < 100 * cap


def test_special_files_are_refused_without_reading(tmp_path):
    with pytest.raises(DataError, match=r"'/dev/zero' is not a regular file \(a device, FIFO"):
        load_corpus("/dev/zero")
    link = tmp_path / "zeros.txt"
    link.symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"zeros\.txt' is not a regular file"):
        load_corpus(link)
    if not hasattr(os, "mkfifo"):
        return
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening a FIFO for reading blocks until a writer comes: must not
    with pytest.raises(DataError, match=r"pipe' is not a regular file"):
        load_corpus(fifo)
    # Inside a folder, special files are skipped and the regular ones read.
    (tmp_path / "a.txt").write_bytes(b"abc" * 100)
    corpus = load_corpus(tmp_path, val_fraction=0.0)
    assert corpus.n_files == 1 and corpus.train.numel() == 302


def test_bad_arguments():
    with pytest.raises(DataError, match="max_bytes must be positive, got 0"):
        load_corpus(max_bytes=0)
    with pytest.raises(DataError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        load_corpus(val_fraction=1.0)


def test_sampler_windows_are_shifted_targets():
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    sampler = BatchSampler(data, batch_size=5, seq_len=16, seed=0)
    x, y = next(sampler)
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal((x[:, 1:] - x[:, :-1]) % 256, torch.ones(5, 15, dtype=torch.int64))


def test_sampler_seed_and_resume_state():
    data = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    a = BatchSampler(data, batch_size=4, seq_len=32, seed=7)
    b = BatchSampler(data, batch_size=4, seq_len=32, seed=7)
    c = BatchSampler(data, batch_size=4, seq_len=32, seed=8)
    assert torch.equal(next(a)[0], next(b)[0])
    assert not torch.equal(next(a)[0], next(c)[0])
    state = a.state_dict()
    expected = [next(a)[0] for _ in range(3)]
    resumed = BatchSampler(data, batch_size=4, seq_len=32, seed=999)
    resumed.load_state_dict(state)
    assert resumed.position == 2
    assert all(torch.equal(next(resumed)[0], e) for e in expected)


def test_sampler_rejects_data_shorter_than_a_window():
    msg = r"training split has 10 bytes, fewer than seq_len \+ 1 = 33"
    with pytest.raises(DataError, match=msg):
        BatchSampler(torch.zeros(10, dtype=torch.uint8), batch_size=2, seq_len=32, seed=0)
    with pytest.raises(DataError, match="batch_size must be positive, got 0"):
        BatchSampler(torch.zeros(100, dtype=torch.uint8), batch_size=0, seq_len=8, seed=0)


def test_eval_windows_fixed_and_cover_the_split():
    data = torch.randint(0, 256, (2000,), dtype=torch.uint8)
    w1 = eval_windows(data, batch_size=4, seq_len=50, max_batches=3)
    w2 = eval_windows(data, batch_size=4, seq_len=50, max_batches=3)
    assert len(w1) == 3 and all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))
    assert w1[0].shape == (4, 51)
    assert torch.equal(w1[0][0], data[:51].long())  # first window starts at 0
    assert torch.equal(w1[-1][-1], data[-51:].long())  # last one ends at the end


def test_encode_decode_and_bits():
    text = "héllo\n"
    assert decode(encode(text)) == text
    assert encode(text).numel() == len(text.encode())
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
