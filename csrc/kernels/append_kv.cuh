// The append of the KV-cache forward: k_new and v_new copied into the caches in place,
// one kernel for both (flash_api.h, FlashAppendKvParams, says where each row goes).
//
// One block per new row (entry b, row i): the block finds the row's slot in the cache
// (or skips the row when any index is out of range) and its threads copy the row's
// nheads_k * head_dim elements of k and then of v, one Unit (16 bytes where the
// pointers and strides allow, else one element) per step. (Where the sm_90 attention
// reads the new rows from k_new / v_new itself, it writes them too: fwd_sm90.cuh.)
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "flash_api.h"
#include "tile.cuh"

namespace flash {

// Where a new row lands: (dim 0, dim 1) of the cache, or skip.
struct AppendSlot {
  int64_t row, key;
  bool skip;
};

__device__ __forceinline__ AppendSlot append_slot(const FlashAppendKvParams &p, int b, int i) {
  const int64_t keys = p.seqused_k != nullptr ? int64_t(p.seqused_k[b]) + p.seqused_k_add : p.capacity;
  const int64_t pos = keys - p.seqlen_new + i;
  if (pos < 0 || pos >= p.capacity) return {0, 0, true};
  if (p.block_table != nullptr) {
    // pos < capacity = pages_per_seq * page_size: the column is inside the table
    const int64_t page = p.block_table[b * p.block_table_batch_stride + pos / p.page_size];
    return {page, pos % p.page_size, page < 0 || page >= p.cache_rows};
  }
  const int64_t row = p.kv_batch_idx != nullptr ? int64_t(p.kv_batch_idx[b]) : int64_t(b);
  return {row, pos, row < 0 || row >= p.cache_rows};
}

// Copy one (entry, row) of k_new and v_new: Unit is uint4 (8 elements) or uint16_t (1).
template <typename Unit>
__global__ void append_kv_kernel(const FlashAppendKvParams p) {
  if (call_aborted(p.abort_flag)) return;
  const int b = int(blockIdx.x / unsigned(p.seqlen_new));
  const int i = int(blockIdx.x % unsigned(p.seqlen_new));
  const AppendSlot slot = append_slot(p, b, i);
  if (slot.skip) return;
  constexpr int kElems = int(sizeof(Unit) / sizeof(uint16_t));
  const int units_per_head = p.head_dim / kElems;
  const int units = p.nheads_k * units_per_head;
  for (int u = threadIdx.x; u < 2 * units; u += blockDim.x) {
    const bool is_v = u >= units;
    const int w = is_v ? u - units : u;
    const int64_t h = w / units_per_head, e = int64_t(w % units_per_head) * kElems;
    const uint16_t *src;
    uint16_t *dst;
    if (is_v) {
      src = static_cast<const uint16_t *>(p.v_new) + b * p.v_new_batch_stride + i * p.v_new_row_stride +
            h * p.v_new_head_stride + e;
      dst = static_cast<uint16_t *>(p.v_cache) + slot.row * p.v_cache_batch_stride +
            slot.key * p.v_cache_row_stride + h * p.v_cache_head_stride + e;
    } else {
      src = static_cast<const uint16_t *>(p.k_new) + b * p.k_new_batch_stride + i * p.k_new_row_stride +
            h * p.k_new_head_stride + e;
      dst = static_cast<uint16_t *>(p.k_cache) + slot.row * p.k_cache_batch_stride +
            slot.key * p.k_cache_row_stride + h * p.k_cache_head_stride + e;
    }
    *reinterpret_cast<Unit *>(dst) = *reinterpret_cast<const Unit *>(src);
  }
}

// Whether every pointer is 16-byte aligned and every stride and head_dim a multiple of 8
// elements: then each 8-element piece of a row is one 16-byte copy.
inline bool append_vectorizable(const FlashAppendKvParams &p) {
  const void *ptrs[4] = {p.k_new, p.v_new, p.k_cache, p.v_cache};
  for (const void *ptr : ptrs)
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  const int64_t strides[12] = {p.k_new_batch_stride,   p.k_new_row_stride,   p.k_new_head_stride,
                               p.v_new_batch_stride,   p.v_new_row_stride,   p.v_new_head_stride,
                               p.k_cache_batch_stride, p.k_cache_row_stride, p.k_cache_head_stride,
                               p.v_cache_batch_stride, p.v_cache_row_stride, p.v_cache_head_stride};
  for (int64_t s : strides)
    if (s % 8 != 0) return false;
  return p.head_dim % 8 == 0;
}

inline bool append_sizes_valid(const FlashAppendKvParams &p) {
  return p.batch >= 0 && p.seqlen_new >= 0 && p.nheads_k > 0 && p.head_dim > 0 && p.cache_rows >= 0 &&
         p.capacity >= 0 && (p.block_table == nullptr || (p.page_size > 0 && p.kv_batch_idx == nullptr)) &&
         int64_t(p.batch) * p.seqlen_new <= INT32_MAX && int64_t(p.nheads_k) * p.head_dim <= INT32_MAX / 2;
}

// Launch on stream; a FlashStatus (errors recorded for flash_last_cuda_error()).
inline int launch_append_kv(const FlashAppendKvParams &p, cudaStream_t stream) {
  if (!append_sizes_valid(p)) return FLASH_ERR_BAD_ARGUMENT;
  const int64_t rows = int64_t(p.batch) * p.seqlen_new;
  // no new row, or no slot to put one in (the pointers of empty tensors may be null)
  if (rows == 0 || p.capacity == 0 || p.cache_rows == 0) return FLASH_OK;
  if (p.k_new == nullptr || p.v_new == nullptr || p.k_cache == nullptr || p.v_cache == nullptr)
    return FLASH_ERR_BAD_ARGUMENT;
  const bool vec = append_vectorizable(p);
  const int64_t units = 2 * int64_t(p.nheads_k) * (vec ? p.head_dim / 8 : p.head_dim);
  const int threads = int(units >= 256 ? 256 : (units + 31) / 32 * 32);
  if (vec)
    append_kv_kernel<uint4><<<unsigned(rows), threads, 0, stream>>>(p);
  else
    append_kv_kernel<uint16_t><<<unsigned(rows), threads, 0, stream>>>(p);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    set_cuda_error(e);
    return FLASH_ERR_CUDA;
  }
  return FLASH_OK;
}

}  // namespace flash
