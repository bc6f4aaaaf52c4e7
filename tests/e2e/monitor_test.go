package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/flow"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// monitorRun is a `meshcrypt monitor` run inside a node's namespace.
type monitorRun struct {
	stdout, stderr string
	err            error
}

// monitorWhile runs `meshcrypt monitor args...` inside node's namespace (where the agents'
// advertised addresses are reachable, as from any node) and calls traffic repeatedly until
// the monitor exits (it is given --count and --timeout, so it does). Flow events are only on
// while a client is connected, so the traffic must run during the monitor, not before it.
func monitorWhile(t *testing.T, c *cluster.Cluster, node string, traffic func(), args ...string) monitorRun {
	t.Helper()
	done := make(chan monitorRun, 1)
	go func() {
		var r monitorRun
		r.stdout, r.stderr, r.err = c.RunInNode(context.Background(), node, "meshcrypt", append([]string{"monitor"}, args...)...)
		done <- r
	}()
	for {
		select {
		case r := <-done:
			t.Logf("meshcrypt monitor %s (in %s):\n%s%s", strings.Join(args, " "), node, r.stderr, r.stdout)
			if r.err != nil {
				t.Fatalf("meshcrypt monitor: %v", r.err)
			}
			return r
		default:
			traffic()
		}
	}
}

// whenSubscribed wraps traffic so that it runs only once the agents of nodes each have a new
// flow client (their logs say so): a monitor that streams from several agents then misses no
// node's events for having connected to it later than to another.
func whenSubscribed(t *testing.T, c *cluster.Cluster, nodes []string, traffic func()) func() {
	t.Helper()
	clients := func(node string) int {
		b, err := os.ReadFile(c.Node(node).LogPath)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Count(string(b), `msg="flow client connected"`)
	}
	before := map[string]int{}
	for _, n := range nodes {
		before[n] = clients(n)
	}
	ready := false
	return func() {
		for _, n := range nodes {
			if !ready && clients(n) <= before[n] {
				time.Sleep(50 * time.Millisecond)
				return
			}
		}
		ready = true
		traffic()
	}
}

// flowRecords parses the JSON lines of `meshcrypt monitor -o json` and returns the flows.
func flowRecords(t *testing.T, out string) []flow.Record {
	t.Helper()
	var recs []flow.Record
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r flow.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("monitor line %q: %v", sc.Text(), err)
		}
		if r.Flow != nil {
			recs = append(recs, r)
		}
	}
	return recs
}

// TestMonitor: `meshcrypt monitor` streams the classifier's flow events from the agents: a flow
// a MeshPolicy denies shows as dropped on the sending node with the policy's reason and both
// identities, and an allowed cross-node flow as encrypted, on the sending node (into the
// tunnel) and on the receiving one (out of it).
func TestMonitor(t *testing.T) {
	// Every allowed packet is an event while the monitor runs (the default samples 1 in 100).
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend), AgentArgs: []string{"--flow-sample", "1"}})
	ctx := context.Background()
	for _, n := range []string{"n1", "n2"} {
		if _, err := c.AddNode(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	n1, n2 := c.Node("n1"), c.Node("n2")
	if n1 == nil || n2 == nil {
		t.Fatal("nodes missing")
	}
	web, err := c.AddPodLabels(ctx, n1, "web", map[string]string{"app": "web"})
	if err != nil {
		t.Fatal(err)
	}
	other, err := c.AddPodLabels(ctx, n1, "other", map[string]string{"app": "other"})
	if err != nil {
		t.Fatal(err)
	}
	db, err := c.AddPodLabels(ctx, n2, "db", map[string]string{"app": "db"})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := c.Run(ctx, "meshcrypt", "encryption", "enable", "--mode", "wireguard", "--wait", "--timeout", "1m"); err != nil {
		t.Fatal(err, out)
	}
	eventually(t, "every agent advertises its monitor address", func() bool {
		mns, err := c.MeshNodes(ctx)
		if err != nil || len(mns) != 2 {
			return false
		}
		for _, mn := range mns {
			ip, err := netip.ParseAddr(string(mn.Spec.UnderlayIPs[0]))
			if err != nil || mn.Status.MonitorAddress != netip.AddrPortFrom(ip, 9962).String() {
				return false
			}
		}
		return true
	})
	var ids v1alpha1.MeshIdentityList
	eventually(t, "identities allocated for web, other, db", func() bool {
		return c.Client.List(ctx, &ids) == nil && len(ids.Items) == 3
	})
	idOf := map[string]uint32{}
	for _, id := range ids.Items {
		n, err := strconv.ParseUint(id.Name, 10, 32)
		if err != nil {
			t.Fatalf("MeshIdentity %q: %v", id.Name, err)
		}
		idOf[id.Spec.Labels["app"]] = uint32(n)
	}
	t.Logf("identities: %v", idOf)

	m := newMarker(t)
	policy := &v1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "db"},
		Spec: v1alpha1.MeshPolicySpec{
			EndpointSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}},
			Ingress: []v1alpha1.PolicyRule{{
				Peers: []v1alpha1.PolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}}},
				Ports: []v1alpha1.PolicyPort{{Protocol: v1alpha1.ProtocolUDP, Port: ptr(int32(7100))}},
			}},
		},
	}
	if err := c.Client.Create(ctx, policy); err != nil {
		t.Fatal(err)
	}
	eventually(t, "web -> db allowed", func() bool { return reaches(web, db, 7100, m, time.Second) })
	eventually(t, "other -> db denied", func() bool { return !reaches(other, db, 7100, m, time.Second) })
	send := func(from, to *netenv.Pod) func() {
		return func() { reaches(from, to, 7100, m, 500*time.Millisecond) }
	}
	both := []string{"n1", "n2"}

	t.Run("a denied flow, as JSON", func(t *testing.T) {
		r := monitorWhile(t, c, "n1", whenSubscribed(t, c, both, send(other, db)),
			"-o", "json", "--verdict", "drop", "--identity", "app=db", "--count", "1", "--timeout", "2m")
		recs := flowRecords(t, r.stdout)
		if len(recs) != 1 {
			t.Fatalf("%d flow records, want 1", len(recs))
		}
		rec := recs[0]
		f := rec.Flow
		// other's egress is open; db's ingress denies other: n1 enforces it before the tunnel.
		if rec.Node != "n1" || f.Direction != "from_pod" || f.Verdict != flow.Drop || f.Reason != "denied_ingress" ||
			f.Protocol != "UDP" || f.Encrypted || !f.Remote {
			t.Errorf("flow %+v on %s: want a from_pod UDP drop for denied_ingress on n1, cross-node, not encrypted", *f, rec.Node)
		}
		if f.Source.Identity != idOf["other"] || f.Source.Labels["app"] != "other" || f.Source.IP != other.IPv4 {
			t.Errorf("source %+v, want other (%d, %s)", f.Source, idOf["other"], other.IPv4)
		}
		if f.Destination.Identity != idOf["db"] || f.Destination.Labels["app"] != "db" || f.Destination.IP != db.IPv4 || f.Destination.Port != 7100 {
			t.Errorf("destination %+v, want db (%d, %s:7100)", f.Destination, idOf["db"], db.IPv4)
		}
		if rec.Time.IsZero() {
			t.Error("no time")
		}
	})

	t.Run("an allowed cross-node flow is encrypted, as JSON", func(t *testing.T) {
		r := monitorWhile(t, c, "n1", whenSubscribed(t, c, []string{"n1"}, send(web, db)),
			"-o", "json", "--node", "n1", "--verdict", "allow", "--identity", "app=web", "--count", "1", "--timeout", "2m")
		recs := flowRecords(t, r.stdout)
		if len(recs) != 1 {
			t.Fatalf("%d flow records, want 1", len(recs))
		}
		rec := recs[0]
		f := rec.Flow
		if rec.Node != "n1" || f.Direction != "from_pod" || f.Verdict != flow.Allow || f.Reason != "allowed" || !f.Encrypted || !f.Remote {
			t.Errorf("flow %+v on %s: want an allowed from_pod flow on n1 into the tunnel", *f, rec.Node)
		}
		if f.Source.Identity != idOf["web"] || f.Destination.Identity != idOf["db"] || f.Destination.Port != 7100 {
			t.Errorf("flow %+v: want web (%d) -> db (%d):7100", *f, idOf["web"], idOf["db"])
		}
	})

	t.Run("both ends of the tunnel, from every node", func(t *testing.T) {
		// No --node: the monitor streams from both agents. Every packet of web -> db is an
		// event on n1 (from_pod) and on n2 (to_pod); sent a tenth of a second apart, 30 events
		// hold both unless one agent's stream lagged the other's by seconds.
		slowly := func() {
			send(web, db)()
			time.Sleep(100 * time.Millisecond)
		}
		r := monitorWhile(t, c, "n2", whenSubscribed(t, c, both, slowly),
			"-o", "json", "--verdict", "allow", "--identity", "app=db", "--count", "30", "--timeout", "2m")
		byNode := map[string]flow.Record{}
		for _, rec := range flowRecords(t, r.stdout) {
			if rec.Flow.Source.Identity == idOf["web"] {
				byNode[rec.Node] = rec
			}
		}
		if got := byNode["n1"].Flow; got == nil || got.Direction != "from_pod" || !got.Encrypted {
			t.Errorf("n1: %+v, want web -> db leaving encrypted", got)
		}
		if got := byNode["n2"].Flow; got == nil || got.Direction != "to_pod" || !got.Encrypted || !got.Remote {
			t.Errorf("n2: %+v, want web -> db arriving out of the tunnel", got)
		}
	})

	t.Run("text output", func(t *testing.T) {
		r := monitorWhile(t, c, "n2", whenSubscribed(t, c, both, send(other, db)), "--verdict", "drop", "--count", "1", "--timeout", "2m")
		line := strings.TrimSpace(r.stdout)
		for _, want := range []string{" n1 from_pod ", other.IPv4.String() + ":", "(default app=other)", " -> " + db.IPv4.String() + ":7100 ",
			"(default app=db)", " UDP drop denied_ingress encrypted=no cross-node"} {
			if !strings.Contains(line, want) {
				t.Errorf("line %q lacks %q", line, want)
			}
		}
		if !strings.Contains(r.stderr, "streaming from n1") {
			t.Errorf("stderr does not say it streams from n1:\n%s", r.stderr)
		}
	})

	t.Run("a timeout before the count is a negative verdict", func(t *testing.T) {
		// Nothing matches this identity, so nothing arrives.
		_, stderr, err := c.RunInNode(ctx, "n1", "meshcrypt", "monitor", "--identity", "app=nothing", "--count", "1", "--timeout", "2s")
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(stderr, "0 of 1 flow events within 2s") {
			t.Errorf("%v, stderr %q: want exit status 1 and the count", err, stderr)
		}
	})
}
