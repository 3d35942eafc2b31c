// How the split-KV (decode) forward is shaped and when it runs: shared by the
// kernel (fwd_split.cuh) and the planner (dispatch.cu), so that the workspace the
// caller allocates and the grid the kernel takes always agree.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "flash_api.h"

namespace flash {
namespace split {

constexpr int kRows = 16;  // packed query rows per CTA: one m16 tile, one warp

// Keys per pipeline stage (8 KB of K and V at head dim 64, 16 KB at 128 and 256)
// and the stages. Measured on an H200 (benchmarks/RESULTS.md): more resident one-warp
// CTAs beat deeper pipelines (256: 2 stages of 16 keys, 5 CTAs an SM, beat 4 stages,
// 3 CTAs, by 10%); 64 keys a stage at 64 lost 15% to 32.
constexpr int bn(int d) { return d <= 128 ? 32 : 16; }
constexpr int stages(int d) { return d <= 128 ? 3 : 2; }
constexpr int ld(int d) { return d + 8; }
// Q, the K and V stages, and one table of (k, v) row offsets.
constexpr size_t smem_bytes(int d) {
  return size_t(kRows + 2 * stages(d) * bn(d)) * ld(d) * 2 + size_t(bn(d)) * 16;
}

// Query rows of one (entry, kv head) once the heads of a group are packed:
// row r is query r / group of head hk * group + r % group.
inline int row_blocks(const FlashAttnParams &p) {
  const int group = p.nheads / p.nheads_k;
  return (p.seqlen_q * group + kRows - 1) / kRows;
}

// The split kernel runs for paged k/v, for an explicit split, and for
// decode-shaped calls: at most 2 row tiles (32 rows) of packed queries per (entry, kv head).
// Never with dropout (the split kernel has none; dispatch refuses the combination).
inline bool wants_split_kernel(const FlashAttnParams &p) {
  if (p.block_table != nullptr || p.num_splits > 1) return true;
  if (p.dropout_p > 0.f) return false;
  return row_blocks(p) <= 2;
}

// The number of splits: enough CTAs to fill every SM's slots in whole waves, with
// at least 128 keys per split.
inline int choose_splits(const FlashAttnParams &p, int d, int num_sms) {
  const int64_t units = int64_t(p.batch) * p.nheads_k * row_blocks(p);
  // CTAs an SM: shared memory, and at most 10 (about 170 registers a lane)
  int per_sm = int((228 * 1024) / (smem_bytes(d) + 1024));
  per_sm = per_sm < 1 ? 1 : (per_sm > 10 ? 10 : per_sm);
  const int64_t slots = int64_t(num_sms) * per_sm;
  if (units >= slots) return 1;
  int max_splits = p.seqlen_k / 128;
  if (max_splits > FLASH_MAX_SPLITS) max_splits = FLASH_MAX_SPLITS;
  if (max_splits <= 1) return 1;
  // Efficiency of s splits: the work over the whole waves it takes.
  double best = 0.0;
  double eff[FLASH_MAX_SPLITS + 1] = {0.0};
  for (int s = 1; s <= max_splits; ++s) {
    const double waves = double(units * s) / double(slots);
    const double whole = double(int64_t(waves) + (waves > double(int64_t(waves)) ? 1 : 0));
    eff[s] = waves / whole;
    if (eff[s] > best) best = eff[s];
  }
  for (int s = 1; s <= max_splits; ++s)
    if (eff[s] >= 0.95 * best) return s;
  return 1;
}

}  // namespace split
}  // namespace flash
