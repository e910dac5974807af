// cuda/detail/kv_cache_kernels.hpp: the device paged compaction's kernels, run on
// CPU threads (tests/cpu_grid.hpp), against kv_cache.hpp's compact_paged_kv.
// The kernels and the CPU function share their rules; what this checks is the
// part that differs, the parallel two-phase copy and the parallel check: on
// random plans, page tables, layouts, strides and element types the whole cache
// (every page, the request's and the others') ends bit for bit as the CPU leaves
// it, and every fault is the one the CPU reports, with the cache untouched.
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include <sparsevlm/cuda/detail/kv_cache_kernels.hpp>

#include "cpu_grid.hpp"
#include "test_util.hpp"

namespace {

using sparsevlm::bfloat16;
using sparsevlm::half;
using sparsevlm::index_t;
using sparsevlm::page_layout;
using sparsevlm::strided_view;
using sparsevlm::tensor3_view;
namespace kd = sparsevlm::cuda::detail;
using fault_t = sparsevlm::detail::paged_fault;

/// A random valid sequence over `tokens` cached tokens with up to `c` recycled
/// entries: an ascending subset of the tokens with negative entries inserted
/// wherever every later source still satisfies p >= its index.
std::vector<index_t> random_sequence(std::mt19937& g, index_t tokens, index_t c) {
  std::vector<index_t> kept;
  for (index_t t = 0; t < tokens; ++t)
    if (svt::rand_int(g, 0, 3) != 0) kept.push_back(t);
  std::vector<index_t> rec(static_cast<std::size_t>(c));
  std::iota(rec.begin(), rec.end(), 0);
  std::shuffle(rec.begin(), rec.end(), g);
  std::vector<index_t> seq;
  std::size_t k = 0, r = 0;
  while (k < kept.size() || r < rec.size()) {
    // Slack of the remaining sources if one more entry came first.
    index_t slack = 1;
    for (std::size_t j = k; j < kept.size(); ++j)
      slack = std::min<index_t>(slack, kept[j] - static_cast<index_t>(seq.size() + 1 + j - k));
    const bool can_recycle = r < rec.size() && slack >= 0;
    if (can_recycle && (k == kept.size() || svt::rand_int(g, 0, 2) == 0)) {
      seq.push_back(-rec[r++] - 1);
    } else if (k < kept.size()) {
      seq.push_back(kept[k++]);
    } else {
      break;
    }
  }
  return seq;
}

template <class T>
T element(float v) {
  return sparsevlm::from_float<T>(v);
}

/// One layer's paged cache in host memory: `blocks` pages, extents per layout,
/// an optional padding of the innermost axis (a strided head_dim) and filled
/// with distinct values.
template <class T>
struct pages {
  page_layout layout;
  index_t blocks, bs, heads, dim, pad;
  std::vector<T> data;
  pages(std::mt19937& g, page_layout l, index_t b, index_t block_size, index_t h, index_t d,
        index_t p)
      : layout(l), blocks(b), bs(block_size), heads(h), dim(d), pad(p),
        data(static_cast<std::size_t>(b * block_size * h * (d + p))) {
    for (std::size_t i = 0; i < data.size(); ++i)
      data[i] = element<T>(static_cast<float>(svt::rand_int(g, -1000, 1000)) / 8.0f);
  }
  strided_view<T, 4> view() {
    const index_t row = dim + pad;
    if (layout == page_layout::blocks_tokens_heads_dim)
      return strided_view<T, 4>(data.data(), {blocks, bs, heads, dim},
                                {bs * heads * row, heads * row, row, 1}, "cache");
    return strided_view<T, 4>(data.data(), {blocks, heads, bs, dim},
                              {heads * bs * row, bs * row, row, 1}, "cache");
  }
};

/// Host memory laid out as the device workspace (256-byte aligned).
struct workspace {
  std::vector<unsigned char> store;
  void* base;
  explicit workspace(std::size_t bytes) : store(bytes + 256, 0xff) {
    const auto p = reinterpret_cast<std::uintptr_t>(store.data());
    base = reinterpret_cast<void*>((p + 255) / 256 * 256);
  }
};

/// Runs the device launch sequence on CPU threads. Returns the fault written.
template <class T, class U, class B>
fault_t run_device(svt::cpu_exec& ex, const std::vector<index_t>& seq, strided_view<T, 4> cache,
                   page_layout layout, const std::vector<B>& table,
                   tensor3_view<const U> recycled) {
  const strided_view<T, 4> kv = sparsevlm::detail::check_paged_args(cache, layout, recycled);
  workspace ws(kd::paged_workspace_bytes(static_cast<index_t>(seq.size()), kv.extent(2),
                                         kv.extent(3), sizeof(T)));
  const auto a = kd::make_paged_args(seq.data(), static_cast<index_t>(seq.size()), kv,
                                     table.data(), static_cast<index_t>(table.size()), recycled,
                                     ws.base);
  const int before = ex.launches;
  kd::compact_paged(ex, a);
  CHECK(ex.launches - before <= 3);
  return *a.fault;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T, class B>
void random_round(std::mt19937& g, svt::cpu_exec& ex) {
  const page_layout layout = svt::rand_int(g, 0, 1) == 0 ? page_layout::blocks_tokens_heads_dim
                                                         : page_layout::blocks_heads_tokens_dim;
  const index_t bs = svt::rand_int(g, 1, 5), heads = svt::rand_int(g, 1, 3),
                dim = svt::rand_int(g, 1, 4), pad = svt::rand_int(g, 0, 1);
  const index_t tokens = svt::rand_int(g, 0, 23), c = svt::rand_int(g, 0, 3);
  // The sequence may be longer than the cached tokens (recycled entries): cover both.
  const index_t used = (tokens + c + bs - 1) / bs, blocks = used + svt::rand_int(g, 0, 3);
  std::vector<index_t> ids(static_cast<std::size_t>(blocks));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), g);
  // The table may list more pages than the tokens use.
  const index_t listed = std::min<index_t>(blocks, used + svt::rand_int(g, 0, 1));
  std::vector<index_t> table64(ids.begin(), ids.begin() + listed);
  std::vector<B> table(table64.begin(), table64.end());
  const std::vector<index_t> seq = random_sequence(g, tokens, c);
  std::vector<float> rec(static_cast<std::size_t>(c * heads * dim));
  for (auto& x : rec) x = static_cast<float>(svt::rand_int(g, -1000, 1000)) / 3.0f;
  const tensor3_view<const float> rv(rec.data(), {c, heads, dim}, "recycled");
  CAPTURE(static_cast<int>(layout));
  CAPTURE(bs);
  CAPTURE(tokens);
  CAPTURE(c);
  CAPTURE(seq.size());
  pages<T> cpu(g, layout, blocks, bs, heads, dim, pad);
  pages<T> dev = cpu;
  const index_t n = sparsevlm::compact_paged_kv(std::span<const index_t>(seq), cpu.view(), layout,
                                                std::span<const index_t>(table64), rv);
  CHECK(n == static_cast<index_t>(seq.size()));
  const fault_t f = run_device(ex, seq, dev.view(), layout, table, rv);
  CHECK(f.kind == fault_t::none);
  CHECK(same_bits(cpu.data, dev.data));
}

}  // namespace

TEST_CASE_TEMPLATE("kv kernels: the device compaction on CPU threads == compact_paged_kv, bit for bit",
                   T, float, half, bfloat16) {
  std::mt19937 g(20261203);
  for (int block : {1, 3, 8}) {
    for (index_t max_blocks : {1, 2, 5}) {
      svt::cpu_exec ex;
      ex.block = block;
      ex.max_blocks = max_blocks;
      CAPTURE(block);
      CAPTURE(max_blocks);
      for (int round = 0; round < 12; ++round) {
        CAPTURE(round);
        if (round % 2 == 0)
          random_round<T, std::int32_t>(g, ex);
        else
          random_round<T, std::int64_t>(g, ex);
      }
    }
  }
}

TEST_CASE("kv kernels: a chain of moves (each token's source is the next one's destination)") {
  // seq[i] = i + 1 over pages out of order: every row is read by one thread and
  // overwritten by another, which only the staged copy makes safe on a GPU (the
  // CPU threads here run blocks in order, so they cannot show the race itself).
  std::mt19937 g(7);
  pages<float> cpu(g, page_layout::blocks_tokens_heads_dim, 4, 4, 2, 2, 0);
  pages<float> dev = cpu;
  std::vector<index_t> seq(15);
  std::iota(seq.begin(), seq.end(), 1);
  const std::vector<index_t> table{3, 0, 2, 1};
  const std::vector<std::int32_t> table32{3, 0, 2, 1};
  sparsevlm::compact_paged_kv(std::span<const index_t>(seq), cpu.view(), cpu.layout,
                              std::span<const index_t>(table));
  svt::cpu_exec ex;
  ex.block = 8;
  ex.max_blocks = 8;
  CHECK(run_device(ex, seq, dev.view(), dev.layout, table32, tensor3_view<const float>()).kind ==
        fault_t::none);
  CHECK(same_bits(cpu.data, dev.data));
}

TEST_CASE("kv kernels: every fault is the CPU's, and a refused compaction changes nothing") {
  std::mt19937 g(11);
  const page_layout L = page_layout::blocks_heads_tokens_dim;
  std::vector<float> rec(1 * 2 * 3, 5.0f);
  const tensor3_view<const float> rv(rec.data(), {1, 2, 3}, "recycled");
  struct bad {
    std::vector<index_t> seq;
    std::vector<index_t> table;
    std::int64_t kind;
    const char* names;
  };
  const std::vector<bad> cases = {
      {{0, 1, 3, 2}, {2, 0}, fault_t::entry, "sequence[3]"},   // a source below its index
      {{0, -2}, {2, 0}, fault_t::entry, "sequence[1]"},        // past the recycled rows
      {{5, 2, 1, 0}, {2, 0}, fault_t::entry, "sequence[2]"},   // the first of two faults
      {{0, 8}, {2, 0}, fault_t::coverage, "block_table.size()"},
      {{0, -1, 2, 12}, {2, 0, 1}, fault_t::coverage, "block_table.size()"},
      {{0, 5}, {2, 4}, fault_t::page, "block_table[1]"},
      {{0, 1, 9}, {2, -1, 7}, fault_t::page, "block_table[1]"},
  };
  for (int block : {1, 4}) {
    svt::cpu_exec ex;
    ex.block = block;
    for (const bad& b : cases) {
      CAPTURE(b.names);
      CAPTURE(block);
      pages<float> cache(g, L, 4, 4, 2, 3, 0);
      const std::vector<float> before = cache.data;
      const fault_t want = sparsevlm::detail::find_paged_fault(
          b.seq.data(), static_cast<index_t>(b.seq.size()), 1, b.table.data(),
          static_cast<index_t>(b.table.size()), 4, 4);
      CHECK(want.kind == b.kind);
      const fault_t got = run_device(ex, b.seq, cache.view(), L, b.table, rv);
      CHECK(got.kind == want.kind);
      CHECK(got.index == want.index);
      CHECK(got.value == want.value);
      CHECK(got.needed == want.needed);
      CHECK(cache.data == before);
      // The device's fault raises the CPU function's error, message and all.
      std::string cpu_message, dev_message;
      try {
        sparsevlm::compact_paged_kv(std::span<const index_t>(b.seq), cache.view(), L,
                                    std::span<const index_t>(b.table), rv);
      } catch (const sparsevlm::error& e) {
        cpu_message = e.what();
      }
      try {
        sparsevlm::detail::throw_paged_fault(got);
      } catch (const sparsevlm::error& e) {
        dev_message = e.what();
      }
      CHECK(!cpu_message.empty());
      CHECK(dev_message == cpu_message);
      CHECK(std::string_view(dev_message).find(b.names) != std::string_view::npos);
      CHECK(cache.data == before);
    }
  }
}
