"""The NVLink transport of the expert-parallel exchange: CUDA IPC peer buffers (tm_peer_*).

Every rank of an expert-parallel group on one node allocates one device buffer in the C++ core;
the ranks swap its CUDA IPC handle once through ``torch.distributed`` and map each other's
buffers. An exchange of equal blocks (block j of rank i goes to rank j, and lands in block i
there) is then four kernels on the current stream and no host synchronisation:

    barrier → push (each rank writes its blocks straight into the peers' buffers) → barrier →
    copy of the own buffer into a fresh tensor

The push occupies ``ctas`` thread blocks (``TURBOMOE_EP_NVLINK_CTAS``, default 16; one SM each),
so the SMs left keep computing. The barrier counts on the device, so a captured graph replays it
in step; a peer that does not arrive within ``TURBOMOE_EP_PEER_TIMEOUT_S`` seconds makes the
barrier print which rank it waited for and trap: the step fails with a CUDA error instead of
hanging.

The buffer grows (collectively, with a device synchronisation and a group barrier) only when an
exchange needs more than it holds: in the first forward, never in the steady state; each growth
takes at least half again the old size (``grown_size``).
"""

from __future__ import annotations

import ctypes
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from turbomoe import _native
from turbomoe.parallel.knobs import env_int

HANDLE_BYTES = 64  # TM_PEER_HANDLE_BYTES
MAX_RANKS = 8  # TM_PEER_MAX_RANKS
COPY_ALIGN = 16  # the push copies 16-byte vectors

DEFAULT_CTAS = 16
DEFAULT_TIMEOUT_S = 300.0


def configured_ctas() -> int:
    """Thread blocks (SMs) each push may occupy."""
    return env_int("TURBOMOE_EP_NVLINK_CTAS", DEFAULT_CTAS, 1, 1024)


def configured_timeout_s() -> float:
    text = os.environ.get("TURBOMOE_EP_PEER_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"TURBOMOE_EP_PEER_TIMEOUT_S={text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"TURBOMOE_EP_PEER_TIMEOUT_S={text!r} must be positive")
    return value


class _DeviceBytes:
    """A device byte range as a CUDA array, so that ``torch.as_tensor`` views it in place."""

    def __init__(self, pointer: int, size: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (pointer, False),
            "version": 2,
        }


def peer_reachability(group: ProcessGroup) -> str | None:
    """Why this group cannot use the NVLink transport, or None when it can; the same answer on
    every rank (a collective: one ``all_gather_object``)."""
    device = torch.cuda.current_device()
    here = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, here, group=group)
    if len(everyone) > MAX_RANKS:
        return f"{len(everyone)} ranks exceed the {MAX_RANKS} of one NVLink node"
    hosts = {host for host, _ in everyone}
    if len(hosts) > 1:
        return f"the group spans {len(hosts)} hosts"
    visible = {
        str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())
    }
    problems = []
    for rank, (_, uuid) in enumerate(everyone):
        other = visible.get(uuid)
        if other is None:
            problems.append(f"rank {rank}'s GPU is not visible here")
        elif other != device and not torch.cuda.can_device_access_peer(device, other):
            problems.append(f"no peer access to rank {rank}'s GPU")
    verdicts: list[Any] = [None] * len(everyone)
    dist.all_gather_object(verdicts, "; ".join(problems), group=group)
    failed = [f"rank {r}: {v}" for r, v in enumerate(verdicts) if v]
    return "; ".join(failed) if failed else None


GROWTH_ALIGN = 2 << 20  # buffers grow in whole 2 MiB steps


def grown_size(needed: int, current: int) -> int:
    """The data-region size to allocate when ``needed`` bytes do not fit in ``current``: at
    least half again the old size, so that a capacity creeping up step by step (batches of
    varying length) costs a logarithmic number of regrowths, each a collective with a device
    synchronisation, not one per new maximum. Every rank computes the same size."""
    size = max(needed, current + current // 2)
    return -(-size // GROWTH_ALIGN) * GROWTH_ALIGN


class PeerExchange:
    """Equal-block all-to-all over NVLink for one process group (every rank builds one)."""

    def __init__(self, group: ProcessGroup, ctas: int | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.world > MAX_RANKS:
            raise ValueError(f"the NVLink exchange covers at most {MAX_RANKS} ranks")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.ctas = configured_ctas() if ctas is None else ctas
        self.timeout_s = configured_timeout_s()
        self._comm: int | None = None
        self._bytes = 0
        self._data: torch.Tensor | None = None

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:  # interpreter shutdown: the library or CUDA may already be gone
            pass

    def _release(self) -> None:
        if self._comm is not None:
            self._data = None
            _native.lib().tm_peer_comm_destroy(ctypes.c_void_p(self._comm))
            self._comm = None
            self._bytes = 0

    def close(self) -> None:
        """Frees the buffers of every rank (a collective: the ranks must call it together)."""
        if self._comm is not None:
            torch.cuda.synchronize(self.device)
            dist.barrier(group=self.group, device_ids=[self.device.index])
            self._release()

    def _ensure(self, nbytes: int) -> None:
        if self._comm is not None and nbytes <= self._bytes:
            return
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"the NVLink exchange needs a {nbytes}-byte buffer (it has {self._bytes}) while a "
                "CUDA graph is being captured; run one step eagerly first"
            )
        size = grown_size(nbytes, self._bytes)
        self.close()  # no rank writes into the old buffers any more
        comm = ctypes.c_void_p()
        _native.call(
            "tm_peer_comm_create",
            self.device.index,
            self.rank,
            self.world,
            size,
            ctypes.byref(comm),
        )
        assert comm.value is not None
        self._comm = comm.value
        mine = (ctypes.c_uint8 * HANDLE_BYTES)()
        _native.call("tm_peer_comm_export", self._comm, mine)
        local = torch.tensor(list(mine), dtype=torch.uint8, device=self.device)
        gathered = torch.empty(self.world * HANDLE_BYTES, dtype=torch.uint8, device=self.device)
        dist.all_gather_into_tensor(gathered, local, group=self.group)
        handles = bytes(gathered.cpu().tolist())
        _native.call("tm_peer_comm_connect", self._comm, handles)
        data, size = ctypes.c_void_p(), ctypes.c_size_t()
        _native.call("tm_peer_comm_data", self._comm, ctypes.byref(data), ctypes.byref(size))
        assert data.value is not None
        self._bytes = size.value
        self._data = torch.as_tensor(_DeviceBytes(data.value, size.value), device=self.device)

    def fits(self, x: torch.Tensor, block_rows: int) -> bool:
        """Whether the push can carry x: a CUDA tensor of a dtype the C ABI describes, with
        blocks of a multiple of 16 bytes (else the caller uses another transport)."""
        block_bytes = block_rows * (x.numel() // max(x.shape[0], 1)) * x.element_size()
        return x.is_cuda and x.dtype in _native.DTYPE_CODES and block_bytes % COPY_ALIGN == 0

    def exchange(self, x: torch.Tensor, block_rows: int) -> torch.Tensor:
        """x [world · block_rows, ...]: block j → rank j; returns block i from each rank i."""
        if x.shape[0] != self.world * block_rows:
            raise ValueError(
                f"x has {x.shape[0]} rows; the exchange needs world · block_rows = "
                f"{self.world} · {block_rows}"
            )
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        if nbytes == 0:
            return torch.empty_like(x)
        received = self.send(x, block_rows)
        # A copy: the buffer is overwritten by the next exchange, the result may live longer.
        return received.view(x.dtype).view(x.shape).clone()

    def send(self, x: torch.Tensor, block_rows: int, ctas: int | None = None) -> torch.Tensor:
        """The transfer alone: x's blocks land in the peers' buffers; returns this rank's buffer
        bytes as they hold the received blocks, valid until the next exchange. x contiguous."""
        nbytes = x.numel() * x.element_size()
        self._ensure(nbytes)
        assert self._data is not None
        stream = _native.stream_for(x)
        rows = x.view(x.shape[0], -1)
        push_ctas = self.ctas if ctas is None else ctas
        _native.call("tm_peer_barrier", self._comm, self.timeout_s, stream)
        _native.call(
            "tm_peer_push", self._comm, _native.describe(rows), block_rows, 0, push_ctas, stream
        )
        _native.call("tm_peer_barrier", self._comm, self.timeout_s, stream)
        return self._data[:nbytes]
