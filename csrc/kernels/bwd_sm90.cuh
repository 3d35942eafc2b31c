// Backward on Hopper: the dK/dV and dQ passes of bwd_launch.cuh with warpgroup
// MMAs (the softmax_d pass is shared). Still no atomics: deterministic.
//
// dK/dV: a warpgroup owns 64 keys and walks the query blocks of every query
// head of its GQA group. Per block of BM queries it issues S^T = K Q^T and
// dP^T = V dO^T together, turns S^T into P^T while dP^T runs, issues
// dV += P^T dO, then builds dS^T and issues dK += dS^T Q.
// dQ: a warpgroup owns 64 queries and walks the visible key blocks:
// S = Q K^T and dP = dO V^T together, then dQ += dS K.
#pragma once

#include <type_traits>

#include "dropout.cuh"
#include "sm90.cuh"

namespace flash {

enum BwdSm90Mode { kSm90DKDV = 0, kSm90DVOnly = 1, kSm90DKOnly = 2 };

template <int D_, int WG_, int MODE_, int BM_>
struct BwdKVSm90Config {
  static_assert(D_ % 64 == 0, "the swizzled tiles are 64 columns wide");
  static constexpr int D = D_, kWG = WG_, kMode = MODE_, BM = BM_;
  static constexpr int BN = 64 * kWG, kThreads = 128 * kWG;
  static constexpr size_t kTileKV = size_t(BN) * D * 2, kTileQ = size_t(BM) * D * 2;
  // K, V (not in a dV-only pass), two stages of (Q, dO), two stages of (lse, softmax_d),
  // the stages' mbarriers
  static constexpr size_t kKVBytes = (kMode == kSm90DVOnly ? 1 : 2) * kTileKV;
  static constexpr size_t kSmem = kKVBytes + 4 * kTileQ + 4 * BM * sizeof(float) + 32 + 1024;
};

// kMod: softcap or ALiBi present (a separate instantiation, so that the plain
// path keeps no d(score) registers). kDrop: dropout (likewise).
template <typename C, typename T, bool kMod, bool kDrop>
__global__ void __launch_bounds__(C::kThreads, 1) bwd_dkdv_sm90_kernel(const FlashAttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = C::D, BM = C::BM, BN = C::BN, KS = D / 16, MT = BM / 8, PS = BM / 16, DA = D / 64;
  constexpr bool kDV = C::kMode != kSm90DKOnly, kDK = C::kMode != kSm90DVOnly;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char *smem = sm90::align_1024(smem_raw);
  T *sK = reinterpret_cast<T *>(smem);
  T *sV = reinterpret_cast<T *>(smem + C::kTileKV);  // kDK only
  auto sQ = [&](int st) { return smem + C::kKVBytes + st * C::kTileQ; };
  auto sdO = [&](int st) { return smem + C::kKVBytes + (2 + st) * C::kTileQ; };
  float *sLse = reinterpret_cast<float *>(smem + C::kKVBytes + 4 * C::kTileQ);  // [2][BM]
  float *sDot = sLse + 2 * BM;                                                      // [2][BM]
  // mbarriers of the query-side stages: landed (every thread's copies) / read (by every thread)
  uint64_t *full = reinterpret_cast<uint64_t *>(sDot + 2 * BM), *empty = full + 2;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int wg = warp / 4;
  const TileCoords tc = tile_coords(false);
  const int n_block = tc.tile, hk = tc.h, b = tc.b;
  const BwdSeqInfo seq(p, b);
  const int n0 = n_block * BN;
  if (n0 >= seq.sk) return;
  const int group = p.nheads / p.nheads_k;
  const Visibility vis{seq.sq, seq.sk, p.window_left, p.window_right};

  int mb_lo, n_mb;
  vis.query_blocks(n0, min(n0 + BN, seq.sk), BM, mb_lo, n_mb);
  const int n_iters = group * n_mb;

  // K and V are read only when some query sees these keys; otherwise dK and dV
  // are 0 (the zero accumulators below), written through the tiles they would
  // have filled. Their copies are tracked by stage 0's mbarrier (load_q_side(0)).
  const T *k = seq.k_ptr<T>(p, b, hk);
  const T *v = seq.v_ptr<T>(p, b, hk);
  if (n_iters > 0) {
    sm90::load_tile_sw<BN, D, C::kThreads>(sK, k + int64_t(n0) * p.k_row_stride, p.k_row_stride,
                                           seq.sk - n0, p.head_dim, k, tid);
    if constexpr (kDK)
      sm90::load_tile_sw<BN, D, C::kThreads>(sV, v + int64_t(n0) * p.v_row_stride, p.v_row_stride,
                                             seq.sk - n0, p.head_dim, v, tid);
  }

  auto load_q_side = [&](int it) {
    const int h = hk * group + it / n_mb, m0 = (mb_lo + it % n_mb) * BM, st = it % 2;
    const T *q = seq.q_ptr<T>(p, b, h);
    const T *dout = seq.do_ptr<T>(p, b, h);
    sm90::load_tile_sw<BM, D, C::kThreads>(reinterpret_cast<T *>(sQ(st)), q + int64_t(m0) * p.q_row_stride,
                                           p.q_row_stride, seq.sq - m0, p.head_dim, q, tid);
    sm90::load_tile_sw<BM, D, C::kThreads>(reinterpret_cast<T *>(sdO(st)),
                                           dout + int64_t(m0) * p.do_row_stride, p.do_row_stride,
                                           seq.sq - m0, p.head_dim, dout, tid);
    // lse and softmax_d; 0 past the sequence, where Q and dO rows are 0 and so is dS
    const int64_t off = seq.lse_off(p, b, h);
    for (int r = tid; r < BM; r += C::kThreads) {
      const bool ok = m0 + r < seq.sq;
      cp_async_4(sLse + st * BM + r, ok ? p.lse + off + m0 + r : p.lse, ok);
      cp_async_4(sDot + st * BM + r, ok ? p.softmax_d + off + m0 + r : p.softmax_d, ok);
    }
    sm90::cp_async_mbar_arrive(full + st);  // K and V too, with stage 0
  };

  float acc_dk[kDK ? DA : 1][8][4], acc_dv[kDV ? DA : 1][8][4];
#pragma unroll
  for (int a = 0; a < (kDK ? DA : 1); ++a) zero(acc_dk[a]);
#pragma unroll
  for (int a = 0; a < (kDV ? DA : 1); ++a) zero(acc_dv[a]);
  if (tid == 0) {
    for (int st = 0; st < 2; ++st) {
      sm90::mbar_init(full + st, C::kThreads);
      sm90::mbar_init(empty + st, C::kThreads);
    }
  }
  __syncthreads();
  for (int i = 0; i < 2 && i < n_iters; ++i) load_q_side(i);

  const int j0 = n0 + wg * 64 + (warp % 4) * 16 + g;  // this thread's keys: j0 and j0 + 8
  const unsigned char *kbase = reinterpret_cast<const unsigned char *>(sK) + wg * 64 * 128;
  const unsigned char *vbase = reinterpret_cast<const unsigned char *>(sV) + wg * 64 * 128;
  for (int it = 0; it < n_iters; ++it) {
    const int st = it % 2, h = hk * group + it / n_mb, m0 = (mb_lo + it % n_mb) * BM;
    if (it >= 1 && it + 1 < n_iters) {  // every thread is done with the stage of it - 1
      sm90::mbar_wait(empty + (it - 1) % 2, ((it - 1) / 2) & 1);
      load_q_side(it + 1);
    }
    sm90::mbar_wait(full + st, (it / 2) & 1);
    sm90::fence_async_smem();
    const unsigned char *qs = sQ(st), *dos = sdO(st);
    const float *lse = sLse + st * BM, *dot = sDot + st * BM;
    const ScoreMod mod(p, b, h);

    // S^T (64 keys x BM queries) = K Q^T and dP^T = V dO^T, both in flight.
    float s[MT][4], dp[MT][4];
    sm90::warpgroup_fence();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
      sm90::Wgmma<BM, T>::template ss<0>(
          s, sm90::make_desc(kbase + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024),
          sm90::make_desc(qs + (kk / 4) * BM * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
    sm90::commit_group();
    if constexpr (kDK) {
#pragma unroll
      for (int kk = 0; kk < KS; ++kk)
        sm90::Wgmma<BM, T>::template ss<0>(
            dp, sm90::make_desc(vbase + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024),
            sm90::make_desc(dos + (kk / 4) * BM * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
      sm90::commit_group();
      sm90::wait_group<1>();
    } else {
      sm90::wait_group<0>();
    }
    sm90::reg_fence(s);

    // P^T = exp2(score - lse), masked entries 0; s becomes P * d(score)/d(scale*s).
    const bool masked = vis.needs_mask(m0, m0 + BM, n0, n0 + BN);
    float pr[MT][4];                   // P^T
    float deriv[MT][4];                // d(score)/d(scale*s), set (and read) with kMod only
    if constexpr (kMod) {
#pragma unroll
      for (int c = 0; c < MT; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int il = c * 8 + 2 * t + (e % 2);
          const float x = mod.log2_score(s[c][e], m0 + il, j0 + (e / 2) * 8, vis.off(), deriv[c][e]);
          pr[c][e] = exp2_approx(fmaf(-lse[il], kLog2e, x));
        }
    } else {
#pragma unroll
      for (int c = 0; c < MT; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          pr[c][e] = exp2_approx(fmaf(s[c][e], mod.scale_log2, -lse[c * 8 + 2 * t + (e % 2)] * kLog2e));
    }
    if (masked) mask_fragment<true>(pr, vis, j0, m0, t, 0.f);
    // Dropout: dV takes the kept P / (1 - p), dS the kept dP / (1 - p) (below).
    const Dropout drop = Dropout::of<kDrop>(p, b, h);
    const ColKeep<MT> keep(drop, j0 - g, m0, lane);
    uint32_t p_frag[PS][4];
    if constexpr (kDV) {
      if (kDrop && drop.on) {
        float pd[MT][4];
#pragma unroll
        for (int c = 0; c < MT; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) pd[c][e] = keep.kept(c, e) ? pr[c][e] * drop.rp : 0.f;
        pack_a<PS, T>(p_frag, pd);
      } else {
        pack_a<PS, T>(p_frag, pr);
      }
      sm90::warpgroup_fence();
#pragma unroll
      for (int kk = 0; kk < PS; ++kk)
#pragma unroll
        for (int a = 0; a < DA; ++a)
          sm90::Wgmma<64, T>::template rs<1>(
              acc_dv[a], p_frag[kk], sm90::make_desc(dos + a * BM * 128 + kk * 2048, 1024, 1024), 1);
      sm90::commit_group();
    }

    if constexpr (kDK) {
      if constexpr (kDV) sm90::wait_group<1>();  // dP^T done; dV may still run
      else sm90::wait_group<0>();
      sm90::reg_fence(dp);
      if (kDrop && drop.on) {
#pragma unroll
        for (int c = 0; c < MT; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[c][e] = keep.kept(c, e) ? dp[c][e] * drop.rp : 0.f;
      }
#pragma unroll
      for (int c = 0; c < MT; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          dp[c][e] = (kMod ? deriv[c][e] * pr[c][e] : pr[c][e]) *
                     (dp[c][e] - dot[c * 8 + 2 * t + (e % 2)]);
      uint32_t ds_frag[PS][4];
      pack_a<PS, T>(ds_frag, dp);
      sm90::warpgroup_fence();
#pragma unroll
      for (int kk = 0; kk < PS; ++kk)
#pragma unroll
        for (int a = 0; a < DA; ++a)
          sm90::Wgmma<64, T>::template rs<1>(
              acc_dk[a], ds_frag[kk], sm90::make_desc(qs + a * BM * 128 + kk * 2048, 1024, 1024), 1);
      sm90::commit_group();
      sm90::wait_group<0>();
      sm90::reg_fence(ds_frag);
    } else {
      sm90::wait_group<0>();
    }
    if constexpr (kDV) sm90::reg_fence(p_frag);
#pragma unroll
    for (int a = 0; a < (kDK ? DA : 1); ++a) sm90::reg_fence(acc_dk[a]);
#pragma unroll
    for (int a = 0; a < (kDV ? DA : 1); ++a) sm90::reg_fence(acc_dv[a]);
    sm90::mbar_arrive(empty + st);
  }

  // Write dK (scaled) and dV through shared memory (the K and V tiles). The
  // copies here were never committed as groups (mbarriers track them), so only
  // wait_all, not wait_group, guarantees none still lands in sK/sV after this.
  cp_async_wait_all();
  __syncthreads();
  const int r0 = wg * 64 + (warp % 4) * 16;
  if constexpr (kDK) {
#pragma unroll
    for (int a = 0; a < DA; ++a)
      sm90::acc_to_smem_sw<BN, 8, T>(sK, acc_dk[a], r0, a * 64, p.scale, p.scale, lane);
  }
  if constexpr (kDV) {
    T *dst = kDK ? sV : sK;  // a dV-only pass never loaded V
#pragma unroll
    for (int a = 0; a < DA; ++a) sm90::acc_to_smem_sw<BN, 8, T>(dst, acc_dv[a], r0, a * 64, 1.f, 1.f, lane);
  }
  __syncthreads();
  if constexpr (kDK) {
    T *dk = seq.dk_ptr<T>(p, b, hk);
    sm90::store_tile_sw<BN, D, C::kThreads>(dk + int64_t(n0) * p.dk_row_stride, sK, p.dk_row_stride,
                                            seq.sk - n0, p.head_dim, tid);
  }
  if constexpr (kDV) {
    T *dv = seq.dv_ptr<T>(p, b, hk);
    sm90::store_tile_sw<BN, D, C::kThreads>(dv + int64_t(n0) * p.dv_row_stride, kDK ? sV : sK,
                                            p.dv_row_stride, seq.sk - n0, p.head_dim, tid);
  }
#else
  __trap();  // launched only where sm_90a code exists (use_sm90_kernels)
#endif
}

template <int D_, int WG_, int BN_, int MINB_ = 1>
struct BwdQSm90Config {
  static_assert(D_ % 64 == 0, "the swizzled tiles are 64 columns wide");
  static constexpr int D = D_, kWG = WG_, BN = BN_, BM = 64 * kWG, kThreads = 128 * kWG;
  static constexpr int kMinBlocks = MINB_;
  static constexpr size_t kTileQ = size_t(BM) * D * 2, kTileKV = size_t(BN) * D * 2;
  // Q, dO, two stages of (K, V)
  static constexpr size_t kSmem = 2 * kTileQ + 4 * kTileKV + 1024;
};

template <typename C, typename T, bool kMod, bool kDrop>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) bwd_dq_sm90_kernel(const FlashAttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = C::D, BM = C::BM, BN = C::BN, KS = D / 16, NT = BN / 8, PS = BN / 16, DA = D / 64;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char *smem = sm90::align_1024(smem_raw);
  T *sQ = reinterpret_cast<T *>(smem);
  T *sdO = reinterpret_cast<T *>(smem + C::kTileQ);
  auto sK = [&](int st) { return smem + 2 * C::kTileQ + st * C::kTileKV; };
  auto sV = [&](int st) { return smem + 2 * C::kTileQ + (2 + st) * C::kTileKV; };

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int wg = warp / 4;
  const TileCoords tc = tile_coords(true);
  const int m_block = tc.tile, h = tc.h, b = tc.b;
  const BwdSeqInfo seq(p, b);
  const int m0 = m_block * BM;
  if (m0 >= seq.sq) return;
  const int hk = h / (p.nheads / p.nheads_k);
  const Visibility vis{seq.sq, seq.sk, p.window_left, p.window_right};
  const ScoreMod mod(p, b, h);
  const Dropout drop = Dropout::of<kDrop>(p, b, h);

  const T *q = seq.q_ptr<T>(p, b, h);
  const T *dout = seq.do_ptr<T>(p, b, h);
  const T *k = seq.k_ptr<T>(p, b, hk);
  const T *v = seq.v_ptr<T>(p, b, hk);

  int nb_lo, nb_hi;
  vis.key_blocks(m0, min(m0 + BM, seq.sq), BN, nb_lo, nb_hi);
  const int n_iters = nb_hi - nb_lo;
  auto load_kv = [&](int it) {
    const int n0 = (nb_hi - 1 - it) * BN, st = it % 2;
    sm90::load_tile_sw<BN, D, C::kThreads>(reinterpret_cast<T *>(sK(st)), k + int64_t(n0) * p.k_row_stride,
                                           p.k_row_stride, seq.sk - n0, p.head_dim, k, tid);
    sm90::load_tile_sw<BN, D, C::kThreads>(reinterpret_cast<T *>(sV(st)), v + int64_t(n0) * p.v_row_stride,
                                           p.v_row_stride, seq.sk - n0, p.head_dim, v, tid);
  };
  sm90::load_tile_sw<BM, D, C::kThreads>(sQ, q + int64_t(m0) * p.q_row_stride, p.q_row_stride,
                                         seq.sq - m0, p.head_dim, q, tid);
  sm90::load_tile_sw<BM, D, C::kThreads>(sdO, dout + int64_t(m0) * p.do_row_stride, p.do_row_stride,
                                         seq.sq - m0, p.head_dim, dout, tid);
  if (n_iters > 0) load_kv(0);
  cp_async_commit();

  const int w0 = wg * 64 + (warp % 4) * 16;
  const int r0 = m0 + w0 + g;  // this thread's rows: r0 and r0 + 8
  float lse2[2], dot[2];
  {
    const int64_t off = seq.lse_off(p, b, h);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = r0 + 8 * r;
      lse2[r] = i < seq.sq ? p.lse[off + i] * kLog2e : INFINITY;
      dot[r] = i < seq.sq ? p.softmax_d[off + i] : 0.f;
    }
  }
  float acc_dq[DA][8][4];
#pragma unroll
  for (int a = 0; a < DA; ++a) zero(acc_dq[a]);
  const unsigned char *qbase = reinterpret_cast<const unsigned char *>(sQ) + wg * 64 * 128;
  const unsigned char *dobase = reinterpret_cast<const unsigned char *>(sdO) + wg * 64 * 128;

  for (int it = 0; it < n_iters; ++it) {
    const int st = it % 2, n0 = (nb_hi - 1 - it) * BN;
    cp_async_wait<0>();
    sm90::fence_async_smem();
    __syncthreads();  // stage st landed; every warpgroup is done with stage st ^ 1
    if (it + 1 < n_iters) load_kv(it + 1);
    cp_async_commit();
    const unsigned char *ks = sK(st), *vs = sV(st);

    float s[NT][4], dp[NT][4];
    sm90::warpgroup_fence();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
      sm90::Wgmma<BN, T>::template ss<0>(
          s, sm90::make_desc(qbase + (kk / 4) * BM * 128 + (kk % 4) * 32, 16, 1024),
          sm90::make_desc(ks + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
    sm90::commit_group();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
      sm90::Wgmma<BN, T>::template ss<0>(
          dp, sm90::make_desc(dobase + (kk / 4) * BM * 128 + (kk % 4) * 32, 16, 1024),
          sm90::make_desc(vs + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
    sm90::commit_group();
    sm90::wait_group<1>();
    sm90::reg_fence(s);

    // P = exp2(score - lse), masked entries 0; s = P * d(score)/d(scale*s).
    const bool masked = vis.needs_mask(m0, m0 + BM, n0, n0 + BN);
    if constexpr (kMod) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float deriv;
          const float x = mod.log2_score(s[j][e], r0 + (e / 2) * 8, n0 + j * 8 + 2 * t + (e % 2),
                                         vis.off(), deriv);
          s[j][e] = exp2_approx(x - lse2[e / 2]) * deriv;
        }
    } else {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = exp2_approx(fmaf(s[j][e], mod.scale_log2, -lse2[e / 2]));
    }
    if (masked) mask_fragment<false>(s, vis, r0, n0, t, 0.f);
    sm90::wait_group<0>();
    sm90::reg_fence(dp);
    // dP of the kept entries, / (1 - p); 0 where dropped
    if (kDrop && drop.on) dropout_rows<NT>(dp, drop, r0, n0, lane, drop.rp);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j][e] = s[j][e] * (dp[j][e] - dot[e / 2]);
    uint32_t ds_frag[PS][4];
    pack_a<PS, T>(ds_frag, dp);
    sm90::warpgroup_fence();
#pragma unroll
    for (int kk = 0; kk < PS; ++kk)
#pragma unroll
      for (int a = 0; a < DA; ++a)
        sm90::Wgmma<64, T>::template rs<1>(
            acc_dq[a], ds_frag[kk], sm90::make_desc(ks + a * BN * 128 + kk * 2048, 1024, 1024), 1);
    sm90::commit_group();
    sm90::wait_group<0>();
    sm90::reg_fence(ds_frag);
#pragma unroll
    for (int a = 0; a < DA; ++a) sm90::reg_fence(acc_dq[a]);
  }

  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int a = 0; a < DA; ++a)
    sm90::acc_to_smem_sw<BM, 8, T>(sQ, acc_dq[a], w0, a * 64, p.scale, p.scale, lane);
  __syncthreads();
  T *dq = seq.dq_ptr<T>(p, b, h);
  sm90::store_tile_sw<BM, D, C::kThreads>(dq + int64_t(m0) * p.dq_row_stride, sQ, p.dq_row_stride,
                                          seq.sq - m0, p.head_dim, tid);
#else
  __trap();  // launched only where sm_90a code exists (use_sm90_kernels)
#endif
}

// Configs measured on H100/H200 (benchmarks/RESULTS.md).
template <int D, typename T, bool kMod, bool kDrop>
int run_bwd_sm90_mod(const FlashAttnParams &p, cudaStream_t stream) {
  int status;
  if constexpr (D <= 128) {
    // 128 keys (two warpgroups) x 64-query blocks, one CTA per SM; at head dim 64
    // this beat 32-query blocks at two CTAs per SM on H100 (benchmarks/RESULTS.md).
    using KV = BwdKVSm90Config<D, 2, kSm90DKDV, 64>;
    const dim3 grid((p.seqlen_k + KV::BN - 1) / KV::BN, p.nheads_k, p.batch);
    status = launch(bwd_dkdv_sm90_kernel<KV, T, kMod, kDrop>, grid, KV::kThreads, KV::kSmem, stream, p);
  } else {
    // The 64 x D accumulators of one of dK, dV leave room for 32-query blocks when
    // dS is made too (dK), 64-query ones when not (dV, whose pass also skips V).
    using DV = BwdKVSm90Config<D, 2, kSm90DVOnly, 64>;
    using DK = BwdKVSm90Config<D, 2, kSm90DKOnly, 32>;
    const dim3 grid((p.seqlen_k + DV::BN - 1) / DV::BN, p.nheads_k, p.batch);
    status = launch(bwd_dkdv_sm90_kernel<DV, T, kMod, kDrop>, grid, DV::kThreads, DV::kSmem, stream, p);
    if (status == FLASH_OK)
      status = launch(bwd_dkdv_sm90_kernel<DK, T, kMod, kDrop>, grid, DK::kThreads, DK::kSmem, stream, p);
  }
  if (status != FLASH_OK) return status;
  // dQ: at head dim 64 two CTAs (of two warpgroups) share an SM.
  using Q = std::conditional_t<(D <= 64), BwdQSm90Config<D, 2, 64, 2>,
                               std::conditional_t<(D <= 128), BwdQSm90Config<D, 2, 64>,
                                                  BwdQSm90Config<D, 2, 32>>>;
  return launch(bwd_dq_sm90_kernel<Q, T, kMod, kDrop>,
                dim3((p.seqlen_q + Q::BM - 1) / Q::BM, p.nheads, p.batch), Q::kThreads, Q::kSmem,
                stream, p);
}

// dK/dV and dQ after the softmax_d pass (run_bwd launches that one).
template <int D, typename T>
int run_bwd_sm90(const FlashAttnParams &p, cudaStream_t stream) {
  const bool mod = p.softcap > 0.f || p.alibi_slopes != nullptr;
  if (p.dropout_p > 0.f)
    return mod ? run_bwd_sm90_mod<D, T, true, true>(p, stream) : run_bwd_sm90_mod<D, T, false, true>(p, stream);
  return mod ? run_bwd_sm90_mod<D, T, true, false>(p, stream) : run_bwd_sm90_mod<D, T, false, false>(p, stream);
}

}  // namespace flash
