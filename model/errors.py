"""The two kinds of user-facing errors: a bad setting, and a bad data file.

Both are raised before any training starts, with a message that names the file
(or YAML path), the field and the offending value, so the user can fix it in one go.
"""


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range (names the source, field and value)."""


class DataError(ValueError):
    """A data file is missing or malformed (names the file, line or column, and value)."""
