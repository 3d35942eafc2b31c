// The C entry points: pick the smallest compiled head-dim bucket that holds
// the request and launch it.
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "append_kv.cuh"
#include "dropout.cuh"
#include "kv_check.cuh"
#include "registry.cuh"
#include "split_plan.h"
#include "tile.cuh"

namespace flash {

namespace {
thread_local std::string last_cuda_error;

const KernelEntry *find_kernel(int head_dim, int dtype, int direction) {
  const KernelEntry *best = nullptr;
  for (const KernelEntry *e = kKernelTable; e->fn != nullptr; ++e) {
    if (e->dtype != dtype || e->direction != direction || e->head_dim < head_dim) continue;
    if (best == nullptr || e->head_dim < best->head_dim) best = e;
  }
  return best;
}

bool valid_shape(const FlashAttnParams *p) {
  return p != nullptr && p->head_dim > 0 && p->head_dim % 8 == 0 && p->nheads_k > 0 &&
         p->nheads % p->nheads_k == 0 &&
         (p->dropout_p == 0.f || (p->dropout_p > 0.f && p->dropout_p < 1.f && p->rng_state != nullptr));
}

int run(const FlashAttnParams *p, void *stream, int direction) {
  if (!valid_shape(p)) return FLASH_ERR_BAD_ARGUMENT;
  // The paged layout and the splits are the split kernel's alone; the backward
  // takes neither, nor the KV-cache fields.
  if (direction == 0 && !p->split_kernel && (p->block_table != nullptr || p->num_splits > 1))
    return FLASH_ERR_BAD_ARGUMENT;
  if (p->dropout_p > 0.f && (p->split_kernel || p->block_table != nullptr || p->seqused_k != nullptr ||
                             p->kv_batch_idx != nullptr || p->leftpad_k != nullptr))
    return FLASH_ERR_BAD_ARGUMENT;  // dropout is for training: no KV cache, no split kernel
  if (direction == 1 && (p->block_table != nullptr || p->seqused_k != nullptr ||
                         p->kv_batch_idx != nullptr || p->leftpad_k != nullptr || p->split_kernel))
    return FLASH_ERR_BAD_ARGUMENT;
  const KernelEntry *e = find_kernel(p->head_dim, p->dtype, direction);
  if (e == nullptr) return FLASH_ERR_NOT_COMPILED;
  return e->fn(*p, static_cast<cudaStream_t>(stream));
}
int plan(FlashAttnParams *p, int64_t *oaccum_floats, int64_t *lse_accum_floats) {
  *oaccum_floats = *lse_accum_floats = 0;
  if (!valid_shape(p) || p->num_splits < 0 || p->num_splits > FLASH_MAX_SPLITS || p->total_q < 0)
    return FLASH_ERR_BAD_ARGUMENT;
  if (p->block_table != nullptr &&
      (p->page_size <= 0 || p->page_size % 16 != 0 || p->kv_batch_idx != nullptr || p->leftpad_k != nullptr))
    return FLASH_ERR_BAD_ARGUMENT;
  const KernelEntry *e = find_kernel(p->head_dim, p->dtype, 0);
  if (e == nullptr) return FLASH_ERR_NOT_COMPILED;
  p->split_kernel = split::wants_split_kernel(*p) ? 1 : 0;
  if (!p->split_kernel) {
    p->num_splits = 1;
    return FLASH_OK;
  }
  // the SMs: the split count's and the kernel shape's (split::shape) measure
  int dev = 0, sms = 0;
  const cudaError_t err = cudaGetDevice(&dev) == cudaSuccess
                              ? cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)
                              : cudaErrorInvalidDevice;
  if (err != cudaSuccess) {
    set_cuda_error(err);
    return FLASH_ERR_CUDA;
  }
  p->num_sms = sms;
  if (p->num_splits == 0)
    p->num_splits = split::choose_splits(*p, e->head_dim, sms, split::shape(*p, e->head_dim));
  if (p->num_splits > 1) {
    *lse_accum_floats = int64_t(p->num_splits) * p->nheads * p->total_q;
    *oaccum_floats = *lse_accum_floats * p->head_dim;
  }
  return FLASH_OK;
}
}  // namespace

bool use_sm90_kernels() {
  static const bool disabled = [] {
    const char *v = std::getenv("FLASH_ATTN_DISABLE_SM90");
    return v != nullptr && v[0] != '\0' && std::string(v) != "0";
  }();
  if (disabled) return false;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
}

namespace {
std::mutex smem_limits_mutex;
std::map<std::pair<const void *, int>, size_t> smem_limits;  // (kernel, device) -> bytes
int current_device() {
  int dev = -1;
  return cudaGetDevice(&dev) == cudaSuccess ? dev : -1;
}
}  // namespace

bool smem_limit_raised(const void *kernel, size_t smem) {
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(smem_limits_mutex);
  const auto it = smem_limits.find({kernel, dev});
  return dev >= 0 && it != smem_limits.end() && it->second >= smem;
}

void note_smem_limit(const void *kernel, size_t smem) {
  const int dev = current_device();
  if (dev < 0) return;
  std::lock_guard<std::mutex> lock(smem_limits_mutex);
  size_t &known = smem_limits[{kernel, dev}];
  if (smem > known) known = smem;
}

// One thread per Philox call (dropout.cuh): (entry and head, 16-query block and row
// i % 8, 32-key chunk, lane class t), writing its 16 entries; a grid-stride loop.
__global__ void dropout_mask_kernel(const int64_t *rng_state, float p, int nheads, int sq, int sk,
                                    int64_t calls_total, uint8_t *mask) {
  const int q16 = (sq + 15) / 16, k32 = (sk + 31) / 32;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < calls_total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int t = int(idx % 4);
    const int j32 = int(idx / 4 % k32);
    const int64_t rest = idx / 4 / k32;
    const int low = int(rest % 8);
    const int i16 = int(rest / 8 % q16);
    const int64_t bh = rest / 8 / q16;
    const Dropout d(rng_state, p, int(bh / nheads), int(bh % nheads));
    const uint4 r = d.call(16 * i16 + low, j32, t);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t keep = d.keep_msb(word_of(r, w));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 16 * i16 + low + 8 * (e / 2), j = 32 * j32 + 8 * w + 2 * t + e % 2;
        if (i < sq && j < sk) mask[(bh * sq + i) * sk + j] = (keep >> (8 * e + 7)) & 1u;
      }
    }
  }
}

bool device_has_pdl() {
  int dev = 0, major = 0;
  return cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
         major >= 9;
}

int launch_append(const FlashAppendKvParams &p, cudaStream_t stream) { return launch_append_kv(p, stream); }

void set_cuda_error(cudaError_t e) {
  last_cuda_error = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

}  // namespace flash

extern "C" {

int flash_attn_fwd_plan(FlashAttnParams *params, int64_t *oaccum_floats, int64_t *lse_accum_floats) {
  return flash::plan(params, oaccum_floats, lse_accum_floats);
}

int flash_attn_fwd(const FlashAttnParams *params, void *cuda_stream) {
  return flash::run(params, cuda_stream, 0);
}

int flash_attn_bwd(const FlashAttnParams *params, void *cuda_stream) {
  return flash::run(params, cuda_stream, 1);
}

int flash_attn_dropout_mask(const int64_t *rng_state, float dropout_p, int batch, int nheads,
                            int seqlen_q, int seqlen_k, uint8_t *mask, void *cuda_stream) {
  if (rng_state == nullptr || mask == nullptr || !(dropout_p >= 0.f && dropout_p < 1.f) || batch < 0 ||
      nheads <= 0 || seqlen_q < 0 || seqlen_k < 0)
    return FLASH_ERR_BAD_ARGUMENT;
  const int64_t total = int64_t(batch) * nheads * ((seqlen_q + 15) / 16) * 8 * ((seqlen_k + 31) / 32) * 4;
  if (total == 0) return FLASH_OK;
  const int64_t blocks = (total + 255) / 256;
  const int grid = int(blocks < 65536 ? blocks : 65536);
  flash::dropout_mask_kernel<<<grid, 256, 0, static_cast<cudaStream_t>(cuda_stream)>>>(
      rng_state, dropout_p, nheads, seqlen_q, seqlen_k, total, mask);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    flash::set_cuda_error(e);
    return FLASH_ERR_CUDA;
  }
  return FLASH_OK;
}

int flash_attn_kv_check(const FlashAttnParams *params, const FlashKvCheck *check, void *cuda_stream) {
  if (params == nullptr || check == nullptr) return FLASH_ERR_BAD_ARGUMENT;
  return flash::launch_kv_check(*params, *check, static_cast<cudaStream_t>(cuda_stream));
}

int flash_attn_wait_verdict(const volatile int *verdict, void *cuda_stream) {
  if (verdict == nullptr) return FLASH_ERR_BAD_ARGUMENT;
  return flash::wait_verdict(verdict, static_cast<cudaStream_t>(cuda_stream));
}

int flash_attn_append_kv(const FlashAppendKvParams *params, void *cuda_stream) {
  if (params == nullptr) return FLASH_ERR_BAD_ARGUMENT;
  return flash::launch_append_kv(*params, static_cast<cudaStream_t>(cuda_stream));
}

int flash_attn_has_kernel(int head_dim, int dtype, int direction) {
  return flash::find_kernel(head_dim, dtype, direction) != nullptr;
}

const char *flash_attn_build_info(void) { return flash::kBuildInfo; }

const char *flash_last_cuda_error(void) { return flash::last_cuda_error.c_str(); }
}
