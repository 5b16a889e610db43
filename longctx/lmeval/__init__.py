"""The lm-evaluation-harness integration: the `ssmlora` model type, its arguments, the plugin, per-request stats and the task YAMLs."""
