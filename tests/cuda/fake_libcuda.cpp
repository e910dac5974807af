// A libcuda.so.1 with no driver entry points: what an installed but unusable
// driver looks like to the CUDA runtime (it reports cudaErrorInsufficientDriver).
// tests/CMakeLists.txt runs the CUDA test and example against it, which must fail
// rather than skip (examples/cuda_device.hpp).
extern "C" int sparsevlm_fake_driver() { return 0; }
