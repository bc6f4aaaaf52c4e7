package flow

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var (
	webLabels = map[string]string{"app": "web", "meshcrypt.io/namespace": "default",
		"meshcrypt.io/serviceaccount": "default", "meshcrypt.io/cluster": "c1"}
	dbLabels = map[string]string{"app": "db", "tier": "data", "meshcrypt.io/namespace": "prod",
		"meshcrypt.io/serviceaccount": "db", "meshcrypt.io/cluster": "c1"}
)

func testRecord(verdict Verdict) Record {
	return Record{
		Time: time.Date(2025, 3, 4, 5, 6, 7, 890_000_000, time.UTC),
		Node: "n1",
		Flow: &Flow{
			Direction: "from_pod", Verdict: verdict, Reason: "denied_ingress", Protocol: "UDP", Length: 60,
			Remote:      true,
			Source:      Endpoint{Identity: 70000, Labels: webLabels, IP: netip.MustParseAddr("10.244.1.5"), Port: 40000},
			Destination: Endpoint{Identity: 70001, Labels: dbLabels, IP: netip.MustParseAddr("fd00::7"), Port: 7100},
		},
	}
}

func TestRecordJSON(t *testing.T) {
	r := testRecord(Drop)
	r.Flow.Source.Labels = map[string]string{"app": "web"}
	r.Flow.Destination = Endpoint{Identity: 2}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"time":"2025-03-04T05:06:07.89Z","node":"n1","flow":{"direction":"from_pod","verdict":"drop",` +
		`"reason":"denied_ingress","encrypted":false,"remote":true,"protocol":"UDP","length":60,` +
		`"source":{"identity":70000,"labels":{"app":"web"},"ip":"10.244.1.5","port":40000},"destination":{"identity":2}}}`
	if string(b) != want {
		t.Errorf("JSON:\n got %s\nwant %s", b, want)
	}
	var back Record
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(r, back, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Errorf("round trip (-want +got):\n%s", diff)
	}
	lost, _ := json.Marshal(Record{Time: r.Time, Node: "n2", Lost: &Lost{Events: 3, Cause: LostSlowClient}})
	if want := `{"time":"2025-03-04T05:06:07.89Z","node":"n2","lost":{"events":3,"cause":"slow_client"}}`; string(lost) != want {
		t.Errorf("lost JSON: %s", lost)
	}
}

func TestText(t *testing.T) {
	r := testRecord(Drop)
	r.Time = time.Date(2025, 3, 4, 5, 6, 7, 890_000_000, time.Local)
	allowed := testRecord(Allow)
	allowed.Time = r.Time
	allowed.Flow.Reason, allowed.Flow.Encrypted, allowed.Flow.Protocol, allowed.Flow.TCPFlags = "allowed", true, "TCP", "SYN"
	local := testRecord(Allow)
	local.Time = r.Time
	local.Flow.Remote, local.Flow.Reason = false, "allowed_no_policy"
	local.Flow.Destination = Endpoint{Identity: 2, IP: netip.MustParseAddr("192.0.2.1")}
	reply := testRecord(Allow)
	reply.Time = r.Time
	reply.Flow.Reason, reply.Flow.Connection, reply.Flow.Protocol, reply.Flow.TCPFlags = "allowed", ConnectionReply, "TCP", "SYN|ACK"
	established := testRecord(Allow)
	established.Time = r.Time
	established.Flow.Reason, established.Flow.Connection = "allowed", ConnectionEstablished
	malformed := Record{Time: r.Time, Node: "n2", Flow: &Flow{Direction: "to_pod", Verdict: Drop, Reason: "drop_malformed", Protocol: "0"}}
	for _, tt := range []struct {
		r    Record
		want string
	}{
		{r, "05:06:07.890 n1 from_pod 10.244.1.5:40000 70000(default app=web) -> [fd00::7]:7100 70001(prod app=db tier=data) UDP drop denied_ingress encrypted=no cross-node"},
		{allowed, "05:06:07.890 n1 from_pod 10.244.1.5:40000 70000(default app=web) -> [fd00::7]:7100 70001(prod app=db tier=data) TCP SYN allow allowed encrypted=yes cross-node"},
		{local, "05:06:07.890 n1 from_pod 10.244.1.5:40000 70000(default app=web) -> 192.0.2.1 2(world) UDP allow allowed_no_policy encrypted=no"},
		{reply, "05:06:07.890 n1 from_pod 10.244.1.5:40000 70000(default app=web) -> [fd00::7]:7100 70001(prod app=db tier=data) TCP SYN|ACK allow allowed (reply of an allowed connection) encrypted=no cross-node"},
		{established, "05:06:07.890 n1 from_pod 10.244.1.5:40000 70000(default app=web) -> [fd00::7]:7100 70001(prod app=db tier=data) UDP allow allowed (established) encrypted=no cross-node"},
		{malformed, "05:06:07.890 n2 to_pod ? ? -> ? ? 0 drop drop_malformed encrypted=no"},
		{Record{Time: r.Time, Node: "n1", Lost: &Lost{Events: 12, Cause: LostRingFull}}, "05:06:07.890 n1 lost 12 events (ring_full)"},
	} {
		if got := tt.r.Text(); got != tt.want {
			t.Errorf("Text:\n got %s\nwant %s", got, tt.want)
		}
	}
}

func TestIdentityString(t *testing.T) {
	for _, tt := range []struct {
		id     uint32
		labels map[string]string
		want   string
	}{
		{0, nil, "?"},
		{1, nil, "1(host)"},
		{6, nil, "6(remote-node)"},
		{1 << 24, nil, "16777216(cidr)"},
		{300, nil, "300"},
		{300, map[string]string{"meshcrypt.io/cluster": "x"}, "300"},
		{300, map[string]string{"b": "2", "a": "1"}, "300(a=1 b=2)"},
	} {
		if got := IdentityString(tt.id, tt.labels); got != tt.want {
			t.Errorf("IdentityString(%d, %v) = %q, want %q", tt.id, tt.labels, got, tt.want)
		}
	}
	if got := TCPFlagNames(0x12); got != "SYN|ACK" {
		t.Errorf("TCPFlagNames(0x12) = %q", got)
	}
	if got := TCPFlagNames(0); got != "" {
		t.Errorf("TCPFlagNames(0) = %q", got)
	}
	if got := ProtocolName(58) + ProtocolName(200); got != "ICMPv6200" {
		t.Errorf("ProtocolName: %q", got)
	}
}

func TestFilter(t *testing.T) {
	drop, allow := testRecord(Drop), testRecord(Allow)
	world := testRecord(Drop)
	world.Flow.Source = Endpoint{Identity: 2}
	world.Flow.Destination = Endpoint{Identity: 2}
	lost := Record{Lost: &Lost{Events: 1, Cause: LostRingFull}}
	for _, tt := range []struct {
		name  string
		query string
		want  []bool // drop, allow, world, lost
	}{
		{"all", "", []bool{true, true, true, true}},
		{"drops", "verdict=drop", []bool{true, false, true, true}},
		{"allowed", "verdict=ALLOW", []bool{false, true, false, true}},
		{"by-number-source", "identity=70000", []bool{true, true, false, true}},
		{"by-number-destination", "identity=70001&verdict=drop", []bool{true, false, false, true}},
		{"by-selector", "identity=app%3Ddb", []bool{true, true, false, true}},
		{"by-namespace-selector", "identity=meshcrypt.io%2Fnamespace%3Dprod,tier", []bool{true, true, false, true}},
		{"selector-misses", "identity=app%3Dcache", []bool{false, false, false, true}},
		{"any-term", "identity=app%3Dcache&identity=2", []bool{false, false, true, true}},
		{"negation-needs-labels", "identity=app!%3Dweb", []bool{true, true, false, true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			q, err := url.ParseQuery(tt.query)
			if err != nil {
				t.Fatal(err)
			}
			f, err := ParseQuery(q)
			if err != nil {
				t.Fatal(err)
			}
			// The query round-trips.
			f2, err := ParseQuery(f.Query())
			if err != nil {
				t.Fatalf("re-parse %s: %v", f.Query().Encode(), err)
			}
			for i, r := range []Record{drop, allow, world, lost} {
				if got := f.Match(&r); got != tt.want[i] {
					t.Errorf("record %d: Match = %v, want %v", i, got, tt.want[i])
				}
				if got := f2.Match(&r); got != tt.want[i] {
					t.Errorf("record %d after round trip (%s): Match = %v", i, f.Query().Encode(), got)
				}
			}
		})
	}
	for _, bad := range []string{"identity=0", "identity=a%3D%3D%3Db", "verdict=maybe", "node=n1", "identity="} {
		q, _ := url.ParseQuery(bad)
		if _, err := ParseQuery(q); err == nil {
			t.Errorf("ParseQuery(%s): no error", bad)
		}
	}
}

// FuzzParseQuery: whatever the query, ParseQuery does not panic, and what it accepts
// round-trips through Query.
func FuzzParseQuery(f *testing.F) {
	for _, s := range []string{"", "verdict=drop", "identity=12&identity=app%3Dweb", "identity=a+in+(b,c)", "identity=!x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		q, err := url.ParseQuery(s)
		if err != nil {
			return
		}
		fl, err := ParseQuery(q)
		if err != nil {
			return
		}
		if _, err := ParseQuery(fl.Query()); err != nil {
			t.Errorf("%q parsed, but its re-encoding %q does not: %v", s, fl.Query().Encode(), err)
		}
		var b bytes.Buffer
		r := testRecord(Drop)
		_ = fl.Match(&r)
		b.WriteString(r.Text())
		if !strings.Contains(b.String(), "n1") {
			t.Fatal("text lost the node")
		}
	})
}
