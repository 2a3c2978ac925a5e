// Library identity: ABI version, version string and build description.
#include <string>

#include "common/device.h"
#include "turbomoe/turbomoe.h"

#ifndef TM_VERSION
#define TM_VERSION "0.0.0"
#endif
#ifndef TM_CUDA_ARCHS
#define TM_CUDA_ARCHS "none"
#endif

extern "C" {

int32_t tm_abi_version(void) { return TM_ABI_VERSION; }

const char* tm_version_string(void) { return TM_VERSION; }

int32_t tm_built_with_cuda(void) { return turbomoe::kBuiltWithCuda ? 1 : 0; }

const char* tm_build_info(void) {
  static const std::string info =
      std::string("turbomoe ") + TM_VERSION + "; compiler " + __VERSION__ + "; cuda " +
      (turbomoe::kBuiltWithCuda ? "yes" : "no") + "; archs " + TM_CUDA_ARCHS;
  return info.c_str();
}

}  // extern "C"
