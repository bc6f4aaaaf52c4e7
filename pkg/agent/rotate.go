package agent

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
)

// rotationDue says whether node self's WireGuard key, created at created, must be replaced
// under kr at now, and why: a request naming the node (or every node) made after the key was
// created, or the key older than kr.Every.
func rotationDue(self string, created time.Time, kr *v1alpha1.KeyRotationSpec, now time.Time) (bool, string) {
	if kr == nil {
		return false, ""
	}
	for _, r := range kr.Requests {
		if (r.Node == self || r.Node == v1alpha1.AllNodes) && r.RequestedAt.After(created) {
			by := r.RequestedBy
			if by == "" {
				by = "an operator"
			}
			return true, fmt.Sprintf("requested by %s at %s", by, r.RequestedAt.UTC().Format(time.RFC3339))
		}
	}
	if kr.Every != nil && kr.Every.Duration > 0 && now.Sub(created) >= kr.Every.Duration {
		return true, fmt.Sprintf("key older than %s (keyRotation.every)", kr.Every.Duration)
	}
	return false, ""
}

// rotateIfDue replaces the node's WireGuard key when rotationDue says so. The new key is on
// the disk before it is used, and in the device before the MeshNode announces it; peers pick it
// up at once (they prompt a handshake, see rotatedPeers).
func (a *Agent) rotateIfDue(ctx context.Context, kr *v1alpha1.KeyRotationSpec) error {
	due, why := rotationDue(a.opts.NodeName, a.keyCreated, kr, time.Now())
	if !due {
		a.scheduleRotation(kr)
		return nil
	}
	old := a.key.PublicKey()
	path := filepath.Join(a.opts.StateDir, KeyFileName)
	key, err := wireguard.RotateKey(path)
	if err != nil {
		return fmt.Errorf("rotate WireGuard key: %w", err)
	}
	created, err := wireguard.KeyCreated(path)
	if err != nil {
		return err
	}
	a.key, a.keyCreated = key, created
	// The device takes the key before the MeshNode announces it: a peer that learns the new
	// public key first would start a handshake the device cannot answer yet, and WireGuard
	// retries only after 5 s.
	if _, err := a.applyDevice(ctx, wireguard.Config{PrivateKey: key, ListenPort: a.opts.WireGuard.ListenPort, Peers: a.peers}); err != nil {
		return fmt.Errorf("give the WireGuard device its new key: %w", err)
	}
	a.rec.KeyRotated()
	a.log.Info("WireGuard key rotated", "reason", why, "old", wireguard.Fingerprint(old), "new", wireguard.Fingerprint(key.PublicKey()))
	a.recorder.Eventf(a.meshNodeRef(), corev1.EventTypeNormal, "KeyRotated", "node %s rotated its WireGuard key (%s): %s -> %s",
		a.opts.NodeName, why, wireguard.Fingerprint(old), wireguard.Fingerprint(key.PublicKey()))
	a.scheduleRotation(kr)
	return nil
}

// scheduleRotation arranges a reconcile when the key reaches kr.Every.
func (a *Agent) scheduleRotation(kr *v1alpha1.KeyRotationSpec) {
	if kr == nil || kr.Every == nil || kr.Every.Duration <= 0 {
		return
	}
	at := a.keyCreated.Add(kr.Every.Duration)
	if at.Equal(a.rotateAt) {
		return
	}
	a.rotateAt = at
	time.AfterFunc(time.Until(at)+10*time.Millisecond, a.kick)
}

// rotatedPeers returns the keys of desired peers whose node was configured before with
// another key (it rotated), added to pending (not yet applied). Those get a prompted
// handshake, as after a reboot: the rotated node's new sessions start at once instead of
// when a timer fires.
func rotatedPeers(before, desired []wireguard.Peer, pending map[wgtypes.Key]bool) map[wgtypes.Key]bool {
	old := make(map[string]wgtypes.Key, len(before))
	for _, p := range before {
		old[p.Name] = p.PublicKey
	}
	out := pending
	for _, p := range desired {
		if k, ok := old[p.Name]; ok && k != p.PublicKey {
			if out == nil {
				out = map[wgtypes.Key]bool{}
			}
			out[p.PublicKey] = true
		}
	}
	return out
}
