package kube

import (
	"context"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
	"github.com/meshcrypt/meshcrypt/pkg/identity/identitytest"
)

func TestFromObject(t *testing.T) {
	l := testSet("c9", 1)
	tests := []struct {
		name    string
		obj     *v1alpha1.MeshIdentity
		wantID  identity.Identity
		wantErr bool
	}{
		{"round trip", Object(identity.New(9, 300), l), identity.New(9, 300), false},
		{"reserved", &v1alpha1.MeshIdentity{ObjectMeta: metav1.ObjectMeta{Name: "1"}}, identity.Host, false},
		{"leading zero", &v1alpha1.MeshIdentity{ObjectMeta: metav1.ObjectMeta{Name: "0300"}}, 0, true},
		{"too large", &v1alpha1.MeshIdentity{ObjectMeta: metav1.ObjectMeta{Name: "4294967296"}}, 0, true},
		{"not a number", &v1alpha1.MeshIdentity{ObjectMeta: metav1.ObjectMeta{Name: "web"}}, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, got, err := FromObject(tt.obj)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if err == nil && (id != tt.wantID || !got.Equal(identity.FromMap(tt.obj.Spec.Labels))) {
				t.Errorf("FromObject = %s %v", id, got)
			}
		})
	}
	if obj := Object(identity.New(9, 300), l); obj.Name != "590124" || !cmp.Equal(obj.Spec.Labels, l.Map()) {
		t.Errorf("Object = %+v", obj)
	}
}

// TestStore runs the Store against the API server as an agent user with only the RBAC verbs
// doc.go lists.
func TestStore(t *testing.T) {
	cp := controlPlane(t)
	ctx := t.Context()
	const cluster = 10
	s := NewStore(agentClient(t, cp, 0))
	other := NewStore(agentClient(t, cp, 1))
	x, y := testSet("c10", 1), testSet("c10", 2)
	id := identity.New(cluster, 1000)

	if _, ok, err := s.Get(ctx, id); ok || err != nil {
		t.Fatalf("Get before Create = %v, %v", ok, err)
	}
	for i, st := range []*Store{s, other, s} {
		ok, err := st.Create(ctx, id, x)
		if err != nil || !ok {
			t.Fatalf("Create #%d of the same set = %v, %v; want true", i, ok, err)
		}
	}
	if ok, err := other.Create(ctx, id, y); err != nil || ok {
		t.Fatalf("Create of another set = %v, %v; want false", ok, err)
	}
	got, ok, err := other.Get(ctx, id)
	if err != nil || !ok || !got.Equal(x) {
		t.Fatalf("Get = %v, %v, %v; want %v", got, ok, err, x)
	}
	// Immutable: the CRD refuses a change of labels.
	var mi v1alpha1.MeshIdentity
	admin := adminClient(t, cp)
	if err := admin.Get(ctx, client.ObjectKey{Name: id.String()}, &mi); err != nil {
		t.Fatal(err)
	}
	mi.Spec.Labels = y.Map()
	if err := admin.Update(ctx, &mi); !apierrors.IsInvalid(err) {
		t.Errorf("changing an identity's labels: err = %v, want Invalid", err)
	}
	// A server-side error is an error, not "taken".
	big := make(map[string]string)
	for i := range 70 {
		big[string(rune('a'+i%26))+string(rune('a'+i/26))] = "v"
	}
	if _, err := s.Create(ctx, identity.New(cluster, 1001), identity.FromMap(big)); !apierrors.IsInvalid(err) {
		t.Errorf("Create of 70 labels: err = %v, want Invalid (maxProperties)", err)
	}
}

// TestStoreListPages lists more identities than a page holds.
func TestStoreListPages(t *testing.T) {
	cp := controlPlane(t)
	ctx := t.Context()
	const cluster = 11
	old := listPage
	listPage = 7
	t.Cleanup(func() { listPage = old })
	s := NewStore(agentClient(t, cp, 0))
	want := make(map[identity.Identity]identity.Labels)
	for i := range 30 {
		id, l := identity.New(cluster, uint16(2000+i)), testSet("c11", i)
		if ok, err := s.Create(ctx, id, l); err != nil || !ok {
			t.Fatal(ok, err)
		}
		want[id] = l
	}
	got := listCluster(t, adminClient(t, cp), cluster)
	if diff := cmp.Diff(want, got, cmp.Comparer(identity.Labels.Equal)); diff != "" {
		t.Errorf("List (-want +got):\n%s", diff)
	}
}

// TestEventHandler: an allocator fed by an informer learns identities other agents create and
// forgets deleted ones, with no call of its own.
func TestEventHandler(t *testing.T) {
	cp := controlPlane(t)
	ctx := t.Context()
	const cluster = 12
	cfg := cp.RESTConfigFor(cp.Token(agentUsers[2]))
	ic, err := cache.New(cfg, cache.Options{Scheme: newScheme()})
	if err != nil {
		t.Fatal(err)
	}
	watcher := identity.NewAllocator(identitytest.NewStore(), identity.AllocatorOptions{Cluster: cluster})
	inf, err := ic.GetInformer(ctx, &v1alpha1.MeshIdentity{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := inf.AddEventHandler(EventHandler(watcher, testLogger(t))); err != nil {
		t.Fatal(err)
	}
	go func() { _ = ic.Start(ctx) }()
	if !ic.WaitForCacheSync(ctx) {
		t.Fatal("informer did not sync")
	}
	creator := identity.NewAllocator(NewStore(agentClient(t, cp, 3)), identity.AllocatorOptions{Cluster: cluster})
	l := testSet("c12", 0)
	id, err := creator.Allocate(ctx, l)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the watcher to observe the identity", func() bool {
		got, ok := watcher.Lookup(l)
		return ok && got == id
	})
	if err := adminClient(t, cp).Delete(ctx, Object(id, l)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the watcher to forget the identity", func() bool {
		_, ok := watcher.Lookup(l)
		return !ok
	})
	// Tombstones are unwrapped.
	watcher.Observe(id, l)
	EventHandler(watcher, nil).OnDelete(toolscache.DeletedFinalStateUnknown{Key: id.String(), Obj: Object(id, l)})
	if _, ok := watcher.Lookup(l); ok {
		t.Error("a tombstone did not forget the identity")
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	err := wait.PollUntilContextTimeout(t.Context(), 20*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		return cond(), nil
	})
	if err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}
