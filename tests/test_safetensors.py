"""safetensors reader/writer: round trips, determinism, error messages, and a cross-check with the
official `safetensors` package (skipped when it is not installed)."""
import json
import os
import struct

import numpy as np
import pytest

from nanogpt_np.io.safetensors import (DTYPES, SafetensorsError, bf16_bits_to_float32, float32_to_bf16_bits,
                                    load_file, load_metadata, read_header, save_file)

NUMPY_DTYPES = {  # safetensors name -> numpy dtype used to make data (BF16 goes separately)
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def random_array(rng, dtype, shape):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def write_raw(path, header: dict, data: bytes = b"", pad=True):
    """Hand-build a file, so the reader can be fed anything."""
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def test_round_trip_every_dtype(tmp_path):
    rng = np.random.default_rng()      # fresh random data on every run
    tensors = {}
    for i, (st, dt) in enumerate(NUMPY_DTYPES.items()):
        shape = [(2, 3), (5,), (), (0, 4), (3, 1, 2)][i % 5]
        tensors[f"t.{st}"] = random_array(rng, dt, shape)
    bits = float32_to_bf16_bits(rng.standard_normal((4, 3)).astype(np.float32))
    tensors["t.BF16"] = bits
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"format": "np", "step": "7"}, dtypes={"t.BF16": "BF16"})

    header = read_header(path)
    assert list(header) == list(tensors)                  # storage order == the order given
    for st in NUMPY_DTYPES:
        assert header[f"t.{st}"] == (st, tensors[f"t.{st}"].shape)
    assert header["t.BF16"] == ("BF16", (4, 3))

    loaded = load_file(path)
    assert list(loaded) == list(tensors)
    for name, a in tensors.items():
        b = loaded[name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        assert b.flags.writeable and b.flags.c_contiguous
        np.testing.assert_array_equal(b, a)
    assert load_metadata(path) == {"format": "np", "step": "7"}

    as_f32 = load_file(path, names=["t.BF16"], bf16_as="float32")
    assert list(as_f32) == ["t.BF16"] and as_f32["t.BF16"].dtype == np.float32
    np.testing.assert_array_equal(as_f32["t.BF16"], bf16_bits_to_float32(bits))


def test_bf16_rounding():
    x = np.array([1.0, -2.5, 0.0, 3.140625, np.inf, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8], dtype=np.float32)
    bits = float32_to_bf16_bits(x)
    back = bf16_bits_to_float32(bits)
    # exactly representable values survive; 1+2^-8 is a tie -> even (1.0); 1+3*2^-8 -> 1+2^-6 (ties up to even)
    np.testing.assert_array_equal(back, [1.0, -2.5, 0.0, 3.140625, np.inf, 1.0, 1.0 + 2 ** -6])
    assert np.isnan(bf16_bits_to_float32(float32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


def test_layout_matches_the_spec(tmp_path):
    path = tmp_path / "x.safetensors"
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, 2], dtype=np.int64)
    save_file({"a": a, "b": b}, path, metadata={"k": "v"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"k": "v"}
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"] == {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}
    assert raw[8 + n:] == a.astype("<f4").tobytes() + b.astype("<i8").tobytes()


def test_rewrite_is_byte_identical(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"wte.weight": rng.standard_normal((7, 4)).astype(np.float32),
               "h.0.ln_1.bias": rng.standard_normal(4).astype(np.float32),
               "count": np.array(3, dtype=np.int64)}
    p1, p2 = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    save_file(tensors, p1, metadata={"a": "b"})
    save_file(load_file(p1), p2, metadata=load_metadata(p1))
    assert p1.read_bytes() == p2.read_bytes()
    save_file(tensors, p1, metadata={"a": "b"})           # overwrite in place: same bytes again
    assert p1.read_bytes() == p2.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["1.safetensors", "2.safetensors"]   # no temp files left


def test_non_contiguous_and_big_endian_inputs(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4).T          # Fortran-ordered view
    b = np.arange(5, dtype=">i4")                                 # big-endian
    path = tmp_path / "x.safetensors"
    save_file({"a": a, "b": b}, path)
    out = load_file(path)
    np.testing.assert_array_equal(out["a"], a)
    np.testing.assert_array_equal(out["b"], b)
    assert out["b"].dtype == np.int32


def test_names_subset_and_missing(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)}, path)
    assert list(load_file(path, names=["b"])) == ["b"]
    with pytest.raises(SafetensorsError, match="no tensor named"):
        load_file(path, names=["c"])


def test_save_rejects_bad_input(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(SafetensorsError, match="cannot be stored"):
        save_file({"c": np.zeros(2, np.complex64)}, path)
    with pytest.raises(SafetensorsError, match="metadata"):
        save_file({"a": np.zeros(2)}, path, metadata={"step": 3})
    with pytest.raises(SafetensorsError, match="BF16"):
        save_file({"a": np.zeros(2, np.float32)}, path, dtypes={"a": "BF16"})
    with pytest.raises(SafetensorsError, match="invalid tensor name"):
        save_file({"__metadata__": np.zeros(2)}, path)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_truncated_files_say_truncated(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": np.arange(100, dtype=np.float32)}, path)
    raw = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in (0, 5, 8, 20, len(raw) - 1, len(raw) - 400):
        bad.write_bytes(raw[:cut])
        with pytest.raises(SafetensorsError, match="truncated") as e:
            load_file(bad)
        assert str(bad) in str(e.value)
        with pytest.raises(SafetensorsError, match="truncated"):
            read_header(bad)


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9, "unexpected bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"", "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}}, b"", "shape"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"", "exactly"),
    ({"a": [1, 2]}, b"", "exactly"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ([1, 2, 3], b"", "JSON object"),
])
def test_corrupt_headers(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data)
    with pytest.raises(SafetensorsError, match=match) as e:
        load_file(path)
    assert str(path) in str(e.value)


def test_garbage_and_duplicate_keys(tmp_path):
    path = tmp_path / "bad.safetensors"
    text = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'   # unterminated JSON
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    with pytest.raises(SafetensorsError, match="not valid UTF-8 JSON"):
        load_file(path)
    text = (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}')
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    with pytest.raises(SafetensorsError, match="duplicate key"):
        load_file(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(SafetensorsError, match="limit"):
        load_file(path)
    assert issubclass(SafetensorsError, ValueError)


def test_empty_file_of_tensors(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, path)
    assert load_file(path) == {} and load_metadata(path) == {}


def test_cross_check_with_official_package(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng()
    tensors = {f"t.{st}": random_array(rng, dt, (3, 2)) for st, dt in NUMPY_DTYPES.items()}
    ours = tmp_path / "ours.safetensors"
    save_file(tensors, ours, metadata={"who": "nanogpt_np"})
    theirs = st_numpy.load_file(str(ours))            # the official reader accepts our file
    assert set(theirs) == set(tensors)
    for k, a in tensors.items():
        np.testing.assert_array_equal(theirs[k], a)

    official = tmp_path / "official.safetensors"       # and we read theirs
    st_numpy.save_file(tensors, str(official), metadata={"who": "official"})
    back = load_file(official)
    assert set(back) == set(tensors)
    for k, a in tensors.items():
        assert back[k].dtype == a.dtype
        np.testing.assert_array_equal(back[k], a)
    assert load_metadata(official) == {"who": "official"}
    assert set(DTYPES) >= {v[0] for v in read_header(official).values()}
