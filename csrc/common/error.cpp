#include "common/error.h"

namespace turbomoe {
namespace {
thread_local std::string g_last_error;
}  // namespace

void set_last_error(const std::string& message) { g_last_error = message; }
void clear_last_error() { g_last_error.clear(); }

}  // namespace turbomoe

extern "C" const char* tm_last_error(void) { return turbomoe::g_last_error.c_str(); }
