package identity

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
)

// Store holds the cluster's identities: in production the MeshIdentity objects (package kube),
// in tests identitytest.Store. Its methods are safe for concurrent use, also by several
// processes sharing the backing store.
type Store interface {
	// Get returns the labels of id and whether id exists. It is read-only.
	Get(ctx context.Context, id Identity) (Labels, bool, error)
	// Create creates id with labels if no identity id exists, atomically with respect to every
	// other Create of id, in any process. It reports whether id names labels afterwards: true
	// if this call created it, or if it already existed with equal labels (another agent won
	// the race for the same set, which is the same outcome); false if id exists with other
	// labels. It is idempotent.
	Create(ctx context.Context, id Identity, labels Labels) (bool, error)
	// List returns every identity and its labels. It is read-only.
	List(ctx context.Context) (map[Identity]Labels, error)
}

// ErrExhausted is returned (wrapped) by Allocate when every probe found another label set.
var ErrExhausted = errors.New("identity space exhausted")

// DefaultMaxProbes bounds the probe walk of one Allocate. With double hashing the chance that a
// free number needs more probes is load^1024, under 1e-4 even with the space 99% full.
const DefaultMaxProbes = 1024

// AllocatorOptions configure an Allocator. The zero value allocates in cluster 0 over the whole
// local range.
type AllocatorOptions struct {
	// Cluster is this cluster's ID, the identities' upper bits.
	Cluster uint8
	// Space limits allocation to the locals MinLocal .. MinLocal+Space-1; 0 means LocalSpace.
	// Every agent of a cluster must use the same value. Tests use a tiny space to force
	// collisions.
	Space int
	// MaxProbes bounds the probes of one Allocate; 0 means min(Space, DefaultMaxProbes).
	MaxProbes int
	// Watched says the caller feeds every watch event of the store to Observe and Forget
	// (kube.EventHandler), so the cache trails the store only by the watch's latency and a
	// number it does not know is almost always free: Allocate then calls Store.Create straight
	// away, one call per new set. Without it the cache may be far behind (filled by Sync and
	// by this Allocator's own results), so Allocate calls Store.Get first and creates only
	// what is absent, one call per set another agent already created. Either way the result
	// is the same; only the number of calls differs.
	Watched bool
	// Logger receives debug logs of collisions; nil discards them.
	Logger *slog.Logger
}

// AllocatorStats count what an Allocator did.
type AllocatorStats struct {
	// Allocations counts successful Allocate calls.
	Allocations uint64
	// CacheHits counts Allocate calls the cache answered with no store call.
	CacheHits uint64
	// Gets counts Store.Get calls.
	Gets uint64
	// Creates counts Store.Create calls.
	Creates uint64
	// Collisions counts probes a store call found held by another label set.
	Collisions uint64
	// Skips counts probes skipped because the cache knew another set held the number.
	Skips uint64
}

// Allocator assigns identities to canonical label sets. Its methods are safe for concurrent
// use; concurrent Allocate calls for the same set in one Allocator share one walk.
//
// The walk: for i = 0, 1, ... take the identity of Probe i; if the cache says it names the set,
// done; if the cache says it names another set, skip it; otherwise ask the store (Get, unless
// the cache is Watched) and Store.Create it if absent: create-if-absent either binds it to the
// set (created now or by another agent: done) or reports another set (next probe). Labels are
// immutable and Create is atomic, so every agent walking the same sequence stops at the same
// number: concurrent agents converge without coordination.
//
// Deletion (by the garbage collector) can open a hole in front of a set that collided, so an
// agent with a stale view may create a second identity for a set that already has one. Both
// carry the same labels, so policy treats them alike; the cache prefers the one earlier in
// the set's probe sequence, so every agent's Lookup converges on the same number once it has
// observed both, and the other, unused, is collected.
type Allocator struct {
	store     Store
	cluster   uint8
	space     int
	maxProbes int
	watched   bool
	log       *slog.Logger

	mu       sync.Mutex
	byID     map[Identity]Labels
	byKey    map[string][]Identity // most preferred first; usually one
	inflight map[string]*walk
	stats    AllocatorStats
}

// walk is one Allocate in progress, shared by concurrent callers for the same set.
type walk struct {
	done chan struct{}
	id   Identity
	err  error
}

// NewAllocator returns an Allocator over store with an empty cache. It does no I/O; call Sync
// (and feed watch events to Observe and Forget) to fill the cache. It panics if opts.Space is
// negative or larger than LocalSpace.
func NewAllocator(store Store, opts AllocatorOptions) *Allocator {
	space := opts.Space
	if space == 0 {
		space = LocalSpace
	}
	if space < 0 || space > LocalSpace {
		panic(fmt.Sprintf("identity.NewAllocator: Space %d outside 1..%d", opts.Space, LocalSpace))
	}
	maxProbes := opts.MaxProbes
	if maxProbes <= 0 {
		maxProbes = min(space, DefaultMaxProbes)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Allocator{
		store:     store,
		cluster:   opts.Cluster,
		space:     space,
		maxProbes: maxProbes,
		watched:   opts.Watched,
		log:       log,
		byID:      make(map[Identity]Labels),
		byKey:     make(map[string][]Identity),
		inflight:  make(map[string]*walk),
	}
}

// Allocate returns the identity of a canonical label set, allocating it if needed. labels must
// pass Validate. It is idempotent; the answer for a set only changes if its identity is deleted
// or a preferred duplicate appears (see Allocator).
func (a *Allocator) Allocate(ctx context.Context, labels Labels) (Identity, error) {
	if err := labels.Validate(); err != nil {
		return 0, fmt.Errorf("allocate identity: %w", err)
	}
	key := labels.Key()
	for {
		a.mu.Lock()
		if ids := a.byKey[key]; len(ids) > 0 {
			a.stats.Allocations++
			a.stats.CacheHits++
			a.mu.Unlock()
			return ids[0], nil
		}
		if w, ok := a.inflight[key]; ok {
			a.mu.Unlock()
			select {
			case <-w.done:
			case <-ctx.Done():
				return 0, fmt.Errorf("allocate identity for %s: %w", key, ctx.Err())
			}
			if w.err != nil && isContextErr(w.err) && ctx.Err() == nil {
				continue // the leader's context ended, not ours: try again
			}
			if w.err == nil {
				a.count(func(st *AllocatorStats) { st.Allocations++ })
			}
			return w.id, w.err
		}
		w := &walk{done: make(chan struct{})}
		a.inflight[key] = w
		a.mu.Unlock()

		w.id, w.err = a.walk(ctx, labels)

		a.mu.Lock()
		delete(a.inflight, key)
		if w.err == nil {
			a.stats.Allocations++
			a.observeLocked(w.id, labels)
		}
		a.mu.Unlock()
		close(w.done)
		return w.id, w.err
	}
}

func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// walk walks the probe sequence of labels; see Allocator.
func (a *Allocator) walk(ctx context.Context, labels Labels) (Identity, error) {
	seq := newSequence(labels.Hash(), a.space)
	for i := range a.maxProbes {
		id := New(a.cluster, seq.at(i))
		a.mu.Lock()
		cached, known := a.byID[id]
		if known && !cached.Equal(labels) {
			a.stats.Skips++
		}
		a.mu.Unlock()
		if known {
			if cached.Equal(labels) {
				return id, nil
			}
			continue
		}
		if !a.watched {
			cur, exists, err := a.store.Get(ctx, id)
			a.count(func(st *AllocatorStats) { st.Gets++ })
			if err != nil {
				return 0, fmt.Errorf("allocate identity for %s: probe %d: %w", labels.Key(), i, err)
			}
			if exists {
				a.Observe(id, cur)
				if cur.Equal(labels) {
					return id, nil
				}
				a.collision(id, i, labels)
				continue
			}
		}
		ok, err := a.store.Create(ctx, id, labels)
		a.count(func(st *AllocatorStats) { st.Creates++ })
		if err != nil {
			return 0, fmt.Errorf("allocate identity for %s: probe %d: %w", labels.Key(), i, err)
		}
		if ok {
			return id, nil
		}
		a.collision(id, i, labels)
	}
	return 0, fmt.Errorf("allocate identity for %s: %d probes: %w", labels.Key(), a.maxProbes, ErrExhausted)
}

func (a *Allocator) count(f func(*AllocatorStats)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	f(&a.stats)
}

func (a *Allocator) collision(id Identity, probe int, labels Labels) {
	a.count(func(st *AllocatorStats) { st.Collisions++ })
	a.log.Debug("identity taken by another label set", "identity", id, "probe", probe, "labels", labels.Key())
}

// Probe returns the i-th identity of labels' probe sequence as this Allocator walks it: its
// cluster, over its Space. Probe(l, 0) is the set's first choice.
func (a *Allocator) Probe(labels Labels, i int) Identity {
	return New(a.cluster, newSequence(labels.Hash(), a.space).at(i))
}

// Sync replaces the cache with the store's List. Call it at start and whenever a watch
// restarts; without a watch, call it now and then to drop identities deleted since.
func (a *Allocator) Sync(ctx context.Context) error {
	all, err := a.store.List(ctx)
	if err != nil {
		return fmt.Errorf("sync identities: %w", err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	clear(a.byID)
	clear(a.byKey)
	for id, l := range all {
		a.observeLocked(id, l)
	}
	return nil
}

// Observe records that id names labels, as a watch add or update event says. Identities of
// other clusters and reserved identities are ignored. It is idempotent.
func (a *Allocator) Observe(id Identity, labels Labels) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.observeLocked(id, labels)
}

// Forget records that id no longer exists, as a watch delete event says. It is idempotent.
func (a *Allocator) Forget(id Identity) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.forgetLocked(id)
}

func (a *Allocator) observeLocked(id Identity, labels Labels) {
	if id.Cluster() != a.cluster || id.IsReserved() {
		return
	}
	if old, ok := a.byID[id]; ok {
		if old.Equal(labels) {
			return
		}
		a.forgetLocked(id) // deleted and re-created with other labels
	}
	a.byID[id] = labels
	key := labels.Key()
	ids := append(a.byKey[key], id)
	if len(ids) > 1 {
		seq := newSequence(labels.Hash(), a.space)
		slices.SortFunc(ids, func(x, y Identity) int {
			return cmp.Or(cmp.Compare(rank(seq, x), rank(seq, y)), cmp.Compare(x, y))
		})
	}
	a.byKey[key] = ids
}

// rank orders duplicates: earlier in the set's probe sequence first, outside it last.
func rank(seq sequence, id Identity) uint64 {
	if i := seq.index(id.Local()); i >= 0 {
		return uint64(i)
	}
	return 1 << 32
}

func (a *Allocator) forgetLocked(id Identity) {
	labels, ok := a.byID[id]
	if !ok {
		return
	}
	delete(a.byID, id)
	key := labels.Key()
	ids := slices.DeleteFunc(a.byKey[key], func(x Identity) bool { return x == id })
	if len(ids) == 0 {
		delete(a.byKey, key)
	} else {
		a.byKey[key] = ids
	}
}

// Lookup returns the cached identity of labels, without any store call.
func (a *Allocator) Lookup(labels Labels) (Identity, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if ids := a.byKey[labels.Key()]; len(ids) > 0 {
		return ids[0], true
	}
	return 0, false
}

// Labels returns the cached labels of id, without any store call.
func (a *Allocator) Labels(id Identity) (Labels, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	l, ok := a.byID[id]
	return l, ok
}

// Resolve returns the labels of id from the cache, or else from the store (caching them).
func (a *Allocator) Resolve(ctx context.Context, id Identity) (Labels, bool, error) {
	if l, ok := a.Labels(id); ok {
		return l, true, nil
	}
	l, ok, err := a.store.Get(ctx, id)
	if err != nil {
		return Labels{}, false, fmt.Errorf("resolve identity %s: %w", id, err)
	}
	if ok {
		a.Observe(id, l)
	}
	return l, ok, nil
}

// Snapshot returns a copy of the cache: every known identity and its labels.
func (a *Allocator) Snapshot() map[Identity]Labels {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := make(map[Identity]Labels, len(a.byID))
	for id, l := range a.byID {
		m[id] = l
	}
	return m
}

// Stats returns the counters so far.
func (a *Allocator) Stats() AllocatorStats {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.stats
}
