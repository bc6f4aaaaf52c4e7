package status

import (
	"fmt"
	"slices"
	"strings"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// NodeProgress is how far one node is in applying a mode.
type NodeProgress struct {
	Node string
	Done bool
	// Waiting says what the node still lacks.
	Waiting string
}

// Progress reports, per node, whether it has applied mode: for WireGuard, every other node
// configured with its current key; for IPsec, encrypting to every other node with an SPI
// that node has installed; for Disabled, no peers left. expected are the cluster's
// Kubernetes node names: a node whose agent has not published a MeshNode yet is not done.
// All nodes done means the cluster has converged.
func Progress(mode v1alpha1.EncryptionMode, nodes []v1alpha1.MeshNode, expected []string) []NodeProgress {
	nodes = slices.Clone(nodes)
	slices.SortFunc(nodes, func(a, b v1alpha1.MeshNode) int { return strings.Compare(a.Name, b.Name) })
	byName := map[string]*v1alpha1.MeshNode{}
	for i := range nodes {
		byName[nodes[i].Name] = &nodes[i]
	}
	out := make([]NodeProgress, 0, len(nodes))
	for i := range nodes {
		out = append(out, progress(mode, &nodes[i], nodes))
	}
	for _, name := range expected {
		if byName[name] == nil {
			out = append(out, NodeProgress{Node: name, Waiting: "agent has not published its MeshNode"})
		}
	}
	slices.SortFunc(out, func(a, b NodeProgress) int { return strings.Compare(a.Node, b.Node) })
	return out
}

func progress(mode v1alpha1.EncryptionMode, n *v1alpha1.MeshNode, all []v1alpha1.MeshNode) NodeProgress {
	p := NodeProgress{Node: n.Name}
	if n.Status.Mode != mode {
		p.Waiting = fmt.Sprintf("agent has applied %q", n.Status.Mode)
		return p
	}
	if mode != v1alpha1.ModeWireGuard && mode != v1alpha1.ModeIPsec {
		if len(n.Status.Peers) > 0 {
			p.Waiting = fmt.Sprintf("%d peers left", len(n.Status.Peers))
			return p
		}
		p.Done = true
		return p
	}
	var missing []string
	for i := range all {
		o := &all[i]
		if o.Name == n.Name || (mode == v1alpha1.ModeWireGuard && o.Spec.WireGuard == nil) || (mode == v1alpha1.ModeIPsec && o.Spec.IPsec == nil) {
			continue // a node that announces nothing for the mode cannot be a peer yet
		}
		if _, ok := peerOf(mode, n, o); !ok {
			missing = append(missing, o.Name)
		}
	}
	if len(missing) > 0 {
		p.Waiting = "peers not configured: " + strings.Join(missing, ", ")
		return p
	}
	p.Done = true
	return p
}

// HostPending says what a node that has applied enc's mode still lacks for node encryption:
// announcing it (MeshNode spec.nodeEncryption) when enc asks it of the node (not opted out),
// withdrawing it otherwise. Empty when the node is where enc wants it.
func HostPending(enc *v1alpha1.EncryptionSpec, mn *v1alpha1.MeshNode, nodeLabels map[string]string) string {
	want, err := enc.NodeEncryptionFor(nodeLabels)
	switch {
	case err != nil:
		return err.Error()
	case want && !mn.Spec.NodeEncryption:
		return "node encryption not applied yet"
	case !want && mn.Spec.NodeEncryption:
		return "node encryption still announced"
	}
	return ""
}
