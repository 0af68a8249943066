"""Annotator accounts and sign-in: the name and password rules, salted scrypt password hashes, the sign-in
check with its throttle, and the signed-in sessions.

The label store keeps only the rows (each annotator's name and password hash); everything that decides who
may sign in is here. What this guarantees is listed in the README, "Security: what the server guarantees".
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections import OrderedDict

from labeling.store import LabelStore
from rlhf.errors import UserError

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
SESSION_SECONDS = 12 * 3600
"""A session ends after this long without a request (sliding expiry)."""

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


def add_annotator(store: LabelStore, name: str, password: str | None) -> None:
    """Create an annotator. The password (MIN_PASSWORD_LENGTH..MAX_PASSWORD_LENGTH characters) is stored only
    as a salted scrypt hash; None makes an account that cannot sign in (scripted annotators). Raises
    InvalidAnnotator for a bad name or password, the store's AnnotatorExists if the name is taken."""
    check_annotator_name(name)
    if password is not None and (not isinstance(password, str)
                                 or not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH):
        raise InvalidAnnotator(f"password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters")
    store.add_annotator(name, password_hash=None if password is None else hash_password(password))


def verify_password(store: LabelStore, name: str, password: str) -> bool:
    """True only if the annotator exists, can sign in, and the password matches (constant-time compare; an
    unknown name costs the same time as a wrong password)."""
    if not isinstance(password, str):
        return False
    possible = isinstance(name, str) and NAME_PATTERN.fullmatch(name)  # else no such account can exist
    return check_password(password, store.password_hash(name) if possible else None)


# ------------------------------------------------------------------------------------------ sign-in

class LoginThrottle:
    """Failed sign-ins per account name and per client address, kept in memory.

    An account may fail `account_failures` times, an address `address_failures` times; after that, each further
    attempt must wait `base_delay` seconds after the latest failure, doubling with every failure up to
    `max_delay`. A key is forgotten `forget_after` seconds after its latest failure, and a successful sign-in
    clears its account. An attempt counts as a failure from the moment it starts (and is taken back if it
    succeeds), so parallel guesses cannot slip in while the password is checked. The account limit is lower than
    the address limit; the address limit stops one client guessing across many names (behind a reverse proxy every
    client has the proxy's address, so set that limit with the proxy in mind). At most `max_keys` keys are kept:
    the oldest go first.
    """

    def __init__(self, *, account_failures: int = 5, address_failures: int = 20, base_delay: float = 1.0,
                 max_delay: float = 300.0, forget_after: float = 900.0, max_keys: int = 10_000,
                 clock=time.monotonic):
        self._free = {"account": account_failures, "address": address_failures}
        self._base, self._max, self._forget, self._max_keys = base_delay, max_delay, forget_after, max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()  # key -> (count, last)

    def _wait(self, key: tuple[str, str], now: float) -> float:
        count, last = self._failures.get(key, (0, now))
        if now - last > self._forget:
            self._failures.pop(key, None)
            return 0.0
        over = count - self._free[key[0]]
        if over < 0:
            return 0.0
        return last + min(self._max, self._base * 2.0 ** min(over, 64)) - now

    def attempt(self, account: str, address: str) -> None:
        """Start a sign-in attempt; raises TooManyAttempts (and counts nothing) if either key must wait."""
        keys = (("account", account), ("address", address))
        with self._lock:
            now = self._clock()
            wait = max(self._wait(key, now) for key in keys)
            if wait > 0:
                raise TooManyAttempts(max(1, math.ceil(wait)))
            for key in keys:
                count, _ = self._failures.pop(key, (0, now))
                self._failures[key] = (count + 1, now)  # to the end: the dict stays ordered by latest failure
            while self._failures and (len(self._failures) > self._max_keys
                                      or now - next(iter(self._failures.values()))[1] > self._forget):
                self._failures.popitem(last=False)

    def succeeded(self, account: str, address: str) -> None:
        """The attempt succeeded: clear the account's failures and take this attempt back from the address."""
        with self._lock:
            self._failures.pop(("account", account), None)
            count, last = self._failures.get(("address", address), (0, 0.0))
            if count > 1:
                self._failures[("address", address)] = (count - 1, last)
            else:
                self._failures.pop(("address", address), None)


class Sessions:
    """Signed-in sessions: an unguessable token (the cookie) -> annotator name, kept in memory.

    A server restart signs everyone out, which costs a sign-in and nothing else: all work is in the store.
    """

    def __init__(self, ttl: float = SESSION_SECONDS, clock=time.monotonic):
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[str, float]] = {}

    def create(self, annotator: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[token] = (annotator, self._clock() + self._ttl)
        return token

    def annotator(self, token: str | None) -> str | None:
        """The annotator signed in with this token, or None (unknown or expired token)."""
        if not token:
            return None
        now = self._clock()
        with self._lock:
            entry = self._sessions.get(token)
            if entry is None:
                return None
            if entry[1] < now:
                del self._sessions[token]
                return None
            self._sessions[token] = (entry[0], now + self._ttl)
            return entry[0]

    def end(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)


def sign_in(store: LabelStore, sessions: Sessions, name, password, *, throttle: LoginThrottle | None = None,
            address: str = "") -> str:
    """A new session token for this name and password, else NotSignedIn. With a `throttle`, repeated failures
    for the account or from the client `address` are refused for a while (TooManyAttempts)."""
    account = name[:64] if isinstance(name, str) else ""
    if throttle is not None:
        throttle.attempt(account, address)
    if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH \
            or not verify_password(store, name, password):
        raise NotSignedIn("wrong annotator name or password")
    if throttle is not None:
        throttle.succeeded(account, address)
    return sessions.create(name)
