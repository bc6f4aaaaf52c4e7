package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshcrypt/meshcrypt/pkg/flow"
)

// fakeAgent serves GET /flows like an agent: the given records, then it holds the stream
// open until the client goes. It records the queries it was asked.
type fakeAgent struct {
	*httptest.Server
	mu      sync.Mutex
	queries []url.Values
}

func newFakeAgent(t *testing.T, node string, recs ...flow.Record) *fakeAgent {
	t.Helper()
	fa := &fakeAgent{}
	fa.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != flow.Path {
			http.NotFound(w, r)
			return
		}
		fa.mu.Lock()
		fa.queries = append(fa.queries, r.URL.Query())
		fa.mu.Unlock()
		f, err := flow.ParseQuery(r.URL.Query())
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", flow.ContentType)
		enc := json.NewEncoder(w)
		for _, rec := range recs {
			rec.Node = node
			if f.Match(&rec) {
				_ = enc.Encode(rec)
			}
		}
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	t.Cleanup(fa.Close)
	return fa
}

func (fa *fakeAgent) addr() string { return strings.TrimPrefix(fa.URL, "http://") }

func testFlow(verdict flow.Verdict, reason string, src, dst uint32) flow.Record {
	return flow.Record{
		Time: time.Date(2025, 6, 7, 8, 9, 10, 0, time.UTC),
		Flow: &flow.Flow{
			Direction: "from_pod", Verdict: verdict, Reason: reason, Protocol: "UDP", Remote: true,
			Encrypted:   verdict == flow.Allow,
			Source:      flow.Endpoint{Identity: src, Labels: map[string]string{"app": "web"}, IP: netip.MustParseAddr("10.244.1.5"), Port: 40000},
			Destination: flow.Endpoint{Identity: dst, Labels: map[string]string{"app": "db"}, IP: netip.MustParseAddr("10.244.2.7"), Port: 7100},
		},
	}
}

func TestMonitorStreams(t *testing.T) {
	lost := flow.Record{Time: time.Date(2025, 6, 7, 8, 9, 11, 0, time.UTC), Lost: &flow.Lost{Events: 3, Cause: flow.LostRateLimited}}
	a1 := newFakeAgent(t, "n1", testFlow(flow.Drop, "denied_ingress", 300, 301), lost, testFlow(flow.Allow, "allowed", 300, 301))
	ctx := context.Background()

	t.Run("json", func(t *testing.T) {
		var out, errOut bytes.Buffer
		err := runMonitor(ctx, &globals{}, monitorOptions{agents: []string{a1.addr()}, output: "json", verdict: "drop", identities: []string{"app=db"}, count: 1},
			&out, &errOut)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(out.String()), "\n")
		if len(lines) != 1 {
			t.Fatalf("%d lines, want 1:\n%s", len(lines), out.String())
		}
		var rec flow.Record
		if err := json.Unmarshal([]byte(lines[0]), &rec); err != nil {
			t.Fatal(err)
		}
		if rec.Node != "n1" || rec.Flow.Verdict != flow.Drop || rec.Flow.Destination.Port != 7100 {
			t.Errorf("record %+v", rec)
		}
		a1.mu.Lock()
		q := a1.queries[len(a1.queries)-1]
		a1.mu.Unlock()
		if q.Get("verdict") != "drop" || q.Get("identity") != "app=db" {
			t.Errorf("query %v", q)
		}
		if !strings.Contains(errOut.String(), "streaming from "+a1.addr()) {
			t.Errorf("stderr %q", errOut.String())
		}
	})

	t.Run("text, lost lines do not count", func(t *testing.T) {
		var out bytes.Buffer
		err := runMonitor(ctx, &globals{}, monitorOptions{agents: []string{a1.addr()}, output: "text", count: 2}, &out, &bytes.Buffer{})
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(out.String()), "\n")
		if len(lines) != 3 || !strings.Contains(lines[0], " n1 from_pod 10.244.1.5:40000 300(app=web) -> 10.244.2.7:7100 301(app=db) UDP drop denied_ingress encrypted=no cross-node") ||
			!strings.Contains(lines[1], " n1 lost 3 events (rate_limited)") || !strings.Contains(lines[2], "allow allowed encrypted=yes") {
			t.Errorf("output:\n%s", out.String())
		}
	})

	t.Run("timeout before the count", func(t *testing.T) {
		var errOut bytes.Buffer
		err := runMonitor(ctx, &globals{}, monitorOptions{agents: []string{a1.addr()}, output: "text", identities: []string{"999"}, count: 1, timeout: 200 * time.Millisecond},
			&bytes.Buffer{}, &errOut)
		if !errors.Is(err, errVerdict) || !strings.Contains(errOut.String(), "0 of 1 flow events") {
			t.Errorf("err %v, stderr %q", err, errOut.String())
		}
	})

	t.Run("timeout without a count", func(t *testing.T) {
		err := runMonitor(ctx, &globals{}, monitorOptions{agents: []string{a1.addr()}, output: "text", identities: []string{"999"}, timeout: 100 * time.Millisecond},
			&bytes.Buffer{}, &bytes.Buffer{})
		if err != nil {
			t.Errorf("err %v", err)
		}
	})

	t.Run("several agents", func(t *testing.T) {
		a2 := newFakeAgent(t, "n2", testFlow(flow.Drop, "denied_egress", 400, 401))
		var out bytes.Buffer
		err := runMonitor(ctx, &globals{}, monitorOptions{agents: []string{a1.addr(), a2.addr()}, output: "text", verdict: "drop", count: 2}, &out, &bytes.Buffer{})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out.String(), " n1 ") || !strings.Contains(out.String(), " n2 ") {
			t.Errorf("output:\n%s", out.String())
		}
	})
}

func TestMonitorErrors(t *testing.T) {
	ctx := context.Background()
	refusing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "flow events are disabled on this agent", http.StatusServiceUnavailable)
	}))
	defer refusing.Close()
	for _, tt := range []struct {
		name string
		o    monitorOptions
		want string
	}{
		{"bad output", monitorOptions{output: "yaml"}, `-o "yaml"`},
		{"bad verdict", monitorOptions{output: "text", verdict: "maybe"}, "--verdict"},
		{"bad identity", monitorOptions{output: "text", identities: []string{"a==b=c"}}, "--identity"},
		{"bad agent", monitorOptions{output: "text", agents: []string{"nohost"}}, "--agent"},
		{"agent and node", monitorOptions{output: "text", agents: []string{"a:1"}, nodes: []string{"n1"}}, "exclude"},
		{"negative count", monitorOptions{output: "text", count: -1}, "negative"},
		{"agent refuses", monitorOptions{output: "text", agents: []string{strings.TrimPrefix(refusing.URL, "http://")}}, "503 Service Unavailable: flow events are disabled"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := runMonitor(ctx, &globals{}, tt.o, &bytes.Buffer{}, &bytes.Buffer{})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err %v, want it to mention %q", err, tt.want)
			}
		})
	}
}
