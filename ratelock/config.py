"""``[ratelock]`` of the node home's ``overflowd.toml``: every key ratelockd and the vault read.

Parsed as strictly as the node's own sections (:func:`overflowd.config.load_section`): an
unknown key or a wrong type is one line naming the file, line and key. Budgets are token buckets
(:mod:`ratelock.policy`): ``*_burst`` is how many may pass at once, ``*_per_hour`` how fast the
bucket refills; over any ``t`` hours at most ``burst + per_hour * t`` pass, never one more.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from overflowd.config import load_section

#: libsodium's floor for Argon2id (crypto_pwhash_argon2id_OPSLIMIT_MIN / MEMLIMIT_MIN in KiB).
#: Values this small are for tests only; docs/ratelock-design.md says what to run.
ARGON2_MIN_TIME_COST = 1
ARGON2_MIN_MEMORY_KIB = 8
#: libsodium's ceiling for memory (4 TiB on 64-bit); a typo of a few zeros should not be taken.
ARGON2_MAX_MEMORY_KIB = 4 * 1024 * 1024  # 4 GiB: more than any verifier needs

#: ratelock.policy keeps a bucket as an integer in units of 1/per_hour ms: now_ms x per_hour
#: must fit the database's signed 64-bit column for centuries (2**63 / 1e6 ms ~ 292 years
#: of milliseconds at a million per hour), and so must burst x 3,600,000.
#: what the wire can carry: a verdict names a user or key of at most ratelock.verdict
#: MAX_NAME_BYTES (1024), and so wide are the users/records columns; and a change sends two
#: passwords base64url in one JSON body of at most ratelock.server MAX_PASSWORD_BODY_BYTES
#: (4096): 2 x ceil(4 x 1500 / 3) + 22 bytes of JSON = 4022. A larger setting would silently
#: refuse names or passwords below it.
MAX_NAME_BYTES_CEILING = 1024
MAX_PASSWORD_BYTES_CEILING = 1500
MAX_PER_HOUR = 1_000_000
MAX_BURST = 1_000_000_000


@dataclass(frozen=True)
class RatelockSettings:
    """All ``[ratelock]`` keys with their defaults (docs/ratelock.md lists them for operators)."""

    # -- where: the server (ratelock-server) --------------------------------------------------
    #: ``unix:PATH`` (relative to the home) or ``tcp:HOST:PORT``
    listen: str = "unix:ratelockd.sock"
    #: octal permissions of the Unix socket: the application's group may connect, nobody else
    socket_mode: str = "0660"
    #: group owning the socket ("" = the daemon's own group)
    socket_group: str = ""

    # -- the store and the secret -------------------------------------------------------------
    #: SQLAlchemy URL of the vault's own database; "" = sqlite file ``ratelock.db`` in the home.
    #: Never the reports store: the application must not be able to read it.
    store_url: str = ""
    #: the vault secret (encrypts verifiers and records), relative to the home; mode 0600
    secret_file: str = "ratelock.secret"

    # -- Argon2id (RFC 9106 §4 second recommended option, t=3 and 64 MiB; libsodium runs p=1) --
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    #: the most a stored verifier may ask for: a verify of a row above either is refused
    #: ("tampered", never hashed), so a database writer cannot make each verify a memory bomb.
    #: Refused at start when below the two above; raise them before raising the parameters.
    argon2_max_time_cost: int = 12
    argon2_max_memory_kib: int = 262144
    #: hashes running at once: each holds argon2_memory_kib, so memory is bounded by the product
    max_concurrent_hashes: int = 4

    # -- budgets for failed verifies (a success gives its charge back) -----------------------
    user_failures_burst: int = 10
    user_failures_per_hour: int = 10
    client_failures_burst: int = 1000
    client_failures_per_hour: int = 1000
    global_failures_burst: int = 10000
    global_failures_per_hour: int = 10000

    # -- budgets for record reads (every get is charged, found or not) -----------------------
    key_reads_burst: int = 60
    key_reads_per_hour: int = 60
    client_reads_burst: int = 600
    client_reads_per_hour: int = 600
    global_reads_burst: int = 6000
    global_reads_per_hour: int = 6000

    # -- limits on what a client may send (every network input is an attacker's) ------------
    #: user names and record keys: bytes of UTF-8
    max_name_bytes: int = 256
    #: a password longer than this is refused before hashing (Argon2 hashes any length, slowly)
    max_password_bytes: int = 1024
    #: one record's plaintext
    max_record_bytes: int = 65536

    # -- audit ---------------------------------------------------------------------------------
    #: the vault signs the audit head after this many new entries (and the server on a timer)
    audit_sign_every_entries: int = 256
    #: the server signs the head at least this often when there were new entries
    audit_sign_interval_s: float = 60.0

    #: requests refused before the vault (bad token, malformed or too large body, wrong
    #: method) are audited as one counted row per (client, op, reason) per this many seconds
    audit_refusal_window_s: float = 10.0

    # -- verdicts --------------------------------------------------------------------------------
    #: a client refuses a verdict dated further than this from its own clock
    verdict_max_skew_s: float = 30.0

    def problems(self) -> Iterator[tuple[str, str]]:
        if not re.fullmatch(r"unix:.+|tcp:.+:\d{1,5}", self.listen):
            yield "listen", f"has {self.listen!r}: write unix:PATH or tcp:HOST:PORT"
        if not re.fullmatch(r"0?[0-7]{3}", self.socket_mode):
            yield "socket_mode", f"has {self.socket_mode!r}, which is not an octal mode like 0660"
        if not self.secret_file:
            yield "secret_file", "must name a file"
        if self.argon2_time_cost < ARGON2_MIN_TIME_COST:
            yield "argon2_time_cost", f"must be at least {ARGON2_MIN_TIME_COST}"
        if not ARGON2_MIN_MEMORY_KIB <= self.argon2_memory_kib <= ARGON2_MAX_MEMORY_KIB:
            yield (
                "argon2_memory_kib",
                f"must be in [{ARGON2_MIN_MEMORY_KIB}, {ARGON2_MAX_MEMORY_KIB}]",
            )
        if self.argon2_max_time_cost < self.argon2_time_cost:
            yield (
                "argon2_max_time_cost",
                f"must be at least argon2_time_cost ({self.argon2_time_cost})",
            )
        if not self.argon2_memory_kib <= self.argon2_max_memory_kib <= ARGON2_MAX_MEMORY_KIB:
            yield (
                "argon2_max_memory_kib",
                f"must be in [argon2_memory_kib ({self.argon2_memory_kib}), "
                f"{ARGON2_MAX_MEMORY_KIB}]",
            )
        if self.max_concurrent_hashes < 1:
            yield "max_concurrent_hashes", "must be at least 1"
        for name in (
            "user_failures",
            "client_failures",
            "global_failures",
            "key_reads",
            "client_reads",
            "global_reads",
        ):
            if getattr(self, f"{name}_burst") < 1:
                yield f"{name}_burst", "must be at least 1"
            if not 1 <= getattr(self, f"{name}_per_hour") <= MAX_PER_HOUR:
                yield f"{name}_per_hour", f"must be in [1, {MAX_PER_HOUR}]"
            if getattr(self, f"{name}_burst") > MAX_BURST:
                yield f"{name}_burst", f"must be at most {MAX_BURST}"
        for name in ("max_name_bytes", "max_password_bytes", "max_record_bytes"):
            if getattr(self, name) < 1:
                yield name, "must be positive"
        if self.max_name_bytes > MAX_NAME_BYTES_CEILING:
            yield (
                "max_name_bytes",
                f"must be at most {MAX_NAME_BYTES_CEILING} (what a verdict names)",
            )
        if self.max_password_bytes > MAX_PASSWORD_BYTES_CEILING:
            yield (
                "max_password_bytes",
                f"must be at most {MAX_PASSWORD_BYTES_CEILING} (what a change request carries)",
            )
        if self.audit_sign_every_entries < 1:
            yield "audit_sign_every_entries", "must be at least 1"
        if self.audit_sign_interval_s <= 0:
            yield "audit_sign_interval_s", "must be positive"
        if self.audit_refusal_window_s <= 0:
            yield "audit_refusal_window_s", "must be positive"
        if self.verdict_max_skew_s <= 0:
            yield "verdict_max_skew_s", "must be positive"

    def store_url_for(self, home: Path) -> str:
        """The vault database's URL: ``store_url``, or the sqlite file in the home."""
        return self.store_url or f"sqlite:///{home / 'ratelock.db'}"

    def secret_path(self, home: Path) -> Path:
        path = Path(self.secret_file).expanduser()
        return path if path.is_absolute() else home / path


def load_ratelock(home: Path) -> RatelockSettings:
    """``[ratelock]`` of ``home/overflowd.toml`` (defaults when absent); ConfigError if bad."""
    return load_section(home, "ratelock", RatelockSettings)
