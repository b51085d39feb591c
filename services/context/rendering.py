"""Rendering a session into a token budget: which blocks go in, and the text they make.

Selection, in this order:
1. every SYSTEM block (a budget too small for them is refused, never silently cut);
2. the most recent USER/AGENT turns, newest first, while they fit in `recent_share` of the budget
   (the first turn that does not fit ends the run, so the conversation kept is contiguous);
3. TOOL/MEMORY/KNOWLEDGE blocks at or above `min_relevance`, most relevant first (newer first on
   a tie), each one that still fits.
The chosen blocks are written in session order. Selection uses each block's segment estimate
(its token count plus its header's); the finished text is then counted for real, and if the
estimate was short the least valued block is dropped until the text fits. So the budget is never
exceeded as counted by the store's tokenizer, and the text depends only on the session's blocks
and the render settings: the same package renders to the same bytes for any agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from services.context.tokens import count_tokens
from shared.contracts.context import Block, BlockType
from shared.errors import ContextTooLarge

TURNS = (BlockType.USER, BlockType.AGENT)
BY_RELEVANCE = (BlockType.TOOL, BlockType.MEMORY, BlockType.KNOWLEDGE)
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class RenderSettings:
    """The knobs of one render."""

    budget_tokens: int
    recent_share: float
    min_relevance: float


@dataclass(frozen=True)
class Rendered:
    """The text and the ids that went into it."""

    text: str
    tokens: int
    included: list[str]
    omitted: list[str]


def header(block: Block) -> str:
    """The line introducing a block, e.g. `[TOOL git__git_status]`."""
    tool = block.metadata.get("tool") if block.type is BlockType.TOOL else None
    return f"[{block.type.value} {tool}]" if tool else f"[{block.type.value}]"


def segment(block: Block) -> str:
    return f"{header(block)}\n{block.content}"


def segment_tokens(block: Block) -> int:
    """Estimated tokens a block adds to a render: its own, its header's, and a separator's."""
    return block.token_count + _header_tokens(header(block)) + 2


@cache
def _header_tokens(line: str) -> int:
    return count_tokens(line) + 1  # and its newline


def render(blocks: Sequence[Block], settings: RenderSettings) -> Rendered:
    """The session's context within `settings.budget_tokens` (see the module docstring)."""
    costs = {block.id: segment_tokens(block) for block in blocks}
    chosen = _choose(blocks, costs, settings)
    while True:
        text = SEPARATOR.join(segment(block) for block in blocks if block.id in chosen)
        tokens = count_tokens(text)
        if tokens <= settings.budget_tokens:
            break
        chosen.remove(_least_valued(blocks, chosen))
    included = [b.id for b in blocks if b.id in chosen]
    return Rendered(text, tokens, included, [b.id for b in blocks if b.id not in chosen])


def _choose(blocks: Sequence[Block], costs: dict[str, int], settings: RenderSettings) -> set[str]:
    system = [b for b in blocks if b.type is BlockType.SYSTEM]
    system_tokens = count_tokens(SEPARATOR.join(map(segment, system)))
    if system_tokens > settings.budget_tokens:
        raise ContextTooLarge(f"a budget of {settings.budget_tokens} tokens cannot hold the session's SYSTEM "
                              f"blocks ({system_tokens} tokens)", limit=settings.budget_tokens, size=system_tokens)
    used = sum(costs[b.id] for b in system)
    chosen = {b.id for b in system}
    turn_budget = min(settings.budget_tokens - used, int(settings.budget_tokens * settings.recent_share))
    for block in reversed([b for b in blocks if b.type in TURNS]):
        if costs[block.id] > turn_budget:
            break
        turn_budget -= costs[block.id]
        used += costs[block.id]
        chosen.add(block.id)
    for block in ranked_by_relevance(blocks, settings.min_relevance):
        if used + costs[block.id] <= settings.budget_tokens:
            used += costs[block.id]
            chosen.add(block.id)
    return chosen


def ranked_by_relevance(blocks: Sequence[Block], min_relevance: float) -> list[Block]:
    """TOOL/MEMORY/KNOWLEDGE blocks eligible for a render, most relevant (then newest) first."""
    eligible = [(i, b) for i, b in enumerate(blocks) if b.type in BY_RELEVANCE and b.relevance >= min_relevance]
    return [b for _, b in sorted(eligible, key=lambda item: (-item[1].relevance, -item[0]))]


def _least_valued(blocks: Sequence[Block], chosen: set[str]) -> str:
    """What to drop when the estimate was short: the least relevant block, else the oldest turn."""
    ranked = [b for b in ranked_by_relevance(blocks, 0.0) if b.id in chosen]
    if ranked:
        return ranked[-1].id
    turns = [b for b in blocks if b.type in TURNS and b.id in chosen]
    if turns:
        return turns[0].id
    raise AssertionError("SYSTEM blocks were checked to fit")  # pragma: no cover
