// Whether this machine can run the CUDA example and tests, for CTest: they are
// skipped (77) only where there is no GPU at all, and fail where a GPU is there
// but unusable, so that a driver too old for this CUDA runtime cannot read as a
// green run.
#pragma once

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdio>

namespace sparsevlm::examples {

/// 0 when device 0 can be used; 77 (CTest's "skipped") when the machine has no
/// GPU: cudaErrorNoDevice, no device counted, or cudaErrorInsufficientDriver with
/// no NVIDIA driver installed (libcuda.so.1 cannot be loaded); 1 for any other
/// error, printed (an installed driver older than this runtime, a broken
/// installation, ...).
inline int cuda_device_status() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e == cudaSuccess && count > 0) return 0;
  bool driver = true;
  if (e == cudaErrorInsufficientDriver) {
    void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    driver = lib != nullptr;
    if (lib != nullptr) dlclose(lib);
  }
  if (e == cudaSuccess || e == cudaErrorNoDevice || !driver) {
    std::printf("no CUDA device: skipped (%s)\n",
                e == cudaSuccess ? "cudaGetDeviceCount() = 0"
                                 : (driver ? cudaGetErrorString(e) : "no NVIDIA driver installed"));
    return 77;
  }
  std::fprintf(stderr, "cudaGetDeviceCount: %s (%s): a GPU driver is installed but unusable\n",
               cudaGetErrorName(e), cudaGetErrorString(e));
  return 1;
}

}  // namespace sparsevlm::examples
