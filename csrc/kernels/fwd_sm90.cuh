// Forward on Hopper: the algorithm of fwd_launch.cuh with warpgroup MMAs.
// Each warpgroup (4 warps) owns 64 query rows; S = Q K^T reads Q and K from
// swizzled shared memory, O += P V takes P from registers. K and V are double
// buffered: the next block's K loads during this block's softmax, its V during
// this block's P V.
#pragma once

#include <type_traits>

#include "sm90.cuh"

namespace flash {

template <int D_, int BN_, int WG_, int MINB_>
struct FwdSm90Config {
  static_assert(D_ % 64 == 0, "the swizzled tiles are 64 columns wide");
  static constexpr int D = D_, BN = BN_, kWG = WG_, kThreads = 128 * kWG, BM = 64 * kWG;
  static constexpr int kMinBlocks = MINB_;  // CTAs per SM the registers are capped for
  // registers per thread the cap leaves; below ~160 the hoisted offsets would spill
  static constexpr bool kOpaque = 65536 / (kThreads * kMinBlocks) < 160;
  static constexpr size_t kTileQ = size_t(BM) * D * 2, kTileKV = size_t(BN) * D * 2;
  static constexpr size_t kSmem = kTileQ + 4 * kTileKV + 1024;  // + alignment slack
};

// Measured on H100 (bf16, 16k tokens; benchmarks/RESULTS.md): head dim 64 runs best
// as two independent one-warpgroup CTAs per SM (one's softmax overlaps the other's
// MMAs); at 128 one CTA of two warpgroups with 128-key blocks; above 128 the O
// accumulators leave room for 64-key blocks.
template <int D>
using FwdSm90ConfigFor = std::conditional_t<
    (D <= 64), FwdSm90Config<D, 128, 1, 2>,
    std::conditional_t<(D <= 128), FwdSm90Config<D, 128, 2, 1>, FwdSm90Config<D, 64, 2, 1>>>;

template <typename C, typename T>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) fwd_sm90_kernel(const FlashAttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = C::D, BM = C::BM, BN = C::BN;
  constexpr int NT = BN / 8, KS = D / 16, PS = BN / 16, DA = D / 64;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char *smem = sm90::align_1024(smem_raw);
  T *sQ = reinterpret_cast<T *>(smem);
  // K and V buffers of stage s: K at kTileQ + s * kTileKV, V two tiles further.
  auto sK = [&](int stage) { return reinterpret_cast<T *>(smem + C::kTileQ + stage * C::kTileKV); };
  auto sV = [&](int stage) {
    return reinterpret_cast<T *>(smem + C::kTileQ + (2 + stage) * C::kTileKV);
  };

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int wg = warp / 4;
  const int w0 = wg * 64 + (warp % 4) * 16;  // this warp's first row in the tile
  const int m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq(p, b);
  const int m0 = m_block * BM;
  if (m0 >= seq.sq) return;
  const int hk = h / (p.nheads / p.nheads_k);
  const Visibility vis{seq.sq, seq.sk, p.window_left, p.window_right};
  const ScoreMod mod(p, b, h);

  const T *q = seq.q_ptr<T>(p, b, h);
  const T *k = seq.k_ptr<T>(p, b, hk);
  const T *v = seq.v_ptr<T>(p, b, hk);
  T *o = seq.o_ptr<T>(p, b, h);

  int nb_lo, nb_hi;
  vis.key_blocks(m0, min(m0 + BM, seq.sq), BN, nb_lo, nb_hi);

  auto load_k = [&](int nb, int stage) {
    const int n0 = nb * BN;
    sm90::load_tile_sw<BN, D, C::kThreads, T, C::kOpaque>(sK(stage), k + int64_t(n0) * p.k_row_stride,
                                           p.k_row_stride, seq.sk - n0, p.head_dim, k, tid);
  };
  auto load_v = [&](int nb, int stage) {
    const int n0 = nb * BN;
    sm90::load_tile_sw<BN, D, C::kThreads, T, C::kOpaque>(sV(stage), v + int64_t(n0) * p.v_row_stride,
                                           p.v_row_stride, seq.sk - n0, p.head_dim, v, tid);
  };

  // Groups in flight are always (K of this block, V of this block) at the top
  // of an iteration; every step commits one group, empty or not.
  sm90::load_tile_sw<BM, D, C::kThreads>(sQ, q + int64_t(m0) * p.q_row_stride, p.q_row_stride,
                                         seq.sq - m0, p.head_dim, q, tid);
  if (nb_hi > nb_lo) load_k(nb_hi - 1, 0);
  cp_async_commit();
  if (nb_hi > nb_lo) load_v(nb_hi - 1, 0);
  cp_async_commit();

  float acc_o[DA][8][4];
#pragma unroll
  for (int a = 0; a < DA; ++a) zero(acc_o[a]);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const uint32_t qaddr = smem_addr(sQ) + wg * 64 * 128;
  auto addr = [](uint32_t a) { return C::kOpaque ? sm90::opaque(a) : a; };

  int stage = 0;
  for (int nb = nb_hi - 1; nb >= nb_lo; --nb, stage ^= 1) {
    const int n0 = nb * BN;
    cp_async_wait<1>();
    sm90::fence_async_smem();
    __syncthreads();  // K[nb] landed; every warpgroup is done with the other K buffer
    if (nb > nb_lo) load_k(nb - 1, stage ^ 1);
    cp_async_commit();

    float s[NT][4];
    const uint32_t qa = addr(qaddr), ka = addr(smem_addr(sK(stage)));
    sm90::warpgroup_fence();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const uint64_t da = sm90::make_desc(qa + (kk / 4) * BM * 128 + (kk % 4) * 32, 16, 1024);
      const uint64_t db = sm90::make_desc(ka + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024);
      sm90::Wgmma<BN, T>::template ss<0>(s, da, db, kk > 0);
    }
    sm90::commit_group();
    sm90::wait_group<0>();
    sm90::reg_fence(s);

    // Scores in log2 units (masked entries -inf), then the online softmax.
    const bool masked = vis.needs_mask(m0, m0 + BM, n0, n0 + BN);
    const int i0 = m0 + w0 + g;  // rows i0 (e < 2) and i0 + 8
    float scale = 1.f;            // folded into the exponent when no score mod
    if (mod.active) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float unused;
          s[j][e] = mod.log2_score(s[j][e], i0 + (e / 2) * 8, n0 + j * 8 + 2 * t + (e % 2),
                                   vis.off(), unused);
        }
    } else {
      scale = mod.scale_log2;
    }
    if (masked) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!vis.visible(i0 + (e / 2) * 8, n0 + j * 8 + 2 * t + (e % 2))) s[j][e] = -INFINITY;
    }
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
    uint32_t p_frag[PS][4];
    pack_a<PS, T>(p_frag, s);

    cp_async_wait<1>();
    sm90::fence_async_smem();
    __syncthreads();  // V[nb] landed; every warpgroup is done with the other V buffer
    if (nb > nb_lo) load_v(nb - 1, stage ^ 1);
    cp_async_commit();

    const uint32_t va = addr(smem_addr(sV(stage)));
    sm90::warpgroup_fence();
#pragma unroll
    for (int kk = 0; kk < PS; ++kk)
#pragma unroll
      for (int a = 0; a < DA; ++a) {
        const uint64_t db = sm90::make_desc(va + a * BN * 128 + kk * 16 * 128, 1024, 1024);
        sm90::Wgmma<64, T>::template rs<1>(acc_o[a], p_frag[kk], db, 1);
      }
    sm90::commit_group();
    sm90::wait_group<0>();
    sm90::reg_fence(p_frag);  // P stays in its registers until the MMAs read it
#pragma unroll
    for (int a = 0; a < DA; ++a) sm90::reg_fence(acc_o[a]);
  }

  // Normalise, write O through shared memory and the log-sum-exp.
  cp_async_wait<0>();
  __syncthreads();
  float *lse_ptr = p.lse + seq.lse_off(p, b, h);
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int i = m0 + w0 + g + 8 * r;
    if (t == 0 && i < seq.sq) lse_ptr[i] = l > 0.f ? row_max[r] * kLn2 + logf(l) : INFINITY;
  }
#pragma unroll
  for (int a = 0; a < DA; ++a)
    sm90::acc_to_smem_sw<BM, 8, T>(sQ, acc_o[a], w0, a * 64, inv[0], inv[1], lane);
  __syncthreads();
  sm90::store_tile_sw<BM, D, C::kThreads>(o + int64_t(m0) * p.o_row_stride, sQ, p.o_row_stride,
                                          seq.sq - m0, p.head_dim, tid);
#else
  __trap();  // launched only where sm_90a code exists (use_sm90_kernels)
#endif
}

template <int D, typename T>
int run_fwd_sm90(const FlashAttnParams &p, cudaStream_t stream) {
  using C = FwdSm90ConfigFor<D>;
  const dim3 grid((p.seqlen_q + C::BM - 1) / C::BM, p.nheads, p.batch);
  return launch(fwd_sm90_kernel<C, T>, grid, C::kThreads, C::kSmem, stream, p);
}

}  // namespace flash
