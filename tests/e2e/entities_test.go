package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// Reasons of the classifier's metrics map (docs/datapath.md).
const (
	reasonDeniedEgress  = 1
	reasonDeniedIngress = 2
)

// tcpRoundTrip opens a TCP connection from the namespace from (bound to src when it is valid)
// to dst:port, where a one-connection server in the namespace to answers: it sends payload,
// reads the server's echo and checks it. Everything ends within timeout. A request and its
// response: the policy must let both directions through, which is why the tests below put
// default-deny only on the side they test.
func tcpRoundTrip(from *netenv.NS, src netip.Addr, to *netenv.NS, dst netip.Addr, port int, payload []byte, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	addr := net.JoinHostPort(dst.String(), strconv.Itoa(port))
	ln, err := to.ListenTCP(addr)
	if err != nil {
		return fmt.Errorf("listen %s in %s: %w", addr, to.Name, err)
	}
	defer ln.Close()
	_ = ln.SetDeadline(time.Now().Add(timeout))
	served := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(timeout))
		buf := make([]byte, len(payload))
		if _, err := io.ReadFull(c, buf); err != nil {
			served <- err
			return
		}
		_, err = c.Write(buf)
		served <- err
	}()
	var conn net.Conn
	err = from.Do(func() error {
		d := net.Dialer{}
		if src.IsValid() {
			d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
		}
		var err error
		conn, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	if err != nil {
		return fmt.Errorf("connect to %s: %w", addr, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if _, err := conn.Write(payload); err != nil {
		return fmt.Errorf("send to %s: %w", addr, err)
	}
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(conn, got); err != nil {
		return fmt.Errorf("response from %s: %w", addr, err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("response from %s: %q, want %q", addr, got, payload)
	}
	return <-served
}

// setHostToLocalPods sets MeshConfig spec.policy.allowHostToLocalPods.
func setHostToLocalPods(t *testing.T, c *cluster.Cluster, allow bool) {
	t.Helper()
	ctx := context.Background()
	var mc v1alpha1.MeshConfig
	if err := c.Client.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); err != nil {
		t.Fatal(err)
	}
	patch := client.MergeFrom(mc.DeepCopy())
	mc.Spec.Policy.AllowHostToLocalPods = &allow
	if err := c.Client.Patch(ctx, &mc, patch); err != nil {
		t.Fatal(err)
	}
}

// TestPolicyEntities: a kubelet-style probe (TCP request and response from the node's own
// namespace) reaches a pod under default-deny ingress while MeshConfig's host switch is on,
// and is dropped (counted as denied_ingress) while it is off; ipBlock peers allow an address
// outside the cluster and deny its exception, in both directions.
func TestPolicyEntities(t *testing.T) {
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend)})
	ctx := context.Background()
	n1, err := c.AddNode(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	web, err := c.AddPodLabels(ctx, n1, "web", map[string]string{"app": "web"})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetMode(ctx, v1alpha1.ModeDisabled); err != nil {
		t.Fatal(err)
	}
	// Per address family, two hosts outside the cluster on the underlay switch (neither a
	// node nor a pod): one inside an ipBlock, one its exception.
	sw := c.Net.Switch()
	fams := []outsiders{newOutsiders(c.Net.Options().UnderlayV4, web.IPv4)}
	if web.IPv6.IsValid() && c.Net.Options().UnderlayV6.IsValid() {
		fams = append(fams, newOutsiders(c.Net.Options().UnderlayV6, web.IPv6))
	}
	if err := addExternal(sw, n1, fams); err != nil {
		t.Fatal(err)
	}
	extAllowed := fams[0].allowed
	for _, f := range fams {
		t.Logf("outsiders: %s inside ipBlock %s, %s its exception", f.allowed, f.block, f.except)
	}
	m := newMarker(t)
	if err := tcpRoundTrip(n1.NS, netip.Addr{}, web.NS, web.IPv4, 7200, m, 10*time.Second); err != nil {
		t.Fatalf("no policy yet: node -> web: %v", err)
	}
	for _, f := range fams {
		for _, src := range []netip.Addr{f.allowed, f.except} {
			if err := tcpRoundTrip(sw, src, web.NS, f.pod, 7200, m, 10*time.Second); err != nil {
				t.Fatalf("no policy yet: %s -> web: %v", src, err)
			}
		}
	}

	deny := &v1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web-deny-ingress"},
		Spec: v1alpha1.MeshPolicySpec{
			EndpointSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			PolicyTypes:      []v1alpha1.PolicyType{v1alpha1.PolicyTypeIngress},
		},
	}
	if err := c.Client.Create(ctx, deny); err != nil {
		t.Fatal(err)
	}
	// The policy is in force once the outsider is refused.
	eventually(t, "default-deny ingress on web: outsider refused", func() bool {
		return tcpRoundTrip(sw, extAllowed, web.NS, web.IPv4, 7200, m, time.Second) != nil
	})

	t.Run("kubelet-style probe from the node", func(t *testing.T) {
		// The probes: from the address the kernel picks (the pod route's host veth holds the
		// CNI gateway address), from that gateway address and from the underlay address
		// explicitly, and over IPv6.
		type probe struct{ src, dst netip.Addr }
		probes := []probe{{netip.Addr{}, web.IPv4}, {netenv.PodGatewayV4, web.IPv4}, {n1.UnderlayV4, web.IPv4}}
		if web.IPv6.IsValid() {
			probes = append(probes, probe{netip.Addr{}, web.IPv6})
		}
		run := func(p probe) error {
			return tcpRoundTrip(n1.NS, p.src, web.NS, p.dst, 7201, m, 2*time.Second)
		}
		for _, p := range probes {
			if err := run(p); err != nil {
				t.Errorf("switch on (the default): node (source %v) -> web %s: %v", p.src, p.dst, err)
			}
		}
		setHostToLocalPods(t, c, false)
		before := reasonCount(t, c, "n1", reasonDeniedIngress)
		eventually(t, "switch off: the probe is dropped", func() bool { return run(probes[0]) != nil })
		for _, p := range probes {
			if err := run(p); err == nil {
				t.Errorf("switch off: node (source %v) -> web %s passed", p.src, p.dst)
			}
		}
		if d := reasonCount(t, c, "n1", reasonDeniedIngress) - before; d < uint64(len(probes)) {
			t.Errorf("switch off: %d packets counted as denied_ingress, want the probes' (>= %d)", d, len(probes))
		} else {
			t.Logf("switch off: %d probe packets counted as denied_ingress on n1", d)
		}
		// A rule naming the entity host lets the probes in with the switch off.
		hostRule := &v1alpha1.MeshPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web-probes"},
			Spec: v1alpha1.MeshPolicySpec{
				EndpointSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
				Ingress: []v1alpha1.PolicyRule{{
					Peers: []v1alpha1.PolicyPeer{{Entities: []v1alpha1.Entity{v1alpha1.EntityHost}}},
					Ports: []v1alpha1.PolicyPort{{Protocol: v1alpha1.ProtocolTCP, Port: ptr(int32(7201))}},
				}},
			},
		}
		if err := c.Client.Create(ctx, hostRule); err != nil {
			t.Fatal(err)
		}
		eventually(t, "entity host allowed on 7201: the probe passes", func() bool { return run(probes[0]) == nil })
		for _, p := range probes {
			if err := run(p); err != nil {
				t.Errorf("entity host rule: node (source %v) -> web %s: %v", p.src, p.dst, err)
			}
		}
		if err := tcpRoundTrip(n1.NS, netip.Addr{}, web.NS, web.IPv4, 7202, m, 2*time.Second); err == nil {
			t.Error("entity host rule names 7201, but node -> web:7202 passed")
		}
		if err := c.Client.Delete(ctx, hostRule); err != nil {
			t.Fatal(err)
		}
		eventually(t, "rule removed, switch still off: the probe is dropped", func() bool { return run(probes[0]) != nil })
		setHostToLocalPods(t, c, true)
		eventually(t, "switch on again: the probe passes", func() bool { return run(probes[0]) == nil })
	})

	// blocks are the ipBlock peers of the outsiders, IPv4 and IPv6.
	var blocks []v1alpha1.PolicyPeer
	for _, f := range fams {
		blocks = append(blocks, v1alpha1.PolicyPeer{IPBlock: &v1alpha1.IPBlock{
			CIDR: f.block.String(), Except: []string{netip.PrefixFrom(f.except, f.except.BitLen()).String()},
		}})
	}

	t.Run("ipBlock with an exception, ingress", func(t *testing.T) {
		allow := &v1alpha1.MeshPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web-from-outside"},
			Spec: v1alpha1.MeshPolicySpec{
				EndpointSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
				Ingress:          []v1alpha1.PolicyRule{{Peers: blocks}},
			},
		}
		if err := c.Client.Create(ctx, allow); err != nil {
			t.Fatal(err)
		}
		eventually(t, "ipBlock: "+extAllowed.String()+" -> web allowed", func() bool {
			return tcpRoundTrip(sw, extAllowed, web.NS, web.IPv4, 7203, m, time.Second) == nil
		})
		for _, f := range fams {
			before := reasonCount(t, c, "n1", reasonDeniedIngress)
			if err := tcpRoundTrip(sw, f.except, web.NS, f.pod, 7203, m, 2*time.Second); err == nil {
				t.Errorf("%s is the block's exception, but reached web", f.except)
			}
			if d := reasonCount(t, c, "n1", reasonDeniedIngress) - before; d == 0 {
				t.Errorf("%s: the exception's packets were not counted as denied_ingress", f.except)
			}
			if err := tcpRoundTrip(sw, f.allowed, web.NS, f.pod, 7203, m, 2*time.Second); err != nil {
				t.Errorf("%s -> web (inside the block): %v", f.allowed, err)
			}
		}
	})

	t.Run("ipBlock with an exception, egress", func(t *testing.T) {
		// Default-deny egress on web, allowing the blocks: web's connections to the allowed
		// outsiders go out (the responses come back in through the ingress ipBlock rule of
		// the test above); to the exceptions they are dropped before they leave the node.
		out := &v1alpha1.MeshPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web-to-outside"},
			Spec: v1alpha1.MeshPolicySpec{
				EndpointSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
				PolicyTypes:      []v1alpha1.PolicyType{v1alpha1.PolicyTypeEgress},
				Egress:           []v1alpha1.PolicyRule{{Peers: blocks}},
			},
		}
		if err := c.Client.Create(ctx, out); err != nil {
			t.Fatal(err)
		}
		// In force once web can no longer reach the node's own address (egress to host is
		// not allowed).
		eventually(t, "default-deny egress on web", func() bool {
			return tcpRoundTrip(web.NS, netip.Addr{}, n1.NS, n1.UnderlayV4, 7204, m, time.Second) != nil
		})
		for _, f := range fams {
			if err := tcpRoundTrip(web.NS, netip.Addr{}, sw, f.allowed, 7205, m, 5*time.Second); err != nil {
				t.Errorf("web -> %s (inside the block): %v", f.allowed, err)
			}
			before := reasonCount(t, c, "n1", reasonDeniedEgress)
			if err := tcpRoundTrip(web.NS, netip.Addr{}, sw, f.except, 7205, m, 2*time.Second); err == nil {
				t.Errorf("web -> %s (the exception) passed", f.except)
			}
			if d := reasonCount(t, c, "n1", reasonDeniedEgress) - before; d == 0 {
				t.Errorf("web -> %s: the exception's packets were not counted as denied_egress", f.except)
			}
		}
	})
}

// outsiders are two hosts outside the cluster in one address family, on the underlay
// subnet: allowed lies in block, except is block's exception; pod is web's address of the
// family.
type outsiders struct {
	subnet          netip.Prefix
	allowed, except netip.Addr
	block           netip.Prefix
	pod             netip.Addr
}

// newOutsiders picks hosts 0xc8 and 0xc9 of the underlay subnet (no node uses them) and the
// /29 or /125 block around them.
func newOutsiders(subnet netip.Prefix, pod netip.Addr) outsiders {
	a := subnet.Addr().AsSlice()
	a[len(a)-1] = 0xc8
	allowed, _ := netip.AddrFromSlice(a)
	a[len(a)-1] = 0xc9
	except, _ := netip.AddrFromSlice(a)
	block, _ := allowed.Prefix(allowed.BitLen() - 3)
	return outsiders{subnet: subnet, allowed: allowed, except: except, block: block, pod: pod}
}

// addExternal puts the outsiders' addresses on the underlay switch's bridge and routes n's
// pod CIDRs through n there.
func addExternal(sw *netenv.NS, n *cluster.Node, fams []outsiders) error {
	h, err := sw.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	br, err := h.LinkByName(netenv.BridgeName)
	if err != nil {
		return fmt.Errorf("switch bridge: %w", err)
	}
	ipnet := func(p netip.Prefix) *net.IPNet {
		return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	}
	for _, f := range fams {
		if f.allowed.Is6() {
			// The switch's bridge has IPv6 off (it only switches); the outsiders need it.
			err := sw.Do(func() error {
				return os.WriteFile("/proc/sys/net/ipv6/conf/"+netenv.BridgeName+"/disable_ipv6", []byte("0"), 0o644)
			})
			if err != nil {
				return fmt.Errorf("enable IPv6 on the switch's bridge: %w", err)
			}
		}
		for _, a := range []netip.Addr{f.allowed, f.except} {
			addr := &netlink.Addr{IPNet: ipnet(netip.PrefixFrom(a, f.subnet.Bits())), Flags: unix.IFA_F_NODAD}
			if err := h.AddrAdd(br, addr); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("add %s to the switch: %w", a, err)
			}
		}
		gw := n.UnderlayV4
		if f.allowed.Is6() {
			gw = n.UnderlayV6
		}
		for _, p := range n.PodCIDRs {
			if p.Addr().Is4() != f.allowed.Is4() {
				continue
			}
			r := &netlink.Route{Dst: ipnet(p), Gw: gw.AsSlice(), LinkIndex: br.Attrs().Index}
			if err := h.RouteReplace(r); err != nil {
				return fmt.Errorf("route %s via %s on the switch: %w", p, gw, err)
			}
		}
	}
	return nil
}

// TestPolicyBlockStrict: an ipBlock inside a remote node's pod CIDR keeps that CIDR's
// cross-node flags in the ipcache, so strict mode still applies to it: to a node whose tunnel
// is not ready, traffic the block allows is dropped as not encryptable (drop_not_encrypted),
// never sent in clear, and never passed to the routes as if it were outside the cluster.
func TestPolicyBlockStrict(t *testing.T) {
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend)})
	ctx := context.Background()
	n1, err := c.AddNode(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.AddNode(ctx, "n2"); err != nil {
		t.Fatal(err)
	}
	p1, err := c.AddPodLabels(ctx, n1, "p1", map[string]string{"app": "client"})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := c.Run(ctx, "meshcrypt", "encryption", "enable", "--mode", "wireguard", "--strict", "--wait", "--timeout", "1m"); err != nil {
		t.Fatal(err, out)
	}
	// n3 joins without an agent: no tunnel to it, ever, in this test.
	n3, err := c.AddNodeWithoutAgent(ctx, "n3")
	if err != nil {
		t.Fatal(err)
	}
	var cidr netip.Prefix
	for _, p := range n3.PodCIDRs {
		if p.Addr().Is4() {
			cidr = p
		}
	}
	// An address of n3's pod CIDR that no pod holds, and a block around it inside the CIDR.
	a := cidr.Addr().As4()
	a[3] = 99
	dst := netip.AddrFrom4(a)
	block, _ := dst.Prefix(cidr.Bits() + 1)
	m := newMarker(t)
	send := func() {
		conn, err := p1.NS.DialUDP(net.JoinHostPort(dst.String(), "7320"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		for range 5 {
			_, _ = conn.Write(m)
		}
	}
	// Egress default-deny on p1: first without the block (a positive control: denied by
	// policy), then with it.
	pol := &v1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "client-out"},
		Spec: v1alpha1.MeshPolicySpec{
			EndpointSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
			PolicyTypes:      []v1alpha1.PolicyType{v1alpha1.PolicyTypeEgress},
		},
	}
	if err := c.Client.Create(ctx, pol); err != nil {
		t.Fatal(err)
	}
	eventually(t, "default-deny egress: denied_egress counted", func() bool {
		before := reasonCount(t, c, "n1", reasonDeniedEgress)
		send()
		return reasonCount(t, c, "n1", reasonDeniedEgress) > before
	})
	patch := client.MergeFrom(pol.DeepCopy())
	pol.Spec.Egress = []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{{IPBlock: &v1alpha1.IPBlock{CIDR: block.String()}}}}}
	if err := c.Client.Patch(ctx, pol, patch); err != nil {
		t.Fatal(err)
	}
	cp := capture(t, c, m)
	const dropNotEncrypted = 3
	eventually(t, "ipBlock "+block.String()+" inside n3's pod CIDR allowed: dropped as not encryptable", func() bool {
		before := reasonCount(t, c, "n1", dropNotEncrypted)
		send()
		return reasonCount(t, c, "n1", dropNotEncrypted) >= before+5
	})
	before := reasonCount(t, c, "n1", reasonDeniedEgress)
	send()
	if d := reasonCount(t, c, "n1", reasonDeniedEgress) - before; d != 0 {
		t.Errorf("%d packets to %s denied by policy, want them allowed by the block", d, dst)
	}
	if got := cp.Count(m); got != 0 {
		t.Errorf("traffic to n3's pod CIDR left in clear %d times", got)
	}
}
