"""``ratelock``: the application's commands (through ratelockd) and the operator's (the vault).

Application commands talk to the daemon with a client token and verify every verdict:
``add USER`` / ``check USER`` (password from a prompt, or the first line of stdin),
``change USER``, ``delete USER``, ``put KEY`` (stdin) / ``get KEY`` / ``forget KEY``.
Operator commands open the vault in the node home directly, as the daemon's user:
``clients add|list|revoke``, ``status``, ``audit verify``, ``secret rotate``.

Exit codes: 0 the answer is yes (ok, stored, verified), 1 the answer is no or we failed (wrong
password, over budget, unknown, ratelockd unreachable, a verdict that does not verify), each
said in one line; 2 usage. A token is never taken on the command line (``ps`` shows argv to
everyone): ``$RATELOCK_TOKEN`` or ``--token-file``.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from overflowd.config import resolve_home
from overflowd.errors import OverflowdError
from ratelock.client import Answer, Client, read_public_key
from ratelock.config import load_ratelock
from ratelock.server import PUBLIC_KEY_FILE, Listen, parse_listen, public_key_path

TOKEN_ENV = "RATELOCK_TOKEN"
#: What ``put`` reads from stdin at most beyond the daemon's own bound: one byte more than
#: the bound tells the daemon's refusal apart from a truncated record.
STDIN_SLACK_BYTES = 1


class Usage(Exception):
    """Bad input from the person at the keyboard: exit 2 with this one line."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratelock", description="Ask ratelockd; run its vault.")
    p.add_argument("--home", help="node home (default $OVERFLOWD_HOME or ~/.overflowd)")
    p.add_argument("--socket", help="ratelockd's Unix socket (default from ratelock.listen)")
    p.add_argument("--url", help="ratelockd over TCP, http://HOST:PORT (instead of --socket)")
    p.add_argument("--token-file", help=f"file holding the client token (default ${TOKEN_ENV})")
    p.add_argument("--public-key-file", help=f"the node key to verify with (default "
                   f"HOME/{PUBLIC_KEY_FILE})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, what in (("add", "enroll USER (password from a prompt or stdin)"),
                       ("check", "verify USER's password (prompt or stdin)"),
                       ("change", "change USER's password (old, then new: two stdin lines)"),
                       ("delete", "delete USER")):
        sub.add_parser(name, help=what).add_argument("user")
    sub.add_parser("put", help="store KEY's record from stdin").add_argument("key")
    sub.add_parser("get", help="write KEY's record to stdout").add_argument("key")
    sub.add_parser("forget", help="delete KEY's record").add_argument("key")
    clients = sub.add_parser("clients", help="manage client tokens (operator)")
    csub = clients.add_subparsers(dest="clients_command", required=True, metavar="ACTION")
    csub.add_parser("add", help="add a client; prints its token once").add_argument("name")
    csub.add_parser("list", help="list clients")
    csub.add_parser("revoke", help="revoke a client's token").add_argument("name")
    sub.add_parser("status", help="budgets, counts and the audit head (operator)")
    audit = sub.add_parser("audit", help="the audit log (operator)")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    asub.add_parser("verify", help="check the hash chain and its signed heads")
    secret = sub.add_parser("secret", help="the vault secret (operator)")
    ssub = secret.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    ssub.add_parser("rotate", help="new secret; re-encrypt verifiers and records")
    return p


# ---------------------------------------------------------------------------------------------
# Application commands


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            text = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise Usage(f"--token-file: cannot read {args.token_file}: {exc}") from None
        if not text:
            raise Usage(f"--token-file: {args.token_file} is empty")
        return text
    text = os.environ.get(TOKEN_ENV, "").strip()
    if not text:
        raise Usage(f"no client token: set ${TOKEN_ENV} or give --token-file "
                    "(an operator makes one with 'ratelock clients add NAME')")
    return text


def _client(args: argparse.Namespace, home: Path) -> Client:
    if args.socket and args.url:
        raise Usage("--socket and --url: give one of them")
    listen = parse_listen(load_ratelock(home).listen, home)
    configured = public_key_path(listen, home)
    if args.socket:
        listen = Listen(path=Path(args.socket))
    if args.public_key_file:
        key_path = Path(args.public_key_file)
    else:
        # beside the socket asked for, else where the configured daemon writes it
        beside = public_key_path(listen, home)
        key_path = beside if beside.exists() else configured
    try:
        public_key = read_public_key(key_path)
    except OverflowdError as exc:
        flag = "--public-key-file" if args.public_key_file else "public key"
        raise OverflowdError(f"{flag}: {exc} (is ratelockd started in {home}?)") from None
    token = _token(args)
    if args.url:
        if not args.url.startswith(("http://", "https://")):
            raise Usage(f"--url: {args.url!r} is not http://HOST:PORT")
        return Client(token=token, public_key=public_key, url=args.url)
    if args.socket:
        return Client(token=token, public_key=public_key, socket_path=Path(args.socket))
    if listen.path is None:
        return Client(token=token, public_key=public_key,
                      url=f"http://{listen.text()}")
    return Client(token=token, public_key=public_key, socket_path=listen.path)


def _read_passwords(count: int, prompts: Sequence[str]) -> list[bytes]:
    """Passwords from a prompt (a terminal) or one per line of stdin (a script)."""
    if sys.stdin.isatty():
        return [getpass.getpass(prompt).encode("utf-8") for prompt in prompts[:count]]
    lines = sys.stdin.buffer.read(64 * 1024).split(b"\n")
    got = [line.removesuffix(b"\r") for line in lines[:count]]
    if len(got) < count or any(not p for p in got):
        raise Usage(f"stdin: expected {count} non-empty line(s) with the password(s)")
    return got


def _say(args: argparse.Namespace, answer: Answer, yes: str) -> int:
    if args.json:
        print(json.dumps({"op": answer.op, "subject": answer.subject, "outcome": answer.outcome,
                          "retry_after_s": answer.retry_after_s, "time_ms": answer.time_ms}))
        return 0 if answer.ok else 1
    if answer.ok:
        print(yes)
        return 0
    print(_refusal(answer), file=sys.stderr)
    return 1


def _refusal(answer: Answer) -> str:
    what = answer.subject
    match answer.outcome:
        case "wrong":
            return f"ratelock: {what}: wrong password"
        case "unknown":
            return f"ratelock: {what}: no such user"
        case "not_found":
            return f"ratelock: {what}: no such record"
        case "exists":
            return f"ratelock: {what}: already exists"
        case "over_budget":
            after = answer.retry_after_s
            return (f"ratelock: {what}: over budget, retry after {after:.0f} s" if after
                    else f"ratelock: {what}: over budget")
        case "unauthorized":
            return "ratelock: ratelockd refused the token (revoked or mistyped?)"
        case other:
            return f"ratelock: {what}: refused ({other})"


def _application(args: argparse.Namespace, home: Path) -> int:
    cmd = args.command
    if cmd == "put":
        limit = load_ratelock(home).max_record_bytes + STDIN_SLACK_BYTES
        data = sys.stdin.buffer.read(limit)
    with _client(args, home) as client:
        if cmd == "add":
            (pw,) = _read_passwords(1, ["password: "])
            return _say(args, client.enroll(args.user, pw), f"{args.user}: enrolled")
        if cmd == "check":
            (pw,) = _read_passwords(1, ["password: "])
            return _say(args, client.verify(args.user, pw), f"{args.user}: password ok")
        if cmd == "change":
            old, new = _read_passwords(2, ["old password: ", "new password: "])
            return _say(args, client.change(args.user, old, new), f"{args.user}: changed")
        if cmd == "delete":
            return _say(args, client.delete_user(args.user), f"{args.user}: deleted")
        if cmd == "put":
            return _say(args, client.put(args.key, data), f"{args.key}: stored")
        if cmd == "forget":
            return _say(args, client.delete_record(args.key), f"{args.key}: deleted")
        assert cmd == "get"
        answer = client.get(args.key)
        if answer.ok and answer.data is not None and not args.json:
            sys.stdout.buffer.write(answer.data)
            sys.stdout.buffer.flush()
            return 0
        return _say(args, answer, "")


# ---------------------------------------------------------------------------------------------
# Operator commands


def _operator(args: argparse.Namespace, home: Path) -> int:
    from ratelock.vault import Vault

    # ``secret rotate`` runs beside a running ratelockd: the daemon checks the rotation record
    # in the store before every seal and reads the secret file again when a row names a key it
    # does not hold (ratelock.vault Vault._key_for_write, Vault._reload_secret).
    settings = load_ratelock(home)
    vault = Vault.open(home, settings)
    try:
        return _operate(args, vault)
    finally:
        vault.close()


def _operate(args: argparse.Namespace, vault: Any) -> int:
    cmd = args.command
    if cmd == "clients":
        action = args.clients_command
        if action == "add":
            try:
                token = vault.add_client(args.name)
            except ValueError as exc:
                print(f"ratelock: clients add {args.name!r}: {exc}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps({"client": args.name, "token": token}))
            else:
                print(token)
                print(f"client {args.name} added: the token above is shown once; give it to "
                      f"the application as ${TOKEN_ENV} or a --token-file", file=sys.stderr)
            return 0
        if action == "list":
            rows = [dataclasses.asdict(c) for c in vault.list_clients()]
            if args.json:
                print(json.dumps(rows, sort_keys=True))
            else:
                for row in rows:
                    print("  ".join(f"{k}={v}" for k, v in row.items()))
            return 0
        assert action == "revoke"
        if vault.revoke_client(args.name):
            print(f"client {args.name} revoked")
            return 0
        print(f"ratelock: clients revoke: no client named {args.name!r}", file=sys.stderr)
        return 1
    if cmd == "status":
        status = dataclasses.asdict(vault.status())
        if args.json:
            print(json.dumps(status, sort_keys=True))
        else:
            for k, v in status.items():
                print(f"{k}: {v}")
        return 0
    if cmd == "secret":
        count = vault.rotate_secret()
        print(f"secret rotated: {count} verifiers and records re-encrypted")
        return 0
    assert cmd == "audit"
    report = vault.audit_verify()
    if args.json:
        print(json.dumps({"ok": report.ok, "entries": report.entries,
                          "last_seq": report.last_seq, "signed_seq": report.signed_seq,
                          "problems": list(report.problems)}, sort_keys=True))
    elif report.ok:
        print(f"audit ok: {report.entries} entries, chain intact, head signed at "
              f"{report.signed_seq} of {report.last_seq}")
    else:
        for problem in report.problems:
            print(f"ratelock: audit: {problem}", file=sys.stderr)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    home = resolve_home(args.home)
    try:
        if args.command in ("clients", "status", "audit", "secret"):
            return _operator(args, home)
        return _application(args, home)
    except Usage as exc:
        print(f"ratelock: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # ratelock.listen that parse_listen refuses
        print(f"ratelock: ratelock.listen: {exc}", file=sys.stderr)
        return 1
    except OverflowdError as exc:
        print(f"ratelock: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
