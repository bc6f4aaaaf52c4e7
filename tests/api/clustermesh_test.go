package api

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/controlplane"
)

// meshPeer is one of the two clusters of TestClustermesh.
type meshPeer struct {
	name  string
	cp    *controlplane.ControlPlane
	admin client.Client
}

// clustermeshScheme knows the built-in kinds and meshcrypt's.
func clustermeshScheme(t *testing.T) *runtime.Scheme {
	t.Helper()
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	return scheme
}

// readerKubeconfig returns the kubeconfig that connect stored on p to read remote.
func (p meshPeer) readerKubeconfig(t *testing.T, remote string) *rest.Config {
	t.Helper()
	var sec corev1.Secret
	if err := p.admin.Get(context.Background(), client.ObjectKey{Namespace: "meshcrypt", Name: "meshcrypt-clustermesh-" + remote}, &sec); err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.RESTConfigFromKubeConfig(sec.Data[v1alpha1.RemoteKubeconfigKey])
	if err != nil {
		t.Fatalf("the Secret's kubeconfig: %v", err)
	}
	return cfg
}

// firstWatchEvent watches list from resource version "0" (any: the API server's watch cache
// as it is, as informers start) and waits for the first event: ADDED, for an existing
// object.
func firstWatchEvent(ctx context.Context, c client.WithWatch, list client.ObjectList) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	w, err := c.Watch(ctx, list, &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: "0"}})
	if err != nil {
		return err
	}
	defer w.Stop()
	select {
	case ev := <-w.ResultChan():
		if ev.Type != watch.Added {
			return fmt.Errorf("first event %s %v", ev.Type, ev.Object)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("no event: %w", ctx.Err())
	}
}

// TestClustermesh runs `meshcrypt clustermesh connect`, `status` and `disconnect` against two
// real control planes: the objects connect creates on both sides, that the kubeconfig it
// stores reads the other cluster's MeshNodes and MeshIdentities and nothing else, that it
// is idempotent, its errors (no cluster names, equal IDs, unknown context, unreachable
// cluster, missing namespace, missing RBAC), status verdicts and exit codes from MeshNode
// statuses, and that disconnect removes everything and revokes the token.
func TestClustermesh(t *testing.T) {
	ctx := context.Background()
	wd, _ := os.Getwd()
	root := filepath.Join(wd, "..", "..")
	scheme := clustermeshScheme(t)
	east := meshPeer{name: "east", cp: controlplane.StartT(t, controlplane.Options{})}
	west := meshPeer{name: "west", cp: controlplane.StartT(t, controlplane.Options{Users: []controlplane.User{{Name: "nobody"}}})}
	for _, p := range []*meshPeer{&east, &west} {
		if err := p.cp.ApplyCRDs(ctx, filepath.Join(root, "manifests", "crds")); err != nil {
			t.Fatal(err)
		}
		c, err := client.New(p.cp.RESTConfig(), client.Options{Scheme: scheme})
		if err != nil {
			t.Fatal(err)
		}
		p.admin = c
	}

	// One kubeconfig with a context per cluster, a context whose user has no rights on
	// west, and one for a cluster that is down.
	kc := clientcmdapi.NewConfig()
	for _, p := range []meshPeer{east, west} {
		kc.Clusters[p.name] = &clientcmdapi.Cluster{Server: p.cp.URL(), CertificateAuthorityData: p.cp.CACert()}
		kc.AuthInfos[p.name] = &clientcmdapi.AuthInfo{Token: p.cp.AdminToken()}
		kc.Contexts[p.name] = &clientcmdapi.Context{Cluster: p.name, AuthInfo: p.name}
	}
	kc.AuthInfos["nobody"] = &clientcmdapi.AuthInfo{Token: west.cp.Token("nobody")}
	kc.Contexts["west-nobody"] = &clientcmdapi.Context{Cluster: "west", AuthInfo: "nobody"}
	kc.Clusters["down"] = &clientcmdapi.Cluster{Server: "https://127.0.0.1:1", CertificateAuthorityData: east.cp.CACert()}
	kc.Contexts["down"] = &clientcmdapi.Context{Cluster: "down", AuthInfo: "east"}
	kc.CurrentContext = "east"
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, kubeconfig); err != nil {
		t.Fatal(err)
	}

	bins, err := cluster.Binaries(ctx, "", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cli := cliEnv{t: t, bin: filepath.Join(bins, "meshcrypt"), home: t.TempDir()}
	mc := func(args ...string) cliResult {
		t.Helper()
		return cli.run([]string{"KUBECONFIG=" + kubeconfig}, args...)
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
		if code == 2 && strings.Count(strings.TrimSpace(r.stderr), "\n") > 0 {
			t.Errorf("the error is more than one line:\n%s", r.stderr)
		}
	}
	ids := []string{"--cluster-name", "east", "--cluster-id", "1", "--to-cluster-name", "west", "--to-cluster-id", "2"}
	connectArgs := func(extra ...string) []string {
		return append(append([]string{"clustermesh", "connect", "--to-context", "west"}, ids...), extra...)
	}

	// West already has a MeshConfig (encryption on, no cluster name): connect keeps it.
	if err := west.admin.Create(ctx, &v1alpha1.MeshConfig{
		ObjectMeta: metav1.ObjectMeta{Name: v1alpha1.MeshConfigName},
		Spec:       v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeWireGuard, Strict: true}},
	}); err != nil {
		t.Fatal(err)
	}
	noMeshConfig := func(t *testing.T) {
		t.Helper()
		var got v1alpha1.MeshConfig
		if err := east.admin.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &got); !apierrors.IsNotFound(err) {
			t.Errorf("a failed connect wrote east's MeshConfig: %v %+v", err, got.Spec)
		}
	}

	t.Run("errors: nothing is written", func(t *testing.T) {
		check(t, mc("clustermesh", "connect", "--to-context", "west"), 2, nil, []string{
			`meshcrypt: context "east" has no cluster name and ID (MeshConfig default spec.cluster): give it one with --cluster-name NAME --cluster-id ID (1-255, unique in the mesh)` + "\n"})
		check(t, mc("clustermesh", "connect", "--to-context", "west", "--cluster-name", "east", "--cluster-id", "1"), 2, nil, []string{
			`meshcrypt: context "west" has no cluster name and ID (MeshConfig default spec.cluster): give it one with --to-cluster-name NAME --to-cluster-id ID`})
		check(t, mc("clustermesh", "connect", "--to-context", "west", "--cluster-name", "east"), 2, nil, []string{
			"meshcrypt: --cluster-name and --cluster-id go together"})
		check(t, mc("clustermesh", "connect", "--to-context", "west", "--cluster-name", "east", "--cluster-id", "7", "--to-cluster-name", "west", "--to-cluster-id", "7"), 2, nil, []string{
			`meshcrypt: both clusters have ID 7 ("east" in context "east", "west" in context "west"): every cluster of a mesh needs its own ID` + "\n"})
		check(t, mc("clustermesh", "connect", "--to-context", "west", "--cluster-name", "same", "--cluster-id", "1", "--to-cluster-name", "same", "--to-cluster-id", "2"), 2, nil, []string{
			`meshcrypt: both clusters are named "same" (contexts "east" and "west"): every cluster of a mesh needs its own name` + "\n"})
		check(t, mc("clustermesh", "connect", "--to-context", "west", "--cluster-name", "East", "--cluster-id", "1"), 2, nil, []string{
			`meshcrypt: --cluster-name "East": a cluster name is a DNS label`})
		check(t, mc("clustermesh", "connect", "--to-context", "west", "--cluster-name", "east", "--cluster-id", "256"), 2, nil, []string{
			`meshcrypt: --cluster-id 256: a cluster ID is 1-255`})
		check(t, mc(connectArgs("--context", "west")...), 2, nil, []string{
			`meshcrypt: context "west" and --to-context "west" reach the same API server (` + west.cp.URL() + `)`})
		check(t, mc("clustermesh", "connect", "--to-context", "north"), 2, nil, []string{
			`meshcrypt: --to-context "north": no such context (the kubeconfig has: down, east, west, west-nobody)` + "\n"})
		check(t, mc("clustermesh", "connect", "--to-context", "down"), 2, nil, []string{
			`meshcrypt: context "down": cannot reach the Kubernetes API server at https://127.0.0.1:1: connection refused`})
		check(t, mc("clustermesh", "connect", "--to-context", "west-nobody"), 2, nil, []string{
			`meshcrypt: context "west-nobody": not allowed: user "nobody" may not get meshconfigs.meshcrypt.io (cluster-wide). It needs an RBAC rule`})
		check(t, mc("clustermesh", "connect"), 2, nil, []string{`meshcrypt: required flag(s) "to-context" not set` + "\n"})
		// Neither cluster has the agents' namespace yet.
		check(t, mc(connectArgs()...), 2, nil, []string{
			`meshcrypt: context "west": namespace "meshcrypt" does not exist: install meshcrypt first, or name the agents' namespace with --namespace` + "\n"})
		noMeshConfig(t)
	})
	for _, p := range []meshPeer{east, west} {
		if err := p.admin.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "meshcrypt"}}); err != nil {
			t.Fatal(err)
		}
	}

	var firstToken string
	t.Run("connect creates both sides' objects", func(t *testing.T) {
		r := mc(connectArgs()...)
		t.Logf("connect:\n%s", r.stdout)
		check(t, r, 0, []string{
			"connecting cluster east (ID 1, context \"east\") and cluster west (ID 2, context \"west\")\n",
			"west: ClusterRole meshcrypt-clustermesh-reader-east created (get, list, watch meshnodes, meshidentities.meshcrypt.io only)\n",
			"east: Secret meshcrypt/meshcrypt-clustermesh-west created",
			"east: MeshConfig default: spec.cluster set to name east, ID 1\n",
			"west: MeshConfig default: remote cluster east (ID 1, Secret meshcrypt-clustermesh-east)\n",
			"connected east <-> west",
		}, nil)
		for _, p := range [][2]meshPeer{{east, west}, {west, east}} {
			reader, read := p[0], p[1]
			var cfg v1alpha1.MeshConfig
			if err := reader.admin.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &cfg); err != nil {
				t.Fatal(err)
			}
			id := map[string]int32{"east": 1, "west": 2}
			want := v1alpha1.MeshConfigSpec{
				Cluster:        &v1alpha1.ClusterSpec{Name: reader.name, ID: id[reader.name]},
				RemoteClusters: []v1alpha1.RemoteCluster{{Name: read.name, ID: id[read.name], SecretName: "meshcrypt-clustermesh-" + read.name}},
			}
			if reader.name == "west" { // kept
				want.Encryption = v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeWireGuard, Strict: true}
			} else {
				want.Encryption = v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeDisabled} // the CRD's default
			}
			optOut := v1alpha1.DefaultNodeEncryptionOptOut // the CRD's default
			want.Encryption.NodeEncryptionOptOutLabels = &optOut
			hostToPods := true // the CRD's default
			want.Policy.AllowHostToLocalPods = &hostToPods
			if diff := cmp.Diff(want, cfg.Spec); diff != "" {
				t.Errorf("%s: MeshConfig spec (-want +got):\n%s", reader.name, diff)
			}
			name := "meshcrypt-clustermesh-reader-" + reader.name
			var role rbacv1.ClusterRole
			if err := read.admin.Get(ctx, client.ObjectKey{Name: name}, &role); err != nil {
				t.Fatal(err)
			}
			wantRules := []rbacv1.PolicyRule{{APIGroups: []string{"meshcrypt.io"}, Resources: []string{"meshnodes", "meshidentities"}, Verbs: []string{"get", "list", "watch"}}}
			if diff := cmp.Diff(wantRules, role.Rules); diff != "" {
				t.Errorf("%s: ClusterRole %s rules (-want +got):\n%s", read.name, name, diff)
			}
			var binding rbacv1.ClusterRoleBinding
			if err := read.admin.Get(ctx, client.ObjectKey{Name: name}, &binding); err != nil {
				t.Fatal(err)
			}
			wantSubjects := []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "meshcrypt", Name: name}}
			if diff := cmp.Diff(wantSubjects, binding.Subjects); diff != "" || binding.RoleRef.Name != name {
				t.Errorf("%s: ClusterRoleBinding %s: role %s, subjects (-want +got):\n%s", read.name, name, binding.RoleRef.Name, diff)
			}
			if err := read.admin.Get(ctx, client.ObjectKey{Namespace: "meshcrypt", Name: name}, &corev1.ServiceAccount{}); err != nil {
				t.Errorf("%s: ServiceAccount: %v", read.name, err)
			}
			cfgRead := reader.readerKubeconfig(t, read.name)
			if cfgRead.Host != read.cp.URL() || string(cfgRead.CAData) != string(read.cp.CACert()) || cfgRead.BearerToken == "" {
				t.Errorf("%s: the kubeconfig for %s has server %s (want %s), CA %t, token %t", reader.name, read.name,
					cfgRead.Host, read.cp.URL(), string(cfgRead.CAData) == string(read.cp.CACert()), cfgRead.BearerToken != "")
			}
			if reader.name == "east" {
				firstToken = cfgRead.BearerToken
			}
		}
	})

	t.Run("the stored kubeconfig reads MeshNodes and MeshIdentities of the other cluster, nothing else", func(t *testing.T) {
		if err := west.admin.Create(ctx, validNode("w1")); err != nil {
			t.Fatal(err)
		}
		if err := west.admin.Create(ctx, &v1alpha1.MeshIdentity{ObjectMeta: metav1.ObjectMeta{Name: "65792"},
			Spec: v1alpha1.MeshIdentitySpec{Labels: map[string]string{"k8s:app": "web"}}}); err != nil {
			t.Fatal(err)
		}
		if err := west.admin.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "meshcrypt", Name: "meshcrypt-ipsec-keys"}}); err != nil {
			t.Fatal(err)
		}
		sa := "system:serviceaccount:meshcrypt:meshcrypt-clustermesh-reader-east"
		for _, res := range []string{"meshnodes", "meshidentities"} {
			waitAllowed(t, west.admin, sa, "watch", res)
		}
		reader, err := client.NewWithWatch(east.readerKubeconfig(t, "west"), client.Options{Scheme: scheme})
		if err != nil {
			t.Fatal(err)
		}
		var nodes v1alpha1.MeshNodeList
		if err := reader.List(ctx, &nodes); err != nil || len(nodes.Items) != 1 {
			t.Errorf("list MeshNodes: %v, %d items", err, len(nodes.Items))
		}
		var node v1alpha1.MeshNode
		if err := reader.Get(ctx, client.ObjectKey{Name: "w1"}, &node); err != nil {
			t.Errorf("get MeshNode: %v", err)
		}
		var idents v1alpha1.MeshIdentityList
		if err := reader.List(ctx, &idents); err != nil || len(idents.Items) != 1 {
			t.Errorf("list MeshIdentities: %v, %d items", err, len(idents.Items))
		}
		if err := reader.Get(ctx, client.ObjectKey{Name: "65792"}, &v1alpha1.MeshIdentity{}); err != nil {
			t.Errorf("get MeshIdentity: %v", err)
		}
		for _, list := range []client.ObjectList{&v1alpha1.MeshNodeList{}, &v1alpha1.MeshIdentityList{}} {
			if err := firstWatchEvent(ctx, reader, list); err != nil {
				t.Errorf("watch %T: %v", list, err)
			}
		}
		// Forbidden: writing MeshNodes (spec or status), reading Secrets, Pods, MeshConfig.
		stolen := node.DeepCopy()
		stolen.Spec.WireGuard.PublicKey = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
		forbidden := []struct {
			what string
			err  error
		}{
			{"create MeshNode", reader.Create(ctx, validNode("w9"))},
			{"update MeshNode", reader.Update(ctx, stolen)},
			{"update MeshNode status", reader.Status().Update(ctx, stolen)},
			{"delete MeshNode", reader.Delete(ctx, stolen)},
			{"create MeshIdentity", reader.Create(ctx, &v1alpha1.MeshIdentity{ObjectMeta: metav1.ObjectMeta{Name: "65793"}, Spec: v1alpha1.MeshIdentitySpec{Labels: map[string]string{"k8s:app": "x"}}})},
			{"get Secret", reader.Get(ctx, client.ObjectKey{Namespace: "meshcrypt", Name: "meshcrypt-ipsec-keys"}, &corev1.Secret{})},
			{"list Secrets", reader.List(ctx, &corev1.SecretList{})},
			{"list Pods", reader.List(ctx, &corev1.PodList{})},
			{"get MeshConfig", reader.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &v1alpha1.MeshConfig{})},
			{"list ServiceAccounts", reader.List(ctx, &corev1.ServiceAccountList{}, client.InNamespace("meshcrypt"))},
		}
		for _, f := range forbidden {
			if !apierrors.IsForbidden(f.err) {
				t.Errorf("%s with the remote's token: %v, want Forbidden", f.what, f.err)
			}
		}
	})

	t.Run("connect again: same objects, a fresh token; --remote-api-server, --local-api-server, --token-duration", func(t *testing.T) {
		// localhost is in the serving certificates, so these URLs work and differ.
		westAlt := strings.Replace(west.cp.URL(), "127.0.0.1", "localhost", 1)
		eastAlt := strings.Replace(east.cp.URL(), "127.0.0.1", "localhost", 1)
		check(t, mc(connectArgs("--remote-api-server", westAlt, "--local-api-server", eastAlt, "--token-duration", "2h")...), 0, []string{
			"west: ClusterRole meshcrypt-clustermesh-reader-east unchanged",
			"east: Secret meshcrypt/meshcrypt-clustermesh-west updated",
			"west: MeshConfig default: remote cluster east (ID 1, Secret meshcrypt-clustermesh-east)\n",
		}, nil)
		for _, p := range [][2]meshPeer{{east, west}, {west, east}} {
			reader, read := p[0], p[1]
			var cfg v1alpha1.MeshConfig
			if err := reader.admin.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &cfg); err != nil {
				t.Fatal(err)
			}
			if len(cfg.Spec.RemoteClusters) != 1 {
				t.Errorf("%s: remote clusters %+v, want one", reader.name, cfg.Spec.RemoteClusters)
			}
			var secrets corev1.SecretList
			if err := reader.admin.List(ctx, &secrets, client.InNamespace("meshcrypt"), client.MatchingLabels{"meshcrypt.io/clustermesh-peer": read.name}); err != nil || len(secrets.Items) != 1 {
				t.Errorf("%s: Secrets for %s: %v, %d", reader.name, read.name, err, len(secrets.Items))
			}
			for _, s := range secrets.Items {
				exp, err := time.Parse(time.RFC3339, s.Annotations["meshcrypt.io/token-expires"])
				if d := time.Until(exp); err != nil || d < time.Hour || d > 3*time.Hour {
					t.Errorf("%s: token expires %q (%v), want in about 2h", reader.name, s.Annotations["meshcrypt.io/token-expires"], err)
				}
			}
			cfgRead := reader.readerKubeconfig(t, read.name)
			want := map[string]string{"east": westAlt, "west": eastAlt}[reader.name]
			if cfgRead.Host != want {
				t.Errorf("%s: kubeconfig server %s, want %s", reader.name, cfgRead.Host, want)
			}
			if reader.name == "east" && cfgRead.BearerToken == firstToken {
				t.Error("connect again kept the old token")
			}
			c, err := client.New(cfgRead, client.Options{Scheme: scheme})
			if err != nil {
				t.Fatal(err)
			}
			if err := c.List(ctx, &v1alpha1.MeshNodeList{}); err != nil {
				t.Errorf("%s reading %s through %s: %v", reader.name, read.name, cfgRead.Host, err)
			}
		}
		// Renaming a connected cluster is refused.
		check(t, mc("clustermesh", "connect", "--to-context", "west", "--cluster-name", "east", "--cluster-id", "3"), 2, nil, []string{
			`meshcrypt: context "east" is already cluster "east" with ID 1 (MeshConfig default spec.cluster), not "east" with ID 3: connect never renames a cluster`})
		// Now that both have names, connect needs no flags.
		check(t, mc("clustermesh", "connect", "--to-context", "west"), 0, []string{"connected east <-> west"}, nil)
	})

	t.Run("status from the nodes' reports", func(t *testing.T) {
		check(t, mc("clustermesh", "status"), 1, []string{"NOT connected: no local MeshNodes: no agent reports yet\n"}, nil)
		lastSync := metav1.NewTime(time.Now().Add(-90 * time.Second))
		report := func(node string, rs v1alpha1.RemoteClusterStatus) {
			t.Helper()
			var mn v1alpha1.MeshNode
			if err := east.admin.Get(ctx, client.ObjectKey{Name: node}, &mn); apierrors.IsNotFound(err) {
				mn = *validNode(node)
				if node == "n2" {
					mn.Spec.WireGuard.PublicKey = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
				}
				if err := east.admin.Create(ctx, &mn); err != nil {
					t.Fatal(err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			mn.Status.RemoteClusters = []v1alpha1.RemoteClusterStatus{rs}
			if err := east.admin.Status().Update(ctx, &mn); err != nil {
				t.Fatal(err)
			}
		}
		connected := v1alpha1.RemoteClusterStatus{Name: "west", State: v1alpha1.RemoteConnected, Nodes: 2, Identities: 5, PeersReady: 2, LastSync: &lastSync}
		report("n1", connected)
		check(t, mc("clustermesh", "status"), 0, []string{"connected: 1 remote cluster reachable from every node (1 node)\n"}, nil)
		less := connected
		less.PeersReady = 1
		report("n2", less)
		check(t, mc("clustermesh", "status"), 0, []string{
			"connected: 1 remote cluster reachable from every node (2 nodes)\n",
			"cluster: east (ID 1), 2 nodes\n",
			"REMOTE  ID  SECRET  TOKEN EXPIRES  REACHABLE FROM  NODES  REFUSED  IDENTITIES  PEERS READY\n",
			"west    2   ok      in 36", // 365d, or 364d after midnight UTC
			"2/2 nodes       2      0        5           1-2\n",
		}, nil)
		report("n2", v1alpha1.RemoteClusterStatus{Name: "west", State: v1alpha1.RemoteUnreachable, Nodes: 2, Identities: 5, PeersReady: 2,
			LastSync: &lastSync, Message: "dial tcp 10.0.0.10:6443: connect: connection refused"})
		r := mc("clustermesh", "status")
		t.Logf("status:\n%s", r.stdout)
		check(t, r, 1, []string{
			"NOT connected: west: reachable from 1/2 nodes\n",
			"west: node n2 Unreachable (last sync ",
			" ago): dial tcp 10.0.0.10:6443: connect: connection refused\n",
		}, nil)
		for _, format := range []string{"json", "yaml"} {
			r := mc("clustermesh", "status", "-o", format)
			check(t, r, 1, nil, nil)
			var got struct {
				Connected bool
				Remotes   []struct {
					Name                   string
					Connected, Unreachable int
				}
			}
			if err := yaml.Unmarshal([]byte(r.stdout), &got); err != nil {
				t.Fatalf("-o %s: %v\n%s", format, err, r.stdout)
			}
			if got.Connected || len(got.Remotes) != 1 || got.Remotes[0].Name != "west" || got.Remotes[0].Connected != 1 || got.Remotes[0].Unreachable != 1 {
				t.Errorf("-o %s: %+v", format, got)
			}
			if format == "json" && !json.Valid([]byte(r.stdout)) {
				t.Errorf("-o json is not JSON:\n%s", r.stdout)
			}
		}
		// West's side: its one MeshNode (made above) has no agent that reports east.
		check(t, mc("--context", "west", "clustermesh", "status"), 1, []string{
			"NOT connected: east: reachable from 0/1 nodes\n",
			"east    1   ok      in 36",
			"east: node w1 does not report it (agent not running, or not yet updated)\n",
		}, nil)
	})

	t.Run("disconnect removes everything and revokes the tokens", func(t *testing.T) {
		readers := map[string]*rest.Config{"east": east.readerKubeconfig(t, "west"), "west": west.readerKubeconfig(t, "east")}
		check(t, mc("clustermesh", "disconnect", "--to-context", "west"), 0, []string{
			"east: MeshConfig default: remote cluster west removed\n",
			"west: MeshConfig default: remote cluster east removed\n",
			"east: Secret meshcrypt/meshcrypt-clustermesh-west deleted\n",
			"west: ClusterRoleBinding meshcrypt-clustermesh-reader-east deleted\n",
			"west: ClusterRole meshcrypt-clustermesh-reader-east deleted\n",
			"west: ServiceAccount meshcrypt/meshcrypt-clustermesh-reader-east deleted\n",
			"disconnected east and west\n",
		}, nil)
		for _, p := range []meshPeer{east, west} {
			var cfg v1alpha1.MeshConfig
			if err := p.admin.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &cfg); err != nil {
				t.Fatal(err)
			}
			if len(cfg.Spec.RemoteClusters) != 0 || cfg.Spec.Cluster == nil || cfg.Spec.Cluster.Name != p.name {
				t.Errorf("%s: MeshConfig spec after disconnect: %+v", p.name, cfg.Spec)
			}
			if p.name == "west" && (cfg.Spec.Encryption.Mode != v1alpha1.ModeWireGuard || !cfg.Spec.Encryption.Strict) {
				t.Errorf("west: disconnect changed the encryption: %+v", cfg.Spec.Encryption)
			}
			for _, list := range []client.ObjectList{&corev1.SecretList{}, &corev1.ServiceAccountList{}, &rbacv1.ClusterRoleList{}, &rbacv1.ClusterRoleBindingList{}} {
				if err := p.admin.List(ctx, list, client.HasLabels{"meshcrypt.io/clustermesh-peer"}); err != nil {
					t.Fatal(err)
				}
				if n := meta.LenList(list); n != 0 {
					t.Errorf("%s: %d %T left after disconnect", p.name, n, list)
				}
			}
		}
		// Deleting the ServiceAccount revoked its tokens (the authenticator notices a moment later).
		for name, cfg := range readers {
			c, err := client.New(cfg, client.Options{Scheme: scheme})
			if err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(30 * time.Second)
			for {
				err := c.List(ctx, &v1alpha1.MeshNodeList{})
				if apierrors.IsUnauthorized(err) {
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("%s's token still gets %v after disconnect, want 401 Unauthorized", name, err)
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		check(t, mc("clustermesh", "disconnect", "--to-context", "west"), 0, []string{
			"east: MeshConfig default: no remote cluster west\n",
			"east: Secret meshcrypt/meshcrypt-clustermesh-west already absent\n",
			"disconnected east and west\n",
		}, nil)
		check(t, mc("clustermesh", "status"), 1, []string{"NOT connected: no remote clusters"}, nil)
	})
}
