package cluster

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// mesh is what the clusters on one topology share: the topology itself, one bpffs mount
// (agents pin under <mount>/<node>, and node names are unique on a topology), the numbering
// of WireGuard interfaces (UAPI sockets are host-global), and the ports at which each
// cluster's API server is forwarded into the other clusters' node namespaces.
type mesh struct {
	net *netenv.Topology
	// created: a cluster created net (its Options.Net was nil), so the last cluster to
	// leave closes it; otherwise whoever passed it in does.
	created bool
	bpfDir  string

	clusters  []*Cluster // in the order they joined
	nextSlot  int
	nextIface int
}

// meshes maps every topology in use by a cluster to its mesh; its lock also guards every
// mesh's fields and each Cluster's slot.
var meshes = struct {
	mu sync.Mutex
	m  map[*netenv.Topology]*mesh
}{m: map[*netenv.Topology]*mesh{}}

// joinMesh adds c to the mesh of c.Net (creating the mesh, with its bpffs, for the first
// cluster), gives c its API port for the other clusters' nodes and forwards that port into
// the nodes the clusters already there have. created says whether c created c.Net.
func (c *Cluster) joinMesh(created bool) error {
	meshes.mu.Lock()
	defer meshes.mu.Unlock()
	m := meshes.m[c.Net]
	if m == nil {
		// A bpffs of the topology's own where agents pin classifier maps and links, as they
		// would under /sys/fs/bpf (which `ip netns exec` hides by remounting /sys).
		dir := filepath.Join(BPFRoot, c.Net.Prefix())
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
			_ = os.Remove(dir)
			return fmt.Errorf("mount bpffs on %s: %w", dir, err)
		}
		m = &mesh{net: c.Net, created: created, bpfDir: dir}
		meshes.m[c.Net] = m
	}
	for _, o := range m.clusters {
		if o.apiAddr == c.apiAddr {
			return fmt.Errorf("cluster %q: its API server %s is that of cluster %q on the same topology already: "+
				"every cluster of a mesh needs a control plane of its own", c.Name(), c.apiAddr, o.Name())
		}
	}
	m.nextSlot++
	c.slot = m.nextSlot
	for _, o := range m.clusters {
		for _, n := range o.Nodes() {
			if err := c.forwardInto(n.Node); err != nil {
				return err
			}
		}
	}
	m.clusters = append(m.clusters, c)
	c.mesh, c.bpfDir = m, m.bpfDir
	return nil
}

// leaveMesh removes c from its mesh and reports whether it was the last cluster there (the
// mesh is gone then).
func (c *Cluster) leaveMesh() (last bool) {
	meshes.mu.Lock()
	defer meshes.mu.Unlock()
	m := c.mesh
	m.clusters = slices.DeleteFunc(m.clusters, func(o *Cluster) bool { return o == c })
	if len(m.clusters) > 0 {
		return false
	}
	delete(meshes.m, m.net)
	return true
}

// nextIfaceIndex numbers the WireGuard interfaces of a topology: from 1, across its clusters.
func (c *Cluster) nextIfaceIndex() int {
	meshes.mu.Lock()
	defer meshes.mu.Unlock()
	c.mesh.nextIface++
	return c.mesh.nextIface
}

// remotePort is the port at which the nodes of the other clusters on the topology reach c's
// API server: 6443 + the order in which c joined the topology (from 1).
func (c *Cluster) remotePort() int { return apiPortInNode + c.slot }

// forwardInto makes c's API server reachable inside the namespace of nn, a node of another
// cluster, at 127.0.0.1:remotePort, until c closes or the node goes. Callers hold meshes.mu.
func (c *Cluster) forwardInto(nn *netenv.Node) error {
	listen := net.JoinHostPort("127.0.0.1", strconv.Itoa(c.remotePort()))
	if _, err := nn.NS.ForwardTCP(c.ctx, listen, c.apiAddr); err != nil {
		return fmt.Errorf("forward API server of cluster %q into %s: %w", c.Name(), nn.Name, err)
	}
	return nil
}

// forwardAPIs makes, inside the namespace of nn (a node of c), c's API server reachable
// at 127.0.0.1:6443 and every other cluster's on the topology at its remotePort. register,
// if not nil, runs before the lock is released, so a cluster that joins meanwhile sees the
// node.
func (c *Cluster) forwardAPIs(nn *netenv.Node, register func()) error {
	meshes.mu.Lock()
	defer meshes.mu.Unlock()
	listen := net.JoinHostPort("127.0.0.1", strconv.Itoa(apiPortInNode))
	if _, err := nn.NS.ForwardTCP(c.ctx, listen, c.apiAddr); err != nil {
		return fmt.Errorf("forward API server into %s: %w", nn.Name, err)
	}
	for _, o := range c.mesh.clusters {
		if o == c {
			continue
		}
		if err := o.forwardInto(nn); err != nil {
			return err
		}
	}
	if register != nil {
		register()
	}
	return nil
}

// otherOwner names the cluster on c's topology, other than c, that has a node called name.
func (c *Cluster) otherOwner(name string) (string, bool) {
	meshes.mu.Lock()
	defer meshes.mu.Unlock()
	for _, o := range c.mesh.clusters {
		if o != c && o.Node(name) != nil {
			return o.Name(), true
		}
	}
	return "", false
}

// Name returns the cluster's name in a mesh of clusters: Options.Name, or "default" (the
// agent's default) when unset.
func (c *Cluster) Name() string {
	if c.opts.Name == "" {
		return "default"
	}
	return c.opts.Name
}

// ClusterID returns the cluster's ID in a mesh of clusters: Options.ClusterID, or 1 (the
// agent's default) when unset.
func (c *Cluster) ClusterID() int {
	if c.opts.ClusterID == 0 {
		return 1
	}
	return c.opts.ClusterID
}

// APIServerURLFor returns the URL at which processes inside the node namespaces of from (an
// agent, a tool run with RunInNode) reach c's API server: https://127.0.0.1:6443 for c's own
// nodes, https://127.0.0.1:<6443+n> for the nodes of another cluster on the same topology,
// where c was the n-th cluster to join it. It is what `meshcrypt clustermesh connect` puts
// into the kubeconfig Secret that the agents of from read. With a control plane of c's own
// the serving certificate names 127.0.0.1, so the URL verifies as it is against c's CA; an
// external one may need the tls-server-name KubeconfigFor sets. from must share c's topology.
func (c *Cluster) APIServerURLFor(from *Cluster) string {
	if from == nil || from == c {
		return "https://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(apiPortInNode))
	}
	return "https://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(c.remotePort()))
}

// KubeconfigFor returns a kubeconfig (YAML) with which processes inside the node namespaces
// of from reach c's API server (at APIServerURLFor(from)) as the user token authenticates:
// c's CA, and the server name its certificate is checked against. It is the shape of the
// Secret a MeshConfig names for a remote cluster; `meshcrypt clustermesh connect` writes its
// own, tests that set up a mesh by hand can use this.
func (c *Cluster) KubeconfigFor(from *Cluster, token string) ([]byte, error) {
	return c.kubeconfigBytes(c.APIServerURLFor(from), token)
}

// MergedKubeconfig writes to path (mode 0600) one kubeconfig holding the admin kubeconfigs of
// clusters, each as a context, cluster and user named after the cluster (Name), as
// `kubectl config view --flatten` would merge them; the current context is the first
// cluster's. Tools then pick a cluster by context: `meshcrypt clustermesh connect --context a
// --to-context b`. Names must be unique.
func MergedKubeconfig(path string, clusters ...*Cluster) error {
	if len(clusters) == 0 {
		return errors.New("merge kubeconfigs: no clusters")
	}
	merged := clientcmdapi.NewConfig()
	for _, c := range clusters {
		name := c.Name()
		if _, ok := merged.Contexts[name]; ok {
			return fmt.Errorf("merge kubeconfigs: two clusters named %q (set Options.Name)", name)
		}
		kc, err := c.Kubeconfig()
		if err != nil {
			return err
		}
		cfg, err := clientcmd.LoadFromFile(kc)
		if err != nil {
			return fmt.Errorf("merge kubeconfigs: %w", err)
		}
		if err := clientcmdapi.MinifyConfig(cfg); err != nil {
			return fmt.Errorf("merge kubeconfigs: %s: %w", kc, err)
		}
		if err := clientcmdapi.FlattenConfig(cfg); err != nil {
			return fmt.Errorf("merge kubeconfigs: %s: %w", kc, err)
		}
		cur := cfg.Contexts[cfg.CurrentContext]
		merged.Clusters[name] = cfg.Clusters[cur.Cluster]
		merged.AuthInfos[name] = cfg.AuthInfos[cur.AuthInfo]
		merged.Contexts[name] = &clientcmdapi.Context{Cluster: name, AuthInfo: name, Namespace: cur.Namespace}
	}
	merged.CurrentContext = clusters[0].Name()
	if err := clientcmd.WriteToFile(*merged, path); err != nil {
		return fmt.Errorf("merge kubeconfigs: %w", err)
	}
	return os.Chmod(path, 0o600)
}

// StartMeshT starts one cluster per Options for a test, all on one topology (one underlay
// switch), each with a control plane of its own: the first creates the topology (or uses its
// Options.Net), the others join it. Node names must then be unique across the clusters.
// Every node reaches its own cluster's API server at 127.0.0.1:6443 and every other one's
// at the address in APIServerURLFor. Each cluster is closed when the test ends, in whatever
// order; the last one closes the topology it created. With $MESHCRYPT_KUBECONFIG set (one
// external control plane, as in the VM) and more than one cluster without a Kubeconfig of
// its own, the test is skipped.
func StartMeshT(t testing.TB, opts ...Options) []*Cluster {
	t.Helper()
	if len(opts) == 0 {
		t.Fatal("StartMeshT: no clusters")
	}
	if env := os.Getenv(KubeconfigEnv); env != "" {
		n := 0
		for _, o := range opts {
			if o.Kubeconfig == "" {
				n++
			}
		}
		if n > 1 {
			t.Skipf("needs a control plane per cluster, but $%s names one external control plane (%s) for %d of them; "+
				"this runs on the host, where each cluster starts its own", KubeconfigEnv, env, n)
		}
	}
	cs := make([]*Cluster, 0, len(opts))
	for i, o := range opts {
		if i > 0 {
			if o.Net != nil && o.Net != cs[0].Net {
				t.Fatalf("StartMeshT: cluster %d has an Options.Net of its own", i)
			}
			o.Net = cs[0].Net
		}
		cs = append(cs, StartT(t, o))
	}
	return cs
}

// clusterNameRE is a DNS label, as MeshConfig spec.cluster.name.
var clusterNameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)

// checkIdentity validates Options.Name and Options.ClusterID.
func (o Options) checkIdentity() error {
	if o.Name != "" && !clusterNameRE.MatchString(o.Name) {
		return fmt.Errorf("cluster name %q: want a DNS label", o.Name)
	}
	if o.ClusterID < 0 || o.ClusterID > 255 {
		return fmt.Errorf("cluster ID %d: want 1-255 (0: unset)", o.ClusterID)
	}
	return nil
}
