"""How injection-like are a call's arguments? A 0..100 heuristic risk score and the patterns behind it.

The router scores every call's arguments and puts the score into the call's event, so the audit
log can record `risk` and `toolbus audit report` can list the high-risk calls
(score >= `shared.contracts.audit.HIGH_RISK`).

What it is: a cheap, bounded pattern scan over the text inside the arguments (string values and
dict keys, recursively through lists and dicts) for prompt-injection phrases, shell and SQL
injection, path traversal, secret exfiltration, hidden Unicode and encoded payloads. Each pattern
family found adds its weight once; the score is the capped sum.

What it is not: a security boundary. Patterns are easy to evade and will sometimes fire on
innocent text; false positives are acceptable because nothing is refused for risk. The score
only flags calls for audit and review. Authorization, budgets and schemas are what protect tools.

Work is bounded so the scan is safe on every call: at most `MAX_TEXT_CHARS` characters of text,
`MAX_VALUES` values and `MAX_DEPTH` levels of nesting are inspected; anything beyond is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from itertools import chain, islice
from types import MappingProxyType
from typing import Any

MAX_TEXT_CHARS = 64 * 1024  # characters of text inspected per call, over all strings
MAX_DEPTH = 32  # nesting levels descended into; deeper containers are skipped
MAX_VALUES = 10_000  # values (containers, keys and scalars) visited per call


class RiskFlag(StrEnum):
    """Families of injection-like patterns a call's arguments can contain."""

    PROMPT_INJECTION = "prompt_injection"  # text that tries to override a model's instructions
    SHELL_INJECTION = "shell_injection"  # shell metacharacters chaining, piping or substituting commands
    PATH_TRAVERSAL = "path_traversal"  # `../` escapes, sensitive system files, `file://` URLs
    SQL_INJECTION = "sql_injection"  # tautologies, UNION SELECT, stacked DROP, quote-then-comment
    SECRET_EXFILTRATION = "secret_exfiltration"  # noqa: S105  # asks to print or send env variables, keys, tokens
    HIDDEN_UNICODE = "hidden_unicode"  # zero-width, bidi-override or tag characters that hide text
    ENCODED_PAYLOAD = "encoded_payload"  # long base64-looking runs or `\x` escape runs


RISK_WEIGHTS: Mapping[RiskFlag, int] = MappingProxyType(
    {
        RiskFlag.PROMPT_INJECTION: 60,
        RiskFlag.SHELL_INJECTION: 60,
        RiskFlag.SQL_INJECTION: 50,
        RiskFlag.SECRET_EXFILTRATION: 50,
        RiskFlag.PATH_TRAVERSAL: 40,
        RiskFlag.HIDDEN_UNICODE: 30,
        RiskFlag.ENCODED_PAYLOAD: 20,
    }
)

# Alternatives per family, matched against lower-cased text. Each starts with a literal or a character class
# where it can: the regex engine then skips a non-matching alternative with one comparison.
_PATTERNS: dict[RiskFlag, tuple[str, ...]] = {
    RiskFlag.PROMPT_INJECTION: (
        r"ignore\s+(?:(?:all|any|the|your|my)\s+){0,2}(?:previous|prior|above|earlier|preceding)\s+"
        r"(?:instructions?|prompts?|directions|rules|messages)",
        r"disregard\s[^\n.]{0,60}?\b(?:instructions?|prompts?|rules|guidelines)\b",
        r"you\s+are\s+now\s+(?:an?|my|dan|free|unrestricted|unfiltered|jailbroken|no\s+longer|going\s+to)\b",
        r"system\s+prompt",
        r"reveal\s+(?:your|the)\s+(?:(?:system|hidden|initial|original)\s+)?(?:instructions|prompt)",
        r"^\s*act\s+as\b",
        r"[.!?,:;]\s*act\s+as\b",
        r"(?:now|please|you\s+(?:will|must|should|shall))\s+act\s+as\b",
        r"developer\s+mode\b",
        r"jailbr(?:eak|oken)",
        r"<\|(?:im_start|im_end|im_sep|system|user|assistant|endoftext|eot_id|start_header_id|end_header_id)\|>",
        r"\[/?inst\]",
        r"<</?sys>>",
    ),
    RiskFlag.SHELL_INJECTION: (
        r"[;&|]\s*rm\s+-[a-z]*[rf]",
        r"[;&|]\s*(?:curl|wget)\b",
        r"\|\s*(?:ba|z|da|k)?sh\b",
        r"\$\(\s*[a-z_/.~]",
        r"`\s*(?:rm|curl|wget|cat|sh|bash|nc|python3?|perl|chmod|whoami|id|uname|echo|ls)\b(?=[^`\n]{0,200}`)",
        r">&?\s*/dev/(?!null\b)",
        r"\bnc(?:at)?\s+(?:\S+\s+){0,4}?-[a-z]*e\b",
        r"wget\s+https?://",
    ),
    RiskFlag.PATH_TRAVERSAL: (
        r"\.\.[/\\]",
        r"%2e%2e(?:%2f|%5c|/)",
        r"/etc/(?:passwd|shadow)\b",
        r"~[/\\]\.ssh\b",
        r"file://",
    ),
    RiskFlag.SQL_INJECTION: (
        r"['\"]\s*or\s+['\"]?1['\"]?\s*=\s*['\"]?1",
        r"union\s+(?:all\s+)?select\b",
        r";\s*drop\s+table\b",
        r"['\"]\s*\)*\s*;?\s*--[\s-]*$",
    ),
    RiskFlag.SECRET_EXFILTRATION: (
        r"printenv\b",
        r"env\s*\|",
        r"/proc/self/environ",
        r"\$\{?\w*(?:secret|api_?key|token|passw(?:or)?d)",
        r"send\s[^\n]{0,80}?\b(?:api[\s_-]?)?(?:keys?|tokens?|passwords?|secrets?|credentials)\b[^\n]{0,40}?\bto\b",
        r"\b(?:print|dump|reveal|leak|exfiltrate)\b[^\n]{0,30}?"
        r"\b(?:env(?:ironment)?\s+var(?:iable)?s|api[\s_-]?keys?|secrets|credentials)\b",
    ),
    RiskFlag.HIDDEN_UNICODE: (
        r"[\u200b\u200c\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\U000e0000-\U000e007f]",
        r"\u200d(?![\u2600-\u27bf\U0001f000-\U0001faff])",  # a zero-width joiner not inside an emoji sequence
    ),
    RiskFlag.ENCODED_PAYLOAD: (
        r"(?<![a-z0-9+/_-])[a-z0-9+/_-]{200,}",
        r"\\x[0-9a-f]{2}(?:\\x[0-9a-f]{2}){3,}",
    ),
}

_ALTERNATIVES = tuple((flag, pattern) for flag, patterns in _PATTERNS.items() for pattern in patterns)
# One pass per string: every alternative ends with an empty group, so `lastindex` says which one matched.
# Matches do not overlap, so text one alternative consumed is not seen by another: fine for a heuristic.
_SCAN = re.compile("|".join(f"{pattern}()" for _, pattern in _ALTERNATIVES), re.MULTILINE)
_ALL_FLAGS = frozenset(RiskFlag)
_FLAG_OF_GROUP: dict[int, RiskFlag] = {group: flag for group, (flag, _) in enumerate(_ALTERNATIVES, start=1)}


@dataclass(frozen=True)
class RiskAssessment:
    """The risk score of one call's arguments and the pattern families that produced it."""

    score: int  # 0..100: the capped sum of the weights of `flags`
    flags: tuple[str, ...]  # sorted, unique `RiskFlag` values found


def risk_score(arguments: Mapping[str, Any]) -> RiskAssessment:
    """Score the text inside `arguments` (values and keys, recursively) for injection-like patterns."""
    found: set[RiskFlag] = set()
    for text in _bounded_texts(arguments):
        found |= _flags_in(text)
        if len(found) == len(_ALL_FLAGS):
            break
    score = min(100, sum(RISK_WEIGHTS[flag] for flag in found))
    return RiskAssessment(score=score, flags=tuple(sorted(flag.value for flag in found)))


def _flags_in(text: str) -> set[RiskFlag]:
    """The pattern families that occur in `text`."""
    return {_FLAG_OF_GROUP[match.lastindex] for match in _SCAN.finditer(text.lower()) if match.lastindex}


def _bounded_texts(arguments: Mapping[str, Any]) -> Iterator[str]:
    """The strings under `arguments`, cut so that together they are at most `MAX_TEXT_CHARS` long."""
    budget = MAX_TEXT_CHARS
    for text in _strings(arguments):
        yield text[:budget]
        budget -= len(text)
        if budget <= 0:
            return


def _strings(root: Any) -> Iterator[str]:
    """The non-empty strings and dict keys under `root`, depth-first in document order, within the limits."""
    stack: list[tuple[Any, int]] = [(root, 0)]
    values_left = MAX_VALUES
    while stack and values_left > 0:
        value, depth = stack.pop()
        values_left -= 1
        if isinstance(value, str):
            if value:
                yield value
        elif depth < MAX_DEPTH:
            children = _children(value, limit=values_left)
            stack.extend((child, depth + 1) for child in reversed(children))


def _children(value: Any, *, limit: int) -> list[Any]:
    """Up to `limit` keys and values of a mapping or items of a list or tuple; nothing for a scalar."""
    if isinstance(value, list | tuple):
        return list(islice(value, limit))
    if isinstance(value, Mapping):
        return list(islice(chain.from_iterable(value.items()), limit))
    return []
