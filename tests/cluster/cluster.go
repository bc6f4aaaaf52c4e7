package cluster

import (
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/tests/controlplane"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// apiPortInNode is where each node namespace reaches the API server (forwarded to the host's
// loopback), as a node reaches a control-plane endpoint.
const apiPortInNode = 6443

// Options configure a Cluster.
type Options struct {
	// Dir holds agent state, kubeconfigs and logs; "" makes a temporary directory.
	Dir string
	// BinDir holds meshcrypt-agent and meshcrypt; "" means $MESHCRYPT_BIN_DIR, else they are
	// built into Dir.
	BinDir string
	// Backend is the agents' --wireguard-backend; "" means auto.
	Backend string
	// UnderlayMTU is the underlay's MTU; 0 means 1500. Pods get the tunnel MTU the agent
	// computes for it, as a CNI configured for meshcrypt would set.
	UnderlayMTU int
	// PodMTU overrides the pods' MTU; 0 means the tunnel MTU. A larger one makes pods send
	// packets the tunnel cannot carry, so that path MTU discovery has to work (the node answers
	// them with ICMP fragmentation needed / packet too big).
	PodMTU int
	// IPv4Only leaves IPv6 off; by default nodes and pods are dual stack.
	IPv4Only bool
	// AgentArgs are appended to every agent's command line.
	AgentArgs []string
	// Logger receives harness progress; nil discards it.
	Logger *slog.Logger
	// Kubeconfig is the admin kubeconfig of an external control plane to run against instead
	// of starting one; "" means $MESHCRYPT_KUBECONFIG (KubeconfigEnv), and when that is
	// empty too, Start runs a control plane of its own. The external one must already serve
	// what ApplyManifests installs; Start deletes what earlier clusters left in it (see
	// Start). This is how the e2e suites run in the VM (tests/vm) against the host's
	// kube-apiserver.
	Kubeconfig string

	// Name is the cluster's name in a mesh of clusters (a DNS label): every agent gets
	// --cluster-name, and SetMode writes it into MeshConfig spec.cluster. "" leaves both to
	// their defaults (the agent's "default", no spec.cluster) unless ClusterID is set.
	Name string
	// ClusterID is the cluster's ID in a mesh (1-255): every agent gets --cluster-id, and
	// SetMode writes it into MeshConfig spec.cluster. 0 leaves both to their defaults (1, no
	// spec.cluster) unless Name is set.
	ClusterID int
	// Net is a topology to share with other clusters (cluster mesh tests): nodes and pods
	// are created on it instead of on an underlay of the cluster's own, so node names must
	// be unique across the clusters on it (AddNode refuses a taken one), while underlay
	// addresses and pod CIDRs are unique by construction. Pass another cluster's Net, or
	// use StartMeshT. A cluster only ever removes its own nodes from a shared topology; the
	// topology itself is closed by the last of its clusters to close if a cluster created
	// it, else by whoever created it (after the clusters: build it with PodMTU set to the
	// clusters' PodMTU). Its IPv4Only and UnderlayMTU apply; options that contradict them
	// are an error. nil: the cluster creates a topology of its own.
	Net *netenv.Topology
}

// Cluster is a running test cluster.
type Cluster struct {
	opts   Options
	log    *slog.Logger
	dir    string
	tmpDir bool
	bins   string

	// CP is the cluster's own control plane; nil when it runs against an external one
	// (Options.Kubeconfig): see External.
	CP     *controlplane.ControlPlane
	Net    *netenv.Topology
	Client client.Client
	kube   kubernetes.Interface
	bpfDir string

	rest *rest.Config // the admin's
	// apiAddr is the API server's host:port as this process reaches it: the node
	// namespaces' forwarders connect there.
	apiAddr string
	ext     *external // nil with a control plane of its own

	ctx    context.Context
	cancel context.CancelFunc

	// ownNet: Start created Net. mesh is the clusters sharing Net (see mesh.go), slot
	// (guarded by meshes.mu) c's number among them.
	ownNet bool
	mesh   *mesh
	slot   int

	closeOnce sync.Once
	closeErr  error

	mu    sync.Mutex
	nodes map[string]*Node
}

// Node is one node: its namespace, Kubernetes Node and agent.
type Node struct {
	*netenv.Node
	c          *Cluster
	Iface      string
	StateDir   string
	Kubeconfig string
	LogPath    string
	// BootIDPath is the node's boot ID file (the agent's --boot-id-file); RebootNode
	// changes it.
	BootIDPath string

	agentMu sync.Mutex
	agent   *exec.Cmd
	done    chan struct{}
	exitErr error
}

// Start starts the control plane, installs the CRDs, RBAC and admission policy
// (ApplyManifests), creates the underlay, and returns an empty cluster (no MeshConfig: mode
// Disabled). On error everything started is stopped.
//
// With an external control plane (Options.Kubeconfig) it starts none and applies nothing;
// instead it deletes every meshcrypt.io object, Node, Pod and Event, and the Secrets of the
// agent's namespace, that earlier clusters left there, so each cluster starts from the state
// of a fresh control plane whatever its predecessor did or how it ended. Close leaves the
// objects in place, for a look after the fact; the next Start clears them.
func Start(ctx context.Context, opts Options) (_ *Cluster, err error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if err := opts.checkIdentity(); err != nil {
		return nil, err
	}
	if opts.Net != nil {
		no := opts.Net.Options()
		if opts.UnderlayMTU != 0 && opts.UnderlayMTU != no.UnderlayMTU {
			return nil, fmt.Errorf("options: underlay MTU %d, but the shared topology %s has %d", opts.UnderlayMTU, opts.Net.Prefix(), no.UnderlayMTU)
		}
		if opts.IPv4Only && !no.IPv4Only {
			return nil, fmt.Errorf("options: IPv4Only, but the shared topology %s is dual stack", opts.Net.Prefix())
		}
		opts.UnderlayMTU, opts.IPv4Only = no.UnderlayMTU, no.IPv4Only
	}
	if opts.UnderlayMTU == 0 {
		opts.UnderlayMTU = 1500
	}
	c := &Cluster{opts: opts, log: log, nodes: map[string]*Node{}}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	defer func() {
		// c, not the result: every error return sets the result to nil.
		if err != nil {
			c.Close()
		}
	}()
	c.dir = opts.Dir
	if c.dir == "" {
		if c.dir, err = os.MkdirTemp("", "meshcrypt-cluster-"); err != nil {
			return nil, err
		}
		c.tmpDir = true
	}
	if c.bins, err = Binaries(ctx, opts.BinDir, c.dir); err != nil {
		return nil, err
	}
	if _, err := netenv.CleanupStale(ctx, log); err != nil {
		log.Warn("clean up stale namespaces", "err", err)
	}
	if kc := cmp.Or(opts.Kubeconfig, os.Getenv(KubeconfigEnv)); kc != "" {
		if c.ext, err = loadExternal(kc); err != nil {
			return nil, err
		}
		c.rest, c.apiAddr = c.ext.rest, c.ext.apiAddr
		log.Info("using an external control plane", "kubeconfig", c.ext.path, "server", c.rest.Host)
	} else {
		if err := controlplane.CleanupStale(""); err != nil {
			log.Warn("clean up stale control planes", "err", err)
		}
		if c.CP, err = controlplane.Start(ctx, controlplane.Options{Logger: log}); err != nil {
			return nil, err
		}
		if err := ApplyManifests(ctx, c.CP); err != nil {
			return nil, err
		}
		c.rest, c.apiAddr = c.CP.RESTConfig(), strings.TrimPrefix(c.CP.URL(), "https://")
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if c.Client, err = client.New(c.rest, client.Options{Scheme: scheme}); err != nil {
		return nil, err
	}
	if c.kube, err = kubernetes.NewForConfig(c.rest); err != nil {
		return nil, err
	}
	if c.ext != nil {
		if err := c.resetAPI(ctx); err != nil {
			return nil, err
		}
	}
	if opts.Net != nil {
		c.Net = opts.Net
	} else {
		if c.Net, err = netenv.New(ctx, netenv.Options{
			IPv4Only:    opts.IPv4Only,
			UnderlayMTU: opts.UnderlayMTU,
			PodMTU:      c.PodMTU(),
			Logger:      log,
		}); err != nil {
			return nil, err
		}
		c.ownNet = true
	}
	// The bpffs, WireGuard interface numbers and API forwarders shared with the other
	// clusters on the topology, if any.
	if err := c.joinMesh(c.ownNet); err != nil {
		return nil, err
	}
	return c, nil
}

// BPFRoot holds one bpffs mount per running topology (shared by the clusters on it), named
// after its namespace prefix.
const BPFRoot = "/run/meshcrypt-bpf"

// UnmountBPF unmounts and removes a cluster's bpffs directory (pinned maps and links go with
// it once no process holds them).
func UnmountBPF(dir string) error {
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// StartT starts a cluster for a test: it fails the test on error, stops everything when the
// test ends, and on failure prints the tail of every agent's log.
func StartT(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and WireGuard devices")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, err := Start(ctx, opts)
	if err != nil {
		t.Fatalf("start cluster: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			c.DumpLogs(testWriter{t}, 40)
		}
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
	})
	return c
}

// PodMTU is the MTU pods get: Options.PodMTU, else the agent's tunnel MTU for the underlay.
func (c *Cluster) PodMTU() int {
	if c.opts.PodMTU != 0 {
		return c.opts.PodMTU
	}
	return wireguard.TunnelMTU(c.opts.UnderlayMTU)
}

// Bin returns the path of one of the project's binaries.
func (c *Cluster) Bin(name string) string { return filepath.Join(c.bins, name) }

// Kubeconfig writes (once) and returns an admin kubeconfig for tools on the host: with an
// external control plane, the one Start was given.
func (c *Cluster) Kubeconfig() (string, error) {
	if c.ext != nil {
		return c.ext.path, nil
	}
	p := filepath.Join(c.dir, "admin.kubeconfig")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	return p, c.CP.WriteKubeconfig(p, "", c.CP.AdminToken())
}

// Nodes returns the nodes sorted by name.
func (c *Cluster) Nodes() []*Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*Node, 0, len(c.nodes))
	for _, n := range c.nodes {
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Node returns the named node or nil.
func (c *Cluster) Node(name string) *Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[name]
}

// AddNode creates a node namespace, its Kubernetes Node (pod CIDRs, InternalIPs), and starts
// its agent.
func (c *Cluster) AddNode(ctx context.Context, name string) (*Node, error) {
	n, err := c.AddNodeWithoutAgent(ctx, name)
	if err != nil {
		return nil, err
	}
	return n, n.StartAgent()
}

// AddNodeWithoutAgent is AddNode up to, not including, starting the agent: the node exists
// for Kubernetes (Node object, pod CIDRs, namespaces and routes) but has announced nothing,
// as a joining node does before its agent runs. StartAgent starts it.
//
// On a topology shared with other clusters (Options.Net) the name must be unique across them.
func (c *Cluster) AddNodeWithoutAgent(ctx context.Context, name string) (_ *Node, err error) {
	if other, ok := c.otherOwner(name); ok {
		return nil, fmt.Errorf("add node %s: cluster %q on the same topology has a node of that name "+
			"(node names are unique across the clusters sharing a topology)", name, other)
	}
	nn, err := c.Net.AddNode(ctx, name)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil { // on a shared topology, Close would not remove it
			_ = c.Net.RemoveNode(context.Background(), name)
		}
	}()
	idx := c.nextIfaceIndex()
	n := &Node{
		Node:       nn,
		c:          c,
		Iface:      trim15(fmt.Sprintf("%sw%d", c.Net.Prefix(), idx)),
		StateDir:   filepath.Join(c.dir, name, "state"),
		LogPath:    filepath.Join(c.dir, name, "agent.log"),
		BootIDPath: filepath.Join(c.dir, name, "boot_id"),
	}
	if err := os.MkdirAll(filepath.Join(c.dir, name), 0o700); err != nil {
		return nil, err
	}
	if err := n.newBootID(); err != nil {
		return nil, err
	}
	if err := c.createNodeObject(ctx, nn); err != nil {
		return nil, err
	}
	token, err := AgentToken(ctx, c.kube, name)
	if err != nil {
		return nil, err
	}
	n.Kubeconfig = filepath.Join(c.dir, name, "kubeconfig")
	if err := c.writeNodeKubeconfig(n.Kubeconfig, fmt.Sprintf("https://127.0.0.1:%d", apiPortInNode), token); err != nil {
		return nil, err
	}
	// The API servers into the node: its own at 127.0.0.1:6443, those of other clusters on
	// the topology at their ports (APIServerURLFor).
	if err := c.forwardAPIs(nn, func() {
		c.mu.Lock()
		c.nodes[name] = n
		c.mu.Unlock()
	}); err != nil {
		return nil, err
	}
	return n, nil
}

// newBootID writes a fresh random boot ID for the node.
func (n *Node) newBootID() error {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return err
	}
	id := fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
	return os.WriteFile(n.BootIDPath, []byte(id+"\n"), 0o644)
}

// RebootNode simulates a reboot: the agent and every process in the node's namespaces stop,
// the namespaces (devices, routes, pods' network) are destroyed and created anew with the
// same addresses, the disk (the state dir and its private key) survives, the boot ID changes,
// and the agent starts again. The node's workload pods are gone (their Pod objects deleted,
// as their controllers would replace them); the agent's own Pod stays, as a DaemonSet pod
// restarts in place.
func (c *Cluster) RebootNode(ctx context.Context, name string) (*Node, error) {
	n := c.Node(name)
	if n == nil {
		return nil, fmt.Errorf("no node %s", name)
	}
	if err := n.StopAgent(); err != nil {
		return nil, err
	}
	var pods corev1.PodList
	if err := c.Client.List(ctx, &pods); err != nil {
		return nil, err
	}
	for i := range pods.Items {
		if p := &pods.Items[i]; p.Spec.NodeName == name && p.Namespace != AgentNamespace {
			if err := c.Client.Delete(ctx, p); err != nil && !apierrors.IsNotFound(err) {
				return nil, err
			}
		}
	}
	if err := c.Net.RemoveNode(ctx, name); err != nil {
		return nil, err
	}
	_ = os.Remove(wireguard.UAPISocketPath(n.Iface))
	nn, err := c.Net.AddNode(ctx, name)
	if err != nil {
		return nil, err
	}
	n.Node = nn
	if err := n.newBootID(); err != nil {
		return nil, err
	}
	if err := c.forwardAPIs(nn, nil); err != nil {
		return nil, err
	}
	return n, n.StartAgent()
}

func (c *Cluster) createNodeObject(ctx context.Context, nn *netenv.Node) error {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nn.Name, Labels: map[string]string{"kubernetes.io/hostname": nn.Name}}}
	for _, p := range nn.PodCIDRs {
		node.Spec.PodCIDRs = append(node.Spec.PodCIDRs, p.String())
	}
	if len(node.Spec.PodCIDRs) > 0 {
		node.Spec.PodCIDR = node.Spec.PodCIDRs[0]
	}
	if err := c.Client.Create(ctx, node); err != nil {
		return fmt.Errorf("create Node %s: %w", nn.Name, err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeHostName, Address: nn.Name}}
	for _, ip := range []string{addrString(nn.UnderlayV4), addrString(nn.UnderlayV6)} {
		if ip != "" {
			node.Status.Addresses = append(node.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
		}
	}
	node.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}}
	if err := c.Client.Status().Update(ctx, node); err != nil {
		return fmt.Errorf("set Node %s status: %w", nn.Name, err)
	}
	return nil
}

// AddPod creates a pod namespace on n and its Pod object (label app=<name>) with the pod's IPs.
func (c *Cluster) AddPod(ctx context.Context, n *Node, name string) (*netenv.Pod, error) {
	return c.AddPodLabels(ctx, n, name, map[string]string{"app": name})
}

// AddPodLabels is AddPod with the Pod's labels given.
func (c *Cluster) AddPodLabels(ctx context.Context, n *Node, name string, labels map[string]string) (*netenv.Pod, error) {
	p, err := c.Net.AddPod(ctx, n.Node, name)
	if err != nil {
		return nil, err
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:   n.Name,
			Containers: []corev1.Container{{Name: "app", Image: "meshcrypt.invalid/netns:none"}},
		},
	}
	if err := c.Client.Create(ctx, pod); err != nil {
		return nil, fmt.Errorf("create Pod %s: %w", name, err)
	}
	pod.Status.Phase = corev1.PodRunning
	for _, ip := range []string{addrString(p.IPv4), addrString(p.IPv6)} {
		if ip != "" {
			pod.Status.PodIPs = append(pod.Status.PodIPs, corev1.PodIP{IP: ip})
		}
	}
	if len(pod.Status.PodIPs) > 0 {
		pod.Status.PodIP = pod.Status.PodIPs[0].IP
	}
	pod.Status.HostIP = addrString(n.UnderlayV4)
	if err := c.Client.Status().Update(ctx, pod); err != nil {
		return nil, fmt.Errorf("set Pod %s status: %w", name, err)
	}
	return p, nil
}

// BPFPinDir is where node's agent pins its classifier maps and links.
func (c *Cluster) BPFPinDir(node string) string { return filepath.Join(c.bpfDir, node) }

// RemoveNode stops the node's agent and WireGuard device, deletes its Node and MeshNode (as
// the garbage collector would, through the MeshNode's owner reference) and its namespaces.
func (c *Cluster) RemoveNode(ctx context.Context, name string) error {
	n := c.Node(name)
	if n == nil {
		return fmt.Errorf("no node %s", name)
	}
	if err := n.StopAgent(); err != nil {
		return err
	}
	var errs []error
	for _, obj := range []client.Object{
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}},
		&v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: name}},
	} {
		if err := c.Client.Delete(ctx, obj); err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, err)
		}
	}
	var pods corev1.PodList
	if err := c.Client.List(ctx, &pods); err == nil {
		for i := range pods.Items {
			if pods.Items[i].Spec.NodeName == name {
				_ = c.Client.Delete(ctx, &pods.Items[i])
			}
		}
	}
	errs = append(errs, c.Net.RemoveNode(ctx, name)) // kills the device process inside
	_ = os.Remove(wireguard.UAPISocketPath(n.Iface))
	c.mu.Lock()
	delete(c.nodes, name)
	c.mu.Unlock()
	return errors.Join(errs...)
}

// SetMode creates or updates the MeshConfig with the encryption mode and, when Options.Name
// or Options.ClusterID is set, spec.cluster {Name(), ClusterID()}.
func (c *Cluster) SetMode(ctx context.Context, mode v1alpha1.EncryptionMode) error {
	var mc v1alpha1.MeshConfig
	err := c.Client.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc)
	switch {
	case apierrors.IsNotFound(err):
		mc = v1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: v1alpha1.MeshConfigName}}
		mc.Spec.Encryption.Mode = mode
		c.setClusterSpec(&mc)
		return c.Client.Create(ctx, &mc)
	case err != nil:
		return err
	}
	mc.Spec.Encryption.Mode = mode
	c.setClusterSpec(&mc)
	return c.Client.Update(ctx, &mc)
}

// setClusterSpec sets mc's spec.cluster to the cluster's identity, if the options name one.
func (c *Cluster) setClusterSpec(mc *v1alpha1.MeshConfig) {
	if c.opts.Name == "" && c.opts.ClusterID == 0 {
		return
	}
	mc.Spec.Cluster = &v1alpha1.ClusterSpec{Name: c.Name(), ID: int32(c.ClusterID())}
}

// MeshNodes lists the MeshNodes.
func (c *Cluster) MeshNodes(ctx context.Context) ([]v1alpha1.MeshNode, error) {
	var l v1alpha1.MeshNodeList
	if err := c.Client.List(ctx, &l); err != nil {
		return nil, err
	}
	return l.Items, nil
}

// WaitConverged polls until every node's MeshNode reports mode applied and, for WireGuard,
// every other node configured with its current key (both directions). It returns how long
// that took.
func (c *Cluster) WaitConverged(ctx context.Context, mode v1alpha1.EncryptionMode, timeout time.Duration) (time.Duration, error) {
	took, err := c.WaitMeshNodes(ctx, timeout, func(mns []v1alpha1.MeshNode) string { return converged(c.Nodes(), mns, mode) })
	if err != nil {
		return took, fmt.Errorf("cluster did not converge to %s: %w", mode, err)
	}
	return took, nil
}

// WaitMeshNodes polls the MeshNodes until check says nothing is missing (it returns "") and
// returns how long that took; after timeout the error quotes check's last answer.
func (c *Cluster) WaitMeshNodes(ctx context.Context, timeout time.Duration, check func([]v1alpha1.MeshNode) string) (time.Duration, error) {
	start := time.Now()
	var last string
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		mns, err := c.MeshNodes(ctx)
		if err != nil {
			last = err.Error()
			return false, nil
		}
		last = check(mns)
		return last == "", nil
	})
	if err != nil {
		return time.Since(start), fmt.Errorf("not within %s: %s", timeout, last)
	}
	return time.Since(start), nil
}

// converged says what is missing for the nodes to have converged to mode, "" if nothing.
func converged(nodes []*Node, mns []v1alpha1.MeshNode, mode v1alpha1.EncryptionMode) string {
	byName := map[string]*v1alpha1.MeshNode{}
	for i := range mns {
		byName[mns[i].Name] = &mns[i]
	}
	for _, n := range nodes {
		mn := byName[n.Name]
		if mn == nil || mn.Spec.WireGuard == nil {
			return n.Name + " has not published its MeshNode"
		}
		if mn.Status.Mode != mode {
			return fmt.Sprintf("%s is in mode %q", n.Name, mn.Status.Mode)
		}
		if mode == v1alpha1.ModeIPsec {
			// Every other node encrypted to (an out policy towards it).
			if int(mn.Status.PeersReady) != len(nodes)-1 || mn.Status.IPsec == nil {
				return fmt.Sprintf("%s encrypts to %d of %d nodes", n.Name, mn.Status.PeersReady, len(nodes)-1)
			}
			continue
		}
		if mode != v1alpha1.ModeWireGuard {
			if len(mn.Status.Peers) != 0 {
				return fmt.Sprintf("%s still has %d peers", n.Name, len(mn.Status.Peers))
			}
			continue
		}
		peers := map[string]string{}
		for _, p := range mn.Status.Peers {
			peers[p.Node] = p.PublicKey
		}
		for _, o := range nodes {
			if o == n {
				continue
			}
			om := byName[o.Name]
			if om == nil || om.Spec.WireGuard == nil {
				return o.Name + " has not published its MeshNode"
			}
			if peers[o.Name] != om.Spec.WireGuard.PublicKey {
				return fmt.Sprintf("%s has not configured %s's key", n.Name, o.Name)
			}
		}
		if len(peers) != len(nodes)-1 {
			return fmt.Sprintf("%s has %d peers, want %d", n.Name, len(peers), len(nodes)-1)
		}
	}
	return ""
}

// WireGuardDevice reads the node's WireGuard device through wgctrl, from inside the node's
// namespace: a kernel device answers only there (generic netlink is per namespace), a
// userspace one anywhere (its UAPI socket is a file). A device that is not there is an
// error.
func (n *Node) WireGuardDevice() (*wgtypes.Device, error) {
	var dev *wgtypes.Device
	err := n.NS.Do(func() error {
		wc, err := wgctrl.New()
		if err != nil {
			return err
		}
		defer wc.Close()
		dev, err = wc.Device(n.Iface)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("WireGuard device %s of %s: %w", n.Iface, n.Name, err)
	}
	return dev, nil
}

// StartAgent starts the node's agent process inside the node's namespace.
func (n *Node) StartAgent() error {
	n.agentMu.Lock()
	defer n.agentMu.Unlock()
	if n.agent != nil {
		return fmt.Errorf("agent of %s already running", n.Name)
	}
	logf, err := os.OpenFile(n.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	args := append([]string{
		"--kubeconfig", n.Kubeconfig,
		"--node-name", n.Name,
		"--state-dir", n.StateDir,
		"--wireguard-iface", n.Iface,
		"--status-period", "1s",
		// Many agents share this machine (and the VM's 512 MB): a small connection table.
		"--conntrack-size", "16384",
		"--bpf-pin-dir", n.c.bpfDir,
		"--boot-id-file", n.BootIDPath,
	}, n.c.identityArgs()...)
	args = append(args, n.c.opts.AgentArgs...)
	if n.c.opts.Backend != "" {
		args = append(args, "--wireguard-backend", n.c.opts.Backend)
	}
	cmd := n.NS.Command(context.Background(), n.c.Bin("meshcrypt-agent"), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so a terminal's Ctrl-C reaches the harness, which stops agents
	// in order; Close (through netenv) kills whatever is left inside the namespaces.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start agent of %s: %w", n.Name, err)
	}
	n.agent = cmd
	n.done = make(chan struct{})
	go func(done chan struct{}) {
		err := cmd.Wait()
		logf.Close()
		n.agentMu.Lock()
		n.exitErr = err
		n.agentMu.Unlock()
		close(done)
	}(n.done)
	return nil
}

// StopAgent stops the agent with SIGTERM (SIGKILL after 10 s) and waits for it. The WireGuard
// device, peers and routes stay, as they do when a real agent restarts.
func (n *Node) StopAgent() error { return n.stop(false) }

// KillAgent kills the agent with SIGKILL and waits for it.
func (n *Node) KillAgent() error { return n.stop(true) }

func (n *Node) stop(kill bool) error {
	n.agentMu.Lock()
	cmd, done := n.agent, n.done
	n.agentMu.Unlock()
	if cmd == nil {
		return nil
	}
	sig := syscall.SIGTERM
	if kill {
		sig = syscall.SIGKILL
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
	n.agentMu.Lock()
	n.agent = nil
	n.agentMu.Unlock()
	return nil
}

// AgentPID returns the running agent's pid, 0 if none runs.
func (n *Node) AgentPID() int {
	n.agentMu.Lock()
	defer n.agentMu.Unlock()
	if n.agent == nil || n.agent.Process == nil {
		return 0
	}
	return n.agent.Process.Pid
}

// RestartAgent stops and starts the agent.
func (n *Node) RestartAgent() error {
	if err := n.StopAgent(); err != nil {
		return err
	}
	return n.StartAgent()
}

// AgentExited returns a channel closed when the running agent exits, and its error.
func (n *Node) AgentExited() (<-chan struct{}, func() error) {
	n.agentMu.Lock()
	defer n.agentMu.Unlock()
	return n.done, func() error {
		n.agentMu.Lock()
		defer n.agentMu.Unlock()
		return n.exitErr
	}
}

// Run runs one of the project's CLIs on the host against the cluster with the admin
// kubeconfig and returns its combined output.
func (c *Cluster) Run(ctx context.Context, bin string, args ...string) (string, error) {
	kc, err := c.Kubeconfig()
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, c.Bin(bin), append([]string{"--kubeconfig", kc}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// DumpLogs writes the last lines of every agent's log to w.
func (c *Cluster) DumpLogs(w io.Writer, lines int) {
	for _, n := range c.Nodes() {
		b, _ := os.ReadFile(n.LogPath)
		ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		if len(ls) > lines {
			ls = ls[len(ls)-lines:]
		}
		fmt.Fprintf(w, "---- agent %s (%s) ----\n%s\n", n.Name, n.LogPath, strings.Join(ls, "\n"))
	}
}

// identityArgs are the agent flags of Options.Name and Options.ClusterID, if set.
func (c *Cluster) identityArgs() []string {
	var args []string
	if c.opts.Name != "" {
		args = append(args, "--cluster-name", c.opts.Name)
	}
	if c.opts.ClusterID != 0 {
		args = append(args, "--cluster-id", strconv.Itoa(c.opts.ClusterID))
	}
	return args
}

// Close stops every agent and device, deletes the cluster's namespaces, stops the control
// plane (its own: an external one runs on, with the cluster's objects still in it; see Start)
// and removes the temporary directory. On a topology shared with other clusters it removes
// only its own nodes (and its API server's forwarders in theirs); the last cluster to close
// closes the topology if a cluster created it, and unmounts the shared bpffs. It is
// idempotent.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.close() })
	return c.closeErr
}

func (c *Cluster) close() error {
	var errs []error
	nodes := c.Nodes()
	for _, n := range nodes {
		errs = append(errs, n.StopAgent())
	}
	if c.cancel != nil {
		c.cancel() // also the forwarders to this API server in other clusters' nodes
	}
	if c.Net != nil {
		closeNet, bpfDir := c.ownNet, "" // not in a mesh: Start failed before it joined one
		if m := c.mesh; m != nil {
			last := c.leaveMesh()
			closeNet = last && m.created
			if last {
				bpfDir = m.bpfDir
			}
		}
		if closeNet {
			errs = append(errs, c.Net.Close())
		} else {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			for _, n := range nodes {
				if c.Net.Node(n.Name) == nil {
					continue // a reboot that failed half-way removed it
				}
				if err := c.Net.RemoveNode(ctx, n.Name); err != nil && !errors.Is(err, netenv.ErrClosed) {
					errs = append(errs, err)
				}
			}
			cancel()
		}
		if bpfDir != "" {
			errs = append(errs, UnmountBPF(bpfDir))
		}
	}
	// Killed userspace devices leave their UAPI socket files (a global path) behind.
	for _, n := range nodes {
		_ = os.Remove(wireguard.UAPISocketPath(n.Iface))
	}
	if c.CP != nil {
		errs = append(errs, c.CP.Stop())
	}
	if c.tmpDir {
		errs = append(errs, os.RemoveAll(c.dir))
	}
	return errors.Join(errs...)
}

// Binaries returns the directory holding meshcrypt-agent and meshcrypt: binDir, else
// $MESHCRYPT_BIN_DIR, else a fresh build into workDir/bin.
func Binaries(ctx context.Context, binDir, workDir string) (string, error) {
	if binDir == "" {
		binDir = os.Getenv("MESHCRYPT_BIN_DIR")
	}
	if binDir != "" {
		for _, b := range []string{"meshcrypt-agent", "meshcrypt"} {
			if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
				return "", fmt.Errorf("binary %s: %w (run make build)", b, err)
			}
		}
		return filepath.Abs(binDir)
	}
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(workDir, "bin")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out+"/", "./cmd/meshcrypt-agent", "./cmd/meshcrypt")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build binaries: %w\n%s", err, b)
	}
	return out, nil
}

// moduleRoot finds the repository root from this source file's location.
func moduleRoot() (string, error) {
	_, file, _, ok := goruntime.Caller(0)
	if !ok {
		return "", errors.New("cannot locate the harness source")
	}
	dir := filepath.Dir(file)
	for d := dir; d != "/"; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
	}
	return "", fmt.Errorf("no go.mod above %s", dir)
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func trim15(s string) string {
	if len(s) > 15 {
		return s[:15]
	}
	return s
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}
