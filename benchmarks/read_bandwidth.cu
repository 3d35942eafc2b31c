// How fast K and V stream from HBM into shared memory, by load mechanism: the ceiling
// the split-KV decode kernel (csrc/kernels/fwd_split.cuh) works under.
//
// A CTA a (entry, kv head) of a (B, L, 8, d) bf16 cache streams its L rows of K and V
// through S stages of ROWS rows (at hdim 128 and 3 stages of 128 rows, one CTA an SM), as
// the decode kernel's wide CTA does, and does nothing with them but wait for each stage. Mechanisms:
//   cp.async       16-byte cp.async.cg copies by every thread, unpadded rows with the 16-byte
//                  chunks swizzled (chunk c of row r at c ^ (r % 8)), as fwd_split.cuh lays
//                  out head dims that are multiples of 64
//   cp.async 128B  the same with the .L2::128B fetch size (what fwd_split.cuh issues)
//   tma            one 2D bulk tensor copy a stage and tensor (one thread), rows unpadded,
//                  no swizzle, with the tensor map's L2 promotion none, 128 B or 256 B
//   tma sw128      two 64-column boxes a stage and tensor, 128-byte swizzle (the layout
//                  the MMAs' ldmatrix reads need without bank conflicts), promotion none
// And, all with cp.async .L2::128B, the questions of where else the decode's reads could
// go faster: a stage's K chunks issued before its V chunks; the rows S stages ahead
// prefetched into L2 (cp.async.bulk.prefetch.L2); the keys cut evenly over a fixed grid of
// one or two CTAs an SM instead of a CTA a pair (stream_even); CTAs that read whole cache
// rows, every head, over a share of the keys (stream_rows).
// GB/s of K+V read (median of 20 launches after 5), the device-to-device copy of the same
// bytes beside them (read + write, so not a read ceiling).
//
// Build and run on a Hopper GPU (the tensor-map encoder comes from the driver at run time):
//   nvcc -O3 -std=c++17 -arch=sm_90a -Icsrc/kernels -o /tmp/read_bandwidth benchmarks/read_bandwidth.cu
//   /tmp/read_bandwidth
// SDPA cuDNN's decode on the same shapes: benchmarks/bench_decode.py. Results:
// benchmarks/RESULTS.md (2026-12-01).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "sm90.cuh"  // flash::sm90::mbar_init / mbar_wait; ptx.cuh's cp.async wrappers

namespace {

enum Mode { kCpAsync, kCpAsync128, kTma, kTmaSw128, kKThenV, kPrefetchL2 };
constexpr int kHeads = 8;    // kv heads
constexpr int kThreads = 128;

using flash::smem_addr;

// The two PTX steps of a bulk tensor copy that the kernels' wrappers (ptx.cuh, sm90.cuh) do
// not have, as no kernel issues one yet.
__device__ __forceinline__ void mbar_expect(uint64_t *bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void tma_2d(void *dst, const CUtensorMap *map, int col, int row, uint64_t *bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_addr(dst)),
      "l"(map), "r"(col), "r"(row), "r"(smem_addr(bar))
      : "memory");
}
// A bulk prefetch of `bytes` (a multiple of 16) at p into L2.
__device__ __forceinline__ void prefetch_l2(const void *p, int bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}
template <Mode M>
__device__ __forceinline__ void cp_16(void *dst, const void *src) {
  if constexpr (M != kCpAsync)
    flash::cp_async_16_stream(dst, src, true);
  else
    flash::cp_async_16(dst, src, true);
}

template <int D, int ROWS, int S, Mode M>
__global__ void __launch_bounds__(kThreads) stream_kv(const __nv_bfloat16 *K, const __nv_bfloat16 *V, int L,
                                                      const __grid_constant__ CUtensorMap map_k,
                                                      const __grid_constant__ CUtensorMap map_v, float *sink) {
  constexpr bool kTmaMode = M == kTma || M == kTmaSw128;
  constexpr int LD = D;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto *sK = reinterpret_cast<__nv_bfloat16 *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __nv_bfloat16 *sV = sK + S * ROWS * LD;
  auto *full = reinterpret_cast<uint64_t *>(sV + S * ROWS * LD);
  const int hk = blockIdx.x % kHeads, b = blockIdx.x / kHeads, tid = threadIdx.x;
  const int64_t row_stride = int64_t(kHeads) * D;
  const __nv_bfloat16 *k = K + int64_t(b) * L * row_stride + hk * D;
  const __nv_bfloat16 *v = V + int64_t(b) * L * row_stride + hk * D;
  const int blocks = L / ROWS;
  if (kTmaMode && tid == 0)
    for (int s = 0; s < S; ++s) flash::sm90::mbar_init(full + s, 1);
  __syncthreads();

  auto issue = [&](int blk) {
    const int st = blk % S, r0 = blk * ROWS;
    __nv_bfloat16 *dk = sK + st * ROWS * LD, *dv = sV + st * ROWS * LD;
    if constexpr (M == kKThenV) {  // every K chunk of the stage, then every V chunk
      for (int i = tid; i < ROWS * (D / 8); i += kThreads) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        cp_16<M>(dk + r * LD + (((c / 8) ^ (r % 8)) * 8), k + (r0 + r) * row_stride + c);
      }
      for (int i = tid; i < ROWS * (D / 8); i += kThreads) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        cp_16<M>(dv + r * LD + (((c / 8) ^ (r % 8)) * 8), v + (r0 + r) * row_stride + c);
      }
      flash::cp_async_commit();
    } else if constexpr (!kTmaMode) {
      for (int i = tid; i < ROWS * (D / 8); i += kThreads) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        const int at = r * LD + (((c / 8) ^ (r % 8)) * 8);  // swizzled chunk
        cp_16<M>(dk + at, k + (r0 + r) * row_stride + c);
        cp_16<M>(dv + at, v + (r0 + r) * row_stride + c);
      }
      // kPrefetchL2: the rows of the block S stages further on go to L2 now (one row of K
      // and of V a thread)
      if (M == kPrefetchL2 && blk + S < blocks && tid < ROWS) {
        prefetch_l2(k + (r0 + S * ROWS + tid) * row_stride, D * 2);
        prefetch_l2(v + (r0 + S * ROWS + tid) * row_stride, D * 2);
      }
      flash::cp_async_commit();
    } else if (tid == 0) {
      mbar_expect(full + st, ROWS * D * 2 * 2);
      constexpr int kBoxCols = M == kTmaSw128 ? 64 : D;
      for (int c = 0; c < D; c += kBoxCols) {  // a box lands as ROWS x kBoxCols, dense
        tma_2d(dk + c * ROWS, &map_k, hk * D + c, b * L + r0, full + st);
        tma_2d(dv + c * ROWS, &map_v, hk * D + c, b * L + r0, full + st);
      }
    }
  };
  float touched = 0.f;
  for (int i = 0; i < S - 1 && i < blocks; ++i) issue(i);
  for (int i = 0; i < blocks; ++i) {
    if constexpr (kTmaMode) {
      flash::sm90::mbar_wait(full + i % S, (i / S) & 1);
    } else if (i + S - 1 <= blocks) {
      flash::cp_async_wait<S - 2>();
    } else {
      flash::cp_async_wait_all();
    }
    __syncthreads();  // stage i landed for all; every thread is done with stage i - 1
    if (i + S - 1 < blocks) {
      issue(i + S - 1);
    } else if constexpr (!kTmaMode) {
      flash::cp_async_commit();  // keeps the group count the wait expects
    }
    const __nv_bfloat16 *stage = sK + (i % S) * ROWS * LD;
    touched += __bfloat162float(stage[(tid % ROWS) * LD + tid % 8]);
  }
  if (touched == 12345.f) *sink = touched;  // never true: keeps the loop
}

// The same streams cut evenly over a fixed grid instead of a CTA an (entry, kv head): the
// (entry, kv head, 128-row block) sequence is flattened and CTA c of G takes blocks
// [c T / G, (c + 1) T / G), crossing (entry, kv head) boundaries. kDrain: the pipeline
// empties and refills at each boundary (a loop over pieces, each its own stream), else one
// stream over the whole range (the next piece's blocks load under the last ones'). What a
// split of the keys by equal work, not by equal pieces of each pair, could read at best.
template <int D, int ROWS, int S, bool kDrain>
__global__ void __launch_bounds__(kThreads) stream_even(const __nv_bfloat16 *K, const __nv_bfloat16 *V, int B, int L,
                                                        float *sink) {
  constexpr int LD = D;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto *sK = reinterpret_cast<__nv_bfloat16 *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __nv_bfloat16 *sV = sK + S * ROWS * LD;
  const int tid = threadIdx.x, nb = L / ROWS;
  const int64_t row_stride = int64_t(kHeads) * D, total = int64_t(B) * kHeads * nb;
  const int64_t f0 = blockIdx.x * total / gridDim.x, f1 = (blockIdx.x + 1) * total / gridDim.x;
  auto issue = [&](int64_t f, int st) {
    const int64_t u = f / nb;
    const int blk = int(f % nb), hk = int(u % kHeads), b = int(u / kHeads);
    const __nv_bfloat16 *k = K + int64_t(b) * L * row_stride + hk * D + int64_t(blk) * ROWS * row_stride;
    const __nv_bfloat16 *v = V + int64_t(b) * L * row_stride + hk * D + int64_t(blk) * ROWS * row_stride;
    __nv_bfloat16 *dk = sK + st * ROWS * LD, *dv = sV + st * ROWS * LD;
    for (int i = tid; i < ROWS * (D / 8); i += kThreads) {
      const int r = i / (D / 8), c = (i % (D / 8)) * 8;
      const int at = r * LD + (((c / 8) ^ (r % 8)) * 8);
      flash::cp_async_16_stream(dk + at, k + r * row_stride + c, true);
      flash::cp_async_16_stream(dv + at, v + r * row_stride + c, true);
    }
  };
  float touched = 0.f;
  auto stream = [&](int64_t a, int64_t e) {
    const int n = int(e - a);
    for (int i = 0; i < S - 1; ++i) {
      if (i < n) issue(a + i, i);
      flash::cp_async_commit();
    }
    for (int i = 0; i < n; ++i) {
      flash::cp_async_wait<S - 2>();
      __syncthreads();
      if (i + S - 1 < n) issue(a + i + S - 1, (i + S - 1) % S);
      flash::cp_async_commit();
      const __nv_bfloat16 *stage = sK + (i % S) * ROWS * LD;
      touched += __bfloat162float(stage[(tid % ROWS) * LD + tid % 8]);
    }
    flash::cp_async_wait_all();
    __syncthreads();
  };
  if constexpr (kDrain) {
    for (int64_t x = f0; x < f1;) {
      const int64_t e = min(f1, (x / nb + 1) * nb);
      stream(x, e);
      x = e;
    }
  } else {
    stream(f0, f1);
  }
  if (touched == 12345.f) *sink = touched;  // never true: keeps the loop
}

// A CTA an (entry, 1/8 of the keys) that reads whole cache rows (every kv head's d
// columns, contiguous) instead of one head's: the same stage bytes (ROWS / kHeads key
// rows of all heads), the same CTA count, contiguous reads instead of d-column pieces
// strided by the row.
template <int D, int ROWS, int S>
__global__ void __launch_bounds__(kThreads) stream_rows(const __nv_bfloat16 *K, const __nv_bfloat16 *V, int L,
                                                        float *sink) {
  constexpr int KR = ROWS / kHeads, W = kHeads * D;  // key rows a stage, elements a row
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto *sK = reinterpret_cast<__nv_bfloat16 *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __nv_bfloat16 *sV = sK + S * KR * W;
  const int tid = threadIdx.x, part = blockIdx.x % kHeads, b = blockIdx.x / kHeads;
  const int keys = L / kHeads, blocks = keys / KR;
  const __nv_bfloat16 *k = K + (int64_t(b) * L + int64_t(part) * keys) * W;
  const __nv_bfloat16 *v = V + (int64_t(b) * L + int64_t(part) * keys) * W;
  auto issue = [&](int blk, int st) {
    const __nv_bfloat16 *kb = k + int64_t(blk) * KR * W, *vb = v + int64_t(blk) * KR * W;
    __nv_bfloat16 *dk = sK + st * KR * W, *dv = sV + st * KR * W;
    for (int i = tid; i < KR * W / 8; i += kThreads) {
      flash::cp_async_16_stream(dk + i * 8, kb + i * 8, true);
      flash::cp_async_16_stream(dv + i * 8, vb + i * 8, true);
    }
  };
  float touched = 0.f;
  for (int i = 0; i < S - 1; ++i) {
    if (i < blocks) issue(i, i);
    flash::cp_async_commit();
  }
  for (int i = 0; i < blocks; ++i) {
    flash::cp_async_wait<S - 2>();
    __syncthreads();
    if (i + S - 1 < blocks) issue(i + S - 1, (i + S - 1) % S);
    flash::cp_async_commit();
    const __nv_bfloat16 *stage = sK + (i % S) * KR * W;
    touched += __bfloat162float(stage[(tid % KR) * W + tid % 8]);
  }
  if (touched == 12345.f) *sink = touched;  // never true: keeps the loop
}

using EncodeTiled = CUresult (*)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                                 const cuuint64_t *, const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// Median ms of `reps` runs of launch() (each timed alone by CUDA events), the first `skip` left out.
template <typename Launch>
float median_ms(Launch launch, int reps, int skip) {
  cudaEvent_t start, end;
  cudaEventCreate(&start);
  cudaEventCreate(&end);
  std::vector<float> ms;
  for (int rep = 0; rep < reps; ++rep) {
    cudaEventRecord(start);
    launch();
    cudaEventRecord(end);
    cudaEventSynchronize(end);
    float t = 0.f;
    cudaEventElapsedTime(&t, start, end);
    if (rep >= skip) ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(end);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

template <int D, int ROWS, int S, Mode M>
void run(const char *name, EncodeTiled encode, CUtensorMapL2promotion promotion, const __nv_bfloat16 *K,
         const __nv_bfloat16 *V, int B, int L, float *sink) {
  CUtensorMap maps[2] = {};
  if (M == kTma || M == kTmaSw128) {
    const cuuint64_t dims[2] = {cuuint64_t(kHeads) * D, cuuint64_t(B) * L};  // (columns, rows)
    const cuuint64_t strides[1] = {cuuint64_t(kHeads) * D * 2};
    const cuuint32_t box[2] = {M == kTmaSw128 ? 64u : cuuint32_t(D), ROWS}, unit[2] = {1, 1};
    const CUtensorMapSwizzle swizzle = M == kTmaSw128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE;
    for (int t = 0; t < 2; ++t) {
      void *base = const_cast<__nv_bfloat16 *>(t ? V : K);
      if (encode(&maps[t], CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, base, dims, strides, box, unit,
                 CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, promotion, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
        std::printf("%s: cuTensorMapEncodeTiled failed\n", name);
        return;
      }
    }
  }
  const size_t smem = size_t(2) * S * ROWS * D * 2 + S * 8 + 1024;
  auto kernel = stream_kv<D, ROWS, S, M>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  const float ms =
      median_ms([&] { kernel<<<B * kHeads, kThreads, smem>>>(K, V, L, maps[0], maps[1], sink); }, 25, 5);
  const cudaError_t err = cudaGetLastError();
  const double bytes = 2.0 * B * L * kHeads * D * 2;
  std::printf("| %d x %d | %d | %s | %d x %d | %.0f |%s\n", B, L, D, name, ROWS, S, bytes / (ms * 1e6),
              err == cudaSuccess ? "" : cudaGetErrorString(err));
}

template <int D, int ROWS, int S, bool kDrain>
void run_even(const char *name, const __nv_bfloat16 *K, const __nv_bfloat16 *V, int B, int L, int grid, float *sink) {
  const size_t smem = size_t(2) * S * ROWS * D * 2 + 1024;
  auto kernel = stream_even<D, ROWS, S, kDrain>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  const float ms = median_ms([&] { kernel<<<grid, kThreads, smem>>>(K, V, B, L, sink); }, 25, 5);
  const cudaError_t err = cudaGetLastError();
  const double bytes = 2.0 * B * L * kHeads * D * 2;
  std::printf("| %d x %d | %d | %s, %d CTAs | %d x %d | %.0f |%s\n", B, L, D, name, grid, ROWS, S, bytes / (ms * 1e6),
              err == cudaSuccess ? "" : cudaGetErrorString(err));
}

template <int D, int ROWS, int S>
void run_rows(const __nv_bfloat16 *K, const __nv_bfloat16 *V, int B, int L, float *sink) {
  const size_t smem = size_t(2) * S * ROWS * D * 2 + 1024;
  auto kernel = stream_rows<D, ROWS, S>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  const float ms = median_ms([&] { kernel<<<B * kHeads, kThreads, smem>>>(K, V, L, sink); }, 25, 5);
  const cudaError_t err = cudaGetLastError();
  const double bytes = 2.0 * B * L * kHeads * D * 2;
  std::printf("| %d x %d | %d | cp.async .L2::128B, whole rows (every head), a CTA an (entry, 1/8 of the keys) | %d x %d | %.0f |%s\n",
              B, L, D, ROWS / kHeads, S, bytes / (ms * 1e6), err == cudaSuccess ? "" : cudaGetErrorString(err));
}

template <int D>
void sweep(EncodeTiled encode, float *sink) {
  // 33 x 8 CTAs: two whole waves on 132 SMs; 1 x 65536: 8 long pairs
  const int shapes[4][2] = {{16, 8192}, {64, 4096}, {33, 4096}, {1, 65536}};
  for (const auto &shape : shapes) {
    const int B = shape[0], L = shape[1];
    const size_t n = size_t(B) * L * kHeads * D;
    __nv_bfloat16 *K = nullptr, *V = nullptr;
    cudaMalloc(&K, n * 2);
    cudaMalloc(&V, n * 2);
    cudaMemset(K, 0, n * 2);
    cudaMemset(V, 0, n * 2);
    const auto none = CU_TENSOR_MAP_L2_PROMOTION_NONE;
    run<D, 128, 3, kCpAsync>("cp.async", encode, none, K, V, B, L, sink);
    run<D, 128, 3, kCpAsync128>("cp.async .L2::128B", encode, none, K, V, B, L, sink);
    run<D, 128, 3, kTma>("tma, promotion none", encode, none, K, V, B, L, sink);
    run<D, 128, 3, kTma>("tma, promotion 128 B", encode, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, K, V, B, L, sink);
    run<D, 128, 3, kTma>("tma, promotion 256 B", encode, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, K, V, B, L, sink);
    run<D, 128, 3, kTmaSw128>("tma sw128, promotion none", encode, none, K, V, B, L, sink);
    run<D, 64, 3, kTmaSw128>("tma sw128, promotion none", encode, none, K, V, B, L, sink);
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    const int per_sm = int((228 * 1024) / (size_t(2) * 3 * 128 * D * 2 + 2048));
    const int grid = sms * (per_sm < 1 ? 1 : per_sm);
    run_even<D, 128, 3, false>("cp.async .L2::128B, even split, one stream", K, V, B, L, grid, sink);
    run_even<D, 128, 3, true>("cp.async .L2::128B, even split, refill a piece", K, V, B, L, grid, sink);
    run_rows<D, 128, 3>(K, V, B, L, sink);
    run<D, 128, 3, kKThenV>("cp.async .L2::128B, a stage's K chunks then its V chunks", encode, none, K, V, B, L, sink);
    run<D, 128, 3, kPrefetchL2>("cp.async .L2::128B, rows 3 stages on prefetched to L2", encode, none, K, V, B, L, sink);
    run<D, 128, 3, kCpAsync128>("cp.async .L2::128B (again)", encode, none, K, V, B, L, sink);
    const float ms = median_ms([&] { cudaMemcpyAsync(V, K, n * 2, cudaMemcpyDeviceToDevice); }, 15, 3);
    std::printf("| %d x %d | %d | device copy (read + write) | - | %.0f |\n", B, L, D, 2.0 * n * 2 / (ms * 1e6));
    cudaFree(K);
    cudaFree(V);
  }
}

}  // namespace

int main() {
  EncodeTiled encode = nullptr;
  cudaDriverEntryPointQueryResult found;
  if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void **>(&encode), 12000,
                                       cudaEnableDefault, &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess) {
    std::printf("no cuTensorMapEncodeTiled in this driver\n");
    return 1;
  }
  float *sink = nullptr;
  cudaMalloc(&sink, sizeof(float));
  std::printf("| batch x seqlen_k, 8 kv heads | hdim | loads | stage rows x stages | GB/s |\n|---|---|---|---|---|\n");
  sweep<128>(encode, sink);
  sweep<64>(encode, sink);
  return 0;
}
