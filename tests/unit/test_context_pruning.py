"""Unit tests for services.context.pruning: which blocks a prune drops, and which a dedupe removes.

A prune drops the least relevant non-SYSTEM blocks (relevance optionally halved per half-life of
age; oldest first on a tie) until the rest fit the budget; a dedupe removes later copies of a
block with the same type and whitespace-normalized content, keeping the first with the best
relevance of its copies.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.context.pruning import decayed, duplicates, system_tokens, victims
from shared.contracts.context import Block, BlockType, Session, SessionMetrics

pytestmark = [pytest.mark.unit]

PROPERTY = settings(max_examples=300, deadline=None, database=None)
NOW = 1_700_000_000_000
NOT_SYSTEM = [kind for kind in BlockType if kind is not BlockType.SYSTEM]


def block(i: int, relevance: float, tokens: int = 10, *, kind: BlockType = BlockType.MEMORY, age_s: float = 0,
          content: str | None = None) -> Block:
    """A block `age_s` seconds old at NOW, with a stated token count."""
    return Block(id=f"b{i}", type=kind, content=f"block {i}" if content is None else content, relevance=relevance,
                 timestamp_ms=NOW - int(age_s * 1000), token_count=tokens)


def session(*blocks: Block) -> Session:
    return Session(session_id="s1", agent_id="agent", version=1, created_ms=0, updated_ms=0, max_tokens=10_000,
                   metrics=SessionMetrics(), blocks=list(blocks))


# --- victims -----------------------------------------------------------------------------------


def test_nothing_is_dropped_when_the_session_fits() -> None:
    """A session at or under the budget loses nothing."""
    blocks = [block(0, 0.1), block(1, 0.9)]
    assert victims(blocks, 20, NOW, 0) == []
    assert victims([], 0, NOW, 0) == []


def test_the_least_relevant_go_first_and_dropping_stops_once_the_rest_fit() -> None:
    """Blocks are dropped least relevant first, and no more once the remainder fits."""
    blocks = [block(0, 0.9), block(1, 0.1), block(2, 0.5), block(3, 0.7)]
    assert victims(blocks, 30, NOW, 0) == ["b1"]
    assert victims(blocks, 29, NOW, 0) == ["b1", "b2"]
    assert victims(blocks, 20, NOW, 0) == ["b1", "b2"]
    assert victims(blocks, 0, NOW, 0) == ["b1", "b2", "b3", "b0"]


def test_system_blocks_are_never_dropped_even_when_the_rest_cannot_fit() -> None:
    """SYSTEM blocks are never victims, even the least relevant, so a prune can leave a session over budget."""
    blocks = [block(0, 0.0, 50, kind=BlockType.SYSTEM), block(1, 0.8, 5, kind=BlockType.USER),
              block(2, 0.9, 5, kind=BlockType.TOOL)]
    assert victims(blocks, 55, NOW, 0) == ["b1"]
    assert victims(blocks, 10, NOW, 0) == ["b1", "b2"]
    assert victims([block(0, 0.0, 50, kind=BlockType.SYSTEM)], 10, NOW, 0) == []
    assert system_tokens(blocks) == 50


def test_ties_go_oldest_first_then_in_session_order() -> None:
    """Among equally relevant blocks the oldest is dropped first, and on the same timestamp the earlier one."""
    blocks = [block(0, 0.5, age_s=10), block(1, 0.5, age_s=30), block(2, 0.5, age_s=20), block(3, 0.5, age_s=30)]
    assert victims(blocks, 0, NOW, 0) == ["b1", "b3", "b2", "b0"]


def test_decay_halves_relevance_per_half_life_of_age() -> None:
    """Decayed relevance is relevance · 0.5^(age / half-life); no decay with half-life 0, none for future blocks."""
    old = block(0, 0.8, age_s=180)
    assert decayed(old, NOW, 60) == pytest.approx(0.8 * 0.5**3)
    assert decayed(old, NOW, 0) == 0.8
    assert decayed(block(1, 0.8, age_s=-60), NOW, 60) == 0.8


def test_with_decay_an_old_relevant_block_can_lose_to_a_newer_less_relevant_one() -> None:
    """With a half-life, an old block of high relevance is dropped before a newer one of lower relevance."""
    half_life = 60.0
    old = block(0, 0.9, age_s=120)  # 0.9 · 0.5² = 0.225
    middle = block(1, 0.5, age_s=60)  # 0.5 · 0.5 = 0.25
    new = block(2, 0.3, age_s=0)  # 0.3
    expected = {b.id: b.relevance * math.pow(0.5, (NOW - b.timestamp_ms) / 1000 / half_life)
                for b in (old, middle, new)}
    assert sorted(expected, key=expected.__getitem__) == ["b0", "b1", "b2"]
    assert victims([old, middle, new], 20, NOW, half_life) == ["b0"]
    assert victims([old, middle, new], 10, NOW, half_life) == ["b0", "b1"]
    assert victims([old, middle, new], 20, NOW, 0) == ["b2"]  # without decay the least relevant goes


@st.composite
def prunable(draw: st.DrawFn) -> tuple[list[Block], int, float]:
    """Random blocks (some SYSTEM, equal relevances and timestamps likely), a budget and a half-life."""
    blocks = []
    for i in range(draw(st.integers(0, 12))):
        blocks.append(Block(
            id=f"b{i}", type=draw(st.sampled_from(list(BlockType))), content="x",
            relevance=draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1))),
            timestamp_ms=NOW - draw(st.sampled_from([0, 1000, 60_000, 3_600_000, -5000])),
            token_count=draw(st.integers(0, 50))))
    total = sum(b.token_count for b in blocks)
    budget = draw(st.integers(0, total + 10))
    half_life = draw(st.sampled_from([0.0, 1.0, 60.0, 3600.0]))
    return blocks, budget, half_life


@PROPERTY
@given(prunable())
def test_after_the_victims_go_the_rest_fit_or_only_system_blocks_remain(case: tuple[list[Block], int, float]) -> None:
    """Dropping the victims brings the session within budget unless only SYSTEM blocks remain, and drops no more."""
    blocks, budget, half_life = case
    dropped = victims(blocks, budget, NOW, half_life)
    by_id = {b.id: b for b in blocks}
    assert len(set(dropped)) == len(dropped) and set(dropped) <= set(by_id)
    assert all(by_id[i].type is not BlockType.SYSTEM for i in dropped)
    rest = [b for b in blocks if b.id not in dropped]
    total = sum(b.token_count for b in rest)
    assert total <= budget or all(b.type is BlockType.SYSTEM for b in rest)
    if dropped:  # without the last victim the rest did not fit yet
        assert total + by_id[dropped[-1]].token_count > budget
    ranked = sorted((b for b in blocks if b.type is not BlockType.SYSTEM),
                    key=lambda b: (decayed(b, NOW, half_life), b.timestamp_ms, blocks.index(b)))
    assert dropped == [b.id for b in ranked[: len(dropped)]]


# --- duplicates ----------------------------------------------------------------------------------


def test_later_copies_go_and_the_first_keeps_the_best_relevance() -> None:
    """Later copies (same type, same whitespace-normalized text) are removed; the first takes their best relevance."""
    first = block(0, 0.2, content="the  sky\nis blue")
    change = duplicates(session(first, block(1, 0.7, content="the sky is blue "), block(2, 0.9, content="other"),
                                block(3, 0.4, content="\tthe sky  is\u00a0blue")))
    assert list(change.delete) == ["b1", "b3"]
    assert list(change.replace) == [first.model_copy(update={"relevance": 0.7})]
    assert list(change.add) == []


def test_a_first_copy_already_most_relevant_is_not_rewritten() -> None:
    """When the first copy is already the most relevant, the copies go and nothing is replaced."""
    change = duplicates(session(block(0, 0.9, content="same"), block(1, 0.3, content="same")))
    assert list(change.delete) == ["b1"]
    assert list(change.replace) == []


def test_blocks_of_different_types_or_different_text_are_not_duplicates() -> None:
    """The same text under another type, or text differing beyond whitespace (such as case), is kept."""
    change = duplicates(session(block(0, 0.5, kind=BlockType.TOOL, content="ok"),
                                block(1, 0.5, kind=BlockType.MEMORY, content="ok"),
                                block(2, 0.5, kind=BlockType.MEMORY, content="OK"),
                                block(3, 0.5, kind=BlockType.MEMORY, content="o k")))
    assert list(change.delete) == []
    assert list(change.replace) == []


texts_with_spacing = st.lists(st.sampled_from(["a", "b", " ", "  ", "\n", "\t"]), max_size=5).map("".join)


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from([BlockType.MEMORY, BlockType.TOOL]), texts_with_spacing,
                          st.sampled_from([0.0, 0.25, 0.5, 1.0])), max_size=10))
def test_a_dedupe_leaves_one_block_per_text_with_the_best_relevance(
        drawn: list[tuple[BlockType, str, float]]) -> None:
    """After a dedupe each (type, normalized text) appears once, as its first block, with its copies' best relevance."""
    blocks = [block(i, rel, kind=kind, content=text) for i, (kind, text, rel) in enumerate(drawn)]
    change = duplicates(session(*blocks))
    replaced = {b.id: b for b in change.replace}
    kept = [replaced.get(b.id, b) for b in blocks if b.id not in change.delete]
    groups: dict[tuple[BlockType, str], list[Block]] = {}
    for b in blocks:
        groups.setdefault((b.type, " ".join(b.content.split())), []).append(b)
    assert len(kept) == len(groups)
    for b in kept:
        group = groups[(b.type, " ".join(b.content.split()))]
        assert b.id == group[0].id
        assert b.relevance == max(copy.relevance for copy in group)
    assert all(replaced[i].relevance > next(b for b in blocks if b.id == i).relevance for i in replaced)
