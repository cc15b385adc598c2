// The portable kernels compiled for AVX2 + FMA (GCC vectorizes their inner loops).
// Only headers without AVX2-specific inline code come before the target pragma.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#define RPTQ_NS avx2
#include "generic.inc"
#pragma GCC pop_options

namespace rptq_cpu {
void fill_avx2(KernelTable* t) {
  avx2::fill_generic(t);
  t->isa = "avx2";
}
}  // namespace rptq_cpu
