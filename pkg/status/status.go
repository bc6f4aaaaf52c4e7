package status

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
)

// Report is the cluster's encryption status.
type Report struct {
	// Mode is the configured encryption mode.
	Mode v1alpha1.EncryptionMode `json:"mode"`
	// Strict is the configured strict mode.
	Strict bool `json:"strict"`
	// Compliant is true when encryption is on and every node pair is encrypted.
	Compliant bool `json:"compliant"`
	// Verdict is a one-line summary.
	Verdict string `json:"verdict"`
	// Nodes is one entry per MeshNode, sorted by name.
	Nodes []Node `json:"nodes"`
	// Pairs is one entry per unordered node pair, sorted.
	Pairs []Pair `json:"pairs"`
}

// Node is one node's state as its agent published it.
type Node struct {
	Name        string                    `json:"name"`
	Mode        v1alpha1.EncryptionMode   `json:"mode,omitempty"`
	Backend     v1alpha1.WireGuardBackend `json:"backend,omitempty"`
	Fingerprint string                    `json:"keyFingerprint,omitempty"`
	PeersReady  int                       `json:"peersReady"`
	Peers       int                       `json:"peers"`
	TunnelMTU   int                       `json:"tunnelMTU,omitempty"`
	Ready       bool                      `json:"ready"`
	Message     string                    `json:"message,omitempty"`
}

// Pair is the state of the tunnel between two nodes.
type Pair struct {
	A         string `json:"a"`
	B         string `json:"b"`
	Encrypted bool   `json:"encrypted"`
	// Reason says why the pair is not encrypted.
	Reason string `json:"reason,omitempty"`
	// LastHandshake is the most recent handshake either side reports.
	LastHandshake *time.Time `json:"lastHandshake,omitempty"`
}

// Compute builds the report. cfg may be nil (no MeshConfig: mode Disabled).
func Compute(cfg *v1alpha1.MeshConfig, nodes []v1alpha1.MeshNode) Report {
	r := Report{Mode: v1alpha1.ModeDisabled}
	if cfg != nil && cfg.Spec.Encryption.Mode != "" {
		r.Mode = cfg.Spec.Encryption.Mode
		r.Strict = cfg.Spec.Encryption.Strict
	}
	modeText := string(r.Mode)
	if r.Strict {
		modeText += ", strict"
	}
	nodes = slices.Clone(nodes)
	slices.SortFunc(nodes, func(a, b v1alpha1.MeshNode) int { return strings.Compare(a.Name, b.Name) })
	for i := range nodes {
		mn := &nodes[i]
		n := Node{
			Name:       mn.Name,
			Mode:       mn.Status.Mode,
			Backend:    mn.Status.Backend,
			PeersReady: int(mn.Status.PeersReady),
			Peers:      len(nodes) - 1,
			TunnelMTU:  int(mn.Status.TunnelMTU),
		}
		if wg := mn.Spec.WireGuard; wg != nil {
			if k, err := wgtypes.ParseKey(wg.PublicKey); err == nil {
				n.Fingerprint = wireguard.Fingerprint(k)
			}
		}
		for _, c := range mn.Status.Conditions {
			if c.Type == v1alpha1.ConditionReady {
				n.Ready = c.Status == "True"
				if !n.Ready {
					n.Message = c.Message
				}
			}
		}
		r.Nodes = append(r.Nodes, n)
	}
	encrypted := 0
	for i := range nodes {
		for j := i + 1; j < len(nodes); j++ {
			p := pair(r.Mode, r.Strict, &nodes[i], &nodes[j])
			if p.Encrypted {
				encrypted++
			}
			r.Pairs = append(r.Pairs, p)
		}
	}
	total := len(r.Pairs)
	switch {
	case r.Mode == v1alpha1.ModeDisabled:
		r.Verdict = fmt.Sprintf("not compliant: encryption is disabled (%d node pairs in clear)", total)
	case len(nodes) < 2:
		r.Compliant = true
		r.Verdict = fmt.Sprintf("compliant: %d node, no node pairs (%s)", len(nodes), modeText)
	case encrypted == total:
		r.Compliant = true
		r.Verdict = fmt.Sprintf("compliant: all %d node pairs encrypted (%s)", total, modeText)
	default:
		r.Verdict = fmt.Sprintf("not compliant: %d of %d node pairs encrypted (%s)", encrypted, total, modeText)
	}
	return r
}

// pair judges the tunnel between a and b from both sides: each must have applied the mode
// and configured the other with the key the other currently announces.
func pair(mode v1alpha1.EncryptionMode, strict bool, a, b *v1alpha1.MeshNode) Pair {
	p := Pair{A: a.Name, B: b.Name}
	ab, okAB := peerOf(a, b)
	ba, okBA := peerOf(b, a)
	for _, ps := range []*v1alpha1.PeerStatus{ab, ba} {
		if ps != nil && ps.LastHandshakeTime != nil {
			t := ps.LastHandshakeTime.Time
			if p.LastHandshake == nil || t.After(*p.LastHandshake) {
				p.LastHandshake = &t
			}
		}
	}
	switch {
	case mode != v1alpha1.ModeWireGuard:
		p.Reason = "encryption disabled"
	case a.Status.Mode != mode:
		p.Reason = fmt.Sprintf("%s has not applied %s", a.Name, mode)
	case strict && !a.Status.Strict:
		p.Reason = fmt.Sprintf("%s has not applied strict mode", a.Name)
	case strict && !b.Status.Strict:
		p.Reason = fmt.Sprintf("%s has not applied strict mode", b.Name)
	case b.Status.Mode != mode:
		p.Reason = fmt.Sprintf("%s has not applied %s", b.Name, mode)
	case !okAB:
		p.Reason = fmt.Sprintf("%s has not configured %s's current key", a.Name, b.Name)
	case !okBA:
		p.Reason = fmt.Sprintf("%s has not configured %s's current key", b.Name, a.Name)
	default:
		p.Encrypted = true
	}
	return p
}

// peerOf finds b in a's peer list; ok when it is configured with b's announced key.
func peerOf(a, b *v1alpha1.MeshNode) (*v1alpha1.PeerStatus, bool) {
	for i := range a.Status.Peers {
		ps := &a.Status.Peers[i]
		if ps.Node == b.Name {
			return ps, b.Spec.WireGuard != nil && ps.PublicKey == b.Spec.WireGuard.PublicKey
		}
	}
	return nil, false
}

// WriteJSON writes the report as indented JSON.
func (r Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes the verdict line, then a table of nodes and a table of pairs. Handshake
// ages are relative to now.
func (r Report) WriteTable(w io.Writer, now time.Time) error {
	fmt.Fprintln(w, r.Verdict)
	if r.Strict {
		fmt.Fprintf(w, "mode: %s, strict\n\n", r.Mode)
	} else {
		fmt.Fprintf(w, "mode: %s\n\n", r.Mode)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tMODE\tBACKEND\tKEY\tPEERS READY\tMTU\tREADY")
	for _, n := range r.Nodes {
		ready := "yes"
		if !n.Ready {
			ready = "no"
			if n.Message != "" {
				ready += ": " + n.Message
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d\t%d\t%s\n", n.Name, dash(string(n.Mode)), dash(string(n.Backend)), dash(n.Fingerprint), n.PeersReady, n.Peers, n.TunnelMTU, ready)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(r.Pairs) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PAIR\tENCRYPTED\tLAST HANDSHAKE\tREASON")
	for _, p := range r.Pairs {
		enc := "yes"
		if !p.Encrypted {
			enc = "NO"
		}
		hs := "never"
		if p.LastHandshake != nil {
			hs = now.Sub(*p.LastHandshake).Truncate(time.Second).String() + " ago"
		}
		fmt.Fprintf(tw, "%s <-> %s\t%s\t%s\t%s\n", p.A, p.B, enc, hs, dash(p.Reason))
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
