// The benchmarks' main: measures the copy-bandwidth probe once, before any
// benchmark runs, so that every benchmark can report its time as a multiple of
// the bandwidth limit (common.hpp, report_bandwidth).
#include <benchmark/benchmark.h>

#include <cstdio>
#include <string>

#include "common.hpp"

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const sparsevlm::examples::copy_probe probe = sparsevlm::examples::copy_bandwidth();
  sparsevlm::bench::copy_bw = probe.wall;
  const auto gb = [](double v) {
    char s[32];
    std::snprintf(s, sizeof s, "%.2f", v * 1e-9);
    return std::string(s);
  };
  benchmark::AddCustomContext("copy_probe_GB/s (memcpy 256 MB, read + written, best of 5)",
                              gb(probe.wall));
  benchmark::AddCustomContext("copy_probe_cpu_GB/s (the same from CPU time)", gb(probe.cpu));
  benchmark::AddCustomContext("sparsevlm_isa", sparsevlm::bench::isa_label());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
