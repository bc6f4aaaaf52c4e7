package e2e

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshcrypt/meshcrypt/internal/benchplot"
	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// iperf3 runs a TCP iperf3 test for secs seconds from one pod to another and returns the
// received throughput in Gbit/s.
func iperf3(ctx context.Context, from, to *netenv.Pod, secs int) (float64, error) {
	srv := to.NS.Command(ctx, "iperf3", "-s", "-1", "-p", "5201")
	if err := srv.Start(); err != nil {
		return 0, fmt.Errorf("start iperf3 server: %w", err)
	}
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
	var out []byte
	var err error
	for range 20 { // the server needs a moment to listen
		out, err = from.NS.Command(ctx, "iperf3", "-c", to.IPv4.String(), "-p", "5201", "-t", fmt.Sprint(secs), "-J").Output()
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			err = fmt.Errorf("%w: %s %s", err, ee.Stderr, out)
		}
		return 0, fmt.Errorf("iperf3 client: %w", err)
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return 0, fmt.Errorf("parse iperf3 output: %w", err)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9, nil
}

// BenchmarkPodThroughput measures TCP throughput and UDP round-trip latency between pods on
// two nodes with encryption Disabled, WireGuard (userspace on the host, kernel in the VM) and,
// where the kernel has ESP (the VM: tests/vm BenchmarkPodThroughputInVM), IPsec, in the same
// run, and reports the ratios against clear. With the userspace backend (the host) it goes on,
// in the same run, with the policy classifier detached from the pods' interfaces (WireGuard and
// clear again) and with the same wireguard-go device configured by hand between the same node
// namespaces (see handWireGuard), and writes bench/datapath.json and bench/throughput.svg.
func BenchmarkPodThroughput(b *testing.B) {
	c := cluster.StartT(b, cluster.Options{Backend: string(wgBackend)})
	ctx := context.Background()
	pods := addNodesWithPods(ctx, b, c, 2)
	modes := []v1alpha1.EncryptionMode{v1alpha1.ModeDisabled, v1alpha1.ModeWireGuard}
	if espSupported(b) {
		setKeyring(ctx, b, c, keyLine(b, 1))
		modes = append(modes, v1alpha1.ModeIPsec)
	}
	results := map[v1alpha1.EncryptionMode]float64{}
	var runs []datapathRun
	for range b.N {
		runs = runs[:0]
		for _, mode := range modes {
			if err := c.SetMode(ctx, mode); err != nil {
				b.Fatal(err)
			}
			if _, err := c.WaitConverged(ctx, mode, time.Minute); err != nil {
				b.Fatal(err)
			}
			r := measureDatapath(ctx, b, pods, string(mode))
			results[mode] = r.Gbps
			runs = append(runs, r)
		}
	}
	b.ReportMetric(results[v1alpha1.ModeDisabled], "clear-Gbit/s")
	b.ReportMetric(results[v1alpha1.ModeWireGuard], "wireguard-Gbit/s")
	b.ReportMetric(results[v1alpha1.ModeWireGuard]/results[v1alpha1.ModeDisabled], "wireguard/clear")
	if g, ok := results[v1alpha1.ModeIPsec]; ok {
		b.ReportMetric(g, "ipsec-Gbit/s")
		b.ReportMetric(g/results[v1alpha1.ModeDisabled], "ipsec/clear")
		b.ReportMetric(g/results[v1alpha1.ModeWireGuard], "ipsec/wireguard")
	}
	if wgBackend != v1alpha1.BackendUserspace {
		return // the classifier and by-hand comparisons run on the host (userspace WireGuard)
	}

	// The classifier detached: WireGuard, then clear.
	if err := c.SetMode(ctx, v1alpha1.ModeWireGuard); err != nil {
		b.Fatal(err)
	}
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
		b.Fatal(err)
	}
	detachClassifier(b, c)
	runs = append(runs, measureDatapath(ctx, b, pods, "WireGuard, classifier detached"))
	if err := c.SetMode(ctx, v1alpha1.ModeDisabled); err != nil {
		b.Fatal(err)
	}
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		b.Fatal(err)
	}
	runs = append(runs, measureDatapath(ctx, b, pods, "Disabled, classifier detached"))
	// The same device, configured by hand, classifier still detached.
	handWireGuard(ctx, b, c, pods)
	runs = append(runs, measureDatapath(ctx, b, pods, "wireguard-go by hand"))

	byName := map[string]datapathRun{}
	for _, r := range runs {
		byName[r.Name] = r
	}
	ratio := func(a, b string) float64 { return byName[a].Gbps / byName[b].Gbps }
	ratios := map[string]float64{
		"wireguard/clear":                     ratio("WireGuard", "Disabled"),
		"wireguard/by-hand (classifier off)":  ratio("WireGuard, classifier detached", "wireguard-go by hand"),
		"wireguard classifier on/off":         ratio("WireGuard", "WireGuard, classifier detached"),
		"clear classifier on/off":             ratio("Disabled", "Disabled, classifier detached"),
		"by-hand/clear (both classifier off)": ratio("wireguard-go by hand", "Disabled, classifier detached"),
	}
	b.ReportMetric(ratios["wireguard/by-hand (classifier off)"], "meshcrypt/by-hand")
	b.ReportMetric(ratios["wireguard classifier on/off"], "classifier-on/off")
	if err := writeDatapath(runs, ratios); err != nil {
		b.Fatal(err)
	}
}

// datapathRun is one row of bench/datapath.json.
type datapathRun struct {
	// Name is the mode measured.
	Name string `json:"name"`
	// Gbps is the TCP throughput (iperf3, one stream, 5 s), received side.
	Gbps float64 `json:"gbitPerSecond"`
	// RTTMicros is the median round-trip time of 64-byte UDP request/response exchanges.
	RTTMicros float64 `json:"udpRttMedianMicros"`
}

// measureDatapath warms the path up and measures throughput and latency from pods[0] to
// pods[1].
func measureDatapath(ctx context.Context, b *testing.B, pods []*netenv.Pod, name string) datapathRun {
	b.Helper()
	r := datapathRun{Name: name}
	// The tunnel carries traffic before it is measured (a first handshake under TCG takes a
	// while), and a run that moved nothing is repeated.
	for try := 0; ; try++ {
		if err := cluster.Exchange(ctx, "udp", pods[0], pods[1].IPv4, pods[1], 5300, []byte("warm-up"), 20*time.Second); err != nil {
			b.Fatalf("%s: %v", name, err)
		}
		g, err := iperf3(ctx, pods[0], pods[1], 5)
		if err != nil {
			b.Fatal(err)
		}
		r.Gbps = g
		if g > 0 || try == 2 {
			break
		}
		b.Logf("%s: iperf3 moved nothing; again", name)
	}
	rtt, err := udpRTT(pods[0], pods[1], 200)
	if err != nil {
		b.Fatalf("%s: %v", name, err)
	}
	r.RTTMicros = float64(rtt.Nanoseconds()) / 1000
	b.Logf("%s: %.3f Gbit/s, UDP RTT median %v", name, r.Gbps, rtt)
	return r
}

// udpRTT returns the median round-trip time of n 64-byte UDP datagrams echoed by a server in
// to, sent one at a time from from.
func udpRTT(from, to *netenv.Pod, n int) (time.Duration, error) {
	srv, err := to.NS.ListenUDP(netip.AddrPortFrom(to.IPv4, 5301).String())
	if err != nil {
		return 0, err
	}
	defer srv.Close()
	go func() {
		buf := make([]byte, 1500)
		for {
			k, addr, err := srv.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = srv.WriteToUDPAddrPort(buf[:k], addr)
		}
	}()
	conn, err := from.NS.DialUDP(netip.AddrPortFrom(to.IPv4, 5301).String())
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	msg, buf := make([]byte, 64), make([]byte, 1500)
	var rtts []time.Duration
	for i := 0; len(rtts) < n && i < 2*n; i++ {
		start := time.Now()
		if _, err := conn.Write(msg); err != nil {
			return 0, err
		}
		_ = conn.SetReadDeadline(time.Now().Add(time.Second))
		if _, err := conn.Read(buf); err != nil {
			continue // lost: not a sample
		}
		rtts = append(rtts, time.Since(start))
	}
	if len(rtts) < n/2 {
		return 0, fmt.Errorf("UDP echo: %d of %d answered", len(rtts), n)
	}
	slices.Sort(rtts)
	return rtts[len(rtts)/2], nil
}

// detachClassifier detaches the policy classifier from every pod interface of every node,
// behind the agents' backs: it detaches the TCX links the agents pinned. The agents do not
// attach again to an interface they attached once, so it stays detached until they restart.
// This is the least invasive switch: no agent flag, nothing else of the datapath changes
// (maps, routes, the device), and the programs simply stop running.
func detachClassifier(b *testing.B, c *cluster.Cluster) {
	b.Helper()
	n := 0
	for _, node := range c.Nodes() {
		dir := filepath.Join(c.BPFPinDir(node.Name), "links")
		ents, err := os.ReadDir(dir)
		if err != nil {
			b.Fatalf("pinned classifier links of %s: %v", node.Name, err)
		}
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), "tcx_") {
				continue
			}
			l, err := link.LoadPinnedLink(filepath.Join(dir, e.Name()), nil)
			if err != nil {
				b.Fatal(err)
			}
			err = l.Detach()
			l.Close()
			if err != nil {
				b.Fatalf("detach %s: %v", e.Name(), err)
			}
			n++
		}
	}
	if n == 0 {
		b.Fatal("no pinned TCX classifier link to detach")
	}
	b.Logf("detached %d classifier links", n)
}

// handWireGuard connects the two pods' nodes with a second WireGuard device each, configured
// by hand (wgctrl) rather than by the agent: the same wireguard-go device process
// (`meshcrypt-agent wireguard-device`, the body the agent starts), the same MTU, and one peer
// whose allowed IPs are the other node's IPv4 pod CIDR; a policy rule (priority 900, before
// meshcrypt's) sends that CIDR to the device. It is the baseline for what meshcrypt adds on top
// of the library. Run it with the agents in mode Disabled.
func handWireGuard(ctx context.Context, b *testing.B, c *cluster.Cluster, pods []*netenv.Pod) {
	b.Helper()
	const port, table = 51990, "900"
	nodes := []*cluster.Node{c.Node(pods[0].Node.Name), c.Node(pods[1].Node.Name)}
	ifaces := make([]string, 2)
	keys := make([]wgtypes.Key, 2)
	for i, n := range nodes {
		ifaces[i] = fmt.Sprintf("%sh%d", c.Net.Prefix(), i)
		if len(ifaces[i]) > 15 {
			ifaces[i] = ifaces[i][len(ifaces[i])-15:]
		}
		cmd := n.NS.Command(context.Background(), c.Bin("meshcrypt-agent"), "wireguard-device",
			"--iface", ifaces[i], "--mtu", strconv.Itoa(c.PodMTU()))
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		iface := ifaces[i]
		b.Cleanup(func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			_ = cmd.Wait()
			_ = os.Remove(wireguard.UAPISocketPath(iface))
		})
		var err error
		if keys[i], err = wgtypes.GeneratePrivateKey(); err != nil {
			b.Fatal(err)
		}
	}
	wc, err := wgctrl.New()
	if err != nil {
		b.Fatal(err)
	}
	defer wc.Close()
	for i, n := range nodes {
		other := nodes[1-i]
		deadline := time.Now().Add(10 * time.Second)
		for {
			if _, err := wireguard.DevicePID(ifaces[i]); err == nil {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("hand device %s did not answer", ifaces[i])
			}
			time.Sleep(20 * time.Millisecond)
		}
		var cidr netip.Prefix
		for _, p := range other.PodCIDRs {
			if p.Addr().Is4() {
				cidr = p
			}
		}
		err := wc.ConfigureDevice(ifaces[i], wgtypes.Config{
			PrivateKey: &keys[i],
			ListenPort: new(port),
			Peers: []wgtypes.PeerConfig{{
				PublicKey:         keys[1-i].PublicKey(),
				Endpoint:          net.UDPAddrFromAddrPort(netip.AddrPortFrom(other.UnderlayV4, port)),
				ReplaceAllowedIPs: true,
				AllowedIPs:        []net.IPNet{{IP: cidr.Addr().AsSlice(), Mask: net.CIDRMask(cidr.Bits(), 32)}},
			}},
		})
		if err != nil {
			b.Fatal(err)
		}
		for _, args := range [][]string{
			{"link", "set", ifaces[i], "up"},
			{"route", "replace", cidr.String(), "dev", ifaces[i], "table", table},
			{"rule", "add", "to", cidr.String(), "lookup", table, "pref", table},
		} {
			if out, err := n.NS.Command(ctx, "ip", args...).CombinedOutput(); err != nil {
				b.Fatalf("ip %v in %s: %v: %s", args, n.Name, err, out)
			}
		}
	}
}

// writeDatapath writes bench/datapath.json and bench/throughput.svg (the directory is
// $MESHCRYPT_BENCH_DIR, default the repository's bench/).
func writeDatapath(runs []datapathRun, ratios map[string]float64) error {
	dir := cmp.Or(os.Getenv("MESHCRYPT_BENCH_DIR"), filepath.Join("..", "..", "bench"))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(map[string]any{
		"command": "make bench (go test -run '^$' -bench PodThroughput -benchtime 1x ./tests/e2e/)",
		"date":    time.Now().UTC().Format(time.RFC3339),
		"runs":    runs,
		"ratios":  ratios,
	}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "datapath.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	var bars []benchplot.Bar
	for _, r := range runs {
		bars = append(bars, benchplot.Bar{Label: r.Name, Value: r.Gbps})
	}
	var svg bytes.Buffer
	if err := benchplot.Bars(&svg, "Pod-to-pod TCP throughput (iperf3, one stream)", "Gbit/s", bars); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "throughput.svg"), svg.Bytes(), 0o644)
}

// BenchmarkNodeJoin measures the time from creating a node (namespace, Node object, agent
// start) until every node has configured it and it has configured every node, with
// WireGuard on and 3 nodes already there.
func BenchmarkNodeJoin(b *testing.B) {
	c := cluster.StartT(b, cluster.Options{Backend: "userspace"})
	ctx := context.Background()
	for i := 1; i <= 3; i++ {
		if _, err := c.AddNode(ctx, fmt.Sprintf("n%d", i)); err != nil {
			b.Fatal(err)
		}
	}
	if err := c.SetMode(ctx, v1alpha1.ModeWireGuard); err != nil {
		b.Fatal(err)
	}
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
		b.Fatal(err)
	}
	var joins []time.Duration
	for i := range max(b.N, 5) {
		name := fmt.Sprintf("j%d", i)
		start := time.Now()
		if _, err := c.AddNode(ctx, name); err != nil {
			b.Fatal(err)
		}
		if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
			b.Fatal(err)
		}
		joins = append(joins, time.Since(start))
		if err := c.RemoveNode(ctx, name); err != nil {
			b.Fatal(err)
		}
	}
	sort.Slice(joins, func(i, j int) bool { return joins[i] < joins[j] })
	b.ReportMetric(float64(joins[len(joins)/2].Milliseconds()), "join-median-ms")
	b.ReportMetric(float64(joins[len(joins)-1].Milliseconds()), "join-max-ms")
}
