// Multi-tensor launch geometry: the tensor tables passed as kernel arguments, the launch planner
// and the lookups the kernels do. Pure C++ (no CUDA, no torch), so that tests can check the
// planning and the lookups with a plain compiler (tests/backends/cuda_plan_check.cpp).
//
// Every tensor is cut into chunks of kChunkSize elements. One launch covers many tensors: its
// kernel argument holds a table with one 64-bit "extent" word per tensor (the tensor's first
// chunk within the launch and its element count) followed by one column of addresses per
// operand the op uses. The grid is sized to the GPU (the blocks that fit at once, not one block
// per chunk); block b processes chunks b, b + gridDim, b + 2 gridDim, ... of the launch and finds
// each chunk's tensor by binary search over the extents. A launch ends when the table is full,
// so the number of launches depends on the number of tensors only, never on their sizes: a 2^28
// tensor (4,096 chunks) is one launch.
//
// The table lives in kernel-parameter space: 32,764 bytes since CUDA 12.1 (compute capability 7.0
// and newer, driver r530 or newer), 4,096 bytes before. With 32,764 bytes a fused step with the
// Fisher (7 address columns) fits 508 tensors per launch: 2,000 tensors take 4 launches.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FF_TABLE_HD __host__ __device__ __forceinline__
#else
#define FF_TABLE_HD inline
#endif

namespace fisherforget {

constexpr int64_t kChunkSize = 65536;  // elements per chunk (a block's unit of work)
constexpr int kBlockSize = 256;        // threads per block (a power of two: tree reductions)

inline int64_t num_chunks(int64_t numel, int64_t chunk_size) {
  return (numel + chunk_size - 1) / chunk_size;
}

// Kernel-parameter space per launch, and the bytes of it reserved for each op's scalars.
constexpr int kLargeParamBytes = 32764;
constexpr int kSmallParamBytes = 4096;
constexpr int kScalarsReserve = 192;

// An extent word: first chunk (within the launch) in the high 24 bits, element count in the low
// 40. Tables list non-empty tensors only, so first chunks strictly increase along a table.
constexpr int kExtentShift = 40;
constexpr int64_t kMaxTableNumel = (int64_t{1} << kExtentShift) - 1;
constexpr int64_t kMaxLaunchChunks = int64_t{1} << (64 - kExtentShift);

template <int kFields, int kParamBytes>
struct TensorTable {
  // The header's int32s, rounded up to the alignment of the 64-bit words.
  static constexpr int kHeaderBytes = (4 * (3 + kFields) + 7) / 8 * 8;
  static constexpr int kWords = (kParamBytes - kScalarsReserve - kHeaderBytes) / 8;
  int32_t num_tensors;
  int32_t num_chunks;             // chunks of this launch, all tensors together
  int32_t stride;                 // the capacity chosen by reset() (host bookkeeping)
  int32_t field_offset[kFields];  // word index of field f's column; -1: absent
  uint64_t words[kWords];         // extents [0, stride), then one column of stride per field
  static_assert(kWords >= 1 + kFields, "the table must hold one tensor with every field");

  // Tensors per launch when `present_fields` of the kFields address columns are used.
  static constexpr int capacity(int present_fields) { return kWords / (1 + present_fields); }

  FF_TABLE_HD int64_t numel(int slot) const {
    return static_cast<int64_t>(words[slot] & static_cast<uint64_t>(kMaxTableNumel));
  }
  FF_TABLE_HD int64_t first_chunk(int slot) const {
    return static_cast<int64_t>(words[slot] >> kExtentShift);
  }
  FF_TABLE_HD int64_t chunks(int slot) const {
    const int64_t end = slot + 1 < num_tensors ? first_chunk(slot + 1) : num_chunks;
    return end - first_chunk(slot);
  }
  // The slot whose chunks hold launch chunk `chunk`, searching slots [lo, num_tensors) (a block
  // walks its chunks in increasing order, so it passes the previous slot as lo).
  FF_TABLE_HD int find(int64_t chunk, int lo) const {
    int hi = num_tensors - 1;
    while (lo < hi) {
      const int mid = lo + (hi - lo + 1) / 2;
      if (first_chunk(mid) <= chunk) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }
  FF_TABLE_HD void* address(int field, int slot) const {
    const int offset = field_offset[field];
    return offset < 0 ? nullptr
                      : reinterpret_cast<void*>(static_cast<uintptr_t>(words[offset + slot]));
  }

  // Host side: start an empty table whose columns are the fields with present[f].
  void reset(const bool (&present)[kFields]) {
    int count = 0;
    for (int f = 0; f < kFields; ++f) count += present[f] ? 1 : 0;
    stride = capacity(count);
    int column = 1;
    for (int f = 0; f < kFields; ++f) field_offset[f] = present[f] ? stride * column++ : -1;
    num_tensors = 0;
    num_chunks = 0;
  }
  bool full() const { return num_tensors == stride; }
  // Appends a non-empty tensor (0 < numel <= kMaxTableNumel); `addresses[f]` is ignored for
  // absent fields. The caller keeps num_chunks + its chunks <= kMaxLaunchChunks.
  void add(int64_t numel, const void* const (&addresses)[kFields]) {
    const int slot = num_tensors++;
    words[slot] = (static_cast<uint64_t>(num_chunks) << kExtentShift) |
                  static_cast<uint64_t>(numel);
    for (int f = 0; f < kFields; ++f) {
      if (field_offset[f] >= 0) {
        words[field_offset[f] + slot] =
            static_cast<uint64_t>(reinterpret_cast<uintptr_t>(addresses[f]));
      }
    }
    num_chunks += static_cast<int32_t>(num_chunks_of(numel));
  }
  static int64_t num_chunks_of(int64_t numel) { return fisherforget::num_chunks(numel, kChunkSize); }
};

// Fills tables with the tensors [0, num_tensors) in order, skipping empty ones, and calls
// on_launch(table) whenever a table is full (tensors or chunks) and once at the end if it holds
// any tensor. get(i, addresses) writes tensor i's addresses into `addresses`. Throws nothing:
// the caller rejects tensors over kMaxTableNumel elements before.
template <typename Table, int kFields, typename Get, typename OnLaunch>
void plan_table_launches(Table& table, const bool (&present)[kFields], int64_t num_tensors,
                         const int64_t* numels, Get&& get, OnLaunch&& on_launch) {
  table.reset(present);
  const void* addresses[kFields] = {};
  for (int64_t i = 0; i < num_tensors; ++i) {
    const int64_t numel = numels[i];
    if (numel <= 0) continue;
    if (table.num_tensors > 0 &&
        (table.full() || table.num_chunks + Table::num_chunks_of(numel) > kMaxLaunchChunks)) {
      on_launch(static_cast<const Table&>(table));
      table.reset(present);
    }
    get(i, addresses);
    table.add(numel, addresses);
  }
  if (table.num_tensors > 0) on_launch(static_cast<const Table&>(table));
}

// Blocks of a launch: one per chunk up to what the GPU holds at once (`resident_blocks`); the
// blocks then stride over the remaining chunks.
inline int grid_blocks(int64_t chunks, int resident_blocks) {
  const int64_t cap = resident_blocks > 0 ? resident_blocks : 1;
  return static_cast<int>(chunks < cap ? chunks : cap);
}

// ---------------------------------------------------------------------- per-op table layouts
// Address columns of each op's table (an enum per op, the order of the columns).
enum StepField : int {
  kStepParam, kStepGrad, kStepExpAvg, kStepExpAvgSq, kStepMaxExpAvgSq, kStepFisher, kStepMask,
  kStepStep, kStepFisherCount, kStepFields
};
enum AccumulateField : int { kAccFisher, kAccGrad, kAccFields };
enum ScoreField : int { kScoreDirection, kScoreGrad, kScoreFisher, kScoreFields };

}  // namespace fisherforget
