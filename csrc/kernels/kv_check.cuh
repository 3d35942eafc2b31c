// The index check of a KV-cache forward on the device (flash_api.h, flash_attn_kv_check):
// one CTA reads every index value the call uses and writes its verdict to a device flag,
// which the call's kernels read first (call_aborted, tile.cuh: nonzero, they return
// before writing anything), and to host memory, which the caller waits on. The caller so
// launches the whole call before it knows the values, instead of waiting for them (a
// device sync) and then launching. The check goes out as a programmatic dependent launch
// (where the device takes them) and lets the call's first kernel, itself one, be placed
// as it starts: that kernel's CTAs wait in call_aborted until the check has finished, so
// neither launch leaves the GPU idle. Included by dispatch.cu alone.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "flash_api.h"
#include "tile.cuh"

namespace flash {

// Entry b's keys as the forward reads them.
__device__ __forceinline__ int64_t checked_keys(const FlashAttnParams &p, int b) {
  if (p.seqused_k != nullptr) return int64_t(p.seqused_k[b]) + p.seqused_k_add;
  if (p.cu_seqlens_k != nullptr) return int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b];
  return p.seqlen_k;
}

constexpr int kCheckThreads = 512;

__global__ void __launch_bounds__(kCheckThreads) kv_check_kernel(const FlashAttnParams p,
                                                                 const FlashKvCheck c) {
  __shared__ int verdict;
  wait_prior_grid();   // it may have written the index values (a dependent launch)
  allow_dependents();  // the call's kernels may be placed now; they wait for this grid
  if (threadIdx.x == 0) verdict = 0;
  __syncthreads();
  int bad = 0;
  for (int b = threadIdx.x; b < p.batch; b += blockDim.x) {
    const int64_t keys = checked_keys(p, b);
    if (keys < c.min_keys || keys > c.max_keys) bad |= FLASH_KV_BAD_KEYS;
    if (p.kv_batch_idx != nullptr && (p.kv_batch_idx[b] < 0 || p.kv_batch_idx[b] >= c.cache_rows))
      bad |= FLASH_KV_BAD_ROW;
    if (p.leftpad_k != nullptr && (p.leftpad_k[b] < 0 || p.leftpad_k[b] > keys)) bad |= FLASH_KV_BAD_LEFTPAD;
  }
  if (p.block_table != nullptr) {
    // the pages of the keys each entry uses (its keys clamped to the table: a count past
    // it is refused above); entries past them may hold anything (-1, as transformers pads)
    const int columns = p.seqlen_k / p.page_size;
    const int64_t entries = int64_t(p.batch) * columns;
    for (int64_t i = threadIdx.x; i < entries; i += blockDim.x) {
      const int b = int(i / columns), j = int(i % columns);
      const int64_t keys = checked_keys(p, b);
      if (int64_t(j) * p.page_size >= keys) continue;
      const int page = p.block_table[b * p.block_table_batch_stride + j];
      if (page < 0 || page >= c.cache_rows) bad |= FLASH_KV_BAD_PAGE;
    }
  }
  if (bad != 0) atomicOr(&verdict, bad);
  __syncthreads();
  if (threadIdx.x == 0) {
    *c.flag = verdict;
    *c.verdict = verdict;
    __threadfence_system();
  }
}

inline int launch_kv_check(const FlashAttnParams &p, const FlashKvCheck &c, cudaStream_t stream) {
  if (c.flag == nullptr || c.verdict == nullptr || p.batch < 0 || c.min_keys > c.max_keys ||
      (p.block_table != nullptr && p.page_size <= 0))
    return FLASH_ERR_BAD_ARGUMENT;
  FlashKvCheck dc = c;
  void *device_view = nullptr;  // the host int as the device addresses it (the same under UVA)
  cudaError_t e = cudaHostGetDevicePointer(&device_view, const_cast<int *>(c.verdict), 0);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not page-locked mapped memory: the caller's error, not the stream's
    return FLASH_ERR_BAD_ARGUMENT;
  }
  dc.verdict = static_cast<volatile int *>(device_view);
  *c.verdict = -1;
  if (dependent_launches()) {
    e = launch_dependent(kv_check_kernel, dim3(1), kCheckThreads, 0, stream, p, dc);
  } else {
    kv_check_kernel<<<1, kCheckThreads, 0, stream>>>(p, dc);
    e = cudaGetLastError();
  }
  if (e != cudaSuccess) {
    set_cuda_error(e);
    return FLASH_ERR_CUDA;
  }
  return FLASH_OK;
}

// Spins until the check kernel has written *verdict; asks the stream every so often
// whether it failed (then the kernel never will) or finished without writing it.
inline int wait_verdict(const volatile int *verdict, cudaStream_t stream) {
  for (unsigned spin = 0;; ++spin) {
    if (*verdict != -1) return FLASH_OK;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
    if (spin % 256 != 255) continue;
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaErrorNotReady) continue;
    if (*verdict != -1) return FLASH_OK;
    set_cuda_error(e == cudaSuccess ? cudaErrorUnknown : e);  // finished, nothing written: not expected
    return FLASH_ERR_CUDA;
  }
}

}  // namespace flash
