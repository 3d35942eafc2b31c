// The only C++ that sees torch: registers flash_attn::fwd / fwd_kv / bwd / dropout_mask / build_info with
// the dispatcher, checks inputs, allocates outputs and calls the kernels
// (csrc/kernels/flash_api.h) on the current stream.
//
// One source, two bindings (torch_api.h): built with FLASH_ATTN_STABLE_ABI=1 it
// uses only the LibTorch stable ABI and the limited Python API (one _C.abi3.so for
// every torch from the floor in recipes/stable_abi.toml on); otherwise the classic
// C++ API, for one torch. Neither needs the CUDA toolkit's headers or a CUDA torch
// to compile.
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "torch_api.h"

namespace {

using fa::Tensor;
using fa::ScalarType;
using OptTensor = std::optional<Tensor>;

// The kernels need a unit last-dim stride, the other strides a multiple of 8
// elements and 16-byte aligned data; anything else is copied once.
bool kernel_ready_as_is(const Tensor &t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; ok && d + 1 < t.dim(); ++d) ok = t.stride(d) % 8 == 0 || t.size(d) == 1;
  return ok;
}

Tensor kernel_ready(const Tensor &t) { return kernel_ready_as_is(t) ? t : fa::contiguous(t); }

bool same_device(const Tensor &a, const Tensor &b) {
  return fa::is_cuda(a) && fa::is_cuda(b) && fa::device_index(a) == fa::device_index(b);
}

void check_tensor(const Tensor &t, const char *name, const Tensor &q) {
  FA_CHECK(fa::is_cuda(t), name, " must be a CUDA tensor, got device ", fa::device_text(t));
  FA_CHECK(same_device(t, q), name, " is on ", fa::device_text(t), " but q is on ",
           fa::device_text(q));
  FA_CHECK(fa::dtype(t) == fa::dtype(q), name, " has dtype ", fa::dtype_name(fa::dtype(t)),
           " but q has ", fa::dtype_name(fa::dtype(q)));
}

void check_cu_seqlens(const Tensor &cu, const char *name, const Tensor &q) {
  FA_CHECK(same_device(cu, q), name, " must be on q's device ", fa::device_text(q), ", got ",
           fa::device_text(cu));
  FA_CHECK(fa::dtype(cu) == ScalarType::Int, name, " must be int32, got ",
           fa::dtype_name(fa::dtype(cu)));
  FA_CHECK(cu.dim() == 1 && cu.is_contiguous(), name, " must be a contiguous 1-D tensor");
}

int dtype_code(const Tensor &q) {
  if (fa::dtype(q) == ScalarType::Half) return FLASH_FP16;
  if (fa::dtype(q) == ScalarType::BFloat16) return FLASH_BF16;
  fa::fail("only float16 and bfloat16 are supported, got ", fa::dtype_name(fa::dtype(q)));
}

void raise_on_error(int status, const FlashAttnParams &p, const char *direction) {
  if (status == FLASH_OK) return;
  const char *dtype = p.dtype == FLASH_BF16 ? "bf16" : "fp16";
  FA_CHECK(status != FLASH_ERR_NOT_COMPILED, "this build has no ", direction,
           " kernel for head_dim ", p.head_dim, " and dtype ", dtype, " (compiled: ",
           flash_attn_build_info(),
           "); rebuild with FLASH_ATTN_HEAD_DIMS / FLASH_ATTN_DTYPES / FLASH_ATTN_BACKWARD "
           "covering it");
  FA_CHECK(status != FLASH_ERR_BAD_ARGUMENT, "invalid arguments for the ", direction,
           " kernel (head_dim ", p.head_dim, ", nheads ", p.nheads, ", nheads_k ", p.nheads_k, ")");
  fa::fail("CUDA error in the ", direction, " kernel: ", flash_last_cuda_error());
}

// ALiBi slopes, (nheads,) or (batch, nheads) float32 on q's device (p.batch set).
void set_alibi(FlashAttnParams &p, const OptTensor &alibi, const Tensor &q, int64_t h) {
  if (!alibi.has_value()) return;
  FA_CHECK(same_device(*alibi, q) && fa::dtype(*alibi) == ScalarType::Float,
           "alibi_slopes must be float32 on q's device");
  FA_CHECK((alibi->dim() == 1 && alibi->size(0) == h) ||
               (alibi->dim() == 2 && alibi->size(0) == p.batch && alibi->size(1) == h),
           "alibi_slopes must have shape (nheads,) or (batch, nheads), got ",
           fa::shape_text(fa::shape(*alibi)));
  FA_CHECK(alibi->stride(-1) == 1, "alibi_slopes must be contiguous in the head dim");
  p.alibi_slopes = static_cast<float *>(alibi->data_ptr());
  p.alibi_batch_stride = alibi->dim() == 2 ? alibi->stride(0) : 0;
}

void check_dropout_p(double dropout_p) {
  FA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
}

// The (seed, offset) pair of attention dropout: a contiguous int64 CUDA tensor of 2 elements.
const int64_t *rng_state_ptr(const Tensor &r) {
  FA_CHECK(fa::is_cuda(r) && fa::dtype(r) == ScalarType::Long && r.numel() == 2 && r.is_contiguous(),
           "rng_state must be a contiguous int64 CUDA tensor of 2 elements (seed, offset), got ",
           fa::dtype_name(fa::dtype(r)), " ", fa::shape_text(fa::shape(r)), " on ", fa::device_text(r));
  return static_cast<const int64_t *>(r.data_ptr());
}

// Attention dropout: dropout_p in [0, 1); with dropout_p > 0 rng_state is the (seed,
// offset) pair on q's device (flash_api.h).
void set_dropout(FlashAttnParams &p, double dropout_p, const OptTensor &rng_state, const Tensor &q) {
  check_dropout_p(dropout_p);
  p.dropout_p = static_cast<float>(dropout_p);
  if (dropout_p == 0.0) return;
  FA_CHECK(rng_state.has_value(), "dropout_p = ", dropout_p,
           " needs rng_state, an int64 tensor of 2 elements (seed, offset) on q's device");
  p.rng_state = rng_state_ptr(*rng_state);
  FA_CHECK(same_device(*rng_state, q), "rng_state is on ", fa::device_text(*rng_state), " but q is on ",
           fa::device_text(q));
}

// An int32 (batch,) index tensor on q's device.
const int *index_tensor(const OptTensor &t, const char *name, const Tensor &q, int64_t batch) {
  if (!t.has_value()) return nullptr;
  FA_CHECK(same_device(*t, q), name, " must be on q's device ", fa::device_text(q), ", got ",
           fa::device_text(*t));
  FA_CHECK(fa::dtype(*t) == ScalarType::Int, name, " must be int32, got ",
           fa::dtype_name(fa::dtype(*t)));
  FA_CHECK(t->dim() == 1 && t->size(0) == batch && t->is_contiguous(), name,
           " must be a contiguous (batch,) = (", batch, ",) tensor, got shape ",
           fa::shape_text(fa::shape(*t)));
  return static_cast<const int *>(t->data_ptr());
}

// Where the keys of a forward over a KV cache live (fwd_kv), and the new keys and
// values it appends first (k_new, v_new); none for fwd and bwd.
struct KvCache {
  OptTensor seqused_k, kv_batch_idx, leftpad_k, block_table;
  OptTensor k_new, v_new;
  bool paged() const { return block_table.has_value(); }
  bool appends() const { return k_new.has_value() || v_new.has_value(); }
};

// Shapes and the fields shared by forward and backward. k and v are laid out like q
// (dense or varlen) unless a KV cache says otherwise: dense rows picked by
// kv_batch_idx, or pages (num_pages, page_size, nheads_k, head_dim) of block_table.
FlashAttnParams make_params(const Tensor &q, const Tensor &k, const Tensor &v, const OptTensor &cu_q,
                            const OptTensor &cu_k, int64_t max_sq, int64_t max_sk, double scale,
                            int64_t left, int64_t right, double softcap, const OptTensor &alibi,
                            const KvCache &cache = {}) {
  FlashAttnParams p{};
  const bool varlen = cu_q.has_value(), paged = cache.paged();
  FA_CHECK(varlen == cu_k.has_value(), "give both cu_seqlens_q and cu_seqlens_k or neither");
  FA_CHECK(!paged || (!cache.kv_batch_idx.has_value() && !cache.leftpad_k.has_value()),
           "block_table excludes kv_batch_idx and leftpad_k");
  FA_CHECK(!varlen || (!cache.kv_batch_idx.has_value() && !cache.leftpad_k.has_value()),
           "kv_batch_idx and leftpad_k need dense q, k, v");
  const int64_t rank = varlen ? 3 : 4, k_rank = paged ? 4 : rank;
  FA_CHECK(q.dim() == rank && k.dim() == k_rank && v.dim() == k_rank, "q must be ", rank, "-D (",
           varlen ? "total, nheads, head_dim" : "batch, seqlen, nheads, head_dim", ") and k, v ",
           k_rank, "-D", paged ? " (num_pages, page_size, nheads_k, head_dim)" : "", ", got ",
           q.dim(), "-D, ", k.dim(), "-D, ", v.dim(), "-D");
  check_tensor(k, "k", q);
  check_tensor(v, "v", q);
  p.dtype = dtype_code(q);
  const int64_t d = q.size(-1);
  FA_CHECK(d > 0 && d <= 256 && d % 8 == 0,
           "head_dim must be a multiple of 8 in (0, 256] at the op level (the Python API pads), got ", d);
  FA_CHECK(k.size(-1) == d && v.size(-1) == d, "q, k, v head dims differ: ", d, ", ", k.size(-1),
           ", ", v.size(-1));
  const int64_t h = q.size(-2), hk = k.size(-2);
  FA_CHECK(v.size(-2) == hk, "k and v have different numbers of heads");
  FA_CHECK(hk > 0 && h % hk == 0, "nheads (", h, ") must be a multiple of nheads_k (", hk, ")");
  if (varlen) {
    check_cu_seqlens(*cu_q, "cu_seqlens_q", q);
    check_cu_seqlens(*cu_k, "cu_seqlens_k", q);
    FA_CHECK(cu_q->numel() == cu_k->numel() && cu_q->numel() >= 1,
             "cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got ", cu_q->numel(),
             " and ", cu_k->numel());
    p.batch = static_cast<int>(cu_q->numel() - 1);
    p.seqlen_q = static_cast<int>(max_sq);
    p.seqlen_k = static_cast<int>(max_sk);
    p.cu_seqlens_q = static_cast<int *>(cu_q->data_ptr());
    p.cu_seqlens_k = static_cast<int *>(cu_k->data_ptr());
  } else {
    p.batch = static_cast<int>(q.size(0));
    p.seqlen_q = static_cast<int>(q.size(1));
  }
  if (paged) {
    const Tensor &bt = *cache.block_table;
    FA_CHECK(fa::shape(k) == fa::shape(v), "the paged k and v must have the same shape, got ",
             fa::shape_text(fa::shape(k)), " and ", fa::shape_text(fa::shape(v)));
    FA_CHECK(same_device(bt, q) && fa::dtype(bt) == ScalarType::Int && bt.dim() == 2 &&
                 bt.size(0) == p.batch && bt.stride(1) == 1,
             "block_table must be an int32 (batch, pages_per_seq) tensor on q's device with "
             "contiguous rows, got ", fa::shape_text(fa::shape(bt)));
    FA_CHECK(k.size(1) % 16 == 0, "the page size (k.shape[1]) must be a multiple of 16, got ",
             k.size(1));
    p.block_table = static_cast<const int *>(bt.data_ptr());
    p.block_table_batch_stride = bt.stride(0);
    p.page_size = static_cast<int>(k.size(1));
    p.seqlen_k = static_cast<int>(bt.size(1) * k.size(1));
  } else if (varlen) {
    FA_CHECK(k.size(0) == v.size(0), "k and v have different token counts");
  } else {
    FA_CHECK(k.size(0) == v.size(0) &&
                 (cache.kv_batch_idx.has_value() ? k.size(0) >= 1 : k.size(0) == p.batch),
             "k and v must have q's batch size (", p.batch, ") unless kv_batch_idx picks their "
             "rows, got ", k.size(0), " and ", v.size(0));
    FA_CHECK(k.size(1) == v.size(1), "k and v have different sequence lengths");
    p.seqlen_k = static_cast<int>(k.size(1));
  }
  p.seqused_k = index_tensor(cache.seqused_k, "seqused_k", q, p.batch);
  p.kv_batch_idx = index_tensor(cache.kv_batch_idx, "kv_batch_idx", q, p.batch);
  p.leftpad_k = index_tensor(cache.leftpad_k, "leftpad_k", q, p.batch);
  p.nheads = static_cast<int>(h);
  p.nheads_k = static_cast<int>(hk);
  p.head_dim = static_cast<int>(d);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = static_cast<int>(left);
  p.window_right = static_cast<int>(right);
  set_alibi(p, alibi, q, h);
  return p;
}

#define SET_STRIDES(P, PREFIX, T, VARLEN)                           \
  do {                                                              \
    P.PREFIX##_batch_stride = (VARLEN) ? 0 : (T).stride(0);         \
    P.PREFIX##_row_stride = (T).stride((VARLEN) ? 0 : 1);           \
    P.PREFIX##_head_stride = (T).stride((VARLEN) ? 1 : 2);          \
  } while (0)

void set_lse(FlashAttnParams &p, const Tensor &lse, bool varlen) {
  p.lse = static_cast<float *>(lse.data_ptr());
  p.lse_batch_stride = varlen ? 0 : lse.stride(0);
  p.lse_head_stride = lse.stride(varlen ? 0 : 1);
}

std::vector<int64_t> lse_shape(const Tensor &q, const FlashAttnParams &p, bool varlen) {
  if (varlen) return {p.nheads, q.size(0)};
  return {p.batch, p.nheads, p.seqlen_q};
}

// k_new or v_new as the append takes it: the cache's dtype and device, shape
// (batch, seqlen_new, nheads_k, head_dim), last dim contiguous (else copied once).
Tensor new_rows(const Tensor &t, const char *name, const Tensor &cache, const char *cache_name,
                const FlashAttnParams &p, int64_t seqlen_new) {
  FA_CHECK(same_device(t, cache), name, " is on ", fa::device_text(t), " but the cache ", cache_name,
           " is on ", fa::device_text(cache));
  FA_CHECK(fa::dtype(t) == fa::dtype(cache), name, " has dtype ", fa::dtype_name(fa::dtype(t)),
           " but the cache ", cache_name, " has ", fa::dtype_name(fa::dtype(cache)));
  const std::vector<int64_t> expected = {p.batch, seqlen_new, p.nheads_k, p.head_dim};
  FA_CHECK(fa::shape(t) == expected, name, " must have shape (batch, seqlen_new, nheads_k, head_dim) = (",
           p.batch, ", ", seqlen_new, ", ", p.nheads_k, ", ", p.head_dim, ") (seqlen_new: dim 1 of k_new), got ",
           fa::shape_text(fa::shape(t)));
  return t.stride(-1) == 1 ? t : fa::contiguous(t);
}

// The append of k_new and v_new into the caches k and v in place (flash_api.h,
// flash_attn_append_kv), checked and laid out; the forward launches it before the
// attention, or has the sm_90 attention kernel write the rows itself where it reads them
// from k_new / v_new (FlashAttnParams.append_kv), or launch_append does where no attention
// runs or the caches the attention reads are a copy. p is the forward's (checked)
// parameters; k and v are the caches as given (never a copy: the append must land in them).
struct AppendRows {
  FlashAppendKvParams a;
  Tensor k_new, v_new;  // as the kernel reads them (kept alive until it is launched)
};

AppendRows prepare_append(const FlashAttnParams &p, const Tensor &k, const Tensor &v,
                          const OptTensor &cu_q, const KvCache &cache) {
  FA_CHECK(cache.k_new.has_value() && cache.v_new.has_value(),
           "k_new and v_new go together: give both or neither");
  FA_CHECK(!cu_q.has_value(), "k_new and v_new need a dense q and a dense or paged cache "
           "(no cu_seqlens_q / cu_seqlens_k)");
  FA_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1,
           "with k_new and v_new the caches k and v are written in place: their last dimension must "
           "be contiguous (stride 1)");
  FA_CHECK(cache.k_new->dim() == 4, "k_new must have shape (batch, seqlen_new, nheads_k, head_dim), got ",
           fa::shape_text(fa::shape(*cache.k_new)));
  const int64_t seqlen_new = cache.k_new->size(1);
  FA_CHECK(p.batch * seqlen_new <= INT32_MAX, "k_new has too many rows (batch x seqlen_new must fit in "
           "int32), got ", p.batch, " x ", seqlen_new);
  AppendRows r{FlashAppendKvParams{}, new_rows(*cache.k_new, "k_new", k, "k", p, seqlen_new),
               new_rows(*cache.v_new, "v_new", v, "v", p, seqlen_new)};
  FlashAppendKvParams &a = r.a;
  const Tensor &kn = r.k_new, &vn = r.v_new;
  a.k_new = kn.data_ptr();
  a.v_new = vn.data_ptr();
  a.k_new_batch_stride = kn.stride(0), a.k_new_row_stride = kn.stride(1), a.k_new_head_stride = kn.stride(2);
  a.v_new_batch_stride = vn.stride(0), a.v_new_row_stride = vn.stride(1), a.v_new_head_stride = vn.stride(2);
  a.k_cache = k.data_ptr();
  a.v_cache = v.data_ptr();
  a.k_cache_batch_stride = k.stride(0), a.k_cache_row_stride = k.stride(1), a.k_cache_head_stride = k.stride(2);
  a.v_cache_batch_stride = v.stride(0), a.v_cache_row_stride = v.stride(1), a.v_cache_head_stride = v.stride(2);
  a.batch = p.batch;
  a.seqlen_new = static_cast<int>(seqlen_new);
  a.nheads_k = p.nheads_k;
  a.head_dim = p.head_dim;
  a.cache_rows = k.size(0);
  a.capacity = p.seqlen_k;  // dense: seqlen_cache; paged: pages_per_seq * page_size
  a.seqused_k = p.seqused_k;
  // fwd_kv's seqused_k counts the keys before the append: the kernels add seqlen_new
  a.seqused_k_add = p.seqused_k != nullptr ? a.seqlen_new : 0;
  a.kv_batch_idx = p.kv_batch_idx;
  a.block_table = p.block_table;
  a.block_table_batch_stride = p.block_table_batch_stride;
  a.page_size = p.page_size;
  return r;
}

void launch_append(AppendRows &r, const Tensor &q, const int *abort_flag) {
  r.a.abort_flag = abort_flag;
  const int status = flash_attn_append_kv(&r.a, fa::current_stream(q));
  FA_CHECK(status != FLASH_ERR_BAD_ARGUMENT, "invalid arguments for the KV-cache append (batch ", r.a.batch,
           ", seqlen_new ", r.a.seqlen_new, ", nheads_k ", r.a.nheads_k, ", head_dim ", r.a.head_dim, ")");
  FA_CHECK(status == FLASH_OK, "CUDA error in the KV-cache append: ", flash_last_cuda_error());
}

// The index check on the device (flash_api.h, flash_attn_kv_check) of a fwd_kv given a
// verdict: launched before anything of the call, waited for after all of it is launched
// (wait()), or, when the call fails on the host in between, when this goes out of scope
// (so that a check kernel still in flight never writes a later call's verdict).
class DeviceCheck {
 public:
  DeviceCheck(const FlashAttnParams &p, const Tensor &q, const Tensor &k, const Tensor &verdict,
              int64_t max_keys, int64_t seqlen_new)
      : stream_(fa::current_stream(q)) {
    FA_CHECK(!fa::is_cuda(verdict) && fa::dtype(verdict) == ScalarType::Int && verdict.numel() == 1 &&
                 verdict.is_contiguous(),
             "verdict must be a one-element int32 CPU tensor in page-locked memory "
             "(torch.empty(1, dtype=torch.int32, pin_memory=True)), got ",
             fa::dtype_name(fa::dtype(verdict)), " ", fa::shape_text(fa::shape(verdict)), " on ",
             fa::device_text(verdict));
    flag_ = fa::empty_like_device(q, {1}, ScalarType::Int);
    FlashKvCheck c{};
    c.flag = static_cast<int *>(flag_->data_ptr());
    c.verdict = static_cast<volatile int *>(verdict.data_ptr());
    c.min_keys = p.seqused_k != nullptr ? seqlen_new : 0;  // cache_seqlens >= 0
    c.max_keys = max_keys < 0 || max_keys > p.seqlen_k ? p.seqlen_k : max_keys;
    c.cache_rows = k.size(0);
    FA_CHECK(c.min_keys <= c.max_keys, "no key count is valid: k_new has ", seqlen_new,
             " rows but a sequence holds at most ", c.max_keys, " keys (max_keys, or the capacity)");
    const int status = flash_attn_kv_check(&p, &c, stream_);
    FA_CHECK(status != FLASH_ERR_BAD_ARGUMENT,
             "verdict must be page-locked host memory the GPU can write (pin_memory=True)");
    FA_CHECK(status == FLASH_OK, "CUDA error in the KV-cache index check: ", flash_last_cuda_error());
    verdict_ = c.verdict;
  }
  DeviceCheck(const DeviceCheck &) = delete;
  DeviceCheck &operator=(const DeviceCheck &) = delete;
  ~DeviceCheck() {
    if (verdict_ != nullptr) flash_attn_wait_verdict(verdict_, stream_);
  }
  const int *flag() const { return static_cast<const int *>(flag_->data_ptr()); }
  void wait() {
    const volatile int *v = verdict_;
    verdict_ = nullptr;
    FA_CHECK(flash_attn_wait_verdict(v, stream_) == FLASH_OK,
             "CUDA error while waiting for the KV-cache index check: ", flash_last_cuda_error());
  }

 private:
  void *stream_;
  std::optional<Tensor> flag_;
  const volatile int *verdict_ = nullptr;
};

// The launch's plan (split kernel or not, how many splits) and the split workspace it
// asks for, in floats; made before anything of the call is launched, so that a call this
// build has no kernel for fails before it writes anything.
struct ForwardPlan {
  int64_t oaccum_floats = 0, lse_accum_floats = 0;
};

ForwardPlan plan_forward(FlashAttnParams &p) {
  ForwardPlan plan;
  raise_on_error(flash_attn_fwd_plan(&p, &plan.oaccum_floats, &plan.lse_accum_floats), p, "forward");
  return plan;
}

// Allocates the split workspace the plan asks for and runs the forward.
void run_forward(FlashAttnParams &p, const ForwardPlan &plan, const Tensor &q) {
  const int64_t oaccum_floats = plan.oaccum_floats, lse_accum_floats = plan.lse_accum_floats;
  // One allocation for both (a decode step pays for each); freed after the launch,
  // stream-ordered. oaccum comes first: head_dim is a multiple of 8, so lse_accum stays
  // 32-byte aligned behind it.
  std::optional<Tensor> workspace;
  if (oaccum_floats > 0) {
    workspace = fa::empty_like_device(q, {oaccum_floats + lse_accum_floats}, ScalarType::Float);
    p.oaccum = static_cast<float *>(workspace->data_ptr());
    p.lse_accum = p.oaccum + oaccum_floats;
  }
  raise_on_error(flash_attn_fwd(&p, fa::current_stream(q)), p, "forward");
}

// The forward of fwd and fwd_kv: outputs, pointers and strides, then the launch.
std::tuple<Tensor, Tensor> forward(const Tensor &q_in, const Tensor &k_in, const Tensor &v_in,
                                   const OptTensor &cu_q, const OptTensor &cu_k, int64_t max_sq,
                                   int64_t max_sk, double scale, int64_t left, int64_t right,
                                   double softcap, const OptTensor &alibi, const KvCache &cache,
                                   int64_t num_splits, double dropout_p, const OptTensor &rng_state,
                                   const OptTensor &verdict = std::nullopt, int64_t max_keys = -1) {
  FA_CHECK(fa::is_cuda(q_in), "q must be a CUDA tensor, got device ", fa::device_text(q_in));
  FA_CHECK(num_splits >= 0 && num_splits <= FLASH_MAX_SPLITS, "num_splits must be in [0, ",
           FLASH_MAX_SPLITS, "] (0 = chosen by the kernels), got ", num_splits);
  const fa::DeviceGuard guard(q_in);
  const Tensor q = kernel_ready(q_in);
  // checked on k and v as given: the append writes into them, and a copy for the
  // kernels (kernel_ready) is made after it
  FlashAttnParams p =
      make_params(q, k_in, v_in, cu_q, cu_k, max_sq, max_sk, scale, left, right, softcap, alibi, cache);
  p.num_splits = static_cast<int>(num_splits);
  set_dropout(p, dropout_p, rng_state, q);
  const bool varlen = cu_q.has_value();
  p.total_q = static_cast<int>(varlen ? q.size(0) : q.size(0) * q.size(1));
  // (no plan for no queries: no attention runs, only an append where given)
  const ForwardPlan plan = q.numel() > 0 ? plan_forward(p) : ForwardPlan{};
  std::optional<AppendRows> append;
  if (cache.appends()) {
    append.emplace(prepare_append(p, k_in, v_in, cu_q, cache));
    p.seqused_k_add = append->a.seqused_k_add;
  }
  std::optional<DeviceCheck> check;
  if (verdict.has_value()) {
    check.emplace(p, q, k_in, *verdict, max_keys, append ? int64_t(append->a.seqlen_new) : 0);
    p.abort_flag = check->flag();
  }
  if (append) {
    if (kernel_ready_as_is(k_in) && kernel_ready_as_is(v_in)) {
      append->a.abort_flag = p.abort_flag;
      p.append_kv = &append->a;  // launched by the forward, with the attention
    } else {
      launch_append(*append, q, p.abort_flag);  // before kernel_ready copies the caches
    }
  }
  const Tensor k = kernel_ready(k_in), v = kernel_ready(v_in);
  Tensor out = fa::empty_like_device(q, fa::shape(q), fa::dtype(q));
  Tensor lse = fa::empty_like_device(q, lse_shape(q, p, varlen), ScalarType::Float);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  SET_STRIDES(p, q, q, varlen);
  const bool k_rows = varlen && !cache.paged();  // (total_k, nheads_k, head_dim)
  SET_STRIDES(p, k, k, k_rows);
  SET_STRIDES(p, v, v, k_rows);
  SET_STRIDES(p, o, out, varlen);
  set_lse(p, lse, varlen);
  if (q.numel() == 0) {
    fa::fill(lse, INFINITY);
    if (p.append_kv != nullptr) launch_append(*append, q, p.abort_flag);
  } else {
    run_forward(p, plan, q);
  }
  if (check) check->wait();
  return {out, lse};
}

std::tuple<Tensor, Tensor> fwd(Tensor q, Tensor k, Tensor v, OptTensor cu_q, OptTensor cu_k,
                               int64_t max_sq, int64_t max_sk, double scale, int64_t left,
                               int64_t right, double softcap, OptTensor alibi, double dropout_p,
                               OptTensor rng_state) {
  return forward(q, k, v, cu_q, cu_k, max_sq, max_sk, scale, left, right, softcap, alibi, {}, 0,
                 dropout_p, rng_state);
}

// The forward over a KV cache: dense (optionally with kv_batch_idx / leftpad_k),
// varlen, or paged through block_table; seqused_k gives each entry's key count. With
// k_new and v_new (batch, seqlen_new, nheads_k, head_dim) it first writes them into the
// caches k and v in place, as the last seqlen_new of each entry's keys; seqused_k then
// counts the keys before them (cache_seqlens: entry b has seqused_k[b] + seqlen_new). With
// verdict (a page-locked int32 CPU tensor of one element) the index values are checked on
// the device first, every key count against [seqlen_new if seqused_k is given else 0, max_keys]
// (max_keys < 0: the capacity); on a bad value nothing is written (out and softmax_lse
// are then undefined) and verdict[0] gets FLASH_KV_BAD_* bits, else 0. The call returns
// once the verdict is in, without waiting for the attention.
std::tuple<Tensor, Tensor> fwd_kv(Tensor q, Tensor k, Tensor v, OptTensor cu_q, OptTensor cu_k,
                                  OptTensor seqused_k, OptTensor kv_batch_idx, OptTensor leftpad_k,
                                  OptTensor block_table, int64_t max_sq, int64_t max_sk,
                                  double scale, int64_t left, int64_t right, double softcap,
                                  OptTensor alibi, int64_t num_splits, OptTensor k_new,
                                  OptTensor v_new, OptTensor verdict, int64_t max_keys) {
  const KvCache cache{seqused_k, kv_batch_idx, leftpad_k, block_table, k_new, v_new};
  return forward(q, k, v, cu_q, cu_k, max_sq, max_sk, scale, left, right, softcap, alibi, cache,
                 num_splits, 0.0, std::nullopt, verdict, max_keys);
}

std::tuple<Tensor, Tensor, Tensor> bwd(Tensor dout_in, Tensor q_in, Tensor k_in, Tensor v_in,
                                       Tensor out_in, Tensor lse, OptTensor cu_q, OptTensor cu_k,
                                       int64_t max_sq, int64_t max_sk, double scale, int64_t left,
                                       int64_t right, double softcap, OptTensor alibi,
                                       bool deterministic, double dropout_p, OptTensor rng_state) {
  (void)deterministic;  // the backward never uses atomics: it is always deterministic
  FA_CHECK(fa::is_cuda(q_in), "q must be a CUDA tensor, got device ", fa::device_text(q_in));
  const fa::DeviceGuard guard(q_in);
  const Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  const Tensor out = kernel_ready(out_in), dout = kernel_ready(dout_in);
  FlashAttnParams p = make_params(q, k, v, cu_q, cu_k, max_sq, max_sk, scale, left, right, softcap, alibi);
  set_dropout(p, dropout_p, rng_state, q);
  const bool varlen = cu_q.has_value();
  check_tensor(out, "out", q);
  check_tensor(dout, "dout", q);
  const std::vector<int64_t> q_shape = fa::shape(q);
  FA_CHECK(fa::shape(out) == q_shape && fa::shape(dout) == q_shape,
           "out and dout must have q's shape ", fa::shape_text(q_shape));
  FA_CHECK(fa::dtype(lse) == ScalarType::Float && lse.is_contiguous() && same_device(lse, q),
           "softmax_lse must be a contiguous float32 tensor on q's device");
  const std::vector<int64_t> expected_lse = lse_shape(q, p, varlen);
  FA_CHECK(fa::shape(lse) == expected_lse, "softmax_lse has shape ", fa::shape_text(fa::shape(lse)),
           ", expected ", fa::shape_text(expected_lse));
  Tensor dq = fa::empty_like_device(q, q_shape, fa::dtype(q));
  Tensor dk = fa::empty_like_device(k, fa::shape(k), fa::dtype(k));
  Tensor dv = fa::empty_like_device(v, fa::shape(v), fa::dtype(v));
  Tensor softmax_d = fa::empty_like_device(lse, expected_lse, ScalarType::Float);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  SET_STRIDES(p, q, q, varlen);
  SET_STRIDES(p, k, k, varlen);
  SET_STRIDES(p, v, v, varlen);
  SET_STRIDES(p, o, out, varlen);
  SET_STRIDES(p, do, dout, varlen);
  SET_STRIDES(p, dq, dq, varlen);
  SET_STRIDES(p, dk, dk, varlen);
  SET_STRIDES(p, dv, dv, varlen);
  set_lse(p, lse, varlen);
  p.softmax_d = static_cast<float *>(softmax_d.data_ptr());
  if (q.numel() == 0 || k.numel() == 0) {
    fa::zero(dq);
    fa::zero(dk);
    fa::zero(dv);
    return {dq, dk, dv};
  }
  raise_on_error(flash_attn_bwd(&p, fa::current_stream(q)), p, "backward");
  return {dq, dk, dv};
}

// The keep mask the kernels apply for rng_state and dropout_p: uint8 (batch, nheads,
// seqlen_q, seqlen_k), 1 = kept.
Tensor dropout_mask(Tensor rng_state, int64_t batch, int64_t nheads, int64_t seqlen_q, int64_t seqlen_k,
                    double dropout_p) {
  const int64_t *rng = rng_state_ptr(rng_state);
  check_dropout_p(dropout_p);
  FA_CHECK(batch >= 0 && nheads > 0 && seqlen_q >= 0 && seqlen_k >= 0 && batch <= INT32_MAX &&
               nheads <= INT32_MAX && seqlen_q <= INT32_MAX && seqlen_k <= INT32_MAX,
           "dropout_mask needs batch >= 0, nheads > 0, seqlen_q >= 0, seqlen_k >= 0 (int32), got ", batch,
           ", ", nheads, ", ", seqlen_q, ", ", seqlen_k);
  const fa::DeviceGuard guard(rng_state);
  Tensor mask = fa::empty_like_device(rng_state, {batch, nheads, seqlen_q, seqlen_k}, ScalarType::Byte);
  const int status = flash_attn_dropout_mask(
      rng, static_cast<float>(dropout_p), static_cast<int>(batch),
      static_cast<int>(nheads), static_cast<int>(seqlen_q), static_cast<int>(seqlen_k),
      static_cast<uint8_t *>(mask.data_ptr()), fa::current_stream(rng_state));
  FA_CHECK(status == FLASH_OK, "dropout_mask failed: ", flash_last_cuda_error());
  return mask;
}

std::string build_info() { return flash_attn_build_info(); }

constexpr const char *FWD_SCHEMA =
    "fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
    "int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, "
    "int window_right, float softcap, Tensor? alibi_slopes, float dropout_p, Tensor? rng_state) "
    "-> (Tensor out, Tensor softmax_lse)";
constexpr const char *FWD_KV_SCHEMA =
    "fwd_kv(Tensor q, Tensor(a!) k, Tensor(b!) v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
    "Tensor? seqused_k, Tensor? kv_batch_idx, Tensor? leftpad_k, Tensor? block_table, "
    "int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, "
    "int window_right, float softcap, Tensor? alibi_slopes, int num_splits, "
    "Tensor? k_new=None, Tensor? v_new=None, Tensor(c!)? verdict=None, int max_keys=-1) "
    "-> (Tensor out, Tensor softmax_lse)";
constexpr const char *BWD_SCHEMA =
    "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
    "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
    "float softmax_scale, int window_left, int window_right, float softcap, "
    "Tensor? alibi_slopes, bool deterministic, float dropout_p, Tensor? rng_state) "
    "-> (Tensor dq, Tensor dk, Tensor dv)";
constexpr const char *DROPOUT_MASK_SCHEMA =
    "dropout_mask(Tensor rng_state, int batch, int nheads, int seqlen_q, int seqlen_k, float dropout_p) "
    "-> Tensor";
constexpr const char *BUILD_INFO_SCHEMA = "build_info() -> str";

}  // namespace

#if FLASH_ATTN_STABLE_ABI
STABLE_TORCH_LIBRARY(flash_attn, m) {
  m.def(FWD_SCHEMA);
  m.def(FWD_KV_SCHEMA);
  m.def(BWD_SCHEMA);
  m.def(DROPOUT_MASK_SCHEMA);
  m.def(BUILD_INFO_SCHEMA);
}

STABLE_TORCH_LIBRARY_IMPL(flash_attn, CUDA, m) {
  m.impl("fwd", TORCH_BOX(&fwd));
  m.impl("fwd_kv", TORCH_BOX(&fwd_kv));
  m.impl("bwd", TORCH_BOX(&bwd));
  m.impl("dropout_mask", TORCH_BOX(&dropout_mask));
}

// no tensor argument: registered for every backend, so it answers on a CPU machine too
STABLE_TORCH_LIBRARY_IMPL(flash_attn, CompositeExplicitAutograd, m) {
  m.impl("build_info", TORCH_BOX(&build_info));
}
#else
TORCH_LIBRARY(flash_attn, m) {
  m.def(FWD_SCHEMA);
  m.def(FWD_KV_SCHEMA);
  m.def(BWD_SCHEMA);
  m.def(DROPOUT_MASK_SCHEMA);
  m.def(BUILD_INFO_SCHEMA, &build_info);
}

TORCH_LIBRARY_IMPL(flash_attn, CUDA, m) {
  m.impl("fwd", &fwd);
  m.impl("fwd_kv", &fwd_kv);
  m.impl("bwd", &bwd);
  m.impl("dropout_mask", &dropout_mask);
}
#endif

// Importing flash_attn._C loads this library, which registers the ops above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "flash_attn kernels; the ops live under torch.ops.flash_attn", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
