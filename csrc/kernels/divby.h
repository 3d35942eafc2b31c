// Division by a value fixed for a kernel's run (the page size of a paged KV cache), as a
// multiply and a shift: two instructions where the compiler's division by a runtime value
// takes about 25. Host and device, so that tests/test_divby.py runs it on the CPU.
#pragma once

#include <stdint.h>

namespace flash {

// Division of n in [0, 2^31) by a d in [1, 2^31): q = umulhi(2n, m) >> s with
// s = ceil(log2 d) and m = ceil(2^(31 + s) / d) (< 2^32). It is exact: m d = 2^(31 + s) + e
// with 0 <= e < d, so n m / 2^(31 + s) exceeds n / d by less than n / 2^(31 + s) < 2^-s <=
// 1 / d, too little to reach the next integer.
struct DivBy {
  uint32_t m;
  int s, d;
  __host__ __device__ __forceinline__ explicit DivBy(int d_) : d(d_) {
    s = 32 - clz32(static_cast<uint32_t>(d_ - 1));  // ceil(log2 d); 0 for d = 1
    // Once a thread. (A shortcut for powers of two, m = 2^31 without the 64-bit division,
    // measured 1-3% slower at head dim 64 on H200 with nvcc 13.0: the four-warp split
    // kernel then got 128 registers, 155 without; benchmarks/RESULTS.md, twelfth session.)
    m = static_cast<uint32_t>(((uint64_t(1) << (31 + s)) + d_ - 1) / d_);
  }
  __host__ __device__ __forceinline__ int div(int n) const {
    return static_cast<int>(mulhi32(static_cast<uint32_t>(n) << 1, m) >> s);
  }

 private:
  __host__ __device__ static __forceinline__ int clz32(uint32_t x) {
#if defined(__CUDA_ARCH__)
    return __clz(static_cast<int>(x));
#else
    return x == 0 ? 32 : __builtin_clz(x);
#endif
  }
  __host__ __device__ static __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
    return __umulhi(a, b);
#else
    return static_cast<uint32_t>((uint64_t(a) * b) >> 32);
#endif
  }
};

}  // namespace flash
