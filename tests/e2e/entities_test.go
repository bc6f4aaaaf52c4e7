package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
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
	// Two addresses outside the cluster, on the underlay switch: neither a node nor a pod.
	sw := c.Net.Switch()
	base := c.Net.Options().UnderlayV4.Addr().As4()
	extAllowed := netip.AddrFrom4([4]byte{base[0], base[1], base[2], 200})
	extExcept := netip.AddrFrom4([4]byte{base[0], base[1], base[2], 201})
	extBlock := netip.PrefixFrom(extAllowed, 29)
	if err := addExternal(sw, n1, c.Net.Options().UnderlayV4.Bits(), extAllowed, extExcept); err != nil {
		t.Fatal(err)
	}
	m := newMarker(t)
	if err := tcpRoundTrip(n1.NS, netip.Addr{}, web.NS, web.IPv4, 7200, m, 10*time.Second); err != nil {
		t.Fatalf("no policy yet: node -> web: %v", err)
	}
	for _, src := range []netip.Addr{extAllowed, extExcept} {
		if err := tcpRoundTrip(sw, src, web.NS, web.IPv4, 7200, m, 10*time.Second); err != nil {
			t.Fatalf("no policy yet: %s -> web: %v", src, err)
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

	t.Run("ipBlock with an exception, ingress", func(t *testing.T) {
		allow := &v1alpha1.MeshPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web-from-outside"},
			Spec: v1alpha1.MeshPolicySpec{
				EndpointSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
				Ingress: []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{{IPBlock: &v1alpha1.IPBlock{
					CIDR: extBlock.String(), Except: []string{netip.PrefixFrom(extExcept, 32).String()},
				}}}}},
			},
		}
		if err := c.Client.Create(ctx, allow); err != nil {
			t.Fatal(err)
		}
		eventually(t, "ipBlock: "+extAllowed.String()+" -> web allowed", func() bool {
			return tcpRoundTrip(sw, extAllowed, web.NS, web.IPv4, 7203, m, time.Second) == nil
		})
		before := reasonCount(t, c, "n1", reasonDeniedIngress)
		if err := tcpRoundTrip(sw, extExcept, web.NS, web.IPv4, 7203, m, 2*time.Second); err == nil {
			t.Errorf("%s is the block's exception, but reached web", extExcept)
		}
		if d := reasonCount(t, c, "n1", reasonDeniedIngress) - before; d == 0 {
			t.Error("the exception's packets were not counted as denied_ingress")
		}
		if err := tcpRoundTrip(sw, extAllowed, web.NS, web.IPv4, 7203, m, 2*time.Second); err != nil {
			t.Errorf("%s -> web after the exception's attempt: %v", extAllowed, err)
		}
	})

	t.Run("ipBlock with an exception, egress", func(t *testing.T) {
		// Default-deny egress on web, allowing the block: web's connections to the allowed
		// outsider go out (the response comes back in through the ingress ipBlock rule of
		// the test above); to the exception they are dropped before they leave the node.
		out := &v1alpha1.MeshPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web-to-outside"},
			Spec: v1alpha1.MeshPolicySpec{
				EndpointSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
				PolicyTypes:      []v1alpha1.PolicyType{v1alpha1.PolicyTypeEgress},
				Egress: []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{{IPBlock: &v1alpha1.IPBlock{
					CIDR: extBlock.String(), Except: []string{netip.PrefixFrom(extExcept, 32).String()},
				}}}}},
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
		if err := tcpRoundTrip(web.NS, netip.Addr{}, sw, extAllowed, 7205, m, 5*time.Second); err != nil {
			t.Errorf("web -> %s (inside the block): %v", extAllowed, err)
		}
		before := reasonCount(t, c, "n1", reasonDeniedEgress)
		if err := tcpRoundTrip(web.NS, netip.Addr{}, sw, extExcept, 7205, m, 2*time.Second); err == nil {
			t.Errorf("web -> %s (the exception) passed", extExcept)
		}
		if d := reasonCount(t, c, "n1", reasonDeniedEgress) - before; d == 0 {
			t.Error("the exception's packets were not counted as denied_egress")
		}
	})
}

// addExternal gives the underlay switch the addresses addrs (hosts outside the cluster) and a
// route to n's pod CIDRs through n.
func addExternal(sw *netenv.NS, n *cluster.Node, bits int, addrs ...netip.Addr) error {
	h, err := sw.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	br, err := h.LinkByName(netenv.BridgeName)
	if err != nil {
		return fmt.Errorf("switch bridge: %w", err)
	}
	for _, a := range addrs {
		if err := h.AddrAdd(br, &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}}); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add %s to the switch: %w", a, err)
		}
	}
	for _, p := range n.PodCIDRs {
		if !p.Addr().Is4() {
			continue
		}
		r := &netlink.Route{Dst: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}, Gw: n.UnderlayV4.AsSlice(), LinkIndex: br.Attrs().Index}
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("route %s via %s on the switch: %w", p, n.UnderlayV4, err)
		}
	}
	return nil
}
