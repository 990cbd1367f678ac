"""Exactness against GPT-2: loading OpenAI's encoder.json + vocab.bpe must give GPT-2's own ids.

The reference is an independent, deliberately naive implementation of GPT-2's BPE written below
(strings, not ids; the textbook loop). If tiktoken is installed it is compared too. Skipped when the
shared GPT-2 files are absent.
"""
import json
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings, strategies as st

from nanogpt_np.tokenizers.bpe import BPETokenizer, DisallowedSpecialTokenError, encode_files_parallel
from nanogpt_np.tokenizers.load import load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2_DIR = SHARED / "gpt2"
ENCODER, MERGES = GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"

pytestmark = pytest.mark.skipif(not (ENCODER.is_file() and MERGES.is_file()), reason="GPT-2 files not in ../shared/data/gpt2")

# Hard cases for a pre-split + BPE: contractions (GPT-2 only knows lower-case ones), CRLF, runs of
# spaces/tabs/newlines, digits, non-Latin scripts, emoji with joiners and skin tones, odd whitespace.
EXTRAS = (
    "Hello world! It's, I'm, you're, we've, they'll, she'd, don't. IT'S I'M 'twas ''quoted''\r\n"
    "Windows line\r\n\r\n  two spaces   three    four\t\ttabs \t mixed\n\n\n   \n"
    "12345 3.14159 1,000,000 007 ²³ ٣٤٥ ⅷ 2024-01-01T12:00:00Z\n"
    "日本語のテキスト 中文 한국어 Ελληνικά русский עברית العربية हिन्दी ไทย\n"
    "😀🎉👍🏽 👨‍👩‍👧 🇫🇷 hi😀there café naïve Ünïcödé ﬁ\u00a0nbsp\u2009thin \u200bzw \ufeffbom \u3000ideo\n"
    "“curly” ‘quotes’ — dash… ellipsis «guillemets» ¿qué? ¡sí!\x00\x01\x1f\x7f control\n"
    "    def f(x):\n        return x ** 2  # code\n<|endoftext|> as plain text, <|endoftext |>\n"
    "trailing spaces   \n"
    "long runs (more than 256 bytes in one chunk): " + "1" * 700 + " " * 700 + "x" + "a" * 600 + " " + "ab" * 400
    + " " + "😀" * 100 + "\n" * 300 + "end"
)


# ---------------------------------------------------------------------------------------------------
# The naive reference: GPT-2's algorithm on strings, written independently of nanogpt_np.tokenizers.bpe
# ---------------------------------------------------------------------------------------------------

def reference_byte_chars():
    """Byte -> character: printable Latin-1 bytes as themselves, the rest as chr(256 + n) in order."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class NaiveGPT2:
    PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self):
        self.encoder = json.loads(ENCODER.read_text(encoding="utf-8"))
        lines = MERGES.read_text(encoding="utf-8").split("\n")[1:]
        self.rank = {tuple(line.split(" ")): k for k, line in enumerate(lines) if line}
        self.byte_chars = reference_byte_chars()
        self.memo = {}  # word -> tokens (only to keep the test quick; it does not change the result)

    def bpe(self, word):
        """Repeatedly merge the lowest-ranked adjacent pair (all its occurrences), until none is ranked."""
        if word in self.memo:
            return self.memo[word]
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.rank[p], p) for p in zip(parts, parts[1:]) if p in self.rank]
            if not ranked:
                break
            _, (first, second) = min(ranked)
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    out.append(first + second)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        self.memo[word] = parts
        return parts

    def encode(self, text):
        ids = []
        for chunk in self.PATTERN.findall(text):
            word = "".join(self.byte_chars[b] for b in chunk.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(word))
        return ids


@pytest.fixture(scope="module")
def gpt2():
    return BPETokenizer.from_gpt2_files(ENCODER, MERGES)


@pytest.fixture(scope="module")
def naive():
    return NaiveGPT2()


@pytest.fixture(scope="module")
def corpus():
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else ""
    return text + EXTRAS


# ---------------------------------------------------------------------------------------------------

def test_known_anchors(gpt2):
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256 and len(gpt2.merges) == 50000
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    with pytest.raises(DisallowedSpecialTokenError):
        gpt2.encode("<|endoftext|>")
    plain = gpt2.encode("<|endoftext|>", allowed_special="none")
    assert 50256 not in plain and gpt2.decode(plain) == "<|endoftext|>"


def test_whole_corpus_equals_naive_reference(gpt2, naive, corpus):
    assert len(corpus) > 1000
    assert gpt2.encode_ordinary(corpus) == naive.encode(corpus)
    ascii_part = corpus[: -len(EXTRAS)] or "plain ASCII text, it's 123\r\n  ok\n"
    assert ascii_part.isascii()  # tiny Shakespeare is pure ASCII: the fast pre-split path
    assert gpt2.encode_ordinary(ascii_part) == naive.encode(ascii_part)
    for line in EXTRAS.splitlines(keepends=True):  # piece by piece too (fresh contexts)
        assert gpt2.encode(line, allowed_special="none") == naive.encode(line)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_random_unicode_equals_naive_reference(gpt2, naive, text):
    assert gpt2.encode_ordinary(text) == naive.encode(text)
    assert gpt2.decode(gpt2.encode_ordinary(text)) == text


def test_parallel_corpus_encoding_equals_reference(gpt2, naive, corpus):
    got = encode_files_parallel(gpt2, [corpus, EXTRAS], processes=2, allowed_special="none", piece_chars=50_000)
    assert got[0].tolist() == naive.encode(corpus)
    assert got[1].tolist() == naive.encode(EXTRAS)


def test_tiktoken_agrees_if_installed(gpt2, corpus):
    tiktoken = pytest.importorskip("tiktoken")
    # tiktoken's "gpt2" would download its files; build the same encoding from the shared ones
    chars = reference_byte_chars()
    to_byte = {c: b for b, c in chars.items()}
    encoder = json.loads(ENCODER.read_text(encoding="utf-8"))
    ranks = {bytes(to_byte[c] for c in token): i for token, i in encoder.items() if token != "<|endoftext|>"}
    enc = tiktoken.Encoding("gpt2-local", pat_str=BPETokenizer.GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    assert gpt2.encode_ordinary(corpus) == enc.encode_ordinary(corpus)
    text = "a<|endoftext|>b"
    assert gpt2.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    for text in ("\ud800", "a\ud800b \udfff\udfff x", "\ud83d\ude00 \ude00\ud83d", "\ud800\ud800\udc00"):
        assert gpt2.encode(text) == enc.encode(text)


def test_lone_surrogates_encode_like_tiktoken(gpt2):
    """tiktoken turns a surrogate that is not half of a pair into U+FFFD before encoding (ids checked
    against tiktoken 0.14.0 built from these files); a valid pair is the character it spells."""
    assert gpt2.encode("\ud800") == [4210] == gpt2.encode("\ufffd")
    assert gpt2.encode("a\ud800b") == [64, 4210, 65]
    assert gpt2.encode("hello \ud800world") == [31373, 20543, 6894]        # " \ufffd" is one chunk
    assert gpt2.encode("\ud83d\ude00") == [47249, 222] == gpt2.encode("\U0001F600")
    assert gpt2.encode("\ud800<|endoftext|>", allowed_special="all") == [4210, 50256]


def test_known_difference_from_tiktoken_newer_unicode_tables(gpt2):
    """Documented in the README and bpe.py: the `regex` module's Unicode tables are newer than tiktoken's, so a
    recently assigned letter such as U+A7CE joins the letters beside it in one chunk here, while tiktoken
    (which does not know it as a letter) cuts it out. With GPT-2's merges the ids come out the same."""
    from nanogpt_np.tokenizers.bpe import split_chunks
    assert regex.match(r"\p{L}", "\ua7ce")
    assert split_chunks("a\ua7cea") == ["a\ua7cea"]
    assert gpt2.encode("a\ua7cea") == gpt2.encode("a") + gpt2.encode("\ua7ce") + gpt2.encode("a")


def test_saved_files_reproduce_gpt2(gpt2, corpus, tmp_path):
    sample = corpus[:100_000] + EXTRAS
    expected = gpt2.encode_ordinary(sample)
    gpt2.save(tmp_path / "tokenizer.json")
    assert BPETokenizer.load(tmp_path / "tokenizer.json").encode_ordinary(sample) == expected
    gpt2.save_gpt2_files(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "encoder.json").read_text(encoding="utf-8")) == \
        json.loads(ENCODER.read_text(encoding="utf-8"))
    original = [l for l in MERGES.read_text(encoding="utf-8").split("\n")[1:] if l]
    copied = [l for l in (tmp_path / "copy" / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if l]
    assert copied == original
    for path in (GPT2_DIR, tmp_path / "copy", tmp_path / "tokenizer.json", ENCODER):
        assert load_tokenizer(path).encode_ordinary(sample) == expected
