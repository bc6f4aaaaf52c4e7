package k8s

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"

	"github.com/meshcrypt/meshcrypt/tests/controlplane"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// DirPrefix starts the name of every cluster's temporary directory (under os.TempDir());
// CleanupStale looks for it.
const DirPrefix = "meshcrypt-k8s-"

// KubeVersion is the Kubernetes version of every component (hack/kube-binaries.sh builds it).
const KubeVersion = "v1.34.4"

// Timeouts; each is also bounded by the caller's context.
const (
	nodeReadyTimeout = 3 * time.Minute
	processTimeout   = time.Minute
	pollInterval     = 200 * time.Millisecond
)

// CNI names a CNI plugin of Debian's containernetworking-plugins a node attaches pods with.
type CNI string

// The CNI plugins a node can use. Both take addresses from host-local IPAM in the node's
// Node.spec.podCIDR.
const (
	// PTP gives every pod a veth pair and a /32 route to it on the node (per-pod routes).
	PTP CNI = "ptp"
	// Bridge plugs every pod's veth into the node's bridge cni0, the gateway (one connected
	// route for the whole pod CIDR).
	Bridge CNI = "bridge"
)

// NodeSpec names a node and its CNI plugin.
type NodeSpec struct {
	Name string
	CNI  CNI
}

// Options configures Start.
type Options struct {
	// Nodes are the cluster's nodes. Default: "ptp-1" on PTP and "bridge-1" on Bridge.
	Nodes []NodeSpec
	// Images are loaded into every node's containerd besides the pause and workload images
	// (e.g. AgentImage).
	Images []Image
	// Logger receives progress messages; nil discards them.
	Logger *slog.Logger
}

// Node is one node of the cluster: a network namespace on the underlay with its own mount
// namespace, cgroup, containerd, kubelet and kube-proxy.
type Node struct {
	// Name is the Kubernetes node name.
	Name string
	// CNI is the node's CNI plugin.
	CNI CNI
	// IP is the node's underlay (and InternalIP) address.
	IP netip.Addr
	// PodCIDR is the pod CIDR the controller manager allocated (Node.spec.podCIDR).
	PodCIDR netip.Prefix
	// NS is the node's network namespace.
	NS *netenv.NS

	dir        string // the node's state: configs, containerd's root and socket, logs
	mnt        string // the bind mount holding the node's mount namespace
	cgroup     string // cgroup (in every hierarchy) of everything the kubelet starts
	containerd *proc
	kubelet    *proc
	proxy      *proc
}

// ContainerdSocket returns the path of the node's containerd socket (for ctr -a).
func (n *Node) ContainerdSocket() string { return filepath.Join(n.dir, "containerd.sock") }

// Cluster is a running Kubernetes cluster on this machine.
type Cluster struct {
	// CP is the control plane (etcd and kube-apiserver, started by tests/controlplane).
	CP *controlplane.ControlPlane
	// Client is an admin clientset.
	Client kubernetes.Interface
	// Kubeconfig is the path of an admin kubeconfig (for kubectl and the meshcrypt CLI).
	Kubeconfig string
	// Nodes are the nodes, in Options.Nodes order.
	Nodes []*Node
	// ClusterCIDR is the controller manager's --cluster-cidr.
	ClusterCIDR netip.Prefix

	opts    Options
	log     *slog.Logger
	dir     string
	id      string
	bins    map[string]string
	topo    *netenv.Topology
	apiAddr netip.Addr
	rootIf  string // the root namespace's port on the underlay
	kcm     *proc
	sched   *proc
	sysctls map[string]string // global sysctls kubelets change, as they were

	closeOnce sync.Once
	closeErr  error
}

// kubeBinaries are the binaries hack/kube-binaries.sh builds for the cluster.
var kubeBinaries = []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl"}

// globalSysctls are the sysctls of the initial namespaces that kubelets set (vm.*, kernel.* are
// not per network namespace); Close restores them.
var globalSysctls = []string{
	"vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
	"kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes",
}

// StartT starts a cluster for a test and closes it in t.Cleanup, after removing what killed
// runs left behind (CleanupStale, netenv.CleanupStale, controlplane.CleanupStale). It skips
// when not root.
func StartT(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("tests/k8s: kubelets, containerd and network namespaces need root")
	}
	if err := CleanupStale(t.Context(), opts.Logger); err != nil {
		t.Logf("cleanup stale clusters: %v", err)
	}
	c, err := Start(t.Context(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
	})
	return c
}

// Start brings a cluster up: the underlay, control plane, controller manager and scheduler,
// then every node (in parallel) until all are Ready with pod CIDRs routed between them. On
// error everything started is torn down.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	if len(opts.Nodes) == 0 {
		opts.Nodes = []NodeSpec{{Name: "ptp-1", CNI: PTP}, {Name: "bridge-1", CNI: Bridge}}
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Cluster{opts: opts, log: log}
	if err := c.start(ctx); err != nil {
		return nil, errors.Join(fmt.Errorf("start cluster: %w", err), c.Close())
	}
	return c, nil
}

func (c *Cluster) start(ctx context.Context) error {
	t0 := time.Now()
	bins, err := KubeBinaries(ctx)
	if err != nil {
		return err
	}
	c.bins = bins
	if c.dir, err = os.MkdirTemp("", DirPrefix); err != nil {
		return err
	}
	c.id = strings.TrimPrefix(filepath.Base(c.dir), DirPrefix)
	if err := writeOwner(c.dir); err != nil {
		return err
	}
	for _, d := range []string{"logs", "images", "mnt"} {
		if err := os.MkdirAll(filepath.Join(c.dir, d), 0o755); err != nil {
			return err
		}
	}
	// The mount namespace files must sit on a private mount: a bind of a mount namespace
	// onto a shared mount that propagates into it would be a loop.
	mnt := filepath.Join(c.dir, "mnt")
	if err := run(ctx, "mount", "--bind", mnt, mnt); err != nil {
		return err
	}
	if err := run(ctx, "mount", "--make-private", mnt); err != nil {
		return err
	}
	if err := c.saveSysctls(); err != nil {
		return err
	}
	underlay, err := c.pickSubnets()
	if err != nil {
		return err
	}
	c.topo, err = netenv.New(ctx, netenv.Options{
		Prefix:      netnsPrefix(c.id),
		UnderlayV4:  underlay,
		IPv4Only:    true,
		NoPodRoutes: true,
		Logger:      c.log,
	})
	if err != nil {
		return err
	}
	c.apiAddr = underlay.Addr().Next()
	if err := c.connectRoot(underlay); err != nil {
		return err
	}
	users := []controlplane.User{
		{Name: "system:kube-controller-manager"},
		{Name: "system:kube-scheduler"},
		{Name: "system:kube-proxy"},
	}
	for _, n := range c.opts.Nodes {
		users = append(users, controlplane.User{Name: "system:node:" + n.Name, Groups: []string{"system:nodes"}})
	}
	c.CP, err = controlplane.Start(ctx, controlplane.Options{
		KubeAPIServer: bins["kube-apiserver"],
		Address:       c.apiAddr,
		Kubelets:      true,
		Users:         users,
		APIServerArgs: []string{"--enable-admission-plugins=NodeRestriction"},
		Logger:        c.log,
	})
	if err != nil {
		return err
	}
	c.log.Info("control plane ready", "url", c.CP.URL(), "elapsed", time.Since(t0).Round(time.Millisecond))
	c.Kubeconfig = filepath.Join(c.dir, "admin.kubeconfig")
	if err := c.CP.WriteKubeconfig(c.Kubeconfig, c.CP.URL(), c.CP.AdminToken()); err != nil {
		return err
	}
	if c.Client, err = kubernetes.NewForConfig(c.CP.RESTConfig()); err != nil {
		return err
	}
	if err := c.startControllers(ctx); err != nil {
		return err
	}
	images, err := c.buildImages(ctx)
	if err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	c.Nodes = make([]*Node, len(c.opts.Nodes))
	for i, spec := range c.opts.Nodes {
		nn, err := c.topo.AddNode(ctx, spec.Name)
		if err != nil {
			return err
		}
		n := &Node{Name: spec.Name, CNI: spec.CNI, IP: nn.UnderlayV4, NS: nn.NS,
			dir: filepath.Join(c.dir, "nodes", spec.Name), mnt: filepath.Join(mnt, spec.Name),
			cgroup: cgroupPrefix(c.id) + spec.Name}
		c.Nodes[i] = n
		g.Go(func() error {
			if err := c.startNode(gctx, n, images); err != nil {
				return fmt.Errorf("node %s: %w", n.Name, err)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if err := c.route(); err != nil {
		return err
	}
	if err := c.waitNodesReady(ctx); err != nil {
		return err
	}
	c.log.Info("cluster ready", "nodes", len(c.Nodes), "elapsed", time.Since(t0).Round(time.Millisecond))
	return nil
}

// KubeBinaries returns the Kubernetes binaries by name, built and cached by
// hack/kube-binaries.sh (which takes minutes the first time; ctx bounds that).
func KubeBinaries(ctx context.Context) (map[string]string, error) {
	root, err := moduleRoot()
	if err != nil {
		return nil, err
	}
	var out, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, filepath.Join(root, "hack", "kube-binaries.sh"), kubeBinaries...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("hack/kube-binaries.sh: %w\n%s", err, stderr.Bytes())
	}
	paths := strings.Fields(out.String())
	if len(paths) != len(kubeBinaries) {
		return nil, fmt.Errorf("hack/kube-binaries.sh printed %q, want %d paths", out.String(), len(kubeBinaries))
	}
	bins := map[string]string{}
	for i, b := range kubeBinaries {
		bins[b] = paths[i]
	}
	return bins, nil
}

// moduleRoot finds the repository root from this source file's location.
func moduleRoot() (string, error) {
	_, file, _, ok := goruntime.Caller(0)
	if !ok {
		return "", errors.New("cannot locate the harness source")
	}
	for d := filepath.Dir(file); d != "/"; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
	}
	return "", errors.New("no go.mod above the harness source")
}

// pickSubnets chooses the underlay (10.79.N.0/24) and the cluster CIDR (10.(128+N).0.0/16)
// of this run, N random among those whose underlay no address or route of the root namespace
// overlaps, so concurrent runs do not collide.
func (c *Cluster) pickSubnets() (netip.Prefix, error) {
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("list routes: %w", err)
	}
	for range 64 {
		nb, err := rand.Int(rand.Reader, big.NewInt(100))
		if err != nil {
			return netip.Prefix{}, err
		}
		n := byte(nb.Int64()) + 1
		underlay := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 79, n, 0}), 24)
		cluster := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 128 + n, 0, 0}), 16)
		taken := false
		for _, r := range routes {
			if r.Dst == nil {
				continue
			}
			a, _ := netip.AddrFromSlice(r.Dst.IP)
			ones, _ := r.Dst.Mask.Size()
			p := netip.PrefixFrom(a.Unmap(), ones)
			if ones == 0 {
				continue // the default route
			}
			if p.Overlaps(underlay) || p.Overlaps(cluster) {
				taken = true
				break
			}
		}
		if !taken {
			c.ClusterCIDR = cluster
			return underlay, nil
		}
	}
	return netip.Prefix{}, errors.New("no free 10.79.N.0/24 underlay in the root namespace")
}

// connectRoot plugs the root namespace into the underlay switch with a veth holding the first
// address of the underlay: the control plane listens there, as on a real control-plane node.
func (c *Cluster) connectRoot(underlay netip.Prefix) error {
	sw := c.topo.Switch()
	sh, err := sw.Handle()
	if err != nil {
		return err
	}
	defer sh.Close()
	br, err := sh.LinkByName(netenv.BridgeName)
	if err != nil {
		return fmt.Errorf("find %s: %w", netenv.BridgeName, err)
	}
	fd, err := netns.GetFromPath(sw.Path)
	if err != nil {
		return fmt.Errorf("open %s: %w", sw.Path, err)
	}
	defer fd.Close()
	c.rootIf = rootVeth(c.id)
	peer := "p0-root"
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: c.rootIf}, PeerName: peer, PeerNamespace: netlink.NsFd(fd)}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s: %w", c.rootIf, err)
	}
	pl, err := sh.LinkByName(peer)
	if err != nil {
		return fmt.Errorf("find %s: %w", peer, err)
	}
	if err := sh.LinkSetMaster(pl, br); err != nil {
		return fmt.Errorf("plug %s into %s: %w", peer, netenv.BridgeName, err)
	}
	if err := sh.LinkSetUp(pl); err != nil {
		return err
	}
	l, err := netlink.LinkByName(c.rootIf)
	if err != nil {
		return err
	}
	addr := &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(underlay.Addr().Next(), underlay.Bits()))}
	if err := netlink.AddrAdd(l, addr); err != nil {
		return fmt.Errorf("address %s on %s: %w", addr, c.rootIf, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return err
	}
	return nil
}

// startControllers writes the kubeconfigs of kube-controller-manager and kube-scheduler and
// starts both in the root namespace. The controller manager exits if it cannot read the
// authentication ConfigMap yet, so that is waited for first.
func (c *Cluster) startControllers(ctx context.Context) error {
	kcmUser, schedUser := "system:kube-controller-manager", "system:kube-scheduler"
	kcmKC, schedKC := filepath.Join(c.dir, "kcm.kubeconfig"), filepath.Join(c.dir, "scheduler.kubeconfig")
	if err := c.CP.WriteKubeconfig(kcmKC, c.CP.URL(), c.CP.Token(kcmUser)); err != nil {
		return err
	}
	if err := c.CP.WriteKubeconfig(schedKC, c.CP.URL(), c.CP.Token(schedUser)); err != nil {
		return err
	}
	ca := filepath.Join(c.dir, "ca.crt")
	if err := os.WriteFile(ca, c.CP.CACert(), 0o644); err != nil {
		return err
	}
	kcmClient, err := kubernetes.NewForConfig(c.CP.RESTConfigFor(c.CP.Token(kcmUser)))
	if err != nil {
		return err
	}
	var last error
	err = wait.PollUntilContextTimeout(ctx, pollInterval, processTimeout, true, func(ctx context.Context) (bool, error) {
		_, last = kcmClient.CoreV1().ConfigMaps("kube-system").Get(ctx, "extension-apiserver-authentication", metav1.GetOptions{})
		return last == nil, nil
	})
	if err != nil {
		return fmt.Errorf("wait for kube-system/extension-apiserver-authentication (%v): %w", last, err)
	}
	c.kcm, err = startProc("kube-controller-manager", []string{c.bins["kube-controller-manager"],
		"--kubeconfig=" + kcmKC,
		"--authentication-kubeconfig=" + kcmKC,
		"--authorization-kubeconfig=" + kcmKC,
		"--use-service-account-credentials=true",
		"--root-ca-file=" + ca,
		"--allocate-node-cidrs=true",
		"--cluster-cidr=" + c.ClusterCIDR.String(),
		"--node-cidr-mask-size=24",
		"--service-cluster-ip-range=" + controlplane.ServiceClusterIPRange,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--controllers=*,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller",
	}, filepath.Join(c.dir, "logs", "kube-controller-manager.log"))
	if err != nil {
		return err
	}
	c.sched, err = startProc("kube-scheduler", []string{c.bins["kube-scheduler"],
		"--kubeconfig=" + schedKC,
		"--authentication-kubeconfig=" + schedKC,
		"--authorization-kubeconfig=" + schedKC,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
	}, filepath.Join(c.dir, "logs", "kube-scheduler.log"))
	return err
}

// buildImages builds the pause and workload programs and every image into the run's directory
// and returns the tarballs.
func (c *Cluster) buildImages(ctx context.Context) ([]string, error) {
	root, err := moduleRoot()
	if err != nil {
		return nil, err
	}
	progs := filepath.Join(c.dir, "images")
	pause, err := buildStatic(ctx, root, "./tests/k8s/internal/pause", progs)
	if err != nil {
		return nil, err
	}
	workload, err := buildStatic(ctx, root, "./tests/k8s/internal/workload", progs)
	if err != nil {
		return nil, err
	}
	images := append([]Image{programImage(PauseImage, pause), programImage(WorkloadImage, workload)}, c.opts.Images...)
	var tars []string
	for i, im := range images {
		p := filepath.Join(progs, fmt.Sprintf("image-%d.tar", i))
		if err := im.WriteTarball(p); err != nil {
			return nil, err
		}
		tars = append(tars, p)
	}
	return tars, nil
}

// route adds the host-gateway routes between nodes (and from the root namespace, where the API
// server is the endpoint of the kubernetes Service) to every node's pod CIDR.
func (c *Cluster) route() error {
	for _, to := range c.Nodes {
		r := func(h *netlink.Handle, link string) error {
			l, err := h.LinkByName(link)
			if err != nil {
				return fmt.Errorf("find %s: %w", link, err)
			}
			err = h.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNet(to.PodCIDR), Gw: to.IP.AsSlice()})
			if err != nil {
				return fmt.Errorf("route %s via %s: %w", to.PodCIDR, to.IP, err)
			}
			return nil
		}
		for _, from := range c.Nodes {
			if from == to {
				continue
			}
			h, err := from.NS.Handle()
			if err != nil {
				return err
			}
			err = r(h, netenv.UnderlayIface)
			h.Close()
			if err != nil {
				return fmt.Errorf("on %s: %w", from.Name, err)
			}
		}
		// Service IPs need a route for the first routing decision, before kube-proxy's DNAT
		// in OUTPUT rewrites them: a real node's default route. Here the service range only,
		// via the control-plane host, so nothing else leaves the test's namespaces.
		h, err := to.NS.Handle()
		if err != nil {
			return err
		}
		eth0, err := h.LinkByName(netenv.UnderlayIface)
		if err == nil {
			svc := netip.MustParsePrefix(controlplane.ServiceClusterIPRange)
			err = h.RouteReplace(&netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: ipNet(svc), Gw: c.apiAddr.AsSlice()})
		}
		h.Close()
		if err != nil {
			return fmt.Errorf("on %s: route the service range: %w", to.Name, err)
		}
		h, err = netlink.NewHandle()
		if err != nil {
			return err
		}
		err = r(h, c.rootIf)
		h.Close()
		if err != nil {
			return fmt.Errorf("in the root namespace: %w", err)
		}
	}
	return nil
}

// waitNodesReady waits until every node reports Ready.
func (c *Cluster) waitNodesReady(ctx context.Context) error {
	var last string
	err := wait.PollUntilContextTimeout(ctx, pollInterval, nodeReadyTimeout, true, func(ctx context.Context) (bool, error) {
		for _, n := range c.Nodes {
			if err := n.alive(); err != nil {
				return false, err
			}
			node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				last = err.Error()
				return false, nil
			}
			if !nodeReady(node) {
				last = fmt.Sprintf("node %s not Ready: %s", n.Name, readyMessage(node))
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("wait for nodes Ready (%s): %w", last, err)
	}
	return nil
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func readyMessage(n *corev1.Node) string {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Reason + ": " + c.Message
		}
	}
	return "no Ready condition"
}

// waitPodCIDR waits until the controller manager has allocated the node's pod CIDR.
func (c *Cluster) waitPodCIDR(ctx context.Context, n *Node) error {
	var last string
	err := wait.PollUntilContextTimeout(ctx, pollInterval, nodeReadyTimeout, true, func(ctx context.Context) (bool, error) {
		if err := n.alive(); err != nil {
			return false, err
		}
		if c.kcm.exited() {
			return false, c.kcm.exitError()
		}
		node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			last = "not registered"
			return false, nil
		}
		if err != nil {
			last = err.Error()
			return false, nil
		}
		if node.Spec.PodCIDR == "" {
			last = "no podCIDR yet"
			return false, nil
		}
		p, err := netip.ParsePrefix(node.Spec.PodCIDR)
		if err != nil {
			return false, fmt.Errorf("podCIDR %q: %w", node.Spec.PodCIDR, err)
		}
		n.PodCIDR = p
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("wait for podCIDR (%s): %w", last, err)
	}
	return nil
}

// Logs returns the path of the directory holding every component's log.
func (c *Cluster) Logs() string { return filepath.Join(c.dir, "logs") }

// Capture starts a capture of the underlay (the switch every node and the control plane are
// plugged into); see netenv.Topology.CaptureUnderlay.
func (c *Cluster) Capture(opts netenv.CaptureOptions) (*netenv.Capture, error) {
	return c.topo.CaptureUnderlay(opts)
}

// Node returns the node called name, or nil.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// Kubectl runs the cluster's kubectl with the admin kubeconfig and returns its combined output.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, c.bins["kubectl"], append([]string{"--kubeconfig=" + c.Kubeconfig}, args...)...)
	b, err := cmd.CombinedOutput()
	if err != nil {
		return b, fmt.Errorf("kubectl %s: %w\n%s", strings.Join(args, " "), err, b)
	}
	return b, nil
}

// saveSysctls records the global sysctls kubelets change.
func (c *Cluster) saveSysctls() error {
	c.sysctls = map[string]string{}
	var b strings.Builder
	for _, k := range globalSysctls {
		v, err := os.ReadFile("/proc/sys/" + strings.ReplaceAll(k, ".", "/"))
		if err != nil {
			continue // not on this kernel
		}
		c.sysctls[k] = strings.TrimSpace(string(v))
		fmt.Fprintf(&b, "%s=%s\n", k, c.sysctls[k])
	}
	return os.WriteFile(filepath.Join(c.dir, sysctlFile), []byte(b.String()), 0o600)
}

// Close tears the cluster down: per node kubelet, its containers, shims, kube-proxy,
// containerd, mount namespace and cgroup; then the controllers, the control plane and the
// namespaces; it restores the sysctls kubelets changed and removes the directory. Idempotent.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.close() })
	return c.closeErr
}

func (c *Cluster) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var errs []error
	for _, n := range c.Nodes {
		if n != nil {
			errs = append(errs, c.stopNode(ctx, n))
		}
	}
	c.kcm.stop(stopGrace)
	c.sched.stop(stopGrace)
	if c.CP != nil {
		errs = append(errs, c.CP.Stop())
	}
	if c.rootIf != "" {
		if l, err := netlink.LinkByName(c.rootIf); err == nil {
			errs = append(errs, netlink.LinkDel(l))
		}
	}
	if c.topo != nil {
		errs = append(errs, c.topo.Close())
	}
	for k, v := range c.sysctls {
		if err := os.WriteFile("/proc/sys/"+strings.ReplaceAll(k, ".", "/"), []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s: %w", k, err))
		}
	}
	if c.dir != "" {
		errs = append(errs, removeDir(ctx, c.dir))
	}
	return errors.Join(errs...)
}

// removeDir unmounts whatever is mounted below dir (the private bind of its mnt directory) and
// removes it.
func removeDir(ctx context.Context, dir string) error {
	mnt := filepath.Join(dir, "mnt")
	for range 10 {
		if err := exec.CommandContext(ctx, "umount", "-l", mnt).Run(); err != nil {
			break // nothing (more) mounted
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}

// run runs a command and returns its output with the error.
func run(ctx context.Context, name string, args ...string) error {
	b, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(b))
	}
	return nil
}

// MemoryRSS returns the resident memory of every process of the cluster: control plane,
// controllers, and per node containerd, shims, kubelet, kube-proxy and every container
// (processes whose command line names the cluster's or the control plane's directory, or
// that live in a node's cgroup). Shared pages count once per process, so it overstates.
func (c *Cluster) MemoryRSS() uint64 {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	var total uint64
	for _, e := range entries {
		pid := e.Name()
		if pid[0] < '0' || pid[0] > '9' {
			continue
		}
		cmdline, _ := os.ReadFile("/proc/" + pid + "/cmdline")
		cg, _ := os.ReadFile("/proc/" + pid + "/cgroup")
		ours := mentions(cmdline, c.dir) || (c.CP != nil && mentions(cmdline, c.CP.Dir())) ||
			bytes.Contains(cg, []byte("/"+cgroupPrefix(c.id)))
		if !ours {
			continue
		}
		status, _ := os.ReadFile("/proc/" + pid + "/status")
		for _, l := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
				var kb uint64
				fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb)
				total += kb << 10
			}
		}
	}
	return total
}

// Names derived from a cluster's ID (its directory's suffix), which CleanupStale and Leftovers
// find again.
func netnsPrefix(id string) string  { return "k8s" + id[len(id)-5:] }
func rootVeth(id string) string     { return "mck" + id[len(id)-5:] }
func cgroupPrefix(id string) string { return "mck8s-" + id + "-" }
