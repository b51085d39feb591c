"""RFC 9162 Merkle trees: root, inclusion and consistency proofs, and their verifiers.

Leaves are given as leaf hashes (`leaf_hash(data)` = SHA-256(0x00 ‖ data)); an audit entry's
hash is exactly its leaf hash. Interior nodes are SHA-256(0x01 ‖ left ‖ right). The verifiers
follow RFC 9162 §2.1.3.2 and §2.1.4.2 step by step, so a proof that fails any step is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 ‖ data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes; the empty tree's root is SHA-256 of nothing."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return node_hash(root(leaves[:k]), root(leaves[k:]))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]): the audit path of leaf `index` in the tree of `leaves`."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} is outside a tree of size {len(leaves)}")
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return [*inclusion_proof(leaves[:k], index), root(leaves[k:])]
    return [*inclusion_proof(leaves[k:], index - k), root(leaves[:k])]


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(m, D[n]): proves the tree of the first `old_size` leaves is a prefix of this one."""
    if not 0 < old_size <= len(leaves):
        raise ValueError(f"old size {old_size} is not within 1..{len(leaves)}")
    return _subproof(old_size, leaves, complete=True)


def _subproof(m: int, leaves: Sequence[bytes], *, complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete=complete), root(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], complete=False), root(leaves[:k])]


def root_from_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes | None:
    """The root an inclusion proof leads to (RFC 9162 §2.1.3.2), or None if it is malformed."""
    if not 0 <= index < size or len(leaf) != HASH_SIZE or any(len(node) != HASH_SIZE for node in proof):
        return None
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return None  # more nodes than the path has levels
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return r if sn == 0 else None


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes) -> bool:
    """True when `proof` shows leaf hash `leaf` at `index` in the tree of `size` with `expected_root`."""
    return root_from_inclusion(leaf, index, size, proof) == expected_root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True when `proof` shows the tree (old_size, old_root) is a prefix of (new_size, new_root)."""
    if not 0 < old_size <= new_size or any(len(node) != HASH_SIZE for node in proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    nodes = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        nodes.insert(0, old_root)
    if not nodes:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = nodes[0]
    for c in nodes[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root


class CompactTree:
    """A Merkle tree that only keeps its right border: append a leaf, read the root, in O(log n).

    The checkpointer keeps one of these instead of every leaf; `root()` equals `root(leaves)`.
    """

    def __init__(self) -> None:
        self.size = 0
        self._border: list[bytes] = []  # roots of the perfect subtrees, largest first

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash on the right."""
        node, size = leaf, self.size
        while size & 1:
            node = node_hash(self._border.pop(), node)
            size >>= 1
        self._border.append(node)
        self.size += 1

    def root(self) -> bytes:
        """The root of the tree over every leaf appended so far."""
        if not self._border:
            return EMPTY_ROOT
        node = self._border[-1]
        for left in reversed(self._border[:-1]):
            node = node_hash(left, node)
        return node
