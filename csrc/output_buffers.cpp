// Memory for the large CPU outputs of the ops (see output_buffers.h).
#include "output_buffers.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace gfmrag_fast {
namespace {

constexpr size_t kMinCachedBytes = size_t(4) << 20;
constexpr size_t kDefaultLimitBytes = size_t(256) << 20;
constexpr size_t kHugePage = size_t(2) << 20;

class OutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes == 0) return {nullptr, c10::Device(c10::kCPU)};
    void* data = take(bytes);
    return {data, new Block{data, bytes}, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  void* take(size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* data = it->second;
        free_.erase(it);
        cached_bytes_ -= bytes;
        return data;
      }
    }
    void* data = nullptr;
    TORCH_CHECK(posix_memalign(&data, kHugePage, bytes) == 0 && data != nullptr,
                "gfmrag_fast: out of memory allocating ", bytes, " bytes");
#ifdef __linux__
    const size_t whole_pages = bytes / kHugePage * kHugePage;
    if (whole_pages > 0) madvise(data, whole_pages, MADV_HUGEPAGE);  // advice only: errors ignored
#endif
    return data;
  }

  static void release(void* context) {
    const Block* block = static_cast<Block*>(context);
    instance().give(block->data, block->bytes);
    delete block;
  }

  void give(void* data, size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (bytes >= kMinCachedBytes && cached_bytes_ + bytes <= limit_bytes_.load()) {
        free_.emplace(bytes, data);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(data);
  }

 public:
  size_t limit_bytes() const { return limit_bytes_.load(); }

  void set_limit(size_t bytes) {
    std::vector<void*> dropped;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      limit_bytes_.store(bytes);
      // Largest first: the fewest buffers freed to get under the limit.
      while (cached_bytes_ > bytes) {
        const auto last = std::prev(free_.end());
        cached_bytes_ -= last->first;
        dropped.push_back(last->second);
        free_.erase(last);
      }
    }
    for (void* data : dropped) std::free(data);
  }

  std::vector<int64_t> stats() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(limit_bytes_.load()), static_cast<int64_t>(cached_bytes_),
            static_cast<int64_t>(free_.size())};
  }

  static OutputAllocator& instance() {
    static OutputAllocator* allocator = new OutputAllocator();  // never destroyed: tensors may outlive statics
    return *allocator;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_bytes_ = 0;
  std::atomic<size_t> limit_bytes_{kDefaultLimitBytes};  // read without the lock by empty_output
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (!options.device().is_cpu() || bytes < kMinCachedBytes || OutputAllocator::instance().limit_bytes() == 0) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &OutputAllocator::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

void set_output_cache_limit(int64_t megabytes) {
  TORCH_CHECK_VALUE(megabytes >= 0 && megabytes <= (int64_t(1) << 30),
                    "output cache limit must be between 0 and 2**30 MiB, got ", megabytes);
  OutputAllocator::instance().set_limit(static_cast<size_t>(megabytes) << 20);
}

std::vector<int64_t> output_cache_stats() { return OutputAllocator::instance().stats(); }

TORCH_LIBRARY_FRAGMENT(gfmrag_fast, m) {
  m.def("output_cache_limit(int megabytes) -> ()", &set_output_cache_limit);
  m.def("output_cache_stats() -> int[]", &output_cache_stats);
}

}  // namespace gfmrag_fast
