"""Ingest: every format and its gzip twin give the same documents; bad records are reported and skipped."""
import csv
import gzip
import io
import json

import pytest

from nanogpt_np.data.ingest import DataError, ErrorLog, IngestStats, expand_inputs, get_field, iter_documents

DOCS = [
    "First document.\nIt has two lines.",
    "Second one, with a comma, and \"quotes\".",
    "Ünïcödé — and emoji 🙂 too",
    "Fourth\n\nwith a blank line inside",
]


def _write(path, data: bytes, gz: bool):
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_jsonl(path, gz=False):
    lines = [json.dumps({"id": i, "meta": {"body": d}}) for i, d in enumerate(DOCS)]
    return _write(path, ("\n".join(lines) + "\n").encode(), gz)


def make_json(path, gz=False):
    data = json.dumps([{"meta": {"body": d}} for d in DOCS], indent=2)
    return _write(path, data.encode(), gz)


def make_csv(path, gz=False):
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["id", "body"])
    for i, d in enumerate(DOCS):
        w.writerow([i, d])
    return _write(path, out.getvalue().encode(), gz)


def texts(docs):
    return [d.text for d in docs]


@pytest.mark.parametrize("gz", [False, True])
def test_formats_and_gzip_twins_give_same_documents(tmp_path, gz):
    p = make_jsonl(tmp_path / "a.jsonl", gz)
    assert texts(iter_documents(p, field="meta.body")) == DOCS
    p = make_json(tmp_path / "a.json", gz)
    assert texts(iter_documents(p, field="meta.body")) == DOCS
    p = make_csv(tmp_path / "a.csv", gz)
    assert texts(iter_documents(p, column="body")) == DOCS
    # plain text: one folder of files, one document per file
    folder = tmp_path / ("txt_gz" if gz else "txt")
    folder.mkdir()
    for i, d in enumerate(DOCS):
        _write(folder / f"doc{i}.txt", d.encode(), gz)
    assert texts(iter_documents(folder)) == DOCS


def test_gzip_detected_by_content_not_name(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_bytes(gzip.compress(b'{"text": "hidden gzip"}\n'))
    assert texts(iter_documents(p)) == ["hidden gzip"]


def test_text_split_modes_and_line_numbers(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("a1\na2\n\n\nb1\n  \nc1\n")
    docs = list(iter_documents(p, text_split="paragraph"))
    assert texts(docs) == ["a1\na2\n", "b1\n", "c1\n"]
    assert [d.line for d in docs] == [1, 5, 7]
    assert texts(iter_documents(p, text_split="line")) == ["a1", "a2", "b1", "c1"]
    assert texts(iter_documents(p)) == ["a1\na2\n\n\nb1\n  \nc1\n"]


def test_folder_walk_mixed_formats_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.jsonl").write_text('{"text": "ay"}\n')
    (tmp_path / "sub" / "c.csv").write_text("text\ncee\n")
    (tmp_path / ".hidden.txt").write_text("no")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert texts(iter_documents(tmp_path)) == ["ay", "bee", "cee"]
    assert len(expand_inputs(tmp_path)) == 3


def test_get_field_paths():
    rec = {"a": {"b": [{"c": "x"}]}, "d.e": "dotted"}
    assert get_field(rec, "a.b.0.c") == "x"
    assert get_field(rec, "d.e") == "dotted"
    with pytest.raises(KeyError, match="missing 'z'"):
        get_field(rec, "a.z")


def test_malformed_jsonl_missing_field_and_undecodable_are_counted_and_skipped(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(
        b'{"text": "good one"}\n'
        b'{"text": "broken\n'  # line 2: malformed
        b'{"other": "no text"}\n'  # line 3: missing field
        b'{"text": 42}\n'  # line 4: not a string
        b'{"text": "bad \xff byte"}\n'  # line 5: undecodable
        b'\n'
        b'{"text": "good two"}\n'
    )
    log = ErrorLog()
    assert texts(iter_documents(p, errors=log)) == ["good one", "good two"]
    assert log.count == 4
    assert log.messages[0].startswith(f"{p}:2: malformed JSON")
    assert log.messages[1].startswith(f"{p}:3: no field 'text'")
    assert log.messages[2] == f"{p}:4: field 'text' is a int, not a string"
    assert log.messages[3].startswith(f"{p}:5: undecodable bytes")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        list(iter_documents(p, errors=ErrorLog(strict=True)))


def test_csv_missing_column_and_short_row(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("id,body\n1,hello\n")
    log = ErrorLog()
    assert texts(iter_documents(p, column="text", errors=log)) == []
    assert log.count == 1 and "no column 'text'" in log.messages[0] and "id, body" in log.messages[0]
    p.write_text("id,body\n1,hello\n2\n3,bye\n")
    log = ErrorLog()
    assert texts(iter_documents(p, column="body", errors=log)) == ["hello", "bye"]
    assert log.messages == [f"{p}:3: row has 1 fields, column 'body' is field 2"]


def test_undecodable_text_drops_only_its_paragraph(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"good para\n\nbad \xfe\xfe para\nstill bad para\n\nlast\n")
    log = ErrorLog()
    assert texts(iter_documents(p, text_split="paragraph", errors=log)) == ["good para\n", "last\n"]
    assert log.count == 1 and log.messages[0].startswith(f"{p}:3: undecodable")


def test_malformed_json_array_reports_line(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text('[\n{"text": "ok"},\n{"text": oops},\n{"text": "never"}\n]')
    log = ErrorLog()
    assert texts(iter_documents(p, errors=log)) == ["ok"]
    assert log.count == 1 and log.messages[0].startswith(f"{p}:3: malformed JSON")


def test_json_array_streams_in_chunks_with_big_records(tmp_path):
    big = ["x" * 200_000 + str(i) for i in range(5)]  # records bigger than one read chunk
    p = tmp_path / "big.json"
    p.write_text(json.dumps([{"text": t} for t in big]))
    assert texts(iter_documents(p)) == big
    p.write_text(json.dumps({"text": "single record"}))
    assert texts(iter_documents(p)) == ["single record"]


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    p = tmp_path / "c.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    with pytest.raises(DataError, match=r"c\.jsonl\.gz: cannot read"):
        list(iter_documents(p))


def test_stats_count_bytes(tmp_path):
    p = make_jsonl(tmp_path / "s.jsonl", gz=True)
    stats = IngestStats()
    list(iter_documents(p, field="meta.body", stats=stats))
    assert stats.documents == 4 and stats.files == 1
    assert stats.bytes_in == p.stat().st_size
    assert stats.text_bytes == sum(len(d.encode()) for d in DOCS)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_json_array_reader_with_tiny_reads(chunk):
    """Every chunk boundary (inside strings, multi-byte characters, whitespace, commas) is handled."""
    from nanogpt_np.data.ingest import _iter_json_array
    records = [{"text": t, "n": i} for i, t in enumerate(DOCS)] + [{"text": "[tricky], {\"quoted\"}"}, {"text": "1"}]
    data = ("\ufeff" + json.dumps(records, indent=1, ensure_ascii=False)).encode("utf-8")
    log = ErrorLog()
    got = list(_iter_json_array("mem.json", io.BytesIO(data), log, 1 << 20, chunk=chunk))
    assert [r for _, r in got] == records and log.count == 0
    lines = data.decode("utf-8").splitlines()
    for line, record in got:  # the reported line is where the record's "{" is
        assert lines[line - 1].strip().startswith("{")
    assert list(_iter_json_array("e.json", io.BytesIO(b"[]"), log, 100, chunk=chunk)) == []
    assert list(_iter_json_array("e.json", io.BytesIO(b"  "), log, 100, chunk=chunk)) == []
    list(_iter_json_array("u.json", io.BytesIO(b'[{"text": "a"}'), log, 100, chunk=chunk))
    assert log.count == 1 and "not closed" in log.messages[0]


def test_undecodable_bytes_in_csv_and_json_array(tmp_path):
    p = tmp_path / "u.csv"
    p.write_bytes(b"text\nfine row\nbad \xc3\x28 row\nlast row\n")
    log = ErrorLog()
    assert texts(iter_documents(p, errors=log)) == ["fine row", "last row"]
    assert log.count == 1 and log.messages[0].startswith(f"{p}:3: undecodable")
    p = tmp_path / "u.json"
    p.write_bytes(b'[{"text": "ok"},\n{"text": "bad \xff"},\n{"text": "after"}]')
    log = ErrorLog()
    assert texts(iter_documents(p, errors=log)) == ["ok"]
    assert log.count == 1 and log.messages[0].startswith(f"{p}:2: undecodable bytes (not UTF-8) at byte offset 31")
    with pytest.raises(DataError, match=r"u\.json:2: undecodable"):
        list(iter_documents(p, errors=ErrorLog(strict=True)))


def test_truncated_json_errors_keep_the_position(tmp_path):
    """json's 'Unterminated string starting at' used to lose its position (or read 'at at')."""
    p = tmp_path / "arr.json"
    p.write_text('[\n{"text": "ok"},\n  {"text": "never closed')  # the file ends inside the string
    log = ErrorLog()
    assert texts(iter_documents(p, errors=log)) == ["ok"]
    assert log.messages == [f"{p}:3: malformed JSON (Unterminated string starting at line 3 column 12); "
                            f"rest of file skipped"]
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "broken')
    log = ErrorLog()
    list(iter_documents(p, errors=log))
    assert log.messages == [f"{p}:2: malformed JSON (Unterminated string starting at column 10)"]
