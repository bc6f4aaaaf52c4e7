package kube

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
	"github.com/meshcrypt/meshcrypt/tests/controlplane"
)

// workerSubcommand makes the test binary double as an agent process that allocates label sets
// (worker_test.go); the convergence tests run several of them at once.
const workerSubcommand = "identity-worker"

// agentUsers are the users the workers and collectors authenticate as. They are bound to
// agentRole only, which grants exactly the verbs doc.go lists.
var agentUsers = []string{"agent-0", "agent-1", "agent-2", "agent-3", "agent-4", "agent-5", "agent-6", "agent-7"}

const agentRole = "meshcrypt-identity"

// agentVerbs are the verbs on meshidentities this package needs (doc.go, RBAC).
var agentVerbs = []string{"get", "list", "watch", "create", "update", "delete"}

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == workerSubcommand {
		os.Exit(runWorker(os.Args[2:]))
	}
	code := m.Run()
	if shared.cp != nil {
		if err := shared.cp.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// shared is one control plane for the whole package, started by the first test that needs it:
// starting kube-apiserver costs seconds of every CPU. Tests keep out of each other's way by
// using different cluster IDs (and cluster names in their label sets).
var shared struct {
	once sync.Once
	cp   *controlplane.ControlPlane
	err  error
}

// controlPlane returns the shared control plane with the CRDs applied and agentRole bound to
// every agent user.
func controlPlane(t *testing.T) *controlplane.ControlPlane {
	t.Helper()
	shared.once.Do(func() {
		if err := controlplane.CleanupStale(""); err != nil {
			t.Logf("cleanup stale control planes: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		users := make([]controlplane.User, len(agentUsers))
		for i, u := range agentUsers {
			users[i] = controlplane.User{Name: u}
		}
		start := time.Now()
		cp, err := controlplane.Start(ctx, controlplane.Options{Users: users})
		if err != nil {
			shared.err = err
			return
		}
		shared.cp = cp
		if shared.err = cp.ApplyCRDs(ctx, crdDir()); shared.err != nil {
			return
		}
		shared.err = bindAgentRole(ctx, adminClient(t, cp))
		t.Logf("control plane ready in %v", time.Since(start).Round(time.Millisecond))
	})
	if shared.err != nil {
		t.Fatalf("shared control plane: %v", shared.err)
	}
	return shared.cp
}

func crdDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..", "manifests", "crds")
}

func newScheme() *k8sruntime.Scheme {
	s := k8sruntime.NewScheme()
	if err := v1alpha1.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := rbacv1.AddToScheme(s); err != nil {
		panic(err)
	}
	return s
}

func newClient(cfg *rest.Config) (client.Client, error) {
	return client.New(cfg, client.Options{Scheme: newScheme()})
}

func adminClient(t *testing.T, cp *controlplane.ControlPlane) client.Client {
	t.Helper()
	c, err := newClient(cp.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// agentClient returns a client (its own rest.Config, its own connections) authenticating as
// agent user i, who holds agentRole only.
func agentClient(t *testing.T, cp *controlplane.ControlPlane, i int) client.Client {
	t.Helper()
	c, err := newClient(cp.RESTConfigFor(cp.Token(agentUsers[i])))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func bindAgentRole(ctx context.Context, admin client.Client) error {
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: agentRole},
		Rules: []rbacv1.PolicyRule{{
			APIGroups: []string{v1alpha1.GroupVersion.Group},
			Resources: []string{"meshidentities"},
			Verbs:     agentVerbs,
		}},
	}
	if err := admin.Create(ctx, role); err != nil {
		return fmt.Errorf("create cluster role: %w", err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: agentRole},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: agentRole},
	}
	for _, u := range agentUsers {
		binding.Subjects = append(binding.Subjects, rbacv1.Subject{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: u})
	}
	if err := admin.Create(ctx, binding); err != nil {
		return fmt.Errorf("create cluster role binding: %w", err)
	}
	return nil
}

// testSet returns the i-th label set of a test's cluster: varied labels, a churn label that
// must not matter, ten namespaces, seven service accounts.
func testSet(cluster string, i int) identity.Labels {
	l, err := identity.Canonical(map[string]string{
		"app":               fmt.Sprintf("app-%d", i),
		"tier":              []string{"web", "api", "db", "cache"}[i%4],
		"pod-template-hash": fmt.Sprintf("h%d", i*7919),
	}, fmt.Sprintf("ns-%d", i%10), fmt.Sprintf("sa-%d", i%7), cluster)
	if err != nil {
		panic(err)
	}
	return l
}

// listCluster returns every identity of one cluster as the API server has them.
func listCluster(t *testing.T, c client.Client, cluster uint8) map[identity.Identity]identity.Labels {
	t.Helper()
	all, err := NewStore(c).List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for id := range all {
		if id.Cluster() != cluster {
			delete(all, id)
		}
	}
	return all
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}
