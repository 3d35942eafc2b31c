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

struct FlashAppendKvParams;

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
  int num_sms;                      /* set by flash_attn_fwd_plan for the split kernel */

  /* KV cache (forward only; NULL when unused). Index arrays are int32 (batch). */
  const int *seqused_k;             /* entry b has keys [0, seqused_k[b] + seqused_k_add) of
                                       its cache row */
  int seqused_k_add;                /* added to every seqused_k[b]: a KV-cache forward that
                                       appends passes cache_seqlens and seqlen_new here, so
                                       no kernel of its own adds them first */
  const int *kv_batch_idx;          /* dense k/v: the cache row (k batch index) of entry b */
  const int *leftpad_k;             /* dense k/v: entry b's keys start at leftpad_k[b]; the
                                       masks and ALiBi see its keys less leftpad_k[b] */
  const int *block_table;           /* paged k/v (num_pages, page_size, nheads_k, head_dim),
                                       the k/v batch strides being the page strides: key j of
                                       entry b is row j % page_size of page
                                       block_table[b * block_table_batch_stride + j / page_size] */
  int64_t block_table_batch_stride;
  int page_size;                    /* a multiple of 16 */

  /* Split-KV: the keys of each (entry, kv head) are cut into num_splits parts whose
     results, with their log-sum-exp, a second kernel combines. flash_attn_fwd_plan
     resolves num_splits (0: chosen here) and says what workspace the caller allocates. */
  int num_splits;
  int split_kernel;                 /* set by flash_attn_fwd_plan: 1 = the split/decode kernel */
  int total_q;                      /* rows of q: batch * seqlen_q (dense) or total_q (varlen) */
  float *oaccum;                    /* (num_splits, nheads, total_q, head_dim) float32 */
  float *lse_accum;                 /* (num_splits, nheads, total_q) float32 */

  /* Attention dropout (forward and backward; not with the split kernel or a KV cache).
     dropout_p in [0, 1): entry (b, h, i, j) of P = softmax(scores) is kept, scaled by
     1 / (1 - dropout_p), where flash_attn_dropout_mask says so. rng_state: two int64 on
     the device, (seed, offset); read only when dropout_p > 0. */
  float dropout_p;
  const int64_t *rng_state;

  /* NULL, or a device int32 that flash_attn_kv_check wrote earlier on the stream: when it
     is nonzero, every kernel of the call returns before writing anything. */
  const int *abort_flag;

  /* NULL, or the append of a KV-cache forward given k_new / v_new: the forward launches it
     before the attention, or, where the attention kernel reads the new rows from k_new /
     v_new itself, has that kernel write them into the caches. */
  const struct FlashAppendKvParams *append_kv;
  /* Set by the forward for a kernel that reads the new rows in place (NULL otherwise):
     entry b's keys [sk - seqlen_new, sk) are rows 0.. of k_new / v_new
     (batch, seqlen_new, nheads_k, head_dim), not the cache's. That kernel also writes
     them into the caches k / v (the append's rows): a row whose key is outside
     [0, seqlen_k) or whose cache row is outside [0, cache_rows) is skipped. */
  const void *k_new, *v_new;
  int64_t k_new_batch_stride, k_new_row_stride, k_new_head_stride;
  int64_t v_new_batch_stride, v_new_row_stride, v_new_head_stride;
  int seqlen_new;
  int64_t cache_rows;               /* dim 0 of the caches k / v */
} FlashAttnParams;

/* Decides how the forward runs: resolves params->num_splits (0 = chosen from the
 * shapes and the current device; at most FLASH_MAX_SPLITS) and params->split_kernel,
 * and gives the float32 workspace the caller must allocate into params->oaccum and
 * params->lse_accum (both 0 when no split is made). Call it before flash_attn_fwd. */
#define FLASH_MAX_SPLITS 128
int flash_attn_fwd_plan(FlashAttnParams *params, int64_t *oaccum_floats, int64_t *lse_accum_floats);
/* Forward: o, lse. */
int flash_attn_fwd(const FlashAttnParams *params, void *cuda_stream);
/* Backward: dq, dk, dv (softmax_d is a float32 workspace the caller allocates).
 * The result is deterministic: no atomics, the same bits run to run. */
int flash_attn_bwd(const FlashAttnParams *params, void *cuda_stream);

/* The keep mask of attention dropout, as the kernels apply it: mask[b][h][i][j] (uint8,
 * batch x nheads x seqlen_q x seqlen_k, contiguous) is 1 where entry (batch entry b, query
 * head h, query i, key j; positions within the sequence) is kept. */
int flash_attn_dropout_mask(const int64_t *rng_state, float dropout_p, int batch, int nheads,
                            int seqlen_q, int seqlen_k, uint8_t *mask, void *cuda_stream);

/* The append of a KV-cache forward (fwd_kv with k_new / v_new): row i of entry b of
 * k_new and v_new (batch, seqlen_new, nheads_k, head_dim) is copied to key position
 * pos = keys(b) - seqlen_new + i of entry b's cache row, where keys(b) is seqused_k[b] +
 * seqused_k_add (or capacity when seqused_k is NULL). Dense caches (cache_rows, capacity,
 * nheads_k, head_dim): row kv_batch_idx[b] (or b), key pos. Paged caches (cache_rows = num_pages,
 * page_size, nheads_k, head_dim): row pos % page_size of page
 * block_table[b * block_table_batch_stride + pos / page_size], capacity being
 * pages_per_seq * page_size. Whatever the index values, nothing outside the caches is
 * written: a row whose pos is outside [0, capacity), whose cache row is outside
 * [0, cache_rows) or whose page is outside [0, num_pages) is skipped.
 * Elements are 2 bytes (fp16 or bf16); strides in elements; last dims contiguous. */
typedef struct FlashAppendKvParams {
  const void *k_new, *v_new;
  int64_t k_new_batch_stride, k_new_row_stride, k_new_head_stride;
  int64_t v_new_batch_stride, v_new_row_stride, v_new_head_stride;
  void *k_cache, *v_cache;          /* batch strides: the row (dense) or page (paged) strides */
  int64_t k_cache_batch_stride, k_cache_row_stride, k_cache_head_stride;
  int64_t v_cache_batch_stride, v_cache_row_stride, v_cache_head_stride;
  int batch, seqlen_new, nheads_k, head_dim;
  int64_t cache_rows;               /* dim 0 of the caches: rows (dense) or pages (paged) */
  int64_t capacity;                 /* keys a cache row holds */
  const int *seqused_k;             /* (batch) int32, or NULL */
  int seqused_k_add;                /* as FlashAttnParams.seqused_k_add */
  const int *kv_batch_idx;          /* dense: (batch) int32, or NULL */
  const int *block_table;           /* paged: int32, or NULL for a dense cache */
  int64_t block_table_batch_stride;
  int page_size;                    /* paged: > 0 */
  const int *abort_flag;            /* as FlashAttnParams.abort_flag: nonzero, nothing is written */
} FlashAppendKvParams;

/* Copies k_new and v_new into the caches (one kernel, 16-byte copies where the pointers
 * and strides allow) on the stream; a kernel launched after it on the same stream (not
 * as a programmatic dependent launch) sees the new keys. */
int flash_attn_append_kv(const FlashAppendKvParams *params, void *cuda_stream);

/* The index check of a KV-cache forward, made on the device so that the caller need not
 * wait for the values before launching (flash_attn_with_kvcache's checked call):
 * flash_attn_kv_check launches one small kernel that reads every index value of params
 * (seqused_k + seqused_k_add, or the lengths of cu_seqlens_k, else seqlen_k for every
 * entry: the keys; kv_batch_idx, leftpad_k, and the block_table entries of the pages the
 * keys use) and writes the verdict, 0 or FLASH_KV_BAD_* bits, to *flag (device) and
 * *verdict (host).
 * Valid: keys in [min_keys, max_keys]; kv_batch_idx in [0, cache_rows); leftpad_k in
 * [0, keys]; block_table[b][j] in [0, cache_rows) for j < ceil(keys / page_size).
 * Give params->abort_flag = flag (and the append's) to the kernels launched after it on
 * the same stream: with a nonzero verdict they write nothing. *verdict is host memory
 * the device can write (page-locked, mapped: any cudaHostAlloc / cudaMallocHost memory
 * under unified addressing); it is set to -1 here, then the kernel writes it.
 * flash_attn_wait_verdict waits (on the host) until it is written; FLASH_ERR_CUDA if the
 * stream fails or finishes without writing it. */
typedef struct FlashKvCheck {
  int *flag;                        /* device int32 */
  volatile int *verdict;            /* host int32 */
  int64_t min_keys, max_keys;       /* valid keys of an entry */
  int64_t cache_rows;               /* dim 0 of k: rows (dense) or pages (paged) */
} FlashKvCheck;
#define FLASH_KV_BAD_KEYS 1
#define FLASH_KV_BAD_ROW 2
#define FLASH_KV_BAD_LEFTPAD 4
#define FLASH_KV_BAD_PAGE 8
int flash_attn_kv_check(const FlashAttnParams *params, const FlashKvCheck *check, void *cuda_stream);
int flash_attn_wait_verdict(const volatile int *verdict, void *cuda_stream);

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
