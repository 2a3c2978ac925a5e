// The NVLink peer exchange's checks: every argument error of the C ABI (raised before any CUDA
// call, so they hold on a machine without a GPU), the buffer layout, and the push bounds. The
// exchange itself needs several GPUs; tests/python/gpu/test_gpu_peer.py runs it.
#include "peer/peer.h"

#include <cstdint>
#include <string>

#include "common/test_util.h"

namespace {

using turbomoe::Error;
using turbomoe::testing::HostTensor;

TEST(Peer, CreateRejectsBadShapes) {
  tm_peer_comm* comm = reinterpret_cast<tm_peer_comm*>(0x1);
  TM_EXPECT_ERROR(tm_peer_comm_create(0, 0, 0, 1024, &comm), TM_ERR_INVALID_ARGUMENT, "world");
  EXPECT_EQ(comm, nullptr);  // the output is cleared on failure, never left dangling
  TM_EXPECT_ERROR(tm_peer_comm_create(0, 0, TM_PEER_MAX_RANKS + 1, 1024, &comm),
                  TM_ERR_INVALID_ARGUMENT, "world");
  TM_EXPECT_ERROR(tm_peer_comm_create(0, 4, 4, 1024, &comm), TM_ERR_INVALID_ARGUMENT, "rank 4");
  TM_EXPECT_ERROR(tm_peer_comm_create(0, -1, 4, 1024, &comm), TM_ERR_INVALID_ARGUMENT, "rank");
  TM_EXPECT_ERROR(tm_peer_comm_create(-2, 0, 4, 1024, &comm), TM_ERR_INVALID_ARGUMENT, "device");
  TM_EXPECT_ERROR(tm_peer_comm_create(0, 0, 4, 0, &comm), TM_ERR_INVALID_ARGUMENT, "data_bytes");
  TM_EXPECT_ERROR(tm_peer_comm_create(0, 0, 4, 1024, nullptr), TM_ERR_INVALID_ARGUMENT, "comm");
}

// Without a usable GPU creation fails with a clear status and leaves no object behind: in a
// CPU-only build (unsupported) and in a CUDA build on a machine without a GPU (a CUDA error, as
// in CI). On a GPU machine the same call makes a real buffer, which is checked and freed.
TEST(Peer, CreateWithoutAUsableGpuIsAnError) {
  tm_peer_comm* comm = nullptr;
  const tm_status status = tm_peer_comm_create(0, 0, 2, 1024, &comm);
  const std::string message = tm_last_error();
  if (tm_built_with_cuda() == 0) {
    EXPECT_EQ(status, TM_ERR_UNSUPPORTED);
    EXPECT_NE(message.find("CUDA"), std::string::npos) << message;
    EXPECT_EQ(comm, nullptr);
    return;
  }
  if (status == TM_OK) {
    ASSERT_NE(comm, nullptr);
    void* data = nullptr;
    size_t bytes = 0;
    EXPECT_EQ(tm_peer_comm_data(comm, &data, &bytes), TM_OK);
    EXPECT_NE(data, nullptr);
    EXPECT_GE(bytes, 1024u);
    tm_peer_comm_destroy(comm);
    return;
  }
  EXPECT_EQ(status, TM_ERR_CUDA) << message;
  EXPECT_FALSE(message.empty());
  EXPECT_EQ(comm, nullptr);
}

TEST(Peer, NullCommIsAnErrorEverywhere) {
  char handle[TM_PEER_HANDLE_BYTES];
  void* data = nullptr;
  size_t bytes = 0;
  HostTensor src({4, 8}, TM_DTYPE_FLOAT32);
  TM_EXPECT_ERROR(tm_peer_comm_export(nullptr, handle), TM_ERR_INVALID_ARGUMENT, "comm");
  TM_EXPECT_ERROR(tm_peer_comm_connect(nullptr, handle), TM_ERR_INVALID_ARGUMENT, "comm");
  TM_EXPECT_ERROR(tm_peer_comm_data(nullptr, &data, &bytes), TM_ERR_INVALID_ARGUMENT, "comm");
  TM_EXPECT_ERROR(tm_peer_barrier(nullptr, 1.0, nullptr), TM_ERR_INVALID_ARGUMENT, "comm");
  TM_EXPECT_ERROR(tm_peer_push(nullptr, src.desc(), 2, 0, 1, nullptr), TM_ERR_INVALID_ARGUMENT,
                  "comm");
  tm_peer_comm_destroy(nullptr);  // accepted, like free(NULL)
}

TEST(Peer, AllocationLayout) {
  using namespace turbomoe::peer;
  EXPECT_EQ(allocation_bytes(1), kDataOffset + kDataAlign);
  EXPECT_EQ(allocation_bytes(256), kDataOffset + 256);
  EXPECT_EQ(allocation_bytes(257), kDataOffset + 512);
  EXPECT_EQ(kDataOffset % kDataAlign, 0u);
  EXPECT_GE(kEpochOffset, kFlagsOffset + TM_PEER_MAX_RANKS * sizeof(uint64_t));
  EXPECT_GE(kDataOffset, kEpochOffset + sizeof(uint64_t));
}

TEST(Peer, PushBounds) {
  using turbomoe::peer::check_push;
  // 4 ranks, blocks of 3 rows of 64 bytes: 192 bytes each, 768 for the push.
  EXPECT_EQ(check_push(4, 768, 12, 64, 3, 0, 8), 192u);
  EXPECT_EQ(check_push(4, 1024, 12, 64, 3, 256, 8), 192u);
  EXPECT_EQ(check_push(4, 1024, 0, 64, 0, 0, 1), 0u);  // an empty exchange is fine
  auto message = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), TM_ERR_INVALID_ARGUMENT);
      return e.what();
    }
    ADD_FAILURE() << "no error";
    return "";
  };
  EXPECT_NE(message([] { check_push(4, 768, 13, 64, 3, 0, 8); }).find("block_rows"),
            std::string::npos);
  EXPECT_NE(message([] { check_push(4, 768, 12, 64, 3, 16, 8); }).find("exceed"),
            std::string::npos);
  EXPECT_NE(message([] { check_push(4, 1u << 20, 12, 64, 3, 8, 8); }).find("multiples of 16"),
            std::string::npos);
  EXPECT_NE(message([] { check_push(4, 1u << 20, 12, 6, 3, 0, 8); }).find("multiples of 16"),
            std::string::npos);
  EXPECT_NE(message([] { check_push(4, 768, 12, 64, 3, 0, 0); }).find("ctas"), std::string::npos);
  EXPECT_NE(message([] { check_push(4, 768, 12, 64, 3, 0, 1025); }).find("ctas"),
            std::string::npos);
  EXPECT_NE(message([] { check_push(4, 768, 12, 64, 3, 1024, 8); }).find("exceed"),
            std::string::npos);
}

}  // namespace
