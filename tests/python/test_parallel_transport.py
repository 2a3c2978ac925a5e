"""The choice of the expert-parallel exchange's transport, on CPU: a one-rank gloo group in this
process. The NVLink path itself runs on GPUs (tests/python/gpu/test_gpu_peer.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from turbomoe.parallel import comm, nvlink


@pytest.fixture
def group(tmp_path: Path) -> Iterator[dist.ProcessGroup]:
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        comm._chosen.clear()
        dist.destroy_process_group()


def test_gloo_uses_all_to_all(group: dist.ProcessGroup) -> None:
    assert comm.peer_exchange(group) is None
    x = torch.randn(6, 3, requires_grad=True)
    y = comm.exchange_blocks(x, 6, group)
    assert torch.equal(y, x)  # one rank: its only block comes back
    (y * torch.arange(3.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(3.0).expand(6, 3))


def test_nvlink_asked_for_on_gloo_is_an_error(group: dist.ProcessGroup) -> None:
    with pytest.raises(ValueError, match=r"nvlink transport was asked for.*gloo"):
        comm.set_transport(group, "nvlink")


def test_unknown_transport_is_an_error(group: dist.ProcessGroup, monkeypatch) -> None:
    monkeypatch.setenv("TURBOMOE_EP_TRANSPORT", "infiniband")
    with pytest.raises(ValueError, match="TURBOMOE_EP_TRANSPORT='infiniband'"):
        comm.peer_exchange(group)


def test_transport_choice_is_kept_per_group(group: dist.ProcessGroup, monkeypatch) -> None:
    assert comm.set_transport(group, "nccl") is None
    monkeypatch.setenv("TURBOMOE_EP_TRANSPORT", "nvlink")
    assert comm.peer_exchange(group) is None  # decided once; the environment is not re-read


@pytest.mark.parametrize("value", ["0", "2000", "many"])
def test_bad_sm_budget_is_an_error(monkeypatch, value: str) -> None:
    monkeypatch.setenv("TURBOMOE_EP_NVLINK_CTAS", value)
    with pytest.raises(ValueError, match="TURBOMOE_EP_NVLINK_CTAS"):
        nvlink.configured_ctas()


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_timeout_is_an_error(monkeypatch, value: str) -> None:
    monkeypatch.setenv("TURBOMOE_EP_PEER_TIMEOUT_S", value)
    with pytest.raises(ValueError, match="TURBOMOE_EP_PEER_TIMEOUT_S"):
        nvlink.configured_timeout_s()


def test_defaults(monkeypatch) -> None:
    monkeypatch.delenv("TURBOMOE_EP_NVLINK_CTAS", raising=False)
    monkeypatch.delenv("TURBOMOE_EP_PEER_TIMEOUT_S", raising=False)
    assert nvlink.configured_ctas() == nvlink.DEFAULT_CTAS == 16
    assert nvlink.configured_timeout_s() == nvlink.DEFAULT_TIMEOUT_S


def test_one_choice_per_group_whatever_the_handle(group: dist.ProcessGroup) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "ep"))
    comm.peer_exchange(mesh.get_group("ep"))
    comm.peer_exchange(mesh.get_group("ep"))
    comm.peer_exchange(group)
    # A one-rank mesh's ep group is the default group under another handle: one decision.
    assert len(comm._chosen) == 1


def test_peer_buffers_grow_geometrically_in_whole_steps() -> None:
    from turbomoe.parallel.nvlink import GROWTH_ALIGN, grown_size

    assert grown_size(1, 0) == GROWTH_ALIGN  # the first buffer: one step
    assert grown_size(100 << 20, 0) == 100 << 20
    assert grown_size(65 << 20, 64 << 20) == 96 << 20  # a small overflow: half again
    assert grown_size(300 << 20, 64 << 20) == 300 << 20  # a large one: what is needed
    assert grown_size((96 << 20) + 1, 64 << 20) == 98 << 20  # rounded up to a whole step
    sizes, size = [], 0
    for needed in range(1 << 20, 400 << 20, 1 << 20):  # a maximum creeping up by 1 MiB
        if needed > size:
            size = grown_size(needed, size)
            sizes.append(size)
    assert len(sizes) <= 14  # ~log_1.5(400 MiB / 2 MiB), not one per new maximum (399)
