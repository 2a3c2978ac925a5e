"""The ctypes binding (_native) agrees with include/turbomoe/turbomoe.h and the built library.

The header is parsed here rather than trusted from memory: a function added to the header but not
to SIGNATURES, an argument added to a prototype, or a field reordered in a struct would otherwise
surface as a crash or a silently wrong argument far from its cause.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from turbomoe import _native

HEADER = Path(__file__).resolve().parents[2] / "include" / "turbomoe" / "turbomoe.h"


def header_text() -> str:
    if not HEADER.is_file():
        pytest.fail(f"{HEADER} not found: the ABI tests run from a source checkout")
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", " ", text)


def split_params(params: str) -> list[str]:
    params = " ".join(params.split())
    if params in ("", "void"):
        return []
    return [p.strip() for p in params.split(",")]


def prototypes() -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, [parameter declarations]) for every TM_API function."""
    found: dict[str, tuple[str, list[str]]] = {}
    pattern = re.compile(r"TM_API\s+([^;(]*?)\s*\b(tm_\w+)\s*\(([^)]*)\)\s*;", re.DOTALL)
    for ret, name, params in pattern.findall(header_text()):
        assert name not in found, f"{name} declared twice"
        found[name] = (" ".join(ret.split()), split_params(params))
    return found


def param_type(decl: str) -> str:
    """'const tm_tensor* logits' -> 'tm_tensor*' (const and the parameter name dropped)."""
    decl = decl.replace("const ", "").strip()
    match = re.fullmatch(r"(\w+)\s*(\**)\s*\w+", decl)
    assert match, f"cannot parse parameter {decl!r}"
    return match.group(1) + match.group(2)


STRUCT_CLASSES = {
    "tm_tensor": _native.TmTensor,
    "tm_routing_params": _native.RoutingParams,
    "tm_swiglu_params": _native.SwigluParams,
    "tm_rope_params": _native.RopeParams,
    "tm_linear_ce_params": _native.LinearCeParams,
    "tm_adamw_params": _native.AdamwParams,
}

SCALARS = {
    "int32_t": ctypes.c_int32,
    "uint32_t": ctypes.c_uint32,
    "int64_t": ctypes.c_int64,
    "size_t": ctypes.c_size_t,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "tm_status": ctypes.c_int32,
}

# Handles the library allocates and the caller only passes back: bound as void pointers.
OPAQUE = {"tm_peer_comm"}


def expected_ctype(c_type: str) -> object:
    """The ctypes type a C parameter/return type must be declared as in SIGNATURES."""
    if c_type == "void":
        return None
    if c_type in ("void*", "char*"):
        return ctypes.c_void_p if c_type == "void*" else ctypes.c_char_p
    if c_type.rstrip("*") in OPAQUE and c_type.count("*") == 1:
        return ctypes.c_void_p
    if c_type.endswith("**"):
        return ctypes.POINTER(expected_ctype(c_type[:-1]))
    if c_type == "tm_tensor*":  # passed as describe()'s packed bytes
        return ctypes.c_char_p
    if c_type.endswith("*"):
        base = c_type[:-1]
        target = STRUCT_CLASSES.get(base) or SCALARS.get(base)
        assert target is not None, f"no ctypes mapping for {c_type}"
        return ctypes.POINTER(target)
    assert c_type in SCALARS, f"no ctypes mapping for {c_type}"
    return SCALARS[c_type]


def test_header_functions_equal_signatures():
    declared = set(prototypes())
    bound = set(_native.SIGNATURES)
    assert declared, "no TM_API prototype parsed from the header"
    assert declared - bound == set(), "in turbomoe.h but not in _native.SIGNATURES"
    assert bound - declared == set(), "in _native.SIGNATURES but not in turbomoe.h"


@pytest.mark.parametrize("name", sorted(prototypes()))
def test_signature_matches_prototype(name):
    ret, params = prototypes()[name]
    restype, argtypes = _native.SIGNATURES[name]
    assert len(argtypes) == len(params), f"{name}: header has {len(params)} parameters"
    ret_type = ret.replace("const ", "").replace(" ", "")
    assert restype == expected_ctype(ret_type), f"{name} returns {ret}"
    for i, (decl, actual) in enumerate(zip(params, argtypes, strict=True)):
        assert actual == expected_ctype(param_type(decl)), f"{name} parameter {i}: {decl}"


def test_library_exports_every_function():
    lib = _native.lib()
    missing = [name for name in _native.SIGNATURES if getattr(lib, name, None) is None]
    assert missing == [], f"{_native.library_path()} does not export {missing}"


def test_library_exports_nothing_else():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    listing = subprocess.run(
        [nm, "-D", "--defined-only", _native.library_path()],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    exported = {line.split()[-1] for line in listing.splitlines() if line.strip()}
    tm_symbols = {s for s in exported if s.startswith("tm_")}
    assert tm_symbols == set(_native.SIGNATURES)
    # turbomoe's own C++ stays hidden (weak std:: template instances from libstdc++'s headers,
    # which carry default visibility, are the only mangled names a build may still show).
    assert not [s for s in exported if s.startswith("_Z") and "turbomoe" in s]


def test_abi_version_and_constants_match_header():
    text = header_text()
    assert int(re.search(r"#define TM_ABI_VERSION (\d+)", text).group(1)) == _native.ABI_VERSION
    assert _native.lib().tm_abi_version() == _native.ABI_VERSION
    assert int(re.search(r"#define TM_MAX_DIMS (\d+)", text).group(1)) == _native.MAX_DIMS
    enums = dict(re.findall(r"\b(TM_[A-Z0-9_]+)\s*=\s*(\d+)", text))
    assert int(enums["TM_OK"]) == _native.OK
    assert int(enums["TM_ERR_INVALID_ARGUMENT"]) == _native.ERR_INVALID_ARGUMENT
    assert int(enums["TM_ERR_UNSUPPORTED"]) == _native.ERR_UNSUPPORTED
    assert int(enums["TM_ERR_CUDA"]) == _native.ERR_CUDA
    assert int(enums["TM_ERR_OUT_OF_MEMORY"]) == _native.ERR_OUT_OF_MEMORY
    assert int(enums["TM_ERR_INTERNAL"]) == _native.ERR_INTERNAL
    assert int(enums["TM_DEVICE_CPU"]) == _native.DEVICE_CPU
    assert int(enums["TM_DEVICE_CUDA"]) == _native.DEVICE_CUDA
    import torch

    names = {
        torch.float32: "TM_DTYPE_FLOAT32",
        torch.bfloat16: "TM_DTYPE_BFLOAT16",
        torch.float16: "TM_DTYPE_FLOAT16",
        torch.int32: "TM_DTYPE_INT32",
        torch.int64: "TM_DTYPE_INT64",
    }
    assert {int(enums[names[dt]]) for dt in names} == set(_native.DTYPE_CODES.values())
    for dtype, code in _native.DTYPE_CODES.items():
        assert int(enums[names[dtype]]) == code


def header_structs() -> dict[str, list[tuple[str, str, int]]]:
    """struct name -> [(C type, field name, array length or 0)] in declaration order."""
    structs = {}
    text = header_text()
    for name, body, alias in re.findall(
        r"typedef struct (tm_\w+)\s*\{(.*?)\}\s*(tm_\w+)\s*;", text, flags=re.DOTALL
    ):
        assert name == alias
        fields = []
        for decl in body.split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            match = re.fullmatch(r"(\w+\s*\**)\s*(\w+)(?:\[(\w+)\])?", decl)
            assert match, f"cannot parse field {decl!r} of {name}"
            c_type, field, length = match.groups()
            count = 0
            if length:
                count = _native.MAX_DIMS if length == "TM_MAX_DIMS" else int(length)
            fields.append((c_type.replace(" ", ""), field, count))
        structs[name] = fields
    return structs


def test_every_header_struct_has_a_ctypes_class():
    assert set(header_structs()) == set(STRUCT_CLASSES)


@pytest.mark.parametrize("struct", sorted(STRUCT_CLASSES))
def test_struct_layout_matches_header(struct):
    fields = header_structs()[struct]
    cls = STRUCT_CLASSES[struct]
    assert [f[0] for f in cls._fields_] == [f[1] for f in fields], "field names/order differ"
    mirror_fields = []
    for c_type, field, count in fields:
        ctype = expected_ctype(c_type) if c_type != "void*" else ctypes.c_void_p
        mirror_fields.append((field, ctype * count if count else ctype))
    mirror = type("Mirror", (ctypes.Structure,), {"_fields_": mirror_fields})
    assert ctypes.sizeof(cls) == ctypes.sizeof(mirror)
    for (field, ctype), (bound_name, bound_type) in zip(mirror_fields, cls._fields_, strict=True):
        assert bound_type == ctype, field
        assert getattr(cls, bound_name).offset == getattr(mirror, field).offset, field
        assert getattr(cls, bound_name).size == getattr(mirror, field).size, field


def test_library_rejects_wrong_struct_size():
    """struct_size guards against a caller built against another layout."""
    params = _native.make_params(_native.SwigluParams, variant=1, alpha=1.0, limit=1.0)
    params.struct_size = ctypes.sizeof(_native.SwigluParams) + 4
    import torch

    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="struct_size"):
        _native.call(
            "tm_swiglu_forward",
            params,
            _native.describe(x),
            _native.describe(x),
            _native.describe(torch.empty_like(x)),
            None,
        )
