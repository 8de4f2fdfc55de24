"""Train and evaluate ONE configuration (FAERec, a baseline method, or a plain backbone). Knows nothing of Ray or MLflow."""

from model import methods  # noqa: F401  (the method registry, which model.config's settings check reads)
