package scale

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/internal/benchplot"
	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
)

// Environment variables that configure the benchmark.
const (
	// envN lists the cluster sizes, comma-separated.
	envN = "MESHCRYPT_SCALE_N"
	// envOut is the directory for scale.json and the plot; default the repository's bench/.
	envOut = "MESHCRYPT_SCALE_OUT"
	// envChanges is the number of single key changes measured per N.
	envChanges = "MESHCRYPT_SCALE_CHANGES"
	// envColdStarts is the number of agent starts on an empty device measured per N.
	envColdStarts = "MESHCRYPT_SCALE_COLD_STARTS"
	// envReplot, when set, makes the benchmark only redraw the plot from scale.json.
	envReplot = "MESHCRYPT_SCALE_REPLOT"
)

const (
	defaultN          = "100,1000,5000"
	defaultChanges    = 5
	defaultColdStarts = 2
	// convergeTimeout is how long the agent may take to configure every peer before the
	// benchmark fails: generous, it is a failure to converge, not a slow convergence.
	convergeTimeout = 5 * time.Minute
	// createWorkers create the simulated objects in parallel.
	createWorkers = 32
	simPort       = 51871
	metricsPort   = 9962
)

// Result is what one N measured; bench/scale.json holds one per N.
type Result struct {
	// N is the number of simulated nodes (the real node is not counted).
	N int `json:"n"`
	// CreateSeconds is how long creating the N Nodes and N MeshNodes took through the API.
	CreateSeconds float64 `json:"createSeconds"`
	// CreateConvergedSeconds is the time from the first object created until the device had
	// every simulated node as a peer with its key (the agent running throughout).
	CreateConvergedSeconds float64 `json:"createConvergedSeconds"`
	// ColdStartSeconds are, per run, the time from the agent's start on an empty device (device
	// and routes deleted, N MeshNodes in the API) until every peer is on the device.
	ColdStartSeconds []float64 `json:"coldStartSeconds"`
	// ChangeMillis are, per change, the time from the MeshNode update of one node's key (the
	// API call included) until the device had the new key and not the old one.
	ChangeMillis []float64 `json:"changeMillis"`
	// ChangeSeenMillis are, per change, the time until the device read that first showed
	// the change started: a tighter upper bound than ChangeMillis, which includes that read.
	ChangeSeenMillis []float64 `json:"changeSeenMillis"`
	// ChangeOps is what each change cost, read from the agent's metrics.
	ChangeOps []Ops `json:"changeOps"`
	// EndpointChangeMillis and EndpointChangeOps are the same for a change of one node's
	// underlay address (its WireGuard endpoint): no key change, so no prompted handshake.
	EndpointChangeMillis []float64 `json:"endpointChangeMillis"`
	EndpointChangeOps    []Ops     `json:"endpointChangeOps"`
	// DeviceReadMillis is the mean time of one read of the whole device through wgctrl, the
	// resolution of the change latency (the benchmark polls the device).
	DeviceReadMillis float64 `json:"deviceReadMillis"`
	// AfterCreate and AfterColdStart are the agent's resources after the create phase (the
	// agent ran through every create) and at the end (after the last cold start and the
	// changes measured after it).
	AfterCreate    Resources `json:"afterCreate"`
	AfterColdStart Resources `json:"afterColdStart"`
	// ColdStartOps is what the last cold start cost.
	ColdStartOps Ops `json:"coldStartOps"`
}

// Ops are the agent's counters over an interval.
type Ops struct {
	// Reconciles counts reconcile runs (meshcrypt_reconcile_duration_seconds_count).
	Reconciles float64 `json:"reconciles"`
	// Configures counts wgctrl configuration calls; Peers* the peers they wrote; NodeUpdates
	// the remote nodes those peers belong to (a key change, a remove and an add, is one).
	Configures   float64 `json:"wireguardConfigures"`
	PeersAdded   float64 `json:"peersAdded"`
	PeersUpdated float64 `json:"peersUpdated"`
	PeersRemoved float64 `json:"peersRemoved"`
	NodeUpdates  float64 `json:"nodeUpdates"`
	// RouteReplaces and RouteDeletes count netlink route writes; RuleOps rule adds and deletes.
	RouteReplaces float64 `json:"routeReplaces"`
	RouteDeletes  float64 `json:"routeDeletes"`
	RuleOps       float64 `json:"ruleOps"`
}

// Resources are a process's memory and CPU from /proc.
type Resources struct {
	// RSSMB and HWMMB are VmRSS and VmHWM (peak RSS) in MiB.
	RSSMB float64 `json:"rssMiB"`
	HWMMB float64 `json:"hwmMiB"`
	// CPUSeconds is user plus system time since the process started.
	CPUSeconds float64 `json:"cpuSeconds"`
	// DeviceRSSMB is the userspace WireGuard device process's VmRSS in MiB (0: kernel device).
	DeviceRSSMB float64 `json:"deviceRssMiB"`
	// HeapInuseMB is the agent's Go heap in use (go_memstats_heap_inuse_bytes) in MiB: the
	// live part of the RSS, the rest being the runtime's headroom, stacks and the binary.
	HeapInuseMB float64 `json:"heapInuseMiB"`
}

// Report is bench/scale.json.
type Report struct {
	// Machine describes where it ran.
	Machine string `json:"machine"`
	// Command reproduces it.
	Command string `json:"command"`
	// Date is when it ran (UTC, RFC 3339).
	Date    string   `json:"date"`
	Results []Result `json:"results"`
}

// BenchmarkControlPlaneScale runs one real agent against N simulated nodes for each N of
// MESHCRYPT_SCALE_N and writes bench/scale.json and bench/scale-convergence.svg. Speeds are
// reported, never asserted; it fails only when the agent does not converge.
func BenchmarkControlPlaneScale(b *testing.B) {
	if os.Getenv(envReplot) != "" {
		replot(b)
		return
	}
	sizes, err := parseSizes(envOr(envN, defaultN))
	if err != nil {
		b.Fatal(err)
	}
	changes := envInt(b, envChanges, defaultChanges)
	colds := envInt(b, envColdStarts, defaultColdStarts)
	var results []Result
	for _, n := range sizes {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			var r Result
			for range b.N {
				r = runScale(b, n, changes, colds)
			}
			reportResult(b, r)
			results = append(results, r)
		})
	}
	if len(results) == 0 {
		return
	}
	if err := writeOutputs(results); err != nil {
		b.Fatal(err)
	}
}

// replot redraws scale-convergence.svg from the scale.json of an earlier run.
func replot(b *testing.B) {
	js, err := os.ReadFile(filepath.Join(outDir(), "scale.json"))
	if err != nil {
		b.Fatal(err)
	}
	var rep Report
	if err := json.Unmarshal(js, &rep); err != nil {
		b.Fatal(err)
	}
	if err := writePlot(outDir(), rep.Results); err != nil {
		b.Fatal(err)
	}
}

// sim is one simulated node.
type sim struct {
	name     string
	underlay netip.Addr
	cidr     netip.Prefix
	key      wgtypes.Key
}

// simNodes returns n simulated nodes with unique names, underlay addresses, pod CIDRs and
// random keys.
func simNodes(tb testing.TB, n int) []sim {
	tb.Helper()
	if n > 1<<14 {
		tb.Fatalf("at most %d simulated nodes (10.128.0.0/10 in /24s)", 1<<14)
	}
	base4 := netip.MustParseAddr("198.18.0.0").As4()
	out := make([]sim, n)
	for i := range out {
		u := base4
		v := uint32(i + 1)
		u[2], u[3] = byte(v>>8), byte(v)
		u[1] += byte(v >> 16)
		c := [4]byte{10, 128 + byte(i>>8), byte(i), 0}
		out[i] = sim{
			name:     fmt.Sprintf("sim-%05d", i),
			underlay: netip.AddrFrom4(u),
			cidr:     netip.PrefixFrom(netip.AddrFrom4(c), 24),
			key:      newPublicKey(tb),
		}
	}
	return out
}

func newPublicKey(tb testing.TB) wgtypes.Key {
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		tb.Fatal(err)
	}
	return k.PublicKey()
}

func (s sim) node() *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: s.name, Labels: map[string]string{"kubernetes.io/hostname": s.name, "meshcrypt.io/simulated": "true"}},
		Spec:       corev1.NodeSpec{PodCIDR: s.cidr.String(), PodCIDRs: []string{s.cidr.String()}},
	}
}

func (s sim) meshNode() *v1alpha1.MeshNode {
	return &v1alpha1.MeshNode{
		ObjectMeta: metav1.ObjectMeta{Name: s.name},
		Spec: v1alpha1.MeshNodeSpec{
			UnderlayIPs: []v1alpha1.IP{v1alpha1.IP(s.underlay.String())},
			PodCIDRs:    []v1alpha1.CIDR{v1alpha1.CIDR(s.cidr.String())},
			WireGuard:   &v1alpha1.WireGuardSpec{PublicKey: s.key.String(), ListenPort: simPort},
			BootID:      "simulated",
		},
	}
}

// runScale measures one N on a cluster of its own.
func runScale(b *testing.B, n, changes, colds int) Result {
	b.StopTimer()
	ctx := context.Background()
	r := Result{N: n}
	c := cluster.StartT(b, cluster.Options{
		Backend:  string(wireguard.BackendUserspace),
		IPv4Only: true,
		// The agent's default status period (the harness's is 1 s, for quick tests).
		AgentArgs: []string{"--status-period", "10s"},
	})
	real, err := c.AddNode(ctx, "real")
	if err != nil {
		b.Fatal(err)
	}
	if err := c.SetMode(ctx, v1alpha1.ModeWireGuard); err != nil {
		b.Fatal(err)
	}
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
		b.Fatal(err)
	}
	cl := fastClient(b, c)
	sims := simNodes(b, n)

	// Phase 1: create every simulated node while the agent runs.
	b.StartTimer()
	start := time.Now()
	if err := createAll(ctx, cl, sims); err != nil {
		b.Fatal(err)
	}
	r.CreateSeconds = time.Since(start).Seconds()
	if _, err := waitPeers(real, sims, convergeTimeout); err != nil {
		b.Fatal(err)
	}
	r.CreateConvergedSeconds = time.Since(start).Seconds()
	b.StopTimer()
	b.Logf("N=%d: created in %.1fs, all peers on the device %.1fs after the first create", n, r.CreateSeconds, r.CreateConvergedSeconds)
	r.AfterCreate = resources(b, real)
	r.DeviceReadMillis = deviceReadMillis(b, real)

	// Phase 2: single key changes, then single endpoint changes.
	measureChanges(b, ctx, cl, real, sims, changes, &r)
	measureEndpointChanges(b, ctx, cl, real, sims, min(changes, 3), &r)

	// Phase 3: agent starts on an empty device with every MeshNode in the API.
	for i := range colds {
		if err := real.StopAgent(); err != nil {
			b.Fatal(err)
		}
		emptyNode(b, ctx, real)
		start := time.Now()
		if err := real.StartAgent(); err != nil {
			b.Fatal(err)
		}
		if _, err := waitPeers(real, sims, convergeTimeout); err != nil {
			b.Fatal(err)
		}
		d := time.Since(start)
		r.ColdStartSeconds = append(r.ColdStartSeconds, d.Seconds())
		b.Logf("N=%d: cold start %d: all peers on the device %.2fs after the agent started", n, i+1, d.Seconds())
	}
	if colds > 0 {
		waitQuiet(b, real)
		r.ColdStartOps = opsOf(scrape(b, real))
		// One more change on the restarted agent, so the end state includes it.
		measureChanges(b, ctx, cl, real, sims, 1, &r)
		r.AfterColdStart = resources(b, real)
	}
	return r
}

// measureChanges changes the key of count simulated nodes, one at a time, and records the
// latency to the device and the agent's operations for each.
func measureChanges(b *testing.B, ctx context.Context, cl client.Client, real *cluster.Node, sims []sim, count int, r *Result) {
	for range count {
		s := &sims[(len(r.ChangeMillis)*7919+1)%len(sims)]
		waitQuiet(b, real)
		before := scrape(b, real)
		old := s.key
		s.key = newPublicKey(b)
		b.StartTimer()
		start := time.Now()
		patch := fmt.Appendf(nil, `{"spec":{"wireguard":{"publicKey":%q}}}`, s.key.String())
		mn := &v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: s.name}}
		if err := cl.Patch(ctx, mn, client.RawPatch("application/merge-patch+json", patch)); err != nil {
			b.Fatal(err)
		}
		seen, err := waitKey(real, s.key, old, time.Minute)
		if err != nil {
			b.Fatal(err)
		}
		d := time.Since(start)
		b.StopTimer()
		waitQuiet(b, real)
		ops := opsOf(scrape(b, real)).minus(opsOf(before))
		r.ChangeMillis = append(r.ChangeMillis, float64(d.Microseconds())/1000)
		r.ChangeSeenMillis = append(r.ChangeSeenMillis, float64(seen.Sub(start).Microseconds())/1000)
		r.ChangeOps = append(r.ChangeOps, ops)
		b.Logf("N=%d: key change of %s on the device after %v (seen by a read started after %v); %+v", len(sims), s.name,
			d.Round(time.Millisecond), seen.Sub(start).Round(time.Millisecond), ops)
	}
}

// measureEndpointChanges moves count simulated nodes, one at a time, to a new underlay
// address and records the latency until the device has the new endpoint, and the agent's
// operations for each.
func measureEndpointChanges(b *testing.B, ctx context.Context, cl client.Client, real *cluster.Node, sims []sim, count int, r *Result) {
	for i := range count {
		s := &sims[(i*4099+7)%len(sims)]
		waitQuiet(b, real)
		before := scrape(b, real)
		a := s.underlay.As4()
		a[1] ^= 1 // 198.18.x.y <-> 198.19.x.y: still unique, still in 198.18.0.0/15
		s.underlay = netip.AddrFrom4(a)
		b.StartTimer()
		start := time.Now()
		patch := fmt.Appendf(nil, `{"spec":{"underlayIPs":[%q]}}`, s.underlay.String())
		mn := &v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: s.name}}
		if err := cl.Patch(ctx, mn, client.RawPatch("application/merge-patch+json", patch)); err != nil {
			b.Fatal(err)
		}
		want := netip.AddrPortFrom(s.underlay, simPort)
		if _, err := waitDevice(real, time.Minute, func(dev *wgtypes.Device) bool {
			for _, p := range dev.Peers {
				if p.PublicKey == s.key && p.Endpoint != nil {
					ap := p.Endpoint.AddrPort()
					return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()) == want
				}
			}
			return false
		}); err != nil {
			b.Fatalf("endpoint of %s: %v", s.name, err)
		}
		d := time.Since(start)
		b.StopTimer()
		waitQuiet(b, real)
		ops := opsOf(scrape(b, real)).minus(opsOf(before))
		r.EndpointChangeMillis = append(r.EndpointChangeMillis, float64(d.Microseconds())/1000)
		r.EndpointChangeOps = append(r.EndpointChangeOps, ops)
		b.Logf("N=%d: endpoint change of %s on the device after %v; %+v", len(sims), s.name, d.Round(time.Millisecond), ops)
	}
}

// fastClient is an admin client that may create thousands of objects quickly.
func fastClient(b *testing.B, c *cluster.Cluster) client.Client {
	kc, err := c.Kubeconfig()
	if err != nil {
		b.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kc)
	if err != nil {
		b.Fatal(err)
	}
	cfg.QPS, cfg.Burst = 2000, 4000
	scheme := kruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		b.Fatal(err)
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		b.Fatal(err)
	}
	cl, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		b.Fatal(err)
	}
	return cl
}

// createAll creates each simulated node's Node and then its MeshNode, createWorkers at a time.
func createAll(ctx context.Context, cl client.Client, sims []sim) error {
	work := make(chan sim)
	errs := make(chan error, createWorkers)
	var wg sync.WaitGroup
	for range createWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range work {
				if err := cl.Create(ctx, s.node()); err != nil {
					errs <- fmt.Errorf("create Node %s: %w", s.name, err)
					return
				}
				if err := cl.Create(ctx, s.meshNode()); err != nil {
					errs <- fmt.Errorf("create MeshNode %s: %w", s.name, err)
					return
				}
			}
		}()
	}
	var err error
feed:
	for _, s := range sims {
		select {
		case work <- s:
		case err = <-errs:
			break feed
		}
	}
	close(work)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return err
}

// waitPeers polls the node's device until it has a peer with every simulated node's current
// key.
func waitPeers(n *cluster.Node, sims []sim, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	want := make(map[wgtypes.Key]bool, len(sims))
	for _, s := range sims {
		want[s.key] = true
	}
	last := ""
	for {
		dev, err := n.WireGuardDevice()
		if err == nil {
			have := 0
			for _, p := range dev.Peers {
				if want[p.PublicKey] {
					have++
				}
			}
			if have == len(want) {
				return time.Since(start), nil
			}
			last = fmt.Sprintf("%d of %d peers on the device", have, len(want))
		} else {
			last = err.Error()
		}
		if time.Since(start) > timeout {
			return 0, fmt.Errorf("after %v: %s", timeout, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitKey polls the node's device until it has a peer with key and none with old.
func waitKey(n *cluster.Node, key, old wgtypes.Key, timeout time.Duration) (time.Time, error) {
	seen, err := waitDevice(n, timeout, func(dev *wgtypes.Device) bool {
		var haveNew, haveOld bool
		for _, p := range dev.Peers {
			haveNew = haveNew || p.PublicKey == key
			haveOld = haveOld || p.PublicKey == old
		}
		return haveNew && !haveOld
	})
	if err != nil {
		return seen, fmt.Errorf("key %s: %w", wireguard.Fingerprint(key), err)
	}
	return seen, nil
}

// waitDevice polls the node's device, with 10 ms between reads (a read of thousands of peers
// costs the device and this process tens of milliseconds of CPU, which the agent needs too),
// until done says so. The latency measured includes at most one read more than needed.
//
// It returns when the read that saw it started: the device's UAPI answers with the state of
// when it took the request, so that is a tighter upper bound of the moment the change landed
// than the end of the read.
func waitDevice(n *cluster.Node, timeout time.Duration, done func(*wgtypes.Device) bool) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		start := time.Now()
		dev, err := n.WireGuardDevice()
		if err == nil && done(dev) {
			return start, nil
		}
	}
	return time.Time{}, fmt.Errorf("not on the device after %v", timeout)
}

// deviceReadMillis is the mean time of one full device read.
func deviceReadMillis(b *testing.B, n *cluster.Node) float64 {
	const reads = 10
	start := time.Now()
	for range reads {
		if _, err := n.WireGuardDevice(); err != nil {
			b.Fatal(err)
		}
	}
	return float64(time.Since(start).Microseconds()) / 1000 / reads
}

// waitQuiet waits until the agent's reconcile count has not moved for a second (at most 30 s):
// the work a change caused, its own status write and the reconcile that write triggers
// included.
func waitQuiet(b *testing.B, n *cluster.Node) {
	deadline := time.Now().Add(30 * time.Second)
	last := -1.0
	for time.Now().Before(deadline) {
		cur := opsOf(scrape(b, n)).Reconciles
		if cur == last {
			return
		}
		last = cur
		time.Sleep(time.Second)
	}
	b.Logf("agent of %s still reconciling after 30s", n.Name)
}

// scrape reads the agent's metrics from inside the node's namespace.
func scrape(b *testing.B, n *cluster.Node) map[string]float64 {
	b.Helper()
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) { return n.NS.DialTCP(ctx, addr) },
	}}
	var body []byte
	var err error
	for try := 0; try < 50; try++ { // the metrics server needs a moment after an agent start
		var resp *http.Response
		resp, err = hc.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort))
		if err == nil {
			body, err = io.ReadAll(resp.Body)
			resp.Body.Close()
			if err == nil {
				break
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		b.Fatalf("scrape the agent of %s: %v", n.Name, err)
	}
	fams, err := new(expfmt.TextParser).TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		b.Fatal(err)
	}
	out := map[string]float64{}
	for name, f := range fams {
		if !strings.HasPrefix(name, "meshcrypt_wireguard_") && !strings.HasPrefix(name, "meshcrypt_route_") &&
			name != "meshcrypt_reconcile_duration_seconds" && name != "go_memstats_heap_inuse_bytes" {
			continue
		}
		for _, m := range f.GetMetric() {
			key := name
			for _, l := range m.GetLabel() {
				if l.GetName() == "op" {
					key += "/" + l.GetValue()
				}
			}
			switch {
			case m.Counter != nil:
				out[key] += m.GetCounter().GetValue()
			case m.Gauge != nil:
				out[key] += m.GetGauge().GetValue()
			case m.Histogram != nil:
				out[key+"_count"] += float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return out
}

func opsOf(m map[string]float64) Ops {
	return Ops{
		Reconciles:    m["meshcrypt_reconcile_duration_seconds_count"],
		Configures:    m["meshcrypt_wireguard_configure_total"],
		PeersAdded:    m["meshcrypt_wireguard_peer_updates_total/add"],
		PeersUpdated:  m["meshcrypt_wireguard_peer_updates_total/update"],
		PeersRemoved:  m["meshcrypt_wireguard_peer_updates_total/remove"],
		NodeUpdates:   m["meshcrypt_wireguard_node_updates_total"],
		RouteReplaces: m["meshcrypt_route_operations_total/replace"],
		RouteDeletes:  m["meshcrypt_route_operations_total/delete"],
		RuleOps:       m["meshcrypt_route_operations_total/rule_add"] + m["meshcrypt_route_operations_total/rule_delete"],
	}
}

func (o Ops) minus(p Ops) Ops {
	return Ops{
		Reconciles: o.Reconciles - p.Reconciles, Configures: o.Configures - p.Configures,
		PeersAdded: o.PeersAdded - p.PeersAdded, PeersUpdated: o.PeersUpdated - p.PeersUpdated, PeersRemoved: o.PeersRemoved - p.PeersRemoved,
		NodeUpdates:   o.NodeUpdates - p.NodeUpdates,
		RouteReplaces: o.RouteReplaces - p.RouteReplaces, RouteDeletes: o.RouteDeletes - p.RouteDeletes, RuleOps: o.RuleOps - p.RuleOps,
	}
}

// emptyNode deletes the node's WireGuard device (stopping its userspace process) and flushes
// the tunnel routes, as on a node that boots: the next agent start configures everything.
func emptyNode(b *testing.B, ctx context.Context, n *cluster.Node) {
	h, err := n.NS.Handle()
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	dev, err := wireguard.Ensure(ctx, wireguard.EnsureOptions{Name: n.Iface, Backend: wireguard.BackendUserspace, Netlink: h, NetNS: n.NS.Path})
	if err != nil {
		b.Fatal(err)
	}
	if err := dev.Delete(ctx); err != nil {
		b.Fatal(err)
	}
	for _, fam := range []string{"-4", "-6"} {
		out, err := n.NS.Command(ctx, "ip", fam, "route", "flush", "table", strconv.Itoa(datapath.DefaultTable)).CombinedOutput()
		if err != nil && !strings.Contains(string(out), "does not exist") {
			b.Fatalf("flush routes: %v: %s", err, out)
		}
	}
}

// resources reads the agent's and its device process's memory and CPU from /proc.
func resources(b *testing.B, n *cluster.Node) Resources {
	pid := n.AgentPID()
	if pid == 0 {
		b.Fatalf("no agent runs on %s", n.Name)
	}
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if got := strings.TrimSpace(string(comm)); got != "meshcrypt-agent" {
		b.Fatalf("pid %d is %q, not the agent", pid, got)
	}
	var r Resources
	r.RSSMB, r.HWMMB = statusKB(b, pid, "VmRSS")/1024, statusKB(b, pid, "VmHWM")/1024
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name (which may hold spaces) : utime and stime are fields 14
	// and 15 of the whole line, 12 and 13 after ") ".
	f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	r.CPUSeconds = (ut + st) / clockTicks
	if dpid, err := wireguard.DevicePID(n.Iface); err == nil {
		r.DeviceRSSMB = statusKB(b, dpid, "VmRSS") / 1024
	}
	r.HeapInuseMB = scrape(b, n)["go_memstats_heap_inuse_bytes"] / (1 << 20)
	return r
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times: 100 on every Linux platform Go
// supports.
const clockTicks = 100

func statusKB(b *testing.B, pid int, field string) float64 {
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(s), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				b.Fatal(err)
			}
			return kb
		}
	}
	b.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

func reportResult(b *testing.B, r Result) {
	b.ReportMetric(r.CreateConvergedSeconds, "create-converged-s")
	if len(r.ColdStartSeconds) > 0 {
		b.ReportMetric(median(r.ColdStartSeconds), "cold-start-s")
	}
	if len(r.ChangeMillis) > 0 {
		b.ReportMetric(median(r.ChangeMillis), "change-median-ms")
		b.ReportMetric(median(r.ChangeSeenMillis), "change-seen-median-ms")
		b.ReportMetric(slices.Max(r.ChangeMillis), "change-max-ms")
		var cfg, peers, nodes, routes float64
		for _, o := range r.ChangeOps {
			cfg = max(cfg, o.Configures)
			peers = max(peers, o.PeersAdded+o.PeersUpdated+o.PeersRemoved)
			nodes = max(nodes, o.NodeUpdates)
			routes = max(routes, o.RouteReplaces+o.RouteDeletes+o.RuleOps)
		}
		b.ReportMetric(cfg, "configures/change")
		b.ReportMetric(peers, "peers/change")
		b.ReportMetric(nodes, "node-updates/change")
		b.ReportMetric(routes, "route-ops/change")
	}
	if len(r.EndpointChangeMillis) > 0 {
		b.ReportMetric(median(r.EndpointChangeMillis), "endpoint-change-median-ms")
		var cfg, peers, nodes float64
		for _, o := range r.EndpointChangeOps {
			cfg = max(cfg, o.Configures)
			peers = max(peers, o.PeersAdded+o.PeersUpdated+o.PeersRemoved)
			nodes = max(nodes, o.NodeUpdates)
		}
		b.ReportMetric(cfg, "configures/endpoint-change")
		b.ReportMetric(peers, "peers/endpoint-change")
		b.ReportMetric(nodes, "node-updates/endpoint-change")
	}
	res := r.AfterColdStart
	if res == (Resources{}) {
		res = r.AfterCreate
	}
	b.ReportMetric(res.HWMMB, "agent-peak-MiB")
	b.ReportMetric(r.AfterCreate.CPUSeconds, "agent-cpu-s")
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// outDir is where the results go.
func outDir() string {
	if dir := os.Getenv(envOut); dir != "" {
		return dir
	}
	return filepath.Join("..", "..", "bench")
}

// writeOutputs writes scale.json and scale-convergence.svg.
func writeOutputs(results []Result) error {
	dir := outDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	rep := Report{
		Machine: machine(),
		Command: "make bench (go test -run '^$' -bench ControlPlaneScale -benchtime 1x -timeout 60m ./tests/scale/)",
		Date:    time.Now().UTC().Format(time.RFC3339),
		Results: results,
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "scale.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	return writePlot(dir, results)
}

// writePlot writes scale-convergence.svg: convergence and change latency against N.
func writePlot(dir string, results []Result) error {
	var created, cold, change, changeMax, seen, endpoint benchplot.Series
	created.Name, cold.Name = "first create → all peers", "agent start → all peers"
	change.Name, changeMax.Name = "key change, median", "key change, max"
	seen.Name, endpoint.Name = "key change, read start", "endpoint change, median"
	for _, r := range results {
		x := float64(r.N)
		created.X, created.Y = append(created.X, x), append(created.Y, r.CreateConvergedSeconds)
		if len(r.ColdStartSeconds) > 0 {
			cold.X, cold.Y = append(cold.X, x), append(cold.Y, median(r.ColdStartSeconds))
		}
		if len(r.ChangeMillis) > 0 {
			change.X, change.Y = append(change.X, x), append(change.Y, median(r.ChangeMillis))
			changeMax.X, changeMax.Y = append(changeMax.X, x), append(changeMax.Y, slices.Max(r.ChangeMillis))
			seen.X, seen.Y = append(seen.X, x), append(seen.Y, median(r.ChangeSeenMillis))
		}
		if len(r.EndpointChangeMillis) > 0 {
			endpoint.X, endpoint.Y = append(endpoint.X, x), append(endpoint.Y, median(r.EndpointChangeMillis))
		}
	}
	var conv, lat, out bytes.Buffer
	if err := benchplot.Line(&conv, "Convergence: every simulated node a peer on the device", "simulated nodes (N)", "seconds", true, created, cold); err != nil {
		return err
	}
	if err := benchplot.Line(&lat, "One node's change on the device", "simulated nodes (N)", "milliseconds", true, change, changeMax, seen, endpoint); err != nil {
		return err
	}
	if err := benchplot.Stack(&out, conv.Bytes(), lat.Bytes()); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "scale-convergence.svg"), out.Bytes(), 0o644)
}

// machine describes the host: CPU model, cores, memory, kernel.
func machine() string {
	model := ""
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 1 {
			if kb, err := strconv.ParseFloat(f[1], 64); err == nil {
				mem = fmt.Sprintf(", %.0f GiB", kb/1024/1024)
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return fmt.Sprintf("%s, %d cores%s, Linux %s, %s", model, runtime.NumCPU(), mem, strings.TrimSpace(string(kernel)), runtime.Version())
}

func parseSizes(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%s: %q is not a positive number", envN, f)
		}
		out = append(out, n)
	}
	return out, nil
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func envInt(b *testing.B, key string, def int) int {
	v := os.Getenv(key)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		b.Fatalf("%s=%q: want a number >= 0", key, v)
	}
	return n
}
