"""HTTP serving of model packages: `python -m llm_jax.serve --package=PKG` (see docs/serving.md)."""
