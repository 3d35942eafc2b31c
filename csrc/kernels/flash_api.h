/* The interface between the torch binding and the kernels.
 *
 * Plain C: no torch, ATen, c10, pybind11 or Python header may be included
 * here or by anything under csrc/kernels. The binding fills these structs
 * from tensors and calls the launch functions on the current stream.
 *
 * Layouts (strides are in elements, the last dimension is contiguous):
 *   dense:  q/k/v/o  (batch, seqlen, nheads, head_dim)
 *   varlen: q/k/v/o  (total_tokens, nheads, head_dim), sequence b spans
 *           rows [cu_seqlens[b], cu_seqlens[b+1]); batch strides are unused.
 *   lse / softmax_d (float32): dense (batch, nheads, seqlen_q),
 *           varlen (nheads, total_q). Row stride 1.
 * head_dim is a multiple of 8 (the Python layer pads); it is dispatched to
 * the smallest compiled bucket >= head_dim.
 */
#ifndef FLASH_API_H
#define FLASH_API_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum FlashStatus {
  FLASH_OK = 0,
  FLASH_ERR_NOT_COMPILED = 1,  /* no instantiation for this head_dim/dtype/direction */
  FLASH_ERR_BAD_ARGUMENT = 2,
  FLASH_ERR_CUDA = 3           /* a CUDA runtime call failed: see flash_last_cuda_error() */
};

enum FlashDtype { FLASH_FP16 = 0, FLASH_BF16 = 1 };

typedef struct FlashAttnParams {
  /* inputs */
  const void *q, *k, *v;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  /* forward output; also an input of the backward */
  void *o;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  float *lse;                       /* natural-log softmax normaliser per query row */
  int64_t lse_batch_stride;         /* dense only */
  int64_t lse_head_stride;          /* seqlen_q (dense) or total_q (varlen) */

  /* backward only */
  const void *dout;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  void *dq, *dk, *dv;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  float *softmax_d;                 /* workspace, same layout as lse: rowsum(dout * o) */

  /* shapes */
  const int *cu_seqlens_q;          /* NULL for dense inputs */
  const int *cu_seqlens_k;
  int batch, nheads, nheads_k, head_dim;
  int seqlen_q, seqlen_k;           /* dense: the lengths; varlen: max_seqlen_q/k */

  /* the score function */
  float scale;                      /* softmax_scale */
  float softcap;                    /* 0: off; else s = softcap * tanh(s / softcap) */
  const float *alibi_slopes;        /* NULL, or (nheads) or (batch, nheads) */
  int64_t alibi_batch_stride;       /* 0 when the slopes are per head only */
  int window_left, window_right;    /* -1 = unbounded; causal is window_right = 0.
                                       Key j is visible from query i iff
                                       i + sk - sq - left <= j <= i + sk - sq + right */
  int dtype;                        /* enum FlashDtype */
  int num_sms;                      /* filled by the launcher if 0 */
} FlashAttnParams;

/* Forward: o, lse. */
int flash_attn_fwd(const FlashAttnParams *params, void *cuda_stream);
/* Backward: dq, dk, dv (softmax_d is a float32 workspace the caller allocates).
 * The result is deterministic: no atomics, the same bits run to run. */
int flash_attn_bwd(const FlashAttnParams *params, void *cuda_stream);

/* Whether an instantiation exists (direction 0 = forward, 1 = backward). */
int flash_attn_has_kernel(int head_dim, int dtype, int direction);
/* JSON text describing the build: head_dims, dtypes, backward, cuda_archs. */
const char *flash_attn_build_info(void);
/* The message of the last CUDA error seen by a launch function (thread-local). */
const char *flash_last_cuda_error(void);

#ifdef __cplusplus
}
#endif

#endif /* FLASH_API_H */
