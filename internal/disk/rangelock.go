package disk

import "sync"

// rangeLock serializes operations on overlapping sector ranges while letting
// non-overlapping ones (and overlapping readers) run in parallel. Unaligned
// writes read-modify-write their edge sectors, so two requests touching
// different bytes of one sector must not interleave.
//
// The set of held ranges is as small as the number of requests in flight,
// so a linear scan beats anything clever. It allocates nothing per lock once
// the held slice has grown. It is not fair: a steady stream of overlapping
// readers can delay a writer, which NBD clients do not produce in practice.
type rangeLock struct {
	mu      sync.Mutex
	cond    sync.Cond // L is &mu
	held    []heldRange
	nextID  uint64
	waiters int
}

type heldRange struct {
	start, end int64 // [start, end) in sectors
	write      bool
	id         uint64
}

func (l *rangeLock) init() { l.cond.L = &l.mu }

// lock blocks until [start, end) can be held, shared for readers (write
// false) and exclusive for writers, and returns the token for unlock.
func (l *rangeLock) lock(start, end int64, write bool) uint64 {
	l.mu.Lock()
	for l.conflicts(start, end, write) {
		l.waiters++
		l.cond.Wait()
		l.waiters--
	}
	l.nextID++
	id := l.nextID
	l.held = append(l.held, heldRange{start, end, write, id})
	l.mu.Unlock()
	return id
}

func (l *rangeLock) conflicts(start, end int64, write bool) bool {
	for _, h := range l.held {
		if h.start < end && start < h.end && (write || h.write) {
			return true
		}
	}
	return false
}

func (l *rangeLock) unlock(id uint64) {
	l.mu.Lock()
	for i, h := range l.held {
		if h.id == id {
			last := len(l.held) - 1
			l.held[i] = l.held[last]
			l.held = l.held[:last]
			break
		}
	}
	if l.waiters > 0 {
		l.cond.Broadcast()
	}
	l.mu.Unlock()
}
