package agent

import (
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	toolscache "k8s.io/client-go/tools/cache"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// fullNode is a Node as a kubelet and the node controller leave it, with everything the agent
// does not read.
func fullNode() *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: "n1", UID: "uid-1", ResourceVersion: "42", Generation: 3,
			Labels:        map[string]string{"kubernetes.io/hostname": "n1"},
			Annotations:   map[string]string{"node.alpha.kubernetes.io/ttl": "0"},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubelet", Operation: metav1.ManagedFieldsOperationApply}},
		},
		Spec: corev1.NodeSpec{
			PodCIDR: "10.244.1.0/24", PodCIDRs: []string{"10.244.1.0/24", "fd44:0:0:1::/64"},
			Taints: []corev1.Taint{{Key: "k", Effect: corev1.TaintEffectNoSchedule}},
		},
		Status: corev1.NodeStatus{
			Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeHostName, Address: "n1"},
				{Type: corev1.NodeInternalIP, Address: "10.77.0.11"},
				{Type: corev1.NodeExternalIP, Address: "192.0.2.11"},
				{Type: corev1.NodeInternalIP, Address: "fd77::11"},
			},
			Capacity:   corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("2")},
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}},
			Images:     []corev1.ContainerImage{{Names: []string{"registry.example/image:1"}, SizeBytes: 1 << 20}},
		},
	}
}

func TestSlimNode(t *testing.T) {
	full := fullNode()
	got, err := slimNode(full)
	if err != nil {
		t.Fatal(err)
	}
	slim := got.(*corev1.Node)
	want := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", UID: "uid-1", ResourceVersion: "42", Labels: map[string]string{"kubernetes.io/hostname": "n1"}},
		Spec:       corev1.NodeSpec{PodCIDR: "10.244.1.0/24", PodCIDRs: []string{"10.244.1.0/24", "fd44:0:0:1::/64"}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: "10.77.0.11"},
			{Type: corev1.NodeInternalIP, Address: "fd77::11"},
		}},
	}
	if diff := cmp.Diff(want, slim); diff != "" {
		t.Errorf("slimNode (-want +got):\n%s", diff)
	}
	// What the agent derives from a Node is the same from its slim form.
	for _, override := range [][]netip.Addr{nil, {netip.IPv4Unspecified()}} {
		wantLocal, wantErr := localFromNode(fullNode(), override)
		gotLocal, gotErr := localFromNode(slim, override)
		if diff := cmp.Diff(wantLocal, gotLocal, cmpNetip); diff != "" || (wantErr == nil) != (gotErr == nil) {
			t.Errorf("localFromNode(override %v) of the slim Node (-want +got):\n%s\nerr %v, want %v", override, diff, gotErr, wantErr)
		}
	}
	// Idempotent, as informer transforms must be.
	again, err := slimNode(slim)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(slim, again); diff != "" {
		t.Errorf("slimNode of a slim Node changed it (-want +got):\n%s", diff)
	}
	// Tombstones and other types pass unchanged.
	tomb := toolscache.DeletedFinalStateUnknown{Key: "n1", Obj: slim}
	if got, err := slimNode(tomb); err != nil || got != any(tomb) {
		t.Errorf("slimNode(tombstone) = %v, %v; want it unchanged", got, err)
	}
}

func TestNodeChanged(t *testing.T) {
	slim := func(f func(*corev1.Node)) any {
		n := fullNode()
		f(n)
		out, _ := slimNode(n)
		return out
	}
	base := slim(func(*corev1.Node) {})
	tests := []struct {
		name   string
		newObj any
		want   bool
	}{
		{"resource version only", slim(func(n *corev1.Node) { n.ResourceVersion = "43" }), false},
		{"a heartbeat: conditions and images", slim(func(n *corev1.Node) {
			n.Status.Conditions[0].LastHeartbeatTime = metav1.Now()
			n.Status.Images = nil
		}), false},
		{"labels (node encryption's opt-out)", slim(func(n *corev1.Node) { n.Labels["x"] = "y" }), true},
		{"pod CIDRs", slim(func(n *corev1.Node) { n.Spec.PodCIDRs = n.Spec.PodCIDRs[:1] }), true},
		{"legacy pod CIDR", slim(func(n *corev1.Node) { n.Spec.PodCIDR = "10.244.2.0/24" }), true},
		{"internal IP", slim(func(n *corev1.Node) { n.Status.Addresses[1].Address = "10.77.0.12" }), true},
		{"external IP", slim(func(n *corev1.Node) { n.Status.Addresses[2].Address = "192.0.2.12" }), false},
		{"recreated: new UID", slim(func(n *corev1.Node) { n.UID = "uid-2" }), true},
		{"not a Node", toolscache.DeletedFinalStateUnknown{Key: "n1", Obj: base}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := nodeChanged(base, tt.newObj); got != tt.want {
				t.Errorf("nodeChanged = %t, want %t", got, tt.want)
			}
		})
	}
}

func TestMeshNodeChanged(t *testing.T) {
	mk := func(f func(*v1alpha1.MeshNode)) *v1alpha1.MeshNode {
		mn := &v1alpha1.MeshNode{
			ObjectMeta: metav1.ObjectMeta{Name: "n1", UID: "uid-1", Generation: 2, ResourceVersion: "7",
				Labels: map[string]string{"a": "b"}, Annotations: map[string]string{"c": "d"}},
			Spec: v1alpha1.MeshNodeSpec{BootID: "boot"},
			Status: v1alpha1.MeshNodeStatus{Mode: v1alpha1.ModeWireGuard, Peers: []v1alpha1.PeerStatus{
				{Node: "n2", PublicKey: "k2"},
			}},
		}
		f(mn)
		return mn
	}
	base := mk(func(*v1alpha1.MeshNode) {})
	now := metav1.Now()
	tests := []struct {
		name   string
		newObj any
		want   bool
	}{
		{"resource version only (a resync)", mk(func(mn *v1alpha1.MeshNode) { mn.ResourceVersion = "8" }), false},
		{"status peers and conditions", mk(func(mn *v1alpha1.MeshNode) {
			mn.ResourceVersion = "8"
			mn.Status.Peers = append(mn.Status.Peers, v1alpha1.PeerStatus{Node: "n3", PublicKey: "k3"})
			mn.Status.Conditions = []metav1.Condition{{Type: v1alpha1.ConditionReady, Status: metav1.ConditionTrue}}
		}), false},
		{"status mode", mk(func(mn *v1alpha1.MeshNode) { mn.Status.Mode = v1alpha1.ModeIPsec }), true},
		{"spec (a new generation)", mk(func(mn *v1alpha1.MeshNode) { mn.Generation, mn.Spec.BootID = 3, "boot2" }), true},
		{"labels", mk(func(mn *v1alpha1.MeshNode) { mn.Labels = nil }), true},
		{"annotations", mk(func(mn *v1alpha1.MeshNode) { mn.Annotations["c"] = "e" }), true},
		{"owner", mk(func(mn *v1alpha1.MeshNode) { mn.OwnerReferences = []metav1.OwnerReference{{Kind: "Node", Name: "n1"}} }), true},
		{"deletion", mk(func(mn *v1alpha1.MeshNode) { mn.DeletionTimestamp = &now }), true},
		{"recreated: new UID", mk(func(mn *v1alpha1.MeshNode) { mn.UID = "uid-2" }), true},
		{"not a MeshNode", toolscache.DeletedFinalStateUnknown{Key: "n1", Obj: base}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := meshNodeChanged(base, tt.newObj); got != tt.want {
				t.Errorf("meshNodeChanged = %t, want %t", got, tt.want)
			}
		})
	}
}

func TestPodCIDRCache(t *testing.T) {
	node := func(name string, cidrs ...string) *corev1.Node {
		return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}}
	}
	p := netip.MustParsePrefix
	n1, n2, bad := node("n1", "10.244.1.0/24", "fd44:0:0:1::/64"), node("n2", "10.244.2.7/24"), node("bad", "10.244.300.0/24")
	var c podCIDRCache
	got := c.update([]any{n1, n2, bad, "not a node"})
	want := map[string][]netip.Prefix{"n1": {p("10.244.1.0/24"), p("fd44:0:0:1::/64")}, "n2": {p("10.244.2.0/24")}}
	if d := cmp.Diff(want, got, cmpNetip); d != "" {
		t.Fatalf("first (-want +got):\n%s", d)
	}
	// The same objects: the same map, not rebuilt.
	first := got
	if again := c.update([]any{bad, n2, n1}); !sameMap(first, again) {
		t.Error("unchanged Nodes rebuilt the map")
	}
	// A Node replaced by the informer (changed), one gone, one new.
	n2b := node("n2", "10.244.22.0/24")
	n3 := node("n3", "10.244.3.0/24")
	got = c.update([]any{n2b, n3})
	want = map[string][]netip.Prefix{"n2": {p("10.244.22.0/24")}, "n3": {p("10.244.3.0/24")}}
	if d := cmp.Diff(want, got, cmpNetip); d != "" {
		t.Errorf("after changes (-want +got):\n%s", d)
	}
	if d := cmp.Diff(map[string][]netip.Prefix{"n1": {p("10.244.1.0/24"), p("fd44:0:0:1::/64")}, "n2": {p("10.244.2.0/24")}}, first, cmpNetip); d != "" {
		t.Errorf("an earlier result changed (-want +got):\n%s", d)
	}
	if got := c.update(nil); len(got) != 0 {
		t.Errorf("no Nodes: %v", got)
	}
}

// sameMap reports whether a and b are the same map object.
func sameMap(a, b map[string][]netip.Prefix) bool {
	if len(a) != len(b) {
		return false
	}
	a["\x00probe"] = nil
	_, same := b["\x00probe"]
	delete(a, "\x00probe")
	return same
}
