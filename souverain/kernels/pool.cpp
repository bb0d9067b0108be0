// The kernels' own fork-join thread pool, instead of OpenMP's, for their parallel loops.
//
// A decode step runs ~150 parallel loops of a few microseconds each. libgomp wakes its pool cheaply
// only while no more threads use OpenMP than there are cores: once a second thread has run an OpenMP
// region (the server loads models on its main thread and steps the engine on another), libgomp stops
// spinning and each loop pays a futex wake-up, 40-90 us on these VMs; SmolLM2's batch-1 decode fell from
// ~150 to ~40 tok/s when the engine ran off the main thread. Here the workers spin on a generation
// counter for a short while after each loop (the next loop of a step comes within microseconds), then
// sleep on a condition variable until the next one. Whatever thread calls, the cost is the same.
//
// The split is ATen's (at most one chunk per thread, chunks of at least `grain`), so a kernel's results
// do not depend on which pool ran it. A call while another thread holds the pool, or from inside a
// loop, runs inline on the caller.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels.h"

namespace souverain {
namespace {

constexpr auto kSpin = std::chrono::microseconds(300);  // how long an idle worker waits awake

thread_local bool inside = false;

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { work(i); });
  }

  int threads() const { return threads_; }

  // chunk(i) for i in [0, threads): the caller runs chunk 0, worker i chunk i; returns when all are done.
  bool try_run(const std::function<void(int)>& chunk) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    job_ = &chunk;
    done_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(sleep_);  // a worker going to sleep sees the new generation
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    inside = true;
    chunk(0);
    inside = false;
    while (done_.load(std::memory_order_acquire) != threads_ - 1) _mm_pause();
    return true;
  }

 private:
  void work(int id) {
    inside = true;
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        _mm_pause();
        if ((spins & 255) == 255 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(sleep_);
          sleepers_.fetch_add(1, std::memory_order_acq_rel);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
          break;
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      (*job_)(id);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex busy_, sleep_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> done_{0}, sleepers_{0};
  const std::function<void(int)>* job_ = nullptr;
};

Pool* current = nullptr;
std::mutex creating;

Pool& pool() {
  // As many threads as torch was told to use when the kernels first ran (torch.set_num_threads,
  // OMP_NUM_THREADS, or the cores); never destroyed (threads must not be joined at exit). A forked
  // child has none of the parent's threads: it makes its own pool.
  static const bool hooked = pthread_atfork(nullptr, nullptr, [] { current = nullptr; }) == 0;
  (void)hooked;
  std::lock_guard<std::mutex> lock(creating);
  if (current == nullptr) current = new Pool(std::max(1, at::get_num_threads()));
  return *current;
}

}  // namespace

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  if (begin >= end) return;
  const int64_t n = end - begin, tasks = (n + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1);
  if (inside || tasks <= 1 || at::get_num_threads() <= 1) {
    f(begin, end);
    return;
  }
  Pool& p = pool();
  const int64_t threads = std::min<int64_t>({p.threads(), at::get_num_threads(), tasks});
  const int64_t chunk = (n + threads - 1) / threads;
  const std::function<void(int)> part = [&](int i) {
    const int64_t b = begin + i * chunk, e = std::min(end, b + chunk);
    if (i < threads && b < e) f(b, e);
  };
  if (!p.try_run(part)) f(begin, end);  // another thread holds the pool: inline, the same results
}

}  // namespace souverain
