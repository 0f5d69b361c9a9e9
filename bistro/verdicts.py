"""What happened to one uid's delta in one window, and whose fault it was.

Every outcome of fetching and checking a peer's object is a verdict for that peer: whatever its
store or its bytes do (an exception of any kind, a missing or lying header, a slow or trickling
body), the peer gets a named verdict and the window goes on. Only evidence about *our own* side (our
own bucket failing the canary read of the same window, our chain failing) may turn a peer's failure
into `skip` (average frozen); "most peers failed at once" is not such evidence, since one operator
of many sybil uids can arrange it.

`fetch_verdict` is the one mapping from a fetch or decode outcome to a verdict; the validator, the
local network's tables, the metrics and the tests all use these names.
"""

from __future__ import annotations

from enum import StrEnum

from .delta.signed import Reason, SignedObjectError
from .storage import BadCommitment
from .storage.base import NotFound, TooLarge
from .storage.fetch import Unfetched


class V(StrEnum):
    """A uid's verdict for a window. Every value but `ok`, `skip` and `unfetched` scores zero."""

    ok = "ok"
    """Fetched, valid, and scored."""
    missing = "missing"
    """No commitment, or no object at the key before the deadline."""
    copy = "copy"
    """A near-copy of another uid's delta of the same window."""
    skip = "skip"
    """Not judged: our own side failed (canary read of our own bucket, our chain); average frozen."""
    unfetched = "unfetched"
    """Not judged: our own link could not fetch the object within the window's fetch budget (its
    turn never came, or it was moving at a normal rate when the budget ended: `fetch_ordered`).
    Like `skip`, the average is frozen and no penalty or score is given; unlike `skip`, it is per
    uid; neither counts toward the inactivity rule, either way (docs/mechanism.md)."""
    peer_error = "peer_error"
    """The peer's store failed, answered nonsense, or raised anything at all."""
    timeout = "timeout"
    """The peer's store did not deliver the whole object before the window's fetch deadline."""
    bad_commitment = "bad_commitment"
    """The uid's on-chain commitment names no bucket we may read (malformed, private address)."""
    # the DeltaRejected reasons (bistro.delta.signed.Reason), with the same names
    too_large = Reason.too_large.value
    bad_header = Reason.bad_header.value
    bad_signature = Reason.bad_signature.value
    wrong_hotkey = Reason.wrong_hotkey.value
    wrong_netuid = Reason.wrong_netuid.value
    wrong_window = Reason.wrong_window.value
    wrong_master = Reason.wrong_master.value
    bad_tensors = Reason.bad_tensors.value
    non_finite = Reason.non_finite.value
    norm_too_large = Reason.norm_too_large.value
    hash_mismatch = Reason.hash_mismatch.value


NOT_JUDGED = frozenset({V.skip, V.unfetched})
"""Verdicts that judge nothing: the average is frozen, no score, no penalty."""

PEER_FAULTS = frozenset(v for v in V if v != V.ok and v not in NOT_JUDGED)
"""Verdicts that are the peer's fault: each scores zero and counts against its average."""


def fetch_verdict(outcome: BaseException) -> V:
    """The verdict for a peer whose fetch or decode ended in `outcome` (never raises).

    Anything not named here is `peer_error`: a peer must not be able to choose an exception that we
    would forgive, so the default is the peer's fault, not ours."""
    if isinstance(outcome, Unfetched):  # made only by our fetcher (a store's own is its error)
        return V.unfetched
    if isinstance(outcome, NotFound):
        return V.missing
    if isinstance(outcome, TooLarge):
        return V.too_large
    if isinstance(outcome, TimeoutError):
        return V.timeout
    if isinstance(outcome, BadCommitment):
        return V.bad_commitment
    if isinstance(outcome, SignedObjectError):
        return V(outcome.reason.value)
    return V.peer_error
