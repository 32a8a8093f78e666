"""From flow records to signed reports: the part of the daemon that ``replay`` shares with ``run``.

Decode → sample → sign → store. The codecs and the sampler are pure; this module glues them to
the node identity and hands batches to the store. It opens no socket: sending is notify's job,
so ``overflowd replay`` can never put a report on the network.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from overflowd import report as rpt
from overflowd.config import Settings
from overflowd.flows import FlowRecord, FlowRow
from overflowd.flowsample import BOOST_REASONS, SamplingPolicy
from overflowd.identity import NodeIdentity

#: Anything with the flow record fields: a FlowRecord or the cheaper FlowRow.
RecordLike = FlowRecord | FlowRow

#: Boost reasons that make a sampled flow a ``flow-suspect`` rather than a plain ``flow-seen``.
SUSPECT_REASONS = frozenset({"amplification", "syn_only"})


def report_payload(
    record: RecordLike,
    probability: float,
    *,
    observer: rpt.Observer,
    nonce: bytes,
    now_ms: int,
    kind: str = "flow-seen",
) -> rpt.Payload:
    """The payload reporting ``record``, chosen with ``probability``. Pure.

    Exporters send values the report cannot carry (times before 1970 from a bad clock or
    uptime, 32-bit TCP flag fields, AS numbers wider than 32 bits): they are clamped or dropped
    here, so a report about a real flow is never refused for its exporter's quirks.
    """
    return rpt.Payload(
        kind=kind,
        nonce=nonce,
        time=now_ms,
        observer=observer,
        flow=rpt.Flow(
            src=record.src,
            dst=record.dst,
            sport=record.sport,
            dport=record.dport,
            proto=record.proto,
            packets=_clamp(record.packets, rpt.U64),
            bytes=_clamp(record.bytes, rpt.U64),
            first=_clamp(record.first, rpt.U64),
            last=_clamp(record.last, rpt.U64),
            tcp_flags=record.tcp_flags & 0xFFFF,
            tos=record.tos & 0xFF,
            src_as=_as_number(record.src_as),
            dst_as=_as_number(record.dst_as),
        ),
        sampling=rpt.Sampling(
            probability=probability,
            format=record.format[: rpt.MAX_FORMAT_BYTES],
            interval=_clamp(record.sampling_interval, rpt.U32, minimum=1),
            provenance=record.sampling_provenance,
        ),
    )


def _clamp(value: int, maximum: int, minimum: int = 0) -> int:
    return minimum if value < minimum else maximum if value > maximum else value


def _as_number(value: int | None) -> int | None:
    return value if value is not None and 0 <= value <= rpt.U32 else None


def policy_from_settings(settings: Settings, rate: float | None = None) -> SamplingPolicy:
    return SamplingPolicy(
        rate=settings.sampling.rate if rate is None else rate,
        boost_cap=settings.sampling.boost_cap,
    )


#: The same reasons as bits of :meth:`SamplingPolicy.evaluate` (one test per report, not names).
_SUSPECT_BITS = sum(1 << i for i, name in enumerate(BOOST_REASONS) if name in SUSPECT_REASONS)
_U64, _U32, _MAX_FORMAT = rpt.U64, rpt.U32, rpt.MAX_FORMAT_BYTES


@dataclass
class ReportMaker:
    """Signs one report per sampled record. The signing key is expanded once, and what every
    report of this node shares (protected header, observer, sampling shapes) is checked and
    encoded once (:class:`overflowd.report.Envelope`)."""

    identity: NodeIdentity
    observer: rpt.Observer
    policy: SamplingPolicy
    nonce: Callable[[int], bytes] = os.urandom

    def __post_init__(self) -> None:
        #: Sampled records that no report can carry (counted, skipped).
        self.unreportable = 0
        self._sign = self.identity.signer()
        self._public_key = self.identity.public_key
        self._protected = rpt.protected_header(self._public_key)
        self._envelope = rpt.Envelope(self._public_key, self._sign, self.observer)

    @classmethod
    def for_node(
        cls, identity: NodeIdentity, settings: Settings, policy: SamplingPolicy
    ) -> ReportMaker:
        observer = rpt.Observer(
            contacts=settings.node.contacts, point=settings.node.observation_point
        )
        return cls(identity=identity, observer=observer, policy=policy)

    def kind_of(self, record: RecordLike) -> str:
        return "flow-suspect" if self.policy.evaluate(record)[2] & _SUSPECT_BITS else "flow-seen"

    def make(self, record: RecordLike, probability: float, now_ms: int) -> rpt.SignedReport:
        """The report of ``record``: :func:`report_payload` signed, written out inline (it runs
        once per report, and the keyword calls and helpers cost a third of the envelope)."""
        envelope = self._envelope
        observer = self.observer
        if envelope.observer is not observer:  # replaced since: encode the new one once
            envelope = self._envelope = rpt.Envelope(self._public_key, self._sign, observer)
        kind = "flow-suspect" if self.policy.evaluate(record)[2] & _SUSPECT_BITS else "flow-seen"
        # report_payload's clamps, positionally (same order as rpt.Flow's fields).
        packets, nbytes, first, last = record.packets, record.bytes, record.first, record.last
        src_as, dst_as, interval = record.src_as, record.dst_as, record.sampling_interval
        fmt = record.format
        payload = rpt.new_payload(
            kind,
            self.nonce(rpt.NONCE_BYTES),
            now_ms,
            observer,
            rpt.new_flow(
                record.src,
                record.dst,
                record.sport,
                record.dport,
                record.proto,
                0 if packets < 0 else _U64 if packets > _U64 else packets,
                0 if nbytes < 0 else _U64 if nbytes > _U64 else nbytes,
                0 if first < 0 else _U64 if first > _U64 else first,
                0 if last < 0 else _U64 if last > _U64 else last,
                record.tcp_flags & 0xFFFF,
                record.tos & 0xFF,
                src_as if src_as is not None and 0 <= src_as <= _U32 else None,
                dst_as if dst_as is not None and 0 <= dst_as <= _U32 else None,
            ),
            rpt.new_sampling(
                probability,
                fmt if len(fmt) <= _MAX_FORMAT else fmt[:_MAX_FORMAT],
                1 if interval < 1 else _U32 if interval > _U32 else interval,
                record.sampling_provenance,
            ),
            rpt.PAYLOAD_VERSION,
        )
        cose = envelope.sign(payload)
        return rpt.new_signed_report(cose, self._public_key, payload)

    def make_all(
        self, sampled: Iterable[tuple[RecordLike, float]], now_ms: int
    ) -> list[rpt.SignedReport]:
        """Reports for every sampled record that can be reported; the rest are counted in
        ``unreportable`` (e.g. a record whose addresses are of two families), never raised."""
        out = []
        for record, p in sampled:
            try:
                out.append(self.make(record, p, now_ms))
            except ValueError:
                self.unreportable += 1
        return out
