package kube

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

// fakeClock is a settable clock for GCOptions.Now.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock { return &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// inUseSet is a mutable InUse.
type inUseSet struct {
	mu  sync.Mutex
	ids map[identity.Identity]bool
}

func newInUse(ids ...identity.Identity) *inUseSet {
	s := &inUseSet{ids: make(map[identity.Identity]bool)}
	s.Set(ids...)
	return s
}

func (s *inUseSet) Set(ids ...identity.Identity) {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.ids)
	for _, id := range ids {
		s.ids[id] = true
	}
}

func (s *inUseSet) InUse(context.Context) (map[identity.Identity]bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[identity.Identity]bool, len(s.ids))
	for id := range s.ids {
		m[id] = true
	}
	return m, nil
}

// createIDs creates identity cluster<<16|local for each local, with test sets, and returns them.
func createIDs(t *testing.T, c client.Client, cluster uint8, locals ...uint16) []identity.Identity {
	t.Helper()
	s := NewStore(c)
	var ids []identity.Identity
	for i, local := range locals {
		id := identity.New(cluster, local)
		if ok, err := s.Create(t.Context(), id, testSet("gc", int(cluster)*1000+i)); err != nil || !ok {
			t.Fatalf("create %s: %v, %v", id, ok, err)
		}
		ids = append(ids, id)
	}
	return ids
}

// mark returns id's unused-since annotation and whether the object exists.
func mark(t *testing.T, c client.Client, id identity.Identity) (string, bool) {
	t.Helper()
	var mi v1alpha1.MeshIdentity
	err := c.Get(t.Context(), client.ObjectKey{Name: id.String()}, &mi)
	if err != nil {
		if client.IgnoreNotFound(err) == nil {
			return "", false
		}
		t.Fatal(err)
	}
	return mi.Annotations[UnusedSinceAnnotation], true
}

func collect(t *testing.T, g *GC, want GCStats) {
	t.Helper()
	got, err := g.Collect(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("pass stats (-want +got):\n%s", diff)
	}
}

func TestGCDeletesUnusedAfterGrace(t *testing.T) {
	cp := controlPlane(t)
	const cluster = 20
	admin := adminClient(t, cp)
	ids := createIDs(t, admin, cluster, 300, 301)
	used, unused := ids[0], ids[1]
	clk := newClock()
	t0 := clk.Now()
	g := NewGC(GCOptions{
		Client: agentClient(t, cp, 4), InUse: newInUse(used).InUse, Cluster: cluster,
		Now: clk.Now, Logger: testLogger(t), // default grace: 10 minutes
	})

	collect(t, g, GCStats{Seen: 2, InUse: 1, Marked: 1})
	if m, ok := mark(t, admin, unused); !ok || m != t0.Format(time.RFC3339) {
		t.Fatalf("unused identity: mark %q, exists %v; want %s", m, ok, t0.Format(time.RFC3339))
	}
	if m, _ := mark(t, admin, used); m != "" {
		t.Errorf("used identity marked %q", m)
	}
	clk.Advance(DefaultGrace - time.Second)
	collect(t, g, GCStats{Seen: 2, InUse: 1, Pending: 1})
	clk.Advance(time.Second)
	collect(t, g, GCStats{Seen: 2, InUse: 1, Deleted: 1})
	if _, ok := mark(t, admin, unused); ok {
		t.Error("unused identity survived the grace period")
	}
	if m, ok := mark(t, admin, used); !ok || m != "" {
		t.Errorf("used identity: mark %q, exists %v", m, ok)
	}
}

// TestGCReuseDuringGrace: an identity used again during its grace period loses its mark, and
// its grace starts over when it is unused again.
func TestGCReuseDuringGrace(t *testing.T) {
	cp := controlPlane(t)
	const cluster = 21
	admin := adminClient(t, cp)
	x := createIDs(t, admin, cluster, 400)[0]
	clk := newClock()
	inUse := newInUse()
	g := NewGC(GCOptions{Client: agentClient(t, cp, 4), InUse: inUse.InUse, Cluster: cluster, Grace: 10 * time.Minute, Now: clk.Now})

	collect(t, g, GCStats{Seen: 1, Marked: 1})
	clk.Advance(5 * time.Minute)
	inUse.Set(x) // a pod uses it again
	collect(t, g, GCStats{Seen: 1, InUse: 1, Unmarked: 1})
	if m, _ := mark(t, admin, x); m != "" {
		t.Fatalf("re-used identity still marked %q", m)
	}
	clk.Advance(6 * time.Minute) // 11 minutes after the first mark
	inUse.Set()
	collect(t, g, GCStats{Seen: 1, Marked: 1})
	clk.Advance(9 * time.Minute)
	collect(t, g, GCStats{Seen: 1, Pending: 1})
	clk.Advance(time.Minute)
	collect(t, g, GCStats{Seen: 1, Deleted: 1})
}

// TestGCConcurrentReuseWins: while one collector's pass is about to delete an expired
// identity, another collector that sees it in use un-marks it; the delete's resourceVersion
// precondition makes the first lose. Likewise when the object is deleted and re-created under
// the same name: the UID precondition protects the new one.
func TestGCConcurrentReuseWins(t *testing.T) {
	cp := controlPlane(t)
	const cluster = 22
	admin := adminClient(t, cp)
	ids := createIDs(t, admin, cluster, 500, 501)
	x, y := ids[0], ids[1]
	clk := newClock()
	grace := time.Minute
	// other's grace is longer, so it only un-marks x.
	other := NewGC(GCOptions{Client: agentClient(t, cp, 5), InUse: newInUse(x).InUse, Cluster: cluster, Grace: time.Hour, Now: clk.Now})
	var interleave func()
	g := NewGC(GCOptions{
		Client: agentClient(t, cp, 4), Cluster: cluster, Grace: grace, Now: clk.Now,
		InUse: func(ctx context.Context) (map[identity.Identity]bool, error) {
			if interleave != nil {
				interleave() // runs after g's List, before its writes
			}
			return nil, nil
		},
	})
	collect(t, g, GCStats{Seen: 2, Marked: 2})
	clk.Advance(grace)

	interleave = func() {
		// Another agent sees x in use and un-marks it (its y is unused and marked: no write).
		if _, err := other.Collect(t.Context()); err != nil {
			t.Error(err)
		}
		// y is deleted and re-created (another set) by someone else.
		if err := admin.Delete(t.Context(), &v1alpha1.MeshIdentity{ObjectMeta: metav1.ObjectMeta{Name: y.String()}}); err != nil {
			t.Error(err)
		}
		if ok, err := NewStore(admin).Create(t.Context(), y, testSet("gc", 99999)); err != nil || !ok {
			t.Error(ok, err)
		}
	}
	collect(t, g, GCStats{Seen: 2, Conflicts: 2})
	for _, id := range []identity.Identity{x, y} {
		if _, ok := mark(t, admin, id); !ok {
			t.Errorf("%s was deleted", id)
		}
	}
	if m, _ := mark(t, admin, x); m != "" {
		t.Errorf("x still marked %q", m)
	}
	got, _, err := NewStore(admin).Get(t.Context(), y)
	if err != nil || !got.Equal(testSet("gc", 99999)) {
		t.Errorf("re-created y = %v, %v", got, err)
	}
}

// TestGCLeavesReservedAndForeign: reserved identities, other clusters' identities and objects
// whose name is no identity are never marked nor deleted.
func TestGCLeavesReservedAndForeign(t *testing.T) {
	cp := controlPlane(t)
	admin := adminClient(t, cp)
	s := NewStore(admin)
	l := testSet("gc", 0)
	keep := []identity.Identity{identity.Host, identity.RemoteNode, 255, identity.New(23, 100), identity.New(24, 300)}
	for _, id := range keep {
		if ok, err := s.Create(t.Context(), id, l); err != nil || !ok {
			t.Fatal(id, ok, err)
		}
	}
	// Passes the CRD's name rule but is no 32-bit number.
	if err := admin.Create(t.Context(), &v1alpha1.MeshIdentity{
		ObjectMeta: metav1.ObjectMeta{Name: "4294967296"},
		Spec:       v1alpha1.MeshIdentitySpec{Labels: l.Map()},
	}); err != nil {
		t.Fatal(err)
	}
	clk := newClock()
	for _, cluster := range []uint8{0, 23} {
		g := NewGC(GCOptions{Client: agentClient(t, cp, 4), InUse: newInUse().InUse, Cluster: cluster, Grace: time.Nanosecond, Now: clk.Now})
		for range 3 {
			collect(t, g, GCStats{})
			clk.Advance(time.Hour)
		}
	}
	for _, id := range keep {
		if m, ok := mark(t, admin, id); !ok || m != "" {
			t.Errorf("%s: mark %q, exists %v", id, m, ok)
		}
	}
	var mi v1alpha1.MeshIdentity
	if err := admin.Get(t.Context(), client.ObjectKey{Name: "4294967296"}, &mi); err != nil || len(mi.Annotations) != 0 {
		t.Errorf("non-identity object: %v, annotations %v", err, mi.Annotations)
	}
}

// TestGCManyCollectors: five collectors (separate clients) pass at the same moments over the
// same identities; exactly the unused ones go, each deleted once, the used ones stay unmarked.
func TestGCManyCollectors(t *testing.T) {
	cp := controlPlane(t)
	const cluster, n, collectors = 25, 150, 5
	admin := adminClient(t, cp)
	locals := make([]uint16, n)
	for i := range locals {
		locals[i] = uint16(1000 + i)
	}
	ids := createIDs(t, admin, cluster, locals...)
	var used []identity.Identity
	for i, id := range ids {
		if i%3 == 0 {
			used = append(used, id)
		}
	}
	clk := newClock()
	gcs := make([]*GC, collectors)
	for i := range gcs {
		gcs[i] = NewGC(GCOptions{Client: agentClient(t, cp, i), InUse: newInUse(used...).InUse, Cluster: cluster, Grace: time.Minute, Now: clk.Now})
	}
	pass := func() GCStats {
		var mu sync.Mutex
		var sum GCStats
		var wg sync.WaitGroup
		for _, g := range gcs {
			wg.Go(func() {
				st, err := g.Collect(t.Context())
				if err != nil {
					t.Error(err)
				}
				mu.Lock()
				defer mu.Unlock()
				sum.Marked += st.Marked
				sum.Deleted += st.Deleted
				sum.Conflicts += st.Conflicts
			})
		}
		wg.Wait()
		return sum
	}
	start := time.Now()
	st1 := pass()
	clk.Advance(time.Minute)
	st2 := pass()
	t.Logf("%d collectors, %d identities (%d used): mark pass: %d marked, %d conflicts; delete pass: %d deleted, %d conflicts; %v",
		collectors, n, len(used), st1.Marked, st1.Conflicts, st2.Deleted, st2.Conflicts, time.Since(start).Round(time.Millisecond))
	unused := n - len(used)
	if st1.Marked != unused || st2.Deleted != unused {
		t.Errorf("marked %d, deleted %d; want %d each (each exactly once)", st1.Marked, st2.Deleted, unused)
	}
	remaining := listCluster(t, admin, cluster)
	if len(remaining) != len(used) {
		t.Errorf("%d identities remain, want %d", len(remaining), len(used))
	}
	for _, id := range used {
		if m, ok := mark(t, admin, id); !ok || m != "" {
			t.Errorf("used %s: mark %q, exists %v", id, m, ok)
		}
	}
}

// TestGCRun runs the loop on the real clock with a short grace.
func TestGCRun(t *testing.T) {
	cp := controlPlane(t)
	const cluster = 26
	admin := adminClient(t, cp)
	ids := createIDs(t, admin, cluster, 600, 601)
	g := NewGC(GCOptions{
		Client: agentClient(t, cp, 4), InUse: newInUse(ids[0]).InUse, Cluster: cluster,
		Grace: time.Second, Interval: 100 * time.Millisecond, Logger: testLogger(t),
	})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- g.Run(ctx) }()
	waitFor(t, "the unused identity to go", func() bool {
		_, ok := mark(t, admin, ids[1])
		return !ok
	})
	if d := time.Since(start); d < time.Second {
		t.Errorf("deleted after %v, before the grace period", d)
	}
	t.Logf("unused identity deleted after %v (grace 1s, interval 100ms)", time.Since(start).Round(time.Millisecond))
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run = %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if _, ok := mark(t, admin, ids[0]); !ok {
		t.Error("the used identity was deleted")
	}
}

// TestGCInUseErrorWritesNothing: without a trustworthy InUse the pass stops before writing.
func TestGCInUseErrorWritesNothing(t *testing.T) {
	cp := controlPlane(t)
	const cluster = 27
	admin := adminClient(t, cp)
	x := createIDs(t, admin, cluster, 700)[0]
	boom := errors.New("pod informer not synced")
	g := NewGC(GCOptions{Client: agentClient(t, cp, 4), Cluster: cluster, Grace: time.Nanosecond,
		InUse: func(context.Context) (map[identity.Identity]bool, error) { return nil, boom }})
	if _, err := g.Collect(t.Context()); !errors.Is(err, boom) {
		t.Fatalf("Collect = %v, want %v", err, boom)
	}
	if m, ok := mark(t, admin, x); !ok || m != "" {
		t.Errorf("mark %q, exists %v", m, ok)
	}
}

// TestGCBadMark: an unparsable mark, or one too far in the future, is replaced by a fresh one.
func TestGCBadMark(t *testing.T) {
	cp := controlPlane(t)
	const cluster = 28
	admin := adminClient(t, cp)
	ids := createIDs(t, admin, cluster, 800, 801, 802)
	clk := newClock()
	for i, v := range []string{"yesterday", clk.Now().Add(time.Hour).Format(time.RFC3339), clk.Now().Add(30 * time.Second).Format(time.RFC3339)} {
		var mi v1alpha1.MeshIdentity
		if err := admin.Get(t.Context(), client.ObjectKey{Name: ids[i].String()}, &mi); err != nil {
			t.Fatal(err)
		}
		mi.Annotations = map[string]string{UnusedSinceAnnotation: v}
		if err := admin.Update(t.Context(), &mi); err != nil {
			t.Fatal(err)
		}
	}
	g := NewGC(GCOptions{Client: agentClient(t, cp, 4), InUse: newInUse().InUse, Cluster: cluster, Grace: time.Minute, Now: clk.Now})
	// Garbage and an hour ahead are re-marked now; 30 s ahead (skew within grace) is kept.
	collect(t, g, GCStats{Seen: 3, Marked: 2, Pending: 1})
	for _, id := range ids[:2] {
		if m, _ := mark(t, admin, id); m != clk.Now().Format(time.RFC3339) {
			t.Errorf("%s: mark %q, want now", id, m)
		}
	}
	clk.Advance(time.Minute)
	collect(t, g, GCStats{Seen: 3, Deleted: 2, Pending: 1})
	clk.Advance(30 * time.Second)
	collect(t, g, GCStats{Seen: 1, Deleted: 1})
}
