//go:build linux

package wireguard_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/meshcrypt/meshcrypt/internal/testutil"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces, veth pairs and WireGuard devices")
	}
}

// uniqueID returns a short random hex string for namespace and interface
// names: UAPI sockets are global to the host, so concurrent test runs must
// not share interface names.
func uniqueID(t testing.TB) string {
	t.Helper()
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// testNS is a named network namespace owned by one test.
type testNS struct {
	name, path string
	nl         *netlink.Handle
}

// newNS creates a named network namespace with loopback up; it is deleted
// when the test ends.
func newNS(t testing.TB, name string) *testNS {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		ns, err := netns.NewNamed(name)
		if err == nil {
			ns.Close()
		}
		if serr := netns.Set(orig); serr != nil {
			errc <- errors.Join(err, serr) // the thread stays locked and dies
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	n := &testNS{name: name, path: "/run/netns/" + name}
	h, err := netns.GetFromPath(n.path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if n.nl, err = netlink.NewHandleAt(h); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.nl.Close)
	lo, err := n.nl.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.nl.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	return n
}

// do runs fn on an OS thread inside the namespace: sockets fn creates
// belong to it.
func (n *testNS) do(t testing.TB, fn func()) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		target, err := netns.GetFromPath(n.path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer target.Close()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		fn()
		if err := netns.Set(orig); err != nil {
			errc <- err
			return
		}
		runtime.UnlockOSThread()
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Fatalf("enter netns %s: %v", n.name, err)
	}
}

// snmp6 returns the namespace's IPv6 counters.
func (n *testNS) snmp6(t testing.TB) map[string]int64 {
	t.Helper()
	var data []byte
	var err error
	n.do(t, func() { data, err = os.ReadFile("/proc/thread-self/net/snmp6") })
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for line := range strings.Lines(string(data)) {
		if f := strings.Fields(line); len(f) == 2 {
			out[f[0]], _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	return out
}

func addAddr(t testing.TB, h *netlink.Handle, link netlink.Link, pfx string) {
	t.Helper()
	p := netip.MustParsePrefix(pfx)
	a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := h.AddrAdd(link, a); err != nil {
		t.Fatalf("add %s to %s: %v", pfx, link.Attrs().Name, err)
	}
}

// node is one test node: a namespace with an underlay veth and a WireGuard
// device.
type node struct {
	ns       *testNS
	wgName   string
	under    netip.Addr // underlay IPv6 address: the worst-case overhead
	wg4, wg6 netip.Addr
	port     int
	key      wgtypes.Key
	logPath  string
}

// newNodePair returns two nodes whose namespaces are joined by a veth with
// MTU 1500.
func newNodePair(t testing.TB) (a, b *node) {
	t.Helper()
	id := uniqueID(t)
	a = &node{ns: newNS(t, "mcwg-"+id+"-a"), wgName: "mcwg" + id + "a", under: netip.MustParseAddr("fd00:77::1"),
		wg4: netip.MustParseAddr("10.77.0.1"), wg6: netip.MustParseAddr("fd77::1"), port: 51820}
	b = &node{ns: newNS(t, "mcwg-"+id+"-b"), wgName: "mcwg" + id + "b", under: netip.MustParseAddr("fd00:77::2"),
		wg4: netip.MustParseAddr("10.77.0.2"), wg6: netip.MustParseAddr("fd77::2"), port: 51821}
	bns, err := netns.GetFromPath(b.ns.path)
	if err != nil {
		t.Fatal(err)
	}
	defer bns.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "ul0", MTU: 1500}, PeerName: "ul0", PeerNamespace: netlink.NsFd(int(bns))}
	if err := a.ns.nl.LinkAdd(veth); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	for _, n := range []*node{a, b} {
		l, err := n.ns.nl.LinkByName("ul0")
		if err != nil {
			t.Fatal(err)
		}
		addAddr(t, n.ns.nl, l, n.under.String()+"/64")
		if err := n.ns.nl.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	// Until the kernel's link watcher has run (up to a second after the
	// carrier comes up), the veth drops what it is given: wait for that.
	for _, n := range []*node{a, b} {
		waitOperUp(t, n.ns.nl, "ul0")
	}
	return a, b
}

func waitOperUp(t testing.TB, h *netlink.Handle, name string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		l, err := h.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		if l.Attrs().OperState == netlink.OperUp {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not operationally up after 5s (state %s)", name, l.Attrs().OperState)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ensureOptions are the options the agent would pass for n.
func (n *node) ensureOptions(t testing.TB, mtu int, backend wireguard.Backend) wireguard.EnsureOptions {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return wireguard.EnsureOptions{
		Name:          n.wgName,
		MTU:           mtu,
		Backend:       backend,
		Netlink:       n.ns.nl,
		NetNS:         n.ns.path,
		DeviceCommand: []string{exe, deviceSubcommand, "--iface", n.wgName, "--mtu", strconv.Itoa(mtu)},
		LogPath:       n.logPath,
		StartTimeout:  10 * time.Second,
		Logger:        slog.New(slog.NewTextHandler(t.Output(), nil)),
	}
}

// cleanupDevice stops whatever serves n's device when the test ends, even
// if it failed half-way, and shows the device log of a failed test.
func (n *node) cleanupDevice(t testing.TB) {
	t.Helper()
	n.logPath = filepath.Join(t.TempDir(), n.wgName+".log")
	t.Cleanup(func() {
		if pid, err := wireguard.DevicePID(n.wgName); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		os.Remove(wireguard.UAPISocketPath(n.wgName))
		if l, err := n.ns.nl.LinkByName(n.wgName); err == nil {
			n.ns.nl.LinkDel(l)
		}
		if t.Failed() {
			if b, err := os.ReadFile(n.logPath); err == nil {
				t.Logf("device log of %s:\n%s", n.wgName, b)
			}
		}
	})
}

// configureTunnelAddrs gives n's WireGuard link its addresses and routes
// to peer's WireGuard addresses (the agent's datapath does this for pod
// CIDRs).
func configureTunnelAddrs(t testing.TB, n, peer *node) {
	t.Helper()
	l, err := n.ns.nl.LinkByName(n.wgName)
	if err != nil {
		t.Fatal(err)
	}
	addAddr(t, n.ns.nl, l, n.wg4.String()+"/32")
	addAddr(t, n.ns.nl, l, n.wg6.String()+"/128")
	for _, dst := range []netip.Addr{peer.wg4, peer.wg6} {
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: &net.IPNet{IP: dst.AsSlice(), Mask: net.CIDRMask(dst.BitLen(), dst.BitLen())}}
		if err := n.ns.nl.RouteAdd(r); err != nil {
			t.Fatalf("route %s dev %s: %v", dst, n.wgName, err)
		}
	}
}

func (n *node) peer() wireguard.Peer {
	return wireguard.Peer{
		Name:       n.wgName,
		PublicKey:  n.key.PublicKey(),
		Endpoint:   netip.AddrPortFrom(n.under, uint16(n.port)),
		AllowedIPs: []netip.Prefix{netip.PrefixFrom(n.wg4, 32), netip.PrefixFrom(n.wg6, 128)},
	}
}

// echoServer echoes UDP datagrams on addr inside n's namespace until the
// test ends.
func echoServer(t testing.TB, n *node, addr netip.AddrPort) {
	t.Helper()
	var (
		c   *net.UDPConn
		err error
	)
	n.ns.do(t, func() { c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr)) })
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
}

// dialDF opens a UDP socket in n's namespace to dst with the don't-fragment
// behaviour forced (path MTU discovery "do": the kernel refuses to send a
// datagram bigger than the route's MTU instead of fragmenting it).
func dialDF(t testing.TB, n *node, dst netip.AddrPort) *net.UDPConn {
	t.Helper()
	var (
		c   *net.UDPConn
		err error
	)
	n.ns.do(t, func() { c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst)) })
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	t.Cleanup(func() { c.Close() })
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		if dst.Addr().Is4() {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_DO)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatalf("set DF: %v", serr)
	}
	return c
}

// exchange sends a datagram of size bytes and waits for its echo, retrying
// while the WireGuard handshake completes.
func exchange(c *net.UDPConn, size int, tries int, wait time.Duration) error {
	payload := make([]byte, size)
	rand.Read(payload)
	buf := make([]byte, 65536)
	var lastErr error
	for range tries {
		if _, err := c.Write(payload); err != nil {
			return err // EMSGSIZE and the like do not get better
		}
		c.SetReadDeadline(time.Now().Add(wait))
		n, err := c.Read(buf)
		if err != nil {
			lastErr = err
			continue
		}
		if !bytes.Equal(buf[:n], payload) {
			return fmt.Errorf("echo differs: got %d bytes, sent %d", n, size)
		}
		return nil
	}
	return fmt.Errorf("no echo after %d tries: %w", tries, lastErr)
}

func peerOf(t testing.TB, d wireguard.Device, pub wgtypes.Key) wgtypes.Peer {
	t.Helper()
	dev, err := d.Device(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range dev.Peers {
		if p.PublicKey == pub {
			return p
		}
	}
	t.Fatalf("%s has no peer %s", d.Name(), wireguard.Fingerprint(pub))
	return wgtypes.Peer{}
}

func wantStats(t testing.TB, what string, got wireguard.PlanStats, err error, want wireguard.PlanStats) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("%s: stats (-want +got):\n%s", what, diff)
	}
}

// TestUserspaceTunnel runs two nodes with userspace devices in two network
// namespaces joined by a veth over IPv6 (the worst-case overhead), and checks
// the key files, the tunnel with full-size DF packets, incremental
// reconciliation, adoption across an agent restart without losing traffic,
// and deletion.
func TestUserspaceTunnel(t *testing.T) {
	requireRoot(t)
	ctx := t.Context()
	a, b := newNodePair(t)
	mtu := wireguard.TunnelMTU(1500)
	stateDir := t.TempDir()

	devs := map[*node]wireguard.Device{}
	for _, n := range []*node{a, b} {
		keyPath := filepath.Join(stateDir, n.wgName, "wireguard", "private.key")
		key, created, err := wireguard.LoadOrCreateKey(keyPath)
		if err != nil || !created {
			t.Fatalf("LoadOrCreateKey = created %t, %v; want a new key", created, err)
		}
		if fi, err := os.Stat(keyPath); err != nil || fi.Mode() != 0o600 {
			t.Fatalf("key file mode = %v, %v; want -rw-------", fi.Mode(), err)
		}
		n.key = key

		n.cleanupDevice(t)
		start := time.Now()
		d, err := wireguard.Ensure(ctx, n.ensureOptions(t, mtu, wireguard.BackendUserspace))
		if err != nil {
			t.Fatalf("Ensure %s: %v", n.wgName, err)
		}
		t.Logf("Ensure %s started a userspace device in %s", n.wgName, time.Since(start).Round(time.Millisecond))
		t.Cleanup(func() { d.Close() })
		if d.Backend() != wireguard.BackendUserspace || d.Name() != n.wgName {
			t.Fatalf("device %s backend %s, want %s userspace", d.Name(), d.Backend(), n.wgName)
		}
		l, err := n.ns.nl.LinkByName(n.wgName)
		if err != nil {
			t.Fatalf("link %s not in the node's namespace: %v", n.wgName, err)
		}
		if l.Attrs().MTU != mtu || l.Attrs().Flags&net.FlagUp == 0 {
			t.Errorf("link %s: mtu %d up %t, want mtu %d up", n.wgName, l.Attrs().MTU, l.Attrs().Flags&net.FlagUp != 0, mtu)
		}
		devs[n] = d
	}
	configureTunnelAddrs(t, a, b)
	configureTunnelAddrs(t, b, a)

	cfgA := wireguard.Config{PrivateKey: a.key, ListenPort: a.port, Peers: []wireguard.Peer{b.peer()}}
	cfgB := wireguard.Config{PrivateKey: b.key, ListenPort: b.port, Peers: []wireguard.Peer{a.peer()}}
	st, err := devs[a].Apply(ctx, cfgA)
	wantStats(t, "first apply on a", st, err, wireguard.PlanStats{Added: 1, Settings: true})
	st, err = devs[b].Apply(ctx, cfgB)
	wantStats(t, "first apply on b", st, err, wireguard.PlanStats{Added: 1, Settings: true})

	// Full-size datagrams with DF through the tunnel, over an IPv6 underlay
	// of MTU 1500: the encapsulated packet must fit without fragmentation.
	snmpA, snmpB := a.ns.snmp6(t), b.ns.snmp6(t)
	echoServer(t, b, netip.AddrPortFrom(b.wg4, 7777))
	echoServer(t, b, netip.AddrPortFrom(b.wg6, 7777))
	c4 := dialDF(t, a, netip.AddrPortFrom(b.wg4, 7777))
	c6 := dialDF(t, a, netip.AddrPortFrom(b.wg6, 7777))
	start := time.Now()
	if err := exchange(c4, mtu-20-8, 20, 250*time.Millisecond); err != nil {
		t.Fatalf("full-size IPv4 datagram through the tunnel: %v", err)
	}
	t.Logf("first exchange (with handshake) took %s", time.Since(start).Round(time.Millisecond))
	if err := exchange(c6, mtu-40-8, 5, 250*time.Millisecond); err != nil {
		t.Fatalf("full-size IPv6 datagram through the tunnel: %v", err)
	}
	// Control: one byte more does not fit the tunnel MTU with DF set.
	if err := exchange(c4, mtu-20-8+1, 1, 250*time.Millisecond); !errors.Is(err, unix.EMSGSIZE) {
		t.Errorf("oversized DF datagram: %v, want EMSGSIZE", err)
	}
	for _, c := range []struct {
		ns     *testNS
		before map[string]int64
	}{{a.ns, snmpA}, {b.ns, snmpB}} {
		after := c.ns.snmp6(t)
		for _, k := range []string{"Ip6FragCreates", "Ip6ReasmReqds", "Ip6FragFails"} {
			if d := after[k] - c.before[k]; d != 0 {
				t.Errorf("netns %s: %s grew by %d: the underlay fragmented tunnel packets", c.ns.name, k, d)
			}
		}
	}
	pb := peerOf(t, devs[a], b.key.PublicKey())
	if pb.LastHandshakeTime.IsZero() || pb.ReceiveBytes == 0 || pb.TransmitBytes == 0 {
		t.Errorf("peer b on a: handshake %v rx %d tx %d, want a handshake and traffic", pb.LastHandshakeTime, pb.ReceiveBytes, pb.TransmitBytes)
	}

	st, err = devs[a].Apply(ctx, cfgA)
	wantStats(t, "re-apply of the same config", st, err, wireguard.PlanStats{})

	// Agent restart: close the handle, Ensure again. The device process
	// must be adopted, not restarted, and traffic must flow throughout.
	pid, err := wireguard.DevicePID(a.wgName)
	if err != nil {
		t.Fatal(err)
	}
	var sent, lost atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	cr := dialDF(t, a, netip.AddrPortFrom(b.wg4, 7777))
	go func() {
		defer close(done)
		for i := 0; i < 400; i++ {
			select {
			case <-stop:
				return
			default:
			}
			sent.Add(1)
			if exchange(cr, 100, 1, 500*time.Millisecond) != nil {
				lost.Add(1)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	time.Sleep(200 * time.Millisecond)
	if err := devs[a].Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := devs[a].Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := devs[a].Apply(ctx, cfgA); err == nil {
		t.Error("Apply on a closed handle succeeded")
	}
	start = time.Now()
	da, err := wireguard.Ensure(ctx, a.ensureOptions(t, mtu, wireguard.BackendAuto))
	if err != nil {
		t.Fatalf("Ensure after restart: %v", err)
	}
	t.Logf("re-adopting took %s", time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() { da.Close() })
	devs[a] = da
	// Traffic after the restart too: 200 ms, and at least 10 exchanges in all, which on a
	// loaded machine under TCG (the kernel VM) take longer than the 550 ms the sleeps span.
	time.Sleep(200 * time.Millisecond)
	for deadline := time.Now().Add(10 * time.Second); sent.Load() < 11 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	close(stop)
	<-done
	if got, err := wireguard.DevicePID(a.wgName); err != nil || got != pid {
		t.Errorf("device pid after restart = %d, %v; want %d (adopted, not restarted)", got, err, pid)
	}
	if da.Backend() != wireguard.BackendUserspace {
		t.Errorf("adopted backend %s, want userspace", da.Backend())
	}
	if again := peerOf(t, da, b.key.PublicKey()); again.LastHandshakeTime.Before(pb.LastHandshakeTime) {
		t.Errorf("handshake went back in time: %v, before %v", again.LastHandshakeTime, pb.LastHandshakeTime)
	}
	st, err = da.Apply(ctx, cfgA)
	wantStats(t, "apply after restart", st, err, wireguard.PlanStats{})
	t.Logf("traffic across the restart: %d exchanges, %d lost", sent.Load(), lost.Load())
	if lost.Load() != 0 || sent.Load() < 10 {
		t.Errorf("traffic across the restart: %d of %d exchanges lost, want none of at least 10", lost.Load(), sent.Load())
	}

	// A forced backend that contradicts the running device is refused.
	if _, err := wireguard.Ensure(ctx, a.ensureOptions(t, mtu, wireguard.BackendKernel)); !errors.Is(err, wireguard.ErrBackendMismatch) {
		t.Errorf("Ensure(kernel) over a userspace device: %v, want ErrBackendMismatch", err)
	}
	// The same interface name in another namespace clashes on the global
	// UAPI socket and is refused rather than adopting a's device.
	clash := b.ensureOptions(t, mtu, wireguard.BackendUserspace)
	clash.Name = a.wgName
	if _, err := wireguard.Ensure(ctx, clash); err == nil || !strings.Contains(err.Error(), "another namespace") {
		t.Errorf("Ensure of a's name in b's namespace: %v, want a name clash error", err)
	}

	// Incremental changes: one peer's allowed IPs, then its removal.
	cfgA.Peers[0].AllowedIPs = append(cfgA.Peers[0].AllowedIPs, netip.MustParsePrefix("10.77.1.0/24"))
	st, err = da.Apply(ctx, cfgA)
	wantStats(t, "allowed IPs changed", st, err, wireguard.PlanStats{Updated: 1})
	if got := len(peerOf(t, da, b.key.PublicKey()).AllowedIPs); got != 3 {
		t.Errorf("peer b has %d allowed IPs, want 3", got)
	}
	cfgA.Peers = nil
	st, err = da.Apply(ctx, cfgA)
	wantStats(t, "peer removed", st, err, wireguard.PlanStats{Removed: 1})
	if dev, err := da.Device(ctx); err != nil || len(dev.Peers) != 0 {
		t.Errorf("device after removal: %v peers, %v; want none", len(dev.Peers), err)
	}

	// Delete stops the process and removes link and socket.
	if err := da.Delete(ctx); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := wireguard.DevicePID(a.wgName); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("DevicePID after Delete: %v, want not exist", err)
	}
	if _, err := os.Stat(wireguard.UAPISocketPath(a.wgName)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("UAPI socket after Delete: %v, want it removed", err)
	}
	if _, err := a.ns.nl.LinkByName(a.wgName); err == nil {
		t.Error("link still exists after Delete")
	}
	// Delete waits for the process to exit; this test process is its
	// parent, whose Ensure reaps it right after.
	if err := waitReaped(pid, time.Second); err != nil {
		t.Errorf("device process %d after Delete: %v", pid, err)
	}
}

// waitExited waits until pid has exited with all its threads: it no longer
// exists or is a zombie (an orphan whose reaper is slow) without threads.
func waitExited(pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return nil
		}
		if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) && b[i+2] == 'Z' {
			if tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid)); err != nil || len(tasks) <= 1 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("process %d still running after %s", pid, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitReaped waits until pid no longer exists.
func waitReaped(pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := syscall.Kill(pid, 0)
		if errors.Is(err, syscall.ESRCH) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still exists after %s (kill(0) = %v)", timeout, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestDeviceOutlivesAgent starts the userspace device from a separate,
// short-lived "agent" process, as the real agent does, and checks that the
// device process is detached (the agent's output pipe closes when the agent
// exits, the device survives it), that a new agent adopts it, and that a
// device that died is reported as gone and recreated by Ensure.
func TestDeviceOutlivesAgent(t *testing.T) {
	requireRoot(t)
	ctx := t.Context()
	id := uniqueID(t)
	n := &node{ns: newNS(t, "mcwg-"+id+"-o"), wgName: "mcwg" + id + "o"}
	n.cleanupDevice(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}

	actx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	agent := exec.CommandContext(actx, exe, agentSubcommand, "--iface", n.wgName, "--netns", n.ns.path, "--log", n.logPath)
	start := time.Now()
	out, err := agent.Output() // returns only once every holder of the stdout pipe has exited or closed it
	if err != nil {
		t.Fatalf("agent: %v\n%s", err, err.(*exec.ExitError).Stderr)
	}
	t.Logf("agent started the device and exited in %s", time.Since(start).Round(time.Millisecond))
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("agent output %q: %v", out, err)
	}
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("device process %d after the agent exited: %v", pid, err)
	}
	if got, err := wireguard.DevicePID(n.wgName); err != nil || got != pid {
		t.Fatalf("DevicePID = %d, %v; want %d", got, err, pid)
	}
	if sid, err := unix.Getsid(pid); err != nil || sid != pid {
		t.Errorf("device process session = %d, %v; want its own session %d", sid, err, pid)
	}

	opts := n.ensureOptions(t, 1420, wireguard.BackendAuto)
	d, err := wireguard.Ensure(ctx, opts)
	if err != nil {
		t.Fatalf("Ensure after the agent exited: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	if got, _ := wireguard.DevicePID(n.wgName); got != pid || d.Backend() != wireguard.BackendUserspace {
		t.Errorf("after Ensure: pid %d backend %s, want the adopted %d userspace", got, d.Backend(), pid)
	}
	peerKey, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	if n.key, err = wgtypes.GeneratePrivateKey(); err != nil {
		t.Fatal(err)
	}
	cfg := wireguard.Config{PrivateKey: n.key, ListenPort: 51820, Peers: []wireguard.Peer{{
		Name: "peer", PublicKey: peerKey.PublicKey(), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/24")},
	}}}
	st, err := d.Apply(ctx, cfg)
	wantStats(t, "apply on the adopted device", st, err, wireguard.PlanStats{Added: 1, Settings: true})

	// The device process dies: the handle reports it gone, Ensure recreates
	// it and the configuration is applied afresh.
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err = d.Apply(ctx, cfg)
		if errors.Is(err, wireguard.ErrDeviceGone) || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !errors.Is(err, wireguard.ErrDeviceGone) {
		t.Fatalf("Apply after the device died: %v, want ErrDeviceGone", err)
	}
	// The UAPI socket can die before the process's last thread has closed
	// its UDP socket; a new device binding the same port right away could
	// find it in use (the agent retries; this test waits).
	if err := waitExited(pid, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	d.Close()
	// Recreate it as userspace explicitly: on a kernel with WireGuard (the VM), auto would
	// pick the kernel instead.
	opts.Backend = wireguard.BackendUserspace
	d, err = wireguard.Ensure(ctx, opts)
	if err != nil {
		t.Fatalf("Ensure after the device died: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	if got, err := wireguard.DevicePID(n.wgName); err != nil || got == pid {
		t.Errorf("DevicePID after recreation = %d, %v; want a new process", got, err)
	}
	st, err = d.Apply(ctx, cfg)
	wantStats(t, "apply on the recreated device", st, err, wireguard.PlanStats{Added: 1, Settings: true})
	if err := d.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if err := d.Delete(ctx); err != nil {
		t.Errorf("second Delete: %v, want nil (idempotent)", err)
	}

	// Deleting a device whose process already died succeeds and cleans up.
	d, err = wireguard.Ensure(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	if pid, err = wireguard.DevicePID(n.wgName); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := d.Delete(ctx); err != nil {
		t.Errorf("Delete of a dead device: %v", err)
	}
	if _, err := os.Stat(wireguard.UAPISocketPath(n.wgName)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("socket of the dead device: %v, want removed", err)
	}
}

// TestKernelBackendDetection checks the kernel WireGuard detection against
// the kernel's configuration: forcing the kernel backend on a kernel without
// WireGuard fails with ErrNotSupported and leaves nothing behind, and auto
// falls back to userspace.
func TestKernelBackendDetection(t *testing.T) {
	requireRoot(t)
	available, known := testutil.KernelFeature("wireguard", "WIREGUARD")
	ctx := t.Context()
	id := uniqueID(t)
	n := &node{ns: newNS(t, "mcwg-"+id+"-k"), wgName: "mcwg" + id + "k"}
	n.cleanupDevice(t)

	d, err := wireguard.Ensure(ctx, n.ensureOptions(t, 1420, wireguard.BackendKernel))
	switch {
	case err == nil:
		defer d.Close()
		if known && !available {
			t.Fatalf("Ensure(kernel) succeeded on a kernel without CONFIG_WIREGUARD")
		}
		if d.Backend() != wireguard.BackendKernel {
			t.Errorf("backend %s, want kernel", d.Backend())
		}
		if err := d.Delete(ctx); err != nil {
			t.Fatal(err)
		}
		t.Log("kernel WireGuard available: forced kernel backend works")
		return
	case errors.Is(err, wireguard.ErrNotSupported):
		if known && available {
			t.Fatalf("Ensure(kernel) = %v on a kernel with WireGuard", err)
		}
		t.Logf("Ensure(kernel) = %v", err)
	default:
		t.Fatalf("Ensure(kernel) = %v, want success or ErrNotSupported", err)
	}
	if _, err := n.ns.nl.LinkByName(n.wgName); err == nil {
		t.Error("failed Ensure(kernel) left a link behind")
	}

	d, err = wireguard.Ensure(ctx, n.ensureOptions(t, 1420, wireguard.BackendAuto))
	if err != nil {
		t.Fatalf("Ensure(auto): %v", err)
	}
	defer d.Close()
	if d.Backend() != wireguard.BackendUserspace {
		t.Errorf("Ensure(auto) without kernel WireGuard: backend %s, want userspace", d.Backend())
	}
	if err := d.Delete(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestKernelDevice exercises the kernel backend: create, apply, adopt,
// delete.
func TestKernelDevice(t *testing.T) {
	requireRoot(t)
	if available, _ := testutil.KernelFeature("wireguard", "WIREGUARD"); !available {
		t.Skip("kernel WireGuard (CONFIG_WIREGUARD) not available: covered in the VM suite")
	}
	ctx := t.Context()
	id := uniqueID(t)
	n := &node{ns: newNS(t, "mcwg-"+id+"-k"), wgName: "mcwg" + id + "k"}
	n.cleanupDevice(t)
	opts := n.ensureOptions(t, 1420, wireguard.BackendKernel)
	opts.DeviceCommand = nil
	d, err := wireguard.Ensure(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Backend() != wireguard.BackendKernel {
		t.Fatalf("backend %s, want kernel", d.Backend())
	}
	dev, err := d.Device(ctx)
	if err != nil || dev.Type != wgtypes.LinuxKernel {
		t.Fatalf("Device = %v, %v; want a Linux kernel device", dev, err)
	}
	priv, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	peerKey, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	cfg := wireguard.Config{PrivateKey: priv, ListenPort: 51820, Peers: []wireguard.Peer{{
		Name: "peer", PublicKey: peerKey.PublicKey(), Endpoint: netip.MustParseAddrPort("192.0.2.1:51820"),
		AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/24"), netip.MustParsePrefix("fd09::/64")},
	}}}
	st, err := d.Apply(ctx, cfg)
	wantStats(t, "first apply", st, err, wireguard.PlanStats{Added: 1, Settings: true})
	st, err = d.Apply(ctx, cfg)
	wantStats(t, "second apply", st, err, wireguard.PlanStats{})
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	opts.Backend = wireguard.BackendAuto
	d2, err := wireguard.Ensure(ctx, opts)
	if err != nil {
		t.Fatalf("adopt: %v", err)
	}
	defer d2.Close()
	st, err = d2.Apply(ctx, cfg)
	wantStats(t, "apply after adoption", st, err, wireguard.PlanStats{})
	if err := d2.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := n.ns.nl.LinkByName(n.wgName); err == nil {
		t.Error("link exists after Delete")
	}
}

// TestEnsureStartFailure checks that a device process that dies or never
// answers fails Ensure with its log, and leaves nothing running.
func TestEnsureStartFailure(t *testing.T) {
	requireRoot(t)
	ctx := t.Context()
	id := uniqueID(t)
	n := &node{ns: newNS(t, "mcwg-"+id+"-f"), wgName: "mcwg" + id + "f"}
	n.cleanupDevice(t)

	opts := n.ensureOptions(t, 1420, wireguard.BackendUserspace)
	opts.DeviceCommand = []string{"/bin/sh", "-c", "echo boom-from-device >&2; exit 3"}
	if _, err := wireguard.Ensure(ctx, opts); err == nil || !strings.Contains(err.Error(), "exited before answering") || !strings.Contains(err.Error(), "boom-from-device") {
		t.Errorf("Ensure with a failing command: %v, want an error with the log tail", err)
	}

	pidFile := filepath.Join(t.TempDir(), "pid")
	opts.DeviceCommand = []string{"/bin/sh", "-c", "echo $$ >" + pidFile + "; exec sleep 60"}
	opts.StartTimeout = 300 * time.Millisecond
	start := time.Now()
	if _, err := wireguard.Ensure(ctx, opts); err == nil || !strings.Contains(err.Error(), "no answer") {
		t.Errorf("Ensure with a silent command: %v, want a timeout error", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Ensure took %s with a 300ms start timeout", d)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("silent device process %d after the failed Ensure: kill(0) = %v, want ESRCH (killed and reaped)", pid, err)
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if _, err := n.ns.nl.LinkByName(n.wgName); err == nil {
		t.Error("failed Ensure left a link behind")
	}
}

func TestEnsureRejectsBadOptions(t *testing.T) {
	ctx := context.Background()
	for _, opts := range []wireguard.EnsureOptions{
		{Name: ""},
		{Name: "sixteen-chars-xx"},
		{Name: "a/b"},
		{Name: "wg0", Backend: "fast"},
		{Name: "wg0", MTU: 100},
	} {
		if _, err := wireguard.Ensure(ctx, opts); err == nil {
			t.Errorf("Ensure(%+v) succeeded, want an error", opts)
		}
	}
}

// TestApplyPlansAgainstRecentRead checks when Apply trusts a recent read of the device
// instead of reading it again: never after a configuration call through the handle, and
// only within SnapshotMaxAge of a Device call. A peer removed behind the device's back is
// put back by the first Apply that reads.
func TestApplyPlansAgainstRecentRead(t *testing.T) {
	requireRoot(t)
	ctx := t.Context()
	a, _ := newNodePair(t)
	a.cleanupDevice(t)
	d, err := wireguard.Ensure(ctx, a.ensureOptions(t, wireguard.TunnelMTU(1500), wireguard.BackendUserspace))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	priv, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	cfg := wireguard.Config{PrivateKey: priv, ListenPort: a.port}
	for i := range 2 {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		cfg.Peers = append(cfg.Peers, wireguard.Peer{
			Name:       fmt.Sprintf("p%d", i),
			PublicKey:  k.PublicKey(),
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 99, byte(i), 0}), 24)},
		})
	}
	st, err := d.Apply(ctx, cfg)
	wantStats(t, "first apply", st, err, wireguard.PlanStats{Added: 2, Settings: true})

	wc, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	defer wc.Close()
	removeBehindBack := func() {
		t.Helper()
		if err := wc.ConfigureDevice(a.wgName, wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: cfg.Peers[0].PublicKey, Remove: true}}}); err != nil {
			t.Fatal(err)
		}
	}

	// After a configuration call the handle reads again.
	removeBehindBack()
	st, err = d.Apply(ctx, cfg)
	wantStats(t, "apply after a configuration call", st, err, wireguard.PlanStats{Added: 1})

	// A recent read is trusted...
	start := time.Now()
	if _, err := d.Device(ctx); err != nil {
		t.Fatal(err)
	}
	removeBehindBack()
	st, err = d.Apply(ctx, cfg)
	if took := time.Since(start); took < wireguard.SnapshotMaxAge/2 {
		wantStats(t, "apply right after a read", st, err, wireguard.PlanStats{})
	} else {
		t.Logf("the read and the apply took %v: too slow a machine to check the snapshot", took)
	}
	// ... until it is older than SnapshotMaxAge.
	time.Sleep(wireguard.SnapshotMaxAge + 100*time.Millisecond)
	st, err = d.Apply(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if st.Added > 1 || st.Removed+st.Updated != 0 {
		t.Errorf("apply after the snapshot expired: %v, want at most the removed peer added", st)
	}
	peerOf(t, d, cfg.Peers[0].PublicKey)
}

// TestApplyPromptStartsHandshake checks Peer.Prompt on a real device, userspace and kernel:
// a peer added with it gets a handshake at once, with no traffic, in one Apply (one
// configuration call), and is left without a keepalive; a peer added without it gets no
// handshake (the control). The situation is a node's key change as its peers see it: the old
// key goes, the new one comes.
func TestApplyPromptStartsHandshake(t *testing.T) {
	requireRoot(t)
	for _, backend := range []wireguard.Backend{wireguard.BackendUserspace, wireguard.BackendKernel} {
		t.Run(string(backend), func(t *testing.T) {
			if backend == wireguard.BackendKernel {
				if available, _ := testutil.KernelFeature("wireguard", "WIREGUARD"); !available {
					t.Skip("kernel WireGuard (CONFIG_WIREGUARD) not available: covered in the VM suite")
				}
			}
			testApplyPrompt(t, backend)
		})
	}
}

func testApplyPrompt(t *testing.T, backend wireguard.Backend) {
	ctx := t.Context()
	a, b := newNodePair(t)
	devs := map[*node]wireguard.Device{}
	for _, n := range []*node{a, b} {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		n.key = k
		n.cleanupDevice(t)
		opts := n.ensureOptions(t, wireguard.TunnelMTU(1500), backend)
		if backend == wireguard.BackendKernel {
			opts.DeviceCommand = nil
		}
		d, err := wireguard.Ensure(ctx, opts)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		devs[n] = d
	}
	st, err := devs[b].Apply(ctx, wireguard.Config{PrivateKey: b.key, ListenPort: b.port, Peers: []wireguard.Peer{a.peer()}})
	wantStats(t, "b configures a", st, err, wireguard.PlanStats{Added: 1, Settings: true})

	// The control: b's first key, added without a prompt, sees no handshake.
	old, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	oldPeer := b.peer()
	oldPeer.PublicKey = old.PublicKey()
	cfgA := wireguard.Config{PrivateKey: a.key, ListenPort: a.port, Peers: []wireguard.Peer{oldPeer}}
	st, err = devs[a].Apply(ctx, cfgA)
	wantStats(t, "a configures b's old key", st, err, wireguard.PlanStats{Added: 1, Settings: true})
	time.Sleep(time.Second)
	if p := peerOf(t, devs[a], oldPeer.PublicKey); !p.LastHandshakeTime.IsZero() {
		t.Fatalf("handshake with a peer added without a prompt and without traffic (%v)", p.LastHandshakeTime)
	}

	// b's key changes: the old key goes and the new one comes with a prompt, in one call.
	newPeer := b.peer()
	newPeer.Prompt = true
	cfgA.Peers = []wireguard.Peer{newPeer}
	start := time.Now()
	st, err = devs[a].Apply(ctx, cfgA)
	wantStats(t, "a configures b's new key with a prompt", st, err, wireguard.PlanStats{Added: 1, Removed: 1, Rekeyed: 1, Prompted: 1})
	for {
		p := peerOf(t, devs[a], newPeer.PublicKey)
		if p.PersistentKeepaliveInterval != 0 {
			t.Fatalf("prompted peer left with keepalive %v", p.PersistentKeepaliveInterval)
		}
		if !p.LastHandshakeTime.IsZero() {
			t.Logf("handshake %v after the prompting Apply, without traffic", time.Since(start).Round(time.Millisecond))
			break
		}
		if time.Since(start) > 3*time.Second {
			t.Fatal("no handshake 3s after a prompted peer was added (WireGuard retries after 5s: the prompt did nothing)")
		}
		time.Sleep(10 * time.Millisecond)
	}
	st, err = devs[a].Apply(ctx, cfgA)
	wantStats(t, "the same config again: a prompt is not state", st, err, wireguard.PlanStats{})
}
