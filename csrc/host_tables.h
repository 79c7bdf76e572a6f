// Host-side helpers of the Python step path, offered by fisherforget._C (bindings_python.cpp):
// what the optimizer and the Triton glue would otherwise do with one Python attribute access per
// tensor and field (about 0.1 us each: milliseconds per step for thousands of params).
//
// layout_key(tensors)  bytes that are equal for two lists exactly when their tensors have, index
//                      by index, the same Python type, dtype, device, layout and shape. The
//                      optimizer compares a step's gradients with the key of the gradients its
//                      launch plan was checked with: one C++ pass instead of five Python ones.
// address_rows(...)    the [n, k + 1] int64 address table of k tensor lists (0 for an absent list
//                      or a None item) with the element counts of the first list as the last
//                      column, and whether every tensor is contiguous with one dtype per list and
//                      one device (the Triton launches need that), and whether the addresses of
//                      the first `aligned_columns` lists are all 16-byte aligned.
//
// Neither keeps anything between calls: no cache keyed on addresses.
#pragma once

#include "python_views.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace fisherforget {
namespace python {

inline PyObject* layout_key(const PyTensors& tensors) {
  std::vector<uint64_t> words;
  words.reserve(tensors.size() * 4);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const at::Device device = t.device();
    const auto sizes = t.sizes();
    words.push_back(reinterpret_cast<uintptr_t>(Py_TYPE(tensors.object(i))));
    words.push_back(static_cast<uint64_t>(static_cast<uint8_t>(t.scalar_type())) |
                    static_cast<uint64_t>(static_cast<uint8_t>(device.type())) << 8 |
                    static_cast<uint64_t>(static_cast<uint8_t>(device.index())) << 16 |
                    static_cast<uint64_t>(static_cast<uint8_t>(t.layout())) << 24 |
                    static_cast<uint64_t>(sizes.size()) << 32);
    for (const int64_t size : sizes) words.push_back(static_cast<uint64_t>(size));
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                   static_cast<Py_ssize_t>(words.size() * sizeof(uint64_t)));
}

struct AddressRows {
  at::Tensor rows;       // int64 [n, k + 1]
  bool regular = true;   // contiguous, one dtype per list, one device
  bool aligned = true;   // the first aligned_columns lists' addresses are 16-byte aligned
};

// columns[c] is null for an absent list; every present list has n items (the first list's
// length); items may be null (None) only where allow_none.
inline AddressRows address_rows(const std::vector<const PyTensors*>& columns,
                                size_t aligned_columns, const char* op) {
  const PyTensors& first = *columns.at(0);
  const size_t n = first.size();
  const size_t k = columns.size();
  AddressRows out;
  out.rows = at::empty({static_cast<int64_t>(n), static_cast<int64_t>(k + 1)},
                       at::TensorOptions().dtype(at::kLong));
  int64_t* rows = out.rows.data_ptr<int64_t>();
  const at::Device device = n > 0 ? first[0].device() : at::Device(at::kCPU);
  uint64_t misaligned_bits = 0;
  for (size_t c = 0; c < k; ++c) {
    const PyTensors* column = columns[c];
    if (column == nullptr) {
      for (size_t i = 0; i < n; ++i) rows[i * (k + 1) + c] = 0;
      continue;
    }
    TORCH_CHECK(column->size() == n, op, ": list ", c, " has ", column->size(),
                " tensors, the first list ", n);
    std::optional<at::ScalarType> dtype;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor* t = column->at(i);
      int64_t address = 0;
      if (t != nullptr) {
        address = reinterpret_cast<intptr_t>(t->const_data_ptr());
        if (!dtype.has_value()) dtype = t->scalar_type();
        out.regular = out.regular && t->is_contiguous() && t->scalar_type() == *dtype &&
                      t->device() == device;
        if (c < aligned_columns) misaligned_bits |= static_cast<uint64_t>(address);
      }
      rows[i * (k + 1) + c] = address;
    }
  }
  for (size_t i = 0; i < n; ++i) rows[i * (k + 1) + k] = first[i].numel();
  out.aligned = (misaligned_bits & 15u) == 0;
  return out;
}

}  // namespace python
}  // namespace fisherforget
