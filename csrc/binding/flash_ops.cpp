// The only C++ that includes torch: registers flash_attn::fwd / bwd /
// build_info with the dispatcher, checks inputs, allocates outputs and calls
// the kernels (csrc/kernels/flash_api.h) on the current stream.
//
// It uses only device-generic c10 APIs (DeviceGuard, the CUDA guard
// implementation's native stream handle), so it compiles against any torch
// build, CPU-only included, and never needs the CUDA toolkit's headers.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "flash_api.h"

namespace {

using at::Tensor;

// The kernels need a unit last-dim stride, the other strides a multiple of 8
// elements and 16-byte aligned data; anything else is copied once.
Tensor kernel_ready(const Tensor &t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; ok && d + 1 < t.dim(); ++d) ok = t.stride(d) % 8 == 0 || t.size(d) == 1;
  return ok ? t : t.contiguous();
}

void check_tensor(const Tensor &t, const char *name, const Tensor &q) {
  TORCH_CHECK(t.is_cuda(), "flash_attn: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), "flash_attn: ", name, " is on ", t.device(), " but q is on ",
              q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "flash_attn: ", name, " has dtype ",
              t.scalar_type(), " but q has ", q.scalar_type());
}

void check_cu_seqlens(const Tensor &cu, const char *name, const Tensor &q) {
  TORCH_CHECK(cu.is_cuda() && cu.device() == q.device(), "flash_attn: ", name,
              " must be on q's device ", q.device(), ", got ", cu.device());
  TORCH_CHECK(cu.scalar_type() == at::kInt, "flash_attn: ", name, " must be int32, got ",
              cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.is_contiguous(), "flash_attn: ", name,
              " must be a contiguous 1-D tensor");
}

int dtype_code(const Tensor &q) {
  if (q.scalar_type() == at::kHalf) return FLASH_FP16;
  if (q.scalar_type() == at::kBFloat16) return FLASH_BF16;
  TORCH_CHECK(false, "flash_attn: only float16 and bfloat16 are supported, got ", q.scalar_type());
}

void *current_stream(const Tensor &q) {
  const auto *impl = c10::impl::getDeviceGuardImpl(q.device().type());
  return impl->getStreamNativeHandle(impl->getStream(q.device()));
}

void raise_on_error(int status, const FlashAttnParams &p, const char *direction) {
  if (status == FLASH_OK) return;
  const char *dtype = p.dtype == FLASH_BF16 ? "bf16" : "fp16";
  TORCH_CHECK(status != FLASH_ERR_NOT_COMPILED, "flash_attn: this build has no ", direction,
              " kernel for head_dim ", p.head_dim, " and dtype ", dtype, " (compiled: ",
              flash_attn_build_info(),
              "); rebuild with FLASH_ATTN_HEAD_DIMS / FLASH_ATTN_DTYPES / FLASH_ATTN_BACKWARD "
              "covering it");
  TORCH_CHECK(status != FLASH_ERR_BAD_ARGUMENT, "flash_attn: invalid arguments for the ", direction,
              " kernel (head_dim ", p.head_dim, ", nheads ", p.nheads, ", nheads_k ", p.nheads_k, ")");
  TORCH_CHECK(false, "flash_attn: CUDA error in the ", direction, " kernel: ", flash_last_cuda_error());
}

// Shapes and the fields shared by forward and backward.
FlashAttnParams make_params(const Tensor &q, const Tensor &k, const Tensor &v,
                            const std::optional<Tensor> &cu_q, const std::optional<Tensor> &cu_k,
                            int64_t max_sq, int64_t max_sk, double scale, int64_t left,
                            int64_t right, double softcap, const std::optional<Tensor> &alibi) {
  FlashAttnParams p{};
  const bool varlen = cu_q.has_value();
  TORCH_CHECK(varlen == cu_k.has_value(), "flash_attn: give both cu_seqlens_q and cu_seqlens_k or neither");
  const int64_t rank = varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == rank && k.dim() == rank && v.dim() == rank, "flash_attn: q, k, v must be ",
              rank, "-D (", varlen ? "total, nheads, head_dim" : "batch, seqlen, nheads, head_dim",
              "), got ", q.dim(), "-D, ", k.dim(), "-D, ", v.dim(), "-D");
  check_tensor(k, "k", q);
  check_tensor(v, "v", q);
  p.dtype = dtype_code(q);
  const int64_t d = q.size(-1);
  TORCH_CHECK(d > 0 && d <= 256 && d % 8 == 0, "flash_attn: head_dim must be a multiple of 8 in (0, 256] "
              "at the op level (the Python API pads), got ", d);
  TORCH_CHECK(k.size(-1) == d && v.size(-1) == d, "flash_attn: q, k, v head dims differ: ", d, ", ",
              k.size(-1), ", ", v.size(-1));
  const int64_t h = q.size(-2), hk = k.size(-2);
  TORCH_CHECK(v.size(-2) == hk, "flash_attn: k and v have different numbers of heads");
  TORCH_CHECK(hk > 0 && h % hk == 0, "flash_attn: nheads (", h, ") must be a multiple of nheads_k (", hk, ")");
  if (varlen) {
    check_cu_seqlens(*cu_q, "cu_seqlens_q", q);
    check_cu_seqlens(*cu_k, "cu_seqlens_k", q);
    TORCH_CHECK(cu_q->numel() == cu_k->numel() && cu_q->numel() >= 1,
                "flash_attn: cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got ",
                cu_q->numel(), " and ", cu_k->numel());
    TORCH_CHECK(k.size(0) == v.size(0), "flash_attn: k and v have different token counts");
    p.batch = static_cast<int>(cu_q->numel() - 1);
    p.seqlen_q = static_cast<int>(max_sq);
    p.seqlen_k = static_cast<int>(max_sk);
    p.cu_seqlens_q = cu_q->data_ptr<int>();
    p.cu_seqlens_k = cu_k->data_ptr<int>();
  } else {
    TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "flash_attn: batch sizes differ");
    TORCH_CHECK(k.size(1) == v.size(1), "flash_attn: k and v have different sequence lengths");
    p.batch = static_cast<int>(q.size(0));
    p.seqlen_q = static_cast<int>(q.size(1));
    p.seqlen_k = static_cast<int>(k.size(1));
  }
  p.nheads = static_cast<int>(h);
  p.nheads_k = static_cast<int>(hk);
  p.head_dim = static_cast<int>(d);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = static_cast<int>(left);
  p.window_right = static_cast<int>(right);
  if (alibi.has_value()) {
    TORCH_CHECK(alibi->is_cuda() && alibi->device() == q.device() && alibi->scalar_type() == at::kFloat,
                "flash_attn: alibi_slopes must be float32 on q's device");
    TORCH_CHECK((alibi->dim() == 1 && alibi->size(0) == h) ||
                    (alibi->dim() == 2 && alibi->size(0) == p.batch && alibi->size(1) == h),
                "flash_attn: alibi_slopes must have shape (nheads,) or (batch, nheads), got ",
                alibi->sizes());
    TORCH_CHECK(alibi->stride(-1) == 1, "flash_attn: alibi_slopes must be contiguous in the head dim");
    p.alibi_slopes = alibi->data_ptr<float>();
    p.alibi_batch_stride = alibi->dim() == 2 ? alibi->stride(0) : 0;
  }
  return p;
}

#define SET_STRIDES(P, PREFIX, T, VARLEN)                           \
  do {                                                              \
    P.PREFIX##_batch_stride = (VARLEN) ? 0 : (T).stride(0);         \
    P.PREFIX##_row_stride = (T).stride((VARLEN) ? 0 : 1);           \
    P.PREFIX##_head_stride = (T).stride((VARLEN) ? 1 : 2);          \
  } while (0)

void set_lse(FlashAttnParams &p, const Tensor &lse, bool varlen) {
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = varlen ? 0 : lse.stride(0);
  p.lse_head_stride = lse.stride(varlen ? 0 : 1);
}

Tensor make_lse(const Tensor &q, const FlashAttnParams &p, bool varlen) {
  const auto opts = q.options().dtype(at::kFloat);
  return varlen ? at::empty({p.nheads, q.size(0)}, opts) : at::empty({p.batch, p.nheads, p.seqlen_q}, opts);
}

std::tuple<Tensor, Tensor> fwd(const Tensor &q_in, const Tensor &k_in, const Tensor &v_in,
                               const std::optional<Tensor> &cu_q, const std::optional<Tensor> &cu_k,
                               int64_t max_sq, int64_t max_sk, double scale, int64_t left,
                               int64_t right, double softcap, const std::optional<Tensor> &alibi) {
  TORCH_CHECK(q_in.is_cuda(), "flash_attn: q must be a CUDA tensor, got device ", q_in.device());
  const c10::DeviceGuard guard(q_in.device());
  const Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  FlashAttnParams p = make_params(q, k, v, cu_q, cu_k, max_sq, max_sk, scale, left, right, softcap, alibi);
  const bool varlen = cu_q.has_value();
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = make_lse(q, p, varlen);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  SET_STRIDES(p, q, q, varlen);
  SET_STRIDES(p, k, k, varlen);
  SET_STRIDES(p, v, v, varlen);
  SET_STRIDES(p, o, out, varlen);
  set_lse(p, lse, varlen);
  if (q.numel() == 0) return {out, lse.fill_(INFINITY)};
  raise_on_error(flash_attn_fwd(&p, current_stream(q)), p, "forward");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> bwd(const Tensor &dout_in, const Tensor &q_in, const Tensor &k_in,
                                       const Tensor &v_in, const Tensor &out_in, const Tensor &lse,
                                       const std::optional<Tensor> &cu_q,
                                       const std::optional<Tensor> &cu_k, int64_t max_sq,
                                       int64_t max_sk, double scale, int64_t left, int64_t right,
                                       double softcap, const std::optional<Tensor> &alibi,
                                       bool deterministic) {
  (void)deterministic;  // the backward never uses atomics: it is always deterministic
  TORCH_CHECK(q_in.is_cuda(), "flash_attn: q must be a CUDA tensor, got device ", q_in.device());
  const c10::DeviceGuard guard(q_in.device());
  const Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  const Tensor out = kernel_ready(out_in), dout = kernel_ready(dout_in);
  FlashAttnParams p = make_params(q, k, v, cu_q, cu_k, max_sq, max_sk, scale, left, right, softcap, alibi);
  const bool varlen = cu_q.has_value();
  check_tensor(out, "out", q);
  check_tensor(dout, "dout", q);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(),
              "flash_attn: out and dout must have q's shape ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device() == q.device(),
              "flash_attn: softmax_lse must be a contiguous float32 tensor on q's device");
  const Tensor expected_lse = make_lse(q, p, varlen);
  TORCH_CHECK(lse.sizes() == expected_lse.sizes(), "flash_attn: softmax_lse has shape ", lse.sizes(),
              ", expected ", expected_lse.sizes());
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  Tensor softmax_d = at::empty_like(lse);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = const_cast<void *>(out.data_ptr());
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
  set_lse(p, const_cast<Tensor &>(lse), varlen);
  p.softmax_d = softmax_d.data_ptr<float>();
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  raise_on_error(flash_attn_bwd(&p, current_stream(q)), p, "backward");
  return {dq, dk, dv};
}

std::string build_info() { return flash_attn_build_info(); }

}  // namespace

TORCH_LIBRARY(flash_attn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, "
      "int window_right, float softcap, Tensor? alibi_slopes) -> (Tensor out, Tensor softmax_lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float softmax_scale, int window_left, int window_right, float softcap, "
      "Tensor? alibi_slopes, bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(flash_attn, CUDA, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
}

// Importing flash_attn._C loads this library, which registers the ops above.
extern "C" PyObject *PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "flash_attn kernels; the ops live under torch.ops.flash_attn", -1,
                               nullptr};
  return PyModule_Create(&module);
}
