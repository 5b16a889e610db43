"""The lm-eval task class of the longctx YAMLs (`class: !function hooks.LongctxTask`).

lm-eval aggregates a metric the task does not list with a plain mean. The longctx tasks name a
metric after each requested length, so a length the YAML does not list (300, 5000, …) would be
averaged together with the None of every document of another length. This class aggregates every
unlisted metric with `mean_present`, as the YAML does for the lengths it lists.
"""
from __future__ import annotations

from typing import Any, Callable

from lm_eval.api.task import ConfigurableTask

from longctx.tasks.lmeval import mean_present


class _Aggregations(dict):
    """The task's aggregation table; metrics it does not list average their present values."""

    def __missing__(self, metric: str) -> Callable[[list[Any]], Any]:
        return mean_present


class LongctxTask(ConfigurableTask):
    """A `ConfigurableTask` (config from the YAML) whose unlisted metrics use `mean_present`."""

    def __init__(self, data_dir: Any = None, cache_dir: Any = None, download_mode: Any = None,
                 config: dict | None = None) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}  # lm-eval's routing key
        super().__init__(data_dir, cache_dir, download_mode, config)

    def aggregation(self) -> dict[str, Callable[[list[Any]], Any]]:
        return _Aggregations(super().aggregation())
