package agent

import (
	"cmp"
	"context"
	"crypto/fips140"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
)

// DefaultRotationGracePeriod is how long a node keeps a previous keyring SPI's states after
// every node switched to the next one, unless MeshConfig says otherwise.
const DefaultRotationGracePeriod = time.Minute

// logSPI is the log attribute of a keyring SPI.
const logSPI = "spi"

// refusal is why the agent does not apply the configured mode on this node. While refused,
// pod traffic to remote nodes is dropped (strict classifier, blackhole routes), never sent in
// clear.
type refusal struct {
	Reason  string // a condition reason, CamelCase
	Message string
}

func (r *refusal) Error() string { return r.Message }

// ipsecState is the node's IPsec state kept between reconciles.
type ipsecState struct {
	x         *ipsec.XFRM
	supported bool          // the ESP probe succeeded once (failures are retried)
	keyring   ipsec.Keyring // the last valid keyring; Len() 0 when none yet
	badKeys   string        // why the Secret's current content is not used ("" if it is)
	installed []uint8       // keyring SPIs whose states every known peer has (published)
	applied   bool          // installed comes from an Apply of this process
	nodeID    uint16
	outbound  uint8
	since     time.Time // when outbound took its value
	retireAt  time.Time // a kick is scheduled then to drop retired keys
	active    bool      // owned states or policies may be in the kernel
	remotes   []ipsec.Node
	skipped   []ipsec.Skipped
	ready     map[string]bool
}

// fipsMode reports whether the node runs in FIPS mode: the kernel's flag (at
// Options.FIPSPath) or a Go runtime restricted to FIPS 140-3 approved algorithms.
func (a *Agent) fipsMode() bool {
	return ipsec.FIPSEnabled(a.opts.FIPSPath) || fips140.Enabled()
}

// ipsecKeyring returns the keyring to use: the Secret's, when it parses (and, in FIPS mode,
// holds only approved keys); otherwise the last valid one, with the problem recorded in
// badKeys. With no valid keyring ever seen it returns a refusal.
func (a *Agent) ipsecKeyring(ctx context.Context) (ipsec.Keyring, error) {
	var sec corev1.Secret
	err := a.cache.Get(ctx, client.ObjectKey{Namespace: a.opts.Namespace, Name: ipsec.SecretName}, &sec)
	var problem string
	switch {
	case apierrors.IsNotFound(err):
		problem = fmt.Sprintf("keyring Secret %s/%s not found", a.opts.Namespace, ipsec.SecretName)
	case err != nil:
		return ipsec.Keyring{}, fmt.Errorf("get keyring Secret: %w", err)
	default:
		kr, perr := ipsec.ParseKeyring(sec.Data[ipsec.SecretKey])
		if perr == nil && a.fipsMode() {
			perr = ipsec.CheckFIPS(kr)
		}
		if perr == nil {
			if !kr.Equal(a.ips.keyring) {
				a.log.Info("IPsec keyring loaded", "spis", fmt.Sprint(kr.SPIs()))
			}
			a.ips.keyring, a.ips.badKeys = kr, ""
			return kr, nil
		}
		problem = fmt.Sprintf("keyring Secret %s/%s key %q: %s", a.opts.Namespace, ipsec.SecretName, ipsec.SecretKey,
			strings.ReplaceAll(perr.Error(), "\n", "; "))
	}
	if problem != a.ips.badKeys {
		a.log.Warn("IPsec keyring refused", "reason", problem, "keeping", fmt.Sprint(a.ips.keyring.SPIs()))
	}
	a.ips.badKeys = problem
	if a.ips.keyring.Len() > 0 {
		return a.ips.keyring, nil // keep using the last valid keys; Degraded says why
	}
	return ipsec.Keyring{}, &refusal{Reason: "KeyringInvalid", Message: problem + "; IPsec not applied, pod traffic to remote nodes is dropped"}
}

// ipsecNodeID picks this node's IPsec node ID: the one it already has unless an older
// MeshNode (earlier creation, or the same and a smaller name) holds it too; else the first
// free ID from a hash of the node name. Every agent applies the same rule, so a collision
// between two joining nodes resolves with the newer one moving.
func ipsecNodeID(self string, created time.Time, current int32, nodes []v1alpha1.MeshNode) uint16 {
	type holder struct {
		name    string
		created time.Time
	}
	taken := map[uint16][]holder{}
	for i := range nodes {
		mn := &nodes[i]
		if mn.Name == self || mn.Spec.IPsec == nil || mn.Spec.IPsec.NodeID < 1 || mn.Spec.IPsec.NodeID > 65535 {
			continue
		}
		id := uint16(mn.Spec.IPsec.NodeID)
		taken[id] = append(taken[id], holder{mn.Name, mn.CreationTimestamp.Time})
	}
	older := func(h holder) bool {
		if created.IsZero() { // not created yet: everyone else is older
			return true
		}
		if !h.created.Equal(created) {
			return h.created.Before(created)
		}
		return h.name < self
	}
	if current >= 1 && current <= 65535 && !slices.ContainsFunc(taken[uint16(current)], older) {
		return uint16(current)
	}
	h := fnv.New32a()
	h.Write([]byte(self))
	start := h.Sum32() % 65535
	for i := range uint32(65535) {
		id := uint16((start+i)%65535 + 1)
		if len(taken[id]) == 0 {
			return id
		}
	}
	return uint16(start + 1) // 65535 nodes: cannot happen
}

// reportedSPIs returns the keyring SPIs a MeshNode reports installed.
func reportedSPIs(mn *v1alpha1.MeshNode) []uint8 {
	if mn.Spec.IPsec == nil {
		return nil
	}
	var out []uint8
	for _, s := range mn.Spec.IPsec.SPIs {
		if s >= ipsec.MinSPI && s <= ipsec.MaxSPI {
			out = append(out, uint8(s))
		}
	}
	return out
}

// ipsecRemotes turns the remote MeshNodes that take part in IPsec (they publish a node ID)
// into ipsec.Nodes. Pod CIDRs come from the Kubernetes Nodes (assigned), never from the
// MeshNode; a MeshNode without a Kubernetes Node is left out. A remote that does not report
// the outbound SPI installed is inbound only (its states and in policies are planned, local
// pods' traffic to it is not encrypted yet); with inboundOnly every remote is (encryption
// being turned off: peers may still send ESP).
func ipsecRemotes(self string, underlay netip.Addr, nodes []v1alpha1.MeshNode, assigned map[string][]netip.Prefix, outbound uint8, inboundOnly bool) []ipsec.Node {
	var out []ipsec.Node
	for i := range nodes {
		mn := &nodes[i]
		if mn.Name == self || mn.Spec.IPsec == nil || assigned[mn.Name] == nil {
			continue
		}
		r := ipsec.Node{Name: mn.Name, BootID: mn.Spec.BootID, PodCIDRs: assigned[mn.Name]}
		if id := mn.Spec.IPsec.NodeID; id >= 1 && id <= 65535 {
			r.ID = uint16(id)
		}
		for _, s := range mn.Spec.UnderlayIPs {
			if ip, err := netip.ParseAddr(string(s)); err == nil && ip.Unmap().Is4() == underlay.Is4() {
				r.Underlay = ip.Unmap()
				break
			}
		}
		r.InboundOnly = inboundOnly || !slices.Contains(reportedSPIs(mn), outbound)
		out = append(out, r)
	}
	return out
}

// chooseOutbound picks the keyring SPI to encrypt with: the highest one that this node has
// installed and every other IPsec node reports, so no receiver lacks its states; else the
// current outbound SPI while it is still in the keyring; else the keyring's current key (a
// first start: peers stay inbound only until they report it).
func chooseOutbound(kr ipsec.Keyring, installed []uint8, current uint8, self string, nodes []v1alpha1.MeshNode) uint8 {
	spis := kr.SPIs()
	for i := len(spis) - 1; i >= 0; i-- {
		s := spis[i]
		ok := slices.Contains(installed, s)
		for j := range nodes {
			if !ok {
				break
			}
			mn := &nodes[j]
			if mn.Name != self && mn.Spec.IPsec != nil {
				ok = slices.Contains(reportedSPIs(mn), s)
			}
		}
		if ok {
			return s
		}
	}
	if _, ok := kr.Key(current); ok {
		return current
	}
	k, _ := kr.Current()
	return k.SPI()
}

// retireKeys drops from kr the keys older than the outbound SPI once the grace period since
// the outbound switch has passed. It also returns when that happens (zero: nothing to
// retire, or done).
func retireKeys(kr ipsec.Keyring, outbound uint8, since time.Time, grace time.Duration, now time.Time) (ipsec.Keyring, time.Time) {
	var old []uint8
	for _, s := range kr.SPIs() {
		if s < outbound {
			old = append(old, s)
		}
	}
	if len(old) == 0 {
		return kr, time.Time{}
	}
	at := since.Add(grace)
	if now.Before(at) {
		return kr, at
	}
	for _, s := range old {
		kr = kr.Remove(s)
	}
	return kr, time.Time{}
}

// ipsecInput is what one IPsec reconcile works from.
type ipsecInput struct {
	local    localNode
	nodes    []v1alpha1.MeshNode
	assigned map[string][]netip.Prefix
	plan     *policyPlan
	strict   bool
	grace    time.Duration
}

// reconcileIPsec applies mode IPsec: keyring, outbound SPI, XFRM states and policies, routes
// and the classifier's tunnel-ready flags, in an order that never lets traffic that must be
// encrypted out in clear. A refusal (no ESP in the kernel, no valid keyring) is returned as
// a *refusal before anything changed.
func (a *Agent) reconcileIPsec(ctx context.Context, in ipsecInput) error {
	kr, err := a.ipsecKeyring(ctx)
	if err != nil {
		return err
	}
	if !a.ips.supported {
		if err := ipsec.Supported(a.nl); err != nil {
			if errors.Is(err, ipsec.ErrNotSupported) {
				return &refusal{Reason: "IPsecNotSupported", Message: "the kernel cannot do IPsec (" + err.Error() +
					"): needs CONFIG_INET_ESP/CONFIG_INET6_ESP and AES-GCM; pod traffic to remote nodes is dropped, never sent in clear"}
			}
			return fmt.Errorf("probe IPsec support: %w", err)
		}
		a.ips.supported = true
	}
	if a.ips.nodeID == 0 {
		return errors.New("no IPsec node ID yet") // publishSpec picks it; not reached
	}
	underlay := in.local.Underlay[0]
	outbound := chooseOutbound(kr, a.ips.installed, a.ips.outbound, a.opts.NodeName, in.nodes)
	now := time.Now()
	if outbound != a.ips.outbound {
		if a.ips.outbound != 0 {
			a.log.Info("IPsec outbound key switched", logSPI, outbound, "from", a.ips.outbound)
			a.recorder.Eventf(a.meshNodeRef(), corev1.EventTypeNormal, "IPsecKeySwitched", "node %s encrypts with keyring SPI %d (was %d)", a.opts.NodeName, outbound, a.ips.outbound)
		}
		a.ips.outbound, a.ips.since = outbound, now
	}
	planKR, retireAt := retireKeys(kr, outbound, a.ips.since, in.grace, now)
	if !retireAt.IsZero() && !retireAt.Equal(a.ips.retireAt) {
		a.ips.retireAt = retireAt
		time.AfterFunc(time.Until(retireAt)+10*time.Millisecond, a.kick)
	}
	remotes := ipsecRemotes(a.opts.NodeName, underlay, in.nodes, in.assigned, outbound, false)
	local := ipsec.Node{Name: a.opts.NodeName, ID: a.ips.nodeID, BootID: a.bootID, Underlay: underlay, PodCIDRs: in.local.PodCIDRs}
	d, err := ipsec.Plan(local, remotes, planKR, ipsec.PlanOptions{OutboundSPI: outbound, AcceptPlaintext: !in.strict})
	if err != nil {
		return err
	}
	ready := ipsecReady(remotes, d.Skipped)

	// Tunnels stay ready through the change only if their out policy is already there.
	have, err := a.ips.x.OutboundTunnels(ctx)
	if err != nil {
		return err
	}
	still := map[string]bool{}
	for _, r := range remotes {
		if ready[r.Name] && have[r.Underlay] {
			still[r.Name] = true
		}
	}
	if err := a.applyPolicy(ctx, in.plan, in.nodes, still); err != nil {
		return err
	}
	// WireGuard off (routes first, then peers), and strict mode's blackholes in front of
	// every remote pod CIDR not ready before and after.
	route := a.routeConfig()
	if in.strict {
		route.Blocked = blockedExcept(a.opts.NodeName, in.assigned, still)
	}
	if _, err := a.applyRoutes(ctx, route); err != nil {
		return fmt.Errorf("configure strict routes: %w", err)
	}
	if err := a.removeWireGuardPeers(ctx); err != nil {
		return err
	}
	a.ips.active = true
	if _, err := a.ips.x.Apply(ctx, d); err != nil {
		return err
	}
	a.ips.installed, a.ips.applied = planKR.SPIs(), true
	a.ips.remotes, a.ips.skipped, a.ips.ready = remotes, d.Skipped, ready
	if in.strict {
		route.Blocked = blockedExcept(a.opts.NodeName, in.assigned, ready)
		if _, err := a.applyRoutes(ctx, route); err != nil {
			return fmt.Errorf("configure strict routes: %w", err)
		}
	}
	if err := a.applyPolicy(ctx, in.plan, in.nodes, ready); err != nil {
		return err
	}
	return nil
}

// ipsecReady is the set of remotes local pods' traffic is encrypted to: planned with an out
// policy.
func ipsecReady(remotes []ipsec.Node, skipped []ipsec.Skipped) map[string]bool {
	out := map[string]bool{}
	for _, r := range remotes {
		if !r.InboundOnly {
			out[r.Name] = true
		}
	}
	for _, s := range skipped {
		delete(out, s.Node)
	}
	return out
}

// blockedExcept lists the pod CIDRs of every remote node not in ready.
func blockedExcept(self string, assigned map[string][]netip.Prefix, ready map[string]bool) []netip.Prefix {
	var out []netip.Prefix
	for node, cidrs := range assigned {
		if node != self && !ready[node] {
			out = append(out, cidrs...)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
	return out
}

// teardownIPsec removes the node's IPsec states and policies once it left mode IPsec. While
// a peer still reports mode IPsec it may still send ESP, so the states stay, inbound only,
// with plaintext accepted; then everything goes.
func (a *Agent) teardownIPsec(ctx context.Context, local localNode, nodes []v1alpha1.MeshNode, assigned map[string][]netip.Prefix) error {
	if !a.ips.active {
		return nil
	}
	peerStill := false
	for i := range nodes {
		if nodes[i].Name != a.opts.NodeName && nodes[i].Status.Mode == v1alpha1.ModeIPsec {
			peerStill = true
		}
	}
	if peerStill && a.ips.keyring.Len() > 0 && a.ips.nodeID != 0 {
		underlay := local.Underlay[0]
		remotes := ipsecRemotes(a.opts.NodeName, underlay, nodes, assigned, a.ips.outbound, true)
		l := ipsec.Node{Name: a.opts.NodeName, ID: a.ips.nodeID, BootID: a.bootID, Underlay: underlay, PodCIDRs: local.PodCIDRs}
		d, err := ipsec.Plan(l, remotes, a.ips.keyring, ipsec.PlanOptions{OutboundSPI: a.ips.outbound, AcceptPlaintext: true})
		if err == nil {
			_, err = a.ips.x.Apply(ctx, d)
			a.ips.ready = nil
			return err
		}
		a.log.Warn("IPsec inbound-only plan failed; removing every state", "err", err)
	}
	if _, err := a.ips.x.Apply(ctx, ipsec.Desired{}); err != nil {
		return fmt.Errorf("remove IPsec states and policies: %w", err)
	}
	a.log.Info("IPsec states and policies removed")
	a.kick() // publish the spec without IPsec
	a.ips.active, a.ips.installed, a.ips.applied, a.ips.ready, a.ips.remotes, a.ips.skipped = false, nil, false, nil, nil, nil
	return nil
}

// ipsecSpec is the spec.ipsec this node publishes: its node ID and installed SPIs while it
// takes part in IPsec, else nil.
func (a *Agent) ipsecSpec(participating bool) *v1alpha1.IPsecSpec {
	if !participating && !a.ips.active {
		return nil
	}
	s := &v1alpha1.IPsecSpec{NodeID: int32(a.ips.nodeID)}
	for _, spi := range a.ips.installed {
		s.SPIs = append(s.SPIs, int32(spi))
	}
	return s
}

// ipsecStatus reads the kernel's view of the node's ESP states for MeshNode status: the
// peers encrypted to, the outbound SPI and algorithm, the states, the highest outbound
// sequence number and the non-zero XFRM error counters.
func (a *Agent) ipsecStatus(ctx context.Context) (*v1alpha1.IPsecStatus, []v1alpha1.PeerStatus, error) {
	sas, err := a.ips.x.Status(ctx)
	if err != nil {
		return nil, nil, err
	}
	st := &v1alpha1.IPsecStatus{OutboundSPI: int32(a.ips.outbound), SequenceLimit: int64(ipsec.SeqLimit), States: int32(len(sas))}
	if k, ok := a.ips.keyring.Key(a.ips.outbound); ok {
		st.Algorithm = k.Algorithm().String()
	}
	for _, s := range sas {
		if s.Dir == ipsec.DirOut && int64(s.OutSeq) > st.HighestSequence {
			st.HighestSequence = int64(s.OutSeq)
		}
	}
	if stat, err := ipsec.ReadXfrmStat(""); err == nil {
		for name, v := range stat {
			if v > 0 {
				if st.XFRMErrors == nil {
					st.XFRMErrors = map[string]int64{}
				}
				st.XFRMErrors[name] = int64(min(v, 1<<62))
			}
		}
	}
	var peers []v1alpha1.PeerStatus
	for _, r := range a.ips.remotes {
		if a.ips.ready[r.Name] {
			peers = append(peers, v1alpha1.PeerStatus{Node: r.Name, Endpoint: r.Underlay.String(), OutboundSPI: int32(a.ips.outbound)})
		}
	}
	return st, peers, nil
}

// routeConfig is the node's tunnel routing without any tunnel routes.
func (a *Agent) routeConfig() datapath.RouteConfig {
	return datapath.RouteConfig{Device: a.dev.Name(), Table: a.opts.RouteTable, RulePriority: a.opts.RulePriority, FirewallMark: a.firewallMark()}
}

// firewallMark is the mark of the WireGuard device's own packets (Options.FirewallMark).
func (a *Agent) firewallMark() uint32 {
	return cmp.Or(a.opts.FirewallMark, datapath.DefaultFirewallMark)
}
