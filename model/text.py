"""Item text -> LLM embeddings (paper Sec. 3.1): prompts, encoders, disk cache, PCA.

FAERec embeds one prompt per item with a frozen text encoder (the paper: OpenAI
text-embedding-3-small on prompts cut at 4095 characters) and initialises the ID
embeddings with the PCA of those vectors.
"""
import numbers
import string
from collections.abc import Mapping

from model.errors import ConfigError

UNKNOWN = "unknown"  # what the prompt says for a missing field, so every item gets a full sentence


def template_fields(template: str) -> set[str]:
    """The `{field}` names used by a prompt template (`{{`/`}}` are literal braces)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"prompt template {template!r} is malformed: {e}") from None
    fields = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        # only plain `{column}` is supported: positional, attribute and format specs would
        # make a column name do something surprising
        if not name.isidentifier() or spec or conversion:
            raise ConfigError(f"prompt template {template!r}: placeholder {{{name}}} "
                              "must be a plain column name like {title}")
        fields.add(name)
    return fields


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, numbers.Number) and value != value:  # NaN: pandas' empty cell
        return True
    if isinstance(value, str | list | tuple) and len(value) == 0:
        return True
    return isinstance(value, str) and not value.strip()


def _field_text(value: object) -> str:
    if isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value if not _is_missing(v))
    return UNKNOWN if _is_missing(value) else str(value)


def render_prompt(template: str, fields: Mapping[str, object], max_chars: int = 4095) -> str:
    """Fill `{field}` placeholders; missing/None/NaN/empty -> "unknown"; cut at `max_chars`
    (the paper truncates prompts to 4095 characters before embedding)."""
    values = {name: _field_text(fields.get(name)) for name in template_fields(template)}
    return template.format_map(values)[:max_chars]
