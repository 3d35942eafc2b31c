// Hopper (sm_90a) building blocks: warpgroup MMA control, shared-memory matrix
// descriptors, and tiles stored in the 128-byte-swizzled layout wgmma reads.
//
// A swizzled tile of ROWS x D (D a multiple of 64, 16-bit elements) is kept as
// D/64 column blocks of ROWS x 64; each row of a block is 128 bytes whose eight
// 16-byte chunks are permuted by XOR with (row % 8). Blocks start 1024-byte
// aligned. Such a block is a K-major operand (rows = M or N, 64 along K) or,
// read with trans_b, an N-major one (rows = K, 64 along N).
#pragma once

#include "tile.cuh"
#include "wgmma_ops.cuh"

namespace flash {
namespace sm90 {

__device__ __forceinline__ void warpgroup_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void commit_group() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wait_group() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Ordinary (and cp.async) shared-memory writes become visible to wgmma only
// after this fence in each writing thread, then a barrier.
__device__ __forceinline__ void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keep the compiler from moving accumulator reads/writes across a wgmma window.
template <int R>
__device__ __forceinline__ void reg_fence(float (&d)[R][4]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

template <int R>
__device__ __forceinline__ void reg_fence(uint32_t (&a)[R][4]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[i][e])::"memory");
}

// Descriptor of a 128B-swizzled operand at p. K-major: 8-row groups are sbo
// bytes apart (1024 for a packed block). N-major: 8-row (K) groups are 1024 apart;
// we give it through both offset fields and issue N = 64 per instruction, so the
// distance between 64-wide N blocks is never needed.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = (addr & 0x3FFFFu) >> 4;
  d |= uint64_t((lbo >> 4) & 0x3FFFu) << 16;
  d |= uint64_t((sbo >> 4) & 0x3FFFu) << 32;
  d |= uint64_t(1) << 62;  // 128-byte swizzle
  return d;
}
__device__ __forceinline__ uint64_t make_desc(const void *p, uint32_t lbo, uint32_t sbo) {
  return make_desc(smem_addr(p), lbo, sbo);
}

// Dynamic shared memory rounded up to the 1024-byte alignment swizzled tiles need.
__device__ __forceinline__ unsigned char *align_1024(unsigned char *p) {
  return reinterpret_cast<unsigned char *>((reinterpret_cast<uintptr_t>(p) + 1023) &
                                           ~uintptr_t(1023));
}

// Byte offset of the 16-byte chunk holding (r, c) (c a multiple of 8).
template <int ROWS>
__device__ __forceinline__ int sw_offset(int r, int c) {
  return (c / 64) * ROWS * 128 + r * 128 + ((((c % 64) / 8) ^ (r % 8)) * 16);
}

// cp.async a ROWS x D tile into the swizzled layout (rows below rows_from or at or
// past rows_valid, and cols >= cols_valid, read as 0; their addresses are never read).
template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void load_tile_sw(T *s, const T *g, int64_t ld, int rows_valid,
                                             int cols_valid, const T *fallback, int tid, int rows_from = 0) {
  constexpr int kCh = D / 8, kTotal = ROWS * kCh;
  static_assert(kTotal % NTHREADS == 0, "tile chunks divide among the threads");
  unsigned char *base = reinterpret_cast<unsigned char *>(s);
#pragma unroll
  for (int it = 0; it < kTotal / NTHREADS; ++it) {
    const int idx = tid + it * NTHREADS;
    const int r = idx / kCh, c = (idx % kCh) * 8;
    const bool ok = r >= rows_from && r < rows_valid && c < cols_valid;
    cp_async_16(base + sw_offset<ROWS>(r, c), ok ? g + r * ld + c : fallback, ok);
  }
}

// Store the valid part of a swizzled ROWS x D tile to global memory; or, with
// TILE_ROWS, ROWS rows of a TILE_ROWS-row tile, s pointing at the first (a
// multiple of 8).
template <int ROWS, int D, int NTHREADS, typename T, int TILE_ROWS = ROWS>
__device__ __forceinline__ void store_tile_sw(T *g, const T *s, int64_t ld, int rows_valid,
                                              int cols_valid, int tid) {
  constexpr int kCh = D / 8, kTotal = ROWS * kCh;
  static_assert(kTotal % NTHREADS == 0, "tile chunks divide among the threads");
  const unsigned char *base = reinterpret_cast<const unsigned char *>(s);
#pragma unroll
  for (int it = 0; it < kTotal / NTHREADS; ++it) {
    const int idx = tid + it * NTHREADS;
    const int r = idx / kCh, c = (idx % kCh) * 8;
    if (r < rows_valid && c < cols_valid)
      *reinterpret_cast<uint4 *>(g + r * ld + c) =
          *reinterpret_cast<const uint4 *>(base + sw_offset<TILE_ROWS>(r, c));
  }
}

// Write a warp's 16 x (8*NT) f32 accumulator (rows r0.., columns c0..) into a
// swizzled ROWS-row tile as T, times mul.
template <int ROWS, int NT, typename T>
__device__ __forceinline__ void acc_to_smem_sw(T *s, const float (&acc)[NT][4], int r0, int c0,
                                               float mul0, float mul1, int lane) {
  const int g = lane / 4, t = lane % 4;
  unsigned char *base = reinterpret_cast<unsigned char *>(s);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int c = c0 + j * 8;
    *reinterpret_cast<uint32_t *>(base + sw_offset<ROWS>(r0 + g, c) + 4 * t) =
        pack2<T>(acc[j][0] * mul0, acc[j][1] * mul0);
    *reinterpret_cast<uint32_t *>(base + sw_offset<ROWS>(r0 + g + 8, c) + 4 * t) =
        pack2<T>(acc[j][2] * mul1, acc[j][3] * mul1);
  }
}

// ---- mbarriers (shared-memory 64-bit barriers with phase parity)
__device__ __forceinline__ void mbar_init(uint64_t *bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t *bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t *bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(smem_addr(bar))
               : "memory");
}
// Arrive on bar once this thread's cp.async copies so far have landed.
__device__ __forceinline__ void cp_async_mbar_arrive(uint64_t *bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Barrier `id` (1..15; 0 is __syncthreads) over `count` threads.
__device__ __forceinline__ void named_barrier(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

}  // namespace sm90

}  // namespace flash
