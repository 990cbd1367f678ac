"""Shard files: round trip, an independent llm.c header reader, raw nanoGPT files, bad files."""
import os
import struct

import numpy as np
import pytest

from nanogpt_np.data.shards import (ShardError, ShardWriter, read_shard, read_tokens, write_shard)


def independent_llmc_reader(path):
    """Written from llm.c's spec only: header int32[256], [0]=20240520, [1]=version, [2]=ntok; then tokens."""
    with open(path, "rb") as f:
        header = struct.unpack("<256i", f.read(1024))
        assert header[0] == 20240520
        assert header[1] in (1, 2)
        ntok = header[2]
        fmt = "<%dH" % ntok if header[1] == 1 else "<%dI" % ntok
        body = f.read()
    assert len(body) == ntok * (2 if header[1] == 1 else 4)
    return header[1], list(struct.unpack(fmt, body))


def test_round_trip_uint16_and_independent_reader(tmp_path):
    ids = np.random.default_rng(0).integers(0, 50257, size=1234)
    p = write_shard(str(tmp_path / "a.bin"), ids)
    version, read_back = independent_llmc_reader(p)
    assert version == 1 and read_back == ids.tolist()
    mm = read_shard(p)
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16
    np.testing.assert_array_equal(mm, ids)
    np.testing.assert_array_equal(read_tokens(p), ids)  # auto-detected as llm.c
    assert os.path.getsize(p) == 1024 + 2 * 1234


def test_round_trip_uint32(tmp_path):
    ids = np.array([0, 65535, 65536, 100_000, 7], dtype=np.int64)
    p = write_shard(str(tmp_path / "b.bin"), ids)
    version, read_back = independent_llmc_reader(p)
    assert version == 2 and read_back == ids.tolist()
    np.testing.assert_array_equal(read_tokens(p), ids)
    with pytest.raises(ValueError, match="do not fit uint16"):
        write_shard(str(tmp_path / "c.bin"), ids, dtype=np.uint16)


def test_writer_streams_chunks_and_rolls_over(tmp_path):
    pattern = str(tmp_path / "train_{index:06d}.bin")
    w = ShardWriter(pattern, dtype=np.uint16, max_tokens=100)
    chunks = [np.arange(i * 37, (i + 1) * 37) for i in range(7)]  # 259 tokens
    for c in chunks:
        w.write(c)
    paths = w.close()
    assert [os.path.basename(p) for p in paths] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    got = np.concatenate([independent_llmc_reader(p)[1] for p in paths])
    np.testing.assert_array_equal(got, np.concatenate(chunks))
    assert w.n_tokens == 259
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_empty_shard_is_valid(tmp_path):
    p = write_shard(str(tmp_path / "e.bin"), np.zeros(0, dtype=np.int64))
    assert independent_llmc_reader(p) == (1, [])
    assert len(read_tokens(p)) == 0


def test_raw_nanogpt_file(tmp_path):
    p = tmp_path / "train.bin"
    ids = np.array([5, 6, 7, 50256], dtype=np.uint16)
    ids.tofile(p)
    np.testing.assert_array_equal(read_tokens(str(p)), ids)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ShardError, match="odd.bin.*not a whole number"):
        read_tokens(str(tmp_path / "odd.bin"))


def test_wrong_magic_names_file_and_offset(tmp_path):
    p = tmp_path / "bad.bin"
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = 12345, 1, 3
    p.write_bytes(header.tobytes() + np.arange(3, dtype="<u2").tobytes())
    with pytest.raises(ShardError, match=r"bad\.bin: bad magic number 12345 at byte offset 0"):
        read_shard(str(p))


def test_truncated_body_names_file_and_offset(tmp_path):
    p = str(tmp_path / "t.bin")
    write_shard(p, np.arange(100))
    with open(p, "r+b") as f:
        f.truncate(1024 + 2 * 60 + 1)
    with pytest.raises(ShardError, match=r"t\.bin: truncated: header says 100 tokens .* byte offset 1145, 60 whole tokens"):
        read_tokens(p)
    with open(p, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ShardError, match="shorter than the 1024-byte"):
        read_shard(p)


def test_trailing_bytes_and_bad_version(tmp_path):
    p = str(tmp_path / "x.bin")
    write_shard(p, np.arange(10))
    with open(p, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ShardError, match="unexpected bytes"):
        read_shard(p)
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 9, 0)
    with open(p, "wb") as f:
        f.write(header.tobytes())
    with pytest.raises(ShardError, match="unknown llm.c shard version 9"):
        read_shard(p)


def test_describe(tmp_path):
    from nanogpt_np.data.shards import describe
    p = write_shard(str(tmp_path / "d.bin"), np.array([3, 1, 4, 1, 5]))
    assert describe(p) == f"{p}: llm.c version 1, uint16, 5 tokens; first: 3 1 4 1 5"


@pytest.mark.parametrize("bad", [0, -1])
def test_writer_refuses_max_tokens_below_one(tmp_path, bad):
    """max_tokens=-1 used to open new files forever."""
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        ShardWriter(str(tmp_path / "t_{index:06d}.bin"), max_tokens=bad)
    assert os.listdir(tmp_path) == []
