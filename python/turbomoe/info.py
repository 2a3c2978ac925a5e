"""`turbomoe info`: is this setup right? Versions, devices, which backend each op uses and why,
and which Hugging Face model families turbomoe has patched.

Every probe degrades to a readable explanation instead of failing: the command is most useful
exactly when something is missing.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

# Op families of the C ABI (DESIGN.md §3), each with the prefixes of its functions.
OP_FAMILIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("routing", "router scores, top-k, renormalise", ("tm_routing_",)),
    ("permute", "sort tokens by expert, gather rows", ("tm_permute_", "tm_gather_rows")),
    ("grouped_gemm", "all experts' matmuls in one launch", ("tm_grouped_gemm_",)),
    ("combine", "weighted sum back to token order", ("tm_combine_",)),
    ("activation", "SwiGLU and clamped SwiGLU", ("tm_swiglu_",)),
    ("rmsnorm", "RMSNorm", ("tm_rmsnorm_",)),
    ("rope", "rotary position embedding", ("tm_rope_",)),
    ("loss", "cross-entropy, fused linear cross-entropy", ("tm_cross_entropy_", "tm_linear_")),
    ("expert_parallel", "token dispatch/combine across GPUs", ("tm_ep_",)),
    ("optim", "AdamW step (turbomoe.train.optim.AdamW)", ("tm_adamw_",)),
)

STOCK = "stock PyTorch"
_FALSE = ("", "0", "false", "no")


@dataclass
class Backend:
    backend: str
    reason: str


@dataclass
class OpFamily:
    name: str
    what: str
    functions: list[str]
    missing: list[str]
    backends: dict[str, Backend] = field(default_factory=dict)  # device kind -> backend


@dataclass
class PatchStatus:
    families: dict[str, list[str]]  # model_type -> hooks applied
    summary: str


@dataclass
class Library:
    path: str | None
    build_info: str | None
    built_with_cuda: bool
    cuda_archs: list[str]
    error: str | None


def patch_status() -> PatchStatus:
    """Which HF families turbomoe has patched right now, read from turbomoe itself."""
    import turbomoe

    disabled = os.environ.get("TURBOMOE_DISABLE", "").strip().lower() not in _FALSE
    getter = getattr(turbomoe, "patched_families", None)
    if getter is None:
        return PatchStatus({}, "HF patches: not in this turbomoe build; stock transformers runs")
    try:
        families = {k: list(v) for k, v in dict(getter()).items()}
    except Exception as exc:  # a broken patch layer must not break `info` or a training run
        return PatchStatus({}, f"HF patches: unknown ({type(exc).__name__}: {exc})")
    if families:
        return PatchStatus(families, "HF patches active for " + ", ".join(sorted(families)))
    why = "TURBOMOE_DISABLE is set" if disabled else "none applied (see warnings above)"
    return PatchStatus({}, f"HF patches: inactive, {why}; stock transformers runs")


def library() -> Library:
    from turbomoe import _native

    try:
        lib = _native.lib()
    except (ImportError, OSError) as exc:
        return Library(None, None, False, [], str(exc))
    info = lib.tm_build_info().decode("utf-8", "replace")
    with_cuda = bool(lib.tm_built_with_cuda())
    match = re.search(r"archs (\S+)", info)
    archs = [a for a in re.split(r"[;,]", match.group(1)) if a and a != "none"] if match else []
    return Library(_native.library_path(), info, with_cuda, archs, None)


def _arch_runs_on(archs: list[str], major: int, minor: int) -> bool | None:
    """Whether a build for archs has code for compute capability major.minor; None if unknown.
    Real (SASS) code runs only on its exact capability; virtual (PTX) code on it and newer."""
    cc = major * 10 + minor
    known = False
    for arch in archs:
        m = re.fullmatch(r"(\d+)(a?)(?:-(real|virtual))?", arch)
        if not m:
            continue
        known = True
        value, kind = int(m.group(1)), m.group(3)
        if value == cc or (kind != "real" and not m.group(2) and value <= cc):
            return True
    return False if known else None


def op_families(lib: Library, cuda_caps: list[tuple[int, int]]) -> list[OpFamily]:
    """Each op family with the backend it runs on for CPU tensors and for CUDA tensors."""
    from turbomoe import _native

    loaded = None
    if lib.error is None:
        loaded = _native.lib()
    result = []
    for name, what, prefixes in OP_FAMILIES:
        functions = [f for f in _native.SIGNATURES if f.startswith(prefixes)]
        missing = [f for f in functions if loaded is None or getattr(loaded, f, None) is None]
        family = OpFamily(name, what, functions, missing)
        if lib.error is not None:
            reason = "libturbomoe not loaded"
            family.backends["cpu"] = Backend(STOCK, reason)
            if cuda_caps:
                family.backends["cuda"] = Backend(STOCK, reason)
        elif not functions:
            reason = "not in this turbomoe version yet"
            family.backends["cpu"] = Backend(STOCK, reason)
            if cuda_caps:
                family.backends["cuda"] = Backend(STOCK, reason)
        elif missing:
            reason = f"library lacks {len(missing)}/{len(functions)} functions (rebuild it)"
            family.backends["cpu"] = Backend(STOCK, reason)
            if cuda_caps:
                family.backends["cuda"] = Backend(STOCK, reason)
        else:
            family.backends["cpu"] = Backend("turbomoe CPU reference", "C++ reference kernels")
            if cuda_caps:
                family.backends["cuda"] = _cuda_backend(lib, cuda_caps)
        result.append(family)
    return result


def _cuda_backend(lib: Library, caps: list[tuple[int, int]]) -> Backend:
    if not lib.built_with_cuda:
        return Backend(STOCK, "libturbomoe was built without CUDA (no nvcc at build time)")
    archs = ",".join(lib.cuda_archs) or "unknown"
    lacking = sorted(
        {f"sm_{a}{b}" for a, b in caps if _arch_runs_on(lib.cuda_archs, a, b) is False}
    )
    if lacking:
        return Backend(STOCK, f"no kernels for {', '.join(lacking)} in this build (archs {archs})")
    return Backend("turbomoe CUDA kernels", f"built for {archs}")


def cuda_devices() -> tuple[list[dict[str, Any]], str | None]:
    """Visible GPUs, or a reason there are none. CUDA is queried only when torch says it works,
    so the command never initialises a broken driver."""
    import torch

    if not torch.cuda.is_available():
        reason = "torch was built without CUDA" if torch.version.cuda is None else "no usable GPU"
        return [], reason
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "index": i,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    return devices, None


def nvlink_topology() -> str | None:
    """`nvidia-smi topo -m` output, when nvidia-smi exists."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "topo", "-m"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(nvidia-smi topo -m failed: {exc})"
    return (done.stdout or done.stderr).rstrip() or None


def collect() -> dict[str, Any]:
    """Everything `turbomoe info` reports, as plain data (what `--json` prints)."""
    import torch
    import transformers

    import turbomoe

    lib = library()
    devices, no_cuda = cuda_devices()
    caps = [tuple(int(x) for x in d["capability"].split(".")) for d in devices]
    families = op_families(lib, caps)  # type: ignore[arg-type]
    patches = patch_status()
    return {
        "versions": {
            "turbomoe": turbomoe.__version__,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
        },
        "library": asdict(lib),
        "cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "cuda": {"devices": devices, "unavailable_reason": no_cuda},
        "nvlink_topology": nvlink_topology() if devices else None,
        "ops": [asdict(f) for f in families],
        "hf_patches": asdict(patches),
    }


def render(report: dict[str, Any]) -> str:
    v = report["versions"]
    lib = report["library"]
    out = [f"turbomoe {v['turbomoe']}"]
    if lib["error"]:
        out.append(f"  libturbomoe   not loaded: {lib['error']}")
    else:
        out.append(f"  libturbomoe   {lib['path']}")
        out.append(f"                {lib['build_info']}")
    out.append(f"  torch         {v['torch']} (CUDA {v['torch_cuda'] or 'none'})")
    out.append(f"  transformers  {v['transformers']}")
    out.append(f"  python        {v['python']} ({v['platform']})")
    out.append("")
    out.append("devices")
    cpu = report["cpu"]
    out.append(f"  cpu           {cpu['cores']} cores, torch uses {cpu['torch_threads']} threads")
    cuda = report["cuda"]
    if cuda["devices"]:
        for d in cuda["devices"]:
            out.append(
                f"  cuda:{d['index']:<8} {d['name']}, {d['memory_gib']} GiB, "
                f"compute capability {d['capability']}"
            )
    else:
        out.append(f"  cuda          none ({cuda['unavailable_reason']})")
    if report["nvlink_topology"]:
        out.append("")
        out.append("GPU topology (nvidia-smi topo -m)")
        out.extend("  " + line for line in report["nvlink_topology"].splitlines())
    out.append("")
    out.append("op backends")
    for fam in report["ops"]:
        out.append(f"  {fam['name']:<16} {fam['what']}")
        for device, b in fam["backends"].items():
            out.append(f"    {device:<5} {b['backend']}: {b['reason']}")
    out.append("")
    out.append(report["hf_patches"]["summary"])
    for family, hooks in sorted(report["hf_patches"]["families"].items()):
        out.append(f"  {family:<16} {', '.join(hooks)}")
    return "\n".join(out)


def main(as_json: bool = False) -> int:
    report = collect()
    if as_json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    sys.stdout.flush()
    return 0
