"""``python -m tasks.ops.flower`` refuses to start Flower without a real password."""

from __future__ import annotations

import pytest

from models.errors import ConfigurationError
from tasks.ops.flower import check_basic_auth, flower_argv


@pytest.mark.parametrize(
    "value",
    ["", "admin", "admin:", ":s3cret-enough", "admin:change-me", "admin:short", "a:b3cure-pw,x"],
)
def test_missing_malformed_or_placeholder_credentials_are_refused(value: str) -> None:
    with pytest.raises(ConfigurationError, match="FLOWER_BASIC_AUTH"):
        check_basic_auth({"FLOWER_BASIC_AUTH": value})


def test_unset_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigurationError, match="Set FLOWER_BASIC_AUTH=user:password"):
        check_basic_auth({})


def test_several_users() -> None:
    assert check_basic_auth({"FLOWER_BASIC_AUTH": "ops:s3cret-pass,ro:an0ther-pass"}) == [
        "ops",
        "ro",
    ]


def test_binds_to_loopback_by_default() -> None:
    assert "--address=127.0.0.1" in flower_argv()
