// Reading routed expert ids on the CPU, shared by every op that takes a [T, K] topk_ids tensor.
#pragma once

#include <cstdint>
#include <string>

#include "common/tensor.h"

namespace turbomoe {

// topk_ids[t, k] as int64 (any strides), unchecked.
template <typename Id>
int64_t expert_id(const Arg& ids, int64_t t, int64_t k) {
  return ids.ptr<const Id>()[t * ids.stride(0) + k * ids.stride(1)];
}

// topk_ids[t, k] as int64, rejected unless in [0, experts]: `experts` itself is the sentinel of
// a dropped slot (Hugging Face's expert-parallel contract), anything else is a caller bug.
template <typename Id>
int64_t checked_expert_id(const Arg& ids, int64_t t, int64_t k, int64_t experts) {
  const int64_t e = expert_id<Id>(ids, t, k);
  if (e < 0 || e > experts) {
    invalid(std::string(ids.name()) + "[" + std::to_string(t) + ", " + std::to_string(k) + "] is " +
            std::to_string(e) + ", outside [0, " + std::to_string(experts) + "] (" +
            std::to_string(experts) + " marks a dropped slot)");
  }
  return e;
}

}  // namespace turbomoe
