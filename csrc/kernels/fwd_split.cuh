// Split-KV forward, for decode-shaped calls and paged KV caches.
//
// A CTA takes 16 packed query rows of one (entry, kv head) and one split of that
// pair's keys: the query heads that share a kv head are packed into the rows (row r
// is query r / group of head hk * group + r % group), so each K/V byte is read once
// per split however many query heads use it. Keys stream through a cp.async pipeline
// of kStages stages; the CTA's W warps share each stage, warp w taking its w-th slice
// of BNW keys, and merge their partial softmax states through shared memory at the
// end. W = 1 (one warp a CTA, several CTAs an SM) is the portable shape; on sm_90,
// W = 4 with 128-key stages (one CTA an SM, fewer and longer streams: the shape
// cuDNN's decode kernel has), or with 64-key stages and more CTAs an SM (two, four at
// head dims 33-64) where the call has a tile for every SM (split_plan.h, shape()). The
// rows of a stage are copied in 16-byte chunks: for a paged cache each thread computes
// the addresses of one key row (from the block table) into shared memory a stage
// ahead, and the threads read them from there; for a contiguous one each thread steps
// its own row pointers (walk_kv_stage). With one split the CTA writes O and the LSE;
// with more, each split writes its normalised partial O and LSE (float32 workspace)
// and combine_kernel merges them.
#pragma once

#include <type_traits>

#include "divby.h"
#include "split_plan.h"
#include "tile.cuh"

namespace flash {

template <int D, int W, int BNW_>
struct SplitConfig {
  static constexpr int kWarps = W, kThreads = 32 * W;
  static constexpr int BNW = BNW_;   // keys a warp takes from each stage
  static constexpr int BN = W * BNW;  // keys a stage
  static constexpr int kStages = split::stages(D, W), LD = split::ld(D), LDQ = split::ldq(D);
  static constexpr bool kSwz = split::swizzled(D);  // K and V stage rows (tile.cuh, tile_at)
  static constexpr int kRows = split::kRows;
  static constexpr bool kQInRegs = D <= 128;  // above, Q's fragments stay in shared memory
  static constexpr size_t kSmem = split::smem_bytes(D, split::Shape{W, BNW});
};

// A barrier over the CTA (a warp's when it is one warp).
template <int W>
__device__ __forceinline__ void cta_sync() {
  if constexpr (W == 1) __syncwarp();
  else __syncthreads();
}

// The rows of k and v of one (entry, kv head), relative to its base pointers.
struct KeyRows {
  const int *pages;  // this entry's block-table row, or nullptr: contiguous rows
  DivBy page_size;   // (1 when contiguous: never used)
  int64_t k_page, v_page, k_row, v_row;  // strides (elements)

  // The block-table entry of key j (0 when contiguous). The kernel reads it a stage
  // ahead of its use, so filling a stage's row addresses never waits on the table.
  __device__ __forceinline__ int page_of(int j) const {
    return pages != nullptr ? pages[page_size.div(j)] : 0;
  }
  // Key j's offsets in k and v, given page_of(j).
  __device__ __forceinline__ void offsets(int j, int page, int64_t &ko, int64_t &vo) const {
    if (pages != nullptr) {
      const int r = j - page_size.div(j) * page_size.d;
      ko = int64_t(page) * k_page + r * k_row;
      vo = int64_t(page) * v_page + r * v_row;
    } else {
      ko = int64_t(j) * k_row;
      vo = int64_t(j) * v_row;
    }
  }
};

// The addresses of one key row of K and of V (read together: one 16-byte shared load).
template <typename T>
struct alignas(16) RowPair {
  const T *k, *v;
};

// K and V rows [n0, n0 + BN) into one pipeline stage by the CTA's W warps; rows past
// sk and columns past head_dim read as zero (a zero V row keeps 0 * garbage out of
// P V). Two ways:
// - walk_kv_stage (a contiguous cache, where a row is a whole number of 16-byte chunks
//   per 32 W threads: head dims 32, 64, 128, 256): each thread keeps one column chunk
//   and steps its own two row pointers down its rows, with no table of addresses and
//   no barrier (the caller's barrier frees the stage);
// - put_row_addresses then copy_kv_stage (paged caches, and the head dims the walk does
//   not cover): thread i < BN first puts the addresses of row i of K and V into a
//   table in shared memory (a row past sk gets the first row's, never read), and after
//   a barrier the threads copy 16-byte chunks of the rows the table names. The table
//   has two halves, block k's in half k % 2, written a stage before its copies: the
//   barrier the pipeline has a stage then orders each half's writes before its reads
//   and its reads before it is written again, so the table costs no barrier of its
//   own (it had two a stage).
// With the generic index arithmetic (the last branch of copy_kv_stage) the copies took
// half of a warp's instructions (SASS at head dim 128: ~20 a copy); walking the rows,
// a copy costs a shared load of the row's two addresses (or a pointer step), an add and
// a compare (~7). Contiguous without the table: decode GB/s +1-2% at head dim 128
// (H200, benchmarks/RESULTS.md).
template <int D, int W>
constexpr bool walks_rows() {
  return (32 * W) % (D / 8) == 0;
}

template <int D, int BN, int W, typename T>
__device__ __forceinline__ void walk_kv_stage(T *sK, T *sV, const T *kbase, const T *vbase,
                                              const KeyRows &rows, int n0, int sk, int hd, int tid) {
  constexpr int kCh = D / 8, LD = split::ld(D), NTHR = 32 * W, kRowsPerPass = NTHR / kCh;
  constexpr bool kSwz = split::swizzled(D);
  static_assert(walks_rows<D, W>(), "a whole number of rows a pass");
  // (the swizzled chunk depends on r % 8, the same for every row a thread takes when it
  // moves 8 or more rows a pass; else it is found per row)
  constexpr bool kFixedChunk = !kSwz || kRowsPerPass % 8 == 0;
  const int c = (tid % kCh) * 8, r0 = tid / kCh;
  const bool col_ok = c < hd;
  const T *kp = kbase + int64_t(n0 + r0) * rows.k_row + c, *vp = vbase + int64_t(n0 + r0) * rows.v_row + c;
  const int64_t kstep = kRowsPerPass * rows.k_row, vstep = kRowsPerPass * rows.v_row;
  T *dk = sK + tile_at<LD, kSwz>(r0, c), *dv = sV + tile_at<LD, kSwz>(r0, c);
#pragma unroll 4
  for (int r = r0; r < BN; r += kRowsPerPass) {
    const bool valid = col_ok && n0 + r < sk;
    if constexpr (!kFixedChunk) {
      dk = sK + tile_at<LD, kSwz>(r, c);
      dv = sV + tile_at<LD, kSwz>(r, c);
    }
    cp_async_16_stream(dk, valid ? kp : kbase, valid);
    cp_async_16_stream(dv, valid ? vp : vbase, valid);
    kp += kstep;
    vp += vstep;
    if constexpr (kFixedChunk) {
      dk += kRowsPerPass * LD;
      dv += kRowsPerPass * LD;
    }
  }
}

// Row n0 + tid's addresses into the table (page: rows.page_of(n0 + tid)).
template <int BN, typename T>
__device__ __forceinline__ void put_row_addresses(RowPair<T> *sRow, const T *kbase, const T *vbase,
                                                  const KeyRows &rows, int n0, int sk, int tid,
                                                  int page) {
  if (tid < BN) {
    int64_t ko = 0, vo = 0;
    if (n0 + tid < sk) rows.offsets(n0 + tid, page, ko, vo);
    sRow[tid] = RowPair<T>{kbase + ko, vbase + vo};
  }
}

// The rows the table names into the stage (the table's writes are behind a barrier).
template <int D, int BN, int W, typename T>
__device__ __forceinline__ void copy_kv_stage(T *sK, T *sV, const RowPair<T> *sRow, int n0, int sk,
                                              int hd, int tid) {
  constexpr int kCh = D / 8, LD = split::ld(D), kTotal = BN * kCh, NTHR = 32 * W;
  constexpr bool kSwz = split::swizzled(D);
  static_assert(BN <= NTHR, "one row address a thread");
  if constexpr (walks_rows<D, W>()) {
    constexpr int kRowsPerPass = NTHR / kCh;
    const int c = (tid % kCh) * 8, r0 = tid / kCh;
    const bool col_ok = c < hd;
    constexpr bool kFixedChunk = !kSwz || kRowsPerPass % 8 == 0;  // (as in walk_kv_stage)
    T *dk = sK + tile_at<LD, kSwz>(r0, c), *dv = sV + tile_at<LD, kSwz>(r0, c);
#pragma unroll 4
    for (int r = r0; r < BN; r += kRowsPerPass) {
      const bool valid = col_ok && n0 + r < sk;
      const RowPair<T> row = sRow[r];
      if constexpr (kFixedChunk) {
        cp_async_16_stream(dk, row.k + c, valid);
        cp_async_16_stream(dv, row.v + c, valid);
        dk += kRowsPerPass * LD;
        dv += kRowsPerPass * LD;
      } else {
        cp_async_16_stream(sK + tile_at<LD, kSwz>(r, c), row.k + c, valid);
        cp_async_16_stream(sV + tile_at<LD, kSwz>(r, c), row.v + c, valid);
      }
    }
  } else {
#pragma unroll 2  // more unrolling hoists every address into registers the MMAs need
    for (int idx = tid; idx < kTotal; idx += NTHR) {
      const int r = idx / kCh, c = (idx % kCh) * 8;
      const bool valid = n0 + r < sk && c < hd;
      const RowPair<T> row = sRow[r];
      cp_async_16_stream(sK + tile_at<LD, kSwz>(r, c), row.k + c, valid);
      cp_async_16_stream(sV + tile_at<LD, kSwz>(r, c), row.v + c, valid);
    }
  }
}

template <int D, int W, int BNW_, typename T>
__global__ void __launch_bounds__(32 * W) fwd_split_kernel(const FlashAttnParams p) {
  using C = SplitConfig<D, W, BNW_>;
  constexpr int BN = C::BN, BNW = C::BNW, LD = C::LD, LDQ = C::LDQ, S = C::kStages, KS = D / 16,
                DT = D / 8;
  constexpr bool kSwz = C::kSwz;
  constexpr int NT = BNW / 8, R = C::kRows, NTHR = C::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem);
  T *sK = sQ + R * LDQ;      // S stages
  T *sV = sK + S * BN * LD;  // S stages
  // The row-address table: 2 x BN (k, v) pairs, block k's in half k % 2.
  RowPair<T> *sRow = reinterpret_cast<RowPair<T> *>(sV + S * BN * LD);
  const auto table_half = [&](int k) { return sRow + (k & 1) * BN; };

  if (call_aborted(p.abort_flag)) return;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int nsplit = p.num_splits, split = blockIdx.x % nsplit, r0 = blockIdx.x / nsplit * R;
  const int hk = blockIdx.y, b = blockIdx.z, group = p.nheads / p.nheads_k;
  const SeqInfo seq(p, b);
  const int rows = seq.sq * group;
  if (r0 >= rows) return;
  const int hd = p.head_dim;
  const Visibility vis{seq.sq, seq.sk, p.window_left, p.window_right};

  // This thread's two fragment rows (g and g + 8): query, head, visible keys, slope.
  int qi[2], hq[2], lo[2], hi[2];
  bool live[2];
  float slope[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int pr = r0 + g + 8 * r;
    live[r] = pr < rows;
    qi[r] = live[r] ? pr / group : 0;
    hq[r] = hk * group + (live[r] ? pr % group : 0);
    vis.key_range(qi[r], qi[r] + 1, lo[r], hi[r]);
    slope[r] = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + hq[r]] : 0.f;
  }
  const bool modded = p.softcap > 0.f || p.alibi_slopes != nullptr;
  const float scale_log2 = p.scale * kLog2e;
  // the keys both rows see (row g's alone where row g + 8 holds no query)
  const int lo_all = live[1] ? max(lo[0], lo[1]) : lo[0], hi_all = live[1] ? min(hi[0], hi[1]) : hi[0];

  // This split's key blocks: an even share of the blocks the tile's queries see.
  int nb_lo, nb_hi;
  vis.key_blocks(r0 / group, (min(r0 + R, rows) - 1) / group + 1, BN, nb_lo, nb_hi);
  const int per = (nb_hi - nb_lo + nsplit - 1) / nsplit;
  const int blk_lo = min(nb_hi, nb_lo + split * per), blk_hi = min(nb_hi, blk_lo + per);
  const int nblk = blk_hi - blk_lo;

  // Queries: packed rows of the q tensor.
  {
    constexpr int kCh = D / 8;
    for (int idx = tid; idx < R * kCh; idx += NTHR) {
      const int r = idx / kCh, c = (idx % kCh) * 8, pr = r0 + r;
      const bool valid = pr < rows && c < hd;
      const T *src = static_cast<const T *>(p.q);
      if (valid)
        src = seq.q_ptr<T>(p, b, hk * group + pr % group) + int64_t(pr / group) * p.q_row_stride + c;
      cp_async_16(sQ + r * LDQ + c, src, valid);
    }
    cp_async_commit();
  }

  const bool paged = p.block_table != nullptr;
  const KeyRows krows{paged ? p.block_table + b * p.block_table_batch_stride : nullptr,
                      DivBy(paged ? p.page_size : 1),
                      p.k_batch_stride, p.v_batch_stride, p.k_row_stride, p.v_row_stride};
  const T *kbase = paged ? static_cast<const T *>(p.k) + hk * p.k_head_stride : seq.k_ptr<T>(p, b, hk);
  const T *vbase = paged ? static_cast<const T *>(p.v) + hk * p.v_head_stride : seq.v_ptr<T>(p, b, hk);
  // The page of this thread's row in a block (read a stage before the block's addresses
  // are put in the table, which is a stage before the block is loaded).
  const auto page_for = [&](int blk) {
    const int j = blk * BN + tid;
    return tid < BN && blk < blk_hi && j < seq.sk ? krows.page_of(j) : 0;
  };
  // The block-table lines those reads find: L1 is asked for the entry of the first key of
  // each of the first kPagesAhead blocks now, and of block i + kPagesAhead at step i (a
  // line of 32 entries spans at least 512 keys, 4 blocks), so that page_for finds its line
  // there instead of waiting on DRAM a step before each load: a split of a long cache in
  // pages of 16 reads a new line every 4 one-warp blocks.
  constexpr int kPagesAhead = 16;
  const auto prefetch_pages = [&](int blk) {
    if (blk < blk_hi) prefetch_l1(krows.pages + krows.page_size.div(blk * BN));
  };
  if (paged && tid < kPagesAhead) prefetch_pages(blk_lo + tid);
  // Stage copies through the table (paged, or a head dim the walk does not cover), else
  // by walking the rows. Block k's table half is written before its copies: at once for
  // the first S - 1 blocks (here, a barrier between), a stage ahead for the rest (the
  // loop's barrier between); the next half to write's page is read a stage ahead too.
  const bool by_table = paged || !walks_rows<D, W>();
  const auto load_stage = [&](int k) {  // block blk_lo + k into stage k % S
    const int st = k % S, n0 = (blk_lo + k) * BN;
    if (by_table)
      copy_kv_stage<D, BN, W, T>(sK + st * BN * LD, sV + st * BN * LD, table_half(k), n0, seq.sk, hd, tid);
    else if constexpr (walks_rows<D, W>())
      walk_kv_stage<D, BN, W, T>(sK + st * BN * LD, sV + st * BN * LD, kbase, vbase, krows, n0, seq.sk,
                                 hd, tid);
  };
  int page = by_table ? page_for(blk_lo) : 0;
  const auto put_rows = [&](int k) {  // block blk_lo + k's addresses; then the next page
    put_row_addresses<BN, T>(table_half(k), kbase, vbase, krows, (blk_lo + k) * BN, seq.sk, tid, page);
    page = page_for(blk_lo + k + 1);
  };
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if (st < nblk) {
      if (by_table) {
        if (st >= 2) cta_sync<W>();  // block st - 2's copies are done reading this half
        put_rows(st);
        cta_sync<W>();
      }
      load_stage(st);
    }
    cp_async_commit();
  }
  if (by_table && S - 1 < nblk) {  // block S - 1's addresses, read after the loop's first barrier
    if (S - 1 >= 2) cta_sync<W>();
    put_rows(S - 1);
  }

  float acc_o[1][DT][4];
  zero(acc_o[0]);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  uint32_t q_frag[1][C::kQInRegs ? KS : 1][4];
  cp_async_wait<S - 1>();  // the queries' group
  cta_sync<W>();
  if constexpr (C::kQInRegs) load_a<KS, LDQ>(q_frag[0], sQ, lane);

  // The grid after this one (the combine, or the next call's kernel) may be placed once
  // every CTA has reached its last block: not earlier, as its CTAs would then sit on the
  // SMs through this grid's whole run (triggered at the start, the one-warp kernel over
  // pages of 16 at 64 x 4096 hdim 64 lost 12%; H200, benchmarks/RESULTS.md).
  if (nblk == 0) allow_dependents();
  // The key loop for NR fragment rows a thread. NR = 1 in the wide kernel where the
  // tile's packed rows end by row 8 (a decode step of a group of up to 8 query heads:
  // rows g + 8 hold no query, their scores are 0 and their P stays 0), so no thread spends
  // the softmax's instructions on a row that does not exist: H200 decode +0.5-2% at head
  // dims 64-256 (benchmarks/RESULTS.md). The one-warp kernel keeps one loop (its second
  // copy measured -1 to +1% there and cost it a spill at head dim 64).
  const auto key_loop = [&](auto live_rows) {
    constexpr int NR = decltype(live_rows)::value;
    for (int i = 0; i < nblk; ++i) {
      if (i == nblk - 1) allow_dependents();
      cp_async_wait<S - 2>();  // block i landed
      cta_sync<W>();           // for every thread, and all are done with the stage the next load reuses
      if (i + S - 1 < nblk) load_stage(i + S - 1);
      cp_async_commit();
      // Block i + S's addresses into the half block i + S - 2's copies read (the barrier
      // above ends those; the next one orders these writes before block i + S's copies).
      if (by_table && i + S < nblk) put_rows(i + S);
      if (paged && tid == 0) prefetch_pages(blk_lo + i + kPagesAhead);
      // This warp's slice of the stage: keys n0 .. n0 + BNW.
      const T *sKi = sK + (i % S) * BN * LD + warp * BNW * LD;
      const T *sVi = sV + (i % S) * BN * LD + warp * BNW * LD;
      const int n0 = (blk_lo + i) * BN + warp * BNW;

      float s[1][NT][4];
      zero(s[0]);
      if constexpr (C::kQInRegs) gemm_rs_nt<1, NT, KS, LD, T, kSwz>(s, q_frag, sKi, lane);
      else gemm_ss_nt<1, NT, KS, LD, T, kSwz, LDQ>(s, sQ, sKi, lane);

      // Scores in log2 units, invisible keys -inf; then the online softmax. A block whose
      // keys both of this thread's rows see, without softcap or ALiBi (most blocks of a
      // decode), needs no per-key test, and its scores stay raw: the maximum is taken
      // over them and scaled once (a positive scale keeps it the maximum of the scaled
      // scores), and the scale goes into the exponent's FFMA (one multiply a score
      // fewer). The output is rescaled only where a row's maximum grew.
      const bool plain = !modded && scale_log2 > 0.f && n0 >= lo_all && n0 + BNW <= hi_all;
      const float exp_scale = plain ? scale_log2 : 1.f;  // what the scores still need
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        float mx = row_max[r];
        if (plain) {
          float raw = -INFINITY;
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) raw = fmaxf(raw, s[0][j][2 * r + e]);
          mx = fmaxf(mx, raw * scale_log2);
        } else {
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int key = n0 + j * 8 + 2 * t + e;
              float x = s[0][j][2 * r + e];
              if (modded) {
                x *= p.scale;
                if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
                x -= slope[r] * fabsf(static_cast<float>(qi[r] + vis.off() - key));
                x *= kLog2e;
              } else {
                x *= scale_log2;
              }
              x = (key < lo[r] || key >= hi[r]) ? -INFINITY : x;
              s[0][j][2 * r + e] = x;
              mx = fmaxf(mx, x);
            }
        }
        mx = quad_max(mx);
        const float base = mx == -INFINITY ? 0.f : mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = exp2_approx(fmaf(s[0][j][2 * r + e], exp_scale, -base));
            s[0][j][2 * r + e] = pe;
            sum += pe;
          }
        if (mx != row_max[r]) {  // (a row that saw only -inf keeps a zero output and sum)
          const float alpha = exp2_approx(row_max[r] - base);
          row_sum[r] *= alpha;
#pragma unroll
          for (int j = 0; j < DT; ++j) {
            acc_o[0][j][2 * r] *= alpha;
            acc_o[0][j][2 * r + 1] *= alpha;
          }
        }
        row_max[r] = mx;
        row_sum[r] += sum;
      }
      uint32_t p_frag[1][BNW / 16][4];
      pack_a<BNW / 16, T>(p_frag[0], s[0]);
      gemm_rs_nn<1, DT, BNW / 16, LD, T, kSwz>(acc_o, p_frag, sVi, lane);
    }
  };
  if constexpr (W > 1) {
    if (r0 + 8 >= rows) key_loop(std::integral_constant<int, 1>{});
    else key_loop(std::integral_constant<int, 2>{});
  } else {
    key_loop(std::integral_constant<int, 2>{});
  }
  cp_async_wait_all();

  // Results: O and the LSE (one split), or this split's normalised partials. (The
  // combine kernel, launched dependent on this one where the GPU allows, still waits
  // for this grid to finish and its writes to land: call_aborted.)
  const bool partial = nsplit > 1;
  const int64_t plane = int64_t(p.nheads) * p.total_q;
  if constexpr (W == 1) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_sum[r]);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      if (!live[r]) continue;
      const float lse = l > 0.f ? row_max[r] * kLn2 + logf(l) : (partial ? -INFINITY : INFINITY);
      if (partial) {
        const int grow = seq.varlen ? seq.q_start + qi[r] : b * p.seqlen_q + qi[r];
        const int64_t row = split * plane + int64_t(hq[r]) * p.total_q + grow;
        if (t == 0) p.lse_accum[row] = lse;
        float *dst = p.oaccum + row * hd;
#pragma unroll
        for (int j = 0; j < DT; ++j) {
          const int c = j * 8 + 2 * t;
          if (c < hd)
            *reinterpret_cast<float2 *>(dst + c) =
                make_float2(acc_o[0][j][2 * r] * inv, acc_o[0][j][2 * r + 1] * inv);
        }
      } else {
        if (t == 0) p.lse[seq.lse_off(p, b, hq[r]) + qi[r]] = lse;
        T *dst = seq.o_ptr<T>(p, b, hq[r]) + int64_t(qi[r]) * p.o_row_stride;
#pragma unroll
        for (int j = 0; j < DT; ++j) {
          const int c = j * 8 + 2 * t;
          if (c < hd)
            *reinterpret_cast<uint32_t *>(dst + c) =
                pack2<T>(acc_o[0][j][2 * r] * inv, acc_o[0][j][2 * r + 1] * inv);
        }
      }
    }
  } else {
    // The warps' states (max, sum, unnormalised output of each row) meet in shared
    // memory, over the stages: weights exp2(m_w - M) / L per warp and row, then each
    // thread writes 4 columns of a row.
    __syncthreads();  // every warp is done with the stages
    float *sO = reinterpret_cast<float *>(sK);  // W x R x D
    float *sM = sO + W * R * D, *sL = sM + W * R, *sWt = sL + W * R, *sLse = sWt + W * R;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * R + g + 8 * r;
      const float l = quad_sum(row_sum[r]);
      if (t == 0) {
        sM[row] = row_max[r];
        sL[row] = l;
      }
#pragma unroll
      for (int j = 0; j < DT; ++j)
        *reinterpret_cast<float2 *>(sO + row * D + j * 8 + 2 * t) =
            make_float2(acc_o[0][j][2 * r], acc_o[0][j][2 * r + 1]);
    }
    __syncthreads();
    if (tid < R) {
      float mx = -INFINITY, l = 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) mx = fmaxf(mx, sM[w * R + tid]);
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float m = sM[w * R + tid];
        const float e = m == -INFINITY ? 0.f : exp2_approx(m - mx);
        sWt[w * R + tid] = e;
        l += e * sL[w * R + tid];
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) sWt[w * R + tid] *= inv;
      sLse[tid] = l > 0.f ? mx * kLn2 + logf(l) : (partial ? -INFINITY : INFINITY);
    }
    __syncthreads();
    for (int idx = tid; idx < R * (D / 4); idx += NTHR) {
      const int r = idx / (D / 4), c = (idx % (D / 4)) * 4, pr = r0 + r;
      if (pr >= rows || c >= hd) continue;
      float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float wt = sWt[w * R + r];
        const float4 v = *reinterpret_cast<const float4 *>(sO + (w * R + r) * D + c);
        o.x += wt * v.x;
        o.y += wt * v.y;
        o.z += wt * v.z;
        o.w += wt * v.w;
      }
      const int q = pr / group, h = hk * group + pr % group;
      const float lse = sLse[r];
      if (partial) {
        const int grow = seq.varlen ? seq.q_start + q : b * p.seqlen_q + q;
        const int64_t row = split * plane + int64_t(h) * p.total_q + grow;
        if (c == 0) p.lse_accum[row] = lse;
        *reinterpret_cast<float4 *>(p.oaccum + row * hd + c) = o;
      } else {
        if (c == 0) p.lse[seq.lse_off(p, b, h) + q] = lse;
        T *dst = seq.o_ptr<T>(p, b, h) + int64_t(q) * p.o_row_stride + c;
        uint2 packed;
        packed.x = pack2<T>(o.x, o.y);
        packed.y = pack2<T>(o.z, o.w);
        *reinterpret_cast<uint2 *>(dst) = packed;
      }
    }
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Merges the splits' partials: one warp (a CTA) per (query row, head). Lane l holds the
// LSEs of splits l, l + 32, ... (max and sum over the splits by shuffles), and a column
// chunk of 4 with its share of the splits (lanes a chunk: a power of 2 when the chunks
// are at most 16; past 32 chunks a lane takes two). Every load goes out before any
// result is needed, the LSEs with the first kAhead partials of each chunk, so the merge
// waits on one round of loads where a lane's share is at most kAhead splits (the
// decode's splits: 16 or 32 at head dims 64-128); the rest of a longer share follows.
// Each split's weight exp(lse_s - lse) goes to shared memory once, for the lanes that
// hold its partial. A split that saw no key has LSE -inf and weight 0 (its partial O,
// never written, is skipped, not multiplied by 0); a row no split saw gets O = 0 and
// LSE +inf, as the unsplit kernels give. (Against a CTA of 128 threads a pair, whose
// reductions took five barriers: H200 decode +0.5-1% where a combine runs; the old
// combine's work was 0.3-1.5 us of a 22-70 us call, its launch 0.6-1.6 us more;
// benchmarks/RESULTS.md.)
//
// The combine's work for chunks c0 and (NC = 2) c0 + 32 of one (row, head), lanes `lpc`
// a chunk (sub: this lane's place among them), weights in sw once the LSEs are in.
template <int NC, typename T>
__device__ __forceinline__ void combine_row(const FlashAttnParams &p, int h, int grow, bool active, int c0,
                                            int sub, int lpc, float *sw, int lane) {
  constexpr int kAhead = 16 / NC;
  const int ns = p.num_splits, chunks = p.head_dim / 4;
  const int64_t plane = int64_t(p.nheads) * p.total_q, row = int64_t(h) * p.total_q + grow;
  const int64_t stride = plane * p.head_dim;        // from one split's partial to the next
  const float *part = p.oaccum + row * p.head_dim;  // split s: part + s * stride
  bool has[NC];
#pragma unroll
  for (int k = 0; k < NC; ++k) has[k] = active && c0 + 32 * k < chunks;
  // (pointers stepped a share's split at a time: the loads' addresses cost an add each)
  float4 ahead[NC][kAhead];
  const float *src = part + int64_t(sub) * stride + 4 * c0;
  const int64_t step = int64_t(lpc) * stride;
#pragma unroll
  for (int i = 0; i < kAhead; ++i) {
    const bool in = sub + i * lpc < ns;
#pragma unroll
    for (int k = 0; k < NC; ++k) ahead[k][i] = ld_volatile_f4(src + 4 * 32 * k, has[k] && in);
    src += step;
  }
  float ls[FLASH_MAX_SPLITS / 32];
  const float *lse_src = p.lse_accum + int64_t(lane) * plane + row;
#pragma unroll
  for (int j = 0; j < FLASH_MAX_SPLITS / 32; ++j) {
    const bool in = lane + 32 * j < ns;
    ls[j] = ld_volatile_f32(lse_src, in);
    if (!in) ls[j] = -INFINITY;
    lse_src += 32 * plane;
  }
  float mx = ls[0];
#pragma unroll
  for (int j = 1; j < FLASH_MAX_SPLITS / 32; ++j) mx = fmaxf(mx, ls[j]);
  mx = warp_max(mx);
  float e[FLASH_MAX_SPLITS / 32], sum = 0.f;
#pragma unroll
  for (int j = 0; j < FLASH_MAX_SPLITS / 32; ++j) {
    e[j] = (mx == -INFINITY || ls[j] == -INFINITY) ? 0.f : expf(ls[j] - mx);
    sum += e[j];
  }
  sum = warp_sum(sum);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
  for (int j = 0; j < FLASH_MAX_SPLITS / 32; ++j)
    if (lane + 32 * j < ns) sw[lane + 32 * j] = e[j] * inv;
  __syncwarp();

  float4 acc[NC];
#pragma unroll
  for (int k = 0; k < NC; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  const auto add = [&](int k, float w, const float4 &v) {
    acc[k].x += w * v.x;
    acc[k].y += w * v.y;
    acc[k].z += w * v.z;
    acc[k].w += w * v.w;
  };
#pragma unroll
  for (int i = 0; i < kAhead; ++i) {
    const int s = sub + i * lpc;
    const float w = s < ns ? sw[s] : 0.f;
    if (w == 0.f) continue;  // (an empty split's partial may hold anything)
#pragma unroll
    for (int k = 0; k < NC; ++k) add(k, w, ahead[k][i]);
  }
#pragma unroll 4
  for (int s = sub + kAhead * lpc; s < ns; s += lpc, src += step) {
    const float w = sw[s];
    if (w == 0.f) continue;
#pragma unroll
    for (int k = 0; k < NC; ++k)
      if (has[k]) add(k, w, ld_volatile_f4(src + 4 * 32 * k, true));
  }
  // the chunk's lanes are lpc aligned neighbours: their shares add up by shuffles
  for (int o = 1; o < lpc; o *= 2) {
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      acc[k].x += __shfl_xor_sync(0xffffffffu, acc[k].x, o);
      acc[k].y += __shfl_xor_sync(0xffffffffu, acc[k].y, o);
      acc[k].z += __shfl_xor_sync(0xffffffffu, acc[k].z, o);
      acc[k].w += __shfl_xor_sync(0xffffffffu, acc[k].w, o);
    }
  }
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int b = varlen ? 0 : grow / p.seqlen_q, qi = varlen ? grow : grow % p.seqlen_q;
  if (lane == 0)
    p.lse[(varlen ? 0 : int64_t(b) * p.lse_batch_stride) + int64_t(h) * p.lse_head_stride + qi] =
        mx == -INFINITY ? INFINITY : mx + logf(sum);
  if (!active || sub != 0) return;
  T *o = static_cast<T *>(p.o) + (varlen ? 0 : int64_t(b) * p.o_batch_stride) + int64_t(qi) * p.o_row_stride +
         int64_t(h) * p.o_head_stride;
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    if (!has[k]) continue;
    uint2 packed;
    packed.x = pack2<T>(acc[k].x, acc[k].y);
    packed.y = pack2<T>(acc[k].z, acc[k].w);
    *reinterpret_cast<uint2 *>(o + 4 * (c0 + 32 * k)) = packed;
  }
}

template <typename T>
__global__ void __launch_bounds__(32) combine_kernel(const FlashAttnParams p) {
  __shared__ float sw[FLASH_MAX_SPLITS];
  if (call_aborted(p.abort_flag)) return;  // (first waits for the split grid: a dependent launch)
  allow_dependents();  // a short grid: the next one may be placed at once
  const int lane = threadIdx.x;
  const int h = int(blockIdx.x % p.nheads), grow = int(blockIdx.x / p.nheads);
  const int chunks = p.head_dim / 4;  // head_dim in [8, 256]: chunks in [2, 64]
  if (chunks > 32) {
    combine_row<2, T>(p, h, grow, true, lane, 0, 1, sw, lane);
  } else {
    int lpc = 1;  // lanes a chunk: the largest power of 2 with lpc * chunks <= 32
    while (2 * lpc * chunks <= 32) lpc *= 2;
    // (lanes past the chunks hold LSEs and join the shuffles, but load and store no O)
    combine_row<1, T>(p, h, grow, lane / lpc < chunks, lane / lpc, lane % lpc, lpc, sw, lane);
  }
}

// The split kernel of one CTA shape (W warps, BNW keys a warp), as a dependent launch
// (call_aborted waits for the grid before).
template <int D, int W, int BNW, typename T>
int launch_split(const dim3 &grid, const FlashAttnParams &p, cudaStream_t stream) {
  return launch(fwd_split_kernel<D, W, BNW, T>, grid, 32 * W, SplitConfig<D, W, BNW>::kSmem, stream, p,
                /*dependent=*/true);
}

template <int D, typename T>
int run_fwd_split(const FlashAttnParams &p, cudaStream_t stream) {
  if (p.num_splits < 1 || p.num_splits > FLASH_MAX_SPLITS ||
      (p.num_splits > 1 && (p.oaccum == nullptr || p.lse_accum == nullptr)))
    return FLASH_ERR_BAD_ARGUMENT;
  const dim3 grid(split::row_blocks(p) * p.num_splits, p.nheads_k, p.batch);
  // (wide_pair is wide itself at head dims <= 32 and > 128: one kernel, not two)
  constexpr split::Shape kOne = split::one_warp(D), kWide = split::wide(D), kPair = split::wide_pair(D);
  const split::Shape shape = split::shape(p, D);
  int status;
#if defined(FLASH_HAS_SM90A)
  if (shape.w != 1 && shape.bnw == kPair.bnw)
    status = launch_split<D, kPair.w, kPair.bnw, T>(grid, p, stream);
  else if (shape.w != 1)
    status = launch_split<D, kWide.w, kWide.bnw, T>(grid, p, stream);
  else
#endif
    status = launch_split<D, kOne.w, kOne.bnw, T>(grid, p, stream);
  if (status != FLASH_OK || p.num_splits == 1) return status;
  // the merge, a dependent launch too
  const int64_t pairs = int64_t(p.total_q) * p.nheads;
  return launch(combine_kernel<T>, dim3(unsigned(pairs)), 32, 0, stream, p, /*dependent=*/true);
}

}  // namespace flash
