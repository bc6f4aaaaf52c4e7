package manifests

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/pkg/metrics"
	"github.com/meshcrypt/meshcrypt/pkg/metrics/metricstest"
)

const dashboardFile = "manifests/grafana/meshcrypt.json"

// Labels Prometheus adds when it scrapes (target labels), which the registry cannot know.
var targetLabels = []string{"instance", "job", "namespace", "pod", "node"}

// registered gathers a Recorder whose fake Source fills every metric, with every reason the
// classifier counts, and returns each series name (histograms as _bucket, _sum, _count) with
// its label names and the label values seen.
func registered(t *testing.T) map[string]map[string][]string {
	t.Helper()
	src := &metricstest.Source{}
	var verdicts []metrics.Verdict
	for r := range datapath.Reason(datapath.NumReasons) {
		verdicts = append(verdicts, metrics.Verdict{Reason: r.String(), Dropped: r.Dropped(), Packets: 1, Bytes: 100})
	}
	src.Set(metricstest.State{
		Peers: []metrics.Peer{
			{Name: "node2", Fingerprint: "sha256:00", LastHandshake: time.Now(), Ready: true},
			{Name: "node3", Fingerprint: "sha256:01"},
		},
		Verdicts: verdicts,
		HasKey:   true,
	})
	rec := metrics.New(metrics.Options{Source: src, XFRM: metricstest.XFRM{Stats: map[string]uint64{"XfrmInError": 0}}})
	rec.SetMode("WireGuard")
	rec.ObserveReconcile(time.Millisecond, nil)
	rec.KeyRotated()
	fams, err := rec.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string][]string{}
	add := func(name string, m *dto.Metric, extra ...string) {
		if out[name] == nil {
			out[name] = map[string][]string{}
		}
		for _, l := range m.GetLabel() {
			out[name][l.GetName()] = append(out[name][l.GetName()], l.GetValue())
		}
		for _, e := range extra {
			out[name][e] = append(out[name][e], "")
		}
	}
	for _, f := range fams {
		for _, m := range f.GetMetric() {
			if f.GetType() == dto.MetricType_HISTOGRAM {
				add(f.GetName()+"_bucket", m, "le")
				add(f.GetName()+"_sum", m)
				add(f.GetName()+"_count", m)
				continue
			}
			add(f.GetName(), m)
		}
	}
	return out
}

var (
	metricRef = regexp.MustCompile(`\bmeshcrypt_[a-zA-Z0-9_:]*`)
	selector  = regexp.MustCompile(`\b(meshcrypt_[a-zA-Z0-9_:]*)\s*\{([^}]*)\}`)
	matcher   = regexp.MustCompile(`^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*$`)
)

// TestDashboard: the dashboard is valid JSON, and every metric its PromQL names is one
// pkg/metrics registers, with labels it has and label values it exports.
func TestDashboard(t *testing.T) {
	data, err := os.ReadFile(path(t, dashboardFile))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		UID    string `json:"uid"`
		Panels []struct {
			Type    string `json:"type"`
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name       string `json:"name"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if dash.Title == "" || dash.UID == "" {
		t.Errorf("dashboard without title or uid")
	}
	reg := registered(t)
	var exprs []string
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			if !metricRef.MatchString(tg.Expr) {
				t.Errorf("panel %q: query %q names no meshcrypt metric", p.Title, tg.Expr)
			}
			exprs = append(exprs, tg.Expr)
		}
	}
	for _, v := range dash.Templating.List {
		if v.Definition != "" {
			exprs = append(exprs, v.Definition)
		}
	}
	used := map[string]bool{}
	for _, e := range exprs {
		for _, name := range metricRef.FindAllString(e, -1) {
			used[name] = true
			if reg[name] == nil {
				t.Errorf("query %q: %s is not a metric pkg/metrics registers (%v)", e, name, keys(reg))
			}
		}
		for _, sel := range selector.FindAllStringSubmatch(e, -1) {
			name, labels := sel[1], reg[sel[1]]
			if labels == nil {
				continue // reported above
			}
			for m := range strings.SplitSeq(sel[2], ",") {
				if strings.TrimSpace(m) == "" {
					continue
				}
				mm := matcher.FindStringSubmatch(m)
				if mm == nil {
					t.Errorf("query %q: cannot read matcher %q", e, m)
					continue
				}
				label, op, value := mm[1], mm[2], mm[3]
				if slices.Contains(targetLabels, label) {
					continue
				}
				values, ok := labels[label]
				if !ok {
					t.Errorf("query %q: %s has no label %s (%v)", e, name, label, keys(labels))
					continue
				}
				if op == "=" && !slices.Contains(values, value) {
					t.Errorf("query %q: %s never has %s=%q (%v)", e, name, label, value, values)
				}
			}
		}
	}
	// The panels the dashboard promises.
	for _, want := range []string{
		"meshcrypt_peers", "meshcrypt_peer_handshake_age_seconds", "meshcrypt_peer_transmit_bytes_total",
		"meshcrypt_peer_receive_bytes_total", "meshcrypt_policy_verdict_packets_total",
		"meshcrypt_key_age_seconds", "meshcrypt_reconcile_duration_seconds_bucket",
	} {
		if !used[want] {
			t.Errorf("the dashboard does not show %s", want)
		}
	}
}

// TestDocsMetricNames: every meshcrypt_ metric name the docs mention is registered.
func TestDocsMetricNames(t *testing.T) {
	reg := registered(t)
	files, err := filepath.Glob(path(t, "docs/*.md"))
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, path(t, "README.md"))
	found := 0
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range metricRef.FindAllString(string(data), -1) {
			found++
			// A histogram's family name is fine in prose.
			if reg[name] == nil && reg[name+"_bucket"] == nil {
				t.Errorf("%s mentions %s, which pkg/metrics does not register", filepath.Base(f), name)
			}
		}
	}
	if found == 0 {
		t.Error("no metric names found in the docs")
	}
}
