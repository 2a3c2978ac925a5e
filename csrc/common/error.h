// Error handling inside the engine: code throws turbomoe::Error; every C entry point runs its body
// through turbomoe::guard, which turns exceptions into a tm_status plus the thread-local message.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include "turbomoe/turbomoe.h"

namespace turbomoe {

class Error : public std::runtime_error {
 public:
  Error(tm_status status, std::string message)
      : std::runtime_error(std::move(message)), status_(status) {}
  tm_status status() const { return status_; }

 private:
  tm_status status_;
};

[[noreturn]] inline void fail(tm_status status, const std::string& message) {
  throw Error(status, message);
}

[[noreturn]] inline void invalid(const std::string& message) {
  throw Error(TM_ERR_INVALID_ARGUMENT, message);
}

[[noreturn]] inline void unsupported(const std::string& message) {
  throw Error(TM_ERR_UNSUPPORTED, message);
}

void set_last_error(const std::string& message);
void clear_last_error();

// Runs body (a callable returning void) and maps what it throws to a status. The function name
// prefixes every message so that a user sees which call failed.
template <typename Body>
tm_status guard(const char* function, Body&& body) noexcept {
  try {
    clear_last_error();
    body();
    return TM_OK;
  } catch (const Error& e) {
    set_last_error(std::string(function) + ": " + e.what());
    return e.status();
  } catch (const std::bad_alloc&) {
    set_last_error(std::string(function) + ": host memory allocation failed");
    return TM_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    set_last_error(std::string(function) + ": internal error: " + e.what());
    return TM_ERR_INTERNAL;
  } catch (...) {
    set_last_error(std::string(function) + ": internal error: unknown exception");
    return TM_ERR_INTERNAL;
  }
}

}  // namespace turbomoe
