"""The outbox's batch claims and capped enqueueing (#9), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.store import Store
from overflowd.store import outbox as ob
from tests.unit.test_outbox import T0, URL_A, URL_B, identity, report, store

__all__ = ["identity", "store"]  # the fixtures, shared with test_outbox.py


def store_report(identity: NodeIdentity, entry: ob.OutboxEntry) -> rpt.SignedReport:
    """The signed report an outbox row carries."""
    u = rpt.decode_unverified(entry.cose)
    return rpt.SignedReport(cose=u.cose, observer_key=u.kid, payload=u.payload)


def planned(identity: NodeIdentity, url: str, n: int, due_ms: int = T0) -> list[ob.Planned]:
    return [ob.Planned(report(identity), url, due_ms) for _ in range(n)]


def enqueue(store: Store, items: list[ob.Planned], **caps: int) -> ob.EnqueueResult:
    limits = {"max_pending_per_url": 1000, "max_pending": 1000, **caps}
    with store.transaction("test", write=True) as conn:
        return ob.enqueue_planned_in(conn, store, items, now_ms=T0, **limits)


def test_claim_batches_takes_every_due_row_of_a_url(store: Store, identity: NodeIdentity) -> None:
    enqueue(store, planned(identity, URL_A, 5) + planned(identity, URL_B, 3))
    enqueue(store, planned(identity, URL_A, 2, due_ms=T0 + 60_000))  # deferred: not yet
    batches = ob.claim_batches(store, now_ms=T0, lease_ms=1000, max_urls=8, max_reports=50)
    assert sorted((b[0].url, len(b)) for b in batches) == [(URL_A, 5), (URL_B, 3)]
    assert all(e.url == b[0].url and e.attempts == 1 for b in batches for e in b)
    # Leased: a second claim finds nothing until the lease or the deferral runs out.
    assert ob.claim_batches(store, now_ms=T0, lease_ms=1000, max_urls=8, max_reports=50) == []
    later = ob.claim_batches(store, now_ms=T0 + 60_000, lease_ms=1, max_urls=8, max_reports=50)
    assert sorted(len(b) for b in later) == [3, 7]  # URL_A's 7 in one


def test_claim_batches_caps_reports_and_urls_and_skips(
    store: Store, identity: NodeIdentity
) -> None:
    enqueue(store, planned(identity, URL_A, 5) + planned(identity, URL_B, 3))
    # Equal due times: by URL, so URL_A's first, two of its five.
    (only,) = ob.claim_batches(store, now_ms=T0, lease_ms=10, max_urls=1, max_reports=2)
    assert only[0].url == URL_A and len(only) == 2
    rest = ob.claim_batches(
        store, now_ms=T0, lease_ms=10, max_urls=8, max_reports=50, skip_urls=[URL_B]
    )
    assert [(b[0].url, len(b)) for b in rest] == [(URL_A, 3)]
    ids = [e.id for b in rest for e in b]
    assert ob.release_many(store, ids, now_ms=T0, next_attempt_ms=T0) == len(ids)
    assert all(e.attempts == 0 for e in ob.entries(store) if e.id in ids)


def test_enqueue_planned_sheds_past_the_pending_caps(store: Store, identity: NodeIdentity) -> None:
    result = enqueue(
        store, planned(identity, URL_A, 7) + planned(identity, URL_B, 2), max_pending_per_url=5
    )
    assert result.new == 7 and result.outbox_full == {URL_A: 2}
    result = enqueue(store, planned(identity, URL_B, 4), max_pending_per_url=5, max_pending=9)
    assert result.new == 2 and result.outbox_full == {URL_B: 2}
    assert ob.counts(store)["pending"] == 9
    # A report already enqueued to that URL is not new and costs nothing, even when full.
    existing = ob.entries(store)[0]
    r = store_report(identity, existing)
    assert enqueue(store, [ob.Planned(r, URL_A, T0)], max_pending_per_url=5) == ob.EnqueueResult(
        0, {}
    )


def test_enqueue_planned_to_a_disabled_endpoint_is_dead_and_within_the_caps(
    store: Store, identity: NodeIdentity
) -> None:
    """Dead letters count against the caps: a flood toward a gone endpoint cannot grow the
    outbox by a dead row per report (review finding)."""
    ob.disable_endpoint(store, URL_A, now_ms=T0, reason="410")
    result = enqueue(store, planned(identity, URL_A, 3), max_pending_per_url=1)
    assert result.new == 1 and result.outbox_full == {URL_A: 2}
    assert ob.counts(store) == {"pending": 0, "delivered": 0, "dead": 1}


def test_dead_letters_are_pruned_after_keep_dead_s(store: Store, identity: NodeIdentity) -> None:
    ob.disable_endpoint(store, URL_A, now_ms=T0, reason="410")
    enqueue(store, planned(identity, URL_A, 2))
    assert ob.prune_delivered(store, before_ms=T0 + 10, dead_before_ms=T0) == 0
    assert ob.prune_delivered(store, before_ms=T0 + 10, dead_before_ms=T0 + 1) == 2
    assert ob.counts(store)["dead"] == 0


def test_concurrent_batch_claimers_never_share_a_row(store: Store, identity: NodeIdentity) -> None:
    enqueue(store, planned(identity, URL_A, 30) + planned(identity, URL_B, 30))
    got: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            batches = ob.claim_batches(store, now_ms=T0, lease_ms=60_000, max_urls=1, max_reports=7)
            if not batches:
                return
            with lock:
                got.extend(e.id for b in batches for e in b)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(got) == len(set(got)) == 60
