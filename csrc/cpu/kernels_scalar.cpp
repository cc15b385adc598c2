// Baseline x86-64 build of the portable kernels (SSE2 at most): runs on any x86-64.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

#define RPTQ_NS scalar
#include "generic.inc"

namespace rptq_cpu {
void fill_scalar(KernelTable* t) {
  scalar::fill_generic(t);
  t->isa = "scalar";
}
}  // namespace rptq_cpu
