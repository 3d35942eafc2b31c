"""Helpers that setup.py uses to build the kernels and the binding.

Importable without torch and without running setup.py, so that tests can
exercise them on a CPU-only machine:

- knobs: the build knobs from environment variables, validated.
- resources: CPU quota and available memory (cgroup v1/v2 aware).
- planner: how many nvcc processes and threads to run at once.
- cache: content-addressed keys for kernel objects, atomic writes.
- toolchain: finding CUDA and nvcc, running one measured compile.
- kernels: compiling every kernel translation unit into the object cache.
- version: the package version with an optional local label.
"""
