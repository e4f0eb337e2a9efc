// kernels_impl.h built for AVX-512 (F, BW, VL, DQ, VNNI; the BF16 inner product on its own functions, called only
// where the CPU has AVX512_BF16). Chosen at run time by ops.cpp from the CPU's flags.
#include <immintrin.h>
#include <cstdint>

#include "kernels.h"

// Everything below is compiled for this target, whatever -m flags the build gives every file (one source, several
// variants, in a build that cannot give files their own flags).
#if defined(__clang__)
#pragma clang attribute push(                                                                             \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt")
#endif
namespace moekern_cpu {
namespace avx512 {
#define MOEKERN_ISA_LEVEL 3
#define MOEKERN_ISA_NAME "avx512"
#include "kernels_impl.h"
}  // namespace avx512
}  // namespace moekern_cpu
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const moekern_cpu::Kernels* moekern_cpu::kernels_avx512() { return &avx512::kKernels; }
