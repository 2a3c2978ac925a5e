"""``AutoModelForCausalLM.from_pretrained(path, ep_size=N)``: load straight into the EP layout.

The model is built on the meta device, its experts are sharded (still on meta), and only then
is storage allocated and filled from the safetensors files: the dense weights everywhere and
each rank's own experts, so no rank ever holds all experts. Then FSDP2 (when dp > 1) and the
gradient hooks, exactly as :func:`turbomoe.parallel.parallelize` does for a built model.
Without torch.distributed and with ep_size = 1 this is transformers' own ``from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from turbomoe.parallel.loading import load_checkpoint, materialize
from turbomoe.parallel.mesh import build_mesh, init_distributed
from turbomoe.parallel.shard import finish, shard_experts, sharded_expert_params

# from_pretrained keyword arguments that go to the model constructor rather than the config.
_MODEL_KWARGS = ("attn_implementation", "experts_implementation")


def _resolve(path: str | os.PathLike[str]) -> Path:
    local = Path(path)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"]))


def _default_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _unmark_modules(model: nn.Module) -> None:
    # initialize_weights skips modules flagged as initialised; the meta build may have flagged
    # them all. Per-tensor flags (set by the loader) still protect the loaded weights.
    for module in model.modules():
        if "_is_hf_initialized" in module.__dict__:
            del module.__dict__["_is_hf_initialized"]


class AutoModelForCausalLM:
    """transformers' ``AutoModelForCausalLM`` with expert parallelism (``ep_size``)."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        ep_size: int = 1,
        mesh: DeviceMesh | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        fsdp: bool | None = None,
        mp_policy: Any = None,
        reshard_after_forward: bool = True,
        grad_sync: Literal["auto", "manual"] = "auto",
        attention_graphs: bool = False,
        **kwargs: Any,
    ) -> nn.Module:
        """Load a causal LM with its experts sharded over ``ep_size`` ranks.

        Collective: every rank calls it (under torchrun; the process group is created from the
        environment if needed). ``dtype`` defaults to the checkpoint's ``config.dtype``;
        ``device`` to this rank's CUDA device under NCCL, else the CPU. Other keyword arguments
        go to ``AutoConfig.from_pretrained`` (``attn_implementation`` and
        ``experts_implementation`` to the model); ``attention_graphs`` as in
        :func:`~turbomoe.parallel.parallelize`. The model is returned in eval mode, like
        transformers does.
        """
        from transformers import AutoConfig
        from transformers import AutoModelForCausalLM as HFAuto

        distributed = dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1
        if ep_size == 1 and not distributed:
            return HFAuto.from_pretrained(pretrained_model_name_or_path, dtype=dtype, **kwargs)
        if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
            raise ValueError(
                f"ep_size={ep_size} needs torch.distributed: launch with torchrun "
                f"(e.g. torchrun --nproc-per-node {ep_size} train.py) or call "
                "torch.distributed.init_process_group first"
            )
        init_distributed()
        mesh = build_mesh(ep_size, mesh)
        directory = _resolve(pretrained_model_name_or_path)
        model_kwargs = {k: kwargs.pop(k) for k in _MODEL_KWARGS if k in kwargs}
        config = AutoConfig.from_pretrained(directory, **kwargs)
        if dtype is None:
            config_dtype = getattr(config, "dtype", None)
            dtype = config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32
        with torch.device("meta"):
            model = HFAuto.from_config(config, dtype=dtype, **model_kwargs)
        if ep_size > 1:
            shard_experts(model, mesh)
        materialize(model, torch.device(device) if device is not None else _default_device())
        load_checkpoint(model, directory)
        model.tie_weights()
        _unmark_modules(model)
        model.initialize_weights()  # non-persistent buffers (RoPE tables); loaded tensors kept
        _load_generation_config(model, directory)
        model.eval()
        finish(
            model,
            mesh,
            sharded_expert_params(model),
            fsdp=fsdp,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
            grad_sync=grad_sync,
            attention_graphs=attention_graphs,
        )
        return model

    @classmethod
    def from_config(cls, config: Any, *, ep_size: int = 1, **kwargs: Any) -> nn.Module:
        """transformers' ``from_config``, then :func:`parallelize` when distributed."""
        from transformers import AutoModelForCausalLM as HFAuto

        from turbomoe.parallel.shard import parallelize

        model = HFAuto.from_config(config, **kwargs)
        if ep_size == 1 and not dist.is_initialized():
            return model
        return parallelize(model, ep_size)


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    if not (directory / "generation_config.json").is_file() or not hasattr(
        model, "generation_config"
    ):
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(directory)
