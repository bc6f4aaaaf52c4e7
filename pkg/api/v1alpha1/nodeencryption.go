package v1alpha1

import (
	"fmt"

	"k8s.io/apimachinery/pkg/labels"
)

// DefaultNodeEncryptionOptOut is the opt-out selector when a MeshConfig names none:
// control-plane nodes keep host traffic in clear, so no node needs a tunnel to reach the API
// server that tells it its peers' keys.
const DefaultNodeEncryptionOptOut = "node-role.kubernetes.io/control-plane"

// NodeEncryptionFor says whether a node with nodeLabels should encrypt host traffic: e asks
// for it in mode WireGuard and the labels do not match the opt-out selector. An unparsable
// selector is an error (the agents then leave host traffic as it is and report it).
func (e *EncryptionSpec) NodeEncryptionFor(nodeLabels map[string]string) (bool, error) {
	if !e.NodeEncryption || e.Mode != ModeWireGuard {
		return false, nil
	}
	sel := DefaultNodeEncryptionOptOut
	if e.NodeEncryptionOptOutLabels != nil {
		sel = *e.NodeEncryptionOptOutLabels
	}
	if sel == "" {
		return true, nil
	}
	s, err := labels.Parse(sel)
	if err != nil {
		return false, fmt.Errorf("MeshConfig nodeEncryptionOptOutLabels %q: %w", sel, err)
	}
	return !s.Matches(labels.Set(nodeLabels)), nil
}
