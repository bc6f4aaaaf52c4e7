package identity_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshcrypt/meshcrypt/pkg/identity"
	"github.com/meshcrypt/meshcrypt/pkg/identity/identitytest"
)

// labelSet returns the i-th test label set.
func labelSet(t testing.TB, i int) identity.Labels {
	t.Helper()
	l, err := identity.Canonical(map[string]string{"app": fmt.Sprintf("app-%d", i), "pod-template-hash": "x"},
		fmt.Sprintf("ns-%d", i%3), "", "c1")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestAllocateFirstChoiceAndCache(t *testing.T) {
	for _, tc := range []struct {
		watched   bool
		wantCalls identitytest.Calls
	}{
		{false, identitytest.Calls{Get: 1, Create: 1}},
		{true, identitytest.Calls{Create: 1}},
	} {
		t.Run(fmt.Sprintf("watched=%v", tc.watched), func(t *testing.T) {
			ctx := t.Context()
			store := identitytest.NewStore()
			a := identity.NewAllocator(store, identity.AllocatorOptions{Cluster: 1, Watched: tc.watched})
			l := labelSet(t, 0)
			id, err := a.Allocate(ctx, l)
			if err != nil {
				t.Fatal(err)
			}
			if want := identity.New(1, identity.Preferred(l)); id != want || a.Probe(l, 0) != want {
				t.Errorf("Allocate = %s, want the first choice %s", id, want)
			}
			for range 3 {
				again, err := a.Allocate(ctx, l)
				if err != nil || again != id {
					t.Fatalf("Allocate again = %s, %v; want %s", again, err, id)
				}
			}
			if diff := cmp.Diff(tc.wantCalls, store.Calls()); diff != "" {
				t.Errorf("store calls (-want +got):\n%s", diff)
			}
			want := identity.AllocatorStats{Allocations: 4, CacheHits: 3, Gets: uint64(tc.wantCalls.Get), Creates: 1}
			if diff := cmp.Diff(want, a.Stats()); diff != "" {
				t.Errorf("stats (-want +got):\n%s", diff)
			}
			if got, ok := a.Lookup(l); !ok || got != id {
				t.Errorf("Lookup = %s, %v", got, ok)
			}
			if got, ok := a.Labels(id); !ok || !got.Equal(l) {
				t.Errorf("Labels(%s) = %v, %v", id, got, ok)
			}
			wantStore := fmt.Sprintf("%s %s\n", id, l.Key())
			if diff := cmp.Diff(wantStore, store.String()); diff != "" {
				t.Errorf("store (-want +got):\n%s", diff)
			}
		})
	}
}

// TestAllocateFindsExisting: an unwatched allocator finds a set another agent created with one
// Get; a watched one learns it with a failed Create and a Get inside the store.
func TestAllocateFindsExisting(t *testing.T) {
	store := identitytest.NewStore()
	l := labelSet(t, 3)
	first, err := identity.NewAllocator(store, identity.AllocatorOptions{}).Allocate(t.Context(), l)
	if err != nil {
		t.Fatal(err)
	}
	before := store.Calls()
	got, err := identity.NewAllocator(store, identity.AllocatorOptions{}).Allocate(t.Context(), l)
	if err != nil || got != first {
		t.Fatalf("Allocate = %s, %v; want %s", got, err, first)
	}
	if c := store.Calls(); c.Get-before.Get != 1 || c.Create != before.Create {
		t.Errorf("calls %+v after %+v: want one Get", c, before)
	}
	watched := identity.NewAllocator(store, identity.AllocatorOptions{Watched: true})
	if got, err := watched.Allocate(t.Context(), l); err != nil || got != first {
		t.Fatalf("watched Allocate = %s, %v; want %s", got, err, first)
	}
	if st := watched.Stats(); st.Creates != 1 || st.Gets != 0 || st.Collisions != 0 {
		t.Errorf("watched stats = %+v, want one Create", st)
	}
}

func TestAllocateProbesPastCollision(t *testing.T) {
	for _, watched := range []bool{false, true} {
		t.Run(fmt.Sprintf("watched=%v", watched), func(t *testing.T) {
			ctx := t.Context()
			store := identitytest.NewStore()
			opts := identity.AllocatorOptions{Watched: watched}
			a := identity.NewAllocator(store, opts)
			l, other := labelSet(t, 1), labelSet(t, 2)
			store.Put(a.Probe(l, 0), other)
			store.Put(a.Probe(l, 1), other) // an administrator's duplicate, to make it two probes
			id, err := a.Allocate(ctx, l)
			if err != nil {
				t.Fatal(err)
			}
			if id != a.Probe(l, 2) {
				t.Errorf("Allocate = %s, want probe 2 = %s", id, a.Probe(l, 2))
			}
			want := identity.AllocatorStats{Allocations: 1, Gets: 3, Creates: 1, Collisions: 2}
			if watched {
				want = identity.AllocatorStats{Allocations: 1, Creates: 3, Collisions: 2}
			}
			if diff := cmp.Diff(want, a.Stats()); diff != "" {
				t.Errorf("stats (-want +got):\n%s", diff)
			}

			// A synced allocator knows the taken numbers and skips them without store calls.
			b := identity.NewAllocator(store, opts)
			store.Delete(id)
			if err := b.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			before := store.Calls().Create
			id2, err := b.Allocate(ctx, l)
			if err != nil || id2 != id {
				t.Fatalf("Allocate after Sync = %s, %v; want %s", id2, err, id)
			}
			if st := b.Stats(); st.Skips != 2 || st.Collisions != 0 || store.Calls().Create-before != 1 {
				t.Errorf("stats = %+v, creates %d; want 2 skips and 1 create", st, store.Calls().Create-before)
			}
		})
	}
}

func TestAllocateExhausted(t *testing.T) {
	ctx := t.Context()
	store := identitytest.NewStore()
	a := identity.NewAllocator(store, identity.AllocatorOptions{Space: 4})
	seen := make(map[identity.Identity]bool)
	for i := range 4 {
		id, err := a.Allocate(ctx, labelSet(t, i))
		if err != nil {
			t.Fatalf("set %d: %v", i, err)
		}
		if seen[id] || id.Local() < identity.MinLocal || id.Local() >= identity.MinLocal+4 {
			t.Fatalf("set %d got %s: duplicate or outside the space", i, id)
		}
		seen[id] = true
	}
	_, err := a.Allocate(ctx, labelSet(t, 4))
	if !errors.Is(err, identity.ErrExhausted) {
		t.Fatalf("fifth set in a space of 4: err = %v, want ErrExhausted", err)
	}
	if err := identitytest.CheckConsistent(a, store.Snapshot()); err != nil {
		t.Error(err)
	}
}

func TestAllocateRejectsNonCanonical(t *testing.T) {
	store := identitytest.NewStore()
	a := identity.NewAllocator(store, identity.AllocatorOptions{})
	_, err := a.Allocate(t.Context(), identity.FromMap(map[string]string{"app": "x"}))
	if !errors.Is(err, identity.ErrInvalidLabel) {
		t.Errorf("err = %v, want ErrInvalidLabel", err)
	}
	if store.Calls() != (identitytest.Calls{}) {
		t.Errorf("store was called: %+v", store.Calls())
	}
}

func TestAllocateStoreError(t *testing.T) {
	store := identitytest.NewStore()
	boom := errors.New("boom")
	store.Fail(boom)
	a := identity.NewAllocator(store, identity.AllocatorOptions{})
	if _, err := a.Allocate(t.Context(), labelSet(t, 0)); !errors.Is(err, boom) {
		t.Errorf("Allocate err = %v, want boom", err)
	}
	if err := a.Sync(t.Context()); !errors.Is(err, boom) {
		t.Errorf("Sync err = %v, want boom", err)
	}
	store.Fail(nil)
	if _, err := a.Allocate(t.Context(), labelSet(t, 0)); err != nil {
		t.Errorf("Allocate after recovery: %v", err)
	}
}

func TestObserveForgetSync(t *testing.T) {
	store := identitytest.NewStore()
	a := identity.NewAllocator(store, identity.AllocatorOptions{Cluster: 2})
	l := labelSet(t, 0)
	mine := identity.New(2, 300)
	a.Observe(mine, l)
	a.Observe(identity.New(3, 300), labelSet(t, 1)) // another cluster: ignored
	a.Observe(identity.New(2, 7), labelSet(t, 2))   // reserved: ignored
	if diff := cmp.Diff([]identity.Identity{mine}, slices.Sorted(maps.Keys(a.Snapshot()))); diff != "" {
		t.Errorf("cache (-want +got):\n%s", diff)
	}
	// Re-created with other labels.
	a.Observe(mine, labelSet(t, 1))
	if _, ok := a.Lookup(l); ok {
		t.Error("the old set still maps to the re-created identity")
	}
	a.Forget(mine)
	a.Forget(mine)
	if len(a.Snapshot()) != 0 {
		t.Errorf("cache after Forget: %v", a.Snapshot())
	}
	// Sync replaces the cache entirely.
	a.Observe(identity.New(2, 400), l)
	store.Put(identity.New(2, 500), labelSet(t, 3))
	if err := a.Sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]identity.Identity{identity.New(2, 500)}, slices.Sorted(maps.Keys(a.Snapshot()))); diff != "" {
		t.Errorf("cache after Sync (-want +got):\n%s", diff)
	}
}

func TestResolve(t *testing.T) {
	store := identitytest.NewStore()
	a := identity.NewAllocator(store, identity.AllocatorOptions{})
	id := identity.New(0, 1000)
	store.Put(id, labelSet(t, 5))
	l, ok, err := a.Resolve(t.Context(), id)
	if err != nil || !ok || !l.Equal(labelSet(t, 5)) {
		t.Fatalf("Resolve = %v, %v, %v", l, ok, err)
	}
	if _, _, err := a.Resolve(t.Context(), id); err != nil || store.Calls().Get != 1 {
		t.Errorf("second Resolve went to the store: %+v, %v", store.Calls(), err)
	}
	if _, ok, err := a.Resolve(t.Context(), identity.New(0, 1001)); ok || err != nil {
		t.Errorf("Resolve of a missing identity = %v, %v", ok, err)
	}
}

// TestDuplicatesConverge: a deletion opens a hole in front of a set that collided, and an agent
// that never saw the set's identity creates a second one in the hole. Every cache, whatever
// order it learns of the two in, prefers the one earlier in the probe sequence.
func TestDuplicatesConverge(t *testing.T) {
	ctx := t.Context()
	store := identitytest.NewStore()
	old := identity.NewAllocator(store, identity.AllocatorOptions{})
	l, blocker := labelSet(t, 0), labelSet(t, 1)
	store.Put(old.Probe(l, 0), blocker)
	late, err := old.Allocate(ctx, l)
	if err != nil || late != old.Probe(l, 1) {
		t.Fatalf("Allocate = %s, %v; want probe 1", late, err)
	}
	store.Delete(old.Probe(l, 0)) // the GC collects the blocker
	old.Forget(old.Probe(l, 0))

	fresh := identity.NewAllocator(store, identity.AllocatorOptions{}) // never synced
	early, err := fresh.Allocate(ctx, l)
	if err != nil || early != old.Probe(l, 0) {
		t.Fatalf("fresh Allocate = %s, %v; want probe 0", early, err)
	}
	if got, _ := old.Lookup(l); got != late {
		t.Fatalf("old Lookup = %s before it observed the duplicate, want %s", got, late)
	}
	old.Observe(early, l)
	fresh.Observe(late, l)
	for name, a := range map[string]*identity.Allocator{"old": old, "fresh": fresh} {
		if got, _ := a.Lookup(l); got != early {
			t.Errorf("%s Lookup = %s, want the earlier probe %s", name, got, early)
		}
		if got, _ := a.Allocate(ctx, l); got != early {
			t.Errorf("%s Allocate = %s, want %s", name, got, early)
		}
	}
	// When the preferred one goes, the other takes over.
	old.Forget(early)
	if got, _ := old.Lookup(l); got != late {
		t.Errorf("Lookup after Forget = %s, want %s", got, late)
	}
}

// TestInflightShared: concurrent Allocate calls for one set in one Allocator make one walk.
func TestInflightShared(t *testing.T) {
	store := identitytest.NewStore()
	release := make(chan struct{})
	store.SetHook(func(op string, _ identity.Identity) {
		if op == "create" {
			<-release
		}
	})
	a := identity.NewAllocator(store, identity.AllocatorOptions{})
	l := labelSet(t, 0)
	const n = 50
	ids := make([]identity.Identity, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			var err error
			if ids[i], err = a.Allocate(t.Context(), l); err != nil {
				t.Error(err)
			}
		})
	}
	close(release)
	wg.Wait()
	for _, id := range ids {
		if id != ids[0] {
			t.Fatalf("different answers: %v", ids)
		}
	}
	if c := store.Calls().Create; c != 1 {
		t.Errorf("%d creates, want 1", c)
	}
}

// TestLeaderCanceled: when the caller walking for a set gives up, callers waiting on it walk
// again instead of failing with its context's error.
func TestLeaderCanceled(t *testing.T) {
	store := identitytest.NewStore()
	entered := make(chan struct{})
	var once sync.Once
	// The hook blocks only the first call, and only until the leader's context ends.
	leaderCtx, cancel := context.WithCancel(t.Context())
	store.SetHook(func(op string, _ identity.Identity) {
		once.Do(func() {
			close(entered)
			<-leaderCtx.Done()
		})
	})
	a := identity.NewAllocator(store, identity.AllocatorOptions{})
	l := labelSet(t, 0)
	leaderErr := make(chan error, 1)
	go func() {
		_, err := a.Allocate(leaderCtx, l)
		leaderErr <- err
	}()
	<-entered
	follower := make(chan error, 1)
	go func() {
		_, err := a.Allocate(t.Context(), l)
		follower <- err
	}()
	cancel()
	if err := <-leaderErr; !errors.Is(err, context.Canceled) {
		t.Errorf("leader err = %v, want Canceled", err)
	}
	if err := <-follower; err != nil {
		t.Errorf("follower err = %v, want success", err)
	}
}

// naiveAllocate is the model: the first probe that is free or holds the set.
func naiveAllocate(a *identity.Allocator, m map[identity.Identity]identity.Labels, l identity.Labels, space int) (identity.Identity, bool) {
	for i := range space {
		id := a.Probe(l, i)
		cur, ok := m[id]
		if !ok {
			m[id] = l
			return id, true
		}
		if cur.Equal(l) {
			return id, true
		}
	}
	return 0, false
}

// TestAgainstModel allocates random sequences of sets (with repeats) in small spaces and
// compares with the naive model.
func TestAgainstModel(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for round := range 200 {
		space := 1 + r.IntN(40)
		store := identitytest.NewStore()
		a := identity.NewAllocator(store, identity.AllocatorOptions{Space: space, Cluster: uint8(round), Watched: round%2 == 0})
		model := make(map[identity.Identity]identity.Labels)
		for range 60 {
			l := labelSet(t, r.IntN(50))
			want, ok := naiveAllocate(a, model, l, space)
			got, err := a.Allocate(t.Context(), l)
			if !ok {
				if !errors.Is(err, identity.ErrExhausted) {
					t.Fatalf("round %d: model exhausted, Allocate = %s, %v", round, got, err)
				}
				continue
			}
			if err != nil || got != want {
				t.Fatalf("round %d space %d: Allocate(%s) = %s, %v; model %s", round, space, l.Key(), got, err, want)
			}
		}
		if diff := cmp.Diff(model, store.Snapshot(), cmp.Comparer(identity.Labels.Equal)); diff != "" {
			t.Fatalf("round %d: store vs model (-model +store):\n%s", round, diff)
		}
	}
}

// TestConcurrentAgentsConverge: many agents (separate Allocators, separate caches, both walk
// modes) with many goroutines each allocate the same sets in different orders against one store. Every agent
// must give every set the same number, with one identity per set, consistent with probing.
func TestConcurrentAgentsConverge(t *testing.T) {
	for _, tc := range []struct {
		name         string
		space, nSets int
	}{
		{"full space", 0, 300},
		{"crowded space", 400, 300},
		{"tiny space", 40, 40},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const agents, workers = 8, 4
			store := identitytest.NewStore()
			sets := make([]identity.Labels, tc.nSets)
			for i := range sets {
				sets[i] = labelSet(t, i)
			}
			results := make([]map[string]identity.Identity, agents)
			allocs := make([]*identity.Allocator, agents)
			var wg sync.WaitGroup
			for ag := range agents {
				// Half the agents read before they create, half create straight away.
				a := identity.NewAllocator(store, identity.AllocatorOptions{Space: tc.space, Watched: ag%2 == 1})
				allocs[ag] = a
				results[ag] = make(map[string]identity.Identity)
				var mu sync.Mutex
				order := rand.New(rand.NewPCG(uint64(ag), 99)).Perm(len(sets))
				for w := range workers {
					wg.Go(func() {
						for j := w; j < len(order); j += workers {
							l := sets[order[j]]
							id, err := a.Allocate(t.Context(), l)
							if err != nil {
								t.Error(err)
								return
							}
							mu.Lock()
							results[ag][l.Key()] = id
							mu.Unlock()
						}
					})
				}
			}
			wg.Wait()
			for ag := 1; ag < agents; ag++ {
				if diff := cmp.Diff(results[0], results[ag]); diff != "" {
					t.Fatalf("agent %d disagrees with agent 0 (-0 +%d):\n%s", ag, ag, diff)
				}
			}
			if store.Len() != tc.nSets {
				t.Errorf("store has %d identities, want %d", store.Len(), tc.nSets)
			}
			if err := identitytest.CheckConsistent(allocs[0], store.Snapshot()); err != nil {
				t.Error(err)
			}
			var sum identity.AllocatorStats
			for _, a := range allocs {
				st := a.Stats()
				sum.Gets += st.Gets
				sum.Creates += st.Creates
				sum.Collisions += st.Collisions
				sum.CacheHits += st.CacheHits
			}
			t.Logf("%d agents x %d sets: %d store gets, %d creates, %d collisions, %d cache hits", agents, tc.nSets, sum.Gets, sum.Creates, sum.Collisions, sum.CacheHits)
		})
	}
}
