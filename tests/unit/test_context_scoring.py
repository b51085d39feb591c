"""Unit tests for services.context.scoring: BM25 and TF-IDF relevance of blocks to a query, in 0..1.

Expected values are computed here from the formulas in the module docstring (Okapi BM25 with
k1 1.2 and b 0.75 divided by the best score; the cosine of smoothed TF-IDF vectors), not by
calling the code under test.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.context.scoring import relevance, terms
from shared.contracts.context import RescoreMethod

pytestmark = [pytest.mark.unit]

METHODS = list(RescoreMethod)
PROPERTY = settings(max_examples=200, deadline=None, database=None)

WORDS = ["apple", "Apple", "banana", "cherry", "date", "東京", "straße", "über", "x1", "_", "42"]
texts = st.one_of(st.lists(st.sampled_from([*WORDS, " ", "\n", ", ", "!"]), max_size=12).map(" ".join),
                  st.text(max_size=30))


def bm25_idf(n: int, df: int) -> float:
    return math.log(1 + (n - df + 0.5) / (df + 0.5))


def bm25_term(tf: int, length: int, average: float) -> float:
    k1, b = 1.2, 0.75
    return tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / average))


def test_bm25_matches_a_hand_computed_example() -> None:
    """BM25 sums idf-weighted saturated term frequencies and divides by the best document's score."""
    documents = ["apple banana", "apple apple cherry", "dog"]
    # N = 3, lengths 2, 3, 1 (average 2); df(apple) = 2, df(cherry) = 1
    apple, cherry = bm25_idf(3, 2), bm25_idf(3, 1)
    assert apple == pytest.approx(math.log(1.6)) and cherry == pytest.approx(math.log(8 / 3))
    raw = [apple * bm25_term(1, 2, 2.0),
           apple * bm25_term(2, 3, 2.0) + cherry * bm25_term(1, 3, 2.0),
           0.0]
    assert raw[0] == pytest.approx(math.log(1.6) * 2.2 / 2.2)
    assert raw[1] == pytest.approx(math.log(1.6) * 4.4 / 3.65 + math.log(8 / 3) * 2.2 / 2.65)
    expected = [score / raw[1] for score in raw]
    assert relevance("apple cherry", documents, RescoreMethod.BM25) == pytest.approx(expected, abs=1e-6)
    assert relevance("apple cherry", documents, RescoreMethod.BM25)[1] == 1.0


def test_tfidf_matches_a_hand_computed_example() -> None:
    """TF-IDF relevance is the cosine of raw-count times smoothed-idf vectors of the query and the document."""
    documents = ["apple banana", "apple cherry cherry"]
    # N = 2: idf(apple) = ln(3/3) + 1 = 1; idf(banana) = idf(cherry) = ln(3/2) + 1 = c
    c = math.log(1.5) + 1
    query = {"apple": 1.0, "cherry": c}
    first = {"apple": 1.0, "banana": c}
    second = {"apple": 1.0, "cherry": 2 * c}

    def cosine(u: dict[str, float], v: dict[str, float]) -> float:
        dot = sum(w * v.get(t, 0.0) for t, w in u.items())
        return dot / (math.hypot(*u.values()) * math.hypot(*v.values()))

    expected = [cosine(query, first), cosine(query, second)]
    assert expected[0] == pytest.approx(1 / (1 + c * c))
    assert expected[1] == pytest.approx((1 + 2 * c * c) / math.sqrt((1 + c * c) * (1 + 4 * c * c)))
    assert relevance("cherry apple", documents, RescoreMethod.TFIDF) == pytest.approx(expected, abs=1e-6)
    twice = {"apple": 2.0, "cherry": c}  # a repeated query term counts twice in the query vector
    expected = [cosine(twice, first), cosine(twice, second)]
    assert expected[0] == pytest.approx(2 / math.sqrt((4 + c * c) * (1 + c * c)))
    assert relevance("Apple cherry apple", documents, RescoreMethod.TFIDF) == pytest.approx(expected, abs=1e-6)


def test_tfidf_counts_query_terms_absent_from_every_document() -> None:
    """A query term no document has still weighs in the query vector (idf ln(N+1) + 1), lowering every cosine."""
    documents = ["apple banana", "cherry"]
    c = math.log(3 / 2) + 1  # apple, banana
    absent = math.log(3) + 1  # zebra: df 0
    expected = c * c / (math.hypot(c, absent) * math.hypot(c, c))  # apple·apple over |query|·|document|
    assert relevance("apple zebra", documents, RescoreMethod.TFIDF) == pytest.approx([expected, 0.0], abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_the_document_repeating_the_query_term_ranks_first(method: RescoreMethod) -> None:
    """Among documents of equal length, the one repeating the query term most scores highest."""
    documents = ["apple banana cherry date", "apple apple apple date", "banana cherry date date",
                 "apple apple cherry date"]
    scores = relevance("apple", documents, method)
    assert max(range(len(documents)), key=scores.__getitem__) == 1
    assert scores[1] > scores[3] > scores[0] > scores[2] == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_scoring_is_case_insensitive(method: RescoreMethod) -> None:
    """Terms are lower-cased, in the query and in the documents, for any script."""
    documents = ["Apple BANANA", "Straße über Alles", "ÜBER cherry"]
    upper = relevance("APPLE ÜBER", documents, method)
    assert upper == relevance("apple über", [d.lower() for d in documents], method)
    assert all(score > 0 for score in upper)
    assert terms("ÄPFEL, Straße! x_1 42") == ["äpfel", "straße", "x_1", "42"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("query", ["", "   ", "!?, ..."])
def test_a_query_without_terms_scores_every_document_zero(method: RescoreMethod, query: str) -> None:
    """A query with no word characters gives every document 0."""
    assert relevance(query, ["apple", "banana split", ""], method) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("method", METHODS)
def test_an_empty_corpus_scores_nothing(method: RescoreMethod) -> None:
    """No documents, no scores."""
    assert relevance("apple", [], method) == []


@pytest.mark.parametrize("method", METHODS)
def test_no_shared_term_anywhere_scores_every_document_zero(method: RescoreMethod) -> None:
    """When no document shares a term with the query, every score is 0 (BM25 has no best to divide by)."""
    assert relevance("zebra", ["apple", "banana split", "", "!!"], method) == [0.0, 0.0, 0.0, 0.0]


@PROPERTY
@given(query=texts, documents=st.lists(texts, max_size=8), method=st.sampled_from(METHODS))
def test_scores_are_in_range_and_zero_without_a_shared_term(query: str, documents: list[str],
                                                            method: RescoreMethod) -> None:
    """Every score is in 0..1, one per document; a document sharing no term with the query scores exactly 0."""
    scores = relevance(query, documents, method)
    assert len(scores) == len(documents)
    assert all(0.0 <= score <= 1.0 for score in scores)
    wanted = set(terms(query))
    for document, score in zip(documents, scores, strict=True):
        if not wanted & set(terms(document)):
            assert score == 0.0
    assert scores == relevance(query, list(documents), method)


@PROPERTY
@given(query=texts, documents=st.lists(texts, min_size=1, max_size=8))
def test_the_best_bm25_document_scores_exactly_one(query: str, documents: list[str]) -> None:
    """When any document shares a query term, the best BM25 score is exactly 1.0, and only matching ones are above 0."""
    scores = relevance(query, documents, RescoreMethod.BM25)
    wanted = set(terms(query))
    matching = [bool(wanted & set(terms(document))) for document in documents]
    if any(matching):
        assert max(scores) == 1.0
        assert all(score > 0 for score, match in zip(scores, matching, strict=True) if match)
    else:
        assert scores == [0.0] * len(documents)
