// The peer exchange in a build without CUDA: tm_peer_comm_create refuses before constructing a
// Comm, so these definitions only keep the library linkable.
#ifndef TM_WITH_CUDA
#include "peer/peer.h"

namespace turbomoe::peer {

Comm::Comm(int32_t device, int32_t rank, int32_t world, size_t data_bytes)
    : device_(device), rank_(rank), world_(world), data_bytes_(data_bytes) {
  unsupported("the NVLink peer exchange needs a libturbomoe built with CUDA");
}
Comm::~Comm() = default;
void Comm::export_handle(void*) const { unsupported("built without CUDA"); }
void Comm::connect(const void*) { unsupported("built without CUDA"); }
void Comm::barrier(double, void*) { unsupported("built without CUDA"); }
void Comm::push(const void*, size_t, size_t, int32_t, void*) { unsupported("built without CUDA"); }
void* Comm::data() const { return nullptr; }

}  // namespace turbomoe::peer
#endif
