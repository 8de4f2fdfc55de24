"""Run MANY configurations: search space, Ray Tune trainable and Tuner, MLflow tracking."""
