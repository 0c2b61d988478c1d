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
                                  "[limits]\nmessages_per_minute = -1", 'no_such_setting = 1'])
def test_bad_settings_are_refused_with_a_clear_error(tmp_path: Path, text: str) -> None:
    config = tmp_path / "w.toml"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError):
        load_settings(str(config), environ={})
