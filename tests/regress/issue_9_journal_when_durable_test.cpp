// Issue 9: journal::writer::when_durable() called its function inline when
// nothing was pending (always in batch and off mode), so an answer released
// "later" ran on the stack of an unrelated call, and behaviour differed
// between fsync modes. The rule now: fn never runs inside when_durable(); it
// runs from the loop, in order, in every mode, and failures too.
#include <doctest/doctest.h>

#include <atomic>
#include <cerrno>

#include "../support/journaled.h"
#include "../support/tmpdir.h"

using namespace relay;

namespace {

// Runs the loop once per step until `done` or a step budget runs out; a
// watchdog timer notices if the loop ever blocks while callbacks are queued.
struct stepper {
  uv_loop_t* loop;
  uv_timer_t watchdog{};
  bool fired = false;
  explicit stepper(uv_loop_t* l) : loop(l) {
    uv_timer_init(loop, &watchdog);
    watchdog.data = this;
    uv_timer_start(&watchdog, [](uv_timer_t* t) { static_cast<stepper*>(t->data)->fired = true; }, 3000, 0);
  }
  // The handle's memory must outlive its close: one turn of the loop runs
  // the close (and never blocks).
  ~stepper() {
    uv_close(reinterpret_cast<uv_handle_t*>(&watchdog), nullptr);
    uv_run(loop, UV_RUN_NOWAIT);
  }
  template <class Done>
  void run(Done done) {
    for (int i = 0; i < 10000 && !done() && !fired; ++i) uv_run(loop, UV_RUN_ONCE);
  }
};

}  // namespace

TEST_CASE("when_durable never runs its function inside the call, in any fsync mode, and keeps FIFO order") {
  for (auto mode : {journal::fsync_mode::always, journal::fsync_mode::batch, journal::fsync_mode::off}) {
    CAPTURE(static_cast<int>(mode));
    test::tmpdir dir;
    journal::options o;
    o.fsync = mode;
    o.batch_interval_ms = 5;
    test::journaled j(dir.path(), o);
    std::vector<int> order;
    bool inside = false, ran_inside = false;
    auto call = [&](int n) {
      inside = true;
      j.w->when_durable([&, n](bool ok) {
        ran_inside = ran_inside || inside;
        CHECK(ok);
        order.push_back(n);
      });
      inside = false;
    };
    call(1);  // nothing pending at all
    j.submit("1");
    call(2);  // a record pending
    call(3);
    CHECK(order.empty());
    {
      stepper s(&j.loop);
      s.run([&] { return order.size() == 3; });
      CHECK_FALSE(s.fired);
    }
    CHECK_FALSE(ran_inside);
    CHECK_EQ(order, std::vector<int>{1, 2, 3});
    // Once everything is durable, a new call still does not run inline.
    call(4);
    CHECK_EQ(order.size(), 3u);
    {
      stepper s(&j.loop);
      s.run([&] { return order.size() == 4; });
      CHECK_FALSE(s.fired);
    }
    CHECK_FALSE(ran_inside);
  }
}

TEST_CASE("a callback queued from a callback runs without the loop blocking in poll") {
  for (auto mode : {journal::fsync_mode::always, journal::fsync_mode::off}) {
    CAPTURE(static_cast<int>(mode));
    test::tmpdir dir;
    journal::options o;
    o.fsync = mode;
    test::journaled j(dir.path(), o);
    int depth = 0;
    std::function<void(bool)> again = [&](bool) {
      if (++depth < 50) j.w->when_durable(again);
    };
    j.w->when_durable(again);
    CHECK_EQ(depth, 0);
    stepper s(&j.loop);
    s.run([&] { return depth == 50; });
    CHECK_EQ(depth, 50);
    CHECK_FALSE(s.fired);  // the loop never slept while one was queued
  }
}

TEST_CASE("failures are reported from the loop too, never inside when_durable, in order") {
  test::tmpdir dir;
  auto failing = std::make_shared<std::atomic<bool>>(false);
  journal::options o;
  o.retry_ms = 20;
  o.fault = [failing](std::string_view op) { return failing->load() && op == "fsync" ? EIO : 0; };
  test::journaled j(dir.path(), o);
  failing->store(true);
  j.submit("1");
  std::vector<std::pair<int, bool>> got;
  bool inside = false, ran_inside = false;
  auto call = [&](int n) {
    inside = true;
    j.w->when_durable([&, n](bool ok) {
      ran_inside = ran_inside || inside;
      got.emplace_back(n, ok);
    });
    inside = false;
  };
  call(1);
  {
    stepper s(&j.loop);
    s.run([&] { return got.size() == 1; });
  }
  REQUIRE_EQ(got.size(), 1u);
  CHECK_FALSE(got[0].second);
  CHECK_FALSE(j.w->accepting());
  // The writer is known to be failing: the answer is still not inline.
  call(2);
  call(3);
  CHECK_EQ(got.size(), 1u);
  {
    stepper s(&j.loop);
    s.run([&] { return got.size() == 3; });
    CHECK_FALSE(s.fired);
  }
  CHECK_FALSE(ran_inside);
  CHECK_EQ(got, (std::vector<std::pair<int, bool>>{{1, false}, {2, false}, {3, false}}));
  failing->store(false);
  CHECK(j.recover());
}
