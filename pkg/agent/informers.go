package agent

import (
	"maps"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// slimNode is the informer transform of Nodes: it keeps only what the agent reads of a Node
// (localFromNode, the owner reference of this node's MeshNode, and the labels node
// encryption's opt-out selector matches): its name, UID, resource version and labels, its pod
// CIDRs and its InternalIP addresses. A real Node also carries annotations, managed fields,
// conditions, capacity and the list of its images, most of its size, and the agent holds
// every Node of the cluster.
//
// Anything but a *corev1.Node (a tombstone) passes unchanged, and a slim Node stays as it is,
// as an informer transform must allow. The result shares the Node's strings and pod CIDR
// slice, which nothing modifies.
func slimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil
	}
	out := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion, Labels: n.Labels},
		Spec:       corev1.NodeSpec{PodCIDR: n.Spec.PodCIDR, PodCIDRs: n.Spec.PodCIDRs},
	}
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			out.Status.Addresses = append(out.Status.Addresses, a)
		}
	}
	return out, nil
}

// nodeChanged reports whether an update of a (slim) Node changes what the agent reads of it:
// a Node update that changes only what slimNode drops (its status heartbeats, images,
// conditions) or only its resource version triggers no reconcile.
func nodeChanged(oldObj, newObj any) bool {
	o, ok1 := oldObj.(*corev1.Node)
	n, ok2 := newObj.(*corev1.Node)
	if !ok1 || !ok2 {
		return true
	}
	return o.Name != n.Name || o.UID != n.UID || !maps.Equal(o.Labels, n.Labels) || !equality.Semantic.DeepEqual(o.Spec, n.Spec) ||
		!equality.Semantic.DeepEqual(o.Status, n.Status)
}

// meshNodeChanged reports whether a MeshNode update changes what a reconcile reads of
// MeshNodes: the spec (its generation), labels, annotations, owners, deletion, and of the
// status only the mode (teardownIPsec waits for peers still in mode IPsec). A status write
// that changes nothing else, the agents' own after every reconcile above all, triggers no
// reconcile: at N nodes, every node rewriting its status on a change would otherwise make
// every agent reconcile N times.
func meshNodeChanged(oldObj, newObj any) bool {
	o, ok1 := oldObj.(*v1alpha1.MeshNode)
	n, ok2 := newObj.(*v1alpha1.MeshNode)
	if !ok1 || !ok2 {
		return true
	}
	return o.Generation != n.Generation || o.UID != n.UID || o.Status.Mode != n.Status.Mode ||
		!o.DeletionTimestamp.Equal(n.DeletionTimestamp) ||
		!maps.Equal(o.Labels, n.Labels) || !maps.Equal(o.Annotations, n.Annotations) ||
		!equality.Semantic.DeepEqual(o.OwnerReferences, n.OwnerReferences)
}

// podCIDRCache holds the pod CIDRs Kubernetes assigned to every node (spec.podCIDRs of every
// Node, what reconcile calls assigned), recomputed only for the Nodes that changed: reading
// them from a list of every Node on every reconcile copied and parsed thousands of Nodes. The
// informer stores a new object for every change of a Node and never modifies one it stored,
// so the same object is the same Node.
type podCIDRCache struct {
	from     map[string]*corev1.Node // the objects assigned was computed from
	assigned map[string][]netip.Prefix
}

// update returns the pod CIDRs assigned by nodes, the informer's objects (anything but a
// *corev1.Node is ignored); a Node with malformed pod CIDRs assigns nothing. The map returned
// is the same while no Node changed: callers must not modify it.
func (c *podCIDRCache) update(nodes []any) map[string][]netip.Prefix {
	if c.assigned != nil && len(nodes) == len(c.from) {
		same := true
		for _, o := range nodes {
			n, ok := o.(*corev1.Node)
			if !ok || c.from[n.Name] != n {
				same = false
				break
			}
		}
		if same {
			return c.assigned
		}
	}
	from := make(map[string]*corev1.Node, len(nodes))
	assigned := make(map[string][]netip.Prefix, len(nodes))
	for _, o := range nodes {
		n, ok := o.(*corev1.Node)
		if !ok {
			continue
		}
		from[n.Name] = n
		if c.from[n.Name] == n {
			if cidrs, ok := c.assigned[n.Name]; ok {
				assigned[n.Name] = cidrs
			}
			continue
		}
		ln, err := localFromNode(n, []netip.Addr{netip.IPv4Unspecified()})
		if err != nil {
			continue // a Node with malformed pod CIDRs assigns nothing
		}
		assigned[n.Name] = ln.PodCIDRs
	}
	c.from, c.assigned = from, assigned
	return assigned
}
