// Backward, in three deterministic launches (no atomics: the same bits run to run):
//   1. softmax_d[i] = rowsum(dO_i * O_i)
//   2. dK, dV: one CTA per (key block, kv head, batch); each warp owns 16 keys
//      and walks every query block of every query head of its GQA group,
//      computing S^T = K Q^T so that P^T and dS^T stay in registers.
//      For head dims above 128 the dK and dV accumulators do not fit together,
//      so dV and dK run as two passes of the same kernel.
//   3. dQ: one CTA per (query block, head, batch), walking the visible keys.
#pragma once

#include "dropout.cuh"
#include "tile.cuh"
#if defined(FLASH_HAS_SM90A)
#include "bwd_sm90.cuh"
#endif

namespace flash {

// ---------------------------------------------------------------- softmax_d
// Lanes per row: 8 elements each, enough for D (a row of a narrow head shares
// its warp with others rather than leaving lanes idle).
template <int D>
__host__ __device__ constexpr int dot_lanes() {
  return D <= 32 ? 4 : D <= 64 ? 8 : D <= 128 ? 16 : 32;
}
template <int D>
__host__ __device__ constexpr int dot_rows_per_cta() {
  return 128 / dot_lanes<D>();
}

template <int D, typename T>
__global__ void __launch_bounds__(128) bwd_dot_do_o_kernel(const FlashAttnParams p) {
  constexpr int kLanes = dot_lanes<D>();
  const int lane = threadIdx.x % kLanes, h = blockIdx.y, b = blockIdx.z;
  const int row = blockIdx.x * dot_rows_per_cta<D>() + threadIdx.x / kLanes;
  const BwdSeqInfo seq(p, b);
  const bool ok = row < seq.sq;  // no early return: the row's lanes shuffle together
  const T *dout = seq.do_ptr<T>(p, b, h) + int64_t(row) * p.do_row_stride;
  const T *o = seq.o_ptr<T>(p, b, h) + int64_t(row) * p.o_row_stride;
  float acc = 0.f;
  for (int c = lane * 8; ok && c < p.head_dim; c += kLanes * 8) {
    const uint4 a = *reinterpret_cast<const uint4 *>(dout + c);
    const uint4 bb = *reinterpret_cast<const uint4 *>(o + c);
    const uint32_t *pa = reinterpret_cast<const uint32_t *>(&a);
    const uint32_t *pb = reinterpret_cast<const uint32_t *>(&bb);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 x = unpack2<T>(pa[e]), y = unpack2<T>(pb[e]);
      acc += x.x * y.x + x.y * y.y;
    }
  }
#pragma unroll
  for (int s = kLanes / 2; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (ok && lane == 0) p.softmax_d[seq.lse_off(p, b, h) + row] = acc;
}

// ---------------------------------------------------------------- dK, dV
enum BwdKVMode { kDKDV = 0, kDVOnly = 1, kDKOnly = 2 };

template <int D_, int BM_, int MODE_>
struct BwdKVConfig {
  static constexpr int D = D_, BM = BM_, kMode = MODE_;
  static constexpr int kWarps = 4, BN = 16 * kWarps, kThreads = 32 * kWarps;
  using Dims = TileDims<D>;
  // K, V, two stages of (Q, dO), two stages of (lse, softmax_d)
  static constexpr size_t kSmem = size_t(2 * BN + 4 * BM) * Dims::kLd * 2 + 4 * BM * sizeof(float);
};

// kDrop: dropout (a separate instantiation: its registers would spill the plain one).
template <typename C, typename T, bool kDrop>
__global__ void __launch_bounds__(C::kThreads) bwd_dkdv_kernel(const FlashAttnParams p) {
  constexpr int D = C::D, BM = C::BM, BN = C::BN, LD = C::Dims::kLd;
  constexpr int KS = C::Dims::kKSteps, DT = C::Dims::kNTiles, MT = BM / 8;
  constexpr bool kDV = C::kMode != kDKOnly, kDK = C::kMode != kDVOnly;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sK = reinterpret_cast<T *>(smem);
  T *sV = sK + BN * LD;
  T *sQ = sV + BN * LD;        // [2][BM][LD]
  T *sdO = sQ + 2 * BM * LD;   // [2][BM][LD]
  float *sLse = reinterpret_cast<float *>(sdO + 2 * BM * LD);  // [2][BM], log2 units
  float *sDot = sLse + 2 * BM;                                  // [2][BM]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const BwdSeqInfo seq(p, b);
  const int n0 = n_block * BN;
  if (n0 >= seq.sk) return;
  const int group = p.nheads / p.nheads_k;
  const Visibility vis{seq.sq, seq.sk, p.window_left, p.window_right};

  const T *k = seq.k_ptr<T>(p, b, hk);
  const T *v = seq.v_ptr<T>(p, b, hk);
  load_tile<BN, D, C::kThreads>(sK, k + int64_t(n0) * p.k_row_stride, p.k_row_stride, seq.sk - n0, p.head_dim, k, tid);
  load_tile<BN, D, C::kThreads>(sV, v + int64_t(n0) * p.v_row_stride, p.v_row_stride, seq.sk - n0, p.head_dim, v, tid);

  int mb_lo, n_mb;
  vis.query_blocks(n0, min(n0 + BN, seq.sk), BM, mb_lo, n_mb);
  const int n_iters = group * n_mb;

  // Loads the query-side tiles of iteration `it` into stage it % 2.
  auto load_q_side = [&](int it) {
    const int h = hk * group + it / n_mb, m0 = (mb_lo + it % n_mb) * BM, st = it % 2;
    const T *q = seq.q_ptr<T>(p, b, h);
    const T *dout = seq.do_ptr<T>(p, b, h);
    load_tile<BM, D, C::kThreads>(sQ + st * BM * LD, q + int64_t(m0) * p.q_row_stride, p.q_row_stride,
                                  seq.sq - m0, p.head_dim, q, tid);
    load_tile<BM, D, C::kThreads>(sdO + st * BM * LD, dout + int64_t(m0) * p.do_row_stride,
                                  p.do_row_stride, seq.sq - m0, p.head_dim, dout, tid);
    const int64_t off = seq.lse_off(p, b, h);
    for (int r = tid; r < BM; r += C::kThreads) {
      const bool ok = m0 + r < seq.sq;
      sLse[st * BM + r] = ok ? p.lse[off + m0 + r] * kLog2e : INFINITY;
      sDot[st * BM + r] = ok ? p.softmax_d[off + m0 + r] : 0.f;
    }
  };

  float acc_dk[kDK ? DT : 2][4], acc_dv[kDV ? DT : 2][4];
  zero(acc_dk);
  zero(acc_dv);
  if (n_iters > 0) load_q_side(0);
  cp_async_commit();

  const int j0 = n0 + warp * 16 + g;  // this thread's keys: j0 and j0 + 8
  const T *sKw = sK + warp * 16 * LD, *sVw = sV + warp * 16 * LD;
  for (int it = 0; it < n_iters; ++it) {
    const int st = it % 2, h = hk * group + it / n_mb, m0 = (mb_lo + it % n_mb) * BM;
    cp_async_wait<0>();
    __syncthreads();  // stage st landed; every warp is done with stage st ^ 1
    if (it + 1 < n_iters) load_q_side(it + 1);
    cp_async_commit();
    const T *sQs = sQ + st * BM * LD, *sdOs = sdO + st * BM * LD;
    const float *lse2 = sLse + st * BM, *dot = sDot + st * BM;
    const ScoreMod mod(p, b, h);

    // S^T (16 keys x BM queries) and P^T = exp2(score - lse).
    float s[MT][4];
    zero(s);
    gemm_ss_nt<MT, KS, LD, T>(s, sKw, sQs, lane);
    const bool masked = vis.needs_mask(m0, m0 + BM, n0, n0 + BN);
    // P^T = exp2(score - lse): masked entries 0. s becomes P * d(score)/d(scale*s)
    // (softcap), what dS needs; P itself goes to p_frag for dV.
    float pr[MT][4];
    if (mod.active) {
#pragma unroll
      for (int c = 0; c < MT; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int il = c * 8 + 2 * t + (e % 2);
          float deriv;
          const float x = mod.log2_score(s[c][e], m0 + il, j0 + (e / 2) * 8, vis.off(), deriv);
          pr[c][e] = exp2_approx(x - lse2[il]);
          s[c][e] = deriv;
        }
    } else {
#pragma unroll
      for (int c = 0; c < MT; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          pr[c][e] = exp2_approx(s[c][e] * mod.scale_log2 - lse2[c * 8 + 2 * t + (e % 2)]);
          s[c][e] = 1.f;
        }
    }
    if (masked) mask_fragment<true>(pr, vis, j0, m0, t, 0.f);
#pragma unroll
    for (int c = 0; c < MT; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[c][e] *= pr[c][e];
    // Dropout: dV takes the kept P / (1 - p) (pr, once s holds what dS needs); dP
    // becomes the kept dP / (1 - p) below.
    const Dropout drop = Dropout::of<kDrop>(p, b, h);
    const ColKeep<MT> keep(drop, n0 + warp * 16, m0, lane);
    if (kDrop && drop.on) {
#pragma unroll
      for (int c = 0; c < MT; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) pr[c][e] = keep.kept(c, e) ? pr[c][e] * drop.rp : 0.f;
    }
    uint32_t p_frag[BM / 16][4];
    pack_a<BM / 16, T>(p_frag, pr);
    if constexpr (kDV) gemm_rs_nn<DT, BM / 16, LD, T>(acc_dv, p_frag, sdOs, lane);

    if constexpr (kDK) {
      // dP^T = V dO^T, dS^T = P^T * (dP^T - softmax_d), dK += dS^T Q.
      float dp[MT][4];
      zero(dp);
      gemm_ss_nt<MT, KS, LD, T>(dp, sVw, sdOs, lane);
      if (kDrop && drop.on) {
#pragma unroll
        for (int c = 0; c < MT; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[c][e] = keep.kept(c, e) ? dp[c][e] * drop.rp : 0.f;
      }
#pragma unroll
      for (int c = 0; c < MT; ++c) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[c][e] = s[c][e] * (dp[c][e] - dot[c * 8 + 2 * t + (e % 2)]);
      }
      uint32_t ds_frag[BM / 16][4];
      pack_a<BM / 16, T>(ds_frag, dp);
      gemm_rs_nn<DT, BM / 16, LD, T>(acc_dk, ds_frag, sQs, lane);
    }
  }

  // Write dK (scaled) and dV through shared memory.
  cp_async_wait<0>();
  __syncthreads();
  if constexpr (kDK) acc_to_smem<DT, LD, T>(sK + warp * 16 * LD, acc_dk, p.scale, lane);
  if constexpr (kDV) acc_to_smem<DT, LD, T>(sV + warp * 16 * LD, acc_dv, 1.f, lane);
  __syncthreads();
  if constexpr (kDK) {
    T *dk = seq.dk_ptr<T>(p, b, hk);
    store_tile<BN, D, C::kThreads>(dk + int64_t(n0) * p.dk_row_stride, sK, p.dk_row_stride, seq.sk - n0, p.head_dim, tid);
  }
  if constexpr (kDV) {
    T *dv = seq.dv_ptr<T>(p, b, hk);
    store_tile<BN, D, C::kThreads>(dv + int64_t(n0) * p.dv_row_stride, sV, p.dv_row_stride, seq.sk - n0, p.head_dim, tid);
  }
}

// ---------------------------------------------------------------- dQ
template <int D_, int BN_>
struct BwdQConfig {
  static constexpr int D = D_, BN = BN_, kWarps = 4, BM = 16 * kWarps, kThreads = 32 * kWarps;
  using Dims = TileDims<D>;
  // Q, dO, two stages of (K, V)
  static constexpr size_t kSmem = size_t(2 * BM + 4 * BN) * Dims::kLd * 2;
};

template <typename C, typename T, bool kDrop>
__global__ void __launch_bounds__(C::kThreads) bwd_dq_kernel(const FlashAttnParams p) {
  constexpr int D = C::D, BM = C::BM, BN = C::BN, LD = C::Dims::kLd;
  constexpr int KS = C::Dims::kKSteps, DT = C::Dims::kNTiles, NT = BN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem);
  T *sdO = sQ + BM * LD;
  T *sK = sdO + BM * LD;  // [2][BN][LD]
  T *sV = sK + 2 * BN * LD;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
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
    load_tile<BN, D, C::kThreads>(sK + st * BN * LD, k + int64_t(n0) * p.k_row_stride, p.k_row_stride,
                                  seq.sk - n0, p.head_dim, k, tid);
    load_tile<BN, D, C::kThreads>(sV + st * BN * LD, v + int64_t(n0) * p.v_row_stride, p.v_row_stride,
                                  seq.sk - n0, p.head_dim, v, tid);
  };
  load_tile<BM, D, C::kThreads>(sQ, q + int64_t(m0) * p.q_row_stride, p.q_row_stride, seq.sq - m0, p.head_dim, q, tid);
  load_tile<BM, D, C::kThreads>(sdO, dout + int64_t(m0) * p.do_row_stride, p.do_row_stride, seq.sq - m0, p.head_dim, dout, tid);
  if (n_iters > 0) load_kv(0);
  cp_async_commit();

  const int r0 = m0 + warp * 16 + g;
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
  float acc_dq[DT][4];
  zero(acc_dq);
  const T *sQw = sQ + warp * 16 * LD, *sdOw = sdO + warp * 16 * LD;

  for (int it = 0; it < n_iters; ++it) {
    const int st = it % 2, n0 = (nb_hi - 1 - it) * BN;
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < n_iters) load_kv(it + 1);
    cp_async_commit();
    const T *sKs = sK + st * BN * LD, *sVs = sV + st * BN * LD;

    float s[NT][4];
    zero(s);
    gemm_ss_nt<NT, KS, LD, T>(s, sQw, sKs, lane);
    const bool masked = vis.needs_mask(m0, m0 + BM, n0, n0 + BN);
    // P = exp2(score - lse), masked entries 0; s = P * d(score)/d(scale*s).
    if (mod.active) {
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
        for (int e = 0; e < 4; ++e) s[j][e] = exp2_approx(s[j][e] * mod.scale_log2 - lse2[e / 2]);
    }
    if (masked) mask_fragment<false>(s, vis, r0, n0, t, 0.f);
    float dp[NT][4];
    zero(dp);
    gemm_ss_nt<NT, KS, LD, T>(dp, sdOw, sVs, lane);
    // dP of the kept entries, / (1 - p); 0 where dropped
    if (kDrop && drop.on) dropout_rows<NT>(dp, drop, r0, n0, lane, drop.rp);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j][e] = s[j][e] * (dp[j][e] - dot[e / 2]);
    }
    uint32_t ds_frag[BN / 16][4];
    pack_a<BN / 16, T>(ds_frag, dp);
    gemm_rs_nn<DT, BN / 16, LD, T>(acc_dq, ds_frag, sKs, lane);
  }

  cp_async_wait<0>();
  __syncthreads();
  acc_to_smem<DT, LD, T>(sQ + warp * 16 * LD, acc_dq, p.scale, lane);
  __syncthreads();
  T *dq = seq.dq_ptr<T>(p, b, h);
  store_tile<BM, D, C::kThreads>(dq + int64_t(m0) * p.dq_row_stride, sQ, p.dq_row_stride, seq.sq - m0, p.head_dim, tid);
}

// ---------------------------------------------------------------- launch
template <int D, typename T, bool kDrop>
int run_bwd_kv_q(const FlashAttnParams &p, cudaStream_t stream) {
  int status;
  const dim3 kv_grid((p.seqlen_k + 63) / 64, p.nheads_k, p.batch);
  if constexpr (D <= 128) {
    using KV = BwdKVConfig<D, 64, kDKDV>;
    status = launch(bwd_dkdv_kernel<KV, T, kDrop>, kv_grid, KV::kThreads, KV::kSmem, stream, p);
  } else {
    using DV = BwdKVConfig<D, 32, kDVOnly>;
    using DK = BwdKVConfig<D, 32, kDKOnly>;
    status = launch(bwd_dkdv_kernel<DV, T, kDrop>, kv_grid, DV::kThreads, DV::kSmem, stream, p);
    if (status == FLASH_OK)
      status = launch(bwd_dkdv_kernel<DK, T, kDrop>, kv_grid, DK::kThreads, DK::kSmem, stream, p);
  }
  if (status != FLASH_OK) return status;

  using Q = BwdQConfig<D, (D <= 128 ? 64 : 32)>;
  return launch(bwd_dq_kernel<Q, T, kDrop>, dim3((p.seqlen_q + Q::BM - 1) / Q::BM, p.nheads, p.batch),
                Q::kThreads, Q::kSmem, stream, p);
}

template <int D, typename T>
int run_bwd(const FlashAttnParams &p, cudaStream_t stream) {
  constexpr int kDotRows = dot_rows_per_cta<D>();
  int status = launch(bwd_dot_do_o_kernel<D, T>,
                      dim3((p.seqlen_q + kDotRows - 1) / kDotRows, p.nheads, p.batch), 128, 0, stream, p);
  if (status != FLASH_OK) return status;
#if defined(FLASH_HAS_SM90A)
  if constexpr (D % 64 == 0) {
    if (use_sm90_kernels()) return run_bwd_sm90<D, T>(p, stream);
  }
#endif
  if (p.dropout_p > 0.f) return run_bwd_kv_q<D, T, true>(p, stream);
  return run_bwd_kv_q<D, T, false>(p, stream);
}

}  // namespace flash
