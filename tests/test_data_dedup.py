"""Exact and near-duplicate removal with expected counts."""
import numpy as np

from nanogpt_np.data.dedup import ExactDedup, MinHasher, NearDedup, exact_key, jaccard, shingle_hashes


def _random_doc(rng, n_words=150):
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9)))
             for _ in range(n_words)]
    return " ".join(words)


def make_corpus(seed=0):
    """40 distinct docs, 8 exact duplicates (case/space changes), 6 near duplicates (2 words changed)."""
    rng = np.random.default_rng(seed)
    originals = [_random_doc(rng) for _ in range(40)]
    exact = [originals[i].upper().replace(" ", "  \n") for i in range(8)]
    near = []
    for i in range(10, 16):
        words = originals[i].split()
        words[5] = "CHANGED"
        words[100] = "altered"
        near.append(" ".join(words))
    docs = originals + exact + near
    order = rng.permutation(len(docs))
    # keep every original before its copies so "first one wins" keeps the originals
    docs = originals + [docs[j] for j in order if j >= 40]
    return originals, docs


def test_exact_key_normalises_case_and_whitespace():
    assert exact_key("Hello  World\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello  worlds")


def test_exact_and_near_counts():
    originals, docs = make_corpus()
    exact, near, hasher = ExactDedup(), NearDedup(), MinHasher()
    kept, n_exact, n_near = [], 0, 0
    for d in docs:
        if exact.is_duplicate(exact_key(d)):
            n_exact += 1
            continue
        if near.add(hasher.signature(d)) is not None:
            n_near += 1
            continue
        kept.append(d)
    assert (n_exact, n_near) == (8, 6)
    assert kept == originals


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(1)
    a = _random_doc(rng, 300)
    words = a.split()
    b = " ".join(words[:200] + [_random_doc(rng, 1) for _ in range(100)])
    true = jaccard(a, b)
    h = MinHasher(num_perm=256, seed=3)
    est = float(np.mean(h.signature(a) == h.signature(b)))
    assert 0.3 < true < 0.8
    assert abs(est - true) < 0.1
    assert MinHasher(seed=3).signature(a).tolist() == MinHasher(seed=3).signature(a).tolist()


def test_shingles_of_short_and_empty_text():
    assert len(shingle_hashes("abc")) == 1
    assert len(shingle_hashes("")) == 0
    assert len(shingle_hashes("abcdef", k=5)) == 2


def test_unrelated_docs_are_kept():
    rng = np.random.default_rng(5)
    near, hasher = NearDedup(), MinHasher()
    assert all(near.add(hasher.signature(_random_doc(rng))) is None for _ in range(2000 // 20))


def test_batched_signatures_equal_one_by_one():
    rng = np.random.default_rng(9)
    texts = [_random_doc(rng, int(n)) for n in rng.integers(1, 40, size=30)] + ["", "ab", "abcd", "x y"]
    h = MinHasher(num_perm=64, seed=1, chunk=100)  # a small chunk: texts straddle chunk borders
    batch = h.signatures(texts)
    single = np.stack([MinHasher(num_perm=64, seed=1).signatures([t])[0] for t in texts])
    np.testing.assert_array_equal(batch, single)
    # and equal to the plain definition: min over the shingle hashes of each permutation
    for t, row in zip(texts, batch):
        sh = shingle_hashes(t)
        if len(sh):
            expect = ((h.a[:, None] * sh[None, :] + h.b[:, None]) >> np.uint64(32)).min(axis=1)
            np.testing.assert_array_equal(row, expect.astype(np.uint32))
        else:
            assert (row == 0xFFFFFFFF).all()
