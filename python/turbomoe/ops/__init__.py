"""turbomoe's torch custom ops (``torch.ops.turbomoe.*``), each with autograd and a fake
implementation so they appear by name in the profiler and trace under ``torch.compile``; and the
in-place optimizer step ``adamw_step_`` (no autograd)."""

from turbomoe.ops.activation import clamped_swiglu, silu_mul, swiglu
from turbomoe.ops.adamw import adamw_step_, adamw_step_reason
from turbomoe.ops.ep_layout import SendPlan, ep_layout, ep_send_plan
from turbomoe.ops.gated import gated
from turbomoe.ops.gated_gemm import grouped_gemm_gated
from turbomoe.ops.grouped_gemm import grouped_gemm
from turbomoe.ops.loss import cross_entropy, linear_cross_entropy
from turbomoe.ops.loss_total import linear_cross_entropy_total
from turbomoe.ops.moe import moe_experts
from turbomoe.ops.norm import rms_norm
from turbomoe.ops.permute import combine, gather_rows, permute_plan
from turbomoe.ops.qk_norm_rope import qk_norm_rope
from turbomoe.ops.residual_norm import add_rms_norm, rms_norm_keep_input
from turbomoe.ops.rope import apply_rope
from turbomoe.ops.routing import route
from turbomoe.ops.shared_input import shared_input_linears

__all__ = [
    "SendPlan",
    "adamw_step_",
    "adamw_step_reason",
    "add_rms_norm",
    "apply_rope",
    "clamped_swiglu",
    "combine",
    "cross_entropy",
    "ep_layout",
    "ep_send_plan",
    "gated",
    "gather_rows",
    "grouped_gemm",
    "grouped_gemm_gated",
    "linear_cross_entropy",
    "linear_cross_entropy_total",
    "moe_experts",
    "permute_plan",
    "qk_norm_rope",
    "rms_norm",
    "rms_norm_keep_input",
    "route",
    "shared_input_linears",
    "silu_mul",
    "swiglu",
]
