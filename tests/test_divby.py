"""The split kernel's division by the page size (csrc/kernels/divby.h): a multiply and a
shift that must equal integer division for every key position and page size.

Compiled here with nvcc and run on the host (the struct is __host__ __device__; on the
GPU only the two intrinsics differ, __umulhi and __clz, each the host expression's
equal). No GPU needed; skipped without a CUDA toolkit.
"""

from __future__ import annotations

from pathlib import Path

from host_probe import run_host_probe

# Divisors: every one up to 5000, every 7th multiple of 16 (page sizes) up to 2^20, and some
# near 2^31; numerators: the edges around multiples of d, the top of the range, and 300
# pseudo-random ones a divisor with the multiples of d at and just below each.
PROBE = r"""
#include <cstdio>
#include <cstdint>
#include "divby.h"
int main() {
  long long checked = 0, wrong = 0;
  uint64_t x = 88172645463325252ull;
  auto next = [&]() { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x; };
  auto check = [&](int d, int n) {
    const flash::DivBy q(d);
    ++checked;
    if (q.div(n) != n / d) {
      if (++wrong <= 5) std::printf("d=%d n=%d: %d, not %d\n", d, n, q.div(n), n / d);
    }
  };
  auto divisor = [&](int d) {
    const int top = 2147483647;
    const int edges[] = {0, 1, d - 1, d, d + 1, 2 * d - 1,
                         top, top - 1, top / d * d, top / d * d - 1};
    for (int n : edges)
      if (n >= 0) check(d, n);
    for (int i = 0; i < 300; ++i) {
      const int n = static_cast<int>(next() % 2147483648ull);
      check(d, n);
      check(d, n / d * d);
      if (n / d > 0) check(d, n / d * d - 1);
    }
  };
  for (int d = 1; d <= 5000; ++d) divisor(d);
  for (int d = 16; d <= (1 << 20); d += 16 * 7) divisor(d);
  const int big[] = {1 << 30, (1 << 30) + 1, 3 << 28, 2147483647, 2147483646};
  for (int d : big) divisor(d);
  std::printf("checked %lld wrong %lld\n", checked, wrong);
  return 0;
}
"""


def test_division_by_the_page_size_equals_integer_division(tmp_path: Path) -> None:
    out = run_host_probe(PROBE, ("80",), tmp_path)
    last = out.strip().splitlines()[-1].split()
    checked, wrong = int(last[1]), int(last[3])
    assert checked > 10_000_000 and wrong == 0, out
