"""DSN passwords are masked whatever characters they hold, wherever a DSN is shown: the
masked form, configuration problems and the redacted configuration (start-up log,
/status, the page)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import quote

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from service.config import load_config
from service.config.masking import mask_password, shown
from service.core.errors import ConfigError

# Any text: raw '#', '/', '?', '@', ':', '%', spaces, unicode, control characters.
passwords = st.text(min_size=1, max_size=40)
HARD = ["p#ss", "p/ss", "p?ss", "p@ss", "p:ss", "p%23ss", "p ss", "pässwörd", "a@b:c/d?e#f", "@"]


F = TypeVar("F", bound=Callable[..., None])


def with_examples(test: F) -> F:
    """The hard cases, tried on every run before hypothesis's own."""
    for password in HARD:
        test = example(password)(test)
    return test


@with_examples
@given(passwords)
def test_a_raw_user_info_password_is_masked_whole(password: str) -> None:
    dsn = f"postgresql://vabus:{password}@db.example:5432/agg?sslmode=require"
    assert mask_password(dsn) == "postgresql://vabus:***@db.example:5432/agg?sslmode=require"


@with_examples
@given(passwords)
def test_a_percent_encoded_user_info_password_is_masked_whole(password: str) -> None:
    dsn = f"postgresql://vabus:{quote(password, safe='')}@db.example/agg"
    assert mask_password(dsn) == "postgresql://vabus:***@db.example/agg"


@with_examples
@given(passwords)
def test_a_password_parameter_is_masked_whole(password: str) -> None:
    for value in (password, quote(password, safe="")):
        # libpq itself ends a parameter at "&name=": such a text would be two parameters
        assume(not re.search(r"&[A-Za-z_][A-Za-z0-9_.-]*=", value))
        dsn = f"postgresql://vabus@db.example/agg?sslmode=require&password={value}&x=1"
        assert mask_password(dsn) == (
            "postgresql://vabus@db.example/agg?sslmode=require&password=***&x=1"
        )
        # Without a user name, an '@' in the value also looks like the end of user info:
        # then more is masked, never less.
        masked = mask_password(f"postgresql://db.example:5432/agg?password={value}")
        assert masked in (
            "postgresql://db.example:5432/agg?password=***",
            "postgresql://db.example:***",
        )


def configured(dsn: str) -> str:
    """What the start-up log, /status and the page show of the configuration (or the
    problem with POSTGRES_DSN), the problems a differing alias gives, and ``shown``."""
    try:
        seen = json.dumps(load_config({"POSTGRES_DSN": dsn}, dotenv=None).redacted())
    except ConfigError as error:  # e.g. a raw '[' (urlsplit: invalid IPv6 literal)
        seen = str(error)
    bad = {"POSTGRES_CONNECTION_STRING": dsn, "POSTGRES_DSN": "postgresql://other/x"}
    with pytest.raises(ConfigError) as caught:
        load_config(bad, dotenv=None)
    return f"{seen}\n{caught.value}\n{shown('POSTGRES_DSN', dsn)}"


# One per way a DSN can be judged (valid; refused by urlsplit): what is shown is one of
# these, so not one character of the password is shown (stronger than "not in it").
SHOWN_DSN = {
    configured("postgresql://vabus:x@db/agg"),
    configured("postgresql://vabus:[@db/agg"),
    configured("postgresql://vabus:#@db/agg"),
}


@with_examples
@given(passwords)
def test_what_is_shown_of_a_dsn_does_not_depend_on_its_password(password: str) -> None:
    for raw in (password, quote(password, safe="")):
        assume(raw.strip() == raw)  # the environment reader strips surrounding blanks
        assert configured(f"postgresql://vabus:{raw}@db/agg") in SHOWN_DSN


def bus_problem(password: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config({"VABUS_URL": f"https://user:{password}@bus.example"}, dotenv=None)
    return str(caught.value)


@pytest.mark.parametrize("password", HARD)
def test_a_bus_url_with_credentials_is_refused_without_showing_them(password: str) -> None:
    # refused for its credentials, or (a raw '#', '/', '?' ends the host early) its port
    assert bus_problem(password) in {bus_problem("x"), bus_problem("x#y")}


@pytest.mark.parametrize("password", ["p#ss", "p/ss", "p?ss", "p@ss", "a@b:c/d?e#f"])
def test_a_dsn_the_driver_would_misread_is_refused_naming_the_fix(password: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"POSTGRES_DSN": f"postgresql://vabus:{password}@db/agg"}, dotenv=None)
    [problem] = caught.value.problems
    assert problem.startswith("POSTGRES_DSN='postgresql://vabus:***@db/agg': expected")
    assert problem.endswith(
        "(write '@', '#', '/' and '?' in the password as %40, %23, %2F and %3F)"
    )
    encoded = f"postgresql://vabus:{quote(password, safe='')}@db/agg"
    assert load_config({"POSTGRES_DSN": encoded}, dotenv=None).postgres.dsn.value == encoded


def test_text_that_is_not_a_url_is_masked_whole() -> None:
    assert mask_password("host=db user=vabus password=s3cret") == "***"
    assert mask_password("") == ""
