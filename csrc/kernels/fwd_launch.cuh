// Forward: O = softmax(score(Q K^T)) V, one CTA per (query block, head, batch).
// Each warp owns 16 or 32 query rows; keys stream through shared memory from the
// last visible block to the first (the masked blocks come first), with the
// next K tile loading while P V runs and the V tile loading while Q K^T runs.
#pragma once

#include <type_traits>

#include "append_kv.cuh"
#include "dropout.cuh"
#include "fwd_split.cuh"
#include "tile.cuh"
#if defined(FLASH_HAS_SM90A)
#include "fwd_sm90.cuh"
#endif

namespace flash {

template <int D_, int BN_, int WARPS_, int MT_, bool QREG_>
struct FwdConfig {
  static constexpr int D = D_, BN = BN_, kWarps = WARPS_, kThreads = 32 * kWarps;
  static constexpr int kMT = MT_;                // m-tiles of 16 query rows per warp
  static constexpr int BM = 16 * kMT * kWarps;
  static constexpr bool kQInRegs = QREG_;        // keep Q's A fragments in registers
  using Dims = TileDims<D>;
  static constexpr size_t kSmem = size_t(BM + 2 * BN) * Dims::kLd * 2;
};

// Two m-tiles per warp let every K/V fragment read from shared memory feed two
// MMAs; above 128 the output accumulators leave room for one.
template <int D>
using FwdConfigFor = std::conditional_t<
    (D <= 64), FwdConfig<D, 64, 4, 2, true>,
    std::conditional_t<(D <= 128), FwdConfig<D, 64, 4, 2, false>, FwdConfig<D, 64, 8, 1, false>>>;

// kDrop: dropout (a separate instantiation, so the plain one keeps its registers).
template <typename C, typename T, bool kDrop>
__global__ void __launch_bounds__(C::kThreads) fwd_kernel(const FlashAttnParams p) {
  constexpr int D = C::D, BM = C::BM, BN = C::BN, LD = C::Dims::kLd;
  constexpr int KS = C::Dims::kKSteps, DT = C::Dims::kNTiles, NT = BN / 8, MT = C::kMT;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem);
  T *sK = sQ + BM * LD;
  T *sV = sK + BN * LD;

  if (call_aborted(p.abort_flag)) return;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq(p, b);
  const int m0 = m_block * BM;
  if (m0 >= seq.sq) return;
  const int hk = h / (p.nheads / p.nheads_k);
  const Visibility vis{seq.sq, seq.sk, p.window_left, p.window_right};
  const ScoreMod mod(p, b, h);
  const Dropout drop = Dropout::of<kDrop>(p, b, h);

  const T *q = seq.q_ptr<T>(p, b, h);
  const T *k = seq.k_ptr<T>(p, b, hk);
  const T *v = seq.v_ptr<T>(p, b, hk);
  T *o = seq.o_ptr<T>(p, b, h);

  int nb_lo, nb_hi;
  vis.key_blocks(m0, min(m0 + BM, seq.sq), BN, nb_lo, nb_hi);

  load_tile<BM, D, C::kThreads>(sQ, q + int64_t(m0) * p.q_row_stride, p.q_row_stride, seq.sq - m0,
                                p.head_dim, q, tid);
  if (nb_hi > nb_lo) {
    const int n0 = (nb_hi - 1) * BN;
    load_tile<BN, D, C::kThreads>(sK, k + int64_t(n0) * p.k_row_stride, p.k_row_stride, seq.sk - n0,
                                  p.head_dim, k, tid);
  }
  cp_async_commit();

  float acc_o[MT][DT][4];
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    zero(acc_o[m]);
    row_max[m][0] = row_max[m][1] = -INFINITY;
    row_sum[m][0] = row_sum[m][1] = 0.f;
  }
  const int w0 = warp * 16 * MT;  // this warp's first row in the tile
  const T *sQw = sQ + w0 * LD;
  uint32_t q_frag[MT][C::kQInRegs ? KS : 1][4];
  if constexpr (C::kQInRegs) {
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int m = 0; m < MT; ++m) load_a<KS, LD>(q_frag[m], sQw + m * 16 * LD, lane);
  }

  for (int nb = nb_hi - 1; nb >= nb_lo; --nb) {
    const int n0 = nb * BN;
    cp_async_wait<0>();
    __syncthreads();  // K[nb] landed; every warp is done with V[nb+1]
    load_tile<BN, D, C::kThreads>(sV, v + int64_t(n0) * p.v_row_stride, p.v_row_stride, seq.sk - n0,
                                  p.head_dim, v, tid);
    cp_async_commit();

    float s[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) zero(s[m]);
    if constexpr (C::kQInRegs) gemm_rs_nt<MT, NT, KS, LD, T>(s, q_frag, sK, lane);
    else gemm_ss_nt<MT, NT, KS, LD, T>(s, sQw, sK, lane);

    // Scores in log2 units (masked entries -inf), then the online softmax.
    const bool masked = vis.needs_mask(m0, m0 + BM, n0, n0 + BN);
    uint32_t p_frag[MT][BN / 16][4];  // P as 16-bit A fragments: s[m] dies once packed
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int i0 = m0 + w0 + m * 16 + g;  // rows i0 (e < 2) and i0 + 8
      if (mod.active) {
        mod_fragment<NT>(s[m], mod, i0, n0, t, vis.off());
      } else {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[m][j][e] *= mod.scale_log2;
      }
      if (masked) mask_fragment<false>(s[m], vis, i0, n0, t, -INFINITY);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[m][r];
#pragma unroll
        for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[m][j][2 * r], s[m][j][2 * r + 1]));
        mx = quad_max(mx);
        const float base = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2_approx(row_max[m][r] - base);
        row_max[m][r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          s[m][j][2 * r] = exp2_approx(s[m][j][2 * r] - base);
          s[m][j][2 * r + 1] = exp2_approx(s[m][j][2 * r + 1] - base);
          sum += s[m][j][2 * r] + s[m][j][2 * r + 1];
        }
        row_sum[m][r] = row_sum[m][r] * alpha + sum;
#pragma unroll
        for (int j = 0; j < DT; ++j) {
          acc_o[m][j][2 * r] *= alpha;
          acc_o[m][j][2 * r + 1] *= alpha;
        }
      }
      pack_a<BN / 16, T>(p_frag[m], s[m]);
      // Dropout after the row sums: the normaliser counts every entry, P V only the
      // kept ones (their 1 / (1 - p) is applied with the normaliser at the end).
      if (kDrop && drop.on) dropout_packed_rows<NT>(p_frag[m], drop, i0, n0, lane);
    }

    cp_async_wait<0>();
    __syncthreads();  // V[nb] landed; every warp is done with K[nb]
    if (nb > nb_lo) {
      const int n1 = n0 - BN;
      load_tile<BN, D, C::kThreads>(sK, k + int64_t(n1) * p.k_row_stride, p.k_row_stride, seq.sk - n1,
                                    p.head_dim, k, tid);
      cp_async_commit();
    }
    gemm_rs_nn<MT, DT, BN / 16, LD, T>(acc_o, p_frag, sV, lane);
  }

  // Normalise, write O through shared memory and the log-sum-exp.
  cp_async_wait<0>();
  __syncthreads();
  float *lse_ptr = p.lse + seq.lse_off(p, b, h);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_sum[m][r]);
      inv[r] = l > 0.f ? drop.rp / l : 0.f;
      const int i = m0 + w0 + m * 16 + g + 8 * r;
      if (t == 0 && i < seq.sq) lse_ptr[i] = l > 0.f ? row_max[m][r] * kLn2 + logf(l) : INFINITY;
    }
#pragma unroll
    for (int j = 0; j < DT; ++j) {
      acc_o[m][j][0] *= inv[0];
      acc_o[m][j][1] *= inv[0];
      acc_o[m][j][2] *= inv[1];
      acc_o[m][j][3] *= inv[1];
    }
    acc_to_smem<DT, LD, T>(sQ + (w0 + m * 16) * LD, acc_o[m], 1.f, lane);
  }
  __syncthreads();
  store_tile<BM, D, C::kThreads>(o + int64_t(m0) * p.o_row_stride, sQ, p.o_row_stride, seq.sq - m0,
                                 p.head_dim, tid);
}

// Whether the sm_90 forward can read the new rows of p's append from k_new / v_new itself
// and write them into the caches (so no append kernel runs): new rows to read, a dense
// cache read where the append writes (the binding passes the caches themselves, never a
// copy, with an append), keys not shifted by a left pad, a dense q, 16-byte rows.
inline bool reads_new_rows(const FlashAttnParams &p, const FlashAppendKvParams &a) {
  return a.seqlen_new > 0 && p.block_table == nullptr && a.block_table == nullptr && p.leftpad_k == nullptr &&
         p.cu_seqlens_q == nullptr && p.dropout_p == 0.f && p.k == a.k_cache && p.v == a.v_cache &&
         append_vectorizable(a);
}

// The forward, with p.append_kv (a KV-cache forward given k_new / v_new) launched first,
// or done by the sm_90 attention kernel where it reads the new rows itself.
template <int D, typename T>
int run_fwd(const FlashAttnParams &p, cudaStream_t stream) {
  const FlashAppendKvParams *append = p.append_kv;
#if defined(FLASH_HAS_SM90A)
  if constexpr (D % 64 == 0) {
    if (!p.split_kernel && use_sm90_kernels()) {
      if (append != nullptr && reads_new_rows(p, *append)) {
        FlashAttnParams q = p;
        q.k_new = append->k_new;
        q.v_new = append->v_new;
        q.k_new_batch_stride = append->k_new_batch_stride;
        q.k_new_row_stride = append->k_new_row_stride;
        q.k_new_head_stride = append->k_new_head_stride;
        q.v_new_batch_stride = append->v_new_batch_stride;
        q.v_new_row_stride = append->v_new_row_stride;
        q.v_new_head_stride = append->v_new_head_stride;
        q.seqlen_new = append->seqlen_new;
        q.cache_rows = append->cache_rows;
        return run_fwd_sm90<D, T>(q, stream);
      }
    }
  }
#endif
  if (append != nullptr) {
    const int status = launch_append(*append, stream);
    if (status != FLASH_OK) return status;
  }
  if (p.split_kernel) return run_fwd_split<D, T>(p, stream);
#if defined(FLASH_HAS_SM90A)
  if constexpr (D % 64 == 0) {
    if (use_sm90_kernels()) return run_fwd_sm90<D, T>(p, stream);
  }
#endif
  using C = FwdConfigFor<D>;
  const dim3 grid((p.seqlen_q + C::BM - 1) / C::BM, p.nheads, p.batch);
  // a dependent launch: it overlaps the end of the grid before (call_aborted waits for it)
  if (p.dropout_p > 0.f)
    return launch(fwd_kernel<C, T, true>, grid, C::kThreads, C::kSmem, stream, p, /*dependent=*/true);
  return launch(fwd_kernel<C, T, false>, grid, C::kThreads, C::kSmem, stream, p, /*dependent=*/true);
}

}  // namespace flash
