"""Load a Hugging Face safetensors checkpoint into a model whose experts are already sharded.

Each rank reads the dense weights and only its own experts: per-expert keys
(``...experts.{e}.gate_proj.weight`` / ``up_proj`` / ``down_proj``, Mixtral's ``w1``/``w3``/``w2``)
of other ranks' experts are skipped without being read, and fused keys
(``...experts.gate_up_proj [E,2I,H]``) are read as the local slice only. Key renamings come from
transformers' own conversion mapping (e.g. Mixtral's ``block_sparse_moe`` → ``mlp``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from turbomoe.parallel.dispatch import expert_shard
from turbomoe.parallel.shard import find_experts

_PER_EXPERT = re.compile(
    r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
# projection → (fused parameter, half of gate_up: 0 gate, 1 up, None for down)
_PROJ = {
    "gate_proj": ("gate_up_proj", 0),
    "w1": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "w3": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None),
    "w2": ("down_proj", None),
}


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded via its index, or single)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"{directory} has no model.safetensors(.index.json): only safetensors load")


def _renamings(model: nn.Module) -> list[Any]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]


@dataclass
class _ExpertTarget:
    module: nn.Module
    first: int
    count: int
    loaded: dict[str, set[tuple[int, int | None]]] = field(default_factory=dict)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter and buffer uninitialised storage on device (ties kept)."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(
                        torch.empty_like(p, device=device), requires_grad=p.requires_grad
                    )
                module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device=device)


class _Loader:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.renamings = _renamings(model)
        self.tensors = dict(model.state_dict(keep_vars=True))
        self.loaded: set[str] = set()
        self.experts: dict[str, _ExpertTarget] = {}
        for name, module in find_experts(model):
            shard = expert_shard(module)
            first, last = shard.expert_range if shard else (0, module.gate_up_proj.shape[0])
            self.experts[name] = _ExpertTarget(module, first, last - first)
        prefix = getattr(model, "base_model_prefix", "")
        self.prefix = f"{prefix}." if prefix else ""

    def _rename(self, key: str) -> str:
        for renaming in self.renamings:
            key, _ = renaming.rename_source_key(key)
        if key not in self.tensors and self.prefix + key in self.tensors:
            key = self.prefix + key  # a checkpoint of the base model
        return key

    def load_file(self, reader: Any) -> None:
        for source in reader.keys():
            key = self._rename(source)
            match = _PER_EXPERT.match(key)
            if match is not None and match["module"] in self.experts:
                self._load_expert(reader, source, match)
                continue
            module_name, _, weight = key.rpartition(".")
            if module_name in self.experts and weight in ("gate_up_proj", "down_proj"):
                self._load_fused(reader, source, module_name, weight)
                continue
            if key in self.tensors:
                self._copy(self.tensors[key], reader.get_tensor(source), key)
                self.loaded.add(key)
            # Anything else is an unexpected key; transformers ignores those as well.

    def _load_expert(self, reader: Any, source: str, match: re.Match[str]) -> None:
        target = self.experts[match["module"]]
        expert = int(match["expert"]) - target.first
        if not 0 <= expert < target.count:
            return  # another rank's expert: never read
        weight_name, half = _PROJ[match["proj"]]
        weight = getattr(target.module, weight_name)
        row = weight[expert]
        if half is not None:
            size = row.shape[0] // 2
            row = row[half * size : (half + 1) * size]
        self._copy(row, reader.get_tensor(source), source)
        weight._is_hf_initialized = True
        target.loaded.setdefault(weight_name, set()).add((expert, half))

    def _load_fused(self, reader: Any, source: str, module_name: str, weight_name: str) -> None:
        target = self.experts[module_name]
        block = reader.get_slice(source)[target.first : target.first + target.count]
        self._copy(getattr(target.module, weight_name), block, source)
        halves = (0, 1) if weight_name == "gate_up_proj" else (None,)
        target.loaded.setdefault(weight_name, set()).update(
            (e, h) for e in range(target.count) for h in halves
        )

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(
                f"checkpoint tensor {key} has shape {tuple(src.shape)}, the model expects "
                f"{tuple(dst.shape)}"
            )
        with torch.no_grad():
            dst.copy_(src)
        dst._is_hf_initialized = True  # type: ignore[attr-defined]

    def missing(self) -> list[str]:
        """Keys of the model that no checkpoint tensor filled (tied copies excluded)."""
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        missing = []
        for name, target in self.experts.items():
            for weight_name in ("gate_up_proj", "down_proj"):
                halves = (0, 1) if weight_name == "gate_up_proj" else (None,)
                want = {(e, h) for e in range(target.count) for h in halves}
                if target.loaded.get(weight_name, set()) != want:
                    missing.append(f"{name}.{weight_name}")
        expert_keys = {f"{n}.{w}" for n in self.experts for w in ("gate_up_proj", "down_proj")}
        for key in self.tensors:
            if key not in self.loaded and key not in expert_keys and key not in tied:
                missing.append(key)
        return missing


def _open_all(files: list[Path], stack: ExitStack) -> Iterator[Any]:
    for path in files:
        yield stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))


def load_checkpoint(model: nn.Module, directory: Path) -> None:
    """Fill a materialised model (experts already sharded) from the checkpoint in directory.

    Raises ValueError when a parameter or persistent buffer of the model is not in the
    checkpoint: every rank must hold identical dense weights, so nothing is initialised at
    random here.
    """
    loader = _Loader(model)
    with ExitStack() as stack:
        for reader in _open_all(checkpoint_files(directory), stack):
            loader.load_file(reader)
    missing = loader.missing()
    if missing:
        shown = ", ".join(missing[:8]) + (" …" if len(missing) > 8 else "")
        raise ValueError(f"the checkpoint in {directory} lacks {len(missing)} tensors: {shown}")
