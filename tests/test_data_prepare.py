"""The whole pipeline on small corpora made here: counts, split, shards, determinism, streaming, errors."""
import gzip
import json
import os
import struct
import tracemalloc

import numpy as np
import pytest

from nanogpt_np.data.datasets import load_prepared
from nanogpt_np.data.ingest import DataError
from nanogpt_np.data.loader import BatchLoader
from nanogpt_np.data.prepare import CLEAN_FILES, PrepareConfig, main, prepare, split_hash

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega river stone cloud light shadow market garden").split()


def llmc_read(path):
    """Independent reader written from llm.c's header spec."""
    with open(path, "rb") as f:
        h = struct.unpack("<256i", f.read(1024))
        assert h[0] == 20240520 and h[1] in (1, 2)
        body = f.read()
    width = 2 if h[1] == 1 else 4
    assert len(body) == h[2] * width
    return np.frombuffer(body, dtype="<u2" if width == 2 else "<u4")


def make_docs(n, seed=0, words=80):
    rng = np.random.default_rng(seed)
    return [f"Doc {i}: " + " ".join(rng.choice(WORDS, size=words)) + "." for i in range(n)]


def write_corpus(tmp_path, docs, name="corpus.jsonl.gz"):
    path = tmp_path / name
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def cfg(tmp_path, inputs, out="out", **kw):
    kw.setdefault("tokenizer", "char")
    kw.setdefault("processes", 1)
    kw.setdefault("progress", False)
    return PrepareConfig(inputs=[str(p) for p in inputs], out_dir=str(tmp_path / out), **kw)


def split_docs(tokens, tok):
    """Documents back from a shard: char tokenizer docs end with a blank line."""
    text = tok.decode(tokens.tolist())
    return [d for d in text.split("\n\n") if d]


def test_pipeline_counts_split_and_round_trip(tmp_path):
    docs = make_docs(61)
    fresh = docs.pop()  # unrelated to the others: becomes the HTML page
    exact_dups = [d.upper() for d in docs[:5]]  # same after casefolding
    near_dups = [d.replace("Doc", "Document", 1) + " extra" for d in docs[10:13]]
    html = ["<html><body><p>Visible &amp; kept " + fresh + "</p><script>hidden()</script></body></html>"]
    short = ["", "   ", "tiny"]
    path = write_corpus(tmp_path, docs + exact_dups + near_dups + html + short)
    m = prepare(cfg(tmp_path, [path], min_chars=10, keep_clean=True))
    steps = m["report"]["steps"]
    assert m["report"]["input"]["documents"] == 72
    assert steps["too_short"]["docs_removed"] == 3
    assert steps["exact_dup"]["docs_removed"] == 5
    assert steps["near_dup"]["docs_removed"] == 3
    assert steps["html"]["bytes_removed"] > 0
    assert m["report"]["kept"]["documents"] == 61
    assert m["train"]["documents"] + m["val"]["documents"] == 61 and m["val"]["documents"] > 0

    out = tmp_path / "out"
    ds = load_prepared(str(out))
    kept = []
    for split in ("train", "val"):
        files = m[split]["files"]
        assert files == [f"{split}.bin"]
        ids = llmc_read(out / files[0])  # accepted by an independent llm.c header reader
        np.testing.assert_array_equal(ids, getattr(ds, split))
        got = split_docs(ids, ds.tokenizer)
        with open(out / CLEAN_FILES[split], encoding="utf-8") as f:
            assert got == [json.loads(line) for line in f]  # shards decode to the cleaned documents
        kept.append(set(got))
    assert not kept[0] & kept[1]  # train and val are disjoint
    html_doc = next(d for d in kept[0] | kept[1] if d.startswith("Visible"))
    assert "hidden" not in html_doc and "Visible & kept" in html_doc
    assert set(docs) <= kept[0] | kept[1]


def test_split_is_stable_and_seeded(tmp_path):
    docs = make_docs(200, seed=1)
    path = write_corpus(tmp_path, docs)
    a = prepare(cfg(tmp_path, [path], "a", dedup_near=False))
    b = prepare(cfg(tmp_path, [path], "b", dedup_near=False))
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()
    assert a["val"]["documents"] == b["val"]["documents"]
    assert 5 <= a["val"]["documents"] <= 40  # ~10% of 200
    # the split depends on the document, not on its position: reversing the input keeps each doc's side
    assert [split_hash(d, 0) < 0.1 for d in docs] == [split_hash(d, 0) < 0.1 for d in docs[::-1]][::-1]
    assert [split_hash(d, 0) < 0.1 for d in docs] != [split_hash(d, 1) < 0.1 for d in docs]


def test_same_output_for_one_and_two_processes_and_bpe(tmp_path):
    path = write_corpus(tmp_path, make_docs(120, seed=2))
    prepare(cfg(tmp_path, [path], "p1", tokenizer="bpe", vocab_size=300, processes=1, chunk_chars=2000))
    m = prepare(cfg(tmp_path, [path], "p2", tokenizer="bpe", vocab_size=300, processes=2, chunk_chars=2000))
    for split in ("train", "val"):
        assert (tmp_path / "p1" / f"{split}.bin").read_bytes() == (tmp_path / "p2" / f"{split}.bin").read_bytes()
    ds = load_prepared(str(tmp_path / "p2"))
    eot = ds.tokenizer.eot_id
    assert m["tokenizer"]["eot_id"] == eot and m["separator"] == "eot before each document"
    train = np.asarray(ds.train)
    assert train[0] == eot and int((train == eot).sum()) == m["train"]["documents"]


def test_shard_rollover_and_loader(tmp_path):
    path = write_corpus(tmp_path, make_docs(80, seed=3))
    m = prepare(cfg(tmp_path, [path], shard_tokens=5000))
    files = m["train"]["files"]
    assert len(files) > 1 and files[0] == "train_000000.bin"
    ds = load_prepared("out", data_root=str(tmp_path))
    assert isinstance(ds.train, list) and ds.train_tokens == m["train"]["tokens"]
    loader = BatchLoader(ds.train, batch_size=4, block_size=32, seed=0)
    x, y = loader.next_batch()
    assert x.shape == (4, 32) and x.max() < ds.tokenizer.vocab_size


def test_empty_result_after_cleaning_is_a_clear_error(tmp_path):
    path = write_corpus(tmp_path, ["", "  ", "ab"])
    with pytest.raises(DataError, match=r"no documents left after cleaning .*3 read, 3 empty or shorter than 5"):
        prepare(cfg(tmp_path, [path], min_chars=5))


def test_missing_field_everywhere_names_file_line_and_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "x"}\n{"body": "y"}\n')
    with pytest.raises(DataError, match=r"2 bad records \(first: .*c\.jsonl:1: no field 'text'.*field='text'"):
        prepare(cfg(tmp_path, [path]))


def test_bad_records_counted_skipped_or_fatal(tmp_path):
    docs = make_docs(40, seed=4)
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": d}) for d in docs]
    lines.insert(7, '{"text": broken')
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff"}\n')
    m = prepare(cfg(tmp_path, [path]))
    assert m["report"]["input"]["bad_records"] == 2
    assert m["report"]["input"]["bad_record_examples"][0].startswith(f"{path}:8: malformed JSON")
    assert m["report"]["kept"]["documents"] == 40
    with pytest.raises(DataError, match=r"mixed\.jsonl:8: malformed JSON"):
        prepare(cfg(tmp_path, [path], "strict", strict=True))


def test_empty_val_split_is_an_error(tmp_path):
    (tmp_path / "one.txt").write_text("a single document in a single file")
    with pytest.raises(DataError, match="split is empty.*--text_split paragraph"):
        prepare(cfg(tmp_path, [tmp_path / "one.txt"]))


def test_large_corpus_streams_in_bounded_memory(tmp_path):
    """~4 MB of text through the pipeline while Python allocations stay under a quarter of it."""
    rng = np.random.default_rng(7)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(1200):
            f.write(json.dumps({"text": f"{i} " + " ".join(rng.choice(WORDS, size=700))}) + "\n")
    size = path.stat().st_size
    assert size > 4_000_000
    tracemalloc.start()
    try:
        m = prepare(cfg(tmp_path, [path], chunk_chars=1 << 14, dedup_near=False))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert m["report"]["kept"]["documents"] == 1200
    assert peak < size / 4, f"peak {peak} bytes for a {size}-byte corpus"


def test_cli_main(tmp_path, capsys):
    path = write_corpus(tmp_path, make_docs(50, seed=5), name="c.jsonl.gz")
    m = main(["--input", str(path), "--out", str(tmp_path / "cli"), "--tokenizer", "char",
              "--processes", "1", "--quiet"])
    assert os.path.isfile(tmp_path / "cli" / "manifest.json")
    assert "exact_dup" in capsys.readouterr().err
    assert m["tokenizer"]["type"] == "char"
    main(["--input", str(path), "--out", str(tmp_path / "cli2"), "--tokenizer", "char", "--processes", "1"])
    err = capsys.readouterr().err
    assert "clean: " in err and "ETA" in err and "tokenize train: " in err  # progress lines
    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x"), "--quiet"])
    assert "input not found" in capsys.readouterr().err


def test_rerun_removes_stale_shards_but_keeps_other_files(tmp_path):
    path = write_corpus(tmp_path, make_docs(80, seed=6))
    prepare(cfg(tmp_path, [path], shard_tokens=3000))
    out = tmp_path / "out"
    assert (out / "train_000002.bin").exists()
    (out / "input.txt").write_text("keep me")
    m = prepare(cfg(tmp_path, [path]))
    names = sorted(os.listdir(out))
    assert names == ["input.txt", "manifest.json", "tokenizer.json", "train.bin", "val.bin"]
    assert m["train"]["files"] == ["train.bin"]


def test_failed_rerun_keeps_the_previous_dataset(tmp_path):
    path = write_corpus(tmp_path, make_docs(50, seed=8))
    prepare(cfg(tmp_path, [path]))
    out = tmp_path / "out"
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError):
        prepare(cfg(tmp_path, [tmp_path / "empty.txt"]))
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # untouched, no work folder left
    with pytest.raises(ValueError, match="--tokenizer must be"):
        prepare(cfg(tmp_path, [path], tokenizer="no-such-tokenizer"))
    assert sorted(os.listdir(out)) == sorted(before)


def test_tokenizer_file_inside_out_is_read_before_the_rerun(tmp_path):
    path = write_corpus(tmp_path, make_docs(50, seed=9))
    first = prepare(cfg(tmp_path, [path]))
    out = tmp_path / "out"
    m = prepare(cfg(tmp_path, [path], tokenizer=str(out / "tokenizer.json")))
    assert m["tokenizer"]["vocab_size"] == first["tokenizer"]["vocab_size"]
    assert load_prepared(str(out)).tokenizer.vocab_size == first["tokenizer"]["vocab_size"]


def test_out_that_is_a_run_directory_or_a_file_is_refused(tmp_path, capsys):
    path = write_corpus(tmp_path, make_docs(20, seed=10))
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match="training run directory"):
        prepare(cfg(tmp_path, [path], out="run"))
    assert (run / "tokenizer.json").read_text() == "{}"
    (run / "checkpoints" / "step_000002").rmdir()
    (run / "log.jsonl").write_text("")                       # a run that never saved: its log is work too
    with pytest.raises(DataError, match="training run directory"):
        prepare(cfg(tmp_path, [path], out="run"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["--input", str(path), "--out", str(tmp_path / "afile"), "--tokenizer", "char", "--quiet"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a file" in err and "Traceback" not in err


def test_input_folder_holding_out_does_not_read_the_previous_output(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_corpus(folder, make_docs(40, seed=11), name="c.jsonl")
    first = prepare(cfg(tmp_path, [folder], out="d"))
    again = prepare(cfg(tmp_path, [folder], out="d"))
    assert again["report"]["input"]["files"] == first["report"]["input"]["files"] == 1


@pytest.mark.parametrize("flag,value,message", [
    ("--processes", "0", "--processes must be an integer >= 1"),
    ("--shard_tokens", "-1", "--shard_tokens must be an integer >= 1"),
    ("--chunk_chars", "0", "--chunk_chars must be"),
    ("--bpe_train_chars", "0", "--bpe_train_chars must be"),
    ("--bands", "0", "--bands must be"),
    ("--bands", "7", "multiple of --bands"),
    ("--num_perm", "0", "--num_perm must be"),
    ("--shingle", "0", "--shingle must be"),
    ("--seed", "-1", "--seed must be"),
    ("--near_threshold", "0", "--near_threshold must be in"),
    ("--near_threshold", "1.5", "--near_threshold must be in"),
    ("--val_fraction", "0", "--val_fraction must be in"),
    ("--val_fraction", "1", "--val_fraction must be in"),
    ("--min_chars", "-1", "--min_chars must be"),
    ("--vocab_size", "10", "--vocab_size must be at least 257"),
    ("--tokenizer", "nope", "--tokenizer must be"),
])
def test_cli_range_checks_give_one_error_line(tmp_path, capsys, flag, value, message):
    path = write_corpus(tmp_path, make_docs(20, seed=12))
    tok = [] if flag in ("--vocab_size", "--tokenizer") else ["--tokenizer", "char"]
    with pytest.raises(SystemExit) as e:
        main(["--input", str(path), "--out", str(tmp_path / "o"), "--quiet", *tok, flag, value])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_processes_are_clamped_to_the_cores(tmp_path):
    path = write_corpus(tmp_path, make_docs(20, seed=13))
    m = prepare(cfg(tmp_path, [path], processes=100_000, dedup_near=False))
    assert m["report"]["timing"]["processes"] == (os.cpu_count() or 1)


def test_explicit_gpt2_dir_is_used_alone(tmp_path, capsys):
    path = write_corpus(tmp_path, make_docs(20, seed=14))
    (tmp_path / "g").mkdir()
    with pytest.raises(SystemExit):
        main(["--input", str(path), "--out", str(tmp_path / "o"), "--quiet", "--tokenizer", "gpt2",
              "--gpt2_dir", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert err.startswith("error: --gpt2_dir") and "encoder.json" in err


def test_report_lists_20_bad_records_and_counts_skipped_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = [json.dumps({"text": d}) for d in make_docs(40, seed=15)]
    (folder / "a.jsonl").write_text("\n".join(good + ["{broken"] * 25) + "\n")
    (folder / "notes.xyz").write_text("not read")
    (folder / "data.bin").write_bytes(b"\0\1")
    m = main(["--input", str(folder), "--out", str(tmp_path / "o"), "--tokenizer", "char", "--quiet",
              "--processes", "1"])
    assert m["report"]["input"]["skipped_files"] == 2
    from nanogpt_np.data.prepare import format_report
    report = format_report(m)
    assert report.count("bad record:") == 20  # as data/README.md says
    assert "skipped 2 files with an unknown extension" in report and "notes.xyz" in report
