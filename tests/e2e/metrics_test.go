package e2e

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"

	"github.com/meshcrypt/meshcrypt/tests/cluster"
)

// scrape GETs path from node's agent on its metrics port, from inside the node's namespace.
func scrape(t *testing.T, n *cluster.Node, path string) (int, string) {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) { return n.NS.DialTCP(ctx, addr) },
	}}
	resp, err := client.Get("http://127.0.0.1:9962" + path)
	if err != nil {
		t.Fatalf("scrape %s of %s: %v", path, n.Name, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metricValue sums the samples of a metric whose labels contain every one of want.
func metricValue(t *testing.T, body, name string, want map[string]string) float64 {
	t.Helper()
	fams, err := new(expfmt.TextParser).TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	f, ok := fams[name]
	if !ok {
		return 0
	}
	var sum float64
	for _, m := range f.GetMetric() {
		match := 0
		for _, l := range m.GetLabel() {
			if v, ok := want[l.GetName()]; ok && v == l.GetValue() {
				match++
			}
		}
		if match != len(want) {
			continue
		}
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		}
	}
	return sum
}

// checkMetrics scrapes a live agent: /healthz and /readyz answer, peers are reported ready,
// and the classifier's drop counter moves with denied traffic.
func checkMetrics(t *testing.T, n *cluster.Node, deny func()) {
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, body := scrape(t, n, p); code != http.StatusOK {
			t.Errorf("%s of %s: %d %s", p, n.Name, code, body)
		}
	}
	_, before := scrape(t, n, "/metrics")
	if got := metricValue(t, before, "meshcrypt_peers", map[string]string{"state": "ready"}); got < 1 {
		t.Errorf("meshcrypt_peers{state=ready} = %v, want >= 1\n", got)
	}
	if got := metricValue(t, before, "meshcrypt_key_age_seconds", nil); got <= 0 {
		t.Errorf("meshcrypt_key_age_seconds = %v", got)
	}
	// The node's XFRM error counters are exported (zero without IPsec traffic).
	if !strings.Contains(before, `meshcrypt_xfrm_errors_total{field="XfrmInNoStates"}`) {
		t.Error("meshcrypt_xfrm_errors_total{field=\"XfrmInNoStates\"} not exported")
	}
	// The connection table: traffic has flowed, so connections were entered; its size is
	// the harness's --conntrack-size.
	if v := metricValue(t, before, "meshcrypt_policy_connections_total", map[string]string{"event": "created"}); v <= 0 {
		t.Errorf("meshcrypt_policy_connections_total{event=created} on %s is %v after traffic", n.Name, v)
	}
	if v := metricValue(t, before, "meshcrypt_policy_connection_table_capacity", nil); v != 16384 {
		t.Errorf("meshcrypt_policy_connection_table_capacity on %s is %v, want the harness's 16384", n.Name, v)
	}
	denied := map[string]string{"reason": "denied_ingress"}
	b := metricValue(t, before, "meshcrypt_policy_verdict_packets_total", denied)
	deny()
	_, after := scrape(t, n, "/metrics")
	a := metricValue(t, after, "meshcrypt_policy_verdict_packets_total", denied)
	if a <= b {
		t.Errorf("meshcrypt_policy_verdict_packets_total{reason=denied_ingress} on %s did not move with denied traffic: %v -> %v", n.Name, b, a)
	}
	t.Logf("%s: denied_ingress packets %v -> %v", n.Name, b, a)
}
