// Tile-level building blocks shared by the forward and backward kernels:
// where a sequence lives, global<->shared tile copies, warp GEMMs on
// m16n8k16 fragments, and the score function (scale, softcap, ALiBi, mask).
//
// Shared-memory tiles are row-major with rows padded by 8 elements (16 bytes),
// which keeps ldmatrix free of bank conflicts without a swizzle.
#pragma once

#include <cuda_runtime.h>
#include <math.h>

#include "flash_api.h"
#include "ptx.cuh"

namespace flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct TileDims {
  static constexpr int kLd = D + 8;      // shared-memory row stride (elements)
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kKSteps = D / 16; // k-steps of 16 along the head dim
  static constexpr int kNTiles = D / 8;  // n-tiles of 8 along the head dim
};

// Where batch entry b lives in the (dense or packed) tensors. The forward
// (kKvCache) also reads the KV-cache fields: kb is the cache row of k and v
// (kv_batch_idx) and k_start their first key (varlen: the token offset; dense:
// leftpad_k), so token j of kv head h is at kb * batch_stride + (k_start + j) *
// row_stride + h * head_stride, and sk counts the keys from k_start on (seqused_k,
// less leftpad_k, where given). The backward takes none of them (dispatch.cu refuses
// them) and compiles without.
template <bool kKvCache>
struct SeqInfoT {
  int q_start, k_start;  // first token (varlen) or 0; k_start also takes leftpad_k
  int kb;                // the batch index of k and v
  int sq, sk;            // this sequence's lengths
  bool varlen;

  __device__ __forceinline__ SeqInfoT(const FlashAttnParams &p, int b) {
    varlen = p.cu_seqlens_q != nullptr;
    kb = varlen ? 0 : b;
    if (varlen) {
      q_start = p.cu_seqlens_q[b];
      k_start = p.cu_seqlens_k[b];
      sq = p.cu_seqlens_q[b + 1] - q_start;
      sk = p.cu_seqlens_k[b + 1] - k_start;
    } else {
      q_start = k_start = 0;
      sq = p.seqlen_q;
      sk = p.seqlen_k;
    }
    if constexpr (kKvCache) {
      if (p.kv_batch_idx != nullptr) kb = p.kv_batch_idx[b];
      // (wrapping, as the int32 add of the counts it replaces did: a bad count is refused
      // by the check, or, unchecked, only read past, never written past)
      if (p.seqused_k != nullptr) sk = int(unsigned(p.seqused_k[b]) + unsigned(p.seqused_k_add));
      if (p.leftpad_k != nullptr) {
        const int pad = p.leftpad_k[b];
        k_start += pad;
        sk -= pad;
      }
    }
  }
  // Offset of token 0 of head h of this sequence.
  __device__ __forceinline__ int64_t q_off(int b, int64_t bs, int64_t rs, int64_t hs, int h) const {
    return (varlen ? q_start * rs : b * bs) + h * hs;
  }
  __device__ __forceinline__ int64_t k_off(int b, int64_t bs, int64_t rs, int64_t hs, int h) const {
    if constexpr (kKvCache) return int64_t(kb) * bs + int64_t(k_start) * rs + h * hs;
    return (varlen ? k_start * rs : b * bs) + h * hs;
  }
  // Token 0 of query head h (q, o, dout, dq) or kv head h (k, v, dk, dv) of entry b.
  template <typename T>
  __device__ __forceinline__ const T *q_ptr(const FlashAttnParams &p, int b, int h) const {
    return static_cast<const T *>(p.q) + q_off(b, p.q_batch_stride, p.q_row_stride, p.q_head_stride, h);
  }
  template <typename T>
  __device__ __forceinline__ const T *k_ptr(const FlashAttnParams &p, int b, int h) const {
    return static_cast<const T *>(p.k) + k_off(b, p.k_batch_stride, p.k_row_stride, p.k_head_stride, h);
  }
  template <typename T>
  __device__ __forceinline__ const T *v_ptr(const FlashAttnParams &p, int b, int h) const {
    return static_cast<const T *>(p.v) + k_off(b, p.v_batch_stride, p.v_row_stride, p.v_head_stride, h);
  }
  template <typename T>
  __device__ __forceinline__ T *o_ptr(const FlashAttnParams &p, int b, int h) const {
    return static_cast<T *>(p.o) + q_off(b, p.o_batch_stride, p.o_row_stride, p.o_head_stride, h);
  }
  template <typename T>
  __device__ __forceinline__ const T *do_ptr(const FlashAttnParams &p, int b, int h) const {
    return static_cast<const T *>(p.dout) +
           q_off(b, p.do_batch_stride, p.do_row_stride, p.do_head_stride, h);
  }
  template <typename T>
  __device__ __forceinline__ T *dq_ptr(const FlashAttnParams &p, int b, int h) const {
    return static_cast<T *>(p.dq) + q_off(b, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, h);
  }
  template <typename T>
  __device__ __forceinline__ T *dk_ptr(const FlashAttnParams &p, int b, int h) const {
    return static_cast<T *>(p.dk) + k_off(b, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, h);
  }
  template <typename T>
  __device__ __forceinline__ T *dv_ptr(const FlashAttnParams &p, int b, int h) const {
    return static_cast<T *>(p.dv) + k_off(b, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, h);
  }
  // Offset of the lse / softmax_d entry of query 0 of head h.
  __device__ __forceinline__ int64_t lse_off(const FlashAttnParams &p, int b, int h) const {
    return (varlen ? q_start : b * p.lse_batch_stride) + h * p.lse_head_stride;
  }
};
using SeqInfo = SeqInfoT<true>;      // the forward kernels
using BwdSeqInfo = SeqInfoT<false>;  // the backward kernels

// Which keys a query sees: i + off - left <= j <= i + off + right, j < sk.
struct Visibility {
  int sq, sk, left, right;
  __device__ __forceinline__ int off() const { return sk - sq; }
  // Queries [lo, hi) that see key j (empty past sk).
  __device__ __forceinline__ void col_queries(int j, int &lo, int &hi) const {
    constexpr int kFar = 1 << 30;
    lo = j >= sk ? kFar : right < 0 ? -kFar : j - off() - right;
    hi = left < 0 ? kFar : j - off() + left + 1;
  }
  // Keys [lo, hi) that queries [m0, m1) can see.
  __device__ __forceinline__ void key_range(int m0, int m1, int &lo, int &hi) const {
    hi = right < 0 ? sk : min(sk, m1 - 1 + off() + right + 1);
    lo = left < 0 ? 0 : max(0, m0 + off() - left);
  }
  // Queries [lo, hi) that see at least one of keys [n0, n1).
  __device__ __forceinline__ void query_range(int n0, int n1, int &lo, int &hi) const {
    lo = right < 0 ? 0 : max(0, n0 - off() - right);
    hi = left < 0 ? sq : min(sq, n1 - 1 - off() + left + 1);
  }
  // The key blocks of BN [nb_lo, nb_hi) that queries [m0, m1) see (empty: nb_hi == nb_lo);
  // block nb holds keys [nb * BN - ofs, (nb + 1) * BN - ofs) (0 <= ofs < BN).
  __device__ __forceinline__ void key_blocks(int m0, int m1, int BN, int &nb_lo, int &nb_hi, int ofs = 0) const {
    int lo, hi;
    key_range(m0, m1, lo, hi);
    nb_lo = (lo + ofs) / BN;
    nb_hi = hi > lo ? (hi + ofs + BN - 1) / BN : nb_lo;
  }
  // The query blocks of BM, mb_lo and n_mb of them, that see a key of [n0, n1).
  __device__ __forceinline__ void query_blocks(int n0, int n1, int BM, int &mb_lo, int &n_mb) const {
    int lo, hi;
    query_range(n0, n1, lo, hi);
    mb_lo = lo / BM;
    n_mb = hi > lo ? (hi + BM - 1) / BM - mb_lo : 0;
  }
  // Whether any pair (i in [m0,m1), j in [n0,n1)) may be invisible.
  __device__ __forceinline__ bool needs_mask(int m0, int m1, int n0, int n1) const {
    return n1 > sk || (right >= 0 && n1 - 1 > m0 + off() + right) ||
           (left >= 0 && n0 < m1 - 1 + off() - left);
  }
};

// Sets to `fill` the entries of a fragment tile that are not visible: x[c][e]
// is line row0 + (e / 2) * 8 against column col0 + c * 8 + 2 * t + (e % 2),
// lines being queries and columns keys, or (kKeyRows, the transposed tiles of
// dK/dV) lines keys and columns queries. Each line's visible range becomes
// bounds relative to this thread's first column, so every entry costs two
// compares against constants.
template <bool kKeyRows, int N>
__device__ __forceinline__ void mask_fragment(float (&x)[N][4], const Visibility &vis, int row0, int col0, int t,
                                              float fill) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int lo, hi;
    if constexpr (kKeyRows) vis.col_queries(row0 + 8 * r, lo, hi);
    else vis.key_range(row0 + 8 * r, row0 + 8 * r + 1, lo, hi);
    lo -= col0 + 2 * t;
    hi -= col0 + 2 * t;
#pragma unroll
    for (int c = 0; c < N; ++c)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (c * 8 + e < lo || c * 8 + e >= hi) x[c][2 * r + e] = fill;
  }
}

// Which tile, head and batch entry a CTA of a (tiles, heads, batch) grid takes.
// Up to 64 tiles (sequences up to 4k-8k), the grid is walked in groups of 16
// (batch, head) pairs: inside a group each tile index goes across the group's
// heads before the next, last tile first or first tile first. Under a causal
// mask the first tiles given out are then the ones with the most blocks (query
// tiles: the last; key tiles: the first), so a group's long CTAs start first and
// its short ones fill the end of the grid, and the tensors a group's CTAs all
// read stay within L2. With more tiles the imbalance is small against the work
// and the grid goes head by head (measured on H100: benchmarks/RESULTS.md).
struct TileCoords {
  int tile, h, b;
};
__device__ __forceinline__ TileCoords tile_coords(bool last_first) {
  const int tiles = gridDim.x, pairs = gridDim.y * gridDim.z;
  const int group = tiles <= 64 ? 16 : 1;
  const int lin = blockIdx.x + tiles * (blockIdx.y + gridDim.y * blockIdx.z);
  const int g0 = lin / (group * tiles) * group;  // first pair of this CTA's group
  const int size = min(group, pairs - g0);
  const int in = lin - g0 * tiles;
  const int pair = g0 + in % size;
  const int k = in / size;
  return {last_first ? tiles - 1 - k : k, pair % int(gridDim.y), pair / int(gridDim.y)};
}

// The score function in log2 units: x = scale*s; x = softcap*tanh(x/softcap);
// x -= slope*|i + off - j|. `deriv` receives d(score)/d(scale*s) (softcap).
struct ScoreMod {
  float scale, scale_log2, softcap, slope;
  bool active;  // softcap or ALiBi present

  __device__ __forceinline__ ScoreMod(const FlashAttnParams &p, int b, int h) {
    scale = p.scale;
    scale_log2 = p.scale * kLog2e;
    softcap = p.softcap;
    slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    active = softcap > 0.f || p.alibi_slopes != nullptr;
  }
  __device__ __forceinline__ float log2_score(float s, int i, int j, int off, float &deriv) const {
    float x = s * scale;
    deriv = 1.f;
    if (softcap > 0.f) {
      const float t = tanhf(x / softcap);
      x = softcap * t;
      deriv = 1.f - t * t;
    }
    x -= slope * fabsf(static_cast<float>(i + off - j));
    return x * kLog2e;
  }
};

// The score mod of a fragment row tile, in place (s[j][e]: query i0 + (e / 2) * 8,
// key n0 + j * 8 + 2 * t + (e % 2)); the forward needs no d(score).
template <int N>
__device__ __forceinline__ void mod_fragment(float (&s)[N][4], const ScoreMod &mod, int i0, int n0, int t,
                                             int off) {
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float unused;
      s[j][e] = mod.log2_score(s[j][e], i0 + (e / 2) * 8, n0 + j * 8 + 2 * t + (e % 2), off, unused);
    }
}

// Copy a ROWS x D tile (rows >= rows_valid or cols >= cols_valid read as 0).
template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void load_tile(T *s, const T *g, int64_t ld, int rows_valid,
                                          int cols_valid, const T *fallback, int tid) {
  constexpr int kLd = TileDims<D>::kLd, kCh = TileDims<D>::kChunks, kTotal = ROWS * kCh;
#pragma unroll 1  // unrolling hoists every address into registers the MMAs need
  for (int it = 0; it < (kTotal + NTHREADS - 1) / NTHREADS; ++it) {
    const int idx = tid + it * NTHREADS;
    if (kTotal % NTHREADS != 0 && idx >= kTotal) break;
    const int r = idx / kCh, c = (idx % kCh) * 8;
    const bool ok = r < rows_valid && c < cols_valid;
    cp_async_16(s + r * kLd + c, ok ? g + r * ld + c : fallback, ok);
  }
}

// Store a ROWS x D tile from shared memory (only the valid part).
template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void store_tile(T *g, const T *s, int64_t ld, int rows_valid,
                                           int cols_valid, int tid) {
  constexpr int kLd = TileDims<D>::kLd, kCh = TileDims<D>::kChunks, kTotal = ROWS * kCh;
#pragma unroll
  for (int it = 0; it < (kTotal + NTHREADS - 1) / NTHREADS; ++it) {
    const int idx = tid + it * NTHREADS;
    if (kTotal % NTHREADS != 0 && idx >= kTotal) break;
    const int r = idx / kCh, c = (idx % kCh) * 8;
    if (r < rows_valid && c < cols_valid)
      *reinterpret_cast<uint4 *>(g + r * ld + c) = *reinterpret_cast<const uint4 *>(s + r * kLd + c);
  }
}

// Write a warp's 16 x (8*NT) f32 accumulator into shared memory as T.
template <int NT, int LD, typename T>
__device__ __forceinline__ void acc_to_smem(T *s, const float (&acc)[NT][4], float mul, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    *reinterpret_cast<uint32_t *>(s + g * LD + j * 8 + 2 * t) =
        pack2<T>(acc[j][0] * mul, acc[j][1] * mul);
    *reinterpret_cast<uint32_t *>(s + (g + 8) * LD + j * 8 + 2 * t) =
        pack2<T>(acc[j][2] * mul, acc[j][3] * mul);
  }
}

// A fragments of a 16 x (16*KS) row-major shared tile.
template <int KS, int LD, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[KS][4], const T *s, int lane) {
#pragma unroll
  for (int k = 0; k < KS; ++k) ldmatrix_x4(a[k], s + (lane % 16) * LD + k * 16 + (lane / 16) * 8);
}

// Element (row, col) of a row-major shared tile of LD elements a row, col a multiple of 8.
// kSwz: the tile is unpadded (LD a multiple of 64 elements) and 16-byte chunk c of row r
// sits at chunk c ^ (r % 8), so that the 8 rows an ldmatrix phase reads, and the 8 chunks
// a 128-byte copy writes, fall in distinct banks without padding the rows.
template <int LD, bool kSwz>
__device__ __forceinline__ int tile_at(int row, int col) {
  static_assert(!kSwz || LD % 64 == 0, "a swizzled row is a whole number of 8-chunk groups");
  if constexpr (kSwz) return row * LD + (((col / 8) ^ (row % 8)) * 8);
  return row * LD + col;
}

// B fragments (two n-tiles) of k-step k, n-tiles n, n+1, from rows stored [n][k].
template <int LD, typename T, bool kSwz = false>
__device__ __forceinline__ void load_b_nt(uint32_t (&b)[4], const T *sB, int n, int k, int lane) {
  ldmatrix_x4(b, sB + tile_at<LD, kSwz>(n * 8 + (lane % 8) + (lane / 16) * 8, k * 16 + ((lane / 8) % 2) * 8));
}
// The same from rows stored [k][n] (transposing load).
template <int LD, typename T, bool kSwz = false>
__device__ __forceinline__ void load_b_nn(uint32_t (&b)[4], const T *sB, int n, int k, int lane) {
  ldmatrix_x4_trans(b, sB + tile_at<LD, kSwz>(k * 16 + (lane % 8) + ((lane / 8) % 2) * 8, n * 8 + (lane / 16) * 8));
}

// acc(16MT x 8NT) += A(16MT x 16KS) * B^T, B stored as rows [n][k] (like K in
// Q K^T); A from registers. Each B fragment feeds MT m-tiles.
template <int MT, int NT, int KS, int LD, typename T, bool kSwz = false>
__device__ __forceinline__ void gemm_rs_nt(float (&acc)[MT][NT][4], const uint32_t (&a)[MT][KS][4],
                                           const T *sB, int lane) {
  static_assert(NT % 2 == 0, "n-tiles come in pairs");
#pragma unroll
  for (int k = 0; k < KS; ++k) {
#pragma unroll
    for (int n = 0; n < NT; n += 2) {
      uint32_t b[4];
      load_b_nt<LD, T, kSwz>(b, sB, n, k, lane);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma_16816<T>(acc[m][n], a[m][k], b[0], b[1]);
        mma_16816<T>(acc[m][n + 1], a[m][k], b[2], b[3]);
      }
    }
  }
}

// Same, A from a (16MT)-row shared tile of LDA elements a row (unswizzled), one k-step
// at a time (fewer registers).
template <int MT, int NT, int KS, int LD, typename T, bool kSwz = false, int LDA = LD>
__device__ __forceinline__ void gemm_ss_nt(float (&acc)[MT][NT][4], const T *sA, const T *sB,
                                           int lane) {
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    uint32_t a[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
      ldmatrix_x4(a[m], sA + (m * 16 + lane % 16) * LDA + k * 16 + (lane / 16) * 8);
#pragma unroll
    for (int n = 0; n < NT; n += 2) {
      uint32_t b[4];
      load_b_nt<LD, T, kSwz>(b, sB, n, k, lane);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma_16816<T>(acc[m][n], a[m], b[0], b[1]);
        mma_16816<T>(acc[m][n + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// acc(16MT x 8NT) += A(16MT x 16KS) * B, B stored row-major as [k][n] (like V in P V).
template <int MT, int NT, int KS, int LD, typename T, bool kSwz = false>
__device__ __forceinline__ void gemm_rs_nn(float (&acc)[MT][NT][4], const uint32_t (&a)[MT][KS][4],
                                           const T *sB, int lane) {
  static_assert(NT % 2 == 0, "n-tiles come in pairs");
#pragma unroll
  for (int k = 0; k < KS; ++k) {
#pragma unroll
    for (int n = 0; n < NT; n += 2) {
      uint32_t b[4];
      load_b_nn<LD, T, kSwz>(b, sB, n, k, lane);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma_16816<T>(acc[m][n], a[m][k], b[0], b[1]);
        mma_16816<T>(acc[m][n + 1], a[m][k], b[2], b[3]);
      }
    }
  }
}

// Single m-tile forms (one warp, 16 rows), as the backward uses them.
template <int NT, int KS, int LD, typename T>
__device__ __forceinline__ void gemm_ss_nt(float (&acc)[NT][4], const T *sA, const T *sB, int lane) {
  gemm_ss_nt<1, NT, KS, LD, T>(reinterpret_cast<float(&)[1][NT][4]>(acc), sA, sB, lane);
}
template <int NT, int KS, int LD, typename T>
__device__ __forceinline__ void gemm_rs_nn(float (&acc)[NT][4], const uint32_t (&a)[KS][4],
                                           const T *sB, int lane) {
  gemm_rs_nn<1, NT, KS, LD, T>(reinterpret_cast<float(&)[1][NT][4]>(acc),
                               reinterpret_cast<const uint32_t(&)[1][KS][4]>(a), sB, lane);
}

// The accumulator layout of a 16 x 16KS tile is the A-operand layout once
// packed to 16 bits: n-tiles 2k and 2k+1 form k-step k.
template <int KS, typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[KS][4], const float (&c)[2 * KS][4]) {
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    a[k][0] = pack2<T>(c[2 * k][0], c[2 * k][1]);
    a[k][1] = pack2<T>(c[2 * k][2], c[2 * k][3]);
    a[k][2] = pack2<T>(c[2 * k + 1][0], c[2 * k + 1][1]);
    a[k][3] = pack2<T>(c[2 * k + 1][2], c[2 * k + 1][3]);
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// Records a CUDA error for flash_last_cuda_error() (dispatch.cu).
void set_cuda_error(cudaError_t e);

// Waits for the grid before this one on the stream to finish and its writes to be
// visible: a no-op unless this grid went out as a programmatic dependent launch (launch()
// with dependent: its CTAs may start while that grid ends, and read nothing before this;
// code built for archs before sm_90 alone has no wait and launches plainly).
__device__ __forceinline__ void wait_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// The first step of every forward kernel: wait_prior_grid, then say whether an index
// check earlier on the stream (kv_check.cuh) refused this call's values: then every
// kernel of the call returns before writing anything.
__device__ __forceinline__ bool call_aborted(const int *abort_flag) {
  wait_prior_grid();
  return abort_flag != nullptr && *abort_flag != 0;
}

// Lets the grid after this one on the stream, where it went out as a dependent launch
// (launch()), be placed on the SMs before this grid ends; it is placed once every CTA of
// this grid has called this or exited. Its CTAs still wait in call_aborted until this
// grid has finished and its writes are visible, so this moves only their launch and
// placement under this grid's last work. (sm_90 and up; code for older archs lets the
// dependent go as this grid ends.)
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether to launch the sm_90a kernels (where a build has them): the current
// device is compute capability 9.0 and FLASH_ATTN_DISABLE_SM90 is unset or 0.
bool use_sm90_kernels();

// Whether the dynamic shared-memory limit of kernel on the current device is known to
// be at least smem (dispatch.cu keeps the record), and recording a raise.
bool smem_limit_raised(const void *kernel, size_t smem);
void note_smem_limit(const void *kernel, size_t smem);

// The KV-cache append (append_kv.cuh), launched from dispatch.cu's one copy of its kernels.
int launch_append(const FlashAppendKvParams &p, cudaStream_t stream);

// Whether the current device takes programmatic dependent launches (compute capability
// 9.0 and up; dispatch.cu).
bool device_has_pdl();

// The newest arch this object is built for (nvcc's __CUDA_ARCH_LIST__, e.g. 900), 0 if
// unknown. Where it is sm_90 or later, every GPU that takes a dependent launch runs code
// with the wait in call_aborted: SASS of its own major (sm_90 and up) or the newest
// arch's PTX. With only older archs such a GPU would JIT their PTX, which has no wait, so
// launch() then launches plainly.
constexpr int newest_built_arch() {
#if defined(__CUDA_ARCH_LIST__)
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  int newest = 0;
  for (int a : archs) newest = a > newest ? a : newest;
  return newest;
#else
  return 0;
#endif
}

// Whether a launch may go out as a programmatic dependent one: the device takes them and
// every GPU that would run this object's code has the wait (newest_built_arch).
inline bool dependent_launches() { return newest_built_arch() >= 900 && device_has_pdl(); }

// kernel<<<grid, threads, smem, stream>>>(args...) as a programmatic dependent launch
// (cudaLaunchAttributeProgrammaticStreamSerialization); the caller checks
// dependent_launches() first.
template <typename Kernel, typename... Args>
inline cudaError_t launch_dependent(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                                    const Args &...args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Raise the dynamic shared-memory limit and launch; returns a FlashStatus. With
// dependent, where the device takes them, as a programmatic dependent launch: the CTAs
// may then be placed while the previous grid on the stream ends, which hides the launch
// between the two (the kernel waits for that grid before it reads anything:
// call_aborted; only kernels that begin with it go out so).
template <typename Kernel>
inline int launch(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                  const FlashAttnParams &p, bool dependent = false) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return FLASH_OK;
  // The limit is raised once per (kernel, device): the call costs about as much as a
  // decode step's whole launch.
  cudaError_t e = cudaSuccess;
  if (smem > 48 * 1024 && !smem_limit_raised(reinterpret_cast<const void *>(kernel), smem)) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e == cudaSuccess) note_smem_limit(reinterpret_cast<const void *>(kernel), smem);
  }
  if (e == cudaSuccess && dependent && dependent_launches()) {
    e = launch_dependent(kernel, grid, threads, smem, stream, p);
  } else if (e == cudaSuccess) {
    kernel<<<grid, threads, smem, stream>>>(p);
    e = cudaGetLastError();
  }
  if (e != cudaSuccess) {
    set_cuda_error(e);
    return FLASH_ERR_CUDA;
  }
  return FLASH_OK;
}

}  // namespace flash
