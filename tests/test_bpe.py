"""Tests of the byte-level BPE tokenizer on vocabularies trained here (no outside files needed).

GPT-2 exactness is in test_bpe_gpt2.py, the command line and load_tokenizer in test_bpe_cli.py.
"""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nanogpt_np.tokenizers import bpe
from nanogpt_np.tokenizers.bpe import (
    BPETokenizer, DisallowedSpecialTokenError, TokenizerError, TokenizerFileError, UnknownTokenIdError,
    encode_files_parallel, iter_encode_parallel,
)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

# A training text that exists without the shared data: English, digits, whitespace runs, CRLF,
# and multi-byte characters, so that merges of partial UTF-8 sequences are learned too.
LOCAL_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 2024; we're testing 12345 and 3.14159!\r\n"
    "  Indented   text\twith\ttabs.\n\nNew paragraph: naïve café, Ελληνικά, русский, 日本語, 中文, 😀🎉.\n"
) * 20


def training_text():
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:200_000] + LOCAL_TEXT
    # without the shared data (a user's fresh clone): the embedded corpus, rich enough for 3000 tokens
    from nanogpt_np.data.corpus import default_corpus_text
    return default_corpus_text()[:200_000] + LOCAL_TEXT


@pytest.fixture(scope="module")
def trained():
    """Tokenizers of several sizes trained on the same text (trained once for the whole module)."""
    text = training_text()
    return {size: BPETokenizer.train(text, size) for size in (257, 300, 1000, 3000)}


# ---------------------------------------------------------------------------------------------------
# byte map and pre-split
# ---------------------------------------------------------------------------------------------------

def test_byte_map_is_a_printable_bijection():
    table = bpe.bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    data = bytes(range(256))
    assert bpe.token_str_to_bytes(bpe.bytes_to_token_str(data)) == data


def test_gpt2_pattern_splits_as_documented():
    chunks = bpe.regex.findall(BPETokenizer.GPT2_PATTERN, "Hello  world, it's 123!\n")
    assert chunks == ["Hello", " ", " world", ",", " it", "'s", " 123", "!", "\n"]


def test_ascii_fast_path_classes_match_the_unicode_ones():
    # what the fast pattern assumes: on ASCII, \p{L} = [A-Za-z], \p{N} = [0-9], \s = [\t\n\v\f\r ]
    ascii_chars = [chr(c) for c in range(128)]
    assert [c for c in ascii_chars if bpe.regex.match(r"\p{L}", c)] == list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    assert [c for c in ascii_chars if bpe.regex.match(r"\p{N}", c)] == list("0123456789")
    assert [c for c in ascii_chars if bpe.regex.match(r"\s", c)] == list("\t\n\x0b\x0c\r ")


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=100)
       | st.text(alphabet=st.sampled_from(list(" \t\r\n\x0b\x0c\x1c\x1fab1'sdlmtrev.!")), max_size=60))
def test_ascii_fast_path_splits_like_gpt2_pattern(text):
    assert bpe.split_chunks(text) == bpe.regex.findall(BPETokenizer.GPT2_PATTERN, text)


def test_long_mixed_text_splits_like_gpt2_pattern():
    # long enough to be cut into blocks; some blocks ASCII (fast path), some not
    rng = np.random.default_rng(0)
    lines = ["plain line, it's 42.", "  indented\tline", "日本語 😀 naïve", "", "\r", "x\u3000y", "end "]
    text = "\n".join(rng.choice(lines, size=20000))
    assert len(text) > 4 * bpe._FAST_PATH_BLOCK and not text.isascii()
    assert bpe.split_chunks(text) == bpe.regex.findall(BPETokenizer.GPT2_PATTERN, text)


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------

def test_hand_checked_training_example():
    # "aaabdaaabac" is one pre-split chunk. Bytes: a=97 b=98 c=99 d=100.
    # Pair counts: aa 4 (two in each "aaa"), ab 2, bd 1, da 1, ba 1, ac 1.
    # Merge 1: (a,a) -> 256 "aa", left to right: [aa a b d aa a b a c].
    # Now (aa,a) 2 and (a,b) 2 tie; the tie goes to the smaller pair (97,98) < (256,97).
    # Merge 2: (a,b) -> 257 "ab": [aa ab d aa ab a c].
    # Merge 3: (aa,ab) = (256,257) with count 2 -> 258 "aaab": [aaab d aaab a c].
    tok = BPETokenizer.train("aaabdaaabac", 256 + 3, special_tokens=())
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.token_bytes(258) == b"aaab"
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.vocab_size == 259 and tok.eot_id is None


def naive_train(text, n_merges):
    """The textbook trainer: recount every pair of every chunk before each merge.
    Same tie-break as the real one (highest count, then smallest (left, right))."""
    counts = Counter(bpe.regex.findall(BPETokenizer.GPT2_PATTERN, text))
    words = {tuple(chunk.encode("utf-8")): n for chunk, n in counts.items()}
    merges = []
    for k in range(n_merges):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new_words = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(256 + k)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
    return merges


def test_incremental_training_equals_full_recount():
    text = LOCAL_TEXT + "aaaa aaaaa abab ababab zzzzzz " * 5  # runs of one letter: overlapping pairs
    tok = BPETokenizer.train(text, 256 + 300, special_tokens=())
    assert tok.merges == naive_train(text, 300)


def test_training_is_deterministic_and_places_specials_after_merges(trained):
    again = BPETokenizer.train(training_text(), 1000)
    assert again.merges == trained[1000].merges
    tok = trained[1000]
    assert tok.vocab_size == 1000
    assert len(tok.merges) == 1000 - 256 - 1
    assert tok.eot_id == 256 + len(tok.merges) == 999


def test_training_from_iterable_and_special_tokens_not_learned():
    docs = ["hello world " * 10, "world hello " * 10]
    joined = BPETokenizer.train("<|endoftext|>".join(docs), 280)
    separate = BPETokenizer.train(docs, 280)
    assert joined.merges == separate.merges  # the separator is cut out before counting
    assert not any(b"<|" in joined.token_bytes(i) for i in range(256, 256 + len(joined.merges)))


def test_parallel_chunk_counting_gives_the_same_tokenizer():
    text = training_text()[:100_000] + "<|endoftext|>" + LOCAL_TEXT
    serial = BPETokenizer.train(text, 600)
    parallel = BPETokenizer.train([text, "more text"], 600, processes=2)
    assert bpe.count_chunks([text, "more text"], special_tokens=["<|endoftext|>"], processes=2) == \
        bpe.count_chunks([text, "more text"], special_tokens=["<|endoftext|>"])
    assert parallel.merges == BPETokenizer.train([text, "more text"], 600).merges
    assert serial.merges[:50] == parallel.merges[:50]  # "more text" adds little


def test_pickling_sends_the_description(trained):
    import pickle  # only what multiprocessing does for spawned workers; files never use pickle
    tok = trained[1000]
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.merges == tok.merges and copy.encode(LOCAL_TEXT) == tok.encode(LOCAL_TEXT)


def test_training_from_files_reads_them_in_pieces(tmp_path, monkeypatch):
    text = training_text()[:60000]
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    (tmp_path / "b.txt").write_bytes(LOCAL_TEXT.encode("utf-8"))
    expected = BPETokenizer.train([text, LOCAL_TEXT], 500).merges
    real = bpe.read_text_pieces
    monkeypatch.setattr(bpe, "read_text_pieces", lambda path, cut=True: real(path, piece_chars=1000, cut=cut))
    assert BPETokenizer.train_from_files([tmp_path / "a.txt", str(tmp_path / "b.txt")], 500).merges == expected


def test_training_stops_early_when_no_pairs_are_left():
    tok = BPETokenizer.train("ab ab", 1000)
    assert [tok.token_bytes(256 + k) for k in range(len(tok.merges))] == [b"ab", b" ab"]
    assert tok.vocab_size == 256 + 2 + 1 and tok.eot_id == 258


def test_training_verbose_shows_progress(capsys):
    BPETokenizer.train(LOCAL_TEXT, 300, verbose=True)
    err = capsys.readouterr().err
    assert "pre-split" in err and "merge 43/43" in err


def test_training_argument_forms():
    one = BPETokenizer.train(LOCAL_TEXT, np.int64(300), special_tokens="<|endoftext|>")
    assert one.special_tokens == {"<|endoftext|>": 299} and one.vocab_size == 300
    with pytest.raises(TokenizerError):
        BPETokenizer.train(LOCAL_TEXT, 300.0)


@pytest.mark.parametrize("size", [0, 100, 255, 256])
def test_vocab_size_too_small_is_refused(size):
    with pytest.raises(TokenizerError, match="vocab_size"):
        BPETokenizer.train("some text", size)  # 256 is too small too: no room for <|endoftext|>
    assert issubclass(TokenizerError, ValueError)


@pytest.mark.parametrize("text", ["", [], ["", ""], "<|endoftext|>"])
def test_empty_training_text_is_refused(text):
    with pytest.raises(TokenizerError, match="empty"):
        BPETokenizer.train(text, 300)


# ---------------------------------------------------------------------------------------------------
# encoding and decoding
# ---------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_random_unicode(trained, text):
    for tok in trained.values():
        ids = tok.encode_ordinary(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n\r\t1'sé😀<|>endoftext")), max_size=80))
def test_round_trip_with_special_tokens(trained, text):
    tok = trained[3000]
    for allowed in ("all", "none"):
        assert tok.decode(tok.encode(text, allowed_special=allowed)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("aab e th\n")), max_size=300))
def test_short_and_long_chunk_loops_agree(trained, chunk):
    for tok in (trained[300], trained[3000], BPETokenizer.train("aaaa " * 50 + "abab " * 30, 270)):
        ids = list(chunk.encode("utf-8"))  # trained tokenizers: byte b has id b
        assert tok._encode_chunk(chunk) == tok._encode_long_chunk(ids)


def test_long_runs_encode_quickly_and_exactly():
    tok = BPETokenizer.train("a" * 4096 + " " + "ab" * 100, 280)  # merges a+a, aa+aa, ... and ab
    for text in ("a" * 100_000, "ab" * 50_000, " " * 30_000 + "x"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    forced_short = BPETokenizer(tok.merges, tok.special_tokens)
    forced_short.LONG_CHUNK = 10**9
    assert forced_short.encode("a" * 3001) == tok.encode("a" * 3001)


def test_merges_make_text_shorter(trained):
    text = training_text()[:20000]
    lengths = [len(trained[size].encode(text, allowed_special="none")) for size in (257, 300, 1000, 3000)]
    assert lengths[0] == len(text.encode("utf-8"))
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] < lengths[0] / 2


def test_special_token_modes(trained):
    tok = trained[1000]
    text = "a<|endoftext|>b"
    with pytest.raises(DisallowedSpecialTokenError, match="endoftext"):
        tok.encode(text)  # default: refuse
    with pytest.raises(ValueError):
        tok.encode_batch(["fine", text])
    plain = tok.encode(text, allowed_special="none")
    assert plain == tok.encode_ordinary(text) and tok.eot_id not in plain
    special = tok.encode(text, allowed_special="all")
    assert special == tok.encode("a") + [tok.eot_id] + tok.encode("b")
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == special
    assert tok.decode(special) == tok.decode(plain) == text
    with pytest.raises(TokenizerError, match="not special tokens"):
        tok.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(TokenizerError):
        tok.encode(text, allowed_special="everything")


def test_several_special_tokens_and_a_set_refuses_the_others():
    tok = BPETokenizer.train(LOCAL_TEXT, 300, special_tokens=("<|endoftext|>", "<|pad|>", "<|endoftext|>x"))
    assert tok.vocab_size == 300 and tok.special_tokens["<|endoftext|>x"] == 299
    text = "<|pad|> <|endoftext|>x"
    # the longest special wins where two start at the same place
    assert tok.encode(text, allowed_special="all") == [298] + tok.encode(" ") + [299]
    with pytest.raises(DisallowedSpecialTokenError, match="endoftext"):
        tok.encode(text, allowed_special={"<|pad|>"})


def test_encode_batch_equals_encode(trained):
    tok = trained[1000]
    texts = ["hello", "", "  spaces  ", "日本語 text", "a<|endoftext|>b"]
    assert tok.encode_batch(texts, allowed_special="all") == [tok.encode(t, allowed_special="all") for t in texts]


def test_cache_limit_does_not_change_ids(trained, monkeypatch):
    tok = trained[1000]
    text = training_text()[:30000]
    lines = text.splitlines(keepends=True)
    # line by line on both sides: encoding lines separately may legitimately differ from encoding the whole
    # text (GPT-2's pre-split joins a newline with the next line's indentation)
    expected = [i for line in lines for i in tok.encode(line)]
    fresh = BPETokenizer(tok.merges, tok.special_tokens)
    monkeypatch.setattr(fresh, "CACHE_LIMIT", 50)  # checked between calls: emptied often here
    assert [i for line in lines for i in fresh.encode(line)] == expected
    assert len(fresh._cache) <= 50 + max(len(set(bpe.regex.findall(fresh.pattern, line))) for line in lines)


def utf16_round_trip(text):
    """The reference for surrogates, independent of bpe.fix_surrogates: Python's UTF-16 codec joins a high and
    a low surrogate into the character they spell and replaces any other surrogate with U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


SURROGATE_ALPHABET = ["a", " ", "é", "😀", "\ufffd", "\ud800", "\udbff", "\udc00", "\udfff", "\ud83d", "\ude00",
                      "<|endoftext|>"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SURROGATE_ALPHABET), max_size=12).map("".join))
def test_surrogates_encode_like_their_utf16_repair(trained, text):
    """A str holding surrogate code points has no UTF-8 form; like tiktoken, a valid pair becomes its
    character and a lone surrogate becomes U+FFFD, instead of a UnicodeEncodeError."""
    tok, fixed = trained[3000], utf16_round_trip(text)
    assert bpe.fix_surrogates(text) == fixed
    for allowed in ("all", "none"):
        assert tok.encode(text, allowed_special=allowed) == tok.encode(fixed, allowed_special=allowed)
        assert tok.decode(tok.encode(text, allowed_special=allowed)) == fixed
    assert tok.encode_ordinary(text) == tok.encode_ordinary(fixed)


def test_surrogates_examples_and_training(trained):
    tok = trained[3000]
    assert tok.encode("\ud800") == tok.encode("\ufffd") and tok.encode("x\udc00y") == tok.encode("x\ufffdy")
    assert tok.encode("\ud83d\ude00") == tok.encode("😀")                 # a pair is the character it spells
    assert tok.encode("\ude00\ud83d") == tok.encode("\ufffd\ufffd")         # low then high is no pair
    assert bpe.fix_surrogates("plain text") == "plain text"
    small = BPETokenizer.train(["ab\ud800ab " * 20, "cd\ud83d\ude00 " * 5], 270)     # training sees the same text
    assert small.decode(small.encode("ab\ud800ab")) == "ab\ufffdab"


def test_decode_cut_character_and_unknown_ids(trained):
    tok = trained[257]  # bytes only: every byte is its own id, so the cut can fall anywhere
    ids = tok.encode("é😀")
    assert len(ids) == 6 and tok.decode(ids) == "é😀"
    assert tok.decode(ids[:-1]) == "é\ufffd"  # the emoji cut after 3 of its 4 bytes
    with pytest.raises(UnicodeDecodeError):
        tok.decode(ids[:-1], errors="strict")
    tok = trained[300]
    for bad in ([tok.vocab_size], [-1], [1, 2, 10**9], np.array([0, tok.vocab_size]), [1.5], ["a"]):
        with pytest.raises(UnknownTokenIdError, match="unknown token id"):
            tok.decode(bad)
    assert tok.decode(np.array(tok.encode("numpy ids"), dtype=np.uint16)) == "numpy ids"


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------

def test_save_load_identical_ids(trained, tmp_path):
    text = training_text()[:50000] + "<|endoftext|>" + LOCAL_TEXT
    for size, tok in trained.items():
        path = tmp_path / f"tok{size}.json"
        tok.save(path)
        loaded = BPETokenizer.load(path)
        assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
        assert loaded.pattern == tok.pattern and loaded.vocab_size == tok.vocab_size
        assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
        d = json.loads(path.read_text(encoding="utf-8"))
        assert d["type"] == "bpe" and d["version"] == 1 and d["special_tokens"] == {"<|endoftext|>": size - 1}
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves no temporary file


def test_custom_pattern_is_saved(tmp_path):
    tok = BPETokenizer.train(LOCAL_TEXT, 300, pattern=r"\S+|\s+")
    tok.save(tmp_path / "t.json")
    loaded = BPETokenizer.load(tmp_path / "t.json")
    assert loaded.pattern == r"\S+|\s+"
    assert loaded.encode(LOCAL_TEXT) == tok.encode(LOCAL_TEXT)


def test_gpt2_format_round_trip(trained, tmp_path):
    tok = trained[3000]
    tok.save_gpt2_files(tmp_path)
    assert (tmp_path / "vocab.bpe").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    loaded = BPETokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert loaded.special_tokens == tok.special_tokens and loaded.eot_id == 2999
    text = training_text()[:50000]
    assert loaded.encode(text) == tok.encode(text)
    # the same files after a trip through Windows: CRLF line ends, a byte-order mark
    crlf = tmp_path / "crlf"
    crlf.mkdir()
    (crlf / "vocab.bpe").write_bytes((tmp_path / "vocab.bpe").read_bytes().replace(b"\n", b"\r\n"))
    (crlf / "encoder.json").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "encoder.json").read_bytes())
    assert BPETokenizer.from_gpt2_files(crlf / "encoder.json", crlf / "vocab.bpe").merges == tok.merges


def test_corrupt_and_mismatched_files(trained, tmp_path):
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="bad.json"):
        BPETokenizer.load(tmp_path / "bad.json")
    with pytest.raises(TokenizerFileError, match="missing.json"):
        BPETokenizer.load(tmp_path / "missing.json")
    (tmp_path / "char.json").write_text(json.dumps({"type": "char", "chars": "ab"}), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="type"):
        BPETokenizer.load(tmp_path / "char.json")

    good = trained[1000].to_dict()
    for key, value, message in [
        ("version", 99, "version"),
        ("merges", "x y", "merges"),
        ("merges", good["merges"] + ["nothere Ġx"], "not in the vocabulary"),
        ("merges", good["merges"][:10] + ["onlyone"] + good["merges"][10:], "not two tokens"),
        ("vocab", {k: v for k, v in good["vocab"].items() if k != "A"}, "byte"),
        ("vocab_size", 5, "vocab_size"),
        ("vocab", dict(good["vocab"], extra=300), "has id 300"),
        ("vocab", dict(good["vocab"], **{"\u4e00x": 300}), "not a byte character"),
        ("special_tokens", {"<|endoftext|>": 5}, "already taken"),
        ("pattern", "(unclosed", "pattern"),
    ]:
        broken = dict(good, **{key: value})
        (tmp_path / "broken.json").write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(TokenizerFileError, match=message):
            BPETokenizer.load(tmp_path / "broken.json")

    # encoder.json of one tokenizer with vocab.bpe of another
    trained[1000].save_gpt2_files(tmp_path / "a")
    trained[3000].save_gpt2_files(tmp_path / "b")
    with pytest.raises(TokenizerFileError, match="vocab.bpe"):
        BPETokenizer.from_gpt2_files(tmp_path / "a" / "encoder.json", tmp_path / "b" / "vocab.bpe")
    (tmp_path / "b" / "vocab.bpe").write_bytes(b"#version: 0.2\n\xff\xfe\n")
    with pytest.raises(TokenizerFileError, match="UTF-8"):
        BPETokenizer.from_gpt2_files(tmp_path / "b" / "encoder.json", tmp_path / "b" / "vocab.bpe")


def test_constructor_checks_ids():
    with pytest.raises(TokenizerError, match="not defined"):
        BPETokenizer([(0, 300)])
    with pytest.raises(TokenizerError, match="without gaps"):
        BPETokenizer([(0, 1)], special_tokens={"<|endoftext|>": 400})
    with pytest.raises(TokenizerError, match="twice"):
        BPETokenizer([(0, 1), (0, 1)])


# ---------------------------------------------------------------------------------------------------
# cutting texts and parallel encoding
# ---------------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1 \n\r\t'.\u00a0\u3000é")), max_size=200), st.integers(1, 20))
def test_cut_pieces_encode_like_the_whole(trained, text, piece_chars):
    tok = trained[300]
    pieces = list(bpe.cut_text(text, piece_chars))
    assert "".join(pieces) == text
    assert [i for piece in pieces for i in tok.encode(piece)] == tok.encode(text)


def test_cut_text_finds_places_in_crlf_text_and_keeps_a_text_without_any_whole():
    text = "word,word\r\n" * 1000
    pieces = list(bpe.cut_text(text, 100))
    assert "".join(pieces) == text and 50 < len(pieces) < 200
    assert all(p[-1] not in " \r\n" for p in pieces[:-1])  # each cut comes before whitespace
    assert list(bpe.cut_text("x" * 1000, 10)) == ["x" * 1000]
    assert list(bpe.cut_text("   " * 100, 10)) == ["   " * 100]
    assert list(bpe.cut_text("", 10)) == [""]


def test_parallel_encoding_equals_serial(trained, tmp_path):
    tok = trained[3000]
    texts = [training_text()[:40000], "", "short one", LOCAL_TEXT + "\r\n\r\nend"]
    paths = []
    for k, text in enumerate(texts):
        path = tmp_path / f"doc{k}.txt"
        path.write_bytes(text.encode("utf-8"))  # bytes: keep \r\n as is
        paths.append(path)
    expected = [tok.encode(t) for t in texts]
    for processes in (1, 2):
        for inputs in (texts, paths):
            got = encode_files_parallel(tok, inputs, processes=processes, piece_chars=997)
            assert [a.tolist() for a in got] == expected
            assert all(a.dtype == np.uint16 for a in got)
    with_eot = encode_files_parallel(tok, texts, processes=2, append_eot=True, piece_chars=5000)
    assert [a.tolist() for a in with_eot] == [e + [tok.eot_id] for e in expected]
    seen = []
    assert encode_files_parallel(tok, paths, processes=2, on_document=lambda i, ids: seen.append(i)) is None
    assert seen == [0, 1, 2, 3]


def test_parallel_encoding_errors(trained, tmp_path):
    tok = trained[300]
    with pytest.raises(DisallowedSpecialTokenError):
        encode_files_parallel(tok, ["x <|endoftext|>"], processes=2)
    assert encode_files_parallel(tok, ["x <|endoftext|>"], processes=2, allowed_special="all")[0][-1] == tok.eot_id
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(TokenizerError, match="latin1.txt"):
        encode_files_parallel(tok, [tmp_path / "latin1.txt"], processes=1)
    with pytest.raises(TypeError):
        list(iter_encode_parallel(tok, [b"bytes"], processes=1))
    no_eot = BPETokenizer.train(LOCAL_TEXT, 300, special_tokens=())
    with pytest.raises(TokenizerError, match="endoftext"):
        encode_files_parallel(no_eot, ["x"], append_eot=True)
