package controlplane

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// TestControlPlane starts one control plane and runs the subtests on it in order; later ones
// build on objects earlier ones created, the restarts come after the API checks, and the last
// one stops the plane. Starting kube-apiserver costs seconds of both CPUs, so one plane serves
// every check that does not need a fresh one.
func TestControlPlane(t *testing.T) {
	cp := StartT(t, Options{
		Users:  []User{{Name: "alice", Groups: []string{"developers"}}},
		Logger: testLogger(t),
	})
	ctx := t.Context()
	kube := kubernetes.NewForConfigOrDie(cp.RESTConfig())

	t.Run("namespace, node and pod", func(t *testing.T) {
		if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		node := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: "node-a"},
			Spec: corev1.NodeSpec{
				PodCIDR:  "10.244.1.0/24",
				PodCIDRs: []string{"10.244.1.0/24", "fd00:10:244:1::/64"},
			},
		}
		node, err := kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		wantAddrs := []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: "192.168.50.10"},
			{Type: corev1.NodeInternalIP, Address: "fd00:50::10"},
			{Type: corev1.NodeHostName, Address: "node-a"},
		}
		node.Status.Addresses = wantAddrs
		if _, err := kube.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		got, err := kube.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff([]string{"10.244.1.0/24", "fd00:10:244:1::/64"}, got.Spec.PodCIDRs); diff != "" {
			t.Errorf("podCIDRs (-want +got):\n%s", diff)
		}
		if diff := cmp.Diff(wantAddrs, got.Status.Addresses); diff != "" {
			t.Errorf("addresses (-want +got):\n%s", diff)
		}

		// No scheduler, no default ServiceAccount: a Pod bound by spec.nodeName must be accepted.
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "demo", Labels: map[string]string{"app": "web"}},
			Spec: corev1.PodSpec{
				NodeName:   "node-a",
				Containers: []corev1.Container{{Name: "web", Image: "example.invalid/web"}},
			},
		}
		pod, err = kube.CoreV1().Pods("demo").Create(ctx, pod, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if pod.Spec.NodeName != "node-a" {
			t.Errorf("pod nodeName = %q, want node-a", pod.Spec.NodeName)
		}
	})

	t.Run("kubeconfig", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "kubeconfig")
		if err := cp.WriteKubeconfig(path, "", cp.AdminToken()); err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("kubeconfig mode = %v, want 0600", st.Mode().Perm())
		}
		cfg, err := clientcmd.BuildConfigFromFlags("", path)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Host != cp.URL() {
			t.Errorf("kubeconfig server = %q, want %q", cfg.Host, cp.URL())
		}
		if _, err := kubernetes.NewForConfigOrDie(cfg).CoreV1().Namespaces().Get(ctx, "demo", metav1.GetOptions{}); err != nil {
			t.Errorf("client from kubeconfig: %v", err)
		}

		bad := filepath.Join(t.TempDir(), "kubeconfig")
		if err := cp.WriteKubeconfig(bad, "", "not-a-token"); err != nil {
			t.Fatal(err)
		}
		cfg, err = clientcmd.BuildConfigFromFlags("", bad)
		if err != nil {
			t.Fatal(err)
		}
		_, err = kubernetes.NewForConfigOrDie(cfg).CoreV1().Namespaces().Get(ctx, "demo", metav1.GetOptions{})
		if !apierrors.IsUnauthorized(err) {
			t.Errorf("client with a wrong token: got %v, want Unauthorized", err)
		}
	})

	t.Run("kubeconfig through a forwarder", func(t *testing.T) {
		// 127.0.0.2 is not in the serving certificate; tls-server-name makes it verify.
		fwd := forward(t, "127.0.0.2:0", strings.TrimPrefix(cp.URL(), "https://"))
		path := filepath.Join(t.TempDir(), "kubeconfig")
		if err := cp.WriteKubeconfig(path, "https://"+fwd, cp.AdminToken()); err != nil {
			t.Fatal(err)
		}
		cfg, err := clientcmd.BuildConfigFromFlags("", path)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Host != "https://"+fwd {
			t.Errorf("kubeconfig server = %q, want https://%s", cfg.Host, fwd)
		}
		if _, err := kubernetes.NewForConfigOrDie(cfg).CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{}); err != nil {
			t.Errorf("client through the forwarder: %v", err)
		}
	})

	t.Run("kubectl", func(t *testing.T) {
		kubectl, err := exec.LookPath("kubectl")
		if err != nil {
			t.Skip("kubectl not installed")
		}
		path := filepath.Join(t.TempDir(), "kubeconfig")
		if err := cp.WriteKubeconfig(path, "", cp.AdminToken()); err != nil {
			t.Fatal(err)
		}
		out, err := exec.CommandContext(ctx, kubectl, "--kubeconfig", path, "get", "nodes", "-o", "name").CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl: %v\n%s", err, out)
		}
		if got := strings.TrimSpace(string(out)); got != "node/node-a" {
			t.Errorf("kubectl get nodes = %q, want node/node-a", got)
		}
	})

	t.Run("rbac", func(t *testing.T) {
		if cp.Token("alice") == "" || cp.Token("alice") == cp.AdminToken() {
			t.Fatalf("Token(alice) = %q", cp.Token("alice"))
		}
		if cp.Token("mallory") != "" {
			t.Errorf("Token of an unknown user = %q, want empty", cp.Token("mallory"))
		}
		alice := kubernetes.NewForConfigOrDie(cp.RESTConfigFor(cp.Token("alice")))
		_, err := alice.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if !apierrors.IsForbidden(err) {
			t.Fatalf("alice lists nodes before the binding: got %v, want Forbidden", err)
		}
		for range 2 { // applying twice is idempotent
			if err := cp.ApplyYAML(ctx, "testdata/rbac.yaml"); err != nil {
				t.Fatal(err)
			}
		}
		// The RBAC authorizer reads bindings from an informer: allow it a moment.
		var nodes *corev1.NodeList
		err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 10*time.Second, true, func(ctx context.Context) (bool, error) {
			nodes, err = alice.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
			return err == nil, nil
		})
		if err != nil {
			t.Fatalf("alice lists nodes after the binding: %v", err)
		}
		if len(nodes.Items) != 1 || nodes.Items[0].Name != "node-a" {
			t.Errorf("alice sees %d nodes, want node-a only", len(nodes.Items))
		}
		err = alice.CoreV1().Nodes().Delete(ctx, "node-a", metav1.DeleteOptions{})
		if !apierrors.IsForbidden(err) {
			t.Errorf("alice deletes a node: got %v, want Forbidden", err)
		}
	})

	t.Run("CRDs with a CEL rule", func(t *testing.T) {
		for range 2 { // the second round takes the update path
			if err := cp.ApplyCRDs(ctx, "testdata/crds"); err != nil {
				t.Fatal(err)
			}
		}
		dyn := dynamic.NewForConfigOrDie(cp.RESTConfig())
		widgets := dyn.Resource(schema.GroupVersionResource{Group: "test.meshcrypt.io", Version: "v1", Resource: "widgets"}).Namespace("demo")
		widget := func(name string, replicas, minReplicas int64) *unstructured.Unstructured {
			return &unstructured.Unstructured{Object: map[string]any{
				"apiVersion": "test.meshcrypt.io/v1",
				"kind":       "Widget",
				"metadata":   map[string]any{"name": name},
				"spec":       map[string]any{"replicas": replicas, "minReplicas": minReplicas},
			}}
		}
		if _, err := widgets.Create(ctx, widget("good", 3, 1), metav1.CreateOptions{}); err != nil {
			t.Errorf("create a valid widget: %v", err)
		}
		_, err := widgets.Create(ctx, widget("bad", 1, 3), metav1.CreateOptions{})
		if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "minReplicas must not exceed replicas") {
			t.Errorf("create an invalid widget: got %v, want Invalid naming the CEL rule's message", err)
		}
		gadgets := dyn.Resource(schema.GroupVersionResource{Group: "test.meshcrypt.io", Version: "v1", Resource: "gadgets"})
		gadget := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "test.meshcrypt.io/v1", "kind": "Gadget",
			"metadata": map[string]any{"name": "g1"}, "spec": map[string]any{"anything": "goes"},
		}}
		if _, err := gadgets.Create(ctx, gadget, metav1.CreateOptions{}); err != nil {
			t.Errorf("create a gadget (second CRD of the file): %v", err)
		}

		notCRD := t.TempDir()
		if err := os.WriteFile(filepath.Join(notCRD, "cm.yaml"), []byte("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := cp.ApplyCRDs(ctx, notCRD); err == nil || !strings.Contains(err.Error(), "is not an apiextensions.k8s.io/v1 CustomResourceDefinition") {
			t.Errorf("ApplyCRDs of a ConfigMap: got %v, want an error", err)
		}
	})

	t.Run("ValidatingAdmissionPolicy", func(t *testing.T) {
		if err := cp.ApplyYAML(ctx, "testdata/vap.yaml"); err != nil {
			t.Fatal(err)
		}
		cm := func(name string, labels map[string]string) *corev1.ConfigMap {
			return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "demo", Labels: labels}}
		}
		dryRun := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}
		// The policy takes effect once the server has compiled it: poll.
		var err error
		waitErr := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 15*time.Second, true, func(ctx context.Context) (bool, error) {
			_, err = kube.CoreV1().ConfigMaps("demo").Create(ctx, cm("denied", map[string]string{"forbidden": "yes"}), dryRun)
			return err != nil, nil
		})
		if waitErr != nil || !strings.Contains(err.Error(), "configmaps labelled forbidden are denied") {
			t.Fatalf("a ConfigMap the policy denies: got %v, want the policy's message", err)
		}
		if _, err := kube.CoreV1().ConfigMaps("demo").Create(ctx, cm("allowed", nil), dryRun); err != nil {
			t.Errorf("a ConfigMap the policy allows: %v", err)
		}
	})

	t.Run("service account token", func(t *testing.T) {
		sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "agent", Namespace: "demo"}}
		if _, err := kube.CoreV1().ServiceAccounts("demo").Create(ctx, sa, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		tr, err := kube.CoreV1().ServiceAccounts("demo").CreateToken(ctx, "agent", &authenticationv1.TokenRequest{
			Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: new(int64(600))},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := whoami(t, cp, tr.Status.Token); got.Username != "system:serviceaccount:demo:agent" {
			t.Errorf("bound token authenticates as %q", got.Username)
		}
		admin := whoami(t, cp, cp.AdminToken())
		if admin.Username != AdminUser || !strings.Contains(strings.Join(admin.Groups, ","), "system:masters") {
			t.Errorf("admin token authenticates as %+v", admin)
		}
	})

	t.Run("restart kube-apiserver", func(t *testing.T) {
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "before-apiserver-restart", Namespace: "demo"}, Data: map[string]string{"k": "v1"}}
		if _, err := kube.CoreV1().ConfigMaps("demo").Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		url := cp.URL()
		_, oldPID := cp.pids()
		if err := cp.StopAPIServer(); err != nil {
			t.Fatal(err)
		}
		if processRuns(oldPID) {
			t.Errorf("kube-apiserver pid %d runs after StopAPIServer", oldPID)
		}
		short, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := kube.CoreV1().ConfigMaps("demo").Get(short, cm.Name, metav1.GetOptions{})
		cancel()
		if err == nil {
			t.Fatal("GET succeeded with kube-apiserver stopped")
		}
		if err := cp.StartAPIServer(ctx); err != nil {
			t.Fatal(err)
		}
		if cp.URL() != url {
			t.Errorf("URL changed from %s to %s", url, cp.URL())
		}
		// The client built before the restart keeps working: same port, CA and token.
		got, err := kube.CoreV1().ConfigMaps("demo").Get(ctx, cm.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("GET after restart: %v", err)
		}
		if got.Data["k"] != "v1" {
			t.Errorf("configmap data = %v", got.Data)
		}
		if err := cp.StartAPIServer(ctx); err != nil {
			t.Errorf("StartAPIServer while running: %v", err)
		}
	})

	t.Run("restart kube-apiserver while its port is taken", func(t *testing.T) {
		if err := cp.StopAPIServer(); err != nil {
			t.Fatal(err)
		}
		l, err := net.Listen("tcp", strings.TrimPrefix(cp.URL(), "https://"))
		if err != nil {
			t.Fatal(err)
		}
		// Free the port once the first attempt has failed on it; the retry must succeed.
		released := make(chan struct{})
		go func() {
			defer close(released)
			defer l.Close()
			deadline := time.Now().Add(30 * time.Second)
			for time.Now().Before(deadline) {
				if b, _ := os.ReadFile(cp.APIServerLog()); strings.Contains(string(b), "address already in use") {
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
		}()
		err = cp.StartAPIServer(ctx)
		<-released
		if err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(cp.APIServerLog())
		if !strings.Contains(string(b), "address already in use") {
			t.Fatal("the first attempt did not hit the taken port")
		}
		if _, err := kube.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{}); err != nil {
			t.Errorf("GET after the retried start: %v", err)
		}
	})

	t.Run("restart etcd", func(t *testing.T) {
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "before-etcd-restart", Namespace: "demo"}, Data: map[string]string{"k": "v2"}}
		if _, err := kube.CoreV1().ConfigMaps("demo").Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		oldPID, _ := cp.pids()
		if err := cp.RestartEtcd(ctx); err != nil {
			t.Fatal(err)
		}
		newPID, _ := cp.pids()
		if newPID == oldPID || processRuns(oldPID) {
			t.Errorf("etcd pid %d -> %d: not restarted", oldPID, newPID)
		}
		// A GET without resourceVersion is a quorum read from etcd.
		got, err := kube.CoreV1().ConfigMaps("demo").Get(ctx, cm.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("GET after etcd restart: %v", err)
		}
		if got.Data["k"] != "v2" {
			t.Errorf("configmap data = %v", got.Data)
		}
		after := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "after-etcd-restart", Namespace: "demo"}}
		if _, err := kube.CoreV1().ConfigMaps("demo").Create(ctx, after, metav1.CreateOptions{}); err != nil {
			t.Errorf("write after etcd restart: %v", err)
		}
		if _, err := kube.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{}); err != nil {
			t.Errorf("node after restarts: %v", err)
		}
	})

	t.Run("stop", func(t *testing.T) {
		etcdPID, apiPID := cp.pids()
		if !processRuns(etcdPID) || !processRuns(apiPID) {
			t.Fatalf("before Stop: etcd %d running %v, kube-apiserver %d running %v", etcdPID, processRuns(etcdPID), apiPID, processRuns(apiPID))
		}
		if err := cp.Stop(); err != nil {
			t.Fatal(err)
		}
		for _, pid := range []int{etcdPID, apiPID} {
			if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
				t.Errorf("pid %d still exists after Stop", pid)
			}
		}
		if _, err := os.Stat(cp.Dir()); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("dir %s after Stop: %v, want it gone", cp.Dir(), err)
		}
		if err := cp.Stop(); err != nil {
			t.Errorf("second Stop: %v", err)
		}
		if err := cp.StartAPIServer(ctx); err == nil {
			t.Error("StartAPIServer after Stop succeeded")
		}
	})
}

// TestStartErrors checks that Start fails with a clear error and leaves neither processes nor a
// directory behind.
func TestStartErrors(t *testing.T) {
	fakeAPIServer := filepath.Join(t.TempDir(), "kube-apiserver")
	script := "#!/bin/sh\necho 'fake kube-apiserver: boom' >&2\nexit 3\n"
	if err := os.WriteFile(fakeAPIServer, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		env     map[string]string
		opts    Options
		wantErr []string
	}{
		{
			name:    "no etcd",
			env:     map[string]string{"PATH": t.TempDir(), EnvEtcd: ""},
			opts:    Options{KubeAPIServer: fakeAPIServer},
			wantErr: []string{"etcd not found: install Debian's etcd-server (make deps)"},
		},
		{
			name:    "kube-apiserver missing",
			opts:    Options{KubeAPIServer: filepath.Join(t.TempDir(), "nope")},
			wantErr: []string{"kube-apiserver from options", "no such file"},
		},
		{
			name:    "kube-apiserver exits",
			opts:    Options{KubeAPIServer: fakeAPIServer},
			wantErr: []string{"kube-apiserver exited", "fake kube-apiserver: boom"},
		},
		{
			name:    "bad user name",
			opts:    Options{KubeAPIServer: fakeAPIServer, Users: []User{{Name: "a,b"}}},
			wantErr: []string{"contains a comma"},
		},
		{
			name:    "user twice",
			opts:    Options{KubeAPIServer: fakeAPIServer, Users: []User{{Name: "bob"}, {Name: "bob"}}},
			wantErr: []string{`user "bob" given twice`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			parent := t.TempDir()
			tt.opts.Dir = parent
			cp, err := Start(t.Context(), tt.opts)
			if err == nil {
				cp.Stop()
				t.Fatal("Start succeeded")
			}
			for _, want := range tt.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not contain %q", err, want)
				}
			}
			if !strings.HasPrefix(err.Error(), "start control plane: ") {
				t.Errorf("error %q lacks the prefix", err)
			}
			left, _ := filepath.Glob(filepath.Join(parent, DirPrefix+"*"))
			if len(left) != 0 {
				t.Errorf("left behind: %v", left)
			}
			if pids := processesUnder(t, parent); len(pids) != 0 {
				t.Errorf("processes left running under %s: %v", parent, pids)
			}
		})
	}
}

// forward accepts TCP connections on listen and relays each to target, until the test ends.
func forward(t *testing.T, listen, target string) string {
	t.Helper()
	l, err := net.Listen("tcp", listen)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				go func() { _, _ = io.Copy(u, c); u.Close() }()
				_, _ = io.Copy(c, u)
			}()
		}
	}()
	return l.Addr().String()
}

// whoami returns who the API server takes token for.
func whoami(t *testing.T, cp *ControlPlane, token string) authenticationv1.UserInfo {
	t.Helper()
	c := kubernetes.NewForConfigOrDie(cp.RESTConfigFor(token))
	r, err := c.AuthenticationV1().SelfSubjectReviews().Create(t.Context(), &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("SelfSubjectReview: %v", err)
	}
	return r.Status.UserInfo
}

// processRuns reports whether pid is a live (not zombie) process.
func processRuns(pid int) bool { return pid > 0 && processExists(pid) }

// processesUnder lists processes whose command line points into dir.
func processesUnder(t *testing.T, dir string) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err == nil && mentionsDir(cmdline, dir) && processExists(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// testLogger logs through t.Log when -v is given.
func testLogger(t *testing.T) *slog.Logger {
	if !testing.Verbose() {
		return nil
	}
	return slog.New(slog.NewTextHandler(tWriter{t}, nil))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}
