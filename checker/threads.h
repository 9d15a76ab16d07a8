// A fixed pool of std::threads that runs a numbered set of tasks and waits for them.
#pragma once

#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace sinkcheck {

class ThreadPool {
 public:
  // n_threads includes the calling thread; 0 means one per hardware thread.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls task(index, thread) for every index in [0, n_tasks), spread dynamically over the pool;
  // `thread` in [0, size()) identifies per-thread scratch. Returns when all tasks are done. When a task
  // throws, the tasks not yet started are skipped and run() rethrows the first exception.
  void run(int n_tasks, const std::function<void(int index, int thread)>& task);

 private:
  void worker_loop(int thread);
  void drain(int thread);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int, int)>* task_ = nullptr;
  int n_tasks_ = 0;
  std::atomic<int> next_{0};
  int busy_workers_ = 0;
  unsigned generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;  // the first exception a task threw in the current run
};

}  // namespace sinkcheck
