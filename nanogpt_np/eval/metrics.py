"""Evaluation metrics, small and dependency-free: accuracy, macro F1, corpus BLEU, perplexity, bits per byte.

Everything here works on plain Python lists of strings (labels) or tokens; nothing needs the model.

Conventions, stated once:
  * accuracy and F1 compare strings exactly (the caller normalises, e.g. strips whitespace, first).
  * macro F1 averages the per-label F1 over `labels`; by default the labels are the sorted set of
    reference labels, so a prediction outside that set (e.g. a generation that is no label at all) counts
    as a miss for the true label but does not add a class of its own. F1 of one label is
    2*TP / (2*TP + FP + FN), and 0 when that denominator is 0.
  * corpus BLEU is Papineni et al. (2002): clipped n-gram counts summed over the whole corpus (not averaged
    per sentence), geometric mean of the n-gram precisions for n = 1..max_n with equal weights, times the
    brevity penalty BP = 1 if c > r else exp(1 - r/c), where c is the total hypothesis length and r the
    sum over sentences of the reference length closest to the hypothesis length (ties -> the shorter one).
    Smoothing: none by default (any n-gram precision of 0 makes BLEU 0); smoothing="add1" adds 1 to both
    the numerator and the denominator of the precisions for n > 1 (Lin & Och 2004; "method 2" in Chen &
    Cherry 2014). An empty hypothesis corpus (c = 0) has BLEU 0. Scores are in [0, 1], not percentages.
    Strings are tokenised by whitespace (str.split); pass token lists for any other tokenisation.
  * perplexity = exp(mean cross-entropy in nats per token).
  * bits per byte = total cross-entropy in nats / (ln 2 * number of UTF-8 bytes of the text): unlike
    per-token loss it does not depend on the tokenizer, so a char model and a BPE model compare directly.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["accuracy", "f1_per_label", "macro_f1", "corpus_bleu", "bleu_stats", "perplexity",
           "bits_per_byte", "normalize_label"]

Tokens = Union[str, Sequence[str]]


def _check_pair(predictions, references):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(references) == 0:
        raise ValueError("no examples to score")


def normalize_label(text: str) -> str:
    """The label a generation stands for: stripped, lower-cased, first line only ('' if nothing)."""
    text = text.strip()
    return text.splitlines()[0].strip().lower() if text else ""


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions exactly equal to their reference."""
    _check_pair(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def f1_per_label(predictions: Sequence[str], references: Sequence[str],
                 labels: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """label -> F1 = 2TP / (2TP + FP + FN) (0 when no TP, FP or FN); labels default to sorted(set(references))."""
    _check_pair(predictions, references)
    labels = sorted(set(references)) if labels is None else list(labels)
    out = {}
    for lab in labels:
        tp = sum(p == lab and r == lab for p, r in zip(predictions, references))
        fp = sum(p == lab and r != lab for p, r in zip(predictions, references))
        fn = sum(p != lab and r == lab for p, r in zip(predictions, references))
        out[lab] = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    return out


def macro_f1(predictions: Sequence[str], references: Sequence[str],
             labels: Optional[Sequence[str]] = None) -> float:
    """Unweighted mean of the per-label F1 scores (see f1_per_label for the label set)."""
    per = f1_per_label(predictions, references, labels)
    if not per:
        raise ValueError("macro_f1 needs at least one label")
    return sum(per.values()) / len(per)


# ----------------------------------------------------------------------------------------------- BLEU

def _tokens(x: Tokens) -> List[str]:
    return x.split() if isinstance(x, str) else list(x)


def _ngrams(tokens: List[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu_stats(hypotheses: Sequence[Tokens], references: Sequence[Union[Tokens, Sequence[Tokens]]],
               max_n: int = 4) -> Tuple[List[int], List[int], int, int]:
    """Corpus sufficient statistics: (matches[n-1], totals[n-1], c = hyp length, r = effective ref length).

    hypotheses[i] is a string or a token list. references[i] is either one reference string, or a list of
    references (each a string or a token list) for hypothesis i. Note: a single tokenised reference must be
    wrapped, [["the", "cat"]], because a bare list of strings is read as several string references.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    matches = [0] * max_n
    totals = [0] * max_n
    c = r = 0
    for hyp, refs in zip(hypotheses, references):
        hyp = _tokens(hyp)
        refs = [_tokens(refs)] if isinstance(refs, str) else [_tokens(x) for x in refs]
        if not refs:
            raise ValueError("every hypothesis needs at least one reference")
        c += len(hyp)
        r += min((abs(len(x) - len(hyp)), len(x)) for x in refs)[1]   # closest length, ties -> shorter
        for n in range(1, max_n + 1):
            h = _ngrams(hyp, n)
            best = Counter()                     # max count of each n-gram over the references (clipping)
            for x in refs:
                best |= _ngrams(x, n)
            matches[n - 1] += sum(min(k, best[g]) for g, k in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    return matches, totals, c, r


def corpus_bleu(hypotheses: Sequence[Tokens], references: Sequence[Union[Tokens, Sequence[Tokens]]],
                max_n: int = 4, smoothing: Optional[str] = None) -> float:
    """Corpus-level BLEU in [0, 1] (see the module docstring for the exact definition and smoothing)."""
    if smoothing not in (None, "add1"):
        raise ValueError(f"smoothing must be None or 'add1', got {smoothing!r}")
    matches, totals, c, r = bleu_stats(hypotheses, references, max_n)
    if c == 0:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        m, t = matches[n - 1], totals[n - 1]
        if smoothing == "add1" and n > 1:
            m, t = m + 1, t + 1
        if m == 0 or t == 0:
            return 0.0
        log_p += math.log(m / t) / max_n
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_p)


# ----------------------------------------------------------------------------------------------- LM losses

def perplexity(mean_loss_nats: float) -> float:
    """exp(mean cross-entropy per token, in nats); inf if it overflows."""
    try:
        return math.exp(mean_loss_nats)
    except OverflowError:
        return float("inf")


def bits_per_byte(total_loss_nats: float, n_bytes: int) -> float:
    """Total cross-entropy (nats, summed over every predicted token) per UTF-8 byte of that text, in bits."""
    if n_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {n_bytes}")
    return total_loss_nats / (math.log(2) * n_bytes)
