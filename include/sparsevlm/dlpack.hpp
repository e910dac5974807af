// DLPack adapter: typed, validated strided_views over a DLTensor's memory.
//
// PyTorch, CuPy, JAX and most engines export their tensors as DLPack
// (`torch.utils.dlpack.to_dlpack`, `__dlpack__`): a DLTensor (pointer, device,
// dtype, shape, strides in elements, byte offset), usually wrapped in a
// DLManagedTensor that owns it. view_of<T, Rank> checks that description
// against what the library reads and returns a borrowing strided_view; every
// refusal is a sparsevlm::error naming the argument ("attn.dtype: expected
// float32, got bfloat16"). Engines without DLPack build strided_views from a raw
// pointer, extents and strides directly (view.hpp).
//
// Host-compilable: this header needs dlpack/dlpack.h (Debian libdlpack-dev, or
// the copy a framework ships) and nothing from CUDA. A view taken for
// device_kind::cuda holds a device pointer that host code must not dereference;
// it is for the CUDA launchers, which compare the ordinal check_device returns
// with the current device. Host functions (prune_step and every stage) take
// only views taken for device_kind::host, and view_of refuses device memory for
// those.
//
// Ownership: nothing here takes ownership or calls a deleter. The caller keeps
// the DLTensor's memory (for a DLManagedTensor: the managed tensor, until it
// calls its deleter) alive while the views are used. The DLTensor struct itself,
// and its shape and strides arrays, are only read during the call.
#pragma once

// Frameworks ship their own copy under the same include guard (PyTorch's
// ATen/dlpack.h): when one is already included, use it. The DLTensor layout is
// the same from DLPack 0.6 to 1.x.
#ifndef DLPACK_DLPACK_H_
#include <dlpack/dlpack.h>
#endif

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

#include "dtype.hpp"
#include "error.hpp"
#include "view.hpp"

namespace sparsevlm {

/// Who will read the memory behind a view.
enum class device_kind {
  /// Host code (every host function): kDLCPU or kDLCUDAHost (pinned) memory.
  host,
  /// CUDA kernels: kDLCUDA (one device) or kDLCUDAManaged memory. The view's
  /// pointer must not be dereferenced on the host.
  cuda,
};

/// The DLPack dtype of a view element type (float32, float16, bfloat16, int64);
/// `lanes` is always 1.
template <class T>
constexpr DLDataType dl_dtype_of() noexcept {
  using U = std::remove_cv_t<T>;
  static_assert(is_element_v<U> || std::is_same_v<U, index_t>,
                "views hold float, half, bfloat16 or index_t (int64)");
  if constexpr (std::is_same_v<U, float>) return DLDataType{kDLFloat, 32, 1};
  else if constexpr (std::is_same_v<U, half>) return DLDataType{kDLFloat, 16, 1};
  else if constexpr (std::is_same_v<U, bfloat16>) return DLDataType{kDLBfloat, 16, 1};
  else return DLDataType{kDLInt, 64, 1};
}

/// "float32", "bfloat16", "int64", "float32x4" (lanes), "code 9 bits 16"...
inline std::string dl_dtype_name(DLDataType t) {
  const char* base = nullptr;
  switch (t.code) {
    case kDLInt: base = "int"; break;
    case kDLUInt: base = "uint"; break;
    case kDLFloat: base = "float"; break;
    case kDLOpaqueHandle: base = "handle"; break;
    case kDLBfloat: base = "bfloat"; break;
    case kDLComplex: base = "complex"; break;
    case 6: base = "bool"; break;  // kDLBool, from DLPack 0.8 on
    default: break;
  }
  std::string s = base ? detail::concat(base, static_cast<int>(t.bits))
                       : detail::concat("code ", static_cast<int>(t.code), " bits ",
                                        static_cast<int>(t.bits));
  if (t.lanes != 1) s += detail::concat("x", t.lanes);
  return s;
}

/// "kDLCPU", "kDLCUDA:1", "kDLCUDAHost", "kDLCUDAManaged", "device type 4"...
inline std::string dl_device_name(DLDevice d) {
  switch (d.device_type) {
    case kDLCPU: return "kDLCPU";
    case kDLCUDA: return detail::concat("kDLCUDA:", d.device_id);
    case kDLCUDAHost: return "kDLCUDAHost";
    case kDLCUDAManaged: return "kDLCUDAManaged";
    case kDLROCM: return detail::concat("kDLROCM:", d.device_id);
    default: return detail::concat("device type ", static_cast<int>(d.device_type));
  }
}

/// Checks that `t`'s memory can be read by `expect` and returns the CUDA device
/// ordinal the reader must run on: `device_id` for kDLCUDA, -1 when any will do
/// (host memory, managed memory).
///
/// Errors (errc::invalid_argument, "<name>.device: expected ..., got ..."):
/// host: anything but kDLCPU or kDLCUDAHost; cuda: anything but kDLCUDA
/// (device_id >= 0) or kDLCUDAManaged. Pinned host memory is refused for CUDA
/// reads, which would cross the bus on every access.
inline int check_device(const DLTensor& t, const char* name, device_kind expect) {
  const DLDeviceType type = t.device.device_type;
  if (expect == device_kind::host) {
    SPARSEVLM_CHECK(type == kDLCPU || type == kDLCUDAHost, errc::invalid_argument,
                    detail::concat(name, ".device"),
                    "host memory (kDLCPU or kDLCUDAHost) for a host function",
                    dl_device_name(t.device));
    return -1;
  }
  SPARSEVLM_CHECK(type == kDLCUDA || type == kDLCUDAManaged, errc::invalid_argument,
                  detail::concat(name, ".device"),
                  "CUDA memory (kDLCUDA or kDLCUDAManaged) for a CUDA launcher",
                  dl_device_name(t.device));
  if (type == kDLCUDAManaged) return -1;
  SPARSEVLM_CHECK(t.device.device_id >= 0, errc::invalid_argument,
                  detail::concat(name, ".device.device_id"), ">= 0", t.device.device_id);
  return t.device.device_id;
}

/// A `Rank`-dimensional view of element type `T` (float, half, bfloat16 or
/// index_t, const or not) over `t`'s memory, borrowed (see the file comment).
///
/// Checks, in this order, each failure a sparsevlm::error naming `name`:
/// - `ndim == Rank` and `shape` non-null (errc::shape_mismatch);
/// - device readable by `expect` (check_device; errc::invalid_argument);
/// - dtype is T's, with lanes 1 (errc::invalid_argument,
///   "attn.dtype: expected float32, got bfloat16");
/// - `byte_offset` a multiple of the element size, and the element pointer
///   aligned to it (errc::invalid_argument);
/// - null `strides` means C-contiguous; the C strides of the shape, and the
///   furthest element's offset, fit in int64 (errc::shape_mismatch);
/// - then the strided_view rules: extents >= 0, strides >= 0 (negative strides,
///   as NumPy/CuPy make for reversed slices, are refused: copy first), a
///   non-null pointer unless the tensor is empty, stride 0 (broadcast, as
///   `expand` makes) only for const T, and no aliasing for writable views.
///
/// DLPack 0.6 has no read-only flag: asking for a non-const T makes a writable
/// view, so ask for one only where the engine means the tensor to be written.
/// Cost: O(Rank).
template <class T, std::size_t Rank>
strided_view<T, Rank> view_of(const DLTensor& t, const char* name,
                              device_kind expect = device_kind::host) {
  static_assert(Rank >= 1, "view_of takes tensors of rank 1 or more");
  constexpr DLDataType want = dl_dtype_of<T>();
  SPARSEVLM_CHECK(t.ndim == static_cast<int>(Rank), errc::shape_mismatch,
                  detail::concat(name, ".ndim"), Rank, t.ndim);
  SPARSEVLM_CHECK(t.shape != nullptr, errc::shape_mismatch, detail::concat(name, ".shape"),
                  "a non-null array", "nullptr");
  check_device(t, name, expect);
  SPARSEVLM_CHECK(t.dtype.code == want.code && t.dtype.bits == want.bits && t.dtype.lanes == 1,
                  errc::invalid_argument, detail::concat(name, ".dtype"), dl_dtype_name(want),
                  dl_dtype_name(t.dtype));
  SPARSEVLM_CHECK(t.byte_offset % sizeof(T) == 0, errc::invalid_argument,
                  detail::concat(name, ".byte_offset"),
                  detail::concat("a multiple of ", sizeof(T), " (the ", dl_dtype_name(want),
                                 " element size)"),
                  t.byte_offset);

  std::array<index_t, Rank> extents{};
  for (std::size_t d = 0; d < Rank; ++d) extents[d] = t.shape[d];
  std::array<index_t, Rank> strides{};
  if (t.strides != nullptr) {
    for (std::size_t d = 0; d < Rank; ++d) strides[d] = t.strides[d];
  } else {
    // strided_view::contiguous_strides would name "extents"; name the tensor.
    // Zero extents count as 1 (as in strided_view::contiguous_strides), and the
    // leading extent never enters a stride; view validation then checks that the
    // furthest offset fits.
    index_t acc = 1;
    for (std::size_t d = Rank; d-- > 0;) {
      strides[d] = acc;
      if (d == 0) break;
      const index_t e = extents[d] > 0 ? extents[d] : 1;
      SPARSEVLM_CHECK(acc <= std::numeric_limits<index_t>::max() / e, errc::shape_mismatch,
                      detail::concat(name, ".shape"), "C-contiguous strides that fit in int64",
                      "a shape whose trailing extents overflow them");
      acc *= e;
    }
  }

  // A null pointer stays null (and the view refuses it unless the tensor is
  // empty): adding an offset to it would be undefined.
  T* data = nullptr;
  if (t.data != nullptr) {
    constexpr auto max_offset = static_cast<std::uint64_t>(std::numeric_limits<index_t>::max());
    SPARSEVLM_CHECK(t.byte_offset <= max_offset, errc::invalid_argument,
                    detail::concat(name, ".byte_offset"), "a value that fits in int64",
                    t.byte_offset);
    using byte_t = std::conditional_t<std::is_const_v<T>, const std::byte, std::byte>;
    byte_t* p = static_cast<byte_t*>(t.data) + t.byte_offset;
    SPARSEVLM_CHECK(reinterpret_cast<std::uintptr_t>(p) % alignof(T) == 0,
                    errc::invalid_argument, detail::concat(name, ".data"),
                    detail::concat("an element pointer aligned to ", alignof(T), " bytes"),
                    detail::concat("data + byte_offset = ", static_cast<const void*>(p)));
    data = reinterpret_cast<T*>(p);
  }
  return strided_view<T, Rank>(data, extents, strides, name);
}

/// As above, borrowing the managed tensor's DLTensor; the deleter is not called.
template <class T, std::size_t Rank>
strided_view<T, Rank> view_of(const DLManagedTensor& m, const char* name,
                              device_kind expect = device_kind::host) {
  return view_of<T, Rank>(m.dl_tensor, name, expect);
}

/// A contiguous 1-D tensor as a std::span (raters, index lists): view_of<T, 1>,
/// plus stride 1 unless the tensor has at most one element
/// (errc::shape_mismatch, "raters.strides[0]: expected 1 (contiguous), got 2").
template <class T>
std::span<T> span_of(const DLTensor& t, const char* name, device_kind expect = device_kind::host) {
  const strided_view<T, 1> v = view_of<T, 1>(t, name, expect);
  SPARSEVLM_CHECK(v.extent(0) <= 1 || v.stride(0) == 1, errc::shape_mismatch,
                  detail::concat(name, ".strides[0]"), "1 (contiguous)", v.stride(0));
  if (v.empty()) return {};
  return std::span<T>(v.data(), static_cast<std::size_t>(v.extent(0)));
}

template <class T>
std::span<T> span_of(const DLManagedTensor& m, const char* name,
                     device_kind expect = device_kind::host) {
  return span_of<T>(m.dl_tensor, name, expect);
}

/// Runtime dtype dispatch: calls `f(v)` with `v` a strided_view<const E, Rank>,
/// E being float, half or bfloat16 as `t.dtype` says, and returns what `f`
/// returns (every instantiation must return the same type). `f` is instantiated
/// for all three element types.
///
/// Errors: as view_of; a dtype other than the three is
/// "<name>.dtype: expected float32, float16 or bfloat16, got int64"
/// (errc::invalid_argument).
template <std::size_t Rank, class F>
decltype(auto) visit_dlpack(const DLTensor& t, const char* name, F&& f,
                            device_kind expect = device_kind::host) {
  const DLDataType dt = t.dtype;
  if (dt.lanes == 1 && dt.code == kDLFloat && dt.bits == 16)
    return f(view_of<const half, Rank>(t, name, expect));
  if (dt.lanes == 1 && dt.code == kDLBfloat && dt.bits == 16)
    return f(view_of<const bfloat16, Rank>(t, name, expect));
  SPARSEVLM_CHECK(dt.lanes == 1 && dt.code == kDLFloat && dt.bits == 32, errc::invalid_argument,
                  detail::concat(name, ".dtype"), "float32, float16 or bfloat16",
                  dl_dtype_name(dt));
  return f(view_of<const float, Rank>(t, name, expect));
}

template <std::size_t Rank, class F>
decltype(auto) visit_dlpack(const DLManagedTensor& m, const char* name, F&& f,
                            device_kind expect = device_kind::host) {
  return visit_dlpack<Rank>(m.dl_tensor, name, std::forward<F>(f), expect);
}

}  // namespace sparsevlm
