"""The vault: ratelock's store and every decision it makes. Sync; the server runs it in threads.

API (the seam ratelock-server builds on; all methods thread-safe, one Vault per process)::

    vault = Vault.open(home, settings, identity=None, clock_ms=None)
        # own database (settings.store_url_for(home)), own schema (SCHEMA_VERSION), the secret
        # file (created 0600 on first open); identity signs audit heads (default: the node's
        # identity.key in home when present, else heads stay unsigned)
    vault.enroll(client, user, password) -> Outcome   # ok | exists | over_budget | invalid
    vault.verify(client, user, password) -> Outcome   # ok | wrong | unknown | over_budget | invalid
                                                      #   | tampered (row edited: never hashed)
    vault.change(client, user, old, new) -> Outcome   # the same outcomes as verify
    vault.delete_user(client, user) -> Outcome        # ok | unknown | invalid
    vault.put(client, key, data) -> Outcome           # ok | invalid
    vault.get(client, key) -> Outcome              # ok (.data) | not_found | over_budget | invalid
    vault.delete_record(client, key) -> Outcome       # ok | not_found | invalid
    vault.add_client(name) -> str                     # the token, shown once; ValueError if bad
    vault.list_clients() -> list[ClientInfo]
    vault.revoke_client(name) -> bool
    vault.authenticate(token) -> str | None              # the client's name; None = unknown/revoked
    vault.rotate_secret() -> int                         # rows re-encrypted
    vault.sign_audit_head() -> int | None                # seq signed (None: nothing new / no key)
    vault.record_refusals(rows) -> int                   # the server's aggregated refusals
    vault.audit_verify() -> AuditReport                  # ratelock.audit
    vault.status() -> VaultStatus                        # the operator's view (all clients)
    vault.client_status(client) -> ClientStatus          # one client's own view (/v1/status)
    vault.max_concurrent_hashes -> int                   # size the server's CapacityLimiter
    vault.close()

Outcome(kind, retry_after_s: float | None, data: bytes | None, detail: str): ``retry_after_s``
only with ``over_budget``. Users and records are namespaced by client: one application cannot
probe another's users or read its records.

What it must never do:

* **answer before the charge is durable.** A verify runs one write transaction (SQLite
  ``BEGIN IMMEDIATE``, PostgreSQL ``SELECT … FOR UPDATE`` on the audit tail and the bucket rows)
  that reads the buckets, decides, writes the new ``tat`` and the audit entry, and COMMITS;
  only then is the password hashed. A crash, ``kill -9`` or a client that goes away after that
  point cannot give the charge back. A verify that succeeds refunds its token afterwards, in a
  second transaction (a crash there only costs the honest user one token).
* **say "wrong" when it means "over budget".** Over budget is decided before any hash and is
  its own outcome with the wait.
* **let one user lock out others.** Failures are charged to the user's bucket, the client's and
  the global one together (all or none, :func:`ratelock.policy.charge_all`): a user at its limit
  is refused before it touches the shared buckets again.
* **hold more hashes than ``max_concurrent_hashes``** at once (each holds argon2_memory_kib):
  a semaphore here bounds them per process; the server also sizes a trio CapacityLimiter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from overflowd.errors import IdentityError, SealError, VaultError
from overflowd.identity import (
    NodeIdentity,
    check_signature,
    identity_path,
    load_identity,
    load_previous_public,
)
from ratelock import audit, crypto, policy
from ratelock.config import ARGON2_MIN_MEMORY_KIB, ARGON2_MIN_TIME_COST, RatelockSettings

#: 2: verifiers sealed with the Argon2 parameters and salt in their associated data (a schema 1
#: store is resealed once, at the first open by this version: Vault._reseal_schema_1)
SCHEMA_VERSION = 2
#: SQLite: how long a writer waits for another's lock. Every verify takes the write lock
#: briefly (no hashing inside it), so a long wait means a stuck process, not load.
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10
#: SQLAlchemy pool per process: the server runs at most max_concurrent_hashes + a few
#: transactions at once; threads beyond wait for a connection.
POOL_SIZE = 8
POOL_OVERFLOW = 16
#: rl_meta row: the vault key id the last rotation made current (see Vault._key_for_write)
SECRET_KEY_META = "secret_key_id"
#: the audit log's "client" for operator actions (clients add/revoke, rotation)
ADMIN = "-admin"

OutcomeKind = Literal[
    "ok", "wrong", "unknown", "over_budget", "exists", "not_found", "invalid", "tampered"
]


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    retry_after_s: float | None = None
    data: bytes | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ClientInfo:
    name: str
    created_ms: int
    revoked_ms: int | None


@dataclass(frozen=True, slots=True)
class VaultStatus:
    store: str
    schema_version: int
    users: int
    records: int
    clients: int
    audit_entries: int
    audit_signed_seq: int
    secret_key_id: int
    argon2_time_cost: int
    argon2_memory_kib: int
    max_concurrent_hashes: int


@dataclass(frozen=True, slots=True)
class ClientStatus:
    """What ``/v1/status`` tells a client: its own users, records and budgets, and settings.

    Nothing here depends on another client's activity (no global counts, no audit length, no
    global bucket level): only the configured global limits, which the operator chose."""

    client: str
    schema_version: int
    users: int
    records: int
    failures_available: int
    failures_burst: int
    failures_per_hour: int
    reads_available: int
    reads_burst: int
    reads_per_hour: int
    global_failures_burst: int
    global_failures_per_hour: int
    global_reads_burst: int
    global_reads_per_hour: int
    argon2_time_cost: int
    argon2_memory_kib: int
    max_concurrent_hashes: int


metadata = MetaData()
t_meta = Table(
    "rl_meta", metadata, Column("name", String(64), primary_key=True), Column("value", String(256))
)
t_clients = Table(
    "rl_clients",
    metadata,
    Column("name", String(256), primary_key=True),
    Column("token_digest", LargeBinary(32), nullable=False, unique=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("revoked_ms", BigInteger),
)
t_users = Table(
    "rl_users",
    metadata,
    Column("namespace", String(256), primary_key=True),
    Column("user", String(1024), primary_key=True),
    Column("salt", LargeBinary(16), nullable=False),
    Column("time_cost", Integer, nullable=False),
    Column("memory_kib", Integer, nullable=False),
    Column("key_id", Integer, nullable=False),
    Column("nonce", LargeBinary(24), nullable=False),
    Column("sealed", LargeBinary, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)
t_records = Table(
    "rl_records",
    metadata,
    Column("namespace", String(256), primary_key=True),
    Column("key", String(1024), primary_key=True),
    Column("key_id", Integer, nullable=False),
    Column("nonce", LargeBinary(24), nullable=False),
    Column("sealed", LargeBinary, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)
#: one row per bucket: ``tat`` in units of 1/per_period ms (ratelock.policy); per_period kept
#: so a changed setting rescales the stored state instead of misreading it
t_buckets = Table(
    "rl_buckets",
    metadata,
    Column("name", String(1400), primary_key=True),
    Column("tat", BigInteger, nullable=False),
    Column("per_period", BigInteger, nullable=False),
)
t_audit = Table(
    "rl_audit",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time_ms", BigInteger, nullable=False),
    Column("client", String(256), nullable=False),
    Column("op", String(32), nullable=False),
    Column("subject", String(1024), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("prev", LargeBinary(32), nullable=False),
    Column("hash", LargeBinary(32), nullable=False),
)
#: the chain's tail in one row: every audited transaction locks it first, which serialises
#: appends on PostgreSQL (SQLite's BEGIN IMMEDIATE already does) and orders the bucket locks
t_audit_tail = Table(
    "rl_audit_tail",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", LargeBinary(32), nullable=False),
    Column("signed_seq", BigInteger, nullable=False),
)
t_audit_heads = Table(
    "rl_audit_heads",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary(32), nullable=False),
    Column("time_ms", BigInteger, nullable=False),
    Column("public_key", LargeBinary(32), nullable=False),
    Column("signature", LargeBinary(64), nullable=False),
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Vault:
    """See the module docstring for the API and what it guarantees."""

    def __init__(
        self,
        engine: Engine,
        settings: RatelockSettings,
        secret: crypto.SecretFile,
        *,
        identity: NodeIdentity | None,
        clock_ms: Callable[[], int],
        store: str,
        previous_keys: tuple[bytes, ...] = (),
    ) -> None:
        self._engine = engine
        self.settings = settings
        self._secret = secret
        self._secret_lock = threading.Lock()
        self._identity = identity
        # Heads signed before `overflowd key rotate` carry the key it kept as previous.
        self._previous_keys = previous_keys
        self._sign = identity.signer() if identity else None
        self._clock = clock_ms
        self._store = store
        self._hashes = threading.BoundedSemaphore(settings.max_concurrent_hashes)
        self._counts_lock = threading.Lock()
        #: verifies refused because the stored verifier was edited (ratelock_tampered_rows)
        self.tampered_rows = 0
        self._postgres = engine.dialect.name == "postgresql"
        self._params = crypto.Argon2Parameters(
            settings.argon2_time_cost, settings.argon2_memory_kib
        )
        if not self._params_allowed(self._params):
            raise VaultError(
                "ratelock.argon2_max_time_cost / argon2_max_memory_kib are below the configured "
                "argon2_time_cost / argon2_memory_kib: raise the bounds first"
            )
        s = settings
        self._fail_rates = (
            policy.Rate(s.user_failures_burst, s.user_failures_per_hour),
            policy.Rate(s.client_failures_burst, s.client_failures_per_hour),
            policy.Rate(s.global_failures_burst, s.global_failures_per_hour),
        )
        self._read_rates = (
            policy.Rate(s.key_reads_burst, s.key_reads_per_hour),
            policy.Rate(s.client_reads_burst, s.client_reads_per_hour),
            policy.Rate(s.global_reads_burst, s.global_reads_per_hour),
        )

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        home: Path,
        settings: RatelockSettings,
        *,
        identity: NodeIdentity | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> Vault:
        if identity is None and identity_path(home).exists():
            identity = load_identity(home)
        secret = crypto.open_secret(settings.secret_path(home))
        url = settings.store_url_for(home)
        engine = _create_engine(url)
        try:
            _migrate(engine)
        except SQLAlchemyError as exc:
            engine.dispose()
            raise VaultError(f"ratelock store {_redact(url)}: {_short(exc)}") from None
        vault = cls(
            engine,
            settings,
            secret,
            identity=identity,
            clock_ms=clock_ms or _now_ms,
            store=_redact(url),
            previous_keys=_previous_keys(home),
        )
        try:
            vault._reseal_schema_1()
        except BaseException:
            engine.dispose()
            raise
        return vault

    def _reseal_schema_1(self) -> None:
        """Once per store: seal every schema 1 verifier again with v2 associated data (its
        parameters and salt as stored), then record schema 2, in one locked transaction (two
        processes opening at once: the second finds schema 2 and does nothing)."""
        with self._write() as conn:
            version = conn.execute(
                select(t_meta.c.value).where(t_meta.c.name == "schema_version")
            ).scalar()
            if version is None or int(version) >= 2:
                return
            count = 0
            for r in conn.execute(select(t_users)).all():
                key = self._key(int(r.key_id))
                plain = key.open_verifier_v1(r.namespace, r.user, bytes(r.nonce), bytes(r.sealed))
                params = crypto.Argon2Parameters(int(r.time_cost), int(r.memory_kib))
                nonce, sealed = key.seal_verifier(r.namespace, r.user, plain, params,
                                                  bytes(r.salt))
                conn.execute(
                    update(t_users)
                    .where(t_users.c.namespace == r.namespace, t_users.c.user == r.user)
                    .values(nonce=nonce, sealed=sealed)
                )
                count += 1
            conn.execute(
                update(t_meta).where(t_meta.c.name == "schema_version").values(value="2")
            )
            self._append(conn, ADMIN, "schema.reseal", str(count), "ok")

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def max_concurrent_hashes(self) -> int:
        return self.settings.max_concurrent_hashes

    # -- transactions ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction that holds the audit tail (and so every decision) locked."""
        try:
            with self._engine.connect() as conn:
                conn = conn.execution_options(ratelock_begin="BEGIN IMMEDIATE")
                with conn.begin():
                    # The audit tail first, in every write (FOR UPDATE on PostgreSQL; SQLite's
                    # BEGIN IMMEDIATE already holds the write lock): all decisions queue on one
                    # row, so bucket locks taken after it can never deadlock. Kept for _append.
                    tail = conn.execute(
                        select(t_audit_tail.c.seq, t_audit_tail.c.hash, t_audit_tail.c.signed_seq)
                        .where(t_audit_tail.c.id == 1)
                        .with_for_update()
                    ).one()
                    conn.info["ratelock_tail"] = (
                        int(tail.seq),
                        bytes(tail.hash),
                        int(tail.signed_seq),
                    )
                    try:
                        yield conn
                    finally:
                        conn.info.pop("ratelock_tail", None)
        except SQLAlchemyError as exc:
            raise VaultError(f"ratelock store {self._store}: {_short(exc)}") from None

    def _append(self, conn: Connection, client: str, op: str, subject: str, outcome: str) -> int:
        tail: tuple[int, bytes, int] = conn.info["ratelock_tail"]
        last_seq, last_hash, signed_seq = tail
        seq = last_seq + 1
        entry = audit.make_entry(last_hash, seq, self._clock(), client, op, subject, outcome)
        conn.execute(
            insert(t_audit).values(
                seq=seq,
                time_ms=entry.time_ms,
                client=client,
                op=op,
                subject=subject,
                outcome=outcome,
                prev=entry.prev,
                hash=entry.hash,
            )
        )
        conn.execute(
            update(t_audit_tail).where(t_audit_tail.c.id == 1).values(seq=seq, hash=entry.hash)
        )
        if self._sign and seq - signed_seq >= self.settings.audit_sign_every_entries:
            self._sign_head(conn, seq, entry.hash)
            signed_seq = seq
        conn.info["ratelock_tail"] = (seq, entry.hash, signed_seq)
        return seq

    def _sign_head(self, conn: Connection, seq: int, hash_: bytes) -> None:
        assert self._sign is not None and self._identity is not None
        now = self._clock()
        signature = self._sign(audit.head_message(seq, hash_, now))
        conn.execute(
            insert(t_audit_heads).values(
                seq=seq,
                hash=hash_,
                time_ms=now,
                public_key=self._identity.public_key,
                signature=signature,
            )
        )
        conn.execute(update(t_audit_tail).where(t_audit_tail.c.id == 1).values(signed_seq=seq))

    def _charge(
        self,
        conn: Connection,
        names: tuple[str, ...],
        rates: tuple[policy.Rate, ...],
    ) -> policy.Joint:
        """Read, decide and (if allowed) write the buckets, rows locked until commit."""
        now = self._clock()

        def locked() -> dict[str, Any]:
            return {
                r.name: r
                for r in conn.execute(
                    select(t_buckets)
                    .where(t_buckets.c.name.in_(names))
                    .order_by(t_buckets.c.name)
                    .with_for_update()
                )
            }

        rows = locked()
        if len(rows) < len(names):  # first use of a bucket: make its row, then lock it
            for name, rate in sorted(zip(names, rates, strict=True), key=lambda nr: nr[0]):
                if name not in rows:
                    conn.execute(_insert_ignore(self._postgres, name, rate.per_period))
            rows = locked()
        tats = []
        for name, rate in zip(names, rates, strict=True):
            row = rows[name]
            tat = int(row.tat)
            if int(row.per_period) != rate.per_period:  # the setting changed: rescale, round up
                tat = -(-tat * rate.per_period // int(row.per_period))
            tats.append(tat)
        joint = policy.charge_all(rates, tats, now)
        if joint.allowed:  # one executemany: psycopg pipelines it into one round trip
            conn.execute(
                update(t_buckets)
                .where(t_buckets.c.name == bindparam("b_name"))
                .values(tat=bindparam("b_tat"), per_period=bindparam("b_per")),
                [
                    {"b_name": n, "b_tat": t, "b_per": r.per_period}
                    for n, r, t in zip(names, rates, joint.tats, strict=True)
                ],
            )
        return joint

    def _refund(
        self, conn: Connection, names: tuple[str, ...], rates: tuple[policy.Rate, ...]
    ) -> None:
        now = self._clock()
        rows = {
            r.name: r
            for r in conn.execute(
                select(t_buckets)
                .where(t_buckets.c.name.in_(names))
                .order_by(t_buckets.c.name)
                .with_for_update()
            )
        }
        for name, rate in zip(names, rates, strict=True):
            row = rows.get(name)
            if row is None or int(row.per_period) != rate.per_period:
                continue
            conn.execute(
                update(t_buckets)
                .where(t_buckets.c.name == name)
                .values(tat=policy.refund(rate, int(row.tat), now))
            )

    # -- checks on input ---------------------------------------------------------------------

    def _bad_name(self, what: str, name: str) -> Outcome | None:
        if not name or len(name.encode("utf-8", "surrogatepass")) > self.settings.max_name_bytes:
            return Outcome(
                "invalid", detail=f"{what} must be 1 to {self.settings.max_name_bytes} bytes"
            )
        if any(ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF for c in name):
            return Outcome("invalid", detail=f"{what} has control characters")
        return None

    def _bad_password(self, password: bytes) -> Outcome | None:
        if len(password) > self.settings.max_password_bytes:
            return Outcome(
                "invalid", detail=f"password longer than {self.settings.max_password_bytes} bytes"
            )
        return None

    def _hash(self, password: bytes, salt: bytes, params: crypto.Argon2Parameters) -> bytes:
        with self._hashes:
            return crypto.argon2(password, salt, params)

    def _params_allowed(self, params: crypto.Argon2Parameters) -> bool:
        s = self.settings
        return (
            ARGON2_MIN_TIME_COST <= params.time_cost <= s.argon2_max_time_cost
            and ARGON2_MIN_MEMORY_KIB <= params.memory_kib <= s.argon2_max_memory_kib
        )

    def _tampered(self, client: str, user: str, why: str) -> Outcome:
        """A stored verifier refused (edited in the database): counted, never hashed."""
        with self._counts_lock:
            self.tampered_rows += 1
        return Outcome("tampered", detail=why)

    # -- passwords ----------------------------------------------------------------------------

    def _fail_buckets(self, client: str, user: str) -> tuple[str, ...]:
        return (f"fail:user:{client}\x1f{user}", f"fail:client:{client}", "fail:global")

    def enroll(self, client: str, user: str, password: bytes) -> Outcome:
        bad = self._bad_name("user", user) or self._bad_password(password)
        if bad:
            return bad
        salt = crypto.new_salt()
        verifier = self._hash(password, salt, self._params)
        with self._write() as conn:
            exists = conn.execute(
                select(t_users.c.user).where(t_users.c.namespace == client, t_users.c.user == user)
            ).first()
            # "exists" says the user is there: charged like a verify probe (design: probing for
            # names costs the same budget as guessing), else a free existence oracle. Decided
            # before looking, so over budget is the answer for new and existing names alike;
            # a new name gets its token back in this same transaction.
            names = self._fail_buckets(client, user)
            joint = self._charge(conn, names, self._fail_rates)
            if not joint.allowed:
                self._append(conn, client, "enroll", user, "over_budget")
                return Outcome("over_budget", retry_after_s=joint.retry_after_ms / 1000)
            if exists:
                self._append(conn, client, "enroll", user, "exists")
                return Outcome("exists")
            self._refund(conn, names, self._fail_rates)
            key = self._key_for_write(conn)
            nonce, sealed = key.seal_verifier(client, user, verifier, self._params, salt)
            conn.execute(
                insert(t_users).values(
                    namespace=client,
                    user=user,
                    salt=salt,
                    time_cost=self._params.time_cost,
                    memory_kib=self._params.memory_kib,
                    key_id=key.key_id,
                    nonce=nonce,
                    sealed=sealed,
                    updated_ms=self._clock(),
                )
            )
            self._append(conn, client, "enroll", user, "ok")
        return Outcome("ok")

    def verify(self, client: str, user: str, password: bytes) -> Outcome:
        return self._verify(client, user, password, op="verify")

    def _verify(self, client: str, user: str, password: bytes, *, op: str) -> Outcome:
        bad = self._bad_name("user", user) or self._bad_password(password)
        if bad:
            return bad
        names = self._fail_buckets(client, user)
        # 1. Decide and charge, durably, before anything about the password is computed.
        with self._write() as conn:
            joint = self._charge(conn, names, self._fail_rates)
            if not joint.allowed:
                self._append(conn, client, op, user, "over_budget")
                return Outcome("over_budget", retry_after_s=joint.retry_after_ms / 1000)
            row = conn.execute(
                select(t_users).where(t_users.c.namespace == client, t_users.c.user == user)
            ).first()
            params = None
            if row is not None:
                params = crypto.Argon2Parameters(int(row.time_cost), int(row.memory_kib))
                if not self._params_allowed(params):
                    # a database writer raised them (or the bounds were lowered): refused
                    # before anything is hashed or allocated, and said so in the audit log
                    self._append(conn, client, op, user, "tampered")
                    return self._tampered(client, user, "parameters out of bounds")
            self._append(conn, client, op, user, "charged" if row else "unknown")
        if row is None or params is None:
            return Outcome("unknown")
        # 2. The charge is committed: open (the parameters and salt are in the associated
        # data, so edited ones do not open), then hash outside any transaction.
        salt_ = bytes(row.salt)
        key_ = self._key(int(row.key_id))
        try:
            stored = key_.open_verifier(client, user, bytes(row.nonce), bytes(row.sealed),
                                        params, salt_)
        except SealError:
            with self._write() as conn:
                self._append(conn, client, op, user, "tampered")
            return self._tampered(client, user, "verifier does not open")
        ok = crypto.same(self._hash(password, salt_, params), stored)
        # 3. Record the result; a success gives its token back and upgrades the parameters.
        upgrade: tuple[bytes, bytes] | None = None
        if ok and params != self._params:
            salt = crypto.new_salt()
            upgrade = (salt, self._hash(password, salt, self._params))
        with self._write() as conn:
            if ok:
                self._refund(conn, names, self._fail_rates)
                if upgrade:
                    salt, verifier = upgrade
                    key = self._key_for_write(conn)
                    nonce, sealed = key.seal_verifier(client, user, verifier, self._params, salt)
                    key_id = key.key_id
                    conn.execute(
                        update(t_users)
                        .where(
                            t_users.c.namespace == client,
                            t_users.c.user == user,
                            t_users.c.salt == row.salt,  # not if changed meanwhile
                        )
                        .values(
                            salt=salt,
                            nonce=nonce,
                            sealed=sealed,
                            key_id=key_id,
                            time_cost=self._params.time_cost,
                            memory_kib=self._params.memory_kib,
                            updated_ms=self._clock(),
                        )
                    )
            self._append(conn, client, op, user, "ok" if ok else "wrong")
        return Outcome("ok" if ok else "wrong")

    def change(self, client: str, user: str, old: bytes, new: bytes) -> Outcome:
        bad = self._bad_password(new)
        if bad:
            return bad
        checked = self._verify(client, user, old, op="change")
        if checked.kind != "ok":
            return checked
        salt = crypto.new_salt()
        verifier = self._hash(new, salt, self._params)
        with self._write() as conn:
            key = self._key_for_write(conn)
            nonce, sealed = key.seal_verifier(client, user, verifier, self._params, salt)
            result = conn.execute(
                update(t_users)
                .where(t_users.c.namespace == client, t_users.c.user == user)
                .values(
                    salt=salt,
                    nonce=nonce,
                    sealed=sealed,
                    key_id=key.key_id,
                    time_cost=self._params.time_cost,
                    memory_kib=self._params.memory_kib,
                    updated_ms=self._clock(),
                )
            )
            found = result.rowcount == 1
            self._append(conn, client, "change.store", user, "ok" if found else "unknown")
        return Outcome("ok" if found else "unknown")

    def delete_user(self, client: str, user: str) -> Outcome:
        bad = self._bad_name("user", user)
        if bad:
            return bad
        with self._write() as conn:
            result = conn.execute(
                delete(t_users).where(t_users.c.namespace == client, t_users.c.user == user)
            )
            found = result.rowcount == 1
            self._append(conn, client, "delete_user", user, "ok" if found else "unknown")
        return Outcome("ok" if found else "unknown")

    # -- records --------------------------------------------------------------------------------

    def put(self, client: str, key: str, data: bytes) -> Outcome:
        bad = self._bad_name("key", key)
        if bad:
            return bad
        if len(data) > self.settings.max_record_bytes:
            return Outcome(
                "invalid", detail=f"record longer than {self.settings.max_record_bytes} bytes"
            )
        with self._write() as conn:
            vkey = self._key_for_write(conn)
            nonce, sealed = vkey.seal_record(client, key, data)
            values = {
                "key_id": vkey.key_id,
                "nonce": nonce,
                "sealed": sealed,
                "updated_ms": self._clock(),
            }
            changed = conn.execute(
                update(t_records)
                .where(t_records.c.namespace == client, t_records.c.key == key)
                .values(**values)
            ).rowcount
            if not changed:
                conn.execute(insert(t_records).values(namespace=client, key=key, **values))
            self._append(conn, client, "put", key, "ok")
        return Outcome("ok")

    def get(self, client: str, key: str) -> Outcome:
        """Every get is charged, found or not, before the record is opened."""
        bad = self._bad_name("key", key)
        if bad:
            return bad
        names = (f"read:key:{client}\x1f{key}", f"read:client:{client}", "read:global")
        with self._write() as conn:
            joint = self._charge(conn, names, self._read_rates)
            if not joint.allowed:
                self._append(conn, client, "get", key, "over_budget")
                return Outcome("over_budget", retry_after_s=joint.retry_after_ms / 1000)
            row = conn.execute(
                select(t_records).where(t_records.c.namespace == client, t_records.c.key == key)
            ).first()
            self._append(conn, client, "get", key, "ok" if row else "not_found")
        if row is None:
            return Outcome("not_found")
        data = self._key(int(row.key_id)).open_record(
            client, key, bytes(row.nonce), bytes(row.sealed)
        )
        return Outcome("ok", data=data)

    def delete_record(self, client: str, key: str) -> Outcome:
        bad = self._bad_name("key", key)
        if bad:
            return bad
        with self._write() as conn:
            found = (
                conn.execute(
                    delete(t_records).where(t_records.c.namespace == client, t_records.c.key == key)
                ).rowcount
                == 1
            )
            self._append(conn, client, "delete_record", key, "ok" if found else "not_found")
        return Outcome("ok" if found else "not_found")

    # -- clients ---------------------------------------------------------------------------------

    def add_client(self, name: str) -> str:
        """A new client and its token (returned once; only its digest is stored)."""
        bad = self._bad_name("client name", name)
        if bad or name.startswith("-"):
            raise ValueError(bad.detail if bad else "a client name must not start with '-'")
        token = crypto.new_token()
        try:
            with self._write() as conn:
                if conn.execute(select(t_clients.c.name).where(t_clients.c.name == name)).first():
                    raise ValueError(f"client {name!r} exists")
                conn.execute(
                    insert(t_clients).values(
                        name=name, token_digest=crypto.token_digest(token), created_ms=self._clock()
                    )
                )
                self._append(conn, ADMIN, "client.add", name, "ok")
        except IntegrityError:
            raise ValueError(f"client {name!r} exists") from None
        return token

    def list_clients(self) -> list[ClientInfo]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(t_clients).order_by(t_clients.c.name)).all()
        return [ClientInfo(r.name, int(r.created_ms), r.revoked_ms) for r in rows]

    def revoke_client(self, name: str) -> bool:
        with self._write() as conn:
            done = (
                conn.execute(
                    update(t_clients)
                    .where(t_clients.c.name == name, t_clients.c.revoked_ms.is_(None))
                    .values(revoked_ms=self._clock())
                ).rowcount
                == 1
            )
            self._append(conn, ADMIN, "client.revoke", name, "ok" if done else "unknown")
        return done

    def authenticate(self, token: str) -> str | None:
        if not token.startswith("rl1_") or len(token) > 64:
            return None
        with self._engine.connect() as conn:
            row = conn.execute(
                select(t_clients.c.name, t_clients.c.revoked_ms).where(
                    t_clients.c.token_digest == crypto.token_digest(token)
                )
            ).first()
        if row is None or row.revoked_ms is not None:
            return None
        return str(row.name)

    # -- the secret ------------------------------------------------------------------------------

    def _current_key(self) -> crypto.VaultKey:
        with self._secret_lock:
            return self._secret.current

    def _reload_secret(self) -> crypto.SecretFile:
        """Read the secret file again (another process rotated: ``ratelock secret rotate``
        while ratelockd runs). The file's keys come first (its first is current); every key
        this process held before stays known in memory, so a row read under the old key just
        before the rotation resealed it still opens after the rotation dropped that key from
        the file. The file, not memory, is what a thief of the disk would get."""
        with self._secret_lock:
            fresh = crypto.open_secret(self._secret.path, create=False)
            known = {k.key_id for k in fresh.keys}
            kept = tuple(k for k in self._secret.keys if k.key_id not in known)
            self._secret = crypto.SecretFile(fresh.path, (*fresh.keys, *kept))
            return self._secret

    def _key(self, key_id: int) -> crypto.VaultKey:
        with self._secret_lock:
            secret = self._secret
        try:
            return secret.key(key_id)
        except SealError:
            # another process may have rotated: read the file again once
            return self._reload_secret().key(key_id)

    def _key_for_write(self, conn: Connection) -> crypto.VaultKey:
        """The key to seal with, checked under the write lock against the key id the last
        rotation recorded in the store (in its own locked transaction): a process that missed
        another's rotation would otherwise seal under a key that rotation then drops from the
        file, and those rows would never open again."""
        recorded = conn.execute(
            select(t_meta.c.value).where(t_meta.c.name == SECRET_KEY_META)
        ).scalar()
        key = self._current_key()
        if recorded is None or int(recorded) == key.key_id:
            return key
        # the rotation record moved on: another process rotated while we ran
        # (or one crashed after writing its new key first: the recorded key is still current)
        return self._reload_secret().key(int(recorded))

    def rotate_secret(self) -> int:
        """A new secret; every verifier and record re-encrypted; the old one dropped. No
        password is needed (the secret seals the verifier, it is not hashed into it)."""
        with _rotation_lock(self._secret.path):
            return self._rotate_secret()

    def _rotate_secret(self) -> int:
        import secrets as _secrets

        with self._secret_lock:
            old = crypto.open_secret(self._secret.path, create=False)
            new_key = crypto.VaultKey(
                max(k.key_id for k in old.keys) + 1, _secrets.token_bytes(crypto.SECRET_BYTES)
            )
            # 1. the new key first, old ones kept: a crash from here on leaves all rows openable
            crypto.write_secret(old.path, (new_key, *old.keys))
            self._secret = crypto.SecretFile(old.path, (new_key, *old.keys))
        count = 0
        with self._write() as conn:
            for r in conn.execute(select(t_users).where(t_users.c.key_id != new_key.key_id)).all():
                params = crypto.Argon2Parameters(int(r.time_cost), int(r.memory_kib))
                plain = old.key(int(r.key_id)).open_verifier(
                    r.namespace, r.user, bytes(r.nonce), bytes(r.sealed), params, bytes(r.salt)
                )
                nonce, sealed = new_key.seal_verifier(
                    r.namespace, r.user, plain, params, bytes(r.salt)
                )
                conn.execute(
                    update(t_users)
                    .where(t_users.c.namespace == r.namespace, t_users.c.user == r.user)
                    .values(nonce=nonce, sealed=sealed, key_id=new_key.key_id)
                )
                count += 1
            for r in conn.execute(
                select(t_records).where(t_records.c.key_id != new_key.key_id)
            ).all():
                plain = old.key(int(r.key_id)).open_record(
                    r.namespace, r.key, bytes(r.nonce), bytes(r.sealed)
                )
                nonce, sealed = new_key.seal_record(r.namespace, r.key, plain)
                conn.execute(
                    update(t_records)
                    .where(t_records.c.namespace == r.namespace, t_records.c.key == r.key)
                    .values(nonce=nonce, sealed=sealed, key_id=new_key.key_id)
                )
                count += 1
            # recorded under the lock: every later seal, in any process, checks it
            if not conn.execute(
                update(t_meta)
                .where(t_meta.c.name == SECRET_KEY_META)
                .values(value=str(new_key.key_id))
            ).rowcount:
                conn.execute(insert(t_meta).values(name=SECRET_KEY_META, value=str(new_key.key_id)))
            self._append(conn, ADMIN, "secret.rotate", str(new_key.key_id), "ok")
        # 2. committed: the old keys can go
        with self._secret_lock:
            crypto.write_secret(old.path, (new_key,))
            self._secret = crypto.SecretFile(old.path, (new_key,))
        return count

    # -- audit -------------------------------------------------------------------------------------

    def record_refusals(self, rows: list[tuple[str, str, str, str]]) -> int:
        """Append the server's aggregated refusals (audit.RefusalTally.take) in one transaction;
        returns the rows written. Nothing was charged for them: they are the audit's only."""
        if not rows:
            return 0
        with self._write() as conn:
            for client, op, subject, outcome in rows:
                self._append(conn, client, op, subject, outcome)
        return len(rows)


    def sign_audit_head(self) -> int | None:
        """Sign the current head if entries came since the last signed one (the server's timer)."""
        if self._sign is None:
            return None
        with self._write() as conn:
            tail = conn.execute(
                select(t_audit_tail).where(t_audit_tail.c.id == 1).with_for_update()
            ).one()
            if int(tail.seq) == 0 or int(tail.seq) == int(tail.signed_seq):
                return None
            self._sign_head(conn, int(tail.seq), bytes(tail.hash))
            return int(tail.seq)

    def audit_verify(self) -> audit.AuditReport:
        trusted = (
            [self._identity.public_key, *self._previous_keys] if self._identity else None
        )
        with self._engine.connect() as conn:
            heads = [
                audit.Head(
                    int(h.seq),
                    bytes(h.hash),
                    int(h.time_ms),
                    bytes(h.public_key),
                    bytes(h.signature),
                )
                for h in conn.execute(select(t_audit_heads).order_by(t_audit_heads.c.seq))
            ]
            rows = conn.execute(select(t_audit).order_by(t_audit.c.seq)).yield_per(1000)
            entries = (
                audit.Entry(
                    int(r.seq),
                    int(r.time_ms),
                    r.client,
                    r.op,
                    r.subject,
                    r.outcome,
                    bytes(r.prev),
                    bytes(r.hash),
                )
                for r in rows
            )
            report = audit.verify_chain(
                entries, heads, check_signature, trusted_keys=trusted,
                retired_keys=self._previous_keys if self._identity else (),
            )
            tail = conn.execute(select(t_audit_tail).where(t_audit_tail.c.id == 1)).one()
        if self._identity is None:
            return report
        # With the node key, _append signs a head at least every audit_sign_every_entries: a
        # longer unsigned stretch at the end means heads were deleted (to hide a rebuilt chain
        # that no longer matches them), which the chain alone cannot show.
        extra: list[str] = []
        every = self.settings.audit_sign_every_entries
        if report.last_seq - report.signed_seq >= every:
            extra.append(
                f"entries {report.signed_seq + 1} to {report.last_seq} have no signed head, but "
                f"one is signed every {every} entries: heads deleted, the chain rebuilt "
                "(or audit_sign_every_entries lowered since the last request)"
            )
        if int(tail.signed_seq) > report.signed_seq:
            extra.append(
                f"the store says head {int(tail.signed_seq)} was signed, and no signed head "
                "verifies that far: heads deleted"
            )
        if not extra:
            return report
        return dataclasses.replace(report, problems=(*report.problems, *extra))

    def client_status(self, client: str) -> ClientStatus:
        """The caller's own counts and budget levels (never another client's)."""
        fail_rate, read_rate = self._fail_rates[1], self._read_rates[1]
        names = {f"fail:client:{client}": fail_rate, f"read:client:{client}": read_rate}
        now = self._clock()
        try:
            with self._engine.connect() as conn:

                def count(table: Table) -> int:
                    return int(
                        conn.execute(
                            select(func.count()).select_from(table)
                            .where(table.c.namespace == client)
                        ).scalar_one()
                    )

                users, records = count(t_users), count(t_records)
                rows = {
                    r.name: r
                    for r in conn.execute(select(t_buckets).where(t_buckets.c.name.in_(names)))
                }
        except SQLAlchemyError as exc:
            raise VaultError(f"ratelock store {self._store}: {_short(exc)}") from None

        def available(name: str) -> int:
            rate, row = names[name], rows.get(name)
            if row is None:
                return rate.burst
            tat = int(row.tat)
            if int(row.per_period) != rate.per_period:
                tat = -(-tat * rate.per_period // int(row.per_period))
            return policy.remaining(rate, tat, now)

        s = self.settings
        return ClientStatus(
            client=client,
            schema_version=SCHEMA_VERSION,
            users=users,
            records=records,
            failures_available=available(f"fail:client:{client}"),
            failures_burst=s.client_failures_burst,
            failures_per_hour=s.client_failures_per_hour,
            reads_available=available(f"read:client:{client}"),
            reads_burst=s.client_reads_burst,
            reads_per_hour=s.client_reads_per_hour,
            global_failures_burst=s.global_failures_burst,
            global_failures_per_hour=s.global_failures_per_hour,
            global_reads_burst=s.global_reads_burst,
            global_reads_per_hour=s.global_reads_per_hour,
            argon2_time_cost=self._params.time_cost,
            argon2_memory_kib=self._params.memory_kib,
            max_concurrent_hashes=self.max_concurrent_hashes,
        )

    def status(self) -> VaultStatus:
        with self._engine.connect() as conn:

            def count(table: Table) -> int:
                return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

            tail = conn.execute(select(t_audit_tail).where(t_audit_tail.c.id == 1)).one()
            return VaultStatus(
                store=self._store,
                schema_version=SCHEMA_VERSION,
                users=count(t_users),
                records=count(t_records),
                clients=count(t_clients),
                audit_entries=int(tail.seq),
                audit_signed_seq=int(tail.signed_seq),
                secret_key_id=self._current_key().key_id,
                argon2_time_cost=self._params.time_cost,
                argon2_memory_kib=self._params.memory_kib,
                max_concurrent_hashes=self.max_concurrent_hashes,
            )


# ---------------------------------------------------------------------------------------------
# Engine and schema


def _insert_ignore(postgres: bool, name: str, per_period: int) -> Any:
    if postgres:
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return (
            pg_insert(t_buckets)
            .values(name=name, tat=0, per_period=per_period)
            .on_conflict_do_nothing()
        )
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return (
        sqlite_insert(t_buckets)
        .values(name=name, tat=0, per_period=per_period)
        .on_conflict_do_nothing()
    )


def _create_engine(url_text: str) -> Engine:
    try:
        url = make_url(url_text)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError and friends
        raise VaultError(f"ratelock.store_url {url_text!r} is not a database URL: {exc}") from None
    backend = url.get_backend_name()
    if backend == "postgresql":
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
        return create_engine(
            url,
            pool_pre_ping=True,
            pool_size=POOL_SIZE,
            max_overflow=POOL_OVERFLOW,
            connect_args=connect_args,
        )
    if backend != "sqlite":
        raise VaultError(f"ratelock.store_url: {backend} is not supported (sqlite or postgresql)")
    database = url.database or ""
    if database in ("", ":memory:"):
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy, not pysqlite, emits BEGIN (pysqlite's legacy mode skips it before SELECT)
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed charge survives power loss too (NORMAL in WAL survives a kill -9
            # but may lose the last commits on power loss, which would refund charges).
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("ratelock_begin", "BEGIN"))

    return engine


def _migrate(engine: Engine) -> None:
    with engine.connect() as conn:
        conn = conn.execution_options(ratelock_begin="BEGIN IMMEDIATE")
        with conn.begin():
            metadata.create_all(conn)
            version = conn.execute(
                select(t_meta.c.value).where(t_meta.c.name == "schema_version")
            ).scalar()
            if version is None:
                conn.execute(
                    insert(t_meta).values(name="schema_version", value=str(SCHEMA_VERSION))
                )
                conn.execute(
                    insert(t_audit_tail).values(id=1, seq=0, hash=audit.GENESIS, signed_seq=0)
                )
            elif int(version) > SCHEMA_VERSION:
                raise VaultError(
                    f"the ratelock store has schema {version}, newer than this ratelock "
                    f"({SCHEMA_VERSION}): upgrade ratelock"
                )


#: How long a rotation waits for another one (in any process) to finish.
ROTATION_LOCK_TIMEOUT_S = 600.0


@contextlib.contextmanager
def _rotation_lock(secret: Path) -> Iterator[None]:
    """One rotation at a time per secret file, across processes (flock beside the file): two
    that both read the file before either wrote made the same key id, and the file ended up
    holding the key the rows were not sealed with."""
    path = secret.with_name(f"{secret.name}.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise VaultError(f"cannot open {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + ROTATION_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VaultError(f"another secret rotation holds {path}") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # drops the flock


def _previous_keys(home: Path) -> tuple[bytes, ...]:
    """The node key kept by the last rotation (one overlap at a time), if any."""
    try:
        previous = load_previous_public(home)
    except IdentityError as exc:
        raise VaultError(str(exc)) from None
    return (previous,) if previous is not None else ()


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<bad url>"


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200]
