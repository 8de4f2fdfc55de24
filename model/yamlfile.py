"""Reading the project's YAML files (search spaces, dataset sections): one safe loader.

On top of `yaml.safe_load` it
- rejects a key given twice in one mapping (PyYAML keeps the last one silently, so a
  second `num_samples:` would quietly replace the first), naming the file, both lines
  and the key;
- keeps dates as the text written (`date_start: 2020-01-01` is the string
  "2020-01-01", not a datetime.date; an impossible `2020-13-01` stays text for the
  field's own check instead of crashing the parser);
- turns unreadable bytes and syntax errors into one ConfigError with file and line.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from model.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader without implicit timestamps and with duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first is not None:
                raise ConfigError(
                    f"{key_node.start_mark.name}:{key_node.start_mark.line + 1}: key {key!r} "
                    f"is given twice in one mapping (first on line {first}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# Without the implicit timestamp resolver a plain 2020-01-01 resolves to a string.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def load_yaml(path: str | Path, what: str = "YAML file"):
    """The document in `path`; any problem is one ConfigError naming the file (and line)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the {what} is not UTF-8 text (byte "
                          f"{data[e.start:e.start + 1]!r} at offset {e.start}); save it as "
                          "UTF-8") from None
    loader = _Loader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: "
                          f"{getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()
