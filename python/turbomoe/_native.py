"""ctypes binding of libturbomoe's C ABI (include/turbomoe/turbomoe.h).

Every function of the header is declared once in ``SIGNATURES``; ``call`` checks the returned
status and raises ``ValueError`` / ``TypeError`` / ``RuntimeError`` carrying the library's own
message. Nothing here touches CUDA: describing a CUDA tensor only reads its metadata.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path
from typing import Any

import torch

ABI_VERSION = 2
MAX_DIMS = 6

# tm_status
OK = 0
ERR_INVALID_ARGUMENT = 1
ERR_UNSUPPORTED = 2
ERR_CUDA = 3
ERR_OUT_OF_MEMORY = 4
ERR_INTERNAL = 5

# tm_dtype / tm_device_type
DTYPE_CODES = {
    torch.float32: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
    torch.int32: 4,
    torch.int64: 5,
}
DEVICE_CPU = 1
DEVICE_CUDA = 2


class TmTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("device_type", ctypes.c_int32),
        ("device_index", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("sizes", ctypes.c_int64 * MAX_DIMS),
        ("strides", ctypes.c_int64 * MAX_DIMS),
    ]


class RoutingParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("kind", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("renormalize", ctypes.c_int32),
        ("n_group", ctypes.c_int32),
        ("topk_group", ctypes.c_int32),
        ("routed_scaling_factor", ctypes.c_float),
        ("renorm_epsilon", ctypes.c_float),
    ]


class SwigluParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("variant", ctypes.c_int32),
        ("alpha", ctypes.c_float),
        ("limit", ctypes.c_float),
    ]


class RopeParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("interleaved", ctypes.c_int32),
    ]


class LinearCeParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("ignore_index", ctypes.c_int64),
        ("chunk_rows", ctypes.c_int64),
    ]


class AdamwParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("lr", ctypes.c_double),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("step", ctypes.c_int64),
    ]


def make_params(cls: type[ctypes.Structure], **fields: Any) -> ctypes.Structure:
    """A parameter struct with struct_size filled in."""
    return cls(struct_size=ctypes.sizeof(cls), **fields)


_T = ctypes.c_char_p  # a tm_tensor: describe()'s packed bytes, see there
_P = ctypes.c_void_p
_I32 = ctypes.c_int32
_I64 = ctypes.c_int64
_SZ = ctypes.c_size_t
_SZP = ctypes.POINTER(ctypes.c_size_t)
_F = ctypes.c_float
_STR = ctypes.c_char_p

# name -> (restype, argtypes). Must list exactly the functions of turbomoe.h (a test checks).
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "tm_last_error": (_STR, []),
    "tm_abi_version": (_I32, []),
    "tm_version_string": (_STR, []),
    "tm_built_with_cuda": (_I32, []),
    "tm_build_info": (_STR, []),
    "tm_routing_forward": (_I32, [ctypes.POINTER(RoutingParams), _T, _T, _T, _T, _T, _P]),
    "tm_routing_backward": (_I32, [ctypes.POINTER(RoutingParams), _T, _T, _T, _T, _P]),
    "tm_permute_plan_workspace_size": (_I32, [_I64, _I64, _I32, _SZP]),
    "tm_permute_plan": (_I32, [_T, _I64, _T, _T, _T, _P, _SZ, _P]),
    "tm_gather_rows": (_I32, [_T, _T, _T, _I64, _T, _P]),
    "tm_combine_forward": (_I32, [_T, _T, _T, _T, _P]),
    "tm_combine_backward": (_I32, [_T, _T, _T, _T, _T, _T, _T, _P]),
    "tm_ep_layout_workspace_size": (_I32, [_I64, _I64, _I64, _I32, _SZP]),
    "tm_ep_layout": (_I32, [_T, _I64, _I64, _T, _T, _T, _T, _P, _SZ, _P]),
    "tm_ep_send_plan": (_I32, [_T, _T, _T, _T, _T, _I64, _I64, _T, _T, _T, _T, _P]),
    "tm_ep_send_plan_backward": (_I32, [_T, _T, _T, _I64, _I64, _T, _P]),
    "tm_peer_comm_create": (_I32, [_I32, _I32, _I32, _SZ, ctypes.POINTER(_P)]),
    "tm_peer_comm_export": (_I32, [_P, _P]),
    "tm_peer_comm_connect": (_I32, [_P, _P]),
    "tm_peer_comm_data": (_I32, [_P, ctypes.POINTER(_P), _SZP]),
    "tm_peer_barrier": (_I32, [_P, ctypes.c_double, _P]),
    "tm_peer_push": (_I32, [_P, _T, _I64, _SZ, _I32, _P]),
    "tm_peer_comm_destroy": (None, [_P]),
    "tm_grouped_gemm_workspace_size": (_I32, [_I32, _I64, _I64, _I64, _I64, _I32, _SZP]),
    "tm_grouped_gemm_forward": (_I32, [_T, _T, _T, _T, _P, _SZ, _P]),
    "tm_grouped_gemm_forward_gathered": (_I32, [_T, _T, _I64, _T, _T, _T, _P]),
    "tm_grouped_gemm_backward_input": (_I32, [_T, _T, _T, _T, _P, _SZ, _P]),
    "tm_grouped_gemm_backward_weight": (_I32, [_T, _T, _T, _T, _P, _SZ, _P]),
    "tm_grouped_gemm_backward_weight_routed": (_I32, [_T, _T, _T, _T, _P, _SZ, _P]),
    "tm_zero_empty_experts": (_I32, [_T, _T, _P]),
    "tm_grouped_gemm_backward_weight_gathered": (_I32, [_T, _T, _T, _I64, _T, _T, _P]),
    "tm_grouped_gemm_backward_input_gathered": (_I32, [_T, _T, _I64, _T, _T, _T, _P]),
    "tm_grouped_gemm_backward_weight_gathered_dy": (_I32, [_T, _T, _T, _I64, _T, _T, _P]),
    "tm_set_gemm_sm_margin": (_I32, [_I32]),
    "tm_gemm_sm_margin": (_I32, []),
    "tm_swiglu_forward": (_I32, [ctypes.POINTER(SwigluParams), _T, _T, _T, _P]),
    "tm_grouped_gemm_swiglu_forward": (
        _I32,
        [ctypes.POINTER(SwigluParams), _T, _T, _T, _T, _T, _P],
    ),
    "tm_swiglu_backward": (_I32, [ctypes.POINTER(SwigluParams), _T, _T, _T, _T, _T, _P]),
    "tm_swiglu_weighted_backward": (
        _I32,
        [ctypes.POINTER(SwigluParams), _T, _T, _T, _T, _T, _T, _T, _T, _P],
    ),
    "tm_rmsnorm_forward": (_I32, [_T, _T, _F, _T, _T, _P]),
    "tm_rmsnorm_backward_workspace_size": (_I32, [_I64, _I64, _I32, _SZP]),
    "tm_rmsnorm_backward": (_I32, [_T, _T, _T, _T, _T, _T, _P, _SZ, _P]),
    "tm_add_rmsnorm_forward": (_I32, [_T, _T, _T, _F, _T, _T, _T, _P]),
    "tm_rmsnorm_backward_add": (_I32, [_T, _T, _T, _T, _T, _T, _T, _P, _SZ, _P]),
    "tm_qk_norm_rope_forward": (_I32, [_T, _T, _F, _T, _T, _T, _T, _P]),
    "tm_qk_norm_rope_backward": (_I32, [_T, _T, _T, _T, _T, _T, _T, _T, _P, _SZ, _P]),
    "tm_rope_forward": (_I32, [ctypes.POINTER(RopeParams), _T, _T, _T, _T, _P]),
    "tm_rope_backward": (_I32, [ctypes.POINTER(RopeParams), _T, _T, _T, _T, _P]),
    "tm_cross_entropy_forward": (_I32, [_T, _T, _I64, _T, _T, _P]),
    "tm_cross_entropy_backward": (_I32, [_T, _T, _T, _T, _I64, _T, _P]),
    "tm_cross_entropy_forward_backward": (_I32, [_T, _T, _T, _I64, _T, _T, _T, _P]),
    "tm_scale_unless_one": (_I32, [_T, _T, _P]),
    "tm_linear_cross_entropy_workspace_size": (
        _I32,
        [ctypes.POINTER(LinearCeParams), _I64, _I64, _I64, _I32, _SZP],
    ),
    "tm_linear_cross_entropy_forward": (
        _I32,
        [ctypes.POINTER(LinearCeParams), _T, _T, _T, _T, _T, _P, _SZ, _P],
    ),
    "tm_linear_cross_entropy_backward": (
        _I32,
        [ctypes.POINTER(LinearCeParams), _T, _T, _T, _T, _T, _T, _T, _P, _SZ, _P],
    ),
    "tm_adamw_step": (_I32, [ctypes.POINTER(AdamwParams), _T, _T, _T, _T, _T, _P]),
}


def _candidate_paths() -> list[Path]:
    env = os.environ.get("TURBOMOE_LIBRARY")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    repo = here.parent.parent
    return [
        here / "lib" / "libturbomoe.so",
        repo / "build" / "py" / "libturbomoe.so",
        repo / "build" / "libturbomoe.so",
    ]


def _load() -> ctypes.CDLL:
    tried = []
    for path in _candidate_paths():
        tried.append(str(path))
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            break
    else:
        raise ImportError(
            "libturbomoe.so not found (looked at: " + ", ".join(tried) + "). Install the package "
            "with `pip install .` or point TURBOMOE_LIBRARY at a built library."
        )
    for name, (restype, argtypes) in SIGNATURES.items():
        # A library older than this package may lack a function: `call` reports it by name;
        # tests/python/test_abi.py checks that a fresh build exports every one.
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = restype
            fn.argtypes = argtypes
    version = lib.tm_abi_version()
    if version != ABI_VERSION:
        raise ImportError(
            f"libturbomoe at {lib._name} has ABI version {version}, this Python package expects "
            f"{ABI_VERSION}; rebuild the library"
        )
    return lib


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The loaded library (loaded on first use so that `import turbomoe` stays cheap)."""
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def library_path() -> str:
    return str(lib()._name)


def _raise_for(status: int, name: str) -> None:
    message = lib().tm_last_error().decode("utf-8", "replace") or f"{name} failed"
    if status == ERR_INVALID_ARGUMENT:
        if "dtype" in message:
            raise TypeError(message)
        raise ValueError(message)
    if status == ERR_OUT_OF_MEMORY:
        raise MemoryError(message)
    raise RuntimeError(message)


_functions: dict[str, Any] = {}


def _function(name: str) -> Any:
    fn = _functions.get(name)
    if fn is None:
        fn = getattr(lib(), name, None)
        if fn is None:
            raise RuntimeError(
                f"libturbomoe at {library_path()} does not export {name}; rebuild it"
            )
        _functions[name] = fn
    return fn


def call(name: str, *args: Any) -> None:
    """Calls a status-returning C function and raises on any status other than TM_OK."""
    status = _function(name)(*args)
    if status != OK:
        _raise_for(status, name)


# A tm_tensor travels as its packed bytes: data, dtype, device_type, device_index, ndim,
# sizes[6], strides[6]. Everything after the data pointer depends only on the tensor's metadata,
# so it is packed once per (dtype, device, shape, strides) and cached; a call then costs the
# metadata reads, a dict lookup and one 8-byte pack (~1 µs against ~2.3 µs packing all fields,
# and a step describes ~130 tensors a layer: that is host time of the eager expert-parallel step).
_POINTER_LAYOUT = struct.Struct("<q")
_TAIL_LAYOUT = struct.Struct(f"<iiii{MAX_DIMS}q{MAX_DIMS}q")
_ZEROS = (0,) * MAX_DIMS
_MAX_CACHED_TAILS = 4096  # many distinct shapes (packed batches): start over rather than grow
_tails: dict[tuple[Any, ...], tuple[bytes, bool]] = {}


def _tail(t: torch.Tensor) -> tuple[bytes, bool]:
    """The packed fields after the data pointer, and whether the tensor is empty (null data)."""
    ndim = t.dim()
    if ndim > MAX_DIMS:
        raise ValueError(f"tensors of rank {ndim} exceed turbomoe's limit of {MAX_DIMS}")
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"turbomoe does not support dtype {t.dtype}")
    if t.is_cuda:
        device_type, device_index = DEVICE_CUDA, t.get_device()
    elif t.is_cpu:
        device_type, device_index = DEVICE_CPU, 0
    else:
        raise ValueError(f"turbomoe runs on cpu and cuda tensors, not {t.device}")
    pad = _ZEROS[ndim:]
    tail = _TAIL_LAYOUT.pack(
        code, device_type, device_index, ndim, *t.shape, *pad, *t.stride(), *pad
    )
    return tail, t.numel() == 0


def describe(t: torch.Tensor | None) -> bytes | None:
    """The packed tm_tensor of t, or None for an absent optional (a null pointer).

    The bytes are what a ``const tm_tensor*`` parameter points at (SIGNATURES binds those as
    ``c_char_p``, which passes a bytes object's own buffer): the library only reads descriptors.
    """
    if t is None:
        return None
    key = (t.dtype, t.device, t.shape, t.stride())
    entry = _tails.get(key)
    if entry is None:
        entry = _tail(t)
        if len(_tails) >= _MAX_CACHED_TAILS:
            _tails.clear()
        _tails[key] = entry
    tail, empty = entry
    return _POINTER_LAYOUT.pack(0 if empty else t.data_ptr()) + tail


def stream_for(t: torch.Tensor) -> int | None:
    """The raw cudaStream_t of torch's current stream on t's device (None on CPU)."""
    if not t.is_cuda:
        return None
    return torch._C._cuda_getCurrentRawStream(t.get_device())


_workspace_sizes: dict[tuple[Any, ...], int] = {}


def workspace_size(name: str, *args: Any) -> int:
    """Calls a *_workspace_size query and returns the byte count. Cached when every argument is
    an integer: the size is a pure function of them."""
    key = (name, *args) if all(type(a) is int for a in args) else None
    nbytes = _workspace_sizes.get(key) if key is not None else None
    if nbytes is None:
        out = ctypes.c_size_t(0)
        call(name, *args, ctypes.byref(out))
        nbytes = int(out.value)
        if key is not None:
            if len(_workspace_sizes) > 4096:  # many distinct shapes (e.g. packed batches)
                _workspace_sizes.clear()
            _workspace_sizes[key] = nbytes
    return nbytes


def device_code(t: torch.Tensor) -> int:
    return DEVICE_CUDA if t.is_cuda else DEVICE_CPU


def workspace(nbytes: int, like: torch.Tensor) -> torch.Tensor:
    """A byte buffer from torch's allocator on like's device (at least one byte)."""
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=like.device)
