"""load_prepared: missing data says how to prepare it; nanoGPT's raw train.bin/val.bin + meta.pkl are read."""
import json
import pickle

import numpy as np
import pytest

from nanogpt_np.data.datasets import load_prepared, prepare_command
from nanogpt_np.data.shards import ShardError, write_shard


def test_missing_dataset_names_directory_and_command(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_prepared("shakespeare_char", data_root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "shakespeare_char") in msg
    assert "python data/prepare_shakespeare_char.py --out" in msg
    with pytest.raises(FileNotFoundError, match=r"python data/prepare\.py --input PATH_TO_YOUR_TEXT --out data/mine"):
        load_prepared("mine")
    assert prepare_command("pydocs") == "python data/prepare_pydocs.py"


def test_nanogpt_raw_dir_with_meta_pkl(tmp_path):
    chars = sorted(set("hello world\n"))
    stoi = {c: i for i, c in enumerate(chars)}
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    ids = np.array([stoi[c] for c in "hello world\n" * 3], dtype=np.uint16)
    ids.tofile(tmp_path / "train.bin")
    ids[:12].tofile(tmp_path / "val.bin")
    ds = load_prepared(str(tmp_path))
    np.testing.assert_array_equal(ds.train, ids)
    assert ds.tokenizer.decode(np.asarray(ds.val).tolist()) == "hello world\n"
    assert ds.manifest == {}


def test_meta_pkl_with_classes_is_refused(tmp_path):
    class Evil:
        pass
    np.zeros(4, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.zeros(4, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"itos": {0: "a"}, "x": np.int64(3)}, f)  # references numpy classes
    with pytest.raises(ValueError, match=r"meta\.pkl: refused.*only plain data"):
        load_prepared(str(tmp_path))


def test_manifest_count_mismatch_and_bad_shard(tmp_path):
    write_shard(str(tmp_path / "train.bin"), np.arange(10))
    write_shard(str(tmp_path / "val.bin"), np.arange(5))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "char", "version": 1, "chars": "0123456789"}))
    (tmp_path / "manifest.json").write_text(json.dumps({"train": {"files": ["train.bin"], "tokens": 11},
                                                        "val": {"files": ["val.bin"], "tokens": 5}}))
    with pytest.raises(ValueError, match="says 11 train tokens, the shard files hold 10"):
        load_prepared(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"train": {"files": ["train.bin"]}, "val": {"files": ["val.bin"]}}))
    ds = load_prepared(str(tmp_path))
    assert ds.train_tokens == 10 and ds.tokenizer.vocab_size == 10
    with open(tmp_path / "val.bin", "r+b") as f:
        f.truncate(1030)
    with pytest.raises(ShardError, match=r"val\.bin: truncated"):
        load_prepared(str(tmp_path))


def _char_dataset(tmp_path, chars="0123456789"):
    write_shard(str(tmp_path / "train.bin"), np.arange(10))
    write_shard(str(tmp_path / "val.bin"), np.arange(5))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "char", "version": 1, "chars": chars}))
    manifest = {"format": "llmc", "tokenizer": {"type": "char", "vocab_size": 10},
                "train": {"files": ["train.bin"], "tokens": 10}, "val": {"files": ["val.bin"], "tokens": 5}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_without_tokenizer_json_is_an_error(tmp_path):
    _char_dataset(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: missing"):
        load_prepared(str(tmp_path))


def test_tokenizer_smaller_than_manifest_vocab_is_an_error(tmp_path):
    _char_dataset(tmp_path, chars="01234")
    with pytest.raises(ValueError, match="has 5 tokens but manifest.json says the data uses a vocabulary of 10"):
        load_prepared(str(tmp_path))


def test_corrupt_manifest_names_the_file(tmp_path):
    _char_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text('{"train": ')
    with pytest.raises(ValueError, match=r"manifest\.json: not valid JSON"):
        load_prepared(str(tmp_path))


def test_llmc_manifest_refuses_a_corrupted_magic(tmp_path):
    _char_dataset(tmp_path)
    with open(tmp_path / "train.bin", "r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(ShardError, match="bad magic number"):
        load_prepared(str(tmp_path))
