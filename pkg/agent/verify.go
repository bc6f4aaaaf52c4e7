package agent

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/pkg/verify"
)

// Timing of a verification (docs/operations.md, "Verify").
const (
	// verifyWaitPeer is how long a source waits for a destination to listen, and a
	// destination for its sources' probes.
	verifyWaitPeer = 20 * time.Second
	// verifyProbeGap spaces a source's probes.
	verifyProbeGap = 20 * time.Millisecond
	// verifyEchoWait is how long a source waits for echoes after its last probe.
	verifyEchoWait = 2 * time.Second
	// verifyMaxAge: verifications older than this are not taken up (an agent restarting
	// does not replay old audit records).
	verifyMaxAge = 5 * time.Minute
	// verifyPoll is how often the parties look at the MeshVerification in the cache.
	verifyPoll = 100 * time.Millisecond
)

// verifyRole is the part a node plays in a verification's pairs.
type verifyRole string

const (
	roleSource      verifyRole = "source"
	roleDestination verifyRole = "destination"
)

// verifier keeps which verifications this agent has taken up.
type verifier struct {
	mu      sync.Mutex
	started map[string]bool // uid/role
	// recv serialises destinations: one listener on the health port at a time.
	recv sync.Mutex
}

// healthAddrs returns the node's health endpoint addresses: one per pod CIDR family.
func healthAddrs(podCIDRs []netip.Prefix) []netip.Addr {
	var out []netip.Addr
	for _, p := range podCIDRs {
		a, ok := verify.HealthAddr(p)
		if ok && !slices.ContainsFunc(out, func(b netip.Addr) bool { return b.Is4() == a.Is4() }) {
			out = append(out, a)
		}
	}
	return out
}

// onVerification takes up a MeshVerification the node is a party of, once per role.
func (a *Agent) onVerification(ctx context.Context, obj any) {
	v, ok := obj.(*v1alpha1.MeshVerification)
	if !ok || len(a.verifyAddrs(v)) == 0 || time.Since(v.CreationTimestamp.Time) > verifyMaxAge {
		return
	}
	for _, role := range []verifyRole{roleSource, roleDestination} {
		var pairs []v1alpha1.VerificationPair
		for _, p := range v.Spec.Pairs {
			if role == roleSource && p.From == a.opts.NodeName || role == roleDestination && p.To == a.opts.NodeName {
				if !verifyDone(v, p, role) {
					pairs = append(pairs, p)
				}
			}
		}
		if len(pairs) == 0 {
			continue
		}
		key := string(v.UID) + "/" + string(role)
		a.verify.mu.Lock()
		if a.verify.started == nil {
			a.verify.started = map[string]bool{}
		}
		seen := a.verify.started[key]
		a.verify.started[key] = true
		a.verify.mu.Unlock()
		if seen {
			continue
		}
		v := v.DeepCopy()
		go func() {
			log := a.log.With("verification", v.Name, "role", role, "pairs", len(pairs))
			log.Info("verification started")
			var err error
			if role == roleSource {
				err = a.verifySource(ctx, v, pairs)
			} else {
				err = a.verifyDestination(ctx, v, pairs)
			}
			if err != nil {
				log.Error("verification failed", "err", err)
				return
			}
			log.Info("verification done")
		}()
	}
}

// verifyDone reports whether the node's part of pair p is already written (an agent that
// restarted does not redo it).
func verifyDone(v *v1alpha1.MeshVerification, p v1alpha1.VerificationPair, role verifyRole) bool {
	r := findResult(v, p)
	if r == nil {
		return false
	}
	if role == roleSource {
		return r.Phase == v1alpha1.PhaseComplete
	}
	return r.Destination != nil && r.Destination.Done
}

func findResult(v *v1alpha1.MeshVerification, p v1alpha1.VerificationPair) *v1alpha1.VerificationResult {
	for i := range v.Status.Results {
		if r := &v.Status.Results[i]; r.From == p.From && r.To == p.To {
			return r
		}
	}
	return nil
}

// verifyPeer is what a party knows of the other node of a pair.
type verifyPeer struct {
	pair     v1alpha1.VerificationPair
	underlay []netip.Addr
	health   netip.Addr // the other node's health address of the pair's family
	tally    verify.Tally
}

// verifyCapture captures the node's underlay for the pairs' other nodes: packets to their
// underlay addresses (tunnels) and to their health addresses (traffic in clear).
type verifyCapture struct {
	mu     sync.Mutex
	byAddr map[netip.Addr]*verifyPeer
	ifaces []string
	c      *datapath.Capture
}

// verifySetup finds the pairs' other nodes, the WireGuard ports of the mesh and the node's
// underlay interfaces, and starts the capture.
func (a *Agent) verifySetup(ctx context.Context, v *v1alpha1.MeshVerification, pairs []v1alpha1.VerificationPair, role verifyRole) ([]*verifyPeer, *verifyCapture, error) {
	var list v1alpha1.MeshNodeList
	if err := a.cache.List(ctx, &list); err != nil {
		return nil, nil, fmt.Errorf("list MeshNodes: %w", err)
	}
	byName := map[string]*v1alpha1.MeshNode{}
	wgPorts := map[uint16]bool{uint16(a.opts.WireGuard.ListenPort): true}
	for i := range list.Items {
		mn := &list.Items[i]
		byName[mn.Name] = mn
		if mn.Spec.WireGuard != nil {
			wgPorts[uint16(mn.Spec.WireGuard.ListenPort)] = true
		}
	}
	marker := []byte(v.Spec.Marker)
	vc := &verifyCapture{byAddr: map[netip.Addr]*verifyPeer{}}
	var peers []*verifyPeer
	for _, p := range pairs {
		other := p.To
		if role == roleDestination {
			other = p.From
		}
		vp := &verifyPeer{pair: p}
		peers = append(peers, vp)
		mn := byName[other]
		if mn == nil {
			continue
		}
		for _, ip := range mn.Spec.UnderlayIPs {
			if addr, err := netip.ParseAddr(string(ip)); err == nil {
				vp.underlay = append(vp.underlay, addr)
				vc.byAddr[addr] = vp
			}
		}
		if v.Spec.Target == v1alpha1.TargetHosts {
			vp.health = pairHealth(a.underlay, mn.Spec.UnderlayIPs)
		} else {
			vp.health = pairHealth(a.health, mn.Spec.HealthIPs)
		}
		if vp.health.IsValid() { // in clear, probes and echoes go to the health address itself
			vc.byAddr[vp.health] = vp
		}
	}

	h, err := netlink.NewHandle()
	if err != nil {
		return nil, nil, fmt.Errorf("open netlink: %w", err)
	}
	defer h.Close()
	links, missing, err := underlayLinks(h, a.underlay)
	if err != nil {
		return nil, nil, err
	}
	if len(missing) > 0 {
		return nil, nil, fmt.Errorf("no interface holds underlay address %s", missing[0])
	}
	var idx []int
	for _, l := range links {
		idx = append(idx, l.Attrs().Index)
		vc.ifaces = append(vc.ifaces, l.Attrs().Name)
	}
	vc.c, err = datapath.StartCapture(idx, func(pkt []byte) {
		p := verify.Inspect(pkt, marker, wgPorts)
		vc.mu.Lock()
		defer vc.mu.Unlock()
		if vp := vc.byAddr[p.Dst]; vp != nil {
			vp.tally.Add(p)
		}
	})
	if err != nil {
		return nil, nil, err
	}
	return peers, vc, nil
}

// stop ends the capture; a capture that dropped packets proves nothing.
func (vc *verifyCapture) stop() error {
	drops, err := vc.c.Stop()
	if err == nil && drops > 0 {
		err = fmt.Errorf("the capture dropped %d packets", drops)
	}
	return err
}

func (vc *verifyCapture) result(vp *verifyPeer) *v1alpha1.CaptureResult {
	vc.mu.Lock()
	defer vc.mu.Unlock()
	return &v1alpha1.CaptureResult{Interfaces: vc.ifaces, Frames: vp.tally.Frames,
		EncryptedFrames: vp.tally.Encrypted, PlaintextFrames: vp.tally.Plaintext}
}

// pairHealth picks the health address of the other node in the family both nodes have,
// IPv4 first.
func pairHealth(mine []netip.Addr, theirs []v1alpha1.IP) netip.Addr {
	for _, m := range mine {
		for _, t := range theirs {
			if a, err := netip.ParseAddr(string(t)); err == nil && a.Is4() == m.Is4() {
				return a
			}
		}
	}
	return netip.Addr{}
}

// verifyAddrs are this node's addresses that v's probes go between: its health endpoints,
// or its underlay addresses when v proves host traffic.
func (a *Agent) verifyAddrs(v *v1alpha1.MeshVerification) []netip.Addr {
	if v.Spec.Target == v1alpha1.TargetHosts {
		return a.underlay
	}
	return a.health
}

func ownHealth(mine []netip.Addr, other netip.Addr) netip.Addr {
	for _, m := range mine {
		if m.Is4() == other.Is4() {
			return m
		}
	}
	return netip.Addr{}
}

// verifyDestination listens on the health endpoint, tells the sources (Destination set),
// echoes their probes, and reports its capture when every source has sent all its probes or
// gave up, or after verifyWaitPeer without news.
func (a *Agent) verifyDestination(ctx context.Context, v *v1alpha1.MeshVerification, pairs []v1alpha1.VerificationPair) error {
	a.verify.recv.Lock()
	defer a.verify.recv.Unlock()
	peers, vc, err := a.verifySetup(ctx, v, pairs, roleDestination)
	if err != nil {
		return err
	}
	captureStopped := false
	defer func() {
		if !captureStopped {
			_ = vc.stop()
		}
	}()
	probes := probesOf(v)
	received := map[netip.Addr]int32{}
	var mu sync.Mutex
	var conns []*net.UDPConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for _, h := range a.verifyAddrs(v) {
		c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(h, verify.Port)))
		if err != nil {
			return fmt.Errorf("listen on the health endpoint %s: %w", h, err)
		}
		conns = append(conns, c)
		go func() {
			buf := make([]byte, 512)
			for {
				n, from, err := c.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				m, err := verify.Parse(buf[:n])
				if err != nil || m.Kind != verify.Probe || m.Marker != v.Spec.Marker {
					continue
				}
				mu.Lock()
				received[from.Addr().Unmap()]++
				mu.Unlock()
				_, _ = c.WriteToUDPAddrPort(verify.Message{Kind: verify.Echo, Seq: m.Seq, Marker: m.Marker}.Encode(), from)
			}
		}()
	}
	results := func(done bool) []v1alpha1.VerificationResult {
		mu.Lock()
		defer mu.Unlock()
		var out []v1alpha1.VerificationResult
		for _, vp := range peers {
			cr := vc.result(vp)
			cr.ProbesReceived, cr.Done = received[vp.health], done
			out = append(out, v1alpha1.VerificationResult{From: vp.pair.From, To: vp.pair.To, Destination: cr})
		}
		return out
	}
	if err := a.applyVerification(ctx, v.Name, roleDestination, results(false)); err != nil {
		return err
	}

	// Wait until every source has sent all its probes or finished, or nothing new happened
	// for verifyWaitPeer. A source that has said how many it sent gets verifyEchoWait for
	// them to arrive.
	last, lastCount := time.Now(), int32(-1)
	sentSeen := map[v1alpha1.VerificationPair]time.Time{}
	tick := time.NewTicker(verifyPoll)
	defer tick.Stop()
	for {
		finished := true
		var total int32
		var cur v1alpha1.MeshVerification
		if err := a.cache.Get(ctx, client.ObjectKey{Name: v.Name}, &cur); err != nil {
			return fmt.Errorf("get MeshVerification: %w", err)
		}
		mu.Lock()
		for _, vp := range peers {
			total += received[vp.health]
			r := findResult(&cur, vp.pair)
			got := received[vp.health]
			switch {
			case got >= probes, r != nil && r.Phase == v1alpha1.PhaseComplete:
			case r != nil && r.ProbesSent > 0:
				if sentSeen[vp.pair].IsZero() {
					sentSeen[vp.pair] = time.Now()
				}
				if got < r.ProbesSent && time.Since(sentSeen[vp.pair]) < verifyEchoWait {
					finished = false
				}
			default:
				finished = false
			}
		}
		mu.Unlock()
		if total != lastCount {
			last, lastCount = time.Now(), total
		}
		if finished || time.Since(last) > verifyWaitPeer {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
	time.Sleep(200 * time.Millisecond) // the last echoes leave and are captured
	captureStopped = true
	if err := vc.stop(); err != nil {
		return err
	}
	return a.applyVerification(ctx, v.Name, roleDestination, results(true))
}

// verifySource waits for its destinations to listen, sends them probes from its health
// endpoint, counts the echoes, waits for the destinations' captures and writes each pair's
// verdict.
func (a *Agent) verifySource(ctx context.Context, v *v1alpha1.MeshVerification, pairs []v1alpha1.VerificationPair) error {
	probes := probesOf(v)
	// Wait for the destinations to listen.
	var cur v1alpha1.MeshVerification
	deadline := time.Now().Add(verifyWaitPeer)
	for {
		if err := a.cache.Get(ctx, client.ObjectKey{Name: v.Name}, &cur); err != nil {
			return fmt.Errorf("get MeshVerification: %w", err)
		}
		ready := 0
		for _, p := range pairs {
			if r := findResult(&cur, p); r != nil && r.Destination != nil {
				ready++
			}
		}
		if ready == len(pairs) || time.Now().After(deadline) {
			break
		}
		if err := sleepCtx(ctx, verifyPoll); err != nil {
			return err
		}
	}
	peers, vc, err := a.verifySetup(ctx, v, pairs, roleSource)
	if err != nil {
		return err
	}
	captureStopped := false
	defer func() {
		if !captureStopped {
			_ = vc.stop()
		}
	}()
	var self v1alpha1.MeshNode
	if err := a.cache.Get(ctx, client.ObjectKey{Name: a.opts.NodeName}, &self); err != nil {
		return fmt.Errorf("get own MeshNode: %w", err)
	}
	mode, strict := self.Status.Mode, self.Status.Strict
	started := metav1.NewMicroTime(time.Now())

	type sending struct {
		vp      *verifyPeer
		ready   bool
		failure string
		sent    int32
		echoes  int32
		conn    *net.UDPConn
	}
	var mu sync.Mutex
	var all []*sending
	defer func() {
		for _, s := range all {
			if s.conn != nil {
				s.conn.Close()
			}
		}
	}()
	for _, vp := range peers {
		s := &sending{vp: vp}
		all = append(all, s)
		r := findResult(&cur, vp.pair)
		own := ownHealth(a.verifyAddrs(v), vp.health)
		switch {
		case r == nil || r.Destination == nil:
			s.failure = fmt.Sprintf("the agent on %s did not answer within %s", vp.pair.To, verifyWaitPeer)
		case !vp.health.IsValid() || !own.IsValid():
			s.failure = fmt.Sprintf("%s and %s have no health endpoint of a common address family", vp.pair.From, vp.pair.To)
		default:
			c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(own, 0)), net.UDPAddrFromAddrPort(netip.AddrPortFrom(vp.health, verify.Port)))
			if err != nil {
				s.failure = fmt.Sprintf("open a socket on the health endpoint %s: %v", own, err)
				break
			}
			s.conn, s.ready = c, true
			go func() {
				buf := make([]byte, 512)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if m, err := verify.Parse(buf[:n]); err == nil && m.Kind == verify.Echo && m.Marker == v.Spec.Marker {
						mu.Lock()
						s.echoes++
						mu.Unlock()
					}
				}
			}()
		}
	}
	probing := func() []v1alpha1.VerificationResult {
		var out []v1alpha1.VerificationResult
		for _, s := range all {
			if s.ready {
				out = append(out, v1alpha1.VerificationResult{From: s.vp.pair.From, To: s.vp.pair.To, Phase: v1alpha1.PhaseProbing,
					Mode: mode, Cipher: a.cipher(&self), Strict: strict, StartedAt: &started})
			}
		}
		return out
	}
	if err := a.applyVerification(ctx, v.Name, roleSource, probing()); err != nil {
		return err
	}
	for i := range probes {
		for _, s := range all {
			if !s.ready {
				continue
			}
			if _, err := s.conn.Write(verify.Message{Kind: verify.Probe, Seq: int(i), Marker: v.Spec.Marker}.Encode()); err == nil {
				s.sent++
			} else if s.failure == "" {
				s.failure = fmt.Sprintf("send a probe: %v", err) // strict mode refusing is a route error
			}
		}
		if err := sleepCtx(ctx, verifyProbeGap); err != nil {
			return err
		}
	}
	sentResults := probing()
	for i := range sentResults {
		for _, s := range all {
			if s.vp.pair.From == sentResults[i].From && s.vp.pair.To == sentResults[i].To {
				sentResults[i].ProbesSent = s.sent
			}
		}
	}
	if err := a.applyVerification(ctx, v.Name, roleSource, sentResults); err != nil {
		return err
	}
	echoDeadline := time.Now().Add(verifyEchoWait)
	for time.Now().Before(echoDeadline) {
		mu.Lock()
		complete := true
		for _, s := range all {
			if s.ready && s.echoes < s.sent {
				complete = false
			}
		}
		mu.Unlock()
		if complete {
			break
		}
		if err := sleepCtx(ctx, verifyPoll); err != nil {
			return err
		}
	}
	time.Sleep(200 * time.Millisecond) // the last probes are captured
	captureStopped = true
	captureErr := vc.stop()

	// Wait for the destinations' final counts.
	deadline = time.Now().Add(verifyWaitPeer + verifyEchoWait)
	for {
		if err := a.cache.Get(ctx, client.ObjectKey{Name: v.Name}, &cur); err != nil {
			return fmt.Errorf("get MeshVerification: %w", err)
		}
		done := true
		for _, s := range all {
			if r := findResult(&cur, s.vp.pair); s.ready && (r == nil || r.Destination == nil || !r.Destination.Done) {
				done = false
			}
		}
		if done || time.Now().After(deadline) {
			break
		}
		if err := sleepCtx(ctx, verifyPoll); err != nil {
			return err
		}
	}
	completed := metav1.NewMicroTime(time.Now())
	var out []v1alpha1.VerificationResult
	mu.Lock()
	defer mu.Unlock()
	for _, s := range all {
		res := v1alpha1.VerificationResult{From: s.vp.pair.From, To: s.vp.pair.To, Phase: v1alpha1.PhaseComplete,
			Mode: mode, Cipher: a.cipher(&self), Strict: strict, StartedAt: &started, CompletedAt: &completed,
			ProbesSent: s.sent, EchoesReceived: s.echoes, Source: vc.result(s.vp)}
		o := verify.Outcome{Mode: mode, Sent: s.sent, Echoes: s.echoes, Received: -1,
			Source: verify.Tally{Frames: res.Source.Frames, Encrypted: res.Source.EncryptedFrames, Plaintext: res.Source.PlaintextFrames}}
		if r := findResult(&cur, s.vp.pair); r != nil && r.Destination != nil {
			d := r.Destination
			o.Received, o.DestinationDone = d.ProbesReceived, d.Done
			o.Destination = verify.Tally{Frames: d.Frames, Encrypted: d.EncryptedFrames, Plaintext: d.PlaintextFrames}
		}
		res.Verdict, res.Message = verify.Judge(o)
		switch {
		case res.Verdict == v1alpha1.VerdictPlaintextSeen:
		case s.failure != "":
			res.Verdict, res.Message = v1alpha1.VerdictFailed, s.failure
		case captureErr != nil:
			res.Verdict, res.Message = v1alpha1.VerdictFailed, "the source's capture failed: "+captureErr.Error()
		}
		out = append(out, res)
	}
	return a.applyVerification(ctx, v.Name, roleSource, out)
}

// probesOf is the verification's probes per pair; the API server defaults it to 10, and so
// does this for an object written without the default.
func probesOf(v *v1alpha1.MeshVerification) int32 { return cmp.Or(v.Spec.Probes, 10) }

// cipher names the cipher a node's applied mode encrypts with.
func (a *Agent) cipher(mn *v1alpha1.MeshNode) string {
	switch mn.Status.Mode {
	case v1alpha1.ModeWireGuard:
		return "ChaCha20-Poly1305"
	case v1alpha1.ModeIPsec:
		if mn.Status.IPsec != nil {
			return mn.Status.IPsec.Algorithm
		}
	}
	return "none"
}

// applyVerification writes the node's results with server-side apply, as the field manager
// of its role: each agent owns its own fields of each pair, so parties never conflict.
func (a *Agent) applyVerification(ctx context.Context, name string, role verifyRole, results []v1alpha1.VerificationResult) error {
	if len(results) == 0 {
		return nil
	}
	var items []any
	for _, r := range results {
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&r)
		if err != nil {
			return fmt.Errorf("encode verification result: %w", err)
		}
		items = append(items, m)
	}
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.GroupVersion.String(),
		"kind":       "MeshVerification",
		"metadata":   map[string]any{"name": name},
		"status":     map[string]any{"results": items},
	}}
	manager := "meshcrypt-agent/" + a.opts.NodeName + "/" + string(role)
	if len(manager) > 128 {
		sum := sha256.Sum256([]byte(manager))
		manager = "meshcrypt-agent/" + hex.EncodeToString(sum[:16]) + "/" + string(role)
	}
	err := a.client.Status().Patch(ctx, u, client.Apply, client.FieldOwner(manager), client.ForceOwnership)
	if err != nil {
		return fmt.Errorf("write MeshVerification %s status: %w", name, err)
	}
	return nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
