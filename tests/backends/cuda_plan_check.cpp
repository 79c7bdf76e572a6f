// Checks csrc/ff_tensor_table.h on the host (compiled with a plain C++ compiler and run by
// tests/backends/test_cuda_geometry.py): over random tensor sizes and table capacities, the
// launches' tables and the blocks striding over their chunks (any grid size) cover every chunk of
// every non-empty tensor exactly once, each chunk's lookup finds its tensor whichever slot the
// search starts from, the addresses and element counts come back as stored, and only the last
// launch is not full. Then it prints the launch counts of the real table sizes, one line each:
//   launches <name> <tensors>x<numel> <count>
#include <cstdio>
#include <map>
#include <random>
#include <utility>
#include <vector>

#include "ff_tensor_table.h"

using namespace fisherforget;

static int failures = 0;

#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      if (failures < 20) std::printf("FAIL: " __VA_ARGS__); \
      ++failures;                                           \
    }                                                       \
  } while (0)

// A stand-in address that encodes (tensor, field): nothing is dereferenced.
static const void* fake_address(int64_t tensor, int field) {
  return reinterpret_cast<const void*>(static_cast<uintptr_t>(((tensor + 1) << 8) | field));
}

template <int kFields, int kParamBytes>
int check_launches(const std::vector<int64_t>& numels, const bool (&present)[kFields], int grid,
                   bool check_coverage) {
  using Table = TensorTable<kFields, kParamBytes>;
  static Table table;  // (up to 32 KB)
  std::map<std::pair<int64_t, int64_t>, int> seen;  // (tensor, chunk of tensor) -> times
  std::vector<int64_t> order;                        // tensor of each slot, this launch
  int launches = 0;
  bool previous_was_full = true;
  int count = 0;
  for (bool p : present) count += p ? 1 : 0;
  const int capacity = Table::capacity(count);
  int64_t next_tensor = 0;  // tensors enter the tables in order
  plan_table_launches(
      table, present, static_cast<int64_t>(numels.size()), numels.data(),
      [&](int64_t i, const void* (&addresses)[kFields]) {
        for (int f = 0; f < kFields; ++f) addresses[f] = fake_address(i, f);
        EXPECT(i >= next_tensor, "tensor %lld entered after %lld\n", static_cast<long long>(i),
               static_cast<long long>(next_tensor));
        next_tensor = i + 1;
        order.push_back(i);
      },
      [&](const Table& t) {
        EXPECT(previous_was_full, "launch %d follows a launch that was not full\n", launches);
        EXPECT(t.num_tensors >= 1 && t.num_tensors <= capacity, "%d tensors (capacity %d)\n",
               t.num_tensors, capacity);
        EXPECT(static_cast<int64_t>(order.size()) == t.num_tensors, "slots %d, tensors %zu\n",
               t.num_tensors, order.size());
        int64_t chunks = 0;
        for (int slot = 0; slot < t.num_tensors; ++slot) {
          const int64_t tensor = order[slot];
          EXPECT(t.numel(slot) == numels[tensor], "slot %d numel %lld\n", slot,
                 static_cast<long long>(t.numel(slot)));
          EXPECT(t.first_chunk(slot) == chunks, "slot %d first chunk\n", slot);
          EXPECT(t.chunks(slot) == num_chunks(numels[tensor], kChunkSize), "slot %d chunks\n",
                 slot);
          chunks += t.chunks(slot);
          for (int f = 0; f < kFields; ++f) {
            const void* expected = present[f] ? fake_address(tensor, f) : nullptr;
            EXPECT(t.address(f, slot) == expected, "slot %d field %d address\n", slot, f);
          }
        }
        EXPECT(t.num_chunks == chunks && chunks <= kMaxLaunchChunks, "launch chunks %lld\n",
               static_cast<long long>(chunks));
        if (check_coverage) {
          // The kernels' loop: block b takes chunks b, b + grid, ...; its search starts at the
          // slot of its previous chunk.
          const int blocks = grid_blocks(t.num_chunks, grid);
          for (int b = 0; b < blocks; ++b) {
            int slot = 0;
            for (int64_t c = b; c < t.num_chunks; c += blocks) {
              const int found = t.find(c, slot);
              EXPECT(found == t.find(c, 0), "chunk %lld: search from %d differs\n",
                     static_cast<long long>(c), slot);
              EXPECT(found >= slot, "chunk %lld went back to slot %d\n",
                     static_cast<long long>(c), found);
              slot = found;
              const int64_t within = c - t.first_chunk(slot);
              EXPECT(within >= 0 && within < t.chunks(slot), "chunk %lld outside slot %d\n",
                     static_cast<long long>(c), slot);
              ++seen[{order[slot], within}];
            }
          }
        }
        // Full: no slot left, or the next non-empty tensor's chunks would not fit.
        size_t next = static_cast<size_t>(order.back()) + 1;
        while (next < numels.size() && numels[next] <= 0) ++next;
        previous_was_full =
            t.num_tensors == capacity ||
            (next < numels.size() &&
             t.num_chunks + num_chunks(numels[next], kChunkSize) > kMaxLaunchChunks);
        order.clear();
        ++launches;
      });
  if (check_coverage) {
    for (size_t i = 0; i < numels.size(); ++i) {
      for (int64_t c = 0; c < num_chunks(numels[i], kChunkSize); ++c) {
        const auto it = seen.find({static_cast<int64_t>(i), c});
        EXPECT(it != seen.end() && it->second == 1, "tensor %zu chunk %lld covered %d times\n",
               i, static_cast<long long>(c), it == seen.end() ? 0 : it->second);
      }
    }
    size_t expected = 0;
    for (int64_t n : numels) expected += static_cast<size_t>(num_chunks(n, kChunkSize));
    EXPECT(seen.size() == expected, "%zu chunks covered, %zu expected\n", seen.size(), expected);
  }
  return launches;
}

// Random tensors (a quarter empty, sizes 1 to max_chunks chunks, odd tails) into tables of a few
// slots, for grids of 1 to 7 blocks.
template <int kParamBytes>
void check_random(std::mt19937_64& rng, int trials, int64_t max_chunks) {
  constexpr int kFields = 3;
  for (int trial = 0; trial < trials; ++trial) {
    const int num_tensors = static_cast<int>(rng() % 40);
    std::vector<int64_t> numels(num_tensors);
    for (auto& n : numels) {
      n = (rng() % 4 == 0) ? 0 : static_cast<int64_t>(rng() % (kChunkSize * max_chunks)) + 1;
    }
    const bool present[kFields] = {true, rng() % 2 == 0, true};
    check_launches<kFields, kParamBytes>(numels, present, 1 + static_cast<int>(rng() % 7), true);
  }
}

int main() {
  std::mt19937_64 rng(20250917);
  // Header of a 3-field table: 24 bytes; each slot takes (1 + present fields) words.
  constexpr int kBase = kScalarsReserve + 24;
  check_random<kBase + 8 * 4>(rng, 300, 3);   // 1 slot per launch
  check_random<kBase + 8 * 8>(rng, 300, 4);   // 2 slots (or 2 with 2 fields: 8 / 3)
  check_random<kBase + 8 * 13>(rng, 300, 3);  // 3 or 4 slots
  check_random<kLargeParamBytes>(rng, 30, 40);

  // Over 2^24 chunks in one launch would overflow the extent word: the table is cut before.
  {
    const bool present[1] = {true};
    const std::vector<int64_t> huge = {kMaxTableNumel, 5, kMaxTableNumel};
    const int launches = check_launches<1, kLargeParamBytes>(huge, present, 132, false);
    EXPECT(launches == 3, "2^40-element tensors: %d launches, expected 3\n", launches);
  }

  // The launch counts of the real tables (CUDA 12.1+: 32,764-byte kernel arguments).
  const std::vector<int64_t> many(2000, 4096), flat(1, int64_t{1} << 28);
  bool step_fisher[kStepFields] = {};  // fp32 step with the Fisher: the benchmarks' case
  for (int f : {kStepParam, kStepGrad, kStepExpAvg, kStepExpAvgSq, kStepFisher, kStepStep,
                kStepFisherCount}) {
    step_fisher[f] = true;
  }
  bool step_all[kStepFields];
  for (bool& f : step_all) f = true;
  bool step_plain[kStepFields] = {};
  for (int f : {kStepParam, kStepGrad, kStepExpAvg, kStepExpAvgSq, kStepStep}) step_plain[f] = true;
  const bool accumulate[kAccFields] = {true, true};
  const bool score[kScoreFields] = {true, true, true};
  struct Row {
    const char* name;
    int launches;
  };
  const Row rows[] = {
      {"step-fisher 2000x4096", check_launches<kStepFields, kLargeParamBytes>(many, step_fisher, 132, true)},
      {"step-fisher 1x268435456", check_launches<kStepFields, kLargeParamBytes>(flat, step_fisher, 132, true)},
      {"step-plain 2000x4096", check_launches<kStepFields, kLargeParamBytes>(many, step_plain, 132, false)},
      {"step-all 2000x4096", check_launches<kStepFields, kLargeParamBytes>(many, step_all, 132, false)},
      {"accumulate 2000x4096", check_launches<kAccFields, kLargeParamBytes>(many, accumulate, 132, false)},
      {"accumulate 1x268435456", check_launches<kAccFields, kLargeParamBytes>(flat, accumulate, 132, false)},
      {"score 2000x4096", check_launches<kScoreFields, kLargeParamBytes>(many, score, 132, false)},
      {"score 1x268435456", check_launches<kScoreFields, kLargeParamBytes>(flat, score, 132, false)},
      {"step-fisher-4KB 2000x4096", check_launches<kStepFields, kSmallParamBytes>(many, step_fisher, 132, false)},
  };
  for (const Row& row : rows) std::printf("launches %s %d\n", row.name, row.launches);

  if (failures == 0) {
    std::printf("plan check ok\n");
    return 0;
  }
  std::printf("%d failures\n", failures);
  return 1;
}
