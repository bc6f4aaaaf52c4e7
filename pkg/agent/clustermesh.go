package agent

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/discovery"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
	identitykube "github.com/meshcrypt/meshcrypt/pkg/identity/kube"
	"github.com/meshcrypt/meshcrypt/pkg/policy"
)

// Timing of the remote clusters' connections.
const (
	// remoteProbePeriod is how often a remote API server is asked for its version, to tell
	// Connected from Unreachable (the informers retry quietly and keep their last state).
	remoteProbePeriod  = 5 * time.Second
	remoteProbeTimeout = 4 * time.Second
	// remoteSecretRecheck is how often a connected remote's Secret is read again (a new
	// token or server from `meshcrypt clustermesh connect`).
	remoteSecretRecheck = 30 * time.Second
)

// remoteSep joins a remote cluster's name and its node's name into the peer name this node
// uses ("b/node1"): names of Kubernetes nodes never contain it.
const remoteSep = "/"

// remoteName is the peer name of node in cluster.
func remoteName(cluster, node string) string { return cluster + remoteSep + node }

// isRemote reports whether a peer name is a remote cluster's node.
func isRemote(name string) bool { return strings.Contains(name, remoteSep) }

// remoteCluster is this agent's connection to one remote cluster: an informer cache of its
// MeshNodes and MeshIdentities (two watches), and a probe of its API server.
type remoteCluster struct {
	spec       v1alpha1.RemoteCluster
	kubeconfig string    // the Secret's content the connection was made with
	checked    time.Time // when the Secret was last read
	cancel     context.CancelFunc
	cache      cache.Cache

	mu        sync.Mutex
	synced    bool
	reachable bool
	lastErr   string
	lastSync  time.Time
}

// meshState holds the remote clusters (reconcile's goroutine changes the set; the
// connections' goroutines their state).
type meshState struct {
	remotes map[string]*remoteCluster
}

// remoteInput is what the remote clusters contribute to a reconcile.
type remoteInput struct {
	nodes      []v1alpha1.MeshNode // renamed cluster/node
	pods       []podEntry          // from the remote MeshNodes' endpoints
	identities []policy.Identity
	perCluster map[string]*v1alpha1.RemoteClusterStatus
}

// syncRemotes makes the set of connections match mc.spec.remoteClusters: it connects new
// remotes (reading their Secrets), reconnects those whose Secret changed, and closes the
// ones removed. A remote whose Secret is missing or invalid is reported Unreachable.
func (a *Agent) syncRemotes(ctx context.Context, mc *v1alpha1.MeshConfig) {
	if a.mesh.remotes == nil {
		a.mesh.remotes = map[string]*remoteCluster{}
	}
	want := map[string]v1alpha1.RemoteCluster{}
	for _, r := range mc.Spec.RemoteClusters {
		want[r.Name] = r
	}
	for name, rc := range a.mesh.remotes {
		if _, ok := want[name]; !ok {
			a.log.Info("remote cluster removed", "cluster", name)
			rc.cancel()
			delete(a.mesh.remotes, name)
		}
	}
	for name, spec := range want {
		rc := a.mesh.remotes[name]
		if rc != nil && rc.spec == spec && time.Since(rc.checked) < remoteSecretRecheck && (rc.cache != nil || time.Since(rc.checked) < 2*time.Second) {
			continue
		}
		kc, err := a.remoteKubeconfig(ctx, spec.SecretName)
		if rc != nil {
			rc.checked = time.Now()
		}
		if rc != nil && rc.spec == spec && rc.cache != nil && (err != nil || kc == rc.kubeconfig) {
			continue // unchanged, or the Secret is unreadable now: keep what works
		}
		if rc != nil {
			rc.cancel()
		}
		rc = &remoteCluster{spec: spec, kubeconfig: kc, cancel: func() {}, checked: time.Now()}
		a.mesh.remotes[name] = rc
		if err != nil {
			rc.lastErr = err.Error()
			a.log.Warn("remote cluster not connected", "cluster", name, "err", err)
			continue
		}
		if err := a.connectRemote(ctx, rc); err != nil {
			rc.lastErr = err.Error()
			a.log.Warn("remote cluster not connected", "cluster", name, "err", err)
			continue
		}
		a.log.Info("remote cluster connecting", "cluster", name, "id", spec.ID)
	}
}

// remoteKubeconfig reads the kubeconfig of a remote cluster's Secret.
func (a *Agent) remoteKubeconfig(ctx context.Context, secret string) (string, error) {
	var sec corev1.Secret
	if err := a.client.Get(ctx, client.ObjectKey{Namespace: a.opts.Namespace, Name: secret}, &sec); err != nil {
		if apierrors.IsNotFound(err) {
			return "", fmt.Errorf("secret %s/%s not found", a.opts.Namespace, secret)
		}
		return "", fmt.Errorf("read Secret %s/%s: %w", a.opts.Namespace, secret, err)
	}
	kc := sec.Data[v1alpha1.RemoteKubeconfigKey]
	if len(kc) == 0 {
		return "", fmt.Errorf("secret %s/%s has no key %q", a.opts.Namespace, secret, v1alpha1.RemoteKubeconfigKey)
	}
	return string(kc), nil
}

// connectRemote starts the informers of a remote cluster and its probe.
func (a *Agent) connectRemote(ctx context.Context, rc *remoteCluster) error {
	cfg, err := clientcmd.RESTConfigFromKubeConfig([]byte(rc.kubeconfig))
	if err != nil {
		return fmt.Errorf("kubeconfig of Secret %s: %w", rc.spec.SecretName, err)
	}
	cfg.UserAgent = "meshcrypt-agent/" + a.opts.NodeName
	scheme := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return err
	}
	c, err := cache.New(cfg, cache.Options{Scheme: scheme, DefaultTransform: cache.TransformStripManagedFields()})
	if err != nil {
		return fmt.Errorf("informers for remote cluster %s: %w", rc.spec.Name, err)
	}
	disco, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return err
	}
	rctx, cancel := context.WithCancel(ctx)
	rc.cancel, rc.cache = cancel, c
	handler := toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { a.kick() },
		UpdateFunc: func(any, any) { a.kick() },
		DeleteFunc: func(any) { a.kick() },
	}
	for _, obj := range []client.Object{&v1alpha1.MeshNode{}, &v1alpha1.MeshIdentity{}} {
		inf, err := c.GetInformer(rctx, obj)
		if err != nil {
			cancel()
			return fmt.Errorf("informer for remote %T: %w", obj, err)
		}
		if _, err := inf.AddEventHandler(handler); err != nil {
			cancel()
			return err
		}
	}
	go func() { _ = c.Start(rctx) }()
	go func() {
		if c.WaitForCacheSync(rctx) {
			rc.mu.Lock()
			rc.synced = true
			rc.mu.Unlock()
			a.log.Info("remote cluster synced", "cluster", rc.spec.Name)
			a.kick()
		}
	}()
	go a.probeRemote(rctx, rc, disco)
	return nil
}

// probeRemote asks the remote API server for its version every remoteProbePeriod and records
// whether it answered; a change of state triggers a reconcile (status).
func (a *Agent) probeRemote(ctx context.Context, rc *remoteCluster, disco *discovery.DiscoveryClient) {
	t := time.NewTicker(remoteProbePeriod)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, remoteProbeTimeout)
		err := disco.RESTClient().Get().AbsPath("/version").Do(pctx).Error()
		cancel()
		if ctx.Err() != nil {
			return
		}
		rc.mu.Lock()
		was := rc.reachable
		rc.reachable = err == nil
		if err == nil {
			rc.lastErr, rc.lastSync = "", time.Now()
		} else {
			rc.lastErr = err.Error()
		}
		rc.mu.Unlock()
		if was != (err == nil) {
			if err != nil {
				a.log.Warn("remote cluster unreachable: keeping its peers", "cluster", rc.spec.Name, "err", err)
			} else {
				a.log.Info("remote cluster reachable", "cluster", rc.spec.Name)
			}
			a.kick()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// remoteSnapshot reads every synced remote cluster's MeshNodes (renamed cluster/node),
// their endpoints and the MeshIdentities of that cluster's ID, and their status so far.
func (a *Agent) remoteSnapshot(ctx context.Context) remoteInput {
	in := remoteInput{perCluster: map[string]*v1alpha1.RemoteClusterStatus{}}
	for _, name := range slices.Sorted(maps.Keys(a.mesh.remotes)) {
		rc := a.mesh.remotes[name]
		rc.mu.Lock()
		st := &v1alpha1.RemoteClusterStatus{Name: name, State: v1alpha1.RemoteUnreachable, Message: rc.lastErr}
		if !rc.lastSync.IsZero() {
			t := metav1.NewTime(rc.lastSync.Truncate(time.Second))
			st.LastSync = &t
		}
		synced, reachable := rc.synced, rc.reachable
		rc.mu.Unlock()
		in.perCluster[name] = st
		if rc.cache == nil || !synced {
			if st.Message == "" {
				st.Message = "not synced yet"
			}
			continue
		}
		if reachable {
			st.State, st.Message = v1alpha1.RemoteConnected, ""
		}
		var nodes v1alpha1.MeshNodeList
		if err := rc.cache.List(ctx, &nodes); err != nil {
			st.State, st.Message = v1alpha1.RemoteUnreachable, err.Error()
			continue
		}
		for _, mn := range nodes.Items {
			mn.Name = remoteName(name, mn.Name)
			in.nodes = append(in.nodes, mn)
			for _, ep := range mn.Spec.Endpoints {
				ip, err := netip.ParseAddr(string(ep.IP))
				id := identity.Identity(ep.Identity)
				if err != nil || id.Cluster() != uint8(rc.spec.ID) {
					continue // an endpoint claiming another cluster's identity is not believed
				}
				in.pods = append(in.pods, podEntry{Node: mn.Name, IPs: []netip.Addr{ip.Unmap()}, Identity: id})
			}
		}
		st.Nodes = int32(len(nodes.Items))
		var ids v1alpha1.MeshIdentityList
		if err := rc.cache.List(ctx, &ids); err == nil {
			for i := range ids.Items {
				id, labels, err := identitykube.FromObject(&ids.Items[i])
				if err != nil || id.Cluster() != uint8(rc.spec.ID) || labels.Map()[policy.LabelCluster] != name {
					continue // identities are believed only for the remote's own cluster ID and name
				}
				in.identities = append(in.identities, policy.Identity{ID: uint32(id), Labels: labels.Map()})
				st.Identities++
			}
		}
	}
	return in
}

// remoteStatuses finishes the remote clusters' status from the reconcile's peers and skips:
// peers ready, nodes refused (pod CIDR conflicts), and Refused as the state when any was.
func remoteStatuses(in remoteInput, peers []string, skips []skip) []v1alpha1.RemoteClusterStatus {
	var out []v1alpha1.RemoteClusterStatus
	reasons := map[string][]string{}
	for _, s := range skips {
		if c, _, ok := strings.Cut(s.Node, remoteSep); ok && !s.Pending {
			if st := in.perCluster[c]; st != nil {
				st.NodesRefused++
				reasons[c] = append(reasons[c], s.Node+": "+s.Reason)
			}
		}
	}
	for _, p := range peers {
		if c, _, ok := strings.Cut(p, remoteSep); ok {
			if st := in.perCluster[c]; st != nil {
				st.PeersReady++
			}
		}
	}
	for _, n := range slices.Sorted(maps.Keys(in.perCluster)) {
		st := in.perCluster[n]
		if len(reasons[n]) > 0 {
			slices.Sort(reasons[n])
			msg := strings.Join(reasons[n], "; ")
			if len(msg) > 1000 {
				msg = msg[:1000] + "..."
			}
			st.State, st.Message = v1alpha1.RemoteRefused, msg
		}
		out = append(out, *st)
	}
	return out
}

// localEndpoints are this node's pods with their identities, for the MeshNode's
// spec.endpoints (read by the other clusters' agents), sorted by address.
func localEndpoints(self string, pods []podEntry) []v1alpha1.Endpoint {
	var out []v1alpha1.Endpoint
	for _, p := range pods {
		if p.Node != self {
			continue
		}
		for _, ip := range p.IPs {
			out = append(out, v1alpha1.Endpoint{IP: v1alpha1.IP(ip.String()), Identity: int64(p.Identity)})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].IP < out[j].IP })
	if len(out) > 4096 {
		out = out[:4096]
	}
	return out
}

// clusterFromConfig takes this cluster's name and ID from MeshConfig spec.cluster when it is
// set (the flags are the default): identities carry them, so they are read once, at start.
func (a *Agent) clusterFromConfig(ctx context.Context) {
	var mc v1alpha1.MeshConfig
	if err := a.client.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); err != nil || mc.Spec.Cluster == nil {
		return
	}
	c := mc.Spec.Cluster
	if c.Name != a.opts.ClusterName || uint8(c.ID) != a.opts.ClusterID {
		a.log.Info("cluster name and ID from MeshConfig", "cluster", c.Name, "id", c.ID, "flags_cluster", a.opts.ClusterName, "flags_id", a.opts.ClusterID)
	}
	a.opts.ClusterName, a.opts.ClusterID = c.Name, uint8(c.ID)
}
