package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/client-go/rest"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/pkg/flow"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
	"github.com/meshcrypt/meshcrypt/pkg/identity/identitytest"
)

// fakeSwitch records what the hub asks of the classifier.
type fakeSwitch struct {
	mu   sync.Mutex
	sets []datapath.FlowConfig
}

func (f *fakeSwitch) SetFlowEvents(cfg datapath.FlowConfig) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sets = append(f.sets, cfg)
	return nil
}

func (f *fakeSwitch) history() []datapath.FlowConfig {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]datapath.FlowConfig(nil), f.sets...)
}

func newFlowAgent(t *testing.T, flows FlowOptions) *Agent {
	t.Helper()
	a, err := New(Options{NodeName: "n1", StateDir: t.TempDir(), RESTConfig: &rest.Config{}, Flows: flows})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestMonitorAddress(t *testing.T) {
	underlay := []v1alpha1.IP{"10.77.0.11", "fd77::11"}
	for _, tt := range []struct {
		listen   string
		rate     uint32
		underlay []v1alpha1.IP
		want     string
	}{
		{":9962", 1000, underlay, "10.77.0.11:9962"},
		{"0.0.0.0:9962", 1000, underlay, "10.77.0.11:9962"},
		{"[::]:9000", 1000, []v1alpha1.IP{"fd77::11"}, "[fd77::11]:9000"},
		{"192.168.1.4:9962", 1000, underlay, "192.168.1.4:9962"},
		{"node1.example:9962", 1000, underlay, "node1.example:9962"},
		{":9962", 0, underlay, ""},       // flows off
		{"", 1000, underlay, ""},         // no metrics server
		{":9962", 1000, nil, ""},         // no address known yet
		{"nonsense", 1000, underlay, ""}, // not host:port
	} {
		a := newFlowAgent(t, FlowOptions{Rate: tt.rate, ListenAddr: tt.listen})
		if got := a.monitorAddress(tt.underlay); got != tt.want {
			t.Errorf("monitorAddress(listen %q, rate %d, %v) = %q, want %q", tt.listen, tt.rate, tt.underlay, got, tt.want)
		}
	}
}

func TestFlowRecord(t *testing.T) {
	a := newFlowAgent(t, FlowOptions{Rate: 1})
	a.alloc = identity.NewAllocator(identitytest.NewStore(), identity.AllocatorOptions{Cluster: 1})
	web, err := identity.Canonical(map[string]string{"app": "web"}, "default", "", "c1")
	if err != nil {
		t.Fatal(err)
	}
	a.alloc.Observe(70000, web)
	at := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	got := a.flowRecord(datapath.Flow{
		Time: at, Direction: datapath.ToPod, Reason: datapath.ReasonAllowed,
		SrcIdentity: 70001, DstIdentity: 70000,
		Src: netip.MustParseAddrPort("10.1.0.5:5555"), Dst: netip.MustParseAddrPort("10.0.0.1:80"),
		Proto: 6, TCPFlags: 0x12, Remote: true, Encrypted: true, Length: 74, Tracked: true, Reply: true,
	})
	want := flow.Record{Time: at, Node: "n1", Flow: &flow.Flow{
		Direction: "to_pod", Verdict: flow.Allow, Reason: "allowed", Encrypted: true, Remote: true,
		Connection: flow.ConnectionReply, Protocol: "TCP", TCPFlags: "SYN|ACK", Length: 74,
		Source:      flow.Endpoint{Identity: 70001, IP: netip.MustParseAddr("10.1.0.5"), Port: 5555},
		Destination: flow.Endpoint{Identity: 70000, Labels: web.Map(), IP: netip.MustParseAddr("10.0.0.1"), Port: 80},
	}}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(x, y netip.Addr) bool { return x == y })); diff != "" {
		t.Errorf("record (-want +got):\n%s", diff)
	}
	if r := a.flowRecord(datapath.Flow{Reason: datapath.ReasonDropMalformed}); r.Flow.Verdict != flow.Drop || r.Flow.Source.IP.IsValid() || r.Flow.Connection != flow.ConnectionNew {
		t.Errorf("malformed: %+v", r.Flow)
	}
	if r := a.flowRecord(datapath.Flow{Reason: datapath.ReasonAllowed, Tracked: true}); r.Flow.Connection != flow.ConnectionEstablished {
		t.Errorf("tracked: connection %q", r.Flow.Connection)
	}
}

// TestFlowHub: events are on exactly while clients are connected; a client that does not
// keep up loses records (counted), never blocks the others.
func TestFlowHub(t *testing.T) {
	var h flowHub
	if _, err := h.subscribe(flow.Filter{}); err == nil {
		t.Fatal("subscribe before start: no error")
	}
	sw := &fakeSwitch{}
	on := datapath.FlowConfig{Rate: 5, Sample: 7}
	h.start(sw, on)
	drops := flow.Filter{Verdict: flow.Drop}
	s1, err := h.subscribe(drops)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := h.subscribe(flow.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	rec := func(v flow.Verdict) flow.Record { return flow.Record{Node: "n1", Flow: &flow.Flow{Verdict: v}} }
	for range flowQueue + 3 {
		h.publish(rec(flow.Allow))
	}
	h.publish(rec(flow.Drop))
	if len(s1.ch) != 1 || s1.dropped.Load() != 0 {
		t.Errorf("drops client: %d queued, %d lost; want 1, 0", len(s1.ch), s1.dropped.Load())
	}
	if len(s2.ch) != flowQueue || s2.dropped.Load() != 4 {
		t.Errorf("slow client: %d queued, %d lost; want %d, 4", len(s2.ch), s2.dropped.Load(), flowQueue)
	}
	if err := h.unsubscribe(s1); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]datapath.FlowConfig{on}, sw.history()); diff != "" {
		t.Errorf("one client left: switch (-want +got):\n%s", diff)
	}
	if err := h.unsubscribe(s2); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]datapath.FlowConfig{on, {}}, sw.history()); diff != "" {
		t.Errorf("all gone: switch (-want +got):\n%s", diff)
	}
	// A stopping hub with a client still connected turns events off.
	s3, _ := h.subscribe(flow.Filter{})
	h.start(nil, datapath.FlowConfig{})
	if diff := cmp.Diff([]datapath.FlowConfig{on, {}, on, {}}, sw.history()); diff != "" {
		t.Errorf("stopped: switch (-want +got):\n%s", diff)
	}
	if err := h.unsubscribe(s3); err != nil {
		t.Fatal(err)
	}
}

// TestFlowsHandler streams through a real HTTP server: the filter applies, lines are JSON
// records, a bad query is refused, and the client's going away turns events off.
func TestFlowsHandler(t *testing.T) {
	a := newFlowAgent(t, FlowOptions{Rate: 10, Sample: 1})
	srv := httptest.NewServer(a.FlowsHandler())
	defer srv.Close()

	// Not started: 503.
	resp, err := http.Get(srv.URL + flow.Path)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("before start: %s", resp.Status)
	}
	sw := &fakeSwitch{}
	a.flows.start(sw, datapath.FlowConfig{Rate: 10, Sample: 1})
	for _, bad := range []string{"?verdict=maybe", "?identity=0", "?node=n1"} {
		resp, err := http.Get(srv.URL + flow.Path + bad)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: %s, want 400", bad, resp.Status)
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+flow.Path+"?verdict=drop&identity=70001", nil)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != flow.ContentType {
		t.Fatalf("stream: %s %q", resp.Status, resp.Header.Get("Content-Type"))
	}
	// The headers arrive after the subscription: the hub has the client now.
	if !a.flows.watching() {
		t.Fatal("no client subscribed")
	}
	dst := flow.Endpoint{Identity: 70001}
	a.flows.publish(flow.Record{Node: "n1", Flow: &flow.Flow{Verdict: flow.Allow, Destination: dst}})
	a.flows.publish(flow.Record{Node: "n1", Flow: &flow.Flow{Verdict: flow.Drop, Reason: "denied_egress", Destination: flow.Endpoint{Identity: 9}}})
	a.flows.publish(flow.Record{Node: "n1", Flow: &flow.Flow{Verdict: flow.Drop, Reason: "denied_ingress", Destination: dst}})
	a.flows.publish(flow.Record{Node: "n1", Lost: &flow.Lost{Events: 2, Cause: flow.LostRingFull}})
	sc := bufio.NewScanner(resp.Body)
	var got []flow.Record
	for len(got) < 2 && sc.Scan() {
		var r flow.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		got = append(got, r)
	}
	if len(got) != 2 || got[0].Flow == nil || got[0].Flow.Reason != "denied_ingress" || got[1].Lost == nil || got[1].Lost.Events != 2 {
		t.Fatalf("stream: %+v (%v)", got, sc.Err())
	}

	cancel()
	resp.Body.Close()
	// The handler notices the client is gone and unsubscribes; wait for it (bounded by the
	// test's timeout, not a timing assertion).
	for a.flows.watching() {
		time.Sleep(10 * time.Millisecond)
	}
	if diff := cmp.Diff([]datapath.FlowConfig{{Rate: 10, Sample: 1}, {}}, sw.history()); diff != "" {
		t.Errorf("switch (-want +got):\n%s", diff)
	}
}

// TestFlowsDisabled: with --flow-rate 0 the endpoint says so.
func TestFlowsDisabled(t *testing.T) {
	a := newFlowAgent(t, FlowOptions{})
	a.flows.start(&fakeSwitch{}, datapath.FlowConfig{})
	rec := httptest.NewRecorder()
	a.FlowsHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, flow.Path, nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Errorf("disabled: %d %s", rec.Code, rec.Body)
	}
	if _, ok := a.Handlers()["GET "+flow.Path]; !ok {
		t.Errorf("Handlers lacks GET %s", flow.Path)
	}
}
