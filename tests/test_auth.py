"""Annotator accounts and sign-in (labeling.auth): password hashes, name rules, sessions, the sign-in throttle."""

import sqlite3

import pytest

from labeling.auth import (
    InvalidAnnotator,
    LoginThrottle,
    Sessions,
    TooManyAttempts,
    add_annotator,
    check_password,
    hash_password,
    verify_password,
)
from labeling.store import AnnotatorExists, open_store


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "labels.db")
    yield s
    s.close()


def test_passwords_are_salted_hashes(store, tmp_path):
    add_annotator(store, "alice", "correct horse")
    add_annotator(store, "bob", "correct horse")
    stored = dict(sqlite3.connect(tmp_path / "labels.db").execute("SELECT name, password_hash FROM annotators"))
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


def test_sessions_expire_after_idle_time():
    now = [0.0]
    sessions = Sessions(ttl=10, clock=lambda: now[0])
    token = sessions.create("alice")
    now[0] = 9.0
    assert sessions.annotator(token) == "alice"  # use extends the session
    now[0] = 18.0
    assert sessions.annotator(token) == "alice"
    now[0] = 28.5
    assert sessions.annotator(token) is None
    assert sessions.annotator("forged-token") is None and sessions.annotator(None) is None


def test_login_throttle_per_account_and_per_address():
    now = [1000.0]
    throttle = LoginThrottle(account_failures=5, address_failures=20, base_delay=1.0, max_delay=300.0,
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


def test_login_throttle_keeps_a_bounded_number_of_keys():
    throttle = LoginThrottle(max_keys=100)
    for i in range(1000):
        throttle.attempt(f"name{i}", f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._failures) <= 100
