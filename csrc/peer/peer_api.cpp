// C ABI of the NVLink peer exchange: argument checks, then the CUDA object (peer_cuda.cu).
#include <memory>
#include <string>

#include "common/device.h"
#include "common/tensor.h"
#include "peer/peer.h"

namespace {

using turbomoe::invalid;

turbomoe::peer::Comm& checked(const tm_peer_comm* comm, const char* what = "comm") {
  if (comm == nullptr || !comm->comm) invalid(std::string(what) + " is NULL");
  return *comm->comm;
}

}  // namespace

extern "C" {

tm_status tm_peer_comm_create(int32_t device, int32_t rank, int32_t world, size_t data_bytes,
                              tm_peer_comm** comm) {
  return turbomoe::guard(__func__, [&] {
    if (comm == nullptr) invalid("comm (the output) is NULL");
    *comm = nullptr;
    turbomoe::peer::check_shape(device, rank, world, data_bytes);
    if (!turbomoe::kBuiltWithCuda) {
      turbomoe::unsupported("the NVLink peer exchange needs a libturbomoe built with CUDA");
    }
    auto made = std::make_unique<tm_peer_comm>();
    made->comm = std::make_unique<turbomoe::peer::Comm>(device, rank, world, data_bytes);
    *comm = made.release();  // owned by the caller until tm_peer_comm_destroy
  });
}

tm_status tm_peer_comm_export(const tm_peer_comm* comm, void* handle) {
  return turbomoe::guard(__func__, [&] {
    const auto& c = checked(comm);
    if (handle == nullptr) invalid("handle is NULL");
    c.export_handle(handle);
  });
}

tm_status tm_peer_comm_connect(tm_peer_comm* comm, const void* handles) {
  return turbomoe::guard(__func__, [&] {
    auto& c = checked(comm);
    if (handles == nullptr) invalid("handles is NULL");
    c.connect(handles);
  });
}

tm_status tm_peer_comm_data(const tm_peer_comm* comm, void** data, size_t* data_bytes) {
  return turbomoe::guard(__func__, [&] {
    const auto& c = checked(comm);
    if (data == nullptr || data_bytes == nullptr) invalid("data and data_bytes must not be NULL");
    *data = c.data();
    *data_bytes = c.data_bytes();
  });
}

tm_status tm_peer_barrier(tm_peer_comm* comm, double timeout_s, void* stream) {
  return turbomoe::guard(__func__, [&] {
    auto& c = checked(comm);
    if (!(timeout_s > 0.0)) invalid("timeout_s must be positive, got " + std::to_string(timeout_s));
    c.barrier(timeout_s, stream);
  });
}

tm_status tm_peer_push(tm_peer_comm* comm, const tm_tensor* src, int64_t block_rows, size_t offset,
                       int32_t ctas, void* stream) {
  return turbomoe::guard(__func__, [&] {
    auto& c = checked(comm);
    const turbomoe::Arg s(src, "src");
    s.ndim_is(2).contiguous();
    if (s.device_type() != TM_DEVICE_CUDA || s.t().device_index != c.device()) {
      invalid("src must live on CUDA device " + std::to_string(c.device()) + ", got " +
              turbomoe::device_name(s.device_type()) + ":" + std::to_string(s.t().device_index));
    }
    const auto row_bytes = static_cast<int64_t>(s.size(1) * turbomoe::dtype_size(s.dtype()));
    const size_t block_bytes = turbomoe::peer::check_push(c.world(), c.data_bytes(), s.size(0),
                                                          row_bytes, block_rows, offset, ctas);
    if (block_bytes == 0) return;
    if (reinterpret_cast<uintptr_t>(s.data()) % turbomoe::peer::kCopyAlign != 0) {
      invalid("src's data must be 16-byte aligned");
    }
    c.push(s.data(), block_bytes, offset, ctas, stream);
  });
}

void tm_peer_comm_destroy(tm_peer_comm* comm) {
  std::unique_ptr<tm_peer_comm> owned(comm);  // frees the buffer and the peers' mappings
}

}  // extern "C"
