# The CUDA kernels' arithmetic does not depend on nvcc's flags: tests/cuda/ptx_probe.cu
# (every kernel, every element type) is compiled to PTX with -fmad=false (our own
# targets' flag), with nvcc's default -fmad=true and with --use_fast_math, and the
# floating-point instructions of the three must be the same (core/rn.hpp: every
# multiply, add, divide and square root is an explicit _rn intrinsic, which no flag
# fuses or approximates). --use_fast_math's .ftz (float32 subnormals flushed) is the
# one difference no intrinsic prevents; it is stripped before comparing, and
# docs/cuda.md says so. No load may be non-coherent (ld.global.nc): a chained
# launch reads in one kernel what its earlier phases wrote.
#   cmake -DNVCC=... -DSOURCE=<repo> -DWORK=<dir> -DARCH=90 -P ptx_flags.cmake
file(MAKE_DIRECTORY "${WORK}")
set(reference "")
foreach(flags IN ITEMS "-fmad=false" "-fmad=true" "--use_fast_math")
  string(MAKE_C_IDENTIFIER "${flags}" tag)
  set(ptx "${WORK}/probe${tag}.ptx")
  execute_process(
    COMMAND "${NVCC}" -std=c++20 ${flags} -arch=sm_${ARCH} -I "${SOURCE}/include" -ptx
            "${SOURCE}/tests/cuda/ptx_probe.cu" -o "${ptx}"
    RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "nvcc ${flags} failed:\n${err}")
  endif()
  file(READ "${ptx}" text)
  string(REPLACE ".ftz" "" text "${text}")
  string(REGEX MATCHALL "[ \t](add|sub|mul|div|fma|sqrt|rcp|rsqrt|ex2|lg2|sin|cos|tanh)\\.[a-z0-9.]*f(32|64)"
         ops "${text}")
  list(LENGTH ops n)
  # A chained launch's phases read what its earlier phases wrote in the same
  # kernel: a non-coherent load (__ldg, const __restrict__) could return a stale
  # value (cuda/detail/step_kernels.hpp, chain).
  string(REGEX MATCHALL "ld\\.global\\.nc" nc "${text}")
  list(LENGTH nc n_nc)
  if(n_nc GREATER 0)
    message(FATAL_ERROR "${flags}: ${n_nc} non-coherent loads (ld.global.nc) in the kernels")
  endif()
  string(REGEX MATCHALL "\\.approx" approx "${text}")
  list(LENGTH approx n_approx)
  if(n_approx GREATER 0)
    message(FATAL_ERROR "${flags}: ${n_approx} approximate instructions (.approx) in the kernels")
  endif()
  list(TRANSFORM ops STRIP)
  list(SORT ops)
  string(REPLACE ";" "\n" listing "${ops}")
  file(WRITE "${WORK}/ops${tag}.txt" "${listing}\n")
  if(n LESS 1000)
    message(FATAL_ERROR "${flags}: only ${n} floating-point instructions found: the probe compiled nothing?")
  endif()
  if(reference STREQUAL "")
    set(reference "${listing}")
    set(reference_flags "${flags}")
    message(STATUS "${flags}: ${n} floating-point instructions")
  elseif(NOT listing STREQUAL reference)
    message(FATAL_ERROR "${flags} compiles the kernels' arithmetic differently from ${reference_flags} "
                        "(diff ${WORK}/ops*.txt): an operation without an explicit _rn intrinsic")
  else()
    message(STATUS "${flags}: the same ${n} floating-point instructions")
  endif()
endforeach()
