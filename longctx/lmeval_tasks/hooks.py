# lm-eval resolves `!function module.fn` to a file next to the YAML, so this shim re-exports the
# task glue that lives in the package (longctx/tasks/lmeval.py); it holds no logic of its own.
from longctx.tasks.lmeval import (  # noqa: F401
    cwe, fwe, mqar, niah_multikey, niah_multiquery, niah_multivalue, niah_single, passkey,
    process_generation, process_loglikelihood, vt)
