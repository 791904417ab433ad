#include <algorithm>
#include <array>
#include <cassert>
#include <cstring>
#include <functional>

#include "relay/queue.h"

namespace relay::queue {
namespace {

// Which container holds a job (job::where). A job is in exactly one.
enum where_t : uint8_t { in_none = 0, in_fresh = 1, in_returned = 2, in_timed = 3, in_dead = 4 };

constexpr char hex_digits[] = "0123456789abcdef";

// Lowercase hex digit → value, anything else → -1 (ids and tokens arrive
// from clients; parsing them is on every result's path).
constexpr std::array<int8_t, 256> hex_values = [] {
  std::array<int8_t, 256> t{};
  t.fill(-1);
  for (int i = 0; i < 10; ++i) t['0' + i] = static_cast<int8_t>(i);
  for (int i = 0; i < 6; ++i) t['a' + i] = static_cast<int8_t>(10 + i);
  return t;
}();

int hex_value(char c) { return hex_values[static_cast<unsigned char>(c)]; }

// Byte → its two hex digits, so formatting copies pairs.
constexpr std::array<std::array<char, 2>, 256> hex_pairs = [] {
  std::array<std::array<char, 2>, 256> t{};
  for (int i = 0; i < 256; ++i) t[static_cast<size_t>(i)] = {hex_digits[i >> 4], hex_digits[i & 0xf]};
  return t;
}();

// Indexed binary heap over job pointers; job::heap_pos tracks each job's
// slot so that any job can be removed in O(log n).
template <class Less>
void sift_up(std::vector<job*>& h, size_t i, Less less) {
  job* x = h[i];
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (!less(x, h[parent])) break;
    h[i] = h[parent];
    h[i]->heap_pos = static_cast<uint32_t>(i);
    i = parent;
  }
  h[i] = x;
  x->heap_pos = static_cast<uint32_t>(i);
}

template <class Less>
void sift_down(std::vector<job*>& h, size_t i, Less less) {
  job* x = h[i];
  size_t n = h.size();
  for (;;) {
    size_t child = 2 * i + 1;
    if (child >= n) break;
    if (child + 1 < n && less(h[child + 1], h[child])) ++child;
    if (!less(h[child], x)) break;
    h[i] = h[child];
    h[i]->heap_pos = static_cast<uint32_t>(i);
    i = child;
  }
  h[i] = x;
  x->heap_pos = static_cast<uint32_t>(i);
}

template <class Less>
void heap_push(std::vector<job*>& h, job* j, Less less) {
  h.push_back(j);
  sift_up(h, h.size() - 1, less);
}

template <class Less>
void heap_erase(std::vector<job*>& h, job* j, Less less) {
  size_t i = j->heap_pos;
  assert(i < h.size() && h[i] == j);
  job* last = h.back();
  h.pop_back();
  if (last == j) return;
  h[i] = last;
  last->heap_pos = static_cast<uint32_t>(i);
  sift_up(h, i, less);
  sift_down(h, last->heap_pos, less);
}

bool by_id(const job* a, const job* b) { return a->id < b->id; }
bool by_due(const job* a, const job* b) {
  return a->due_ms != b->due_ms ? a->due_ms < b->due_ms : a->id < b->id;
}

void list_append(job*& head, job*& tail, job* j) {
  j->prev = tail;
  j->next = nullptr;
  if (tail) tail->next = j;
  else head = j;
  tail = j;
}

void list_remove(job*& head, job*& tail, job* j) {
  if (j->prev) j->prev->next = j->next;
  else head = j->next;
  if (j->next) j->next->prev = j->prev;
  else tail = j->prev;
  j->prev = j->next = nullptr;
}

std::string idempotency_slot(std::string_view queue, std::string_view key) {
  std::string s;
  s.reserve(queue.size() + 1 + key.size());
  s.append(queue);
  s += '\0';
  s.append(key);
  return s;
}

}  // namespace

void compact_string::assign(std::string_view s) {
  clear();
  if (s.empty()) return;
  auto n = static_cast<uint32_t>(s.size());
  _p = new char[sizeof n + s.size()];
  std::memcpy(_p, &n, sizeof n);
  std::memcpy(_p + sizeof n, s.data(), s.size());
}

void held_value::assign(std::string_view s) {
  clear();
  if (s.empty()) return;
  // Bodies are bounded far below 2 GiB (limits.max_body_bytes), so an
  // inline length never reaches the reference bit.
  assert(s.size() < ref_bit);
  auto n = static_cast<uint32_t>(s.size());
  _p = new char[sizeof n + s.size()];
  std::memcpy(_p, &n, sizeof n);
  std::memcpy(_p + sizeof n, s.data(), s.size());
}

void held_value::assign(const blob_ref& r) {
  clear();
  if (!r.valid()) return;
  uint32_t tag = ref_bit;
  _p = new char[sizeof tag + 8 + 8 + 8 + 4];
  char* p = _p;
  std::memcpy(p, &tag, sizeof tag);
  std::memcpy(p += sizeof tag, &r.file, 8);
  std::memcpy(p += 8, &r.offset, 8);
  std::memcpy(p += 8, &r.length, 8);
  std::memcpy(p += 8, &r.crc32c, 4);
}

blob_ref held_value::ref() const {
  blob_ref r;
  if (!is_ref()) return r;
  const char* p = _p + sizeof(uint32_t);
  std::memcpy(&r.file, p, 8);
  std::memcpy(&r.offset, p + 8, 8);
  std::memcpy(&r.length, p + 16, 8);
  std::memcpy(&r.crc32c, p + 24, 4);
  return r;
}

std::string_view to_string(job_state s) {
  switch (s) {
    case job_state::queued: return "queued";
    case job_state::delayed: return "delayed";
    case job_state::leased: return "leased";
    case job_state::succeeded: return "succeeded";
    case job_state::failed: return "failed";
    case job_state::dead: return "dead";
    case job_state::cancelled: return "cancelled";
  }
  return "unknown";
}

void append_job_id(std::string& out, job_id id) {
  char s[16];
  for (int i = 7; i >= 0; --i, id >>= 8) std::memcpy(s + 2 * i, hex_pairs[id & 0xff].data(), 2);
  out.append(s, sizeof s);
}

std::string format_job_id(job_id id) {
  std::string s;
  append_job_id(s, id);
  return s;
}

std::optional<job_id> parse_job_id(std::string_view s) {
  if (s.size() != 16) return std::nullopt;
  job_id id = 0;
  for (char c : s) {
    int v = hex_value(c);
    if (v < 0) return std::nullopt;
    id = (id << 4) | static_cast<job_id>(v);
  }
  if (id == 0) return std::nullopt;
  return id;
}

void lease_token::append_hex(std::string& out) const {
  char s[2 * sizeof bytes];
  for (size_t i = 0; i < sizeof bytes; ++i) std::memcpy(s + 2 * i, hex_pairs[bytes[i]].data(), 2);
  out.append(s, sizeof s);
}

std::string lease_token::hex() const {
  std::string s;
  append_hex(s);
  return s;
}

std::optional<lease_token> lease_token::parse(std::string_view s) {
  if (s.size() != 32) return std::nullopt;
  lease_token t;
  for (size_t i = 0; i < 16; ++i) {
    int hi = hex_value(s[2 * i]), lo = hex_value(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    t.bytes[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return t;
}

bool lease_token::equals(const lease_token& other) const {
  uint8_t diff = 0;
  for (size_t i = 0; i < bytes.size(); ++i) diff |= static_cast<uint8_t>(bytes[i] ^ other.bytes[i]);
  return diff == 0;
}

time_ms job_queue::oldest_ready_since() const {
  time_ms oldest = 0;
  auto consider = [&](const job* j) {
    if (j && (oldest == 0 || j->updated_ms < oldest)) oldest = j->updated_ms;
  };
  for (int p = 0; p < priority_levels; ++p) {
    consider(_fresh[p].head);
    if (!_returned[p].empty()) consider(_returned[p].front());
  }
  return oldest;
}

broker::broker(broker_limits limits, random_source random, record_sink* sink)
    : _limits(limits), _random(std::move(random)), _sink(sink) {}

broker::~broker() {
  // Waiters and watchers belong to their connections; detach them so that a
  // connection outliving the broker during shutdown does not touch freed memory.
  for (auto& [name, q] : _queues) {
    for (lease_waiter* w = q->_wait_head; w;) {
      lease_waiter* next = w->_next;
      w->_parked_on = nullptr;
      w->_prev = w->_next = nullptr;
      w = next;
    }
  }
  for (auto& [id, ws] : _watchers)
    for (job_watcher* w : ws) w->_watching = 0;
}

principal_ref broker::intern(std::string_view principal) {
  auto it = _principals.find(std::string(principal));
  if (it == _principals.end()) it = _principals.emplace(principal).first;
  return &*it;
}

job_queue* broker::queue_for(std::string_view name, open_mode mode, op_error& err) {
  err = op_error::none;
  auto it = _queues.find(std::string(name));
  job_queue* q = it == _queues.end() ? nullptr : it->second.get();
  if (mode == open_mode::lookup) return q;
  // Only a job makes a queue count: one that has only waiters is no queue
  // yet, so a consume-only caller cannot use up max_queues.
  bool counted = q && q->_jobs > 0;
  if (mode == open_mode::create && !counted && _queues_with_jobs >= _limits.max_queues) {
    err = op_error::too_many_queues;
    return nullptr;
  }
  if (q) return q;
  auto made = std::make_unique<job_queue>(std::string(name));
  q = made.get();
  _queues.emplace(std::string(name), std::move(made));
  return q;
}

void broker::forget_if_unused(job_queue& q) {
  if (q._jobs == 0 && q._waiters == 0) _queues.erase(q.name());
}

job* broker::find_mutable(job_id id) {
  auto it = _jobs.find(id);
  return it == _jobs.end() ? nullptr : &it->second;
}

const job* broker::find(job_id id) const {
  auto it = _jobs.find(id);
  return it == _jobs.end() ? nullptr : &it->second;
}

const job_queue* broker::find_queue(std::string_view name) const {
  auto it = _queues.find(std::string(name));
  return it == _queues.end() || it->second->_jobs == 0 ? nullptr : it->second.get();
}

void broker::for_each_queue(const std::function<void(const job_queue&)>& fn) const {
  std::vector<const job_queue*> sorted;
  sorted.reserve(_queues.size());
  for (const auto& [name, q] : _queues)
    if (q->_jobs > 0) sorted.push_back(q.get());
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->name() < b->name(); });
  for (const auto* q : sorted) fn(*q);
}

size_t broker::depth(std::string_view queue) const {
  const job_queue* q = find_queue(queue);
  if (!q) return 0;
  return q->count(job_state::queued) + q->count(job_state::delayed) + q->count(job_state::leased) +
         q->count(job_state::failed);
}

std::vector<const job*> broker::dead_jobs(std::string_view queue, size_t limit) const {
  std::vector<const job*> out;
  const job_queue* q = find_queue(queue);
  if (!q) return out;
  for (const job* j = q->_dead.head; j && out.size() < limit; j = j->next) out.push_back(j);
  return out;
}

// ---- Mutations: validate, describe as a record, commit. ----

void broker::commit(const record& r) {
  if (_sink) _sink->append(r);
  [[maybe_unused]] bool applied = apply(r);
  assert(applied && "live records always fit the state they were made from");
  if (_sink)
    if (job* j = find_mutable(r.id)) j->record_no = _sink->appended();
}

submit_result broker::submit(const submit_params& p, time_ms now) {
  std::string slot;
  if (!p.idempotency_key.empty()) {
    slot = idempotency_slot(p.queue, p.idempotency_key);
    auto it = _idempotency.find(slot);
    if (it != _idempotency.end()) return {op_error::none, find(it->second), false};
  }
  // Never wrap: an id is handed out once, or not at all.
  if (_next_id > max_job_id) return {op_error::ids_exhausted, nullptr, false};
  if (!has_room(1, p.payload.size() + p.payload_ref.length)) return {op_error::queue_full, nullptr, false};
  if (!has_depth_room(p.queue, 1, p.max_depth)) return {op_error::queue_depth, nullptr, false};
  op_error err;
  job_queue* q = queue_for(p.queue, open_mode::create, err);
  if (!q) return {err, nullptr, false};

  record r;
  r.type = record_type::submit;
  r.id = _next_id;
  r.at = now;
  r.due = now + std::max<time_ms>(0, p.delay_ms);
  r.queue = p.queue;
  r.priority = p.priority;
  r.max_attempts = p.max_attempts;
  r.lease_ms = p.lease_ms;
  r.idempotency_key = p.idempotency_key;
  r.payload = p.payload;
  r.payload_ref = p.payload_ref;
  commit(r);
  dispatch(*q, now);
  return {op_error::none, find(r.id), true};
}

job* broker::pop_ready(job_queue& q) {
  for (int p = 0; p < priority_levels; ++p) {
    job* fresh = q._fresh[p].head;
    job* returned = q._returned[p].empty() ? nullptr : q._returned[p].front();
    if (fresh && returned) return fresh->id < returned->id ? fresh : returned;
    if (fresh) return fresh;
    if (returned) return returned;
  }
  return nullptr;
}

namespace {

// When a lease granted now ends; the answer's size depends on it, so it is
// worked out in one place for the grant and for the size.
time_ms lease_expiry(const job& j, uint32_t lease_ms, time_ms now) {
  return now + (lease_ms ? lease_ms : j.lease_ms);
}

}  // namespace

void broker::grant(job& j, uint32_t lease_ms, principal_ref owner, time_ms now) {
  record r;
  r.type = record_type::lease;
  r.id = j.id;
  r.at = now;
  r.due = lease_expiry(j, lease_ms, now);
  _random(r.lease.bytes.data(), r.lease.bytes.size());
  r.owner = *owner;
  commit(r);
}

void broker::take(job_queue& q, size_t max, size_t max_bytes, const answer_size& size, uint32_t lease_ms,
                  principal_ref owner, time_ms now, std::vector<job*>& out) {
  // Without a measure there is no byte bound to keep.
  bool bounded = max_bytes != SIZE_MAX && size.entry != nullptr;
  size_t bytes = size.empty;
  while (out.size() < max) {
    job* j = pop_ready(q);  // the next ready job, still in its ring until granted
    if (!j) break;
    if (bounded) {
      // The attempt and expiry the grant below will write, so that the
      // size counted is the size sent.
      size_t more = size.entry(*j, uint32_t{j->attempts} + 1, lease_expiry(*j, lease_ms, now), out.empty());
      // The first job goes whatever its size: it fits limits.max_body_bytes,
      // and an answer with nothing would leave the worker asking forever.
      if (!out.empty() && (more > max_bytes || bytes > max_bytes - more)) break;
      bytes += more;
    }
    grant(*j, lease_ms, owner, now);
    out.push_back(j);
  }
}

op_error broker::lease(std::string_view queue, size_t max, uint32_t lease_ms, principal_ref owner,
                       time_ms now, std::vector<job*>& out) {
  return lease(queue, max, SIZE_MAX, answer_size{}, lease_ms, owner, now, out);
}

op_error broker::lease(std::string_view queue, size_t max, size_t max_bytes, const answer_size& size,
                       uint32_t lease_ms, principal_ref owner, time_ms now, std::vector<job*>& out) {
  op_error err;
  job_queue* q = queue_for(queue, open_mode::lookup, err);
  if (!q) return op_error::none;
  take(*q, max, max_bytes, size, lease_ms, owner, now, out);
  return op_error::none;
}

void broker::park(std::string_view queue, lease_waiter& w) {
  assert(!w._parked_on);
  op_error err;
  job_queue* q = queue_for(queue, open_mode::wait, err);
  w._parked_on = q;
  w._prev = q->_wait_tail;
  w._next = nullptr;
  if (q->_wait_tail) q->_wait_tail->_next = &w;
  else q->_wait_head = &w;
  q->_wait_tail = &w;
  ++q->_waiters;
}

void broker::unpark(lease_waiter& w) {
  job_queue* q = w._parked_on;
  if (!q) return;
  if (w._prev) w._prev->_next = w._next;
  else q->_wait_head = w._next;
  if (w._next) w._next->_prev = w._prev;
  else q->_wait_tail = w._prev;
  w._prev = w._next = nullptr;
  w._parked_on = nullptr;
  --q->_waiters;
  forget_if_unused(*q);
}

void broker::dispatch(job_queue& q, time_ms now) {
  // The oldest waiter is served first; each gets what is ready, up to its max.
  while (q._wait_head && q.ready() > 0) {
    lease_waiter* w = q._wait_head;
    unpark(*w);
    std::vector<job*> jobs;
    // At least one job: q.ready() > 0 and the first is taken whatever its size.
    take(q, w->max, w->max_bytes, w->size, w->lease_ms, w->owner, now, jobs);
    w->on_leased(jobs);  // may destroy w
  }
}

op_error broker::check_lease(job* j, const lease_token& t, principal_ref who) const {
  if (!j) return op_error::not_found;
  if (j->state != job_state::leased || !j->lease.equals(t)) return op_error::lease_lost;
  if (j->lease_owner != who) return op_error::wrong_owner;
  return op_error::none;
}

broker::heartbeat_result broker::heartbeat(job_id id, const lease_token& t, principal_ref who,
                                           uint32_t extend_ms, time_ms now) {
  job* j = find_mutable(id);
  op_error err = check_lease(j, t, who);
  if (err != op_error::none) return {err, 0};
  // A lease past its expiry is lost even if the timer has not fired yet.
  if (j->due_ms <= now) return {op_error::lease_lost, 0};
  record r;
  r.type = record_type::heartbeat;
  r.id = id;
  r.at = now;
  r.lease = t;
  r.due = now + (extend_ms ? extend_ms : j->lease_ms);
  commit(r);
  return {op_error::none, j->due_ms};
}

op_error broker::complete(job_id id, const lease_token& t, principal_ref who, std::string_view result,
                          time_ms now, const blob_ref& result_ref) {
  job* j = find_mutable(id);
  op_error err = check_lease(j, t, who);
  if (err != op_error::none) return err;
  if (j->due_ms <= now) return op_error::lease_lost;
  record r;
  r.type = record_type::complete;
  r.id = id;
  r.at = now;
  r.lease = t;
  r.text = result;
  r.text_ref = result_ref;
  commit(r);
  return op_error::none;
}

op_error broker::fail(job_id id, const lease_token& t, principal_ref who, std::string_view error,
                      uint32_t retry_delay_ms, time_ms now) {
  job* j = find_mutable(id);
  op_error err = check_lease(j, t, who);
  if (err != op_error::none) return err;
  if (j->due_ms <= now) return op_error::lease_lost;
  // Exponential backoff: base, 2*base, 4*base, ... capped.
  int shift = std::min<int>(std::max<int>(j->attempts, 1) - 1, 30);
  time_ms delay = std::min<time_ms>(static_cast<time_ms>(retry_delay_ms) << shift, _limits.max_backoff_ms);
  record r;
  r.type = record_type::fail;
  r.id = id;
  r.at = now;
  r.lease = t;
  r.text = error;
  r.due = now + delay;
  commit(r);
  return op_error::none;
}

op_error broker::cancel(job_id id, time_ms now) {
  job* j = find_mutable(id);
  if (!j) return op_error::not_found;
  if (j->state == job_state::leased || is_terminal(j->state)) return op_error::not_cancellable;
  record r;
  r.type = record_type::cancel;
  r.id = id;
  r.at = now;
  commit(r);
  return op_error::none;
}

std::vector<job_id> broker::requeue_dead(std::string_view queue, const std::vector<job_id>& ids,
                                         size_t max, time_ms now) {
  std::vector<job_id> done;
  op_error err;
  job_queue* q = queue_for(queue, open_mode::lookup, err);
  if (!q) return done;
  auto requeue = [&](job& j) {
    record r;
    r.type = record_type::requeue;
    r.id = j.id;
    r.at = now;
    commit(r);
    done.push_back(j.id);
  };
  if (!ids.empty()) {
    for (job_id id : ids) {
      job* j = find_mutable(id);
      if (j && j->queue == q && j->state == job_state::dead && done.size() < max) requeue(*j);
    }
  } else {
    while (q->_dead.head && done.size() < max) requeue(*q->_dead.head);
  }
  dispatch(*q, now);
  return done;
}

void broker::watch(job_id id, job_watcher& w) {
  assert(w._watching == 0);
  w._watching = id;
  _watchers[id].push_back(&w);
}

void broker::unwatch(job_watcher& w) {
  if (w._watching == 0) return;
  auto it = _watchers.find(w._watching);
  w._watching = 0;
  if (it == _watchers.end()) return;
  auto& v = it->second;
  v.erase(std::remove(v.begin(), v.end(), &w), v.end());
  if (v.empty()) _watchers.erase(it);
}

void broker::advance(time_ms now) {
  while (!_timed.empty() && _timed.front()->due_ms <= now) {
    job& j = *_timed.front();
    if (j.state == job_state::leased) {
      record r;
      r.type = record_type::expire;
      r.id = j.id;
      r.at = now;
      commit(r);
    } else {
      // Delayed job or a failed job whose backoff is over: ready now.
      timed_remove(j);
      j.updated_ms = j.due_ms;
      make_ready(j, false);
    }
    if (j.state == job_state::queued) dispatch(*j.queue, now);
  }
  while (!_retention.empty() && _retention.front().first <= now) {
    job_id id = _retention.front().second;
    std::pop_heap(_retention.begin(), _retention.end(), std::greater<>());
    _retention.pop_back();
    job* j = find_mutable(id);
    // A dead job that was requeued (or died again later) is not due yet.
    if (j && is_terminal(j->state) && j->updated_ms + _limits.result_ttl_ms <= now) forget(*j);
  }
}

std::optional<time_ms> broker::next_deadline() const {
  std::optional<time_ms> t;
  if (!_timed.empty()) t = _timed.front()->due_ms;
  if (!_retention.empty() && (!t || _retention.front().first < *t)) t = _retention.front().first;
  return t;
}

// ---- apply(): the only place where job state changes. ----

void broker::retain(time_ms due, job_id id) {
  // Entries are not removed when a job changes again (a dead job requeued,
  // a snapshot upserting it): advance() checks the job when its entry is due.
  _retention.emplace_back(due, id);
  std::push_heap(_retention.begin(), _retention.end(), std::greater<>());
}

void broker::set_state(job& j, job_state s) {
  --j.queue->_counts[static_cast<size_t>(j.state)];
  ++j.queue->_counts[static_cast<size_t>(s)];
  j.state = s;
}

void broker::make_ready(job& j, bool fresh) {
  set_state(j, job_state::queued);
  job_queue& q = *j.queue;
  if (fresh) {
    list_append(q._fresh[j.priority].head, q._fresh[j.priority].tail, &j);
    j.where = in_fresh;
  } else {
    heap_push(q._returned[j.priority], &j, by_id);
    j.where = in_returned;
  }
}

void broker::remove_from_container(job& j) {
  job_queue& q = *j.queue;
  switch (j.where) {
    case in_fresh: list_remove(q._fresh[j.priority].head, q._fresh[j.priority].tail, &j); break;
    case in_returned: heap_erase(q._returned[j.priority], &j, by_id); break;
    case in_timed: heap_erase(_timed, &j, by_due); break;
    case in_dead: list_remove(q._dead.head, q._dead.tail, &j); break;
    default: break;
  }
  j.where = in_none;
}

void broker::timed_push(job& j) {
  heap_push(_timed, &j, by_due);
  j.where = in_timed;
}

void broker::timed_remove(job& j) {
  assert(j.where == in_timed);
  remove_from_container(j);
}

void broker::timed_update(job& j) {
  sift_up(_timed, j.heap_pos, by_due);
  sift_down(_timed, j.heap_pos, by_due);
}

void broker::finish(job& j, job_state terminal, time_ms at) {
  set_state(j, terminal);
  j.updated_ms = at;
  j.lease_owner = nullptr;
  if (terminal == job_state::dead) {
    list_append(j.queue->_dead.head, j.queue->_dead.tail, &j);
    j.where = in_dead;
    ++j.queue->_counters.dead;
  }
  retain(at + _limits.result_ttl_ms, j.id);
  auto it = _watchers.find(j.id);
  if (it == _watchers.end()) return;
  std::vector<job_watcher*> watchers = std::move(it->second);
  _watchers.erase(it);
  for (job_watcher* w : watchers) {
    w->_watching = 0;
    w->on_terminal(j);  // may destroy w
  }
}

void broker::set_outcome(job& j, std::string_view text, const blob_ref& ref) {
  _held_bytes -= j.outcome.size();
  release_blob(j.outcome);
  if (ref.valid()) j.outcome.assign(ref);
  else j.outcome.assign(text);
  _held_bytes += j.outcome.size();
  hold_blob(j.outcome);
}

void broker::hold_blob(const held_value& v) {
  if (!v.is_ref()) return;
  blob_ref r = v.ref();
  ++_blob_counts[r.file];
  _referenced_bytes += r.length;
}

void broker::release_blob(const held_value& v) {
  if (!v.is_ref()) return;
  blob_ref r = v.ref();
  uint64_t file = r.file;
  _referenced_bytes -= r.length;
  auto it = _blob_counts.find(file);
  assert(it != _blob_counts.end());
  if (it == _blob_counts.end() || --it->second > 0) return;
  _blob_counts.erase(it);
  if (_on_unreferenced) _on_unreferenced(file);
}

void broker::for_each_blob_ref(const std::function<void(const job&, const blob_ref&)>& fn) const {
  if (_blob_counts.empty()) return;  // the common case: nothing spilled, no walk over every job
  for (const auto& [id, j] : _jobs) {
    if (j.payload.is_ref()) fn(j, j.payload.ref());
    if (j.outcome.is_ref()) fn(j, j.outcome.ref());
  }
}

bool broker::drop(job_id id) {
  job* j = find_mutable(id);
  if (!j) return false;
  forget(*j);
  return true;
}

void broker::forget(job& j) {
  remove_from_container(j);
  _held_bytes -= j.payload.size() + j.outcome.size();
  release_blob(j.payload);
  release_blob(j.outcome);
  --j.queue->_counts[static_cast<size_t>(j.state)];
  if (!j.idempotency_key.empty()) {
    auto it = _idempotency.find(idempotency_slot(j.queue->name(), j.idempotency_key));
    if (it != _idempotency.end() && it->second == j.id) _idempotency.erase(it);
  }
  job_queue& q = *j.queue;
  _jobs.erase(j.id);
  if (--q._jobs == 0) {
    --_queues_with_jobs;
    forget_if_unused(q);
  }
}

bool broker::apply(const record& r) {
  if (r.type == record_type::meta) {
    // The next id to hand out: max_job_id + 1 says they are all used up.
    if (r.id == 0 || r.id > max_job_id + 1) return false;
    _next_id = std::max(_next_id, r.id);
    return true;
  }
  if (r.type == record_type::snapshot) return apply_snapshot(r);
  if (r.type == record_type::submit) {
    if (r.id == 0 || r.id > max_job_id || _jobs.count(r.id) || r.priority >= priority_levels || r.max_attempts == 0)
      return false;
    job& j = restore_job(r);
    job_queue* q = j.queue;
    j.created_ms = j.updated_ms = r.at;
    ++q->_counters.submitted;
    // A new job enters as delayed; make_ready() moves it on when it is due now.
    j.state = job_state::delayed;
    ++q->_counts[static_cast<size_t>(job_state::delayed)];
    if (r.due > r.at) {
      j.due_ms = r.due;
      timed_push(j);
    } else {
      make_ready(j, true);
    }
    return true;
  }

  job* jp = find_mutable(r.id);
  if (!jp) return false;
  job& j = *jp;
  // Each change has one state it may start from.
  switch (r.type) {
    case record_type::lease:
      if (j.state != job_state::queued) return false;
      break;
    case record_type::heartbeat:
    case record_type::complete:
    case record_type::fail:
    case record_type::expire:
      if (j.state != job_state::leased) return false;
      break;
    case record_type::cancel:
      if (j.state == job_state::leased || is_terminal(j.state)) return false;
      break;
    case record_type::requeue:
      if (j.state != job_state::dead) return false;
      break;
    default:
      return false;
  }
  switch (r.type) {
    case record_type::lease:
      remove_from_container(j);
      ++j.attempts;
      set_state(j, job_state::leased);
      j.lease = r.lease;
      j.lease_owner = intern(r.owner);
      j.due_ms = r.due;
      j.updated_ms = r.at;
      timed_push(j);
      ++j.queue->_counters.leased;
      break;
    case record_type::heartbeat:
      j.due_ms = r.due;
      j.updated_ms = r.at;
      timed_update(j);
      break;
    case record_type::complete:
      remove_from_container(j);
      set_outcome(j, r.text, r.text_ref);
      ++j.queue->_counters.completed;
      finish(j, job_state::succeeded, r.at);
      break;
    case record_type::fail:
      remove_from_container(j);
      set_outcome(j, r.text);
      j.lease_owner = nullptr;
      ++j.queue->_counters.failed;
      if (j.attempts >= j.max_attempts) {
        finish(j, job_state::dead, r.at);
      } else {
        set_state(j, job_state::failed);
        j.updated_ms = r.at;
        j.due_ms = r.due;
        timed_push(j);
      }
      break;
    case record_type::cancel:
      remove_from_container(j);
      ++j.queue->_counters.cancelled;
      finish(j, job_state::cancelled, r.at);
      break;
    case record_type::expire:
      remove_from_container(j);
      j.lease_owner = nullptr;
      ++j.queue->_counters.expired;
      if (j.attempts >= j.max_attempts) {
        set_outcome(j, "lease expired");
        finish(j, job_state::dead, r.at);
      } else {
        j.updated_ms = r.at;
        make_ready(j, false);
      }
      break;
    case record_type::requeue:
      remove_from_container(j);
      j.attempts = 0;
      set_outcome(j, {});
      j.updated_ms = r.at;
      ++j.queue->_counters.requeued;
      make_ready(j, false);
      break;
    default:
      break;
  }
  return true;
}

void broker::place(job& j) {
  // Puts a job whose fields are set into the container its state calls for.
  job_queue& q = *j.queue;
  switch (j.state) {
    case job_state::queued:
      j.state = job_state::delayed;  // make_ready() counts the move
      ++q._counts[static_cast<size_t>(job_state::delayed)];
      make_ready(j, false);
      return;
    case job_state::delayed:
    case job_state::failed:
    case job_state::leased:
      ++q._counts[static_cast<size_t>(j.state)];
      timed_push(j);
      return;
    case job_state::dead:
      ++q._counts[static_cast<size_t>(j.state)];
      list_append(q._dead.head, q._dead.tail, &j);
      j.where = in_dead;
      retain(j.updated_ms + _limits.result_ttl_ms, j.id);
      return;
    case job_state::succeeded:
    case job_state::cancelled:
      ++q._counts[static_cast<size_t>(j.state)];
      j.where = in_none;
      retain(j.updated_ms + _limits.result_ttl_ms, j.id);
      return;
  }
}

bool broker::apply_snapshot(const record& r) {
  if (r.id == 0 || r.id > max_job_id || r.priority >= priority_levels || r.max_attempts == 0 ||
      static_cast<size_t>(r.state) >= job_state_count)
    return false;
  if (r.state == job_state::leased && r.owner.empty()) return false;
  // Upsert: a snapshot may follow records for the same job when a crash
  // interrupted compaction before the old segments were deleted.
  if (job* old = find_mutable(r.id)) forget(*old);
  job& j = restore_job(r);
  j.state = r.state;
  j.attempts = r.attempts;
  j.created_ms = r.created;
  j.updated_ms = r.at;
  j.due_ms = r.due;
  j.lease = r.lease;
  j.lease_owner = r.state == job_state::leased ? intern(r.owner) : nullptr;
  if (r.text_ref.valid()) j.outcome.assign(r.text_ref);
  else j.outcome.assign(r.text);
  _held_bytes += j.outcome.size();
  hold_blob(j.outcome);
  place(j);
  return true;
}

job& broker::restore_job(const record& r) {
  op_error err;
  job_queue* q = queue_for(r.queue, open_mode::restore, err);
  job& j = _jobs.try_emplace(r.id).first->second;
  j.id = r.id;
  j.queue = q;
  if (q->_jobs++ == 0) ++_queues_with_jobs;
  j.priority = r.priority;
  j.max_attempts = r.max_attempts;
  j.lease_ms = r.lease_ms;
  if (r.payload_ref.valid()) j.payload.assign(r.payload_ref);
  else j.payload.assign(r.payload);
  _held_bytes += j.payload.size();
  hold_blob(j.payload);
  j.idempotency_key.assign(r.idempotency_key);
  _next_id = std::max(_next_id, r.id + 1);
  if (!r.idempotency_key.empty()) _idempotency[idempotency_slot(r.queue, r.idempotency_key)] = r.id;
  return j;
}

std::vector<job_id> broker::job_ids() const {
  std::vector<job_id> ids;
  ids.reserve(_jobs.size());
  for (const auto& [id, j] : _jobs) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

record broker::snapshot_of(const job& j) const {
  record r;
  r.type = record_type::snapshot;
  r.id = j.id;
  r.queue = j.queue->name();
  r.state = j.state;
  r.attempts = j.attempts;
  r.max_attempts = j.max_attempts;
  r.priority = j.priority;
  r.lease_ms = j.lease_ms;
  r.created = j.created_ms;
  r.at = j.updated_ms;
  r.due = j.due_ms;
  r.lease = j.lease;
  r.owner = j.lease_owner ? std::string_view(*j.lease_owner) : std::string_view();
  r.idempotency_key = j.idempotency_key;
  r.payload = j.payload.view();
  r.text = j.outcome.view();
  // Compaction carries references, never the bytes: the blob file stays
  // where it is and the snapshot names it.
  r.payload_ref = j.payload.ref();
  r.text_ref = j.outcome.ref();
  return r;
}

record broker::meta_record(time_ms now) const {
  record r;
  r.type = record_type::meta;
  r.id = _next_id;
  r.at = now;
  return r;
}

}  // namespace relay::queue
