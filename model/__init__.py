"""Train and evaluate ONE FAERec (or plain backbone) configuration. Knows nothing of Ray or MLflow."""
