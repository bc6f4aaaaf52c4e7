package status

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
)

// Report is the cluster's encryption status.
type Report struct {
	// Mode is the configured encryption mode.
	Mode v1alpha1.EncryptionMode `json:"mode"`
	// Strict is the configured strict mode.
	Strict bool `json:"strict"`
	// NodeEncryption is the configured node encryption (host traffic too, mode WireGuard).
	NodeEncryption bool `json:"nodeEncryption,omitempty"`
	// Compliant is true when encryption is on and every node pair is encrypted, judged from
	// both nodes' published state.
	Compliant bool `json:"compliant"`
	// Verdict is a one-line summary; it starts with "compliant:" exactly when Compliant.
	Verdict string `json:"verdict"`
	// Scope is the node the report is limited to (see Only); empty for the whole cluster.
	Scope string `json:"scope,omitempty"`
	// Nodes is one entry per node, sorted by name.
	Nodes []Node `json:"nodes"`
	// Pairs is one entry per unordered node pair, sorted.
	Pairs []Pair `json:"pairs"`
}

// Node is one node's state as its agent published it.
type Node struct {
	// Name is the node's name.
	Name string `json:"name"`
	// Mode is the encryption mode the node's agent applied.
	Mode v1alpha1.EncryptionMode `json:"mode,omitempty"`
	// Backend is the WireGuard implementation the node runs.
	Backend v1alpha1.WireGuardBackend `json:"backend,omitempty"`
	// Fingerprint identifies the node's WireGuard public key (never the key itself).
	Fingerprint string `json:"keyFingerprint,omitempty"`
	// IPsecSPI is the keyring SPI the node encrypts with in mode IPsec.
	IPsecSPI int `json:"ipsecSPI,omitempty"`
	// IPsecAlgorithm is the algorithm of that key, e.g. rfc4106(gcm(aes)).
	IPsecAlgorithm string `json:"ipsecAlgorithm,omitempty"`
	// IPsecSPIs are the keyring SPIs the node has installed for every peer.
	IPsecSPIs []int `json:"ipsecSPIs,omitempty"`
	// IPsecStates counts the ESP states (keys) installed.
	IPsecStates int `json:"ipsecStates,omitempty"`
	// IPsecSequence is the highest outbound ESP sequence number; IPsecSequenceLimit where a
	// state stops sending.
	IPsecSequence      int64 `json:"ipsecSequence,omitempty"`
	IPsecSequenceLimit int64 `json:"ipsecSequenceLimit,omitempty"`
	// XFRMErrors are the node's non-zero XFRM error counters.
	XFRMErrors map[string]int64 `json:"xfrmErrors,omitempty"`
	// PeersReady counts the peers the node has configured with their current key.
	PeersReady int `json:"peersReady"`
	// Peers is the number of other nodes the node is paired with.
	Peers int `json:"peers"`
	// TunnelMTU is the MTU of the node's WireGuard device.
	TunnelMTU int `json:"tunnelMTU,omitempty"`
	// Ready is the node's Ready condition; false also for a node without a MeshNode.
	Ready bool `json:"ready"`
	// Message says why the node is not ready, has no MeshNode, or is not paired.
	Message string `json:"message,omitempty"`
}

// Pair is the state of the tunnel between two nodes.
type Pair struct {
	// A and B are the nodes' names, A < B.
	A string `json:"a"`
	B string `json:"b"`
	// Encrypted is true when both nodes have applied the mode and each has configured the
	// other with the key the other announces.
	Encrypted bool `json:"encrypted"`
	// Reason says why the pair is not encrypted.
	Reason string `json:"reason,omitempty"`
	// LastHandshake is the most recent handshake either side reports.
	LastHandshake *time.Time `json:"lastHandshake,omitempty"`
	// Host is the state of the traffic between the two nodes' own addresses when node
	// encryption is configured; nil otherwise.
	Host *HostPair `json:"host,omitempty"`
}

// HostPair is the state of the host traffic between two nodes (node encryption).
type HostPair struct {
	// Encrypted is true when the pod traffic between the nodes is encrypted and both
	// announce node encryption (MeshNode spec.nodeEncryption), which they do only once
	// applied: each then routes the other's addresses into the tunnel.
	Encrypted bool `json:"encrypted"`
	// OptedOut is true when a node's labels match the opt-out selector: the pair's host
	// traffic is in clear by configuration, which does not make the report non-compliant.
	OptedOut bool `json:"optedOut,omitempty"`
	// Reason says why the host traffic is not encrypted.
	Reason string `json:"reason,omitempty"`
}

// Input is what a report is computed from.
type Input struct {
	// Config is the cluster's MeshConfig; nil means there is none (mode Disabled).
	Config *v1alpha1.MeshConfig
	// MeshNodes are the states the agents published.
	MeshNodes []v1alpha1.MeshNode
	// Nodes are the names of the cluster's Kubernetes nodes. When not nil, they are the
	// nodes that are paired: a node without a MeshNode (no agent has published for it) is
	// part of every pair it makes, none of them encrypted; a MeshNode whose node is not in
	// the list (left over from a deleted node; agents refuse it as a peer) is listed but
	// paired with nothing. nil pairs the MeshNodes alone.
	Nodes []string
	// NodeLabels are the Kubernetes nodes' labels, by name, for the node encryption opt-out
	// selector. A node missing from it has no labels.
	NodeLabels map[string]map[string]string
}

// Compute builds the report from the MeshConfig (nil: mode Disabled) and the MeshNodes
// alone. It is Evaluate without the Kubernetes node list.
func Compute(cfg *v1alpha1.MeshConfig, nodes []v1alpha1.MeshNode) Report {
	return Evaluate(Input{Config: cfg, MeshNodes: nodes})
}

// Evaluate builds the report: every node's state, every pair of paired nodes judged from
// both sides, and the verdict.
func Evaluate(in Input) Report {
	r := Report{Mode: v1alpha1.ModeDisabled}
	if cfg := in.Config; cfg != nil && cfg.Spec.Encryption.Mode != "" {
		r.Mode = cfg.Spec.Encryption.Mode
		r.Strict = cfg.Spec.Encryption.Strict
		r.NodeEncryption = cfg.Spec.Encryption.NodeEncryption && r.Mode == v1alpha1.ModeWireGuard
	}
	byName := map[string]*v1alpha1.MeshNode{}
	for i := range in.MeshNodes {
		byName[in.MeshNodes[i].Name] = &in.MeshNodes[i]
	}
	paired := map[string]bool{}
	if in.Nodes == nil {
		for name := range byName {
			paired[name] = true
		}
	} else {
		for _, name := range in.Nodes {
			paired[name] = true
		}
	}
	names := slices.Sorted(maps.Keys(paired))
	for name := range byName {
		if !paired[name] {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		r.Nodes = append(r.Nodes, nodeRow(name, byName[name], paired[name], len(paired)-1))
	}
	var pairedNames []string
	for _, name := range names {
		if paired[name] {
			pairedNames = append(pairedNames, name)
		}
	}
	// Whether each node should encrypt host traffic: the opt-out selector parsed once per
	// node, not once per pair.
	hostWanted := map[string]hostWant{}
	if r.NodeEncryption {
		for _, name := range pairedNames {
			on, err := in.Config.Spec.Encryption.NodeEncryptionFor(in.NodeLabels[name])
			hostWanted[name] = hostWant{on, err}
		}
	}
	for i, a := range pairedNames {
		for _, b := range pairedNames[i+1:] {
			p := pair(r.Mode, r.Strict, a, b, byName[a], byName[b])
			if r.NodeEncryption {
				p.Host = hostPair(p, byName[a], byName[b], hostWanted)
			}
			r.Pairs = append(r.Pairs, p)
		}
	}
	r.judge(len(pairedNames))
	return r
}

// nodeRow is one row of the nodes table; mn is nil when no agent has published for the node.
func nodeRow(name string, mn *v1alpha1.MeshNode, paired bool, peers int) Node {
	n := Node{Name: name, Peers: peers}
	if mn == nil {
		n.Message = "agent missing: no MeshNode for this node"
		return n
	}
	n.Mode = mn.Status.Mode
	n.Backend = mn.Status.Backend
	n.PeersReady = int(mn.Status.PeersReady)
	n.TunnelMTU = int(mn.Status.TunnelMTU)
	if wg := mn.Spec.WireGuard; wg != nil {
		if k, err := wgtypes.ParseKey(wg.PublicKey); err == nil {
			n.Fingerprint = wireguard.Fingerprint(k)
		}
	}
	if ip := mn.Status.IPsec; ip != nil {
		n.IPsecSPI = int(ip.OutboundSPI)
		n.IPsecAlgorithm = ip.Algorithm
		n.IPsecStates = int(ip.States)
		n.IPsecSequence, n.IPsecSequenceLimit = ip.HighestSequence, ip.SequenceLimit
		n.XFRMErrors = ip.XFRMErrors
	}
	if ip := mn.Spec.IPsec; ip != nil {
		for _, s := range ip.SPIs {
			n.IPsecSPIs = append(n.IPsecSPIs, int(s))
		}
	}
	for _, c := range mn.Status.Conditions {
		if c.Type == v1alpha1.ConditionReady {
			n.Ready = c.Status == metav1.ConditionTrue
			if !n.Ready {
				n.Message = c.Message
			}
		}
	}
	if !paired {
		n.Peers = 0
		n.Message = "stale MeshNode: no Kubernetes node of this name, not paired"
	}
	return n
}

// hostWant is whether a node should encrypt host traffic (EncryptionSpec.NodeEncryptionFor).
type hostWant struct {
	on  bool
	err error
}

// hostPair judges the host traffic of a pair whose pod traffic p is judged: encrypted when p
// is and both nodes announce node encryption; in clear by configuration when a node opts out
// (wanted says which should encrypt).
func hostPair(p Pair, ma, mb *v1alpha1.MeshNode, wanted map[string]hostWant) *HostPair {
	for _, name := range []string{p.A, p.B} {
		switch w := wanted[name]; {
		case w.err != nil:
			return &HostPair{Reason: w.err.Error()}
		case !w.on:
			return &HostPair{OptedOut: true, Reason: name + " opts out (nodeEncryptionOptOutLabels)"}
		}
	}
	switch {
	case !p.Encrypted:
		return &HostPair{Reason: "pod traffic not encrypted"}
	case !ma.Spec.NodeEncryption:
		return &HostPair{Reason: p.A + " has not applied node encryption"}
	case !mb.Spec.NodeEncryption:
		return &HostPair{Reason: p.B + " has not applied node encryption"}
	}
	return &HostPair{Encrypted: true}
}

// judge sets the verdict from the pairs; nodes is the number of paired nodes.
func (r *Report) judge(nodes int) {
	modeText := string(r.Mode)
	if r.Strict {
		modeText += ", strict"
	}
	total, encrypted := len(r.Pairs), 0
	hostEncrypted, optedOut := 0, 0
	for _, p := range r.Pairs {
		if p.Encrypted {
			encrypted++
		}
		if p.Host != nil && p.Host.Encrypted {
			hostEncrypted++
		}
		if p.Host != nil && p.Host.OptedOut {
			optedOut++
		}
	}
	hostMissing := 0
	if r.NodeEncryption {
		modeText += ", node encryption"
		hostMissing = total - hostEncrypted - optedOut
	}
	pairs := fmt.Sprintf("%d node pairs", total)
	if r.Scope != "" {
		pairs += " of " + r.Scope
	}
	r.Compliant = false
	switch {
	case r.Mode == v1alpha1.ModeDisabled:
		r.Verdict = fmt.Sprintf("NOT compliant: encryption is disabled (%s in clear)", pairs)
	case !judged(r.Mode):
		r.Verdict = fmt.Sprintf("NOT compliant: cannot judge mode %q (this meshcrypt knows %s, %s and %s)", r.Mode, v1alpha1.ModeDisabled, v1alpha1.ModeWireGuard, v1alpha1.ModeIPsec)
	case total == 0 && r.Scope != "":
		r.Compliant = true
		r.Verdict = fmt.Sprintf("compliant: %s has no node pairs (%s)", r.Scope, modeText)
	case total == 0:
		r.Compliant = true
		r.Verdict = fmt.Sprintf("compliant: %s, no node pairs (%s)", count(nodes, "node"), modeText)
	case encrypted == total && hostMissing > 0:
		r.Verdict = fmt.Sprintf("NOT compliant: host traffic of %d of %s not encrypted (%s)", hostMissing, pairs, modeText)
	case encrypted == total:
		r.Compliant = true
		r.Verdict = fmt.Sprintf("compliant: all %s encrypted (%s)", pairs, modeText)
		if r.NodeEncryption {
			r.Verdict += fmt.Sprintf("; host traffic encrypted on %d, in clear by opt-out on %d", hostEncrypted, optedOut)
		}
	default:
		r.Verdict = fmt.Sprintf("NOT compliant: %d of %s not encrypted (%s)", total-encrypted, pairs, modeText)
	}
}

// count is "1 node", "3 nodes".
func count(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// judged reports whether pair knows how to judge a mode.
func judged(m v1alpha1.EncryptionMode) bool {
	return m == v1alpha1.ModeDisabled || m == v1alpha1.ModeWireGuard || m == v1alpha1.ModeIPsec
}

// Only returns the report limited to one node: that node's row, the pairs it is part of,
// and the verdict on those pairs. ok is false when the report has no node of that name.
func (r Report) Only(name string) (_ Report, ok bool) {
	out := Report{Mode: r.Mode, Strict: r.Strict, NodeEncryption: r.NodeEncryption, Scope: name}
	for _, n := range r.Nodes {
		if n.Name == name {
			out.Nodes = append(out.Nodes, n)
		}
	}
	if len(out.Nodes) == 0 {
		return Report{}, false
	}
	for _, p := range r.Pairs {
		if p.A == name || p.B == name {
			out.Pairs = append(out.Pairs, p)
		}
	}
	out.judge(len(out.Nodes))
	return out, true
}

// pair judges the tunnel between the nodes named a and b from both sides: each must have
// applied the mode (and strict mode, when configured) and send to the other with a key the
// other announces: in mode WireGuard, each has configured the other's current public key; in
// mode IPsec, each encrypts to the other (an outbound state and policy) with a keyring SPI
// the other has installed inbound. ma or mb is nil when that node has no MeshNode.
func pair(mode v1alpha1.EncryptionMode, strict bool, a, b string, ma, mb *v1alpha1.MeshNode) Pair {
	p := Pair{A: a, B: b}
	var ab, ba *v1alpha1.PeerStatus
	var okAB, okBA bool
	if ma != nil && mb != nil {
		ab, okAB = peerOf(mode, ma, mb)
		ba, okBA = peerOf(mode, mb, ma)
	}
	for _, ps := range []*v1alpha1.PeerStatus{ab, ba} {
		if ps != nil && ps.LastHandshakeTime != nil {
			t := ps.LastHandshakeTime.Time
			if p.LastHandshake == nil || t.After(*p.LastHandshake) {
				p.LastHandshake = &t
			}
		}
	}
	switch {
	case mode == v1alpha1.ModeDisabled:
		p.Reason = "encryption disabled"
	case !judged(mode):
		p.Reason = fmt.Sprintf("mode %s cannot be judged by this version", mode)
	case ma == nil:
		p.Reason = fmt.Sprintf("%s has no MeshNode (no agent)", a)
	case mb == nil:
		p.Reason = fmt.Sprintf("%s has no MeshNode (no agent)", b)
	case ma.Status.Mode != mode:
		p.Reason = fmt.Sprintf("%s has not applied %s", a, mode)
	case mb.Status.Mode != mode:
		p.Reason = fmt.Sprintf("%s has not applied %s", b, mode)
	case strict && !ma.Status.Strict:
		p.Reason = fmt.Sprintf("%s has not applied strict mode", a)
	case strict && !mb.Status.Strict:
		p.Reason = fmt.Sprintf("%s has not applied strict mode", b)
	case !okAB:
		p.Reason = notEncrypting(mode, ma, mb, ab)
	case !okBA:
		p.Reason = notEncrypting(mode, mb, ma, ba)
	default:
		p.Encrypted = true
	}
	return p
}

// peerOf finds b in a's peer list; ok when a sends to b with a key b announces (see pair).
func peerOf(mode v1alpha1.EncryptionMode, a, b *v1alpha1.MeshNode) (*v1alpha1.PeerStatus, bool) {
	for i := range a.Status.Peers {
		ps := &a.Status.Peers[i]
		if ps.Node != b.Name {
			continue
		}
		if mode == v1alpha1.ModeIPsec {
			return ps, ps.OutboundSPI > 0 && b.Spec.IPsec != nil && slices.Contains(b.Spec.IPsec.SPIs, ps.OutboundSPI)
		}
		return ps, b.Spec.WireGuard != nil && ps.PublicKey == b.Spec.WireGuard.PublicKey
	}
	return nil, false
}

// notEncrypting says why a does not send to b encrypted; ps is b in a's peer list, if there.
func notEncrypting(mode v1alpha1.EncryptionMode, a, b *v1alpha1.MeshNode, ps *v1alpha1.PeerStatus) string {
	if mode != v1alpha1.ModeIPsec {
		return fmt.Sprintf("%s has not configured %s's current key", a.Name, b.Name)
	}
	if ps == nil || ps.OutboundSPI == 0 {
		return fmt.Sprintf("%s does not encrypt to %s yet", a.Name, b.Name)
	}
	return fmt.Sprintf("%s encrypts to %s with SPI %d, which %s has not installed", a.Name, b.Name, ps.OutboundSPI, b.Name)
}

// WriteJSON writes the report as indented JSON.
func (r Report) WriteJSON(w io.Writer) error { return WriteJSON(w, r) }

// WriteYAML writes the report as YAML, with the same field names as WriteJSON.
func (r Report) WriteYAML(w io.Writer) error { return WriteYAML(w, r) }

// WriteJSON writes v as indented JSON, as every `-o json` of the CLI does.
func WriteJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// WriteYAML writes v as YAML, as every `-o yaml` of the CLI does.
func WriteYAML(w io.Writer, v any) error {
	b, err := yaml.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode YAML: %w", err)
	}
	_, err = w.Write(b)
	return err
}

// WriteTable writes the verdict line, then a table of nodes and a table of pairs. Handshake
// ages are relative to now.
func (r Report) WriteTable(w io.Writer, now time.Time) error {
	fmt.Fprintln(w, r.Verdict)
	mode := string(r.Mode)
	if r.Strict {
		mode += ", strict"
	}
	if r.NodeEncryption {
		mode += ", node encryption"
	}
	fmt.Fprintf(w, "mode: %s\n\n", mode)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tMODE\tBACKEND\tKEY\tPEERS READY\tMTU\tREADY")
	for _, n := range r.Nodes {
		ready := "yes"
		if !n.Ready {
			ready = "no"
		}
		if n.Message != "" {
			ready += ": " + n.Message
		}
		mtu := "-"
		if n.TunnelMTU > 0 {
			mtu = strconv.Itoa(n.TunnelMTU)
		}
		key := n.Fingerprint
		if n.Mode == v1alpha1.ModeIPsec && n.IPsecSPI > 0 {
			key = fmt.Sprintf("spi %d %s", n.IPsecSPI, n.IPsecAlgorithm)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d\t%s\t%s\n", n.Name, dash(string(n.Mode)), dash(string(n.Backend)), dash(strings.TrimSpace(key)), n.PeersReady, n.Peers, mtu, ready)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if err := writeIPsec(w, r.Nodes); err != nil {
		return err
	}
	if len(r.Pairs) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if r.NodeEncryption {
		fmt.Fprintln(tw, "PAIR\tENCRYPTED\tHOST TRAFFIC\tLAST HANDSHAKE\tREASON")
	} else {
		fmt.Fprintln(tw, "PAIR\tENCRYPTED\tLAST HANDSHAKE\tREASON")
	}
	for _, p := range r.Pairs {
		enc := "yes"
		if !p.Encrypted {
			enc = "NO"
		}
		hs := "never"
		if p.LastHandshake != nil {
			hs = now.Sub(*p.LastHandshake).Truncate(time.Second).String() + " ago"
		}
		if !r.NodeEncryption {
			fmt.Fprintf(tw, "%s <-> %s\t%s\t%s\t%s\n", p.A, p.B, enc, hs, dash(p.Reason))
			continue
		}
		host, reason := "encrypted", p.Reason
		if h := p.Host; h != nil && !h.Encrypted {
			host = "NO"
			if h.OptedOut {
				host = "clear (opt-out)"
			}
			reason = cmp.Or(p.Reason, h.Reason)
		}
		fmt.Fprintf(tw, "%s <-> %s\t%s\t%s\t%s\t%s\n", p.A, p.B, enc, host, hs, dash(reason))
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// writeIPsec writes the IPsec table (keys installed, sequence numbers, XFRM errors) when a
// node runs IPsec.
func writeIPsec(w io.Writer, nodes []Node) error {
	if !slices.ContainsFunc(nodes, func(n Node) bool { return n.Mode == v1alpha1.ModeIPsec }) {
		return nil
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "IPSEC NODE\tOUT SPI\tSPIS INSTALLED\tSTATES\tSEQUENCE USED\tXFRM ERRORS")
	for _, n := range nodes {
		if n.Mode != v1alpha1.ModeIPsec {
			continue
		}
		spis := make([]string, len(n.IPsecSPIs))
		for i, s := range n.IPsecSPIs {
			spis[i] = strconv.Itoa(s)
		}
		seq := "-"
		if n.IPsecSequenceLimit > 0 {
			seq = fmt.Sprintf("%d of %d (%.4f%%)", n.IPsecSequence, n.IPsecSequenceLimit, 100*float64(n.IPsecSequence)/float64(n.IPsecSequenceLimit))
		}
		var errs []string
		for name, v := range n.XFRMErrors {
			errs = append(errs, fmt.Sprintf("%s=%d", name, v))
		}
		slices.Sort(errs)
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\t%s\n", n.Name, n.IPsecSPI, dash(strings.Join(spis, ",")), n.IPsecStates, seq, dash(strings.Join(errs, " ")))
	}
	return tw.Flush()
}
