package cluster

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/controlplane"
)

// KubeconfigEnv names the environment variable that hands Start an external control plane:
// the path of its admin kubeconfig (the default of Options.Kubeconfig). tests/vm sets it in
// the VM, pointing at the host's kube-apiserver.
const KubeconfigEnv = "MESHCRYPT_KUBECONFIG"

// ApplyManifests installs what the agents need into a control plane, from this source tree:
// the CRDs (manifests/crds), the agent's namespace, ServiceAccount and RBAC (manifests/rbac)
// and the MeshNode admission policy (manifests/admission). Start applies them to a control
// plane of its own; whoever hands Start an external one (Options.Kubeconfig) applies them
// first, as tests/vm does on the host before it boots the VM. It is idempotent.
func ApplyManifests(ctx context.Context, cp *controlplane.ControlPlane) error {
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	if err := cp.ApplyCRDs(ctx, filepath.Join(root, "manifests", "crds")); err != nil {
		return err
	}
	// Agents run as the ServiceAccount of manifests/rbac, under its ClusterRole and the
	// MeshNode admission policy, so every e2e run proves both suffice and hold.
	for _, dir := range []string{"rbac", "admission"} {
		if err := cp.ApplyYAML(ctx, filepath.Join(root, "manifests", dir)); err != nil {
			return err
		}
	}
	return nil
}

// External reports whether the cluster runs against an external control plane
// (Options.Kubeconfig) instead of one of its own (CP is nil then).
func (c *Cluster) External() bool { return c.ext != nil }

// NeedOwnControlPlane skips t when the cluster runs against an external control plane: a
// test that stops, restarts or otherwise manipulates kube-apiserver or etcd (what says how)
// cannot do that to a control plane it does not own, and other tests share it. Such tests
// run where the cluster starts its own, on the host (make test-e2e).
func (c *Cluster) NeedOwnControlPlane(t testing.TB, what string) {
	t.Helper()
	if c.ext != nil {
		t.Skipf("needs its own control plane (%s), but this cluster runs against the external one of %s "+
			"(as in the VM, tests/vm); it runs on the host, where the cluster starts its own", what, c.ext.path)
	}
}

// external is an external control plane, as its admin kubeconfig describes it.
type external struct {
	path    string                // the admin kubeconfig, absolute
	rest    *rest.Config          // the admin's
	apiAddr string                // host:port of the server
	cluster *clientcmdapi.Cluster // the current context's cluster, certificates inlined
}

// loadExternal reads an admin kubeconfig.
func loadExternal(path string) (*external, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	cfg, err := clientcmd.LoadFromFile(abs)
	if err != nil {
		return nil, fmt.Errorf("external control plane: %w", err)
	}
	rc, err := clientcmd.NewDefaultClientConfig(*cfg, nil).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("external control plane: kubeconfig %s: %w", abs, err)
	}
	// The rate limits of a control plane of its own (controlplane.RESTConfigFor). client-go's
	// defaults (5 requests a second, bursts of 10) would pace a test's writes at 200 ms each.
	rc.QPS, rc.Burst = 50, 100
	// The current context's cluster, with its CA inlined, for the agents' kubeconfigs.
	if err := clientcmdapi.MinifyConfig(cfg); err != nil {
		return nil, fmt.Errorf("external control plane: kubeconfig %s: %w", abs, err)
	}
	if err := clientcmdapi.FlattenConfig(cfg); err != nil {
		return nil, fmt.Errorf("external control plane: kubeconfig %s: %w", abs, err)
	}
	var cl *clientcmdapi.Cluster
	for _, c := range cfg.Clusters { // the only one left
		cl = c
	}
	if cl == nil {
		return nil, fmt.Errorf("external control plane: kubeconfig %s: its current context names no cluster", abs)
	}
	u, err := url.Parse(cl.Server)
	if err != nil || u.Hostname() == "" {
		return nil, fmt.Errorf("external control plane: kubeconfig %s: server %q is not a URL with a host", abs, cl.Server)
	}
	port := u.Port()
	if port == "" {
		port = map[string]string{"https": "443", "http": "80"}[u.Scheme]
	}
	return &external{path: abs, rest: rc, apiAddr: net.JoinHostPort(u.Hostname(), port), cluster: cl}, nil
}

// writeNodeKubeconfig writes a kubeconfig for a node's agent: server (the forwarder inside
// the node's namespace) and token.
func (c *Cluster) writeNodeKubeconfig(path, server, token string) error {
	if c.ext == nil {
		return c.CP.WriteKubeconfig(path, server, token)
	}
	if err := clientcmd.WriteToFile(*c.extKubeconfig(server, token), path); err != nil {
		return fmt.Errorf("write kubeconfig %s: %w", path, err)
	}
	return nil
}

// kubeconfigBytes returns a kubeconfig (YAML) reaching the API server at server (a forwarder)
// with token: the own control plane's CA, or the external one's cluster entry.
func (c *Cluster) kubeconfigBytes(server, token string) ([]byte, error) {
	if c.ext == nil {
		return c.CP.Kubeconfig(server, token)
	}
	b, err := clientcmd.Write(*c.extKubeconfig(server, token))
	if err != nil {
		return nil, fmt.Errorf("encode kubeconfig: %w", err)
	}
	return b, nil
}

// extKubeconfig is a kubeconfig for the external control plane at server (a forwarder) with
// token.
func (c *Cluster) extKubeconfig(server, token string) *clientcmdapi.Config {
	cl := c.ext.cluster.DeepCopy()
	cl.Server = server
	if cl.TLSServerName == "" {
		// The serving certificate names the host the admin reaches it by; the forwarder
		// is another address.
		u, _ := url.Parse(c.ext.cluster.Server)
		cl.TLSServerName = u.Hostname()
	}
	const name = "meshcrypt"
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[name] = cl
	cfg.AuthInfos[name] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts[name] = &clientcmdapi.Context{Cluster: name, AuthInfo: name}
	cfg.CurrentContext = name
	return cfg
}

// adminToken returns the admin's bearer token: the own control plane's, or the one the
// external control plane's kubeconfig authenticates with (tests/controlplane's kubeconfigs
// carry a token).
func (c *Cluster) adminToken() (string, error) {
	if c.ext == nil {
		return c.CP.AdminToken(), nil
	}
	if c.ext.rest.BearerToken == "" {
		return "", fmt.Errorf("external control plane: kubeconfig %s authenticates without a bearer token, which node kubeconfigs need", c.ext.path)
	}
	return c.ext.rest.BearerToken, nil
}

// resetTimeout bounds the wait for deleted objects to be gone.
const resetTimeout = 30 * time.Second

// resetAPI deletes what earlier clusters left in an external control plane: every object of
// the meshcrypt.io API group (MeshConfig, MeshNodes, MeshIdentities, MeshPolicies, and kinds
// added later, found through discovery), every Node, Pod (without a grace period: no kubelet
// would confirm) and Event, and the Secrets of the agent's namespace (the IPsec keyring,
// remote clusters' kubeconfigs). What ApplyManifests installed stays, and so do namespaces:
// with no namespace controller a deleted namespace would stay Terminating forever.
func (c *Cluster) resetAPI(ctx context.Context) error {
	dc, err := discovery.NewDiscoveryClientForConfig(c.rest)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(c.rest)
	if err != nil {
		return err
	}
	gv := v1alpha1.GroupVersion
	list, err := dc.ServerResourcesForGroupVersion(gv.String())
	if err != nil {
		return fmt.Errorf("external control plane %s: discover %s (were manifests/crds applied? see ApplyManifests): %w", c.rest.Host, gv, err)
	}
	type kind struct {
		gvr        schema.GroupVersionResource
		namespaced bool
		namespace  string // only this one, if set
	}
	var kinds []kind
	for _, r := range list.APIResources {
		if !strings.Contains(r.Name, "/") && slices.Contains(r.Verbs, "deletecollection") {
			kinds = append(kinds, kind{gvr: gv.WithResource(r.Name), namespaced: r.Namespaced})
		}
	}
	core := schema.GroupVersion{Version: "v1"}
	kinds = append(kinds,
		kind{gvr: core.WithResource("pods"), namespaced: true},
		kind{gvr: core.WithResource("nodes")},
		kind{gvr: core.WithResource("events"), namespaced: true},
		kind{gvr: core.WithResource("secrets"), namespaced: true, namespace: AgentNamespace},
	)
	zero := int64(0)
	var deleted []string
	remaining := func(ctx context.Context, k kind) (map[string]int, error) {
		l, err := dyn.Resource(k.gvr).Namespace(k.namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, err
		}
		byNS := map[string]int{}
		for _, o := range l.Items {
			byNS[o.GetNamespace()]++
		}
		return byNS, nil
	}
	for _, k := range kinds {
		byNS, err := remaining(ctx, k)
		if apierrors.IsNotFound(err) && k.namespace != "" {
			continue // the namespace does not exist: nothing in it
		}
		if err != nil {
			return fmt.Errorf("reset external control plane: list %s: %w", k.gvr.Resource, err)
		}
		n := 0
		for ns, count := range byNS {
			r := dyn.Resource(k.gvr).Namespace(ns)
			if err := r.DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{}); err != nil {
				return fmt.Errorf("reset external control plane: delete %s in %q: %w", k.gvr.Resource, ns, err)
			}
			n += count
		}
		if n > 0 {
			deleted = append(deleted, fmt.Sprintf("%d %s", n, k.gvr.Resource))
		}
	}
	// Nothing holds a finalizer today, so the objects are gone already; wait in case one
	// is added, and name what stays.
	var left []string
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, resetTimeout, true, func(ctx context.Context) (bool, error) {
		left = nil
		for _, k := range kinds {
			byNS, err := remaining(ctx, k)
			if err != nil && !apierrors.IsNotFound(err) {
				return false, err
			}
			for ns, count := range byNS {
				left = append(left, fmt.Sprintf("%d %s in %q", count, k.gvr.Resource, ns))
			}
		}
		return len(left) == 0, nil
	})
	if err != nil {
		return fmt.Errorf("reset external control plane: still there after %s: %s: %w", resetTimeout, strings.Join(left, ", "), err)
	}
	if len(deleted) > 0 {
		c.log.Info("reset the external control plane: deleted what an earlier cluster left", "deleted", strings.Join(deleted, ", "))
	}
	return nil
}
