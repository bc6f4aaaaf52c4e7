package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
	"github.com/meshcrypt/meshcrypt/pkg/policy"
	"github.com/meshcrypt/meshcrypt/pkg/status"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/controlplane"
)

// cliResult is one run of the meshcrypt binary.
type cliResult struct {
	stdout, stderr string
	code           int
}

// cliEnv runs the meshcrypt binary (under the name of bin) against control planes: each run
// gets exactly the environment given, with HOME in a temporary directory so that no
// ~/.kube/config of the machine is read.
type cliEnv struct {
	t    *testing.T
	bin  string
	home string
}

func (e cliEnv) run(env []string, args ...string) cliResult {
	e.t.Helper()
	cmd := exec.Command(e.bin, args...)
	cmd.Env = append([]string{"HOME=" + e.home, "PATH=/usr/bin:/bin"}, env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := cliResult{stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		e.t.Fatalf("run %s %s: %v", e.bin, strings.Join(args, " "), err)
	}
	return r
}

// docBlock returns the first fenced code block of a Markdown file that contains marker.
func docBlock(t *testing.T, file, marker string) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	for i, block := range strings.Split(string(b), "```") {
		if i%2 == 1 && strings.Contains(block, marker) {
			_, body, _ := strings.Cut(block, "\n") // drop the info string
			return body
		}
	}
	t.Fatalf("%s: no code block containing %q", file, marker)
	return ""
}

// waitAllowed waits until RBAC allows user verb on a meshcrypt.io resource cluster-wide:
// the authorizer sees new bindings through an informer, a moment after they are created.
func waitAllowed(t *testing.T, admin client.Client, user, verb, resource string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User:               user,
			ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: verb, Group: v1alpha1.GroupVersion.Group, Resource: resource},
		}}
		if err := admin.Create(context.Background(), sar); err != nil {
			t.Fatal(err)
		}
		if sar.Status.Allowed {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("RBAC does not allow %s to %s %s after 30s", user, verb, resource)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestCLI runs the meshcrypt binary against a real kube-apiserver: the status verdict and
// exit codes as an audit job sees them, -o json and yaml, --node, the kubeconfig selection
// (--kubeconfig, $KUBECONFIG, --context), and a clear error for every failure: a node or pod
// that does not exist, an unreachable server, bad credentials, and a missing RBAC permission
// for every command, named by verb and resource. The read-only role documented in
// docs/operations.md is applied as written and must be enough for the read-only commands.
func TestCLI(t *testing.T) {
	ctx := context.Background()
	cp := controlplane.StartT(t, controlplane.Options{Users: []controlplane.User{{Name: "auditor"}, {Name: "operator"}, {Name: "nobody"}}})
	wd, _ := os.Getwd()
	root := filepath.Join(wd, "..", "..")
	if err := cp.ApplyCRDs(ctx, filepath.Join(root, "manifests", "crds")); err != nil {
		t.Fatal(err)
	}
	// The CLI's roles, exactly as the operations guide gives them.
	roles := filepath.Join(t.TempDir(), "roles.yaml")
	if err := os.WriteFile(roles, []byte(docBlock(t, filepath.Join(root, "docs", "operations.md"), "name: meshcrypt-auditor")), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := cp.ApplyYAML(ctx, roles); err != nil {
		t.Fatal(err)
	}
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1alpha1.AddToScheme(scheme)
	admin, err := client.New(cp.RESTConfig(), client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	for user, roles := range map[string][]string{"auditor": {"meshcrypt-auditor"}, "operator": {"meshcrypt-auditor", "meshcrypt-operator"}} {
		for _, role := range roles {
			crb := &rbacv1.ClusterRoleBinding{
				ObjectMeta: metav1.ObjectMeta{Name: user + "-" + role},
				RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role},
				Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: user}},
			}
			if err := admin.Create(ctx, crb); err != nil {
				t.Fatal(err)
			}
		}
	}

	waitAllowed(t, admin, "operator", "update", "meshconfigs")
	waitAllowed(t, admin, "auditor", "list", "meshnodes")

	bins, err := cluster.Binaries(ctx, "", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	kubeconfigs := map[string]string{}
	for _, user := range []string{controlplane.AdminUser, "auditor", "operator", "nobody"} {
		kubeconfigs[user] = filepath.Join(dir, user+".kubeconfig")
		if err := cp.WriteKubeconfig(kubeconfigs[user], "", cp.Token(user)); err != nil {
			t.Fatal(err)
		}
	}
	badToken := filepath.Join(dir, "badtoken.kubeconfig")
	if err := cp.WriteKubeconfig(badToken, "", "not-a-token"); err != nil {
		t.Fatal(err)
	}
	// Two contexts: the current one points at nothing, "meshcrypt" at the control plane.
	twoContexts := filepath.Join(dir, "two.kubeconfig")
	{
		b, err := os.ReadFile(kubeconfigs[controlplane.AdminUser])
		if err != nil {
			t.Fatal(err)
		}
		var kc map[string]any
		if err := yaml.Unmarshal(b, &kc); err != nil {
			t.Fatal(err)
		}
		kc["clusters"] = append(kc["clusters"].([]any), map[string]any{"name": "down", "cluster": map[string]any{"server": "https://127.0.0.1:1"}})
		kc["contexts"] = append(kc["contexts"].([]any), map[string]any{"name": "down", "context": map[string]any{"cluster": "down", "user": "meshcrypt"}})
		kc["current-context"] = "down"
		b, err = yaml.Marshal(kc)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(twoContexts, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cli := cliEnv{t: t, bin: filepath.Join(bins, "meshcrypt"), home: t.TempDir()}
	as := func(user string, args ...string) cliResult {
		t.Helper()
		return cli.run([]string{"KUBECONFIG=" + kubeconfigs[user]}, args...)
	}
	check := func(t *testing.T, r cliResult, code int, stdout, stderr []string) {
		t.Helper()
		if r.code != code {
			t.Errorf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", r.code, code, r.stdout, r.stderr)
		}
		for _, s := range stdout {
			if !strings.Contains(r.stdout, s) {
				t.Errorf("stdout lacks %q:\n%s", s, r.stdout)
			}
		}
		for _, s := range stderr {
			if !strings.Contains(r.stderr, s) {
				t.Errorf("stderr lacks %q:\n%s", s, r.stderr)
			}
		}
		if code == 2 && strings.Count(strings.TrimSpace(r.stderr), "\n") > 0 && !strings.Contains(r.stderr, "Did you mean") {
			t.Errorf("the error is more than one line:\n%s", r.stderr)
		}
	}

	t.Run("no MeshConfig: NOT compliant, exit 1", func(t *testing.T) {
		check(t, as("auditor", "status"), 1, []string{"NOT compliant: encryption is disabled (0 node pairs in clear)\n"}, nil)
	})

	// Two nodes whose agents configured each other, a third node added later.
	keys := map[string]string{"n1": goodKey, "n2": "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="}
	for _, n := range []string{"n1", "n2"} {
		if err := admin.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}); err != nil {
			t.Fatal(err)
		}
		mn := validNode(n)
		mn.Spec.WireGuard.PublicKey = keys[n]
		if err := admin.Create(ctx, mn); err != nil {
			t.Fatal(err)
		}
		other := map[string]string{"n1": "n2", "n2": "n1"}[n]
		mn.Status = v1alpha1.MeshNodeStatus{
			Mode: v1alpha1.ModeWireGuard, Backend: v1alpha1.BackendUserspace, PeersReady: 1, TunnelMTU: 1420,
			Peers:      []v1alpha1.PeerStatus{{Node: other, PublicKey: keys[other]}},
			Conditions: []metav1.Condition{{Type: v1alpha1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Reconciled", LastTransitionTime: metav1.Now()}},
		}
		if err := admin.Status().Update(ctx, mn); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("the auditor may read but not switch", func(t *testing.T) {
		check(t, as("auditor", "encryption", "enable", "--mode", "wireguard"), 2, nil, []string{
			`meshcrypt: not allowed: user "auditor" may not create meshconfigs.meshcrypt.io (cluster-wide). It needs an RBAC rule with apiGroups ["meshcrypt.io"], resources ["meshconfigs"], verbs ["create"]`,
		})
	})
	t.Run("the operator switches", func(t *testing.T) {
		check(t, as("operator", "encryption", "enable", "--mode", "wireguard", "--wait", "--timeout", "30s"), 0,
			[]string{"encryption mode Disabled -> WireGuard\n", "all 2 nodes applied WireGuard"}, nil)
	})

	t.Run("compliant: exit 0 in every format", func(t *testing.T) {
		check(t, as("auditor", "status"), 0, []string{"compliant: all 1 node pairs encrypted (WireGuard)\n", "n1 <-> n2  yes"}, nil)
		for _, format := range []string{"json", "yaml"} {
			r := as("auditor", "status", "-o", format)
			check(t, r, 0, nil, nil)
			var rep status.Report
			if err := yaml.Unmarshal([]byte(r.stdout), &rep); err != nil {
				t.Fatalf("-o %s: %v\n%s", format, err, r.stdout)
			}
			if !rep.Compliant || len(rep.Pairs) != 1 || len(rep.Nodes) != 2 {
				t.Errorf("-o %s: %+v", format, rep)
			}
			if format == "json" && !json.Valid([]byte(r.stdout)) {
				t.Errorf("-o json is not JSON:\n%s", r.stdout)
			}
		}
		check(t, as("auditor", "status", "--node", "n2"), 0, []string{"compliant: all 1 node pairs of n2 encrypted (WireGuard)\n"}, nil)
	})

	t.Run("a node that does not exist", func(t *testing.T) {
		check(t, as("auditor", "status", "--node", "n9"), 2, nil, []string{`meshcrypt: node "n9" not found: the cluster's nodes are n1, n2` + "\n"})
	})

	if err := admin.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n3"}}); err != nil {
		t.Fatal(err)
	}
	t.Run("a node without an agent: NOT compliant, exit 1 in every format", func(t *testing.T) {
		check(t, as("auditor", "status"), 1, []string{
			"NOT compliant: 2 of 3 node pairs not encrypted (WireGuard)\n",
			"n1 <-> n3  NO         never           n3 has no MeshNode (no agent)",
		}, nil)
		for _, format := range []string{"json", "yaml"} {
			r := as("auditor", "status", "-o", format)
			check(t, r, 1, []string{"NOT compliant"}, nil)
		}
		check(t, as("auditor", "status", "--node", "n3"), 1, []string{"NOT compliant: 2 of 2 node pairs of n3 not encrypted (WireGuard)\n"}, nil)
	})

	t.Run("policy check: a pod that does not exist", func(t *testing.T) {
		check(t, as("auditor", "policy", "check", "--from", "default/ghost", "--to", "db/pg-0", "--port", "5432/TCP"), 2, nil,
			[]string{"meshcrypt: --from default/ghost: pod not found (want NAMESPACE/NAME; a name alone means namespace default)\n"})
	})
	t.Run("the auditor role covers every read-only command", func(t *testing.T) {
		check(t, as("auditor", "identities", "-o", "yaml"), 0, []string{"[]"}, nil)
		if err := admin.Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default", Labels: map[string]string{"app": "web"}},
			Spec:       corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "c", Image: "x"}}},
		}); err != nil {
			t.Fatal(err)
		}
		// Past the permission checks, to the first thing an agent would have provided.
		check(t, as("auditor", "policy", "check", "--from", "web", "--to", "default/web", "--port", "80/TCP"), 2, nil,
			[]string{"meshcrypt: pod default/web (labels", "has no identity yet: is an agent running?"})
		// The identity an agent would allocate; then the whole check runs, allowed (exit 0).
		labels, err := identity.Canonical(map[string]string{"app": "web"}, "default", "", "default")
		if err != nil {
			t.Fatal(err)
		}
		if err := admin.Create(ctx, &v1alpha1.MeshIdentity{ObjectMeta: metav1.ObjectMeta{Name: "65792"}, Spec: v1alpha1.MeshIdentitySpec{Labels: labels.Map()}}); err != nil {
			t.Fatal(err)
		}
		check(t, as("auditor", "policy", "check", "--from", "web", "--to", "default/web", "--port", "80/TCP"), 0,
			[]string{"ALLOWED: default/web (identity 65792) -> default/web (identity 65792) 80/TCP\n"}, nil)
		check(t, as("auditor", "identities"), 0, []string{"65792"}, nil)

		// Addresses and entities as ends: an ipBlock with an exception, the node's own address
		// (host, allowed by the MeshConfig switch), another entity.
		webIn := &v1alpha1.MeshPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web-in"},
			Spec: v1alpha1.MeshPolicySpec{
				EndpointSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
				Ingress:          []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{{IPBlock: &v1alpha1.IPBlock{CIDR: "192.0.2.0/24", Except: []string{"192.0.2.128/25"}}}}}},
			},
		}
		if err := admin.Create(ctx, webIn); err != nil {
			t.Fatal(err)
		}
		check(t, as("auditor", "policy", "check", "--from-ip", "192.0.2.7", "--to", "default/web", "--port", "80/TCP"), 0, []string{
			"ALLOWED: 192.0.2.7 (ipBlock 192.0.2.0/24) (identity " + cidrID(t, "192.0.2.0/24", webIn) + ") -> default/web (identity 65792) 80/TCP\n",
			"  ingress of default/web: allowed by default/web-in ingress[0]\n",
			"  connection: its replies (and ICMP errors about it) pass without a rule",
		}, nil)
		check(t, as("auditor", "policy", "check", "--from-ip", "192.0.2.200", "--to", "default/web", "--port", "80/TCP"), 1, []string{
			"DENIED: 192.0.2.200 (ipBlock 192.0.2.128/25) (identity " + cidrID(t, "192.0.2.128/25", webIn) + ") -> default/web",
			"ingress of default/web: DENIED: default-deny (selected by default/web-in)",
			"  connection: never opened",
		}, nil)
		check(t, as("auditor", "policy", "check", "--from-ip", "10.77.0.11", "--to", "default/web", "--port", "8080/TCP"), 0, []string{
			"ALLOWED: 10.77.0.11 (node n1, host) (identity 1) -> default/web",
			"allowed by MeshConfig default spec.policy.allowHostToLocalPods\n",
		}, nil)
		check(t, as("auditor", "policy", "check", "--from-entity", "remote-node", "--to", "default/web", "--port", "8080/TCP"), 1,
			[]string{"DENIED: entity remote-node (identity 6) -> default/web"}, nil)
		check(t, as("auditor", "policy", "check", "--from-ip", "10.77.0.300", "--to", "default/web", "--port", "80/TCP"), 2, nil,
			[]string{`meshcrypt: --from-ip "10.77.0.300": not an IPv4 or IPv6 address`})
		if err := admin.Delete(ctx, webIn); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("missing permissions are named, for every command", func(t *testing.T) {
		tests := []struct {
			args string
			want string // verb and resource of the first call the user may not make
		}{
			{"status", `may not get meshconfigs.meshcrypt.io (cluster-wide)`},
			{"status -o json", `may not get meshconfigs.meshcrypt.io (cluster-wide)`},
			{"identities", `may not list meshidentities.meshcrypt.io (cluster-wide)`},
			{"policy check --from a --to b --port 80/TCP", `may not list meshidentities.meshcrypt.io (cluster-wide)`},
			{"encryption enable --mode wireguard", `may not get meshconfigs.meshcrypt.io (cluster-wide)`},
			{"encryption disable", `may not get meshconfigs.meshcrypt.io (cluster-wide)`},
		}
		for _, tt := range tests {
			t.Run(tt.args, func(t *testing.T) {
				check(t, as("nobody", strings.Fields(tt.args)...), 2, nil, []string{`meshcrypt: not allowed: user "nobody" ` + tt.want + ". It needs an RBAC rule"})
			})
		}
		// A later call is named just as well: status may read MeshConfig and MeshNodes, not Nodes.
		if err := admin.Create(ctx, &rbacv1.ClusterRole{
			ObjectMeta: metav1.ObjectMeta{Name: "partial"},
			Rules: []rbacv1.PolicyRule{
				{APIGroups: []string{v1alpha1.GroupVersion.Group}, Resources: []string{"meshconfigs"}, Verbs: []string{"get"}},
				{APIGroups: []string{v1alpha1.GroupVersion.Group}, Resources: []string{"meshnodes"}, Verbs: []string{"list"}},
			},
		}); err != nil {
			t.Fatal(err)
		}
		if err := admin.Create(ctx, &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: "nobody-partial"},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "partial"},
			Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: "nobody"}},
		}); err != nil {
			t.Fatal(err)
		}
		waitAllowed(t, admin, "nobody", "list", "meshnodes")
		check(t, as("nobody", "status"), 2, nil,
			[]string{`meshcrypt: not allowed: user "nobody" may not list nodes (cluster-wide). It needs an RBAC rule with apiGroups [""], resources ["nodes"], verbs ["list"] in a ClusterRole bound with a ClusterRoleBinding` + "\n"})
	})

	t.Run("kubeconfig: --kubeconfig, $KUBECONFIG, --context", func(t *testing.T) {
		unreachable := "meshcrypt: cannot reach the Kubernetes API server at https://127.0.0.1:1: connection refused (is the cluster up, and is this the right kubeconfig and --context?)\n"
		check(t, cli.run([]string{"KUBECONFIG=" + twoContexts}, "status"), 2, nil, []string{unreachable})
		check(t, cli.run([]string{"KUBECONFIG=" + twoContexts}, "--context", "meshcrypt", "status"), 1, []string{"NOT compliant"}, nil)
		check(t, cli.run(nil, "--kubeconfig", twoContexts, "--context", "meshcrypt", "status"), 1, []string{"NOT compliant"}, nil)
		check(t, cli.run([]string{"KUBECONFIG=" + kubeconfigs["nobody"]}, "--kubeconfig", twoContexts, "status", "--context", "meshcrypt"), 1, []string{"NOT compliant"}, nil)
		check(t, cli.run(nil, "--kubeconfig", twoContexts, "--context", "prod", "status"), 2, nil,
			[]string{`meshcrypt: load kubeconfig: --context "prod": no such context (the kubeconfig has: down, meshcrypt)` + "\n"})
		check(t, cli.run(nil, "status"), 2, nil,
			[]string{"meshcrypt: no kubeconfig: pass --kubeconfig, set $KUBECONFIG, or create " + filepath.Join(cli.home, ".kube", "config")})
		check(t, cli.run([]string{"KUBECONFIG=" + badToken}, "status"), 2, nil,
			[]string{"meshcrypt: the API server rejected the credentials (401 Unauthorized)"})
		// As a kubectl plugin, with the same kubeconfig rules.
		plugin := filepath.Join(t.TempDir(), "kubectl-meshcrypt")
		b, err := os.ReadFile(cli.bin)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(plugin, b, 0o755); err != nil {
			t.Fatal(err)
		}
		pcli := cliEnv{t: t, bin: plugin, home: cli.home}
		check(t, pcli.run([]string{"KUBECONFIG=" + twoContexts}, "--context", "meshcrypt", "status"), 1, []string{"NOT compliant"}, nil)
		check(t, pcli.run([]string{"KUBECONFIG=" + twoContexts}, "status"), 2, nil, []string{"kubectl " + unreachable})
	})
}

// cidrID is the CIDR identity the compiler gives prefix p among the ipBlocks of pols, in decimal.
func cidrID(t *testing.T, p string, pols ...*v1alpha1.MeshPolicy) string {
	t.Helper()
	var in policy.Input
	for _, pol := range pols {
		in.Policies = append(in.Policies, *pol)
	}
	id, ok := policy.Compile(in).CIDRs[netip.MustParsePrefix(p)]
	if !ok {
		t.Fatalf("no CIDR identity for %s", p)
	}
	return strconv.FormatUint(uint64(id), 10)
}
