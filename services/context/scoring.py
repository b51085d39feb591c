"""Relevance of blocks to a query: Okapi BM25 or TF-IDF cosine, each giving 0..1.

The corpus is the blocks being scored (a session's non-SYSTEM blocks), so document frequencies
are the session's own. Terms are lower-cased Unicode word characters (`\\w+`).

* BM25: idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)); a block's score is
  sum over query terms of idf · tf·(k1 + 1) / (tf + k1·(1 - b + b·len/avg_len)), k1 = 1.2, b = 0.75.
  BM25 is unbounded, so scores are divided by the best one: the best block gets 1.0, a block
  sharing no term with the query 0.0.
* TF-IDF: tf is the raw count, idf(t) = ln((1 + N) / (1 + df)) + 1 (smoothed, as scikit-learn);
  the relevance is the cosine of the block's and the query's vectors, already in 0..1.

Scores are rounded to 6 decimals so a rescore stores the same bytes on every replica.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from shared.contracts.context import RescoreMethod

_TERM = re.compile(r"\w+")
K1 = 1.2
B = 0.75
DIGITS = 6


def terms(text: str) -> list[str]:
    """The terms of a text, lower-cased."""
    return _TERM.findall(text.lower())


def relevance(query: str, documents: Sequence[str], method: RescoreMethod) -> list[float]:
    """Relevance of each document to `query`, in 0..1, in the documents' order."""
    bags = [Counter(terms(document)) for document in documents]
    query_terms = Counter(terms(query))
    if not bags or not query_terms:
        return [0.0] * len(bags)
    document_frequency = Counter(term for bag in bags for term in bag)
    if method is RescoreMethod.BM25:
        scores = _bm25(query_terms, bags, document_frequency)
    else:
        scores = _tfidf_cosine(query_terms, bags, document_frequency)
    return [round(min(max(score, 0.0), 1.0), DIGITS) for score in scores]


def _bm25(query: Counter[str], bags: list[Counter[str]], df: Counter[str]) -> list[float]:
    n = len(bags)
    lengths = [sum(bag.values()) for bag in bags]
    average = sum(lengths) / n or 1.0
    idf = {term: math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5)) for term in query}
    raw = []
    for bag, length in zip(bags, lengths, strict=True):
        norm = K1 * (1 - B + B * length / average)
        raw.append(sum(idf[t] * bag[t] * (K1 + 1) / (bag[t] + norm) for t in query if bag[t]))
    best = max(raw)
    return [score / best if best > 0 else 0.0 for score in raw]


def _tfidf_cosine(query: Counter[str], bags: list[Counter[str]], df: Counter[str]) -> list[float]:
    n = len(bags)

    def idf(term: str) -> float:
        return math.log((1 + n) / (1 + df[term])) + 1

    query_vector = {term: count * idf(term) for term, count in query.items()}
    query_norm = math.sqrt(sum(w * w for w in query_vector.values()))
    scores = []
    for bag in bags:
        vector = {term: count * idf(term) for term, count in bag.items()}
        norm = math.sqrt(sum(w * w for w in vector.values()))
        dot = sum(weight * vector.get(term, 0.0) for term, weight in query_vector.items())
        scores.append(dot / (norm * query_norm) if norm and query_norm else 0.0)
    return scores
