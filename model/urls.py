"""Credentials inside URLs: masked wherever a URL is shown, logged or stored.

A tracking URI like `postgresql://user:pw@db/mlflow` or an endpoint like
`https://user:key@host/v1/embeddings?api-key=...` carries a secret that must reach the
connection and nothing else (plans, logs, MLflow params, artifacts, cache identities).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from model.errors import ConfigError

MASK = "***"
# query parameters that carry a secret (Azure's api-key, SAS `sig`, tokens, passwords)
_SECRET_PARAM = re.compile(r"key|token|secret|password|passwd|pwd|sig|credential|auth", re.I)
# user:password@ in any URI-looking text, e.g. inside a YAML file's tracking_uri line
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@'\"]+)@")


def mask_url(url: str) -> str:
    """`url` with its user information and secret-looking query values replaced by ***;
    otherwise exactly as written (sqlite:////abs/path keeps its slashes)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a malformed URL: fall back to the text rule
        return mask_text(url)
    if "@" in parts.netloc:
        url = url.replace(parts.netloc, f"{MASK}@{parts.netloc.rpartition('@')[2]}", 1)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(_SECRET_PARAM.search(k) for k, _ in pairs):
        masked = urlencode([(k, MASK if _SECRET_PARAM.search(k) else v) for k, v in pairs],
                           safe="*")
        url = url.replace(parts.query, masked, 1)
    return url


def mask_text(text: str) -> str:
    """Every `scheme://user:password@` in a text (a YAML file, a message) masked."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def is_loopback(host: str | None) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves this machine."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# The variable named by embedding.api_key_env is sent to embedding.url: it must look like
# an API key's variable, so that a typo or a copied config cannot ship another secret
# (Ray's RAY_AUTH_TOKEN, AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN...) to a foreign server.
API_KEY_ENV = re.compile(r"[A-Z][A-Z0-9_]*API_KEY")


def endpoint_problem(url: str, api_key_env: str, environ) -> tuple[str, str] | None:
    """(setting, why) if the key named by `api_key_env` may not go to `url`: a variable
    whose name breaks the rule above, or a key that would travel unencrypted (http://) to
    a host other than this machine. None if it may (or there is no key)."""
    if not api_key_env:
        return None
    if not API_KEY_ENV.fullmatch(api_key_env):
        return ("api_key_env", f"{api_key_env!r}: must name a variable ending in API_KEY "
                "(e.g. OPENAI_API_KEY), or be empty for no key: its value is sent to "
                "embedding.url, so it may not be another secret such as Ray's token")
    parts = urlsplit(url)
    if environ.get(api_key_env) and parts.scheme != "https" and not is_loopback(parts.hostname):
        return ("url", f"{mask_url(url)}: ${api_key_env} is set, and a key goes only over "
                "https:// or to this machine (localhost); use https://, or unset "
                f"{api_key_env} for a server that needs no key")
    return None


def endpoint_key(url: str, api_key_env: str, environ) -> str | None:
    """The key to send to an embedding endpoint, or None; ConfigError if it may not go."""
    problem = endpoint_problem(url, api_key_env, environ)
    if problem:
        raise ConfigError(f"embedding.{problem[0]}: {problem[1]}")
    return environ.get(api_key_env) or None if api_key_env else None
