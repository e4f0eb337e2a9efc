// Thin torch binding for the kernels in csrc/: checks, allocation, stream; the kernels themselves take raw pointers.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

namespace moekern {
extern "C" cudaError_t moekern_align_block_size(const int32_t*, int32_t, int32_t, int32_t, int32_t*, int32_t*,
                                                int32_t*, int32_t, cudaStream_t);
}

// Returns (sorted_pairs, block_expert, num_padded) as moekern.ops.reference.align_block_size does.
std::vector<torch::Tensor> align_block_size(torch::Tensor expert_of_pair, int64_t num_experts, int64_t block_m) {
  TORCH_CHECK(expert_of_pair.is_cuda(), "expert_of_pair must be a CUDA tensor");
  TORCH_CHECK(expert_of_pair.scalar_type() == torch::kInt32, "expert_of_pair must be int32");
  TORCH_CHECK(num_experts > 0 && num_experts <= 1024, "num_experts must be in 1..1024, got ", num_experts);
  TORCH_CHECK(block_m > 0, "block_m must be positive, got ", block_m);
  auto pairs = expert_of_pair.contiguous().view(-1);
  const int64_t n = pairs.numel();
  const int64_t max_padded = (n + num_experts * (block_m - 1) + block_m - 1) / block_m * block_m;
  auto opts = pairs.options();
  auto sorted_pairs = torch::empty({std::max<int64_t>(max_padded, block_m)}, opts);
  auto block_expert = torch::empty({sorted_pairs.numel() / block_m}, opts);
  auto num_padded = torch::empty({1}, opts);
  auto err = moekern::moekern_align_block_size(pairs.data_ptr<int32_t>(), n, num_experts, block_m,
                                               sorted_pairs.data_ptr<int32_t>(), block_expert.data_ptr<int32_t>(),
                                               num_padded.data_ptr<int32_t>(), sorted_pairs.numel(),
                                               c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "align_block_size launch failed: ", cudaGetErrorString(err));
  return {sorted_pairs, block_expert, num_padded};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("align_block_size", &align_block_size, "sort routed pairs by expert, padded to block_m");
}
