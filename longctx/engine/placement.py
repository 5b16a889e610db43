"""A base split over devices, as lm-eval's `hf` loads it with `parallelize=True`.

lm-eval's `hf` turns parallelize, device_map, max_memory_per_gpu and max_cpu_memory into
`from_pretrained(device_map=…, max_memory=…)` (`HFLM._get_accelerate_args`); `hf_device_map_args`
does the same. The map of every module is computed the way from_pretrained computes it
(transformers' private `_get_device_map` on an empty model, reached through
`longctx.engine.hf_internals`), and the loaded model is dispatched with
accelerate's hooks, each module executing on its own device: a layer's inputs move to its device as
it runs, so the KV cache it fills (created from its own keys, `hf_internals.PreallocatedLayer`) and its adapter state
stay there, and the outputs come back to the device the inputs came from.

One difference from accelerate, on purpose: a module placed on `cpu` next to GPUs runs on the CPU,
its KV cache in host memory. accelerate would instead keep its weights in host memory and stream
them to the GPU at every forward, reloading them by name; an adapter inserted after loading renames
and adds weights, which that reload cannot carry, and a chunked run would stream them once per
chunk. Disk offload is refused for the same reasons.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import nn

from longctx.core.errors import LongctxError
from longctx.engine.hf_internals import planned_device_map

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def memory_size(name: str, value: Any) -> int:
    """A memory limit in bytes from an integer or a size such as `10GiB` (accelerate's format)."""
    from accelerate.utils import convert_file_size_to_int  # deferred: heavy, only split loads need it

    try:
        size = convert_file_size_to_int(value if isinstance(value, (int, str)) else str(value))
    except (ValueError, AttributeError):
        size = -1
    if isinstance(value, bool) or size <= 0:
        raise LongctxError(f"{name}={value!r} is not a memory size (e.g. 10GiB, 500MB, or a number of bytes)")
    return size


def hf_device_map_args(parallelize: bool, device_map: Any, max_memory_per_gpu: Any,
                       max_cpu_memory: Any) -> tuple[Any, dict[Any, int] | None]:
    """(device_map, max_memory) as lm-eval's `hf` hands them to from_pretrained: (None, None) without
    parallelize (hf ignores the other arguments then); with it, `device_map` (default `auto`) and
    every GPU's limit (max_memory_per_gpu, else its free memory), plus the CPU's if max_cpu_memory is
    given (without it nothing goes to the CPU). No GPU and no CPU limit: no limit (everything fits
    the CPU), where hf would pass an empty one."""
    if not parallelize:
        return None, None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if max_memory_per_gpu is not None:
        per_gpu = memory_size("max_memory_per_gpu", max_memory_per_gpu)
        limits: dict[Any, int] = {i: per_gpu for i in range(gpus)}
    else:
        from accelerate.utils import get_max_memory  # deferred: heavy, only split loads need it

        limits = {k: v for k, v in get_max_memory().items() if k != "cpu"}
    if max_cpu_memory is not None:
        limits["cpu"] = memory_size("max_cpu_memory", max_cpu_memory)
    return ("auto" if device_map is None else device_map), (limits or None)


def _device_name(device: Any) -> str:
    """`cuda:N`, `cpu` or `disk` from accelerate's spellings (an int is a GPU index)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    text = str(device)
    if text == "cuda":
        return "cuda:0"
    return text


def full_device_map(config: Any, device_map: Any, max_memory: dict[Any, int] | None, dtype: Any,
                    trust_remote_code: bool = False) -> dict[str, str]:
    """Every module's device as from_pretrained would place them: a strategy (`auto`, `balanced`,
    `balanced_low_0`, `sequential`) is computed on an empty model; a device name or a dict is taken
    as given. Disk offload is refused (see the module docstring); the caller checks that the devices
    are here (`bases.resolve_device`)."""
    try:
        requested = planned_device_map(config, device_map, max_memory,
                                       dtype if isinstance(dtype, torch.dtype) else None, trust_remote_code)
    except ValueError as err:
        raise LongctxError(f"device_map={device_map!r}: {_first_line(err)} (valid: {', '.join(STRATEGIES)}, a "
                           f"device such as cuda:0, or a dict of module name -> device)") from None
    mapping = {name: _device_name(device) for name, device in requested.items()}
    disk = [name for name, device in mapping.items() if device == "disk"]
    if disk:
        raise LongctxError(
            f"the device map puts {disk[0]} (and {len(disk) - 1} more) on disk: disk-offloaded weights are "
            f"reloaded by name at every forward, which cannot carry an adapter inserted after loading (and "
            f"a chunked run would read them once per chunk); give max_cpu_memory or a larger max_memory_per_gpu "
            f"so the model fits the GPUs and the CPU (offload_folder is then unused)")
    return mapping


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _device_of(name: str, mapping: dict[str, str]) -> str | None:
    """The device `mapping` gives the module or weight `name` (its nearest mapped ancestor)."""
    while True:
        if name in mapping:
            return mapping[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


def _check_names(model: nn.Module, mapping: dict[str, str]) -> None:
    modules = dict(model.named_modules())
    unknown = [name for name in mapping if name not in modules]
    if unknown:
        example = next((n for n in modules if n.endswith("layers.0")), next(iter(modules)))
        raise LongctxError(f"device_map names {unknown[0]!r}, which is not a module of this model "
                           f"(module names look like {example!r})")
    missing = [n for n, _ in model.named_parameters() if _device_of(n, mapping) is None]
    if missing:
        raise LongctxError(f"device_map gives no device to {missing[0]} (and {len(missing) - 1} more weights): name "
                           f"every module holding weights, or give \"\" a device for the rest")


def _check_tied(model: nn.Module, mapping: dict[str, str]) -> None:
    from accelerate.utils import find_tied_parameters  # deferred: heavy, only split loads need it

    for group in find_tied_parameters(model):
        devices = {name: _device_of(name, mapping) for name in group}
        if len(set(devices.values())) > 1:
            listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
            raise LongctxError(f"device_map splits one tied weight over devices ({listed}); they are one tensor: "
                               f"put those modules on one device")


def _unmapped_buffers(model: nn.Module, mapping: dict[str, str], device: str) -> dict[str, str]:
    """Modules holding only buffers (rotary frequencies) that the map leaves out: on `device`."""
    return {name: device for name, module in model.named_modules()
            if _device_of(name, mapping) is None and any(True for _ in module.buffers(recurse=False))}


@contextlib.contextmanager
def _quiet_offload_warning() -> Iterator[None]:
    """accelerate warns "Some parameters are on the meta device because they were offloaded to the
    cpu" whenever a map names the CPU; nothing is offloaded here (see `dispatch`)."""
    logger = logging.getLogger("accelerate.big_modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def dispatch(model: nn.Module, mapping: dict[str, str]) -> torch.device:
    """Place `model` (loaded on the CPU) as `mapping` says, each module running on its device through
    accelerate's hooks (also for a single device, so a map always runs the same way); returns the
    device inputs go to: the CPU where any module runs there, else the first module's device."""
    from accelerate import dispatch_model  # deferred: heavy, only split loads need it

    _check_names(model, mapping)
    _check_tied(model, mapping)
    # main_device=cpu: accelerate then runs cpu modules on the CPU instead of offloading them
    main = "cpu" if "cpu" in mapping.values() else next(iter(mapping.values()))
    full = {**mapping, **_unmapped_buffers(model, mapping, main)}
    skip = sorted(getattr(model, "_skip_keys_device_placement", None) or [])
    with _quiet_offload_warning():
        dispatch_model(model, full, main_device=main, skip_keys=skip, force_hooks=True)
    return torch.device(main)


def input_device(model: nn.Module) -> torch.device | None:
    """Where a dispatched model takes its inputs (None: not dispatched, see `dispatch`)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    hook = getattr(model, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return None if device is None else torch.device(_device_name(device))


def is_dispatched(model: nn.Module) -> bool:
    """Does `model` run through accelerate's device hooks (`dispatch`)?"""
    return input_device(model) is not None
