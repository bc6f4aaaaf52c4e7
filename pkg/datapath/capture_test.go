package datapath

import (
	"bytes"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/meshcrypt/meshcrypt/internal/netnsutil"
	"github.com/meshcrypt/meshcrypt/internal/testutil"
)

// TestCaptureAndHealth: a node with a health address on lo sends a marker from it to a peer
// namespace, which echoes it back. The capture on the node's interface sees the packet it
// sent, not the echo it received; and ApplyHealth is idempotent.
func TestCaptureAndHealth(t *testing.T) {
	nsA, hA := testutil.NewNetNS(t)
	nsB, hB := testutil.NewNetNS(t)
	if err := hA.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "v0"}, PeerName: "v1", PeerNamespace: netlink.NsFd(nsB)}); err != nil {
		t.Fatal(err)
	}
	addr := func(h *netlink.Handle, name, cidr string) netlink.Link {
		l, err := h.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		a, _ := netlink.ParseAddr(cidr)
		if err := h.AddrAdd(l, a); err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
		return l
	}
	v0 := addr(hA, "v0", "10.99.0.1/24")
	v1 := addr(hB, "v1", "10.99.0.2/24")
	for _, h := range []*netlink.Handle{hA, hB} {
		lo, _ := h.LinkByName("lo")
		if err := h.LinkSetUp(lo); err != nil {
			t.Fatal(err)
		}
	}
	_, back, _ := net.ParseCIDR("10.244.1.0/24")
	if err := hB.RouteAdd(&netlink.Route{LinkIndex: v1.Attrs().Index, Dst: back, Gw: net.ParseIP("10.99.0.1")}); err != nil {
		t.Fatal(err)
	}

	health := []netip.Addr{netip.MustParseAddr("10.244.1.254"), netip.MustParseAddr("fd44:0:0:1::fffe")}
	for range 2 {
		if err := ApplyHealth(hA, health); err != nil {
			t.Fatalf("ApplyHealth: %v", err)
		}
	}
	lo, _ := hA.LinkByName("lo")
	got, err := hA.AddrList(lo, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, a := range got {
		for _, h := range health {
			if a.IP.Equal(h.AsSlice()) {
				n++
			}
		}
	}
	if n != len(health) {
		t.Fatalf("lo has %d of the health addresses after two ApplyHealth, want %d: %v", n, len(health), got)
	}

	marker := []byte("capture-test-marker-7f3a")
	var mu sync.Mutex
	var seen, all int
	var c *Capture
	if err := netnsutil.Do(nsA, func() (err error) {
		c, err = StartCapture([]int{v0.Attrs().Index}, func(pkt []byte) {
			mu.Lock()
			defer mu.Unlock()
			all++
			if bytes.Contains(pkt, marker) {
				seen++
			}
		})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = c.Stop() })

	// The peer echoes one datagram.
	var srv *net.UDPConn
	if err := netnsutil.Do(nsB, func() (err error) {
		srv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP("10.99.0.2"), Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	go func() {
		buf := make([]byte, 1500)
		n, from, err := srv.ReadFromUDP(buf)
		if err == nil {
			_, _ = srv.WriteToUDP(buf[:n], from)
		}
	}()
	var cl *net.UDPConn
	if err := netnsutil.Do(nsA, func() (err error) {
		cl, err = net.DialUDP("udp4", &net.UDPAddr{IP: health[0].AsSlice()}, &net.UDPAddr{IP: net.ParseIP("10.99.0.2"), Port: 9999})
		return err
	}); err != nil {
		t.Fatalf("bind to the health address: %v", err)
	}
	defer cl.Close()
	if _, err := cl.Write(marker); err != nil {
		t.Fatal(err)
	}
	_ = cl.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	if n, err := cl.Read(buf); err != nil || !bytes.Equal(buf[:n], marker) {
		t.Fatalf("echo to the health address: %q, %v", buf[:n], err)
	}
	drops, err := c.Stop()
	if err != nil || drops != 0 {
		t.Fatalf("Stop = %d drops, %v", drops, err)
	}
	mu.Lock()
	defer mu.Unlock()
	// One outgoing datagram with the marker (the echo came in and is not read); ARP may add
	// frames without it, and a frame is never counted twice.
	if seen != 1 {
		t.Errorf("capture saw the marker in %d outgoing packets (of %d), want exactly 1", seen, all)
	}
}
