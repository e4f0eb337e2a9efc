// kernels_impl.h built for the baseline of the target (x86-64: SSE2; any other CPU: its default): the variant of a
// CPU without AVX2, and the oracle-shaped scalar code the vector variants are tested against.
#include <cstdint>

#include "kernels.h"

namespace moekern_cpu {
namespace portable {
#define MOEKERN_ISA_LEVEL 0
#define MOEKERN_ISA_NAME "portable"
#include "kernels_impl.h"
}  // namespace portable
}  // namespace moekern_cpu

const moekern_cpu::Kernels* moekern_cpu::kernels_portable() { return &portable::kKernels; }
