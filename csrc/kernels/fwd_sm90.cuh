// Forward on Hopper: the algorithm of fwd_launch.cuh with warpgroup MMAs.
// Each warpgroup (4 warps) owns 64 query rows of a CTA's two; S = Q K^T reads Q
// and K from swizzled shared memory, O += P V takes P from registers. K and V
// stream through two stages that the warpgroups hand over through mbarriers, so
// neither waits for the other and one's softmax runs under the other's MMAs.
// Head dim 64 runs two such CTAs per SM (96-key blocks), above one (measured on
// H100, benchmarks/RESULTS.md).
#pragma once

#include <type_traits>

#include "dropout.cuh"
#include "sm90.cuh"

namespace flash {

// One key block of the online softmax, in place: the scores s (rows i0 and
// i0 + 8 of this thread, keys from n0) get the score mod and the mask, become
// P = exp2(score - running max) in log2 units, the row statistics move on, and
// the output accumulated so far is rescaled to the new maximum.
template <int NT, int DA>
__device__ __forceinline__ void softmax_block(float (&s)[NT][4], float (&acc_o)[DA][8][4], float (&row_max)[2],
                                              float (&row_sum)[2], const ScoreMod &mod, const Visibility &vis,
                                              bool masked, int i0, int n0, int t) {
  float scale = 1.f;  // folded into the exponent when no score mod
  if (mod.active) {
    mod_fragment<NT>(s, mod, i0, n0, t, vis.off());
  } else {
    scale = mod.scale_log2;
  }
  if (masked) mask_fragment<false>(s, vis, i0, n0, t, -INFINITY);
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    mx = fmaxf(row_max[r], quad_max(mx) * scale);  // row_max is in log2 units
    const float base = mx == -INFINITY ? 0.f : mx;
    alpha[r] = exp2_approx(row_max[r] - base);
    row_max[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][2 * r] = exp2_approx(fmaf(s[j][2 * r], scale, -base));
      s[j][2 * r + 1] = exp2_approx(fmaf(s[j][2 * r + 1], scale, -base));
      sum += s[j][2 * r] + s[j][2 * r + 1];
    }
    row_sum[r] = row_sum[r] * alpha[r] + sum;
  }
#pragma unroll
  for (int a = 0; a < DA; ++a)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      acc_o[a][j][0] *= alpha[0];
      acc_o[a][j][1] *= alpha[0];
      acc_o[a][j][2] *= alpha[1];
      acc_o[a][j][3] *= alpha[1];
    }
}

// The end of a row block: the log-sum-exp of rows r0 and r0 + 8 (those below
// sq) and the factors 1 / rowsum that normalise O.
__device__ __forceinline__ void finish_rows(const float (&row_max)[2], const float (&row_sum)[2], float *lse,
                                            int r0, int sq, int t, float (&inv)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int i = r0 + 8 * r;
    if (t == 0 && i < sq) lse[i] = l > 0.f ? row_max[r] * kLn2 + logf(l) : INFINITY;
  }
}

// S (this warpgroup's 64 rows x BN keys) = Q K^T from the swizzled tiles at
// qa (BM rows) and ka (BN rows); the caller commits and waits.
template <int BM, int BN, int D, typename T>
__device__ __forceinline__ void issue_qk(float (&s)[BN / 8][4], uint32_t qa, uint32_t ka) {
  sm90::warpgroup_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint64_t da = sm90::make_desc(qa + (kk / 4) * BM * 128 + (kk % 4) * 32, 16, 1024);
    const uint64_t db = sm90::make_desc(ka + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024);
    sm90::Wgmma<BN, T>::template ss<0>(s, da, db, kk > 0);
  }
}

// O += P V with P in registers and V the swizzled tile at va (BN rows, read N-major).
template <int BN, int D, typename T>
__device__ __forceinline__ void issue_pv(float (&acc_o)[D / 64][8][4], const uint32_t (&p_frag)[BN / 16][4],
                                         uint32_t va) {
  sm90::warpgroup_fence();
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
    for (int a = 0; a < D / 64; ++a) {
      const uint64_t db = sm90::make_desc(va + a * BN * 128 + kk * 16 * 128, 1024, 1024);
      sm90::Wgmma<64, T>::template rs<1>(acc_o[a], p_frag[kk], db, 1);
    }
}

// The append of a KV-cache prefill whose new rows the kernel reads from k_new / v_new
// (p.k_new): this CTA's share of them copied into the caches (k, v: entry b's cache row,
// head hk), new row i at key cs + i. The CTAs of one (entry, kv head), every query block
// of each query head of its group, take equal slices of its rows. The copies go out before
// the key loop, their reads beside the first tiles' (nothing waits for them: the
// attention reads these keys from k_new / v_new, never from the cache), and the stream's
// next kernel finds them done with the grid. U loads are issued before their stores.
// Nothing outside the caches is written: rows whose key is outside [0, seqlen_k), or an
// entry whose cache row is outside [0, cache_rows), are skipped.
template <int D, int NTHR, typename T>
__device__ __forceinline__ void write_new_rows(const FlashAttnParams &p, int b, T *kc, T *vc, const T *kn,
                                               const T *vn, int cs, int slice, int slices, int tid) {
  constexpr int kCh = D / 8, U = 4;  // 16-byte chunks of a row (of K, then of V)
  const int64_t row = p.kv_batch_idx != nullptr ? int64_t(p.kv_batch_idx[b]) : int64_t(b);
  if (row < 0 || row >= p.cache_rows) return;
  const int per = (p.seqlen_new + slices - 1) / slices, r_lo = slice * per;
  const int total = max(0, min(p.seqlen_new, r_lo + per) - r_lo) * 2 * kCh;
  for (int base = tid; base < total; base += U * NTHR) {
    uint4 val[U];
    T *dst[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int idx = base + u * NTHR, r = idx / (2 * kCh), part = idx % (2 * kCh);
      const bool is_v = part >= kCh;
      const int c = (is_v ? part - kCh : part) * 8, i = r_lo + r, key = cs + i;
      dst[u] = nullptr;
      if (idx < total && c < p.head_dim && key >= 0 && key < p.seqlen_k) {
        const T *src = is_v ? vn + int64_t(i) * p.v_new_row_stride + c : kn + int64_t(i) * p.k_new_row_stride + c;
        dst[u] = is_v ? vc + int64_t(key) * p.v_row_stride + c : kc + int64_t(key) * p.k_row_stride + c;
        val[u] = __ldg(reinterpret_cast<const uint4 *>(src));
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (dst[u] != nullptr) *reinterpret_cast<uint4 *>(dst[u]) = val[u];
  }
}

// BN keys a block, WG warpgroups of 64 query rows, STAGES stages of K and V,
// registers capped for MINB CTAs per SM.
template <int D_, int BN_, int WG_, int STAGES_ = 2, int MINB_ = 1>
struct FwdSm90Config {
  static_assert(D_ % 64 == 0, "the swizzled tiles are 64 columns wide");
  static constexpr int D = D_, BN = BN_, kWG = WG_, BM = 64 * kWG, kStages = STAGES_;
  static constexpr int kMinBlocks = MINB_;
  static constexpr int kThreads = 128 * kWG;
  static constexpr size_t kTileQ = size_t(BM) * D * 2, kTileKV = size_t(BN) * D * 2;
  // Q, the stages of K and V, the mbarriers, alignment slack
  static constexpr size_t kBarriers = kTileQ + 2 * kStages * kTileKV;
  static constexpr size_t kSmem = kBarriers + 8 * (1 + 4 * kStages) + 1024;
};

// Forward without CTA-wide barriers in the loop: every thread loads its share
// of Q, K and V (cp.async) and arrives on the stage's "full" mbarrier once its
// copies landed; it arrives on the stage's "read" mbarrier once its MMAs are
// done with it, and the stage is refilled when every thread has. The loads
// stay with all threads: a dedicated producer warpgroup issuing cp.async
// (tried) could not keep the MMAs fed on H100.
// kDrop: dropout (a separate instantiation: its registers would spill the plain one).
template <typename C, typename T, bool kDrop>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) fwd_sm90_kernel(const FlashAttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = C::D, BM = C::BM, BN = C::BN;
  constexpr int NT = BN / 8, PS = BN / 16, DA = D / 64;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char *smem = sm90::align_1024(smem_raw);
  T *sQ = reinterpret_cast<T *>(smem);
  constexpr int S = C::kStages;
  auto sK = [&](int stage) { return reinterpret_cast<T *>(smem + C::kTileQ + stage * C::kTileKV); };
  auto sV = [&](int stage) {
    return reinterpret_cast<T *>(smem + C::kTileQ + (S + stage) * C::kTileKV);
  };
  // mbarriers: Q landed; K / V of stage s landed (full) or read by every thread (empty)
  uint64_t *bars = reinterpret_cast<uint64_t *>(smem + C::kBarriers);
  uint64_t *q_full = bars, *k_full = bars + 1, *v_full = bars + 1 + S, *k_empty = bars + 1 + 2 * S,
           *v_empty = bars + 1 + 3 * S;

  if (call_aborted(p.abort_flag)) return;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int wg = warp / 4;
  const TileCoords tc = tile_coords(true);
  const int m_block = tc.tile, h = tc.h, b = tc.b;
  const SeqInfo seq(p, b);
  const int m0 = m_block * BM;
  if (m0 >= seq.sq) return;
  const int hk = h / (p.nheads / p.nheads_k);
  const Visibility vis{seq.sq, seq.sk, p.window_left, p.window_right};
  // A KV-cache forward whose new rows this kernel reads in place (p.k_new; it also writes
  // them into the cache: write_new_rows): keys [cs, sk) are rows 0.. of k_new / v_new. The
  // key blocks are shifted by kofs so that one of them starts at cs: each block then comes
  // whole from one source (the first may start below key 0: those rows are masked).
  // (never with dropout, reads_new_rows: the dropout kernels compile without the copy,
  // whose registers would spill them)
  const bool new_rows = !kDrop && p.k_new != nullptr;
  const int cs = new_rows ? seq.sk - p.seqlen_new : seq.sk;
  const int kofs = new_rows ? (BN - cs % BN) % BN : 0;
  int nb_lo, nb_hi;
  vis.key_blocks(m0, min(m0 + BM, seq.sq), BN, nb_lo, nb_hi, kofs);
  const int n = nb_hi - nb_lo;  // block it is nb_hi - 1 - it

  if (tid == 0) {
    sm90::mbar_init(q_full, C::kThreads);
    for (int s = 0; s < S; ++s) {
      sm90::mbar_init(k_full + s, C::kThreads);
      sm90::mbar_init(v_full + s, C::kThreads);
      sm90::mbar_init(k_empty + s, C::kThreads);
      sm90::mbar_init(v_empty + s, C::kThreads);
    }
  }
  __syncthreads();
  const T *q = seq.q_ptr<T>(p, b, h);
  const T *k = seq.k_ptr<T>(p, b, hk);
  const T *v = seq.v_ptr<T>(p, b, hk);
  // the new rows, as if they continued k / v at key cs (used only for blocks from cs on)
  const T *kn = new_rows ? static_cast<const T *>(p.k_new) + b * p.k_new_batch_stride + hk * p.k_new_head_stride : k;
  const T *vn = new_rows ? static_cast<const T *>(p.v_new) + b * p.v_new_batch_stride + hk * p.v_new_head_stride : v;
  // Every thread loads its share of a block and arrives once its copies landed: rows of
  // the cache, or of the new rows from cs on.
  auto load_block = [&](T *dst, uint64_t *full, const T *cache, const T *fresh_rows, int64_t ld_cache,
                        int64_t ld_new, int it) {
    const int n0 = (nb_hi - 1 - it) * BN - kofs;
    const bool fresh = n0 >= cs;
    const int64_t ld = fresh ? ld_new : ld_cache;
    sm90::load_tile_sw<BN, D, C::kThreads>(dst, (fresh ? fresh_rows + int64_t(n0 - cs) * ld : cache + int64_t(n0) * ld),
                                             ld, seq.sk - n0, p.head_dim, cache, tid, -n0);
    sm90::cp_async_mbar_arrive(full);
  };
  auto load_k = [&](int it) { load_block(sK(it % S), k_full + it % S, k, kn, p.k_row_stride, p.k_new_row_stride, it); };
  auto load_v = [&](int it) { load_block(sV(it % S), v_full + it % S, v, vn, p.v_row_stride, p.v_new_row_stride, it); };
  sm90::load_tile_sw<BM, D, C::kThreads>(sQ, q + int64_t(m0) * p.q_row_stride, p.q_row_stride, seq.sq - m0,
                                           p.head_dim, q, tid);
  sm90::cp_async_mbar_arrive(q_full);
  for (int i = 0; i < S && i < n; ++i) {
    load_k(i);
    load_v(i);
  }
  if (new_rows) {
    const int group = p.nheads / p.nheads_k;
    write_new_rows<D, C::kThreads, T>(p, b, const_cast<T *>(k), const_cast<T *>(v), kn, vn, cs,
                                      m_block * group + (h - hk * group), ((seq.sq + BM - 1) / BM) * group, tid);
  }

  const int w0 = wg * 64 + (warp % 4) * 16;
  const ScoreMod mod(p, b, h);
  const Dropout drop = Dropout::of<kDrop>(p, b, h);
  float acc_o[DA][8][4];
#pragma unroll
  for (int a = 0; a < DA; ++a) zero(acc_o[a]);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const uint32_t qaddr = smem_addr(sQ) + wg * 64 * 128;
  const int i0 = m0 + w0 + g;
  sm90::mbar_wait(q_full, 0);
  for (int it = 0; it < n; ++it) {
    const int s = it % S, ph = (it / S) & 1, n0 = (nb_hi - 1 - it) * BN - kofs;
    if (it >= 1 && it - 1 + S < n) {  // both warpgroups have read K of block it - 1
      sm90::mbar_wait(k_empty + (it - 1) % S, ((it - 1) / S) & 1);
      load_k(it - 1 + S);
    }
    sm90::mbar_wait(k_full + s, ph);
    sm90::fence_async_smem();
    float sc[NT][4];
    issue_qk<BM, BN, D, T>(sc, qaddr, smem_addr(sK(s)));
    sm90::commit_group();
    sm90::wait_group<0>();
    sm90::reg_fence(sc);
    sm90::mbar_arrive(k_empty + s);

    const bool masked = n0 < 0 || vis.needs_mask(m0, m0 + BM, n0, n0 + BN);
    softmax_block<NT, DA>(sc, acc_o, row_max, row_sum, mod, vis, masked, i0, n0, t);
    uint32_t p_frag[PS][4];
    pack_a<PS, T>(p_frag, sc);
    // After the row sums: only P V sees the dropped entries. (Making the mask under the
    // S MMAs instead, before wait_group, measured slower on H200: the kernel is bound by
    // issue slots there, not by the wait.)
    if (kDrop && drop.on) dropout_packed_rows<NT>(p_frag, drop, i0, n0, lane);

    if (it >= 1 && it - 1 + S < n) {  // ... and V of block it - 1
      sm90::mbar_wait(v_empty + (it - 1) % S, ((it - 1) / S) & 1);
      load_v(it - 1 + S);
    }
    sm90::mbar_wait(v_full + s, ph);
    sm90::fence_async_smem();
    issue_pv<BN, D, T>(acc_o, p_frag, smem_addr(sV(s)));
    sm90::commit_group();
    sm90::wait_group<0>();
    sm90::reg_fence(p_frag);
#pragma unroll
    for (int a = 0; a < DA; ++a) sm90::reg_fence(acc_o[a]);
    sm90::mbar_arrive(v_empty + s);
  }

  // Normalise; O goes through this warpgroup's own rows of the Q tile.
  float inv[2];
  finish_rows(row_max, row_sum, p.lse + seq.lse_off(p, b, h), m0 + w0 + g, seq.sq, t, inv);
  inv[0] *= drop.rp;  // kept entries weigh 1 / (1 - p)
  inv[1] *= drop.rp;
#pragma unroll
  for (int a = 0; a < DA; ++a) sm90::acc_to_smem_sw<BM, 8, T>(sQ, acc_o[a], w0, a * 64, inv[0], inv[1], lane);
  sm90::named_barrier(1 + wg, 128);
  const int r0 = m0 + wg * 64;
  sm90::store_tile_sw<64, D, 128, T, BM>(seq.o_ptr<T>(p, b, h) + int64_t(r0) * p.o_row_stride, sQ + wg * 64 * 64,
                                         p.o_row_stride, seq.sq - r0, p.head_dim, tid % 128);
#else
  __trap();  // launched only where sm_90a code exists (use_sm90_kernels)
#endif
}

template <int D, typename T>
int run_fwd_sm90(const FlashAttnParams &p, cudaStream_t stream) {
  // Head dim 64: 96-key blocks, whose registers (128 a thread) let two CTAs share
  // an SM; above 128 the O accumulators leave room for 64-key blocks.
  using C = std::conditional_t<(D <= 64), FwdSm90Config<D, 96, 2, 2, 2>,
                               FwdSm90Config<D, (D <= 128 ? 128 : 64), 2>>;
  const dim3 grid((p.seqlen_q + C::BM - 1) / C::BM, p.nheads, p.batch);
  // a dependent launch: it overlaps the end of the grid before (call_aborted waits for it)
  if (p.dropout_p > 0.f)
    return launch(fwd_sm90_kernel<C, T, true>, grid, C::kThreads, C::kSmem, stream, p, /*dependent=*/true);
  return launch(fwd_sm90_kernel<C, T, false>, grid, C::kThreads, C::kSmem, stream, p, /*dependent=*/true);
}

}  // namespace flash
