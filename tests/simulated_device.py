"""A second device on CPU-only machines, so code that mixes a CPU tensor into device math fails.

    with simulated_device() as dev:       # dev = torch.device("meta")
        model = to_device(model)          # its tensors now report device `meta`
        ...                               # run the code under test

Every tensor "on the device" is an `OnDevice`: a tensor subclass that reports `meta` as its
device but holds a real CPU tensor, so the values are computed exactly as on CPU (`.item()`,
`.tolist()` and branches on values work; plain meta tensors could not). The dispatch mode
applies CUDA's device rules to every aten op:

- factories with `device=<the device>` (torch.zeros(..., device=x.device), .to(x.device)) make
  device tensors; without it they make plain CPU tensors, as on a GPU machine;
- an op that mixes a device tensor with a plain CPU tensor of one or more dimensions raises
  (CUDA kernels accept only 0-dim CPU scalars beside device tensors), naming the op and shapes;
  copies across devices (copy_, .to, .cpu) are allowed, as is indexing with CPU indices;
- plain CPU results stay CPU, results of device inputs are device tensors.

Collectives need care: `patch_collectives()` runs each torch.distributed call on the CPU
tensors inside (gloo) and records the device type of what it was given, so a test can also see
CPU tensors in per-step collectives (NCCL accepts only device tensors).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")

# Ops CUDA allows across devices: explicit copies; indexing takes CPU index tensors (integer or
# bool), but its values must be on the device.
_CROSS_DEVICE_OK = {"aten::copy_", "aten::_to_copy", "aten::_copy_from", "aten::lift_fresh",
                    "aten::set_.source_Tensor"}
_CPU_INDICES_OK = {"aten::index.Tensor", "aten::index_put_", "aten::_index_put_impl_",
                   "aten::index_put"}


class DeviceMixError(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    """A tensor on the simulated device: reports DEVICE, computes with the CPU tensor `elem`."""

    elem: torch.Tensor
    # It holds real values: code asking whether a tensor still needs materialising (is_meta)
    # must see a materialised one.
    is_meta = property(lambda self: False)

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert not isinstance(elem, OnDevice) and elem.device.type == "cpu"
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=DEVICE,
            requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    def tolist(self):  # a device-to-host copy, as on CUDA (the C++ path rejects subclasses)
        return self.elem.tolist()

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise DeviceMixError(f"{func} reached an OnDevice tensor outside simulated_device()")


def _is_device(kw_device) -> bool:
    return kw_device is not None and torch.device(kw_device).type == DEVICE.type


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat = []
        tree_map(lambda x: flat.append(x) if isinstance(x, torch.Tensor) else None,
                 (args, kwargs))
        on_dev = [t for t in flat if isinstance(t, OnDevice)]
        plain = [t for t in flat if not isinstance(t, OnDevice)]
        name = func._schema.name + (f".{func._schema.overload_name}"
                                    if func._schema.overload_name else "")
        if on_dev and func._schema.name not in _CROSS_DEVICE_OK and name not in _CROSS_DEVICE_OK:
            bad = [t for t in plain if t.dim() > 0 and t.device.type == "cpu"]
            if name in _CPU_INDICES_OK:
                bad = [t for t in bad if t.dtype.is_floating_point or t.is_complex()]
            if bad:
                raise DeviceMixError(
                    f"{name} mixes device tensors {[tuple(t.shape) for t in on_dev]} with CPU "
                    f"tensors {[tuple(t.shape) for t in bad]} (create them on the inputs' "
                    "device)")
        wants = kwargs.get("device")
        to_device = _is_device(wants)
        if to_device:
            kwargs["device"] = torch.device("cpu")
        inner = {id(t.elem): t for t in on_dev}
        args, kwargs = tree_map(lambda x: x.elem if isinstance(x, OnDevice) else x,
                                (args, kwargs))
        out = func(*args, **kwargs)
        wrap = to_device or (bool(on_dev) and wants is None)

        def back(x):
            if not isinstance(x, torch.Tensor):
                return x
            if id(x) in inner:  # in-place / out= ops return their (device) argument
                return inner[id(x)]
            return OnDevice(x) if wrap and x.device.type == "cpu" else x
        return tree_map(back, out)


class _Constructors(TorchFunctionMode):
    """torch.tensor(data, device=...) fills its result below the dispatcher, where the mode
    cannot see it: build it on the CPU and move it, which the dispatch mode does see."""

    CONSTRUCTORS = (torch.tensor, torch.as_tensor, torch.asarray)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.CONSTRUCTORS and _is_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
            return func(*args, **kwargs).to(DEVICE)
        return func(*args, **kwargs)


def _cpu_autocast(fn):
    """Autocast has no `meta` state: the simulated device uses the CPU's (off in these tests)."""
    @functools.wraps(fn)
    def call(device_type, *args, **kwargs):
        return fn("cpu" if device_type == DEVICE.type else device_type, *args, **kwargs)
    return call


@contextlib.contextmanager
def simulated_device() -> Iterator[torch.device]:
    saved = {n: getattr(torch, n) for n in ("autocast", "is_autocast_enabled",
                                            "get_autocast_dtype")}
    for n, fn in saved.items():
        setattr(torch, n, _cpu_autocast(fn))
    try:
        with _Constructors(), _Mode():
            yield DEVICE
    finally:
        for n, fn in saved.items():
            setattr(torch, n, fn)


def to_device(module: nn.Module) -> nn.Module:
    """Move a module's parameters and buffers onto the simulated device (inside the mode)."""
    return module.to(DEVICE)


def unwrap(t):
    """The CPU values of a (possibly) device tensor."""
    return t.elem if isinstance(t, OnDevice) else t


COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_to_all_single", "all_to_all")


@contextlib.contextmanager
def patch_collectives(calls: list[tuple[str, set[str]]] | None = None):
    """Run torch.distributed collectives on the CPU values of device tensors (gloo); each call
    appends (name, device types of its tensors) to `calls`."""
    saved = {n: getattr(dist, n) for n in COLLECTIVES}

    def wrap(name, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            kinds: set[str] = set()

            def note(x):
                if isinstance(x, torch.Tensor):
                    kinds.add(x.device.type)
                    return unwrap(x)
                return x
            args, kwargs = tree_map(note, (args, kwargs))
            if calls is not None:
                calls.append((name, kinds))
            return fn(*args, **kwargs)
        return call

    for n, fn in saved.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield calls
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)
