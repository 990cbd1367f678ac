"""Metrics against values computed by hand (and the published NLTK/Papineni corpus BLEU example)."""
import math

import pytest

from nanogpt_np.eval.metrics import (accuracy, bits_per_byte, bleu_stats, corpus_bleu, f1_per_label, macro_f1,
                                normalize_label, perplexity)


def test_accuracy():
    assert accuracy(["a", "b", "a", "c"], ["a", "a", "a", "c"]) == 0.75
    assert accuracy(["x"], ["x"]) == 1.0
    with pytest.raises(ValueError, match="predictions"):
        accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])


def test_macro_f1_by_hand():
    pred = ["a", "b", "a", "c"]
    ref = ["a", "a", "a", "c"]
    # label a: TP=2 FP=0 FN=1 -> F1 = 4/5; label c: TP=1 -> 1.0; "b" is not a reference label
    assert f1_per_label(pred, ref) == {"a": 0.8, "c": 1.0}
    assert macro_f1(pred, ref) == pytest.approx(0.9)
    # asking for b too: TP=0 FP=1 FN=0 -> 0
    assert macro_f1(pred, ref, labels=["a", "b", "c"]) == pytest.approx(1.8 / 3)
    # two balanced classes, one always predicted: F1(pos) = 2*2/(4+2) = 2/3, F1(neg) = 0
    assert macro_f1(["pos"] * 4, ["pos", "pos", "neg", "neg"]) == pytest.approx(1 / 3)
    # a label with no TP/FP/FN scores 0 rather than dividing by zero
    assert f1_per_label(["a"], ["a"], labels=["a", "z"]) == {"a": 1.0, "z": 0.0}


def test_normalize_label():
    assert normalize_label("  Positive\nmore text") == "positive"
    assert normalize_label("   ") == ""


def test_bleu_by_hand():
    hyp = "the cat sat on the mat"
    ref = "the cat is on the mat"
    matches, totals, c, r = bleu_stats([hyp], [ref])
    assert matches == [5, 3, 1, 0] and totals == [6, 5, 4, 3] and (c, r) == (6, 6)
    assert corpus_bleu([hyp], [ref]) == 0.0                                   # no 4-gram match, no smoothing
    assert corpus_bleu([hyp], [ref], max_n=2) == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    # add-one for n > 1: p1 = 5/6, p2 = 4/6, p3 = 2/5, p4 = 1/4 -> (1/18)^(1/4); BP = 1 since c == r
    assert corpus_bleu([hyp], [ref], smoothing="add1") == pytest.approx((1 / 18) ** 0.25)


def test_bleu_brevity_penalty_and_clipping():
    # c = 2 < r = 6: BP = exp(1 - 6/2); both precisions are 1
    assert corpus_bleu(["the cat"], ["the cat sat on the mat"], max_n=2) == pytest.approx(math.exp(-2))
    # clipping: "the" appears once in the reference, so 1 of 4 unigrams counts; c=4 > r=2 -> BP = 1
    assert corpus_bleu(["the the the the"], ["the cat"], max_n=1) == pytest.approx(0.25)
    # closest reference length, ties -> shorter: hyp len 4, refs len 3 and 5 -> r = 3 -> BP = 1
    assert bleu_stats(["a b c d"], [["a b c", "a b c d e"]], max_n=1)[3] == 3
    assert corpus_bleu(["a b c d"], [["a b c", "a b c d e"]], max_n=1) == 1.0
    assert corpus_bleu([""], ["a b"]) == 0.0
    assert corpus_bleu(["a b c d"], ["a b c d"]) == 1.0


def test_bleu_published_example():
    """The corpus example from Papineni et al. as used in NLTK's documentation (published values)."""
    hyp1 = ("It is a guide to action which ensures that the military always obeys the commands of the "
            "party").split()
    ref1a = "It is a guide to action that ensures that the military will forever heed Party commands".split()
    ref1b = ("It is the guiding principle which guarantees the military forces always being under the "
             "command of the Party").split()
    ref1c = "It is the practical guide for the army always to heed the directions of the party".split()
    hyp2 = "he read the book because he was interested in world history".split()
    ref2a = "he was interested in world history because he read the book".split()
    hyps, refs = [hyp1, hyp2], [[ref1a, ref1b, ref1c], [ref2a]]
    assert corpus_bleu(hyps, refs, max_n=1) == pytest.approx(0.9655172413793104, abs=1e-12)
    assert corpus_bleu(hyps, refs, max_n=2) == pytest.approx(0.8242803277698696, abs=1e-12)
    assert corpus_bleu(hyps, refs) == pytest.approx(0.5920778868801042, abs=1e-12)


def test_bleu_errors():
    with pytest.raises(ValueError, match="hypotheses"):
        corpus_bleu(["a"], [])
    with pytest.raises(ValueError, match="smoothing"):
        corpus_bleu(["a"], ["a"], smoothing="exp")
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_bleu(["a"], [[]])


def test_perplexity_and_bits_per_byte():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50)) == pytest.approx(50)
    assert perplexity(1e6) == float("inf")
    # a uniform model over 256 byte values costs 8 bits per byte
    assert bits_per_byte(100 * math.log(256), 100) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
