"""Which blocks a prune or a dedupe removes (pure functions over a session's blocks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from services.context.store import Change
from shared.contracts.context import Block, BlockType, Session


def decayed(block: Block, now_ms: int, half_life_s: float) -> float:
    """A block's relevance, halved for every `half_life_s` of its age (0: no decay)."""
    if half_life_s <= 0:
        return block.relevance
    age_s = max(now_ms - block.timestamp_ms, 0) / 1000
    return block.relevance * math.pow(0.5, age_s / half_life_s)


def victims(blocks: Sequence[Block], budget_tokens: int, now_ms: int, half_life_s: float) -> list[str]:
    """Least relevant non-SYSTEM blocks (oldest first on a tie) to drop until the rest fit `budget_tokens`.

    SYSTEM blocks are never dropped, so the result may leave the session above the budget.
    """
    excess = sum(block.token_count for block in blocks) - budget_tokens
    ranked = sorted(((decayed(b, now_ms, half_life_s), b.timestamp_ms, i, b) for i, b in enumerate(blocks)
                     if b.type is not BlockType.SYSTEM), key=lambda item: item[:3])
    dropped = []
    for *_, block in ranked:
        if excess <= 0:
            break
        dropped.append(block.id)
        excess -= block.token_count
    return dropped


def system_tokens(blocks: Sequence[Block]) -> int:
    """Tokens no prune can free."""
    return sum(block.token_count for block in blocks if block.type is BlockType.SYSTEM)


def duplicates(session: Session) -> Change:
    """Remove blocks whose type and whitespace-normalized content repeat an earlier block's.

    The first copy stays, with the highest relevance of its copies, so a dedupe never makes the
    surviving block less likely to be rendered.
    """
    first: dict[tuple[BlockType, str], Block] = {}
    best: dict[str, float] = {}
    removed = []
    for block in session.blocks:
        key = (block.type, " ".join(block.content.split()))
        kept = first.setdefault(key, block)
        if kept is not block:
            removed.append(block.id)
            best[kept.id] = max(best.get(kept.id, kept.relevance), block.relevance)
    raised = [kept.model_copy(update={"relevance": best[kept.id]})
              for kept in first.values() if best.get(kept.id, kept.relevance) > kept.relevance]
    return Change(delete=removed, replace=raised)
