// The C entry points: pick the smallest compiled head-dim bucket that holds
// the request and launch it.
#include <cstdlib>
#include <string>

#include "registry.cuh"
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

int run(const FlashAttnParams *p, void *stream, int direction) {
  if (p == nullptr || p->head_dim <= 0 || p->head_dim % 8 != 0 || p->nheads_k <= 0 ||
      p->nheads % p->nheads_k != 0)
    return FLASH_ERR_BAD_ARGUMENT;
  const KernelEntry *e = find_kernel(p->head_dim, p->dtype, direction);
  if (e == nullptr) return FLASH_ERR_NOT_COMPILED;
  return e->fn(*p, static_cast<cudaStream_t>(stream));
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

void set_cuda_error(cudaError_t e) {
  last_cuda_error = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

}  // namespace flash

extern "C" {

int flash_attn_fwd(const FlashAttnParams *params, void *cuda_stream) {
  return flash::run(params, cuda_stream, 0);
}

int flash_attn_bwd(const FlashAttnParams *params, void *cuda_stream) {
  return flash::run(params, cuda_stream, 1);
}

int flash_attn_has_kernel(int head_dim, int dtype, int direction) {
  return flash::find_kernel(head_dim, dtype, direction) != nullptr;
}

const char *flash_attn_build_info(void) { return flash::kBuildInfo; }

const char *flash_last_cuda_error(void) { return flash::last_cuda_error.c_str(); }
}
