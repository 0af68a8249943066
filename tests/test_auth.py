"""Annotator accounts and sign-in (labeling.auth): password hashes, name rules, sessions, the sign-in throttle."""

import pytest
from labeling_helpers import raw_connection

from labeling.auth import (
    InvalidAnnotator,
    LoginThrottle,
    NotSignedIn,
    Sessions,
    TooManyAttempts,
    add_annotator,
    check_password,
    hash_password,
    is_admin,
    reset_password,
    sign_in,
    verify_password,
)
from labeling.store import AnnotatorExists, UnknownAnnotator, open_store
from rlhf.errors import UserError


@pytest.fixture
def store(db_url):
    s = open_store(db_url)
    yield s
    s.close()


def test_passwords_are_salted_hashes(store, db_url):
    add_annotator(store, "alice", "correct horse")
    add_annotator(store, "bob", "correct horse")
    stored = dict(raw_connection(db_url).execute("SELECT name, password_hash FROM annotators").fetchall())
    assert "correct horse" not in stored["alice"] and stored["alice"].startswith("scrypt$")
    assert stored["alice"] != stored["bob"]  # salted
    assert verify_password(store, "alice", "correct horse")
    assert not verify_password(store, "alice", "correct horsE")
    assert not verify_password(store, "nobody", "correct horse")
    assert not check_password("x", "garbage")
    assert check_password("pw", hash_password("pw"))


def test_accounts_without_password_cannot_log_in(store):
    add_annotator(store, "sim-1", None)
    assert not verify_password(store, "sim-1", "")
    assert store.list_annotators() == ["sim-1"]


@pytest.mark.parametrize("name", ["", "a" * 65, "bad name", "x/y", "ünï", "a\n", "<script>"])
def test_bad_annotator_names_are_rejected(store, name):
    with pytest.raises(InvalidAnnotator):
        add_annotator(store, name, "password123")
    assert store.list_annotators() == []


def test_annotator_rules(store):
    for name in ["a", "A.b_c-1", "a" * 64]:
        add_annotator(store, name, "password123")
    assert store.list_annotators() == sorted(["a", "A.b_c-1", "a" * 64])
    with pytest.raises(AnnotatorExists):
        add_annotator(store, "a", "password123")
    with pytest.raises(InvalidAnnotator, match="password"):
        add_annotator(store, "short", "1234567")


def test_passwords_may_hold_any_text(store):
    add_annotator(store, "a", "pass\ud800word")
    assert verify_password(store, "a", "pass\ud800word") and not verify_password(store, "a", "\udfff")


def test_unusable_names_fail_sign_in_without_an_error(store):
    add_annotator(store, "alice", "correct horse")
    for name in ("\ud800", "alice\udfff", "bad name", "x" * 10_000, None, 7):
        assert verify_password(store, name, "correct horse") is False


def test_sessions_expire_after_idle_time(store):
    add_annotator(store, "alice", "correct horse")
    now = [0.0]
    sessions = Sessions(store, ttl=10, clock=lambda: now[0])
    token = sessions.create("alice")
    now[0] = 9.0
    assert sessions.annotator(token) == "alice"  # use extends the session
    now[0] = 18.0
    assert sessions.annotator(token) == "alice"
    now[0] = 28.5
    assert sessions.annotator(token) is None
    assert sessions.annotator("forged-token") is None and sessions.annotator(None) is None


def test_login_throttle_per_account_and_per_address(store):
    now = [1000.0]
    throttle = LoginThrottle(store, account_failures=5, address_failures=20, base_delay=1.0, max_delay=300.0,
                             clock=lambda: now[0])
    for _ in range(5):
        throttle.attempt("alice", "10.0.0.1")  # five failures go through at once
    with pytest.raises(TooManyAttempts, match="too many failed sign-ins; try again in 1 s") as info:
        throttle.attempt("alice", "10.0.0.1")
    assert info.value.status == 429 and info.value.retry_after == 1
    with pytest.raises(TooManyAttempts):
        throttle.attempt("alice", "10.0.0.2")  # the account is throttled from any address
    throttle.attempt("bob", "10.0.0.1")  # another account from the same address is not (yet)
    now[0] += 1.0
    throttle.attempt("alice", "10.0.0.1")  # waited: one more try; the wait now doubles
    with pytest.raises(TooManyAttempts, match="try again in 2 s"):
        throttle.attempt("alice", "10.0.0.1")
    for _ in range(12):
        now[0] += 301.0
        throttle.attempt("alice", "10.0.0.3")
    with pytest.raises(TooManyAttempts, match="try again in 300 s"):  # capped
        throttle.attempt("alice", "10.0.0.3")
    throttle.succeeded("alice", "10.0.0.3")  # a success clears the account
    throttle.attempt("alice", "10.0.0.3")
    # One address guessing across many names is stopped by the address limit.
    for i in range(20):
        throttle.attempt(f"user{i}", "10.9.9.9")
    with pytest.raises(TooManyAttempts):
        throttle.attempt("someone-new", "10.9.9.9")
    now[0] += 901.0  # forgotten after a quiet quarter of an hour
    throttle.attempt("someone-new", "10.9.9.9")


def test_login_throttle_keeps_a_bounded_number_of_keys(store):
    now = [1000.0]
    throttle = LoginThrottle(store, max_keys=100, clock=lambda: now[0])
    for i in range(300):
        now[0] += 0.01
        throttle.attempt(f"name{i}", f"10.0.{i // 256}.{i % 256}")
    failures = store.login_failures()
    assert 98 <= len(failures) <= 100  # the newest rows (two keys per attempt share its time)
    assert ("account", "name299") in failures and ("account", "name0") not in failures


def test_failed_sign_ins_are_counted_in_the_database_and_shared_by_every_server(store, db_url):
    """Two app servers on one database: the failures each one answers add up to one allowance."""
    add_annotator(store, "alice", "correct horse")
    now = [5000.0]
    with open_store(db_url) as other_store:
        servers = [LoginThrottle(s, account_failures=5, address_failures=20, clock=lambda: now[0])
                   for s in (store, other_store)]
        sessions = [Sessions(s) for s in (store, other_store)]
        for i in range(5):  # 3 wrong passwords on one server, 2 on the other
            with pytest.raises(NotSignedIn):
                sign_in(store, sessions[i % 2], "alice", "wrong password", throttle=servers[i % 2],
                        address=f"10.0.0.{i}")
        assert store.login_failures()[("account", "alice")] == 5
        for throttle in servers:  # the sixth is refused on both, without checking the password
            with pytest.raises(TooManyAttempts, match="try again in 1 s"):
                throttle.attempt("alice", "10.0.0.9")
        now[0] += 1.0
        token = sign_in(other_store, sessions[1], "alice", "correct horse", throttle=servers[1], address="10.0.0.9")
        assert Sessions(store).annotator(token) == "alice"
        assert ("account", "alice") not in store.login_failures()  # a success clears the account everywhere
        servers[0].attempt("alice", "10.0.0.1")
    rows = raw_connection(db_url).execute("SELECT kind, name, failures FROM login_failures"
                                          " WHERE kind = 'account'").fetchall()
    assert [tuple(r) for r in rows] == [("account", "alice", 1)]


def test_sessions_are_in_the_store_and_shared_by_every_server(store, db_url):
    add_annotator(store, "alice", "correct horse")
    token = Sessions(store).create("alice")
    with open_store(db_url) as other_server:
        assert Sessions(other_server).annotator(token) == "alice"  # another process on the same database
        Sessions(other_server).end(token)
    assert Sessions(store).annotator(token) is None
    rows = raw_connection(db_url).execute("SELECT token_hash, annotator FROM sessions").fetchall()
    assert rows == [] and Sessions(store).annotator("x" * 10_000) is None


def test_sessions_renew_at_most_once_a_minute(store):
    add_annotator(store, "alice", "correct horse")
    now = [1000.0]
    sessions = Sessions(store, ttl=3600, clock=lambda: now[0])
    token = sessions.create("alice")
    renewals = []
    renew = store.renew_session
    store.renew_session = lambda *args: (renewals.append(args), renew(*args))
    for _ in range(30):
        now[0] += 5
        assert sessions.annotator(token) == "alice"
    assert len(renewals) == 2  # 150 s of requests: two writes, not thirty


def test_disabling_an_account_ends_its_sessions_and_sign_in(store):
    add_annotator(store, "alice", "correct horse")
    add_annotator(store, "bob", "correct horse")
    sessions = Sessions(store)
    alice = [sign_in(store, sessions, "alice", "correct horse") for _ in range(2)]
    bob = sign_in(store, sessions, "bob", "correct horse")
    assert store.set_disabled("alice", True) == 2
    assert [sessions.annotator(t) for t in alice] == [None, None] and sessions.annotator(bob) == "bob"
    with pytest.raises(NotSignedIn, match="'alice' is disabled"):
        sign_in(store, sessions, "alice", "correct horse")
    with pytest.raises(NotSignedIn, match="wrong annotator name or password"):  # a wrong password says nothing more
        sign_in(store, sessions, "alice", "wrong password")
    store.set_disabled("alice", False)
    assert sessions.annotator(sign_in(store, sessions, "alice", "correct horse")) == "alice"
    with pytest.raises(UnknownAnnotator):
        store.set_disabled("nobody", True)


def test_a_new_password_ends_the_old_sessions(store):
    add_annotator(store, "alice", "correct horse")
    sessions = Sessions(store)
    token = sign_in(store, sessions, "alice", "correct horse")
    assert reset_password(store, "alice", "battery staple") == 1
    assert sessions.annotator(token) is None
    assert not verify_password(store, "alice", "correct horse") and verify_password(store, "alice", "battery staple")
    with pytest.raises(InvalidAnnotator, match="password must be"):
        reset_password(store, "alice", "short")
    assert verify_password(store, "alice", "battery staple")
    with pytest.raises(UnknownAnnotator):
        reset_password(store, "nobody", "battery staple")
    assert sessions.end_all("alice") == 0


def test_the_admin_role_is_in_the_store(store):
    add_annotator(store, "alice", "correct horse", role="admin")
    add_annotator(store, "bob", "correct horse")
    assert is_admin(store, "alice") and not is_admin(store, "bob") and not is_admin(store, None)
    assert is_admin(store, "bob", frozenset({"bob"}))  # `rlhf label --admin bob`
    store.set_role("bob", "admin")
    store.set_role("alice", "annotator")
    assert is_admin(store, "bob") and not is_admin(store, "alice")
    store.set_disabled("bob", True)
    assert not is_admin(store, "bob")
    with pytest.raises(UserError, match="role must be one of"):
        store.set_role("bob", "root")
    with pytest.raises(UserError, match="role must be one of"):
        add_annotator(store, "carol", "correct horse", role="root")
    assert [(a.name, a.role) for a in store.accounts()] == [("alice", "annotator"), ("bob", "admin")]
