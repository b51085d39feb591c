"""Unit tests for services.context.rendering: a session's blocks rendered into a token budget.

The acceptance property of issue 6 is checked on random sessions (every block type, contents with
unicode, whitespace and strings that look like tokenizer special tokens, random relevance, random
budgets and render settings): the text never exceeds the budget as counted by the store's
tokenizer, SYSTEM blocks are always in it (or the render is refused exactly when they alone do not
fit), relevance is preferred among TOOL/MEMORY/KNOWLEDGE blocks, the kept conversation is the
newest contiguous run of turns, and the same blocks always render to the same bytes.

When no block had to be trimmed (seen by wrapping `_least_valued`), the selection is also checked
to be greedy: the turn run ends at a turn that did not fit, and every eligible block left out did
not fit beside those put in. A second property gives blocks a stored `token_count` below their real
count, so the selection's estimate is short and the final trim (count the text for real, drop the
least valued block) runs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from unittest import mock

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from services.context import rendering
from services.context.rendering import (
    BY_RELEVANCE,
    SEPARATOR,
    TURNS,
    Rendered,
    RenderSettings,
    header,
    ranked_by_relevance,
    render,
    segment,
    segment_tokens,
)
from services.context.tokens import count_tokens
from shared.contracts.context import Block, BlockType
from shared.errors import ContextTooLarge

pytestmark = [pytest.mark.unit]

PROPERTY = settings(max_examples=300, deadline=None, database=None)

SPECIAL_LOOKING = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>",
                   "<|im_start|>", "<|im_end|>", "<|", "|>"]
PIECES = [*SPECIAL_LOOKING, " ", "  ", "\n", "\n\n", "\r\n", "\t", "\u00a0", "\u200d", "\u3000", "\x00", "hello",
          " world", "東京", "Привет", "🙂", "👨\u200d👩\u200d👧", "e\u0301", "'s", "1234567", "!!", "{}", "[SYSTEM]",
          "[TOOL git__git_status]", "```"]
contents = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=12).map("".join),
    st.text(max_size=40),
    st.text(alphabet=" \n\t\r", max_size=8),
)
relevances = st.one_of(st.sampled_from([0.0, 0.05, 0.5, 0.5, 1.0]), st.floats(0, 1))
tool_names = st.one_of(st.none(), st.just(""), st.sampled_from(["git__git_status", "time__get_current_time"]),
                       st.text(max_size=12))


def make_block(i: int, kind: BlockType, content: str, relevance: float = 1.0, *, tool: str | None = None,
               token_count: int | None = None) -> Block:
    """A stored block as the store makes it (token_count is the content's real count unless given)."""
    return Block(id=f"b{i}", type=kind, content=content, relevance=relevance, timestamp_ms=1_000 + i,
                 metadata={} if tool is None else {"tool": tool},
                 token_count=count_tokens(content) if token_count is None else token_count)


@st.composite
def sessions(draw: st.DrawFn, *, honest: bool) -> list[Block]:
    """Up to 12 blocks of random types; `honest=False` may understate each block's token_count."""
    blocks = []
    for i in range(draw(st.integers(0, 12))):
        content = draw(contents)
        kind = draw(st.sampled_from(list(BlockType)))
        real = count_tokens(content)
        stated = real if honest else draw(st.one_of(st.just(0), st.integers(0, real)))
        tool = draw(tool_names) if kind is BlockType.TOOL else None
        blocks.append(make_block(i, kind, content, draw(relevances), tool=tool, token_count=stated))
    return blocks


def system_alone(blocks: Sequence[Block]) -> int:
    """Tokens of the SYSTEM blocks rendered on their own."""
    return count_tokens(SEPARATOR.join(segment(b) for b in blocks if b.type is BlockType.SYSTEM))


@st.composite
def cases(draw: st.DrawFn, *, honest: bool) -> tuple[list[Block], RenderSettings]:
    """A session and render settings; budgets range from below the SYSTEM blocks to above everything."""
    blocks = draw(sessions(honest=honest))
    everything = count_tokens(SEPARATOR.join(map(segment, blocks)))
    floor = system_alone(blocks)
    top = max(everything, sum(map(segment_tokens, blocks))) + 10
    budget = draw(st.one_of(st.integers(1, top), st.integers(max(floor, 1), top),
                            st.sampled_from([max(floor - 1, 1), max(floor, 1), floor + 1])))
    share = draw(st.one_of(st.sampled_from([0.1, 0.5, 1.0]), st.floats(0.01, 1.0)))
    min_relevance = draw(st.one_of(st.sampled_from([0.0, 0.05, 0.5, 1.0]), st.floats(0, 1)))
    return blocks, RenderSettings(budget_tokens=budget, recent_share=share, min_relevance=min_relevance)


def check_render(blocks: list[Block], options: RenderSettings) -> Rendered | None:
    """Assert properties (a) to (f) of one render; the render, or None when it was refused."""
    budget = options.budget_tokens
    floor = system_alone(blocks)
    if floor > budget:  # (b) refused exactly when the SYSTEM blocks alone do not fit, saying so
        with pytest.raises(ContextTooLarge) as refused:
            render(blocks, options)
        assert refused.value.data == {"limit": budget, "size": floor}
        event("refused")
        return None
    out = render(blocks, options)  # raising here would fail the property too

    # (a) never above the budget, by the store's tokenizer, and `tokens` is that count
    assert out.tokens == count_tokens(out.text) <= budget

    # (b) every SYSTEM block is in
    for block in blocks:
        if block.type is BlockType.SYSTEM:
            assert block.id in out.included and block.content in out.text

    # (d) included and omitted partition the ids; included is in session order; text is their segments
    ids = [b.id for b in blocks]
    included = set(out.included)
    assert included.isdisjoint(out.omitted)
    assert len(out.included) + len(out.omitted) == len(ids) and included | set(out.omitted) == set(ids)
    assert out.included == [i for i in ids if i in included]
    assert out.text == SEPARATOR.join(segment(b) for b in blocks if b.id in included)
    ranked = [b for b in blocks if b.type in BY_RELEVANCE]
    assert all(b.relevance >= options.min_relevance for b in ranked if b.id in included)

    # (c) an eligible block left out was costlier than every less relevant block put in
    for left_out in (b for b in ranked if b.relevance >= options.min_relevance and b.id not in included):
        for put_in in (c for c in ranked if c.id in included and c.relevance < left_out.relevance):
            assert segment_tokens(left_out) > segment_tokens(put_in), (left_out, put_in)

    # (e) the turns kept are a contiguous run ending at the newest turn
    kept = [b.id in included for b in blocks if b.type in TURNS]
    assert kept == sorted(kept), kept  # all False, then all True

    # (f) the same blocks, a deep copy, or a round trip through JSON render to the same bytes
    for same in (blocks, copy.deepcopy(blocks), [Block.model_validate_json(b.model_dump_json()) for b in blocks]):
        again = render(same, options)
        assert again.text.encode() == out.text.encode() and again == out

    event("all eligible in" if all(b.id in included for b in ranked if b.relevance >= options.min_relevance)
          else "some eligible left out")
    return out


def check_fill(blocks: list[Block], options: RenderSettings, out: Rendered) -> None:
    """Assert that a render which needed no trim left nothing out that would still have fit.

    The turn run ends at a turn that did not fit the rest of the turns' share, and every eligible
    TOOL/MEMORY/KNOWLEDGE block left out did not fit beside the blocks put in (by segment estimates).
    """
    budget = options.budget_tokens
    included = set(out.included)
    used = sum(segment_tokens(b) for b in blocks if b.id in included)
    system = sum(segment_tokens(b) for b in blocks if b.type is BlockType.SYSTEM)
    turns = [b for b in blocks if b.type in TURNS]
    kept_turns = [b for b in turns if b.id in included]
    if len(kept_turns) < len(turns):
        next_turn = turns[len(turns) - len(kept_turns) - 1]
        room = min(budget - system, int(budget * options.recent_share)) - sum(map(segment_tokens, kept_turns))
        assert segment_tokens(next_turn) > room, (next_turn, room)
    eligible = [b for b in blocks if b.type in BY_RELEVANCE and b.relevance >= options.min_relevance]
    for left_out in eligible:
        if left_out.id not in included:
            assert used + segment_tokens(left_out) > budget, (left_out, used)


def render_and_check(blocks: list[Block], options: RenderSettings) -> Rendered | None:
    """check_render, plus check_fill when the selection's estimate was enough (no block was trimmed)."""
    with mock.patch.object(rendering, "_least_valued", wraps=rendering._least_valued) as trim:
        out = check_render(blocks, options)
    if out is not None:
        if trim.called:
            event("estimate short: trimmed")
        else:
            check_fill(blocks, options, out)
    return out


@PROPERTY
@given(cases(honest=True))
def test_render_properties_hold_for_random_sessions(case: tuple[list[Block], RenderSettings]) -> None:
    """A render never exceeds its budget, keeps SYSTEM, prefers relevance and recent turns, and is deterministic."""
    render_and_check(*case)


@PROPERTY
@given(cases(honest=False))
def test_render_properties_hold_when_token_counts_are_understated(case: tuple[list[Block], RenderSettings]) -> None:
    """With understated token counts the final count-and-trim still keeps every render property."""
    render_and_check(*case)


def test_stated_token_counts_are_never_short_on_these_contents() -> None:
    """A segment's estimate covers its real tokens for the awkward contents the properties draw from."""
    blocks = [make_block(i, kind, piece * 3, tool="git__git_status")
              for i, (kind, piece) in enumerate((k, p) for k in BlockType for p in PIECES)]
    for block in blocks:
        assert count_tokens(segment(block) + SEPARATOR) <= segment_tokens(block)
    assert count_tokens(SEPARATOR.join(map(segment, blocks))) <= sum(map(segment_tokens, blocks))


def sample_session() -> list[Block]:
    """One block of each kind, plus one under the default minimum relevance."""
    return [
        make_block(0, BlockType.SYSTEM, "You are a careful assistant."),
        make_block(1, BlockType.USER, "What changed in the repository?"),
        make_block(2, BlockType.TOOL, "M README.md\n?? notes.txt", 0.9, tool="git__git_status"),
        make_block(3, BlockType.AGENT, "README.md was modified and notes.txt is new."),
        make_block(4, BlockType.MEMORY, "The user prefers short answers.", 0.6),
        make_block(5, BlockType.KNOWLEDGE, "git status lists changed files.", 0.02),
        make_block(6, BlockType.USER, "Thanks <|endoftext|> bye"),
    ]


def test_everything_eligible_is_included_when_everything_fits() -> None:
    """With room for every block, every block but those under min_relevance is rendered, in session order."""
    blocks = sample_session()
    out = render(blocks, RenderSettings(budget_tokens=10_000, recent_share=0.5, min_relevance=0.05))
    assert out.included == ["b0", "b1", "b2", "b3", "b4", "b6"]
    assert out.omitted == ["b5"]
    assert out.text == SEPARATOR.join(segment(b) for b in blocks if b.id != "b5")
    assert out.text.startswith("[SYSTEM]\nYou are a careful assistant.\n\n[USER]\n")
    assert "[TOOL git__git_status]\nM README.md" in out.text
    assert out.tokens == count_tokens(out.text)


def test_a_budget_of_just_the_system_blocks_renders_only_them() -> None:
    """A budget exactly the size of the SYSTEM blocks renders them and nothing else."""
    blocks = [*sample_session(), make_block(7, BlockType.SYSTEM, "Answer in English.")]
    budget = system_alone(blocks)
    out = render(blocks, RenderSettings(budget_tokens=budget, recent_share=0.5, min_relevance=0.0))
    assert out.included == ["b0", "b7"]
    assert out.text == "[SYSTEM]\nYou are a careful assistant.\n\n[SYSTEM]\nAnswer in English."
    assert out.tokens == budget


def test_a_budget_below_the_system_blocks_is_refused() -> None:
    """A budget one token short of the SYSTEM blocks raises ContextTooLarge with the limit and the size."""
    blocks = sample_session()
    size = system_alone(blocks)
    with pytest.raises(ContextTooLarge) as refused:
        render(blocks, RenderSettings(budget_tokens=size - 1, recent_share=0.5, min_relevance=0.0))
    assert refused.value.data == {"limit": size - 1, "size": size}


def test_an_empty_session_renders_to_nothing() -> None:
    """A session without blocks renders to the empty text of 0 tokens."""
    assert render([], RenderSettings(budget_tokens=1, recent_share=0.5, min_relevance=0.0)) == Rendered("", 0, [], [])


def test_the_turn_run_ends_at_the_first_turn_that_does_not_fit() -> None:
    """A long turn ends the recent run, so an older short turn is left out although it would fit."""
    blocks = [make_block(0, BlockType.USER, "hi"), make_block(1, BlockType.AGENT, "word " * 200),
              make_block(2, BlockType.USER, "and now?")]
    out = render(blocks, RenderSettings(budget_tokens=100, recent_share=0.5, min_relevance=0.0))
    assert out.included == ["b2"]


def test_turns_are_limited_to_the_recent_share_of_the_budget() -> None:
    """Turns take at most recent_share of the budget; relevance-ranked blocks can use the rest."""
    turns = [make_block(i, BlockType.USER, f"turn number {i} says something") for i in range(10)]
    cost = segment_tokens(turns[0])
    assert all(segment_tokens(t) == cost for t in turns)
    memory = make_block(10, BlockType.MEMORY, "remember this", 0.5)
    budget = 10 * cost
    out = render([*turns, memory], RenderSettings(budget_tokens=budget, recent_share=0.35, min_relevance=0.0))
    fitting = int(budget * 0.35) // cost
    assert out.included == [t.id for t in turns[-fitting:]] + ["b10"]


def test_relevance_ranked_blocks_go_in_most_relevant_first_newer_first_on_a_tie() -> None:
    """With room for two of three equal-sized blocks, the most relevant and, on a tie, the newer one go in."""
    blocks = [make_block(0, BlockType.MEMORY, "alpha fact", 0.5), make_block(1, BlockType.MEMORY, "first fact", 0.9),
              make_block(2, BlockType.MEMORY, "delta fact", 0.5)]
    assert len({segment_tokens(b) for b in blocks}) == 1
    budget = segment_tokens(blocks[1]) + segment_tokens(blocks[2])
    out = render(blocks, RenderSettings(budget_tokens=budget, recent_share=0.5, min_relevance=0.0))
    assert out.included == ["b1", "b2"]
    assert [b.id for b in ranked_by_relevance(blocks, 0.0)] == ["b1", "b2", "b0"]
    assert [b.id for b in ranked_by_relevance(blocks, 0.6)] == ["b1"]


def test_min_relevance_is_inclusive_and_applies_only_to_relevance_ranked_blocks() -> None:
    """A block at exactly min_relevance is rendered and one just under it is not; turns ignore relevance."""
    blocks = [make_block(0, BlockType.USER, "question", 0.0), make_block(1, BlockType.TOOL, "at", 0.3),
              make_block(2, BlockType.KNOWLEDGE, "under", 0.299999), make_block(3, BlockType.AGENT, "answer", 0.0)]
    out = render(blocks, RenderSettings(budget_tokens=1_000, recent_share=0.5, min_relevance=0.3))
    assert out.included == ["b0", "b1", "b3"] and out.omitted == ["b2"]


def test_a_smaller_less_relevant_block_fills_room_a_larger_one_left() -> None:
    """A block too large for the room left is skipped and a smaller, less relevant one still goes in."""
    blocks = [make_block(0, BlockType.KNOWLEDGE, "long " * 100, 0.9), make_block(1, BlockType.MEMORY, "short", 0.1)]
    out = render(blocks, RenderSettings(budget_tokens=50, recent_share=0.5, min_relevance=0.0))
    assert out.included == ["b1"]


def test_a_short_estimate_drops_the_least_relevant_block_then_the_oldest_turn() -> None:
    """When the stored token counts understate the text, the least relevant block goes first, then the oldest turn."""
    words = "one two three four five six seven eight nine ten"
    blocks = [make_block(0, BlockType.SYSTEM, "sys"),
              make_block(1, BlockType.USER, words, token_count=0), make_block(2, BlockType.AGENT, words, token_count=0),
              make_block(3, BlockType.MEMORY, words, 0.8, token_count=0),
              make_block(4, BlockType.KNOWLEDGE, words, 0.3, token_count=0)]
    options = RenderSettings(budget_tokens=count_tokens(SEPARATOR.join(map(segment, blocks[:4]))), recent_share=1.0,
                             min_relevance=0.0)
    assert render(blocks, options).included == ["b0", "b1", "b2", "b3"]
    only_turns = [blocks[0], blocks[1], blocks[2]]
    budget = count_tokens(SEPARATOR.join(map(segment, [blocks[0], blocks[2]])))
    out = render(only_turns, RenderSettings(budget_tokens=budget, recent_share=1.0, min_relevance=0.0))
    assert out.included == ["b0", "b2"] and out.tokens == budget


def test_the_header_names_the_tool_of_a_tool_block_only() -> None:
    """A TOOL block's header names its tool; other blocks, and a TOOL block without one, show only the type."""
    assert header(make_block(0, BlockType.TOOL, "x", tool="git__git_log")) == "[TOOL git__git_log]"
    assert header(make_block(0, BlockType.TOOL, "x")) == "[TOOL]"
    assert header(make_block(0, BlockType.TOOL, "x", tool="")) == "[TOOL]"
    assert header(make_block(0, BlockType.MEMORY, "x", tool="git__git_log")) == "[MEMORY]"
