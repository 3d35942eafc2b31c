// The few torch facilities the binding needs, behind one small interface with two
// implementations, so that flash_ops.cpp is one source for both bindings:
//
//   FLASH_ATTN_STABLE_ABI=1  the LibTorch stable ABI (torch/csrc/stable and
//                            torch/headeronly only, TORCH_TARGET_VERSION set by
//                            setup.py): one _C.abi3.so loads under every torch from
//                            that version on.
//   otherwise                the classic C++ API (ATen, c10): built for one torch.
//
// Either way no CUDA header is included: the stream is an opaque pointer handed to
// the kernels (csrc/kernels/flash_api.h), which carry their own CUDA runtime.
#pragma once

#include <cstdint>
#include <optional>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "flash_api.h"

#if FLASH_ATTN_STABLE_ABI
#include <dlfcn.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#else
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>
#endif

namespace fa {

// ---- errors: one message format for both bindings (a RuntimeError in Python) ----
// Messages are built with std::string, std::to_string and snprintf, never a C++ stream:
// formatting a number through an ostream crashed the stable-ABI module on the H200
// machine (SIGSEGV inside std::ostream::_M_insert<long>, called from shape_text; the
// root cause in the toolchain was not pinned down), so no error message goes through one.
inline void append(std::string &) {}
template <typename T, typename... Rest>
void append(std::string &s, const T &first, const Rest &...rest) {
  if constexpr (std::is_same_v<T, bool>) {
    s += first ? "true" : "false";
  } else if constexpr (std::is_floating_point_v<T>) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(first));
    s += buf;
  } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, char>) {
    s += std::to_string(first);
  } else {
    s += first;  // const char *, a string literal, std::string, char
  }
  append(s, rest...);
}
template <typename... Args>
[[noreturn]] void fail(const Args &...args) {
  std::string s = "flash_attn: ";
  append(s, args...);
  throw std::runtime_error(s);
}
#define FA_CHECK(cond, ...)             \
  do {                                  \
    if (!(cond)) ::fa::fail(__VA_ARGS__); \
  } while (0)

// A shape as "[2, 128, 8, 64]", for messages.
inline std::string shape_text(const std::vector<int64_t> &shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

#if FLASH_ATTN_STABLE_ABI
using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

inline bool is_cuda(const Tensor &t) { return t.is_cuda(); }
inline int device_index(const Tensor &t) { return t.get_device_index(); }
inline std::string device_text(const Tensor &t) {
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  return t.is_cpu() ? "cpu" : "a non-CUDA device";
}
inline ScalarType dtype(const Tensor &t) { return t.scalar_type(); }
inline std::vector<int64_t> shape(const Tensor &t) {
  const auto sizes = t.sizes();  // one shim call for all of them
  return std::vector<int64_t>(sizes.begin(), sizes.end());
}
inline Tensor contiguous(const Tensor &t) { return torch::stable::contiguous(t); }
// Uninitialised, on like's device (the shim call: no dispatcher round trip).
inline Tensor empty_like_device(const Tensor &like, const std::vector<int64_t> &sizes,
                                ScalarType type) {
  return torch::stable::new_empty(like, sizes, type);
}
inline void fill(const Tensor &t, double value) { torch::stable::fill_(t, value); }
inline void zero(Tensor &t) { torch::stable::zero_(t); }

// Switches device only where the tensor is not on the current one (the common case
// costs one shim call, not a guard object made and freed through the shim).
class DeviceGuard {
 public:
  explicit DeviceGuard(const Tensor &t) {
    const auto index = t.get_device_index();
    if (torch::stable::accelerator::getCurrentDeviceIndex() != index) guard_.emplace(index);
  }

 private:
  std::optional<torch::stable::accelerator::DeviceGuard> guard_;
};

// The current CUDA stream of a device, through the stable C shim
// aoti_torch_get_current_cuda_stream. It lives in libtorch_cuda, which a CPU-only
// torch does not have: it is looked up in the already-loaded library at first use
// rather than linked, so the module loads under any torch build.
inline void *current_stream(const Tensor &t) {
  using Fn = AOTITorchError (*)(int32_t, void **);
  static Fn fn = []() -> Fn {
    void *lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    return lib ? reinterpret_cast<Fn>(dlsym(lib, "aoti_torch_get_current_cuda_stream")) : nullptr;
  }();
  FA_CHECK(fn != nullptr, "this torch has no CUDA support (libtorch_cuda is not loaded)");
  void *stream = nullptr;
  FA_CHECK(fn(t.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
           "cannot get the current CUDA stream of ", device_text(t));
  return stream;
}
#else
using Tensor = at::Tensor;
using ScalarType = at::ScalarType;

inline bool is_cuda(const Tensor &t) { return t.is_cuda(); }
inline int device_index(const Tensor &t) { return t.get_device(); }
inline std::string device_text(const Tensor &t) { return t.device().str(); }
inline ScalarType dtype(const Tensor &t) { return t.scalar_type(); }
inline std::vector<int64_t> shape(const Tensor &t) { return t.sizes().vec(); }
inline Tensor contiguous(const Tensor &t) { return t.contiguous(); }
inline Tensor empty_like_device(const Tensor &like, const std::vector<int64_t> &sizes,
                                ScalarType type) {
  return at::empty(sizes, like.options().dtype(type));
}
inline void fill(const Tensor &t, double value) { const_cast<Tensor &>(t).fill_(value); }
inline void zero(Tensor &t) { t.zero_(); }

class DeviceGuard {
 public:
  explicit DeviceGuard(const Tensor &t) : guard_(t.device()) {}

 private:
  c10::DeviceGuard guard_;
};

inline void *current_stream(const Tensor &t) {
  const auto *impl = c10::impl::getDeviceGuardImpl(t.device().type());
  return impl->getStreamNativeHandle(impl->getStream(t.device()));
}
#endif

inline const char *dtype_name(ScalarType s) {
  switch (s) {
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Float: return "float32";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Byte: return "uint8";
    default: return "another dtype";
  }
}

}  // namespace fa
