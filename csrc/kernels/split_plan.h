// How the split-KV (decode) forward is shaped and when it runs: shared by the
// kernel (fwd_split.cuh) and the planner (dispatch.cu), so that the workspace the
// caller allocates and the grid the kernel takes always agree.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "flash_api.h"

namespace flash {
bool use_sm90_kernels();  // dispatch.cu

namespace split {

constexpr int kRows = 16;  // packed query rows per CTA: one m16 tile, one warp

// A CTA's shape: W warps sharing each pipeline stage, each taking BNW keys from it
// (8 KB of K and V a warp at head dim 64 and 32 keys, 16 KB at 128 and 256). Three
// shapes: one warp (several CTAs an SM), the portable one; on sm_90 four warps with
// 128-key stages (one CTA an SM at head dims 65-256, two at 64 and below: fewer and
// longer streams, the shape cuDNN's decode kernel has), and the same four warps with
// 64-key stages where that lets more CTAs share an SM (two at head dims 65-128, four at
// 33-64, where its kernel takes 128 registers a lane: one CTA's merge and write run
// beside the others' streams), for calls with a tile for every SM (shape()). Measured
// on an H200 (benchmarks/RESULTS.md), for W = 1: more resident one-warp CTAs beat deeper
// pipelines (256: 2 stages of 16 keys, 5 CTAs an SM, beat 4 stages, 3 CTAs, by 10%);
// 64 keys a stage at 64 lost 15% to 32.
struct Shape {
  int w, bnw;
};
constexpr Shape one_warp(int d) { return {1, d <= 128 ? 32 : 16}; }
constexpr Shape wide(int d) { return {4, d <= 128 ? 32 : 16}; }
constexpr Shape wide_pair(int d) { return {4, d <= 32 ? 32 : 16}; }
constexpr int stages(int d, int w) { return w == 1 ? (d <= 128 ? 3 : 2) : 3; }
// The K and V rows of a stage: unpadded with 16-byte chunks swizzled (tile.cuh, tile_at)
// where a row is a whole number of 8-chunk groups, else padded by 8 elements (Q always).
// Padded rows cost the copies into a stage extra shared-memory wavefronts, each asking L2
// for its sectors again: ncu (H200, decode 16 x 8192 hdim 128) saw 1.5x the K/V sectors
// requested from L2 (47% of them hits), DRAM at 85.8% of peak; swizzled, exactly the K/V
// sectors and 88.6%, 130.8 -> 126.6 us (hdim 64, 64 x 4096: 136.9 -> 127.5 us).
constexpr bool swizzled(int d) { return d % 64 == 0; }
constexpr int ld(int d) { return swizzled(d) ? d : d + 8; }
constexpr int ldq(int d) { return d + 8; }
// Q, the K and V stages, and a table of (k, v) row addresses in two halves of a stage
// each (fwd_split.cuh, put_row_addresses; the second half left every kernel's CTAs an
// SM as they were). The wide kernel's end, where the warps merge their states, reuses
// the stages: W x 16 x d floats and four W x 16 tables, which always fit.
constexpr size_t smem_bytes(int d, Shape s) {
  const int bn = s.w * s.bnw;  // keys a stage
  return (size_t(kRows) * ldq(d) + size_t(2 * stages(d, s.w) * bn) * ld(d)) * 2 + size_t(2 * bn) * 16;
}
// The CTAs an SM the kernel of this shape is planned for where registers, not shared
// memory, would bound it: four for the 64-key four-warp shape at head dims 33-64, whose
// kernel ptxas compiles to 128 registers a lane (sm_90a, no spills), which four CTAs of
// 128 threads fill; tests/test_split_registers.py holds it to that. Not a launch bound:
// `__launch_bounds__(128, 4)` gave the same 128 registers but slower code (H200, hdim 64,
// 34-40 x 8192: pages of 16 -2 to -4%, contiguous -0.5%; benchmarks/RESULTS.md), and
// nvcc 13.0 had silently dropped it as the kernel once spelled it ({W, BNW} in the
// expression), so the measured kernel never had one. Else 1.
constexpr int min_ctas(int d, Shape s) { return s.w == 4 && s.bnw == 16 && d > 32 && d <= 64 ? 4 : 1; }
// CTAs of this shape an SM can hold: shared memory, and at most 10 warps (about 170
// registers a lane) unless min_ctas says its kernel takes fewer registers; at least 1.
constexpr int ctas_per_sm(int d, Shape s) {
  const int by_smem = int((228 * 1024) / (smem_bytes(d, s) + 1024)),
            by_warps = 10 / s.w > min_ctas(d, s) ? 10 / s.w : min_ctas(d, s);
  const int n = by_smem < by_warps ? by_smem : by_warps;
  return n < 1 ? 1 : n;
}
constexpr bool wide_fits(int d, Shape s) {
  return size_t(s.w) * kRows * d * 4 + 4 * s.w * kRows * 4 <=
             size_t(2 * stages(d, s.w) * s.w * s.bnw) * ld(d) * 2 &&
         smem_bytes(d, s) <= 227 * 1024;
}
constexpr bool wide_fits_every_bucket() {
  for (int d = 32; d <= 256; d += 32)
    if (!wide_fits(d, wide(d)) || !wide_fits(d, wide_pair(d))) return false;
  return true;
}
static_assert(wide_fits_every_bucket(),
              "the wide kernels fit an sm_90 CTA's shared memory, and their merge fits in their stages");
static_assert(ctas_per_sm(128, wide_pair(128)) == 2 && ctas_per_sm(96, wide_pair(96)) == 2 &&
                  ctas_per_sm(128, wide(128)) == 1 && ctas_per_sm(64, wide(64)) == 2 &&
                  ctas_per_sm(64, wide_pair(64)) == 4,
              "64-key stages are what let two wide CTAs share an SM at head dims 65-128, four at 64");
// Query rows of one (entry, kv head) once the heads of a group are packed:
// row r is query r / group of head hk * group + r % group.
inline int row_blocks(const FlashAttnParams &p) {
  const int group = p.nheads / p.nheads_k;
  return (p.seqlen_q * group + kRows - 1) / kRows;
}

// The CTA shape of the split kernel for this call (d: the kernel's head dim): the
// planner and the launch ask the same question. Four warps where the sm_90 kernels run
// (FLASH_ATTN_DISABLE_SM90=1 takes the one-warp kernel, which every arch has): at head
// dims 65-128 with 64-key stages, two CTAs an SM, where the call has at least as many
// (entry, kv head) tiles as the GPU has SMs (a CTA streams one tile's keys, unsplit or
// nearly, and the SM's second CTA keeps the loads going while one merges, writes and
// the next starts; H200, hdim 128, GB/s against 128-key stages: 24 x 8192 (192 tiles)
// 4025-4064 -> 4216-4230, 64 x 4096 +0.3%, paged (pages of 256) 64 x 4096 +1.2%; 17 x
// 8192, 136 tiles, 3124-3148 -> 3981-3987, where 128-key stages leave 4 tiles to a
// second wave; benchmarks/RESULTS.md), else 128-key stages (fewer tiles than SMs: the
// keys are split, and more CTAs would only add splits: 16 x 8192 hdim 128 lost 2% to
// 64-key stages). Paged caches whose pages are shorter than a 128-key stage at head
// dims 65-128 take the one-warp kernel where the call has a tile
// for every SM (several CTAs an SM, one split or few), which measured faster than the
// wide one there (H200, pages of 16, GB/s one-warp / wide: hdim 128, 64 x 4096:
// 4140-4175 / 3993; 16 x 8192: 3929-3942 / 4026-4041; 1 x 32768: 2970-2983 / 3127-3155;
// 8 x 65536: 3405-3442 / 3541-3552; benchmarks/RESULTS.md). Since the wide kernel's
// table of row addresses lost its barriers, it is the faster at head dim 64 there as
// well (64 x 4096, pages of 16: 3774-3802 one-warp, 3999-4022 wide; at 128 the one-warp
// kernel keeps its lead, 4343-4366 against 4174-4193). num_sms: flash_attn_fwd_plan
// fills it.
//
// At head dims 33-64 the 64-key shape (four CTAs an SM) runs where the 128-key shape's
// two CTAs an SM would leave up to half a second wave (2 x SMs <= tiles <= 3 x SMs): it
// holds them all at once, at least two CTAs on each SM; elsewhere the 128-key shape.
// H200, hdim 64, GB/s 128-key (the planner's splits) -> 64-key shape (unsplit; two
// calls): 34 x 8192, 32/8 heads (272 tiles) 3928-4031 -> 4242-4321 (pages of 256:
// 3667-3758 -> 4009-4241), 40 x 8192 (320) best of every count 4154 -> 4310-4343, 48 x
// 8192 (384) 4100-4109 -> 4308-4347; past it the 128-key shape is as fast or faster:
// 56 x 8192 (448) 4167-4185 -> 4114-4147, 66 x 8192 (528) 4386-4418 -> 4359-4378, 64 x
// 4096 (512) 4211-4247 -> 4206-4236 (another call: 4156-4169 -> 4227-4243); below it,
// 17 x 8192 (136 tiles, most SMs one CTA with half the keys in flight) 4029-4039 ->
// 3129-3132, 24 x 8192 (192) 4017-4022 -> 4105-4111 but pages of 256 4054-4082 ->
// 3613-3617; 33 x 4096 (264) the same.
inline Shape shape(const FlashAttnParams &p, int d) {
  if (!use_sm90_kernels()) return one_warp(d);
  const int64_t units = int64_t(p.batch) * p.nheads_k * row_blocks(p);
  const bool every_sm = units >= p.num_sms;
  const Shape w = wide(d), pair = wide_pair(d);
  if (p.block_table != nullptr && p.page_size < w.w * w.bnw && d > 64 && d <= 128 && every_sm)
    return one_warp(d);
  if (d <= 64)  // (up to head dim 32 pair is w itself)
    return units >= 2 * int64_t(p.num_sms) && units <= 3 * int64_t(p.num_sms) ? pair : w;
  return every_sm ? pair : w;
}

// The split kernel runs for paged k/v, for an explicit split, and for
// decode-shaped calls: at most 2 row tiles (32 rows) of packed queries per (entry, kv head).
// Never with dropout (the split kernel has none; dispatch refuses the combination).
inline bool wants_split_kernel(const FlashAttnParams &p) {
  if (p.block_table != nullptr || p.num_splits > 1) return true;
  if (p.dropout_p > 0.f) return false;
  return row_blocks(p) <= 2;
}

// Four-warp CTAs where the call has a tile for every SM (units >= SMs; slots: the CTAs
// all SMs hold at once). One such CTA on each SM already draws the SMs' share of the
// bandwidth, so tiles that all fit the slots at once run unsplit. Past one wave of
// slots the CTAs that wait for a slot run at the end nearly alone: a partial wave
// costs about 0.3 of a wave more than its share, and each split about 0.3% of the
// call (its CTAs' start and end, the combine). Measured on an H200 (sweeps of every
// split count, benchmarks/RESULTS.md): unsplit, 17-30 entries x 8 kv heads at 8192
// keys read 4200-4310 GB/s (hdim 128) where the old count (the waves' efficiency,
// below) took 3970-4250; 34 entries (272 tiles on 264 slots) 3480 unsplit, 4140-4260
// in 3-6 splits; 40 and 56 entries 3720 and 4120 unsplit, 4300 and 4340 in 4; 62
// (496 tiles) best unsplit, 16 splits 5% under it. With two CTAs an SM, from two
// waves on the CTAs no longer end together and the last wave costs its share:
// unsplit. With one (head dims above 128) the waves stay in step up to about five
// (hdim 256, unsplit / best: 34 x 8192, 2.1 waves, 3820 / 4380 in 3 splits; 56 x 8192,
// 3.4 waves, 4020 / 4430; 70 x 4096, 4.2 waves, 3950 / 4290), not at six (100 x 2048:
// unsplit best, 4350; 2 splits 4150).
inline int splits_past_the_sms(int64_t units, int64_t slots, int per_sm, int max_splits) {
  const int64_t upto = per_sm == 1 ? 5 : 2;  // waves
  if (units <= slots || units >= upto * slots) return 1;
  if (max_splits > 16) max_splits = 16;
  double eff[17] = {0.0}, best = 0.0;
  for (int s = 1; s <= max_splits; ++s) {
    const double waves = double(units * s) / double(slots);
    const double whole = double(int64_t(waves)), part = waves - whole;
    eff[s] = waves / (whole + (part > 0.0 ? 0.3 + 0.7 * part : 0.0)) * (1.0 - 0.003 * (s - 1));
    if (eff[s] > best) best = eff[s];
  }
  for (int s = 1; s <= max_splits; ++s)
    if (eff[s] >= best - 0.015) return s;  // the fewest splits within 1.5% of the best
  return 1;
}

// The number of splits: at least 128 keys each; past the SMs for four-warp CTAs as
// above, else enough CTAs to fill every SM's slots in whole waves.
inline int choose_splits(const FlashAttnParams &p, int d, int num_sms, Shape shape) {
  const int64_t units = int64_t(p.batch) * p.nheads_k * row_blocks(p);
  const int64_t slots = int64_t(num_sms) * ctas_per_sm(d, shape);
  int max_splits = p.seqlen_k / 128;
  if (max_splits > FLASH_MAX_SPLITS) max_splits = FLASH_MAX_SPLITS;
  if (max_splits <= 1) return 1;
  if (shape.w > 1 && units >= num_sms)
    return splits_past_the_sms(units, slots, ctas_per_sm(d, shape), max_splits);
  if (units >= slots) return 1;
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
