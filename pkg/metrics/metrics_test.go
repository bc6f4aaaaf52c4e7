package metrics_test

import (
	"context"
	"errors"
	"fmt"
	"github.com/meshcrypt/meshcrypt/internal/deptest"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"github.com/meshcrypt/meshcrypt/pkg/metrics"
	"github.com/meshcrypt/meshcrypt/pkg/metrics/metricstest"
)

var now = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)

// fullState is a Source state with something in every metric.
func fullState() metricstest.State {
	return metricstest.State{
		Peers: []metrics.Peer{
			{Name: "node2", Fingerprint: "sha256:0011223344556677", LastHandshake: now.Add(-42 * time.Second), ReceiveBytes: 1000, TransmitBytes: 2000, Ready: true},
			{Name: "node3", Fingerprint: "sha256:8899aabbccddeeff", ReceiveBytes: 0, TransmitBytes: 148, Ready: false},
		},
		Verdicts: []metrics.Verdict{
			{Reason: "allowed", Packets: 10, Bytes: 1000},
			{Reason: "denied_egress", Dropped: true, Packets: 3, Bytes: 180},
			{Reason: "drop_not_encrypted", Dropped: true, Packets: 7, Bytes: 700},
		},
		KeyAge: 90 * time.Minute,
		HasKey: true,
	}
}

// serve starts a Server on 127.0.0.1:0 for the test and returns its base URL.
func serve(t *testing.T, opts metrics.ServerOptions) string {
	t.Helper()
	srv, err := metrics.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return "http://" + ln.Addr().String()
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// scrape fetches /metrics and parses the text exposition.
func scrape(t *testing.T, base string) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := get(t, base+metrics.PathMetrics)
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d\n%s", code, body)
	}
	var p expfmt.TextParser
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	return fams
}

// samples flattens the meshcrypt_ families into "name{l1=v1,l2=v2}" -> value; histograms
// contribute their _count and _sum.
func samples(fams map[string]*dto.MetricFamily) map[string]float64 {
	out := map[string]float64{}
	for name, f := range fams {
		if !strings.HasPrefix(name, metrics.Namespace+"_") {
			continue
		}
		for _, m := range f.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			sort.Strings(ls)
			key := name + "{" + strings.Join(ls, ",") + "}"
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				out[key] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				out[key] = m.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				k := strings.TrimPrefix(key, name)
				out[name+"_count"+k] = float64(m.GetHistogram().GetSampleCount())
				out[name+"_sum"+k] = m.GetHistogram().GetSampleSum()
			default:
				out[key] = -1 // unexpected type: shows up in the diff
			}
		}
	}
	return out
}

func TestScrape(t *testing.T) {
	src := &metricstest.Source{}
	src.Set(fullState())
	rec := metrics.New(metrics.Options{
		Source: src,
		XFRM:   metricstest.XFRM{Stats: map[string]uint64{"XfrmInError": 2, "XfrmOutNoStates": 0}},
		Conntrack: metricstest.Conntrack{Loaded: true,
			Stats: metrics.Conntrack{Created: 40, CreateFailed: 1, Rejudged: 7, Capacity: 262144}},
		Now: func() time.Time { return now },
	})
	rec.SetMode("Disabled")
	rec.SetMode("WireGuard")
	rec.ObserveReconcile(30*time.Millisecond, nil)
	rec.ObserveReconcile(20*time.Millisecond, nil)
	rec.ObserveReconcile(2*time.Second, errors.New("boom"))
	rec.KeyRotated()
	rec.WireGuardConfigured(5000, 0, 0)
	rec.WireGuardConfigured(1, 0, 1)
	rec.WireGuardNodesUpdated(5000)
	rec.WireGuardNodesUpdated(1)
	rec.RouteOps(2, 0, 2, 0)
	rec.RouteOps(2, 2, 0, 0)
	base := serve(t, metrics.ServerOptions{Gatherer: rec.Gatherer()})

	fams := scrape(t, base)
	want := map[string]float64{
		"meshcrypt_encryption_mode{mode=Disabled}":                                       0,
		"meshcrypt_encryption_mode{mode=WireGuard}":                                      1,
		"meshcrypt_peers{state=ready}":                                                   1,
		"meshcrypt_peers{state=not_ready}":                                               1,
		"meshcrypt_peer_ready{fingerprint=sha256:0011223344556677,peer=node2}":           1,
		"meshcrypt_peer_ready{fingerprint=sha256:8899aabbccddeeff,peer=node3}":           0,
		"meshcrypt_peer_handshake_age_seconds{peer=node2}":                               42,
		"meshcrypt_peer_receive_bytes_total{peer=node2}":                                 1000,
		"meshcrypt_peer_transmit_bytes_total{peer=node2}":                                2000,
		"meshcrypt_peer_receive_bytes_total{peer=node3}":                                 0,
		"meshcrypt_peer_transmit_bytes_total{peer=node3}":                                148,
		"meshcrypt_policy_verdict_packets_total{reason=allowed,verdict=pass}":            10,
		"meshcrypt_policy_verdict_bytes_total{reason=allowed,verdict=pass}":              1000,
		"meshcrypt_policy_verdict_packets_total{reason=denied_egress,verdict=drop}":      3,
		"meshcrypt_policy_verdict_bytes_total{reason=denied_egress,verdict=drop}":        180,
		"meshcrypt_policy_verdict_packets_total{reason=drop_not_encrypted,verdict=drop}": 7,
		"meshcrypt_policy_verdict_bytes_total{reason=drop_not_encrypted,verdict=drop}":   700,
		"meshcrypt_key_age_seconds{}":                                                    5400,
		"meshcrypt_key_rotations_total{}":                                                1,
		"meshcrypt_reconcile_duration_seconds_count{result=success}":                     2,
		"meshcrypt_reconcile_duration_seconds_sum{result=success}":                       0.05,
		"meshcrypt_reconcile_duration_seconds_count{result=error}":                       1,
		"meshcrypt_reconcile_duration_seconds_sum{result=error}":                         2,
		"meshcrypt_xfrm_errors_total{field=XfrmInError}":                                 2,
		"meshcrypt_xfrm_errors_total{field=XfrmOutNoStates}":                             0,
		"meshcrypt_metrics_source_errors_total{source=peers}":                            0,
		"meshcrypt_metrics_source_errors_total{source=verdicts}":                         0,
		"meshcrypt_metrics_source_errors_total{source=xfrm}":                             0,
		"meshcrypt_metrics_source_errors_total{source=conntrack}":                        0,
		"meshcrypt_policy_connections_total{event=created}":                              40,
		"meshcrypt_policy_connections_total{event=create_failed}":                        1,
		"meshcrypt_policy_connections_total{event=rejudged}":                             7,
		"meshcrypt_policy_connection_table_capacity{}":                                   262144,
		"meshcrypt_wireguard_configure_total{}":                                          2,
		"meshcrypt_wireguard_peer_updates_total{op=add}":                                 5001,
		"meshcrypt_wireguard_peer_updates_total{op=update}":                              0,
		"meshcrypt_wireguard_peer_updates_total{op=remove}":                              1,
		"meshcrypt_wireguard_node_updates_total{}":                                       5001,
		"meshcrypt_route_operations_total{op=replace}":                                   4,
		"meshcrypt_route_operations_total{op=delete}":                                    2,
		"meshcrypt_route_operations_total{op=rule_add}":                                  2,
		"meshcrypt_route_operations_total{op=rule_delete}":                               0,
	}
	if diff := cmp.Diff(want, samples(fams), cmp.Comparer(approx)); diff != "" {
		t.Errorf("scraped samples (-want +got):\n%s", diff)
	}
	// Types, as PromQL functions expect them (rate() on counters, histogram_quantile on
	// the histogram).
	wantTypes := map[string]dto.MetricType{
		"meshcrypt_peers":                        dto.MetricType_GAUGE,
		"meshcrypt_peer_receive_bytes_total":     dto.MetricType_COUNTER,
		"meshcrypt_policy_verdict_packets_total": dto.MetricType_COUNTER,
		"meshcrypt_reconcile_duration_seconds":   dto.MetricType_HISTOGRAM,
		"meshcrypt_xfrm_errors_total":            dto.MetricType_COUNTER,
		"meshcrypt_policy_connections_total":     dto.MetricType_COUNTER,
	}
	for name, typ := range wantTypes {
		if got := fams[name].GetType(); got != typ {
			t.Errorf("%s has type %s, want %s", name, got, typ)
		}
	}
	for name, f := range fams {
		if f.GetHelp() == "" {
			t.Errorf("%s has no help text", name)
		}
	}
	// The Go runtime and process collectors are there too.
	for _, name := range []string{"go_goroutines", "process_start_time_seconds"} {
		if fams[name] == nil {
			t.Errorf("%s missing", name)
		}
	}
}

func approx(a, b float64) bool { return a == b || (a-b < 1e-9 && b-a < 1e-9) }

// A failing source drops its own metrics only, counts the failure and keeps /metrics up.
func TestScrapeSourceErrors(t *testing.T) {
	src := &metricstest.Source{}
	st := fullState()
	st.PeersErr = errors.New("wgctrl: device gone")
	st.HasKey = false
	src.Set(st)
	rec := metrics.New(metrics.Options{Source: src, XFRM: metricstest.XFRM{Err: errors.New("no xfrm_stat")}})
	base := serve(t, metrics.ServerOptions{Gatherer: rec.Gatherer()})
	scrape(t, base)
	got := samples(scrape(t, base))
	for k, v := range map[string]float64{
		"meshcrypt_metrics_source_errors_total{source=peers}":                 1, // at least one scrape before
		"meshcrypt_metrics_source_errors_total{source=verdicts}":              0,
		"meshcrypt_metrics_source_errors_total{source=xfrm}":                  1,
		"meshcrypt_policy_verdict_packets_total{reason=allowed,verdict=pass}": 10,
	} {
		if got[k] < v || (v == 0 && got[k] != 0) {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	for k := range got {
		for _, absent := range []string{"meshcrypt_peers{", "meshcrypt_peer_", "meshcrypt_key_age_seconds{", "meshcrypt_xfrm_errors_total{"} {
			if strings.HasPrefix(k, absent) {
				t.Errorf("%s exported although its source failed", k)
			}
		}
	}
}

// Without a Source the recorded metrics are still served, and nothing else of meshcrypt's.
func TestNoSource(t *testing.T) {
	rec := metrics.New(metrics.Options{})
	rec.SetMode("WireGuard")
	rec.SetMode("WireGuard")
	base := serve(t, metrics.ServerOptions{Gatherer: rec.Gatherer()})
	var names []string
	for k := range samples(scrape(t, base)) {
		names = append(names, k)
	}
	sort.Strings(names)
	want := []string{
		"meshcrypt_encryption_mode{mode=WireGuard}",
		"meshcrypt_key_rotations_total{}",
		"meshcrypt_reconcile_duration_seconds_count{result=error}",
		"meshcrypt_reconcile_duration_seconds_count{result=success}",
		"meshcrypt_reconcile_duration_seconds_sum{result=error}",
		"meshcrypt_reconcile_duration_seconds_sum{result=success}",
		"meshcrypt_route_operations_total{op=delete}",
		"meshcrypt_route_operations_total{op=replace}",
		"meshcrypt_route_operations_total{op=rule_add}",
		"meshcrypt_route_operations_total{op=rule_delete}",
		"meshcrypt_wireguard_configure_total{}",
		"meshcrypt_wireguard_node_updates_total{}",
		"meshcrypt_wireguard_peer_updates_total{op=add}",
		"meshcrypt_wireguard_peer_updates_total{op=remove}",
		"meshcrypt_wireguard_peer_updates_total{op=update}",
	}
	if diff := cmp.Diff(want, names); diff != "" {
		t.Errorf("series (-want +got):\n%s", diff)
	}
}

func TestHealthAndReadiness(t *testing.T) {
	notReady := errors.New("informers not synced")
	var (
		mu         sync.Mutex
		ready      = notReady
		readyCalls int
	)
	setReady := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		ready = err
	}
	rec := metrics.New(metrics.Options{})
	base := serve(t, metrics.ServerOptions{
		Gatherer: rec.Gatherer(),
		Ready: func() error {
			mu.Lock()
			defer mu.Unlock()
			readyCalls++
			return ready
		},
	})
	if code, body := get(t, base+metrics.PathHealthz); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz = %d %q, want 200 ok", code, body)
	}
	if code, body := get(t, base+metrics.PathReadyz); code != http.StatusServiceUnavailable || !strings.Contains(body, "informers not synced") {
		t.Errorf("/readyz while not ready = %d %q, want 503 with the reason", code, body)
	}
	setReady(nil)
	if code, body := get(t, base+metrics.PathReadyz); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/readyz when ready = %d %q, want 200 ok", code, body)
	}
	setReady(fmt.Errorf("reconcile failed: %w", notReady))
	if code, _ := get(t, base+metrics.PathReadyz); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz after readiness was lost = %d, want 503", code)
	}
	mu.Lock()
	defer mu.Unlock()
	if readyCalls != 3 {
		t.Errorf("Ready called %d times, want once per request (3)", readyCalls)
	}
	if code, _ := get(t, base+"/nothing"); code != http.StatusNotFound {
		t.Errorf("GET /nothing = %d, want 404", code)
	}
}

// Run listens on its address and returns nil once its context ends.
func TestRun(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	srv, err := metrics.NewServer(metrics.ServerOptions{Addr: addr, Gatherer: metrics.New(metrics.Options{}).Gatherer()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + metrics.PathHealthz)
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server never answered: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run after cancel: %v", err)
	}
	// A taken address is an error, not a hang.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	srv, _ = metrics.NewServer(metrics.ServerOptions{Addr: busy.Addr().String(), Gatherer: metrics.New(metrics.Options{}).Gatherer()})
	if err := srv.Run(t.Context()); err == nil || !strings.Contains(err.Error(), "listen") {
		t.Fatalf("Run on a taken address: %v, want a listen error", err)
	}
}

func TestNewServerNeedsGatherer(t *testing.T) {
	if _, err := metrics.NewServer(metrics.ServerOptions{}); err == nil {
		t.Fatal("NewServer without a Gatherer succeeded")
	}
}

// TestDeps guards the boundary stated in doc.go.
func TestDeps(t *testing.T) {
	deptest.Check(t, deptest.Rules{
		Packages: []string{".", "./metricstest"},
		Banned:   []string{"k8s.io/", "sigs.k8s.io/", "github.com/cilium/ebpf", "github.com/vishvananda/", "golang.zx2c4.com/"},
		Own:      []string{"pkg/metrics"},
	})
}
