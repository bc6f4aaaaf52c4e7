package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// TestClustermeshSummary: the verdict and the per-remote counts of `clustermesh status`
// from MeshConfig, the Secrets found and the local MeshNodes' reports.
func TestClustermeshSummary(t *testing.T) {
	now := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	sync := metav1.NewTime(now.Add(-2 * time.Minute))
	cfg := func(remotes ...string) *v1alpha1.MeshConfig {
		mc := &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Cluster: &v1alpha1.ClusterSpec{Name: "east", ID: 1}}}
		for i, r := range remotes {
			mc.Spec.RemoteClusters = append(mc.Spec.RemoteClusters, v1alpha1.RemoteCluster{Name: r, ID: int32(i + 2), SecretName: "meshcrypt-clustermesh-" + r})
		}
		return mc
	}
	node := func(name string, reports ...v1alpha1.RemoteClusterStatus) v1alpha1.MeshNode {
		return v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: v1alpha1.MeshNodeStatus{RemoteClusters: reports}}
	}
	connected := func(name string, nodes, peers int32) v1alpha1.RemoteClusterStatus {
		return v1alpha1.RemoteClusterStatus{Name: name, State: v1alpha1.RemoteConnected, Nodes: nodes, Identities: 7, PeersReady: peers, LastSync: &sync}
	}
	ok := map[string]secretInfo{"meshcrypt-clustermesh-west": {}, "meshcrypt-clustermesh-north": {}}
	tests := []struct {
		name    string
		cfg     *v1alpha1.MeshConfig
		nodes   []v1alpha1.MeshNode
		secrets map[string]secretInfo
		verdict string
		rows    []string // remote: connected/unreachable/refused/not reported, nodes, peers ready
	}{
		{"no MeshConfig", nil, []v1alpha1.MeshNode{node("n1")}, nil,
			"NOT connected: no remote clusters (MeshConfig spec.remoteClusters is empty; add one with clustermesh connect)", nil},
		{"no nodes", cfg("west"), nil, ok,
			"NOT connected: no local MeshNodes: no agent reports yet", []string{"west 0/0/0/0 - -"}},
		{"every node connected; counts differ", cfg("west", "north"),
			[]v1alpha1.MeshNode{node("n2", connected("west", 3, 2), connected("north", 1, 1)), node("n1", connected("west", 3, 3), connected("north", 1, 1))}, ok,
			"connected: 2 remote clusters reachable from every node (2 nodes)", []string{"west 2/0/0/0 3 2-3", "north 2/0/0/0 1 1"}},
		{"one node unreachable, one refused, one silent", cfg("west"),
			[]v1alpha1.MeshNode{
				node("n1", connected("west", 3, 3)),
				node("n2", v1alpha1.RemoteClusterStatus{Name: "west", State: v1alpha1.RemoteUnreachable, Nodes: 3, PeersReady: 3, Message: "timeout"}),
				node("n3", v1alpha1.RemoteClusterStatus{Name: "west", State: v1alpha1.RemoteRefused, Message: "pod CIDR overlap"}),
				node("n4", connected("other", 1, 1)),
			}, ok,
			"NOT connected: west: reachable from 1/4 nodes", []string{"west 1/1/1/1 0-3 0-3"}},
		{"Secret missing", cfg("west"), []v1alpha1.MeshNode{node("n1", connected("west", 1, 1))},
			map[string]secretInfo{"meshcrypt-clustermesh-west": {Problem: "Secret meshcrypt/meshcrypt-clustermesh-west missing"}},
			"NOT connected: west: Secret meshcrypt/meshcrypt-clustermesh-west missing", []string{"west 1/0/0/0 1 1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := summarizeMesh(tt.cfg, tt.nodes, tt.secrets)
			if r.Verdict != tt.verdict {
				t.Errorf("verdict %q, want %q", r.Verdict, tt.verdict)
			}
			if r.Connected != strings.HasPrefix(tt.verdict, "connected:") {
				t.Errorf("Connected %t for verdict %q", r.Connected, r.Verdict)
			}
			var rows []string
			for _, rr := range r.Remotes {
				rows = append(rows, strings.Join([]string{rr.Name, strings.Join([]string{
					itoa(rr.Connected), itoa(rr.Unreachable), itoa(rr.Refused), itoa(rr.NotReported)}, "/"),
					rr.Nodes.String(), rr.PeersReady.String()}, " "))
			}
			if diff := cmp.Diff(tt.rows, rows); diff != "" {
				t.Errorf("rows (-want +got):\n%s", diff)
			}
		})
	}

	// The table names each node that is not connected, and why.
	r := summarizeMesh(cfg("west"), tests[3].nodes, ok)
	var b bytes.Buffer
	if err := r.WriteTable(&b, now); err != nil {
		t.Fatal(err)
	}
	want := `NOT connected: west: reachable from 1/4 nodes
cluster: east (ID 1), 4 nodes

REMOTE  ID  SECRET  TOKEN EXPIRES  REACHABLE FROM  NODES  REFUSED  IDENTITIES  PEERS READY
west    2   ok      -              1/4 nodes       0-3    0        0-7         0-3

west: node n2 Unreachable (never synced): timeout
west: node n3 Refused (never synced): pod CIDR overlap
west: node n4 does not report it (agent not running, or not yet updated)
`
	if diff := cmp.Diff(want, b.String()); diff != "" {
		t.Errorf("table (-want +got):\n%s", diff)
	}
}

func itoa(n int) string { return span{Min: int32(n), Max: int32(n), Reported: true}.String() }

func TestClustermeshResolveCluster(t *testing.T) {
	local := clusterFlags{name: "cluster-name", id: "cluster-id"}
	with := func(name string, id int32) clusterFlags {
		f := local
		f.nameVal, f.idVal, f.nameSet, f.idSet = name, id, true, true
		return f
	}
	east := &v1alpha1.ClusterSpec{Name: "east", ID: 1}
	tests := []struct {
		name    string
		current *v1alpha1.ClusterSpec
		flags   clusterFlags
		want    v1alpha1.ClusterSpec
		set     bool
		err     string
	}{
		{"set by the flags", nil, with("east", 1), *east, true, ""},
		{"already set", east, local, *east, false, ""},
		{"flags agree", east, with("east", 1), *east, false, ""},
		{"none", nil, local, v1alpha1.ClusterSpec{}, false,
			`context "a" has no cluster name and ID (MeshConfig default spec.cluster): give it one with --cluster-name NAME --cluster-id ID (1-255, unique in the mesh)`},
		{"rename refused", east, with("west", 1), v1alpha1.ClusterSpec{}, false, `context "a" is already cluster "east" with ID 1`},
		{"name without ID", nil, clusterFlags{name: "cluster-name", id: "cluster-id", nameVal: "x", nameSet: true}, v1alpha1.ClusterSpec{}, false,
			"--cluster-name and --cluster-id go together"},
		{"bad name", nil, with("East_1", 1), v1alpha1.ClusterSpec{}, false, `--cluster-name "East_1": a cluster name is a DNS label`},
		{"long name", nil, with(strings.Repeat("a", 64), 1), v1alpha1.ClusterSpec{}, false, "a cluster name is a DNS label"},
		{"ID 0", nil, with("east", 0), v1alpha1.ClusterSpec{}, false, "--cluster-id 0: a cluster ID is 1-255"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, set, err := resolveCluster(tt.current, tt.flags, "a")
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("error %v, want one containing %q", err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want || set != tt.set {
				t.Errorf("= %+v, %t, %v; want %+v, %t", got, set, err, tt.want, tt.set)
			}
		})
	}
}

func TestClustermeshCheckPair(t *testing.T) {
	side := func(name string, id int32, remotes ...v1alpha1.RemoteCluster) *meshSide {
		s := &meshSide{context: "ctx-" + name, cluster: v1alpha1.ClusterSpec{Name: name, ID: id}}
		s.mc.Spec.RemoteClusters = remotes
		return s
	}
	tests := []struct {
		name string
		a, b *meshSide
		err  string
	}{
		{"distinct", side("east", 1), side("west", 2), ""},
		{"reconnect", side("east", 1, v1alpha1.RemoteCluster{Name: "west", ID: 2}), side("west", 2), ""},
		{"same name", side("east", 1), side("east", 2), `both clusters are named "east"`},
		{"same ID", side("east", 3), side("west", 3), "both clusters have ID 3"},
		{"ID taken by another remote", side("east", 1, v1alpha1.RemoteCluster{Name: "north", ID: 2}), side("west", 2),
			`cluster "east" (context "ctx-east") already has remote cluster "north" with ID 2, the ID of "west"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkPair(tt.a, tt.b)
			if (tt.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.err)) {
				t.Errorf("checkPair: %v, want %q", err, tt.err)
			}
		})
	}
}

// TestClustermeshBadInput: flags are checked before any cluster is contacted.
func TestClustermeshBadInput(t *testing.T) {
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: a, context: {cluster: c, user: u}}, {name: b, context: {cluster: c, user: u}}]
current-context: a
`), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KUBECONFIG", kubeconfig)
	tests := []struct {
		args string
		want string // the whole stderr
	}{
		{"clustermesh connect", `meshcrypt: required flag(s) "to-context" not set`},
		{"clustermesh connect --to-context b --token-duration 1m", "meshcrypt: --token-duration 1m0s: the API server issues tokens of at least 10m0s"},
		{"clustermesh connect --to-context b --remote-api-server http://10.0.0.1:6443",
			`meshcrypt: --remote-api-server "http://10.0.0.1:6443": want an https URL such as https://10.0.0.10:6443`},
		{"clustermesh connect --to-context c", `meshcrypt: --to-context "c": no such context (the kubeconfig has: a, b)`},
		{"clustermesh connect --to-context b --to-kubeconfig /nonexistent", `meshcrypt: --to-kubeconfig /nonexistent: stat /nonexistent: no such file or directory`},
		{"clustermesh connect --to-context b --namespace=", "meshcrypt: --namespace must not be empty"},
		{"clustermesh disconnect", `meshcrypt: required flag(s) "to-context" not set`},
		{"clustermesh status -o xml", `meshcrypt: -o "xml": want one of table, json, yaml`},
		{"clustermesh status extra", `meshcrypt: unknown command "extra" for "meshcrypt clustermesh status"`},
	}
	for _, tt := range tests {
		t.Run(tt.args, func(t *testing.T) {
			_, stderr, code := runCLI(t, "meshcrypt", strings.Fields(tt.args)...)
			if code != exitError || strings.TrimSpace(stderr) != tt.want {
				t.Errorf("exit %d, stderr %q; want exit %d, %q", code, stderr, exitError, tt.want)
			}
		})
	}
}
