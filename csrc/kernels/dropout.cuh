// Attention dropout: which entries of P = softmax(scores) are kept.
//
// The keep mask is a pure function of (seed, offset, b, h, i, j): batch entry, query
// head, query and key position within the sequence. Philox4x32 (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3", SC'11), keyed by the seed, turns a
// counter into 16 random bytes, one for each of 16 entries; an entry is dropped when
// its byte is below round(p * 256) (at most 255), as upstream flash-attention 2 does
// with 8-bit thresholds.
//
// Which 16 entries share a counter follows the MMA fragment layout (tile.cuh), so that
// the thread that holds them computes them: queries i and i + 8 of a 16-row block
// (i % 16 < 8) against the keys 8c + 2t + e of a 32-key chunk (c < 4, e < 2) with the
// same t = (j % 8) / 2. Counter (c0, c1, c2, c3) = ((j / 32) * 4 + t,
// (i / 16) * 8 + i % 8, h, offset + b) (so the mask of (b, h) does not depend on how
// many heads or entries the call has); of the four result words, word c
// holds keys 8c + 2t .. 8c + 2t + 1, byte 2 * ((i / 8) % 2) + j % 2.
//   row layout (forward, dQ): a thread holds queries i0, i0 + 8 and keys n0 + 8c + 2t + e
//       of every tile c: each 32-key chunk is one call, every byte used;
//   column layout (dK/dV, S^T): a thread holds keys j0, j0 + 8 and queries
//       m0 + 8c + 2t + e: threads g and g ^ 1 need the same calls (different bytes), so
//       each computes half and they swap the words.
#pragma once

#include <stdint.h>

#include "flash_api.h"
#include "ptx.cuh"

namespace flash {

// Rounds of Philox4x32: 7, as upstream flash-attention 2's dropout (its philox() runs six
// rounds and a final one), and the fewest the generator's authors found to pass BigCrush
// (torch's and cuRAND's take 10). Each round is four issue slots a call of 16 entries,
// and the forward with dropout is bound by issue slots at head dim 64: 7 rounds measured
// 3-5% faster than 10 on H200 (benchmarks/RESULTS.md).
constexpr int kPhiloxRounds = 7;

// Philox4x32 with kPhiloxRounds rounds: the counter c0..c3 under the key (k0, k1).
__device__ __forceinline__ uint4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                           uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key schedule (Weyl) increments
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi0 = __umulhi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = __umulhi(kM1, c2), lo1 = kM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return make_uint4(c0, c1, c2, c3);
}

// The 8-bit drop threshold of probability p: round(p * 256), at most 255.
__host__ __device__ __forceinline__ uint32_t dropout_threshold(float p) {
  const float x = p * 256.f + 0.5f;
  return x >= 255.f ? 255u : (x <= 0.f ? 0u : static_cast<uint32_t>(x));
}

struct Dropout {
  bool on;          // p > 0 (uniform across the grid)
  float rp;         // 1 / (1 - p): the scale of kept entries
  uint32_t thr4;    // the threshold in each byte
  uint32_t low4;    // its low 7 bits in each byte
  uint32_t k0, k1;  // the seed
  uint32_t head;    // h
  uint32_t boff;    // the offset (its two halves xor-folded) + b

  __device__ __forceinline__ Dropout(const int64_t *rng_state, float p, int b, int h) {
    on = p > 0.f;
    rp = on ? 1.f / (1.f - p) : 1.f;
    thr4 = dropout_threshold(p) * 0x01010101u;
    low4 = thr4 & 0x7F7F7F7Fu;
    k0 = k1 = 0;
    head = static_cast<uint32_t>(h);
    boff = static_cast<uint32_t>(b);
    if (on) {
      const uint64_t seed = static_cast<uint64_t>(rng_state[0]);
      const uint64_t offset = static_cast<uint64_t>(rng_state[1]);
      k0 = static_cast<uint32_t>(seed);
      k1 = static_cast<uint32_t>(seed >> 32);
      boff += static_cast<uint32_t>(offset) ^ static_cast<uint32_t>(offset >> 32);
    }
  }
  __device__ __forceinline__ Dropout(const FlashAttnParams &p, int b, int h)
      : Dropout(p.rng_state, p.dropout_p, b, h) {}
  // kDrop: a kernel compiled with dropout reads the parameters; one compiled without
  // gets the constant "off", and the compiler drops every dropout branch.
  template <bool kDrop>
  __device__ __forceinline__ static Dropout of(const FlashAttnParams &p, int b, int h) {
    return kDrop ? Dropout(p, b, h) : Dropout(nullptr, 0.f, 0, 0);
  }

  // The 16 bytes of the call that holds queries (i / 16) * 16 + i % 8 (+ 8) against the
  // keys of 32-key chunk j32 with lane class t.
  __device__ __forceinline__ uint4 call(int i, int j32, int t) const {
    return philox4x32(static_cast<uint32_t>(j32 * 4 + t), static_cast<uint32_t>((i >> 4) * 8 + (i & 7)), head,
                      boff, k0, k1);
  }
  // Bit 7 of each byte of the result: whether that byte of w keeps its entry (byte >=
  // threshold); the other bits are not defined. Three instructions where __vcmpgeu4 takes
  // five: d's bit 7 says low7(byte) >= low7(threshold) (no borrow crosses bytes: the
  // minuend byte is >= 128 and the subtrahend <= 127), and the top bits decide where
  // they differ.
  __device__ __forceinline__ uint32_t keep_msb(uint32_t w) const {
    const uint32_t d = (w | 0x80808080u) - low4;
    return (w & ~thr4) | (~(w ^ thr4) & d);
  }
};

__device__ __forceinline__ uint32_t word_of(const uint4 &r, int w) {
  return w == 0 ? r.x : (w == 1 ? r.y : (w == 2 ? r.z : r.w));
}

// Row layout, P already packed to 16-bit pairs (pack_a): drops the entries of p_frag
// (NT tiles of 8 keys from n0, n0 % 32 == 0; queries i0 and i0 + 8, i0 % 16 < 8).
template <int NT>
__device__ __forceinline__ void dropout_packed_rows(uint32_t (&p_frag)[NT / 2][4], const Dropout &d, int i0,
                                                    int n0, int lane) {
  static_assert(NT % 4 == 0, "whole 32-key chunks");
  const int t = lane % 4;
#pragma unroll
  for (int q = 0; q < NT / 4; ++q) {
    const uint4 r = d.call(i0, n0 / 32 + q, t);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int c = 4 * q + w;  // tile c: bytes (row 0: e 0, 1; row 8: e 0, 1)
      const uint32_t keep = d.keep_msb(word_of(r, w));
      p_frag[c / 2][2 * (c % 2)] &= prmt<0x9988>(keep, 0);  // bytes 0, 1 -> two 16-bit masks
      p_frag[c / 2][2 * (c % 2) + 1] &= prmt<0xBBAA>(keep, 0);
    }
  }
}

// Row layout, float fragments x[c][e] (query i0 + (e / 2) * 8, key n0 + 8c + 2t + e % 2):
// kept entries times scale, dropped ones 0.
template <int NT>
__device__ __forceinline__ void dropout_rows(float (&x)[NT][4], const Dropout &d, int i0, int n0, int lane,
                                             float scale) {
  static_assert(NT % 4 == 0, "whole 32-key chunks");
  const int t = lane % 4;
#pragma unroll
  for (int q = 0; q < NT / 4; ++q) {
    const uint4 r = d.call(i0, n0 / 32 + q, t);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t keep = d.keep_msb(word_of(r, w));
#pragma unroll
      for (int e = 0; e < 4; ++e) x[4 * q + w][e] = (keep >> (8 * e + 7)) & 1u ? x[4 * q + w][e] * scale : 0.f;
    }
  }
}

// Column layout (transposed tiles of dK/dV): keep flags (keep_msb) for x[c][e] (key jb + g +
// (e / 2) * 8, query m0 + 8c + 2t + e % 2; jb % 16 == 0, m0 % 16 == 0), MT tiles of 8
// queries. The whole warp must build it (shuffles).
template <int MT>
struct ColKeep {
  static_assert(MT % 2 == 0, "16-query blocks");
  // Keep flags of words (jb % 32) / 8 + r (r = 0, 1) of the calls for query tiles 2u,
  // 2u + 1: own[u][r] for column e' = g % 2 (computed here), other[u][r] for e' = 1 - g % 2
  // (computed by thread g ^ 1). No array is indexed by a lane-dependent value.
  uint32_t own[MT / 2][2], other[MT / 2][2];
  int mine;   // g % 2: this thread's key parity, and the column its calls serve
  int shift;  // 8 * mine: the byte of this key parity

  __device__ __forceinline__ ColKeep(const Dropout &d, int jb, int m0, int lane) {
    const int g = lane / 4, t = lane % 4, w0 = (jb % 32) / 8;
    mine = g & 1;
    shift = 8 * mine;
    if (!d.on) return;  // never read then
#pragma unroll
    for (int u = 0; u < MT / 2; ++u) {
      const uint4 r = d.call(m0 + 16 * u + 2 * t + mine, jb / 32, g >> 1);
      const uint32_t a = word_of(r, w0), b = word_of(r, w0 + 1);
      own[u][0] = d.keep_msb(a);
      own[u][1] = d.keep_msb(b);
      other[u][0] = __shfl_xor_sync(0xffffffffu, own[u][0], 4);
      other[u][1] = __shfl_xor_sync(0xffffffffu, own[u][1], 4);
    }
  }
  __device__ __forceinline__ bool kept(int c, int e) const {
    // byte 2 * (c % 2) + key parity of word e / 2 of the call for (c / 2, column e % 2)
    const uint32_t w = (e % 2) == mine ? own[c / 2][e / 2] : other[c / 2][e / 2];
    return (w >> (16 * (c % 2) + shift + 7)) & 1u;
  }
};

}  // namespace flash
