// The compiled instantiations, as listed by generate.py in registry.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "flash_api.h"

namespace flash {

template <int D, typename T>
int run_fwd(const FlashAttnParams &p, cudaStream_t stream);
template <int D, typename T>
int run_bwd(const FlashAttnParams &p, cudaStream_t stream);

using LaunchFn = int (*)(const FlashAttnParams &, cudaStream_t);
struct KernelEntry {
  int head_dim, dtype, direction;
  LaunchFn fn;
};
extern const KernelEntry kKernelTable[];  // ends with fn == nullptr
extern const char *const kBuildInfo;

}  // namespace flash
