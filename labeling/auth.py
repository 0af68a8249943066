"""Annotator accounts and sign-in: the name and password rules, salted scrypt password hashes, roles, disabled
accounts, the sign-in check with its throttle, and the signed-in sessions.

The label store keeps only the rows (each annotator's name, password hash, role and disabled flag; each session
by the hash of its token); everything that decides who may sign in is here. Sessions live in the store's
database, so every app server on one database knows every session, and a restart signs nobody out. What this
guarantees is listed in docs/labeling.md, "Security: what the server guarantees".
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time

from labeling.store import SQLLabelStore
from rlhf.errors import UserError

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
SESSION_SECONDS = 12 * 3600
"""A session ends after this long without a request (sliding expiry)."""
SESSION_RENEW_SECONDS = 60
"""A session's expiry is pushed back at most this often (one write per session per minute, not per request)."""

# scrypt parameters (RFC 7914 interactive-login recommendation: N=2**14, r=8, p=1; ~16 MiB, ~50 ms).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _SCRYPT_LEN = 2**14, 8, 1, 32


class InvalidAnnotator(UserError, ValueError):
    """An annotator name or password breaks the rules (see `check_annotator_name`)."""


class NotSignedIn(UserError):
    """No session, or a wrong name or password. `status` is the HTTP status the app answers with."""

    status = 401


class TooManyAttempts(UserError):
    """Sign-in refused without checking the password: too many recent failures (HTTP 429)."""

    status = 429

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed sign-ins; try again in {retry_after} s")
        self.retry_after = retry_after


class TooManySignIns(UserError):
    """Sign-in refused without checking the password: this account signed in too often lately (HTTP 429). Each
    sign-in costs a scrypt hash (about 50 ms of a core) and a session row, so a script looping over a valid
    password could otherwise keep the server busy."""

    status = 429

    def __init__(self, retry_after: int):
        super().__init__(f"too many sign-ins to this account; try again in {retry_after} s")
        self.retry_after = retry_after


SIGN_IN_RATE = 0.1
"""Sign-ins a second each account may make (one each 10 s), beyond SIGN_IN_BURST: a person signs in a few
times a day, a team's scripts a few times a run; kept per app server, like the request budget."""
SIGN_IN_BURST = 10


# ------------------------------------------------------------------------------------------ accounts

def check_annotator_name(name: str) -> str:
    """Return `name` if it is 1-64 characters of letters, digits, '.', '_' or '-'; else InvalidAnnotator."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidAnnotator(f"annotator name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return name


def hash_password(password: str) -> str:
    """Salted scrypt hash in the form 'scrypt$N$r$p$salt_hex$hash_hex' (never the password itself)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P,
                            dklen=_SCRYPT_LEN)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str | None) -> bool:
    """True if `password` matches a `hash_password` value; compares in constant time.

    With no stored hash (an account that cannot sign in) it still spends the same work, so timing does
    not tell whether a name exists.
    """
    if stored is None:
        hash_password(password if isinstance(password, str) else "")
        return False
    try:
        scheme, n, r, p, salt_hex, hash_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = bytes.fromhex(hash_hex)
        digest = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=bytes.fromhex(salt_hex), n=int(n),
                                r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, AttributeError):
        return False
    return hmac.compare_digest(digest, expected)


def check_password_rules(password: str) -> str:
    """Return `password` if it is MIN_PASSWORD_LENGTH..MAX_PASSWORD_LENGTH characters; else InvalidAnnotator."""
    if not isinstance(password, str) or not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise InvalidAnnotator(f"password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters")
    return password


def add_annotator(store: SQLLabelStore, name: str, password: str | None, *, role: str = "annotator") -> None:
    """Create an annotator (role 'annotator' or 'admin'). The password is stored only as a salted scrypt hash;
    None makes an account that cannot sign in (scripted annotators). Raises InvalidAnnotator for a bad name or
    password, the store's AnnotatorExists if the name is taken."""
    check_annotator_name(name)
    if password is not None:
        check_password_rules(password)
    store.add_annotator(name, password_hash=None if password is None else hash_password(password), role=role)


def reset_password(store: SQLLabelStore, name: str, password: str) -> int:
    """Give the annotator a new password and end every session of theirs; returns how many ended."""
    check_password_rules(password)
    return store.set_password_hash(name, hash_password(password))


def is_admin(store: SQLLabelStore, name: str | None, admins: frozenset[str] = frozenset()) -> bool:
    """Whether this signed-in annotator may see the statistics and manage accounts: the admin role in the store,
    or a name given with `rlhf label --admin`."""
    if not name:
        return False
    if name in admins:
        return True
    account = store.account(name)
    return account is not None and account.role == "admin" and not account.disabled


def verify_password(store: SQLLabelStore, name: str, password: str) -> bool:
    """True only if the annotator exists, can sign in, and the password matches (constant-time compare; an
    unknown name costs the same time as a wrong password)."""
    if not isinstance(password, str):
        return False
    possible = isinstance(name, str) and NAME_PATTERN.fullmatch(name)  # else no such account can exist
    return check_password(password, store.password_hash(name) if possible else None)


# ------------------------------------------------------------------------------------------ sign-in

class LoginThrottle:
    """Failed sign-ins per account name and per client address, counted in the label store's database, so every
    app server on one database shares one allowance (`SQLLabelStore.count_login_attempt` keeps the rows).

    An account may fail `account_failures` times, an address `address_failures` times; after that, each further
    attempt must wait `base_delay` seconds after the latest failure, doubling with every failure up to
    `max_delay`. A key is forgotten `forget_after` seconds after its latest failure, and a successful sign-in
    clears its account. An attempt counts as a failure from the moment it starts (and is taken back if it
    succeeds), so parallel guesses cannot slip in while the password is checked. The account limit is lower than
    the address limit; the address limit stops one client guessing across many names (behind a reverse proxy every
    client has the proxy's address, so set that limit with the proxy in mind). At most `max_keys` keys are kept:
    the oldest go first. `clock` is wall time (time.time): servers on several machines compare it.
    """

    def __init__(self, store: SQLLabelStore, *, account_failures: int = 5, address_failures: int = 20,
                 base_delay: float = 1.0, max_delay: float = 300.0, forget_after: float = 900.0,
                 max_keys: int = 10_000, clock=time.time):
        self._store = store
        self._free = {"account": account_failures, "address": address_failures}
        self._base, self._max, self._forget, self._max_keys = base_delay, max_delay, forget_after, max_keys
        self._clock = clock

    def _wait(self, kind: str, failures: int, last: float, now: float) -> float:
        over = failures - self._free[kind]
        if over < 0:
            return 0.0
        return last + min(self._max, self._base * 2.0 ** min(over, 64)) - now

    def attempt(self, account: str, address: str) -> None:
        """Start a sign-in attempt; raises TooManyAttempts (and counts nothing) if either key must wait."""
        keys = sorted((("account", _storable_key(account)), ("address", _storable_key(address))))
        now = self._clock()

        def wait(counts: list[tuple[int, float]]) -> float:
            return max(self._wait(kind, failures, last, now) for (kind, _), (failures, last) in zip(keys, counts))

        waiting = self._store.count_login_attempt(keys, now, now - self._forget, self._max_keys, wait)
        if waiting > 0:
            raise TooManyAttempts(max(1, math.ceil(waiting)))

    def succeeded(self, account: str, address: str) -> None:
        """The attempt succeeded: clear the account's failures and take this attempt back from the address."""
        self._store.login_succeeded(("account", _storable_key(account)), ("address", _storable_key(address)))


def _storable_key(text: str) -> str:
    """A throttle key as text the database can hold: a name tried may hold lone surrogates or NUL characters,
    which are counted under their escaped spelling."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


class Sessions:
    """Signed-in sessions, kept in the label store: an unguessable token (the cookie) whose SHA-256 is stored
    with the annotator's name and an expiry. The database holds no token, so reading it does not sign anyone in.

    A session ends `ttl` seconds after its latest request (renewed at most every SESSION_RENEW_SECONDS), when
    the annotator signs out, and when their account is disabled or given a new password. Every app server on
    the database shares them; a restart signs nobody out.
    """

    def __init__(self, store: SQLLabelStore, ttl: float = SESSION_SECONDS, clock=time.time):
        self._store, self._ttl, self._clock = store, ttl, clock
        self._renew_after = min(SESSION_RENEW_SECONDS, ttl / 12)

    @staticmethod
    def _hash(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()

    def create(self, annotator: str) -> str:
        token = secrets.token_urlsafe(32)
        now = self._clock()
        self._store.add_session(self._hash(token), annotator, now, now + self._ttl)
        return token

    def annotator(self, token: str | None) -> str | None:
        """The annotator signed in with this token, or None (unknown, expired or ended token; disabled account)."""
        if not token or not isinstance(token, str) or len(token) > 256:
            return None
        token_hash = self._hash(token)
        found = self._store.find_session(token_hash)
        if found is None:
            return None
        annotator, expires_at = found
        now = self._clock()
        if expires_at < now:
            self._store.end_session(token_hash)
            return None
        if expires_at - now < self._ttl - self._renew_after:
            self._store.renew_session(token_hash, now + self._ttl)
        return annotator

    def end(self, token: str | None) -> None:
        if token and isinstance(token, str) and len(token) <= 256:
            self._store.end_session(self._hash(token))

    def end_all(self, annotator: str) -> int:
        """End every session of this annotator (UnknownAnnotator for an unknown name); returns how many."""
        return self._store.end_sessions(annotator)


def sign_in(store: SQLLabelStore, sessions: Sessions, name, password, *, throttle: LoginThrottle | None = None,
            address: str = "") -> str:
    """A new session token for this name and password, else NotSignedIn (also for a disabled account). With a
    `throttle`, repeated failures for the account or from the client `address` are refused for a while
    (TooManyAttempts)."""
    account = name[:64] if isinstance(name, str) else ""
    if throttle is not None:
        throttle.attempt(account, address)
    if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH \
            or not verify_password(store, name, password):
        raise NotSignedIn("wrong annotator name or password")
    if throttle is not None:
        throttle.succeeded(account, address)
    row = store.account(name)
    if row is None or row.disabled:  # the password was right: saying so tells nothing new
        raise NotSignedIn(f"the account {name!r} is disabled; ask an admin")
    return sessions.create(name)
