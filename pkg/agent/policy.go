package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
	identitykube "github.com/meshcrypt/meshcrypt/pkg/identity/kube"
	"github.com/meshcrypt/meshcrypt/pkg/policy"
)

// attachedLink is a pod interface the classifier is attached to.
type attachedLink struct {
	name  string
	index int
}

// podIdentity computes a pod's canonical labels, or why it has none.
func (a *Agent) podLabels(pod *corev1.Pod) (identity.Labels, error) {
	return identity.Canonical(pod.Labels, pod.Namespace, pod.Spec.ServiceAccountName, a.opts.ClusterName)
}

// managedPod says whether the classifier handles a pod: it has addresses of its own and is
// not finished.
func managedPod(pod *corev1.Pod) bool {
	return !pod.Spec.HostNetwork && len(pod.Status.PodIPs) > 0 &&
		pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed
}

// policyPlan is the classifier state computed from the cluster, less the tunnel-ready flags,
// which depend on the moment it is applied (see reconcile).
type policyPlan struct {
	pods     []podEntry
	assigned map[string][]netip.Prefix // pod CIDRs Kubernetes assigned to each node
	// hostAddrs are this node's own addresses, cidrs the policies' CIDR identities: both go
	// into the ipcache.
	hostAddrs []netip.Addr
	cidrs     map[netip.Prefix]uint32
	allow     map[datapath.PolicyKey]datapath.PolicyValue
	enforce   map[datapath.EnforceKey]datapath.EnforceValue
	stats     string
}

// planPolicy gives every pod its identity (allocating new ones), compiles the policies over
// this cluster's identities and remote ones (from the cluster mesh) with MeshConfig's policy
// settings, and reads this node's own addresses (the host identity's).
func (a *Agent) planPolicy(ctx context.Context, remote []policy.Identity, cfg v1alpha1.PolicyConfig) (*policyPlan, error) {
	var pods corev1.PodList
	if err := a.cache.List(ctx, &pods); err != nil {
		return nil, fmt.Errorf("list pods: %w", err)
	}
	plan := &policyPlan{}
	var badPods []string
	for i := range pods.Items {
		pod := &pods.Items[i]
		if !managedPod(pod) {
			continue
		}
		labels, err := a.podLabels(pod)
		if err != nil {
			badPods = append(badPods, fmt.Sprintf("%s/%s: %v", pod.Namespace, pod.Name, err))
			continue
		}
		id, err := a.alloc.Allocate(ctx, labels)
		if err != nil {
			return nil, fmt.Errorf("identity of pod %s/%s: %w", pod.Namespace, pod.Name, err)
		}
		e := podEntry{Namespace: pod.Namespace, Name: pod.Name, Node: pod.Spec.NodeName, Identity: id}
		for _, s := range pod.Status.PodIPs {
			if ip, err := netip.ParseAddr(s.IP); err == nil {
				e.IPs = append(e.IPs, ip)
			}
		}
		plan.pods = append(plan.pods, e)
	}
	slices.Sort(badPods)
	a.badPods = badPods

	var nss corev1.NamespaceList
	if err := a.cache.List(ctx, &nss); err != nil {
		return nil, fmt.Errorf("list namespaces: %w", err)
	}
	nsLabels := make(map[string]map[string]string, len(nss.Items))
	for _, ns := range nss.Items {
		nsLabels[ns.Name] = ns.Labels
	}
	var pols v1alpha1.MeshPolicyList
	if err := a.cache.List(ctx, &pols); err != nil {
		return nil, fmt.Errorf("list MeshPolicies: %w", err)
	}
	snap := a.alloc.Snapshot()
	ids := make([]policy.Identity, 0, len(snap)+len(remote))
	for id, l := range snap {
		ids = append(ids, policy.Identity{ID: uint32(id), Labels: l.Map()})
	}
	ids = append(ids, remote...)
	res := policy.Compile(policy.Input{
		Policies: pols.Items, Identities: ids, NamespaceLabels: nsLabels,
		ClusterID: a.opts.ClusterID, AllowHostToLocalPods: cfg.HostToLocalPodsAllowed(),
	})
	plan.cidrs = res.CIDRs
	hostAddrs, err := datapath.HostAddrs(a.nl)
	if err != nil {
		return nil, err
	}
	plan.hostAddrs = hostAddrs
	plan.allow = make(map[datapath.PolicyKey]datapath.PolicyValue, len(res.Allow))
	for k, v := range res.Allow {
		plan.allow[datapath.PolicyKey{Subject: k.Subject, Peer: k.Peer, Port: k.Port, Proto: k.Proto, Dir: datapath.Direction(k.Dir)}] =
			datapath.PolicyValue{Flags: datapath.PolicyFlags(v.Flags), Rule: v.Rule}
	}
	plan.enforce = make(map[datapath.EnforceKey]datapath.EnforceValue, len(res.Enforce))
	for k, f := range res.Enforce {
		plan.enforce[datapath.EnforceKey{Identity: k.Identity, Dir: datapath.Direction(k.Dir)}] = datapath.EnforceValue{Flags: datapath.EnforceFlags(f)}
	}
	if strings.Join(res.Skipped, "\n") != strings.Join(a.policySkipped, "\n") {
		for _, s := range res.Skipped {
			a.log.Warn("policy skipped", "policy", s)
		}
	}
	a.policySkipped = res.Skipped
	plan.stats = fmt.Sprintf("identities=%d policies=%d cidrs=%d", len(ids), len(pols.Items), len(res.CIDRs))
	return plan, nil
}

// applyPolicy makes the classifier's maps hold plan, with the nodes in tunnelReady marked as
// reachable through a ready tunnel, and attaches the classifier to every local pod. Maps are
// filled before programs are attached, so a program never sees empty maps.
func (a *Agent) applyPolicy(ctx context.Context, plan *policyPlan, meshNodes []v1alpha1.MeshNode, tunnelReady map[string]bool) error {
	ipc := ipcacheEntries(ipcacheInput{
		self: a.opts.NodeName, pods: plan.pods, nodes: meshNodes, tunnelReady: tunnelReady,
		assigned: plan.assigned, hostAddrs: plan.hostAddrs, cidrs: plan.cidrs,
	})
	ist, err := a.clf.ApplyIPCache(ctx, ipc)
	if err != nil {
		return fmt.Errorf("apply ipcache: %w", err)
	}
	pst, err := a.clf.ApplyPolicy(ctx, plan.allow, plan.enforce)
	if err != nil {
		return fmt.Errorf("apply policy: %w", err)
	}
	if ist.Added+ist.Updated+ist.Removed+pst.Added+pst.Updated+pst.Removed > 0 {
		a.log.Info("classifier maps updated", "ipcache", fmt.Sprintf("%+v", ist), "policy", fmt.Sprintf("%+v", pst), "state", plan.stats)
	}
	return a.attachLocalPods(plan.pods)
}

// readyNodes is the set of nodes whose tunnel is ready given the configured peers.
func readyNodes(peers []wireguard.Peer) map[string]bool {
	out := make(map[string]bool, len(peers))
	for _, p := range peers {
		out[p.Name] = true
	}
	return out
}

// stillReady is the set of desired peers whose tunnel the device already carries unchanged
// (same key, same pod CIDRs): only those stay ready while a change is applied. It reads the
// device, not the agent's memory, so a freshly restarted agent, which remembers nothing,
// does not mark every working tunnel unready (strict mode would drop meanwhile).
func stillReady(dev *wgtypes.Device, desired []wireguard.Peer) map[string]bool {
	out := map[string]bool{}
	if dev == nil {
		return out
	}
	// One lookup per desired peer and no allocation per peer: this runs on every reconcile,
	// over every peer.
	have := make(map[wgtypes.Key]int, len(dev.Peers))
	for i := range dev.Peers {
		have[dev.Peers[i].PublicKey] = i
	}
	for _, p := range desired {
		i, ok := have[p.PublicKey]
		if !ok {
			continue
		}
		allowed := dev.Peers[i].AllowedIPs
		if distinctPrefixes(allowed) != len(p.AllowedIPs) {
			continue
		}
		same := true
		for _, pr := range p.AllowedIPs {
			same = same && slices.ContainsFunc(allowed, func(n net.IPNet) bool { return ipNetPrefix(n) == pr.Masked() })
		}
		if same {
			out[p.Name] = true
		}
	}
	return out
}

// ipNetPrefix is the masked prefix of a device's allowed IP, IPv4-mapped addresses unmapped;
// the zero prefix if it is not one.
func ipNetPrefix(n net.IPNet) netip.Prefix {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones).Masked()
}

// distinctPrefixes counts the distinct prefixes among a device's allowed IPs (a handful per
// peer: quadratic is cheapest), not counting what is not a prefix.
func distinctPrefixes(ns []net.IPNet) int {
	n := 0
	for i := range ns {
		p := ipNetPrefix(ns[i])
		if p == (netip.Prefix{}) {
			continue
		}
		dup := false
		for j := range i {
			dup = dup || ipNetPrefix(ns[j]) == p
		}
		if !dup {
			n++
		}
	}
	return n
}

// attachLocalPods attaches the classifier to the host-side interface of every local pod not
// yet attached, and forgets interfaces that are gone.
func (a *Agent) attachLocalPods(entries []podEntry) error {
	var errs []error
	seen := map[attachedLink]bool{}
	for _, e := range entries {
		if e.Node != a.opts.NodeName || len(e.IPs) == 0 {
			continue
		}
		l, err := datapath.PodLink(a.nl, e.IPs[0])
		if errors.Is(err, datapath.ErrNoPodLink) {
			continue // the CNI has not wired it yet; an informer event or resync retries
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		key := attachedLink{name: l.Attrs().Name, index: l.Attrs().Index}
		seen[key] = true
		if _, ok := a.attached[key]; ok {
			continue
		}
		mode, err := a.clf.Attach(a.netns, key.name, a.opts.AttachMode)
		if err != nil {
			errs = append(errs, fmt.Errorf("attach classifier to %s (pod %s/%s): %w", key.name, e.Namespace, e.Name, err))
			continue
		}
		a.attached[key] = mode
		a.attachMode = mode
		a.log.Info("classifier attached", logIface, key.name, "pod", e.Namespace+"/"+e.Name, "mode", mode)
	}
	pruned := false
	for key := range a.attached {
		if !seen[key] {
			delete(a.attached, key)
			pruned = true
		}
	}
	if pruned {
		// Release the links (and pins) of interfaces that are gone; never Detach by name,
		// which a new pod may already reuse.
		if _, err := a.clf.Prune(); err != nil {
			errs = append(errs, fmt.Errorf("prune classifier links: %w", err))
		}
	}
	return errors.Join(errs...)
}

// inUse is the identity GC's view of which identities pods use now.
func (a *Agent) inUse(ctx context.Context) (map[identity.Identity]bool, error) {
	var pods corev1.PodList
	if err := a.cache.List(ctx, &pods); err != nil {
		return nil, err
	}
	out := map[identity.Identity]bool{}
	for i := range pods.Items {
		pod := &pods.Items[i]
		if !managedPod(pod) {
			continue
		}
		labels, err := a.podLabels(pod)
		if err != nil {
			continue
		}
		if id, ok := a.alloc.Lookup(labels); ok {
			out[id] = true
		} else {
			// A pod whose identity this agent has not resolved yet: do not collect anything
			// on a partial view.
			return nil, fmt.Errorf("pod %s/%s has no identity yet", pod.Namespace, pod.Name)
		}
	}
	return out, nil
}

// runIdentityGC collects unused identities, and keeps MeshConfig status current, while this
// agent holds the GC lease: one collector per cluster, whichever agent wins the lease.
func (a *Agent) runIdentityGC(ctx context.Context, cs kubernetes.Interface) {
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metaFor("meshcrypt-identity-gc", a.opts.Namespace),
		Client:     cs.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: a.opts.NodeName},
	}
	gc := identitykube.NewGC(identitykube.GCOptions{
		Client: a.client, InUse: a.inUse, Cluster: a.opts.ClusterID, Grace: a.opts.IdentityGCGrace,
		Interval: a.opts.IdentityGCInterval, Logger: a.log,
	})
	for ctx.Err() == nil {
		leaderelection.RunOrDie(ctx, leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   30 * time.Second,
			RenewDeadline:   20 * time.Second,
			RetryPeriod:     5 * time.Second,
			ReleaseOnCancel: true,
			Name:            "meshcrypt-identity-gc",
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(ctx context.Context) {
					a.log.Info("collecting unused identities and summarising MeshConfig status (lease held)")
					go a.runConfigStatus(ctx)
					if err := gc.Run(ctx); err != nil && ctx.Err() == nil {
						a.log.Warn("identity GC stopped", "err", err)
					}
				},
				OnStoppedLeading: func() {},
			},
		})
	}
}

func metaFor(name, namespace string) metav1.ObjectMeta {
	return metav1.ObjectMeta{Name: name, Namespace: namespace}
}
