"""The lm-eval task YAMLs and the one module they name (`glue.py`)."""
