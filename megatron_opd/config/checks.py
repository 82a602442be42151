"""The run config's error and the checks every section uses; each message names the key and what to change."""
from typing import Optional


class ConfigError(ValueError):
    """A value that cannot work; the message names the key and what to change."""


def check(condition: bool, key: str, value, need: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r}: {need}")


def one_of(key: str, value, choices) -> None:
    check(value in choices, key, value, f"must be one of {'|'.join(choices)}")


def check_url(key: str, url: Optional[str]) -> None:
    check(url is None or url.startswith(("http://", "https://")), key, url,
          "must be the server's http(s):// address, e.g. http://127.0.0.1:30000")
