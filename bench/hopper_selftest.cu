// Standalone harness for the Hopper grouped GEMM: a tiny shared library (built by
// scripts/gemm_device.sh, never by CMake) that exposes the internal entry points of
// csrc/grouped_gemm/hopper_gemm.h to bench/grouped_gemm_bench.py through ctypes, so the kernel
// can be checked and timed before the C ABI dispatch calls it.
//
// Each function returns 0 when the kernel ran, 1 when it declined the call (the caller would
// fall back), 2 on an error, whose text is copied into msg.
#include <cstdio>
#include <exception>

#include "common/error.h"
#include "grouped_gemm/grouped_gemm.h"
#include "grouped_gemm/hopper_gemm.h"

// The library's SM margin (grouped_gemm_api.cpp, tm_set_gemm_sm_margin) is not part of this
// harness: the benchmark times the kernels on every SM.
namespace turbomoe::grouped_gemm {
int sm_margin() { return 0; }
}  // namespace turbomoe::grouped_gemm

namespace {

using Entry = bool (*)(const tm_tensor&, const tm_tensor&, const tm_tensor&, const tm_tensor&,
                       void*);

int run(Entry entry, const tm_tensor* a, const tm_tensor* b, const tm_tensor* offsets,
        const tm_tensor* out, void* stream, char* msg, int msg_len) {
  try {
    return entry(*a, *b, *offsets, *out, stream) ? 0 : 1;
  } catch (const std::exception& e) {
    if (msg != nullptr && msg_len > 0)
      std::snprintf(msg, static_cast<size_t>(msg_len), "%s", e.what());
    return 2;
  }
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int hs_forward(const tm_tensor* x, const tm_tensor* w,
                                                      const tm_tensor* offsets, const tm_tensor* y,
                                                      void* stream, char* msg, int msg_len) {
  return run(turbomoe::hopper_grouped_gemm_forward, x, w, offsets, y, stream, msg, msg_len);
}

__attribute__((visibility("default"))) int hs_backward_input(const tm_tensor* dy,
                                                             const tm_tensor* w,
                                                             const tm_tensor* offsets,
                                                             const tm_tensor* dx, void* stream,
                                                             char* msg, int msg_len) {
  return run(turbomoe::hopper_grouped_gemm_backward_input, dy, w, offsets, dx, stream, msg,
             msg_len);
}

__attribute__((visibility("default"))) int hs_backward_weight(const tm_tensor* dy,
                                                              const tm_tensor* x,
                                                              const tm_tensor* offsets,
                                                              const tm_tensor* dw, void* stream,
                                                              char* msg, int msg_len) {
  // Every expert's gradient, zeros included (the _routed entry point's skipping is not timed here).
  const Entry every_expert = [](const tm_tensor& a, const tm_tensor& b, const tm_tensor& o,
                                const tm_tensor& out, void* s) {
    return turbomoe::hopper_grouped_gemm_backward_weight(a, b, o, out, false, s);
  };
  return run(every_expert, dy, x, offsets, dw, stream, msg, msg_len);
}

}  // extern "C"
