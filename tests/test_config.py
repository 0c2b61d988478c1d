"""The configuration sources and their precedence; the shipped example is complete."""
from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from winkr.config import ConfigError, Limits, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "winkr.example.toml"


def test_the_example_config_loads_and_names_every_setting() -> None:
    settings = load_settings(str(EXAMPLE), environ={})
    assert settings.port == 8080 and settings.limits == Limits()
    text = EXAMPLE.read_text()
    for field in attrs.fields(Settings):
        if field.name != "limits":
            assert field.name in text, field.name
    for field in attrs.fields(Limits):
        assert field.name in text, field.name


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text('port = 9000\n[limits]\nmessages_per_minute = 5\n')
    settings = load_settings(str(config), {"port": None}, environ={"WINKR_MESSAGES_PER_MINUTE": "7"})
    assert settings.port == 9000 and settings.limits.messages_per_minute == 7
    settings = load_settings(str(config), {"port": 9100}, environ={"WINKR_PORT": "9050"})
    assert settings.port == 9100


@pytest.mark.parametrize("text", ['pii_policy = "sometimes"', 'jwt_algorithm = "none"',
                                  "[limits]\nmessages_per_minute = -1", 'no_such_setting = 1',
                                  'api_keys = ["good-key", ""]', "api_port = 70000"])
def test_bad_settings_are_refused_with_a_clear_error(tmp_path: Path, text: str) -> None:
    config = tmp_path / "w.toml"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError):
        load_settings(str(config), environ={})


# --- issue 13: errors name the setting as the operator wrote it --------------------------------

@pytest.mark.parametrize(("environ", "expected"), [
    ({"WINKR_PORT": "abc"}, "invalid setting WINKR_PORT='abc': expected an integer"),
    ({"WINKR_MESSAGES_PER_MINUTE": "lots"}, "invalid setting WINKR_MESSAGES_PER_MINUTE='lots': expected an integer"),
    ({"WINKR_PING_INTERVAL": "soon"}, "invalid setting WINKR_PING_INTERVAL='soon': expected a number"),
    ({"WINKR_PII_POLICY": "sometimes"}, "WINKR_PII_POLICY must be mask, reject or allow"),
    ({"WINKR_CONNECTIONS_PER_USER": "-1"}, "WINKR_CONNECTIONS_PER_USER must be >= 0"),
])
def test_environment_errors_name_the_variable(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, environ=environ)
    assert expected in str(error.value)
    assert "$." not in str(error.value)


def test_file_errors_name_the_key_and_the_file(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text('port = "eighty"\nno_such_setting = 1\n[limits]\nmessages_per_hour = -5\n')
    with pytest.raises(ConfigError) as error:
        load_settings(str(config), environ={})
    message = str(error.value)
    assert f"invalid setting port='eighty' (in {config}): expected an integer" in message
    assert f"unknown setting no_such_setting in {config}" in message
    config.write_text("[limits]\nmessages_per_hour = -5\n")
    with pytest.raises(ConfigError, match=rf"limits.messages_per_hour \(in {config}\) must be >= 0"):
        load_settings(str(config), environ={})


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="--port must be between 0 and 65535"):
        load_settings(None, {"port": 70000}, environ={})


@pytest.mark.parametrize("secret", ["...", "x" * 31, "short but not empty"])
def test_short_hs256_secrets_are_refused(secret: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, environ={"WINKR_JWT_SECRET": secret})
    message = str(error.value)
    assert message.startswith(f"WINKR_JWT_SECRET is {len(secret.encode())} bytes: ")
    assert "at least 32" in message and "secrets.token_urlsafe" in message
    assert secret not in message.replace("bytes", "")  # the value itself is never echoed


def test_a_32_byte_secret_is_accepted_and_other_algorithms_ignore_it() -> None:
    assert load_settings(None, environ={"WINKR_JWT_SECRET": "k" * 32}).jwt_secret == "k" * 32
    settings = load_settings(None, {"jwt_algorithm": "RS256", "jwt_public_key": "/some/key.pem",
                                    "jwt_secret": "..."}, environ={})
    assert settings.jwt_algorithm == "RS256"



def test_the_load_test_config_switches_every_rate_limit_off() -> None:
    """deploy/loadtest.toml is what the README's load test runs against: no limit may refuse it."""
    settings = load_settings(str(EXAMPLE.parent / "loadtest.toml"), environ={})
    for field in attrs.fields(Limits):
        if "per_" in field.name:
            assert getattr(settings.limits, field.name) == 0, field.name


# --- durations and numbers a running server cannot use (found by probing winkr serve) ----------

@pytest.mark.parametrize("text", [
    # ping_interval = 0 made every connection's writer spin: no reply was ever written.
    "ping_interval = 0", "pong_timeout = 0", "handshake_timeout = 0", "typing_timeout = 0",
    # a NaN deadline crashed the whole server at the first typing:start (exit 1).
    "typing_timeout = nan", "presence_grace = nan", "ping_interval = inf", 'handshake_timeout = "inf"',
    "presence_grace = -1", "shutdown_timeout = -0.5", "webhook_timeout_seconds = inf",
    "webhook_max_age_hours = inf",
    # booleans and fractions are not integers (they were read as port 1 and port 80)
    "port = true", "port = 80.9", "metrics_port = 9108.5", "[limits]\nmessages_per_minute = 1.5",
    "[limits]\nmessages_per_minute = true", "typing_timeout = true",
    # an empty database name crashed `winkr check-config` with a traceback
    'db = ""', 'db = "  "',
])
def test_settings_a_server_cannot_run_with_are_refused(tmp_path: Path, text: str) -> None:
    config = tmp_path / "w.toml"
    config.write_text(text + "\n")
    name = text.split("=")[0].strip().split("\n")[-1]
    with pytest.raises(ConfigError, match=name):
        load_settings(str(config), environ={})


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WINKR_TYPING_TIMEOUT": "nan"}, "WINKR_TYPING_TIMEOUT must be a finite number > 0"),
    ({"WINKR_PING_INTERVAL": "0"}, "WINKR_PING_INTERVAL must be a finite number > 0"),
    ({"WINKR_PRESENCE_GRACE": "-inf"}, "WINKR_PRESENCE_GRACE must be a finite number >= 0"),
    ({"WINKR_PORT": "80.5"}, "invalid setting WINKR_PORT='80.5': expected an integer"),
])
def test_duration_errors_name_the_variable(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, environ=environ)
    assert expected in str(error.value)


def test_whole_numbers_and_zero_where_it_means_none_are_accepted(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text("presence_grace = 0\nshutdown_timeout = 0\nping_interval = 15\ntyping_timeout = 2.5\n"
                      "[limits]\nmessages_per_minute = 0\n")
    settings = load_settings(str(config), environ={"WINKR_PONG_TIMEOUT": "12.5", "WINKR_PORT": "8081"})
    assert (settings.presence_grace, settings.ping_interval, settings.typing_timeout) == (0, 15.0, 2.5)
    assert settings.pong_timeout == 12.5 and settings.port == 8081 and settings.limits.messages_per_minute == 0


@pytest.mark.parametrize(("db", "expected"), [
    # `winkr serve --db :memory:` ended in a DatabaseUrlError traceback (--database-url's own
    # errors were already one clear line)
    (":memory:", "--db: .*keeps its messages in a file"),
    ("data/", "--db: .*no file name"),
    ("what?.db", "--db: .*no query"),
])
def test_a_db_file_winkr_cannot_use_is_refused_naming_the_flag(db: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings(None, {"db": db}, environ={})
