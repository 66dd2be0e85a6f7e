"""The pipeline machinery around the ML core: MLflow tracking and registry, DVC experiments and
sweeps, their reports and claims tables, preemption. The core (models, diffusion, training, data,
evaluation) never imports it; the stages and the flows do (tests/test_layering.py holds the rule)."""
