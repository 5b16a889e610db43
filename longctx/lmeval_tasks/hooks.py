# lm-eval resolves `!function module.fn` to a file next to the YAML, so this shim re-exports the
# task glue that lives in the package (longctx/tasks/lmeval.py, lmeval_task.py); it holds no logic
# of its own.
from longctx.tasks.lmeval import (  # noqa: F401
    cwe, fwe, mean_present, mqar, niah_multikey, niah_multiquery, niah_multivalue, niah_single, passkey,
    process_generation, process_loglikelihood, vt)
from longctx.tasks.lmeval_task import LongctxTask  # noqa: F401
