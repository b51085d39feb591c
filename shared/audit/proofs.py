"""Offline inclusion proofs: one record, its leaf index, the RFC 9162 path and the signed checkpoint.

`verify_bundle` needs nothing but the bundle and the log's verifier key: no NATS, no other
record. It checks, in order, that the checkpoint is signed by the log key, that the checkpoint
lists the writer key of the record's chain, that the record hashes to its stored hash and is
signed by that writer, and that the path leads from the record's hash to the signed root.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from shared.audit.checkpoint import Checkpoint
from shared.audit.entries import RecordError, decode_record, record_signed_by
from shared.audit.merkle import inclusion_proof, verify_inclusion
from shared.audit.notes import NoteError, VerifierKey
from shared.contracts.audit import AuditEnvelope, InclusionBundle


class ProofError(ValueError):
    """A bundle that does not prove what it claims."""


def build_bundle(leaves: Sequence[bytes], index: int, record: bytes, stream_seq: int, *, checkpoint_note: str,
                 checkpoint: Checkpoint) -> InclusionBundle:
    """The bundle proving leaf `index` (whose bytes are `record`) is in `checkpoint`'s tree."""
    if not 0 <= index < checkpoint.size <= len(leaves):
        raise ProofError(f"record {index} is not inside checkpoint of size {checkpoint.size}")
    envelope = AuditEnvelope.model_validate_json(record)
    head = next((c for c in checkpoint.chains if c.chain_id == envelope.body.chain_id), None)
    if head is None:
        raise ProofError(f"the checkpoint lists no chain {envelope.body.chain_id}")
    path = inclusion_proof(leaves[: checkpoint.size], index)
    return InclusionBundle(record=envelope, stream_seq=stream_seq, index=index, tree_size=checkpoint.size,
                           proof=[base64.b64encode(node).decode() for node in path], checkpoint=checkpoint_note,
                           writer_key=head.writer_key)


def verify_bundle(bundle: InclusionBundle, log_key: VerifierKey) -> Checkpoint:
    """The checkpoint the bundle's record is proven to be in; ProofError naming the failed step."""
    try:
        checkpoint = Checkpoint.open(bundle.checkpoint, log_key)
    except NoteError as error:
        raise ProofError(f"checkpoint: {error}") from error
    if checkpoint.size != bundle.tree_size:
        raise ProofError(f"the bundle says tree size {bundle.tree_size}, its checkpoint {checkpoint.size}")
    writer = _writer_key(bundle, checkpoint)
    try:
        _, digest, signature = decode_record(bundle.record.model_dump_json().encode())
    except RecordError as error:
        raise ProofError(f"record: {error}") from error
    if not record_signed_by(writer, digest, signature):
        raise ProofError("record: not signed by its chain's writer key")
    try:
        path = [base64.b64decode(node, validate=True) for node in bundle.proof]
    except (binascii.Error, ValueError) as error:
        raise ProofError("proof: a node is not base64") from error
    if not verify_inclusion(digest, bundle.index, checkpoint.size, path, checkpoint.root):
        raise ProofError("proof: the path does not lead to the checkpoint's root")
    return checkpoint


def _writer_key(bundle: InclusionBundle, checkpoint: Checkpoint) -> VerifierKey:
    listed = {c.chain_id: c.writer_key for c in checkpoint.chains}
    if listed.get(bundle.record.body.chain_id) != bundle.writer_key:
        raise ProofError("writer key: the checkpoint does not list it for the record's chain")
    try:
        return VerifierKey.parse(bundle.writer_key)
    except NoteError as error:
        raise ProofError(f"writer key: {error}") from error
