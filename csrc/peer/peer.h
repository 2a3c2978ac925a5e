// The NVLink peer exchange (tm_peer_*): the buffer layout and the argument checks, shared by the C
// ABI and its tests, and the CUDA object behind tm_peer_comm.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "common/error.h"
#include "turbomoe/turbomoe.h"

namespace turbomoe::peer {

// One allocation per rank: the flags the peers write (one 8-byte slot per source rank), then this
// rank's own barrier count, then the data region.
inline constexpr size_t kFlagsOffset = 0;
inline constexpr size_t kEpochOffset = 256;
inline constexpr size_t kDataOffset = 512;
inline constexpr size_t kDataAlign = 256;
inline constexpr size_t kCopyAlign = 16;  // the push copies 16-byte vectors
static_assert(TM_PEER_MAX_RANKS * sizeof(uint64_t) <= kEpochOffset - kFlagsOffset);

inline size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Bytes of one rank's allocation for a data region of (at least) data_bytes.
inline size_t allocation_bytes(size_t data_bytes) {
  return kDataOffset + round_up(data_bytes, kDataAlign);
}

inline void check_shape(int32_t device, int32_t rank, int32_t world, size_t data_bytes) {
  if (device < 0) invalid("device " + std::to_string(device) + " must be >= 0");
  if (world < 1 || world > TM_PEER_MAX_RANKS) {
    invalid("world " + std::to_string(world) + " must be in [1, " +
            std::to_string(TM_PEER_MAX_RANKS) + "]");
  }
  if (rank < 0 || rank >= world) {
    invalid("rank " + std::to_string(rank) + " must be in [0, " + std::to_string(world) + ")");
  }
  if (data_bytes == 0) invalid("data_bytes must be positive");
}

// block_bytes of one push, after checking that its blocks fit the data region.
inline size_t check_push(int32_t world, size_t data_bytes, int64_t rows, int64_t row_bytes,
                         int64_t block_rows, size_t offset, int32_t ctas) {
  if (block_rows < 0 || rows != block_rows * world) {
    invalid("src has " + std::to_string(rows) + " rows; expected world * block_rows = " +
            std::to_string(world) + " * " + std::to_string(block_rows));
  }
  if (ctas < 1 || ctas > 1024) invalid("ctas " + std::to_string(ctas) + " must be in [1, 1024]");
  const size_t block_bytes = static_cast<size_t>(block_rows) * static_cast<size_t>(row_bytes);
  if (offset % kCopyAlign != 0 || block_bytes % kCopyAlign != 0) {
    invalid("offset " + std::to_string(offset) + " and block bytes " + std::to_string(block_bytes) +
            " must be multiples of " + std::to_string(kCopyAlign));
  }
  const size_t total = block_bytes * static_cast<size_t>(world);
  if (offset > data_bytes || total > data_bytes - offset) {
    invalid("offset " + std::to_string(offset) + " + " + std::to_string(world) + " blocks of " +
            std::to_string(block_bytes) + " bytes exceed the data region of " +
            std::to_string(data_bytes) + " bytes");
  }
  return block_bytes;
}

// The CUDA side: owns the allocation and the peers' mappings. Defined in peer_cuda.cu.
class Comm {
 public:
  Comm(int32_t device, int32_t rank, int32_t world, size_t data_bytes);
  ~Comm();
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  void export_handle(void* handle) const;
  void connect(const void* handles);
  void barrier(double timeout_s, void* stream);
  void push(const void* src, size_t block_bytes, size_t offset, int32_t ctas, void* stream);

  int32_t device() const { return device_; }
  int32_t world() const { return world_; }
  size_t data_bytes() const { return data_bytes_; }
  void* data() const;

 private:
  int32_t device_, rank_, world_;
  size_t data_bytes_;
  void* base_ = nullptr;                          // this rank's allocation
  std::array<void*, TM_PEER_MAX_RANKS> peers_{};  // every rank's allocation as mapped here
  bool connected_ = false;
};

}  // namespace turbomoe::peer

// The C handle is the C++ object.
struct tm_peer_comm {
  std::unique_ptr<turbomoe::peer::Comm> comm;
};
