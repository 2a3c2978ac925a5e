"""Expert parallelism (+ FSDP2 for the dense part) on a ("dp", "ep") DeviceMesh.

- :func:`parallelize` shards a built model's experts over ep (rank r owns experts
  [r·E/ep, (r+1)·E/ep)), replicates them over dp, and FSDP-shards the dense parameters when
  dp > 1 (else keeps them replicated with averaged gradients).
- :class:`AutoModelForCausalLM` ``.from_pretrained(path, ep_size=N)`` loads each rank's experts
  straight from the safetensors files.
- :func:`ep_experts_forward` is the MoE experts forward over ``torch.distributed`` all-to-alls
  (gloo or NCCL); sharded experts modules carry their :class:`ExpertShard` as ``_turbomoe_ep``.
- :func:`sync_grads` reduces gradients (automatic by default), :func:`clip_grad_norm_` clips by
  the norm of the full gradient; :func:`save_pretrained` writes the
  full standard HF checkpoint (``model.save_pretrained`` does the same on a parallelized model).
- :func:`split_param_groups` gives a fused/foreach optimizer its parameters with FSDP's DTensors
  and the plain expert shards in separate groups (torch rejects a group that mixes them).
- :func:`balance_experts` / :func:`place_experts` place experts on ranks by load instead of in
  contiguous blocks (:mod:`turbomoe.parallel.placement`), before training starts.

A peer that dies or never arrives turns into an error after the process group's timeout
(``init_process_group(timeout=...)``, or :func:`init_distributed`'s ``timeout_s``), not a hang.
"""

from turbomoe.parallel.auto import AutoModelForCausalLM
from turbomoe.parallel.checkpoint import full_state_dict, save_pretrained
from turbomoe.parallel.dispatch import ep_experts_forward, expert_shard
from turbomoe.parallel.grads import clip_grad_norm_, sync_dense_grads, sync_grads
from turbomoe.parallel.mesh import EP_ATTR, ExpertShard, build_mesh, init_distributed
from turbomoe.parallel.optim_groups import split_param_groups
from turbomoe.parallel.placement import balance_experts, place_experts, plan_placement
from turbomoe.parallel.shard import find_experts, is_parallelized, parallelize

__all__ = [
    "EP_ATTR",
    "AutoModelForCausalLM",
    "ExpertShard",
    "balance_experts",
    "build_mesh",
    "clip_grad_norm_",
    "ep_experts_forward",
    "expert_shard",
    "find_experts",
    "full_state_dict",
    "init_distributed",
    "is_parallelized",
    "parallelize",
    "place_experts",
    "plan_placement",
    "save_pretrained",
    "split_param_groups",
    "sync_dense_grads",
    "sync_grads",
]
