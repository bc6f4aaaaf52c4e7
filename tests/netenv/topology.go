package netenv

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Names of the links the package creates.
const (
	// BridgeName is the underlay bridge in the switch namespace.
	BridgeName = "br0"
	// UnderlayIface is a node's underlay interface; pods' interfaces have the
	// same name.
	UnderlayIface = "eth0"
)

// Gateways of every pod: addresses of the host-side veth.
var (
	// PodGatewayV4 is the IPv4 next hop of every pod's default route.
	PodGatewayV4 = netip.MustParseAddr("169.254.1.1")
	// PodGatewayV6 is the IPv6 next hop of every pod's default route.
	PodGatewayV6 = netip.MustParseAddr("fe80::1")
)

// ErrClosed is returned by the methods of a closed Topology.
var ErrClosed = errors.New("netenv: topology closed")

// closeTimeout bounds the wait for killed processes in Close.
const closeTimeout = 10 * time.Second

// Topology is a cluster of node and pod namespaces joined by an underlay
// switch. Its methods are safe for concurrent use.
type Topology struct {
	opts Options
	log  *slog.Logger
	sw   *NS

	mu      sync.Mutex
	nodes   map[string]*Node
	indexes map[string]int // every node name ever added, so a re-added node keeps its addresses
	closed  bool
}

// Node is a Kubernetes node: a namespace on the underlay with pod CIDRs.
type Node struct {
	// Name is the node's name; its namespace is "<prefix>-<Name>".
	Name string
	// Index numbers the node from 1 in the order names were first added; the
	// addresses derive from it.
	Index int
	// NS is the node's namespace.
	NS *NS
	// UnderlayV4 and UnderlayV6 are eth0's addresses (UnderlayV6 is zero with
	// IPv4Only).
	UnderlayV4, UnderlayV6 netip.Addr
	// PodCIDRs are the node's pod ranges, IPv4 first.
	PodCIDRs []netip.Prefix
	// Port is the node's port on br0 in the switch namespace.
	Port string

	topo    *Topology
	pods    []*Pod
	nextPod int
}

// Pod is a pod: a namespace with eth0 routed through its node.
type Pod struct {
	// Name is the pod's name; its namespace is "<prefix>-<node>-<Name>".
	Name string
	// Node is the node the pod runs on.
	Node *Node
	// NS is the pod's namespace.
	NS *NS
	// IPv4 and IPv6 are the pod's addresses (IPv6 is zero with IPv4Only).
	IPv4, IPv6 netip.Addr
	// HostVeth is the name of the pod veth's end in the node namespace.
	HostVeth string
}

// New builds the switch of a new topology: it claims Options.Prefix (see
// CleanupStale), creates the switch namespace and its bridge. Close it to delete
// everything; on error, New cleans up what it created.
func New(ctx context.Context, opts Options) (*Topology, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	t := &Topology{opts: opts, log: opts.Logger.With("prefix", opts.Prefix), nodes: map[string]*Node{}, indexes: map[string]int{}}
	if err := claimPrefix(ctx, opts.Prefix, t.log); err != nil {
		return nil, err
	}
	if err := t.buildSwitch(); err != nil {
		return nil, errors.Join(err, t.Close())
	}
	return t, nil
}

// NewT builds a topology for a test and closes it in t.Cleanup, after deleting
// the topologies of dead owners (CleanupStale). It skips the test when not
// running as root, and fails it when the topology cannot be built.
func NewT(t testing.TB, opts Options) *Topology {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("netenv: network namespaces need root")
	}
	if _, err := CleanupStale(context.Background(), opts.Logger); err != nil {
		t.Logf("netenv: cleanup of stale topologies: %v", err)
	}
	topo, err := New(context.Background(), opts)
	if err != nil {
		t.Fatalf("netenv: %v", err)
	}
	t.Cleanup(func() {
		if err := topo.Close(); err != nil {
			t.Errorf("netenv: %v", err)
		}
	})
	return topo
}

// Prefix returns the prefix of every namespace of the topology.
func (t *Topology) Prefix() string { return t.opts.Prefix }

// Options returns the options the topology runs with, defaults filled in.
func (t *Topology) Options() Options { return t.opts }

// Switch returns the switch namespace, which holds br0 and one port per node.
func (t *Topology) Switch() *NS { return t.sw }

// Nodes returns the nodes, ordered by Index.
func (t *Topology) Nodes() []*Node {
	t.mu.Lock()
	defer t.mu.Unlock()
	ns := make([]*Node, 0, len(t.nodes))
	for _, n := range t.nodes {
		ns = append(ns, n)
	}
	slices.SortFunc(ns, func(a, b *Node) int { return a.Index - b.Index })
	return ns
}

// Node returns the node called name, or nil.
func (t *Topology) Node(name string) *Node {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.nodes[name]
}

// Pods returns the node's pods in the order they were added.
func (n *Node) Pods() []*Pod {
	n.topo.mu.Lock()
	defer n.topo.mu.Unlock()
	return slices.Clone(n.pods)
}

// Pod returns the node's pod called name, or nil.
func (n *Node) Pod(name string) *Pod {
	n.topo.mu.Lock()
	defer n.topo.mu.Unlock()
	for _, p := range n.pods {
		if p.Name == name {
			return p
		}
	}
	return nil
}

// Addrs returns the pod's addresses, IPv4 first.
func (p *Pod) Addrs() []netip.Addr {
	if p.IPv6.IsValid() {
		return []netip.Addr{p.IPv4, p.IPv6}
	}
	return []netip.Addr{p.IPv4}
}

// buildSwitch creates the switch namespace with br0 up.
func (t *Topology) buildSwitch() error {
	sw, err := createNamedNS(t.opts.Prefix + "-sw")
	if err != nil {
		return err
	}
	t.sw = sw
	// The switch is layer 2 only: no IPv6 on it keeps router solicitations,
	// DAD and MLD of its own links off the captured wire.
	if err := sw.setSysctls(
		"net.ipv6.conf.default.disable_ipv6", "1",
		"net.ipv6.conf.all.disable_ipv6", "1",
	); err != nil {
		return err
	}
	h, err := sw.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	if err := setLoopbackUp(h); err != nil {
		return fmt.Errorf("switch: %w", err)
	}
	// Without snooping the bridge floods multicast (IPv6 neighbour
	// solicitations) like a dumb switch, whatever MLD reports it saw or missed.
	off := false
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: BridgeName, MTU: t.opts.UnderlayMTU}, MulticastSnooping: &off}
	if err := h.LinkAdd(br); err != nil {
		return fmt.Errorf("switch: add %s: %w", BridgeName, err)
	}
	if err := h.LinkSetUp(br); err != nil {
		return fmt.Errorf("switch: set %s up: %w", BridgeName, err)
	}
	t.log.Debug("created switch", "netns", sw.Name)
	return nil
}

// AddNode creates node name: its namespace, eth0 on the switch with its
// underlay addresses, and host-gateway routes between it and every other node.
func (t *Topology) AddNode(ctx context.Context, name string) (*Node, error) {
	if err := checkName("node", name); err != nil {
		return nil, fmt.Errorf("add node: %w", err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrClosed
	}
	if _, ok := t.nodes[name]; ok {
		return nil, fmt.Errorf("add node %s: exists", name)
	}
	idx, ok := t.indexes[name]
	if !ok {
		idx = len(t.indexes) + 1
	}
	addrs, err := t.opts.addrsForNode(idx)
	if err != nil {
		return nil, fmt.Errorf("add node %s: %w", name, err)
	}
	n := &Node{
		Name: name, Index: idx, UnderlayV4: addrs.underlayV4, UnderlayV6: addrs.underlayV6,
		PodCIDRs: []netip.Prefix{addrs.podV4}, Port: portName(idx, name), topo: t,
	}
	if addrs.podV6.IsValid() {
		n.PodCIDRs = append(n.PodCIDRs, addrs.podV6)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("add node %s: %w", name, err)
	}
	if err := t.buildNode(n); err != nil {
		err = fmt.Errorf("add node %s: %w", name, err)
		if n.NS != nil {
			err = errors.Join(err, t.destroyNode(ctx, n))
		}
		return nil, err
	}
	t.indexes[name] = idx
	t.nodes[name] = n
	t.log.Debug("added node", "node", name, "netns", n.NS.Name, "underlay", n.UnderlayV4, "pod_cidrs", n.PodCIDRs)
	return n, nil
}

func (t *Topology) buildNode(n *Node) error {
	ns, err := createNamedNS(t.opts.Prefix + "-" + n.Name)
	if err != nil {
		return err
	}
	n.NS = ns
	// Defaults first, so that every link created afterwards inherits them.
	if err := ns.setSysctls(
		"net.ipv4.conf.default.rp_filter", "0",
		"net.ipv4.conf.all.rp_filter", "0",
		"net.ipv4.conf.default.forwarding", "1",
		"net.ipv4.conf.all.forwarding", "1",
		"net.ipv6.conf.default.accept_dad", "0",
		"net.ipv6.conf.all.accept_dad", "0",
		"net.ipv6.conf.default.forwarding", "1",
		"net.ipv6.conf.all.forwarding", "1",
	); err != nil {
		return err
	}
	nh, err := ns.Handle()
	if err != nil {
		return err
	}
	defer nh.Close()
	if err := setLoopbackUp(nh); err != nil {
		return err
	}
	sh, err := t.sw.Handle()
	if err != nil {
		return err
	}
	defer sh.Close()
	br, err := sh.LinkByName(BridgeName)
	if err != nil {
		return fmt.Errorf("find %s: %w", BridgeName, err)
	}
	fd, err := netns.GetFromPath(ns.Path)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer fd.Close()
	mtu := t.opts.UnderlayMTU
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: n.Port, MTU: mtu, MasterIndex: br.Attrs().Index},
		PeerName:      UnderlayIface,
		PeerMTU:       uint32(mtu),
		PeerNamespace: netlink.NsFd(fd),
	}
	if err := sh.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s/%s: %w", n.Port, UnderlayIface, err)
	}
	if err := sh.LinkSetUp(veth); err != nil {
		return fmt.Errorf("set %s up: %w", n.Port, err)
	}
	eth0, err := nh.LinkByName(UnderlayIface)
	if err != nil {
		return fmt.Errorf("find %s: %w", UnderlayIface, err)
	}
	if err := nh.AddrAdd(eth0, nlAddr(netip.PrefixFrom(n.UnderlayV4, t.opts.UnderlayV4.Bits()))); err != nil {
		return fmt.Errorf("add address %s: %w", n.UnderlayV4, err)
	}
	if n.UnderlayV6.IsValid() {
		if err := nh.AddrAdd(eth0, nlAddr(netip.PrefixFrom(n.UnderlayV6, t.opts.UnderlayV6.Bits()))); err != nil {
			return fmt.Errorf("add address %s: %w", n.UnderlayV6, err)
		}
	}
	if err := nh.LinkSetUp(eth0); err != nil {
		return fmt.Errorf("set %s up: %w", UnderlayIface, err)
	}
	for _, o := range t.nodes {
		if t.opts.NoPodRoutes {
			break
		}
		if err := routeHostGW(nh, n, o, true); err != nil {
			return err
		}
		oh, err := o.NS.Handle()
		if err != nil {
			return err
		}
		err = routeHostGW(oh, o, n, true)
		oh.Close()
		if err != nil {
			return fmt.Errorf("on node %s: %w", o.Name, err)
		}
	}
	return nil
}

// routeHostGW adds (or deletes) on h, the handle of node from, the routes to
// node to's pod CIDRs via to's underlay addresses, and drops from's neighbour
// entries for those addresses.
func routeHostGW(h *netlink.Handle, from, to *Node, add bool) error {
	eth0, err := h.LinkByName(UnderlayIface)
	if err != nil {
		return fmt.Errorf("find %s: %w", UnderlayIface, err)
	}
	// A node added again under its old name has its old addresses but a new
	// MAC: forget what the neighbour cache remembers, or traffic goes to the
	// old MAC until the entry expires (15-45 s).
	for _, a := range []netip.Addr{to.UnderlayV4, to.UnderlayV6} {
		if !a.IsValid() {
			continue
		}
		err := h.NeighDel(&netlink.Neigh{LinkIndex: eth0.Attrs().Index, IP: a.AsSlice()})
		if err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("forget neighbour %s on %s: %w", a, from.Name, err)
		}
	}
	for _, cidr := range to.PodCIDRs {
		gw := to.UnderlayV4
		if cidr.Addr().Is6() {
			gw = to.UnderlayV6
		}
		r := &netlink.Route{
			LinkIndex: eth0.Attrs().Index,
			Dst:       ipNet(cidr),
			Gw:        gw.AsSlice(),
			Protocol:  unix.RTPROT_STATIC,
		}
		if add {
			if err := h.RouteReplace(r); err != nil {
				return fmt.Errorf("add route %s via %s: %w", cidr, gw, err)
			}
			continue
		}
		if err := h.RouteDel(r); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("delete route %s via %s on %s: %w", cidr, gw, from.Name, err)
		}
	}
	return nil
}

// RemoveNode deletes node name: the routes other nodes have to it, its pods,
// the processes in its namespaces, its switch port and its namespace. The name
// may be added again and gets the same addresses.
func (t *Topology) RemoveNode(ctx context.Context, name string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return ErrClosed
	}
	n, ok := t.nodes[name]
	if !ok {
		return fmt.Errorf("remove node %s: not found", name)
	}
	var errs []error
	for _, o := range t.nodes {
		if o == n || t.opts.NoPodRoutes {
			continue
		}
		oh, err := o.NS.Handle()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, routeHostGW(oh, o, n, false))
		oh.Close()
	}
	errs = append(errs, t.destroyNode(ctx, n))
	delete(t.nodes, name)
	t.log.Debug("removed node", "node", name)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("remove node %s: %w", name, err)
	}
	return nil
}

// destroyNode deletes n's pods, kills the processes in its namespace, deletes its
// switch port (and with it eth0, at once even if sockets keep the namespace
// alive) and its namespace.
func (t *Topology) destroyNode(ctx context.Context, n *Node) error {
	var errs []error
	for _, p := range n.pods {
		errs = append(errs, t.destroyPod(ctx, p))
	}
	n.pods = nil
	n.NS.closeTracked()
	errs = append(errs, killIn(ctx, n.NS.Path))
	if sh, err := t.sw.Handle(); err != nil {
		errs = append(errs, err)
	} else {
		if l, err := sh.LinkByName(n.Port); err == nil {
			if err := sh.LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("delete port %s: %w", n.Port, err))
			}
		}
		sh.Close()
	}
	errs = append(errs, deleteNamedNS(n.NS.Name))
	return errors.Join(errs...)
}

// AddPod creates pod name on node: its namespace, the veth pair, addresses
// from the node's pod CIDRs (allocated sequentially from .10 and ::10, never
// reused on that node) and the routes on both sides.
func (t *Topology) AddPod(ctx context.Context, node *Node, name string) (*Pod, error) {
	if err := checkName("pod", name); err != nil {
		return nil, fmt.Errorf("add pod: %w", err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrClosed
	}
	if node == nil || t.nodes[node.Name] != node {
		return nil, fmt.Errorf("add pod %s: node not in topology", name)
	}
	for _, p := range node.pods {
		if p.Name == name {
			return nil, fmt.Errorf("add pod %s/%s: exists", node.Name, name)
		}
	}
	var v6cidr netip.Prefix
	if len(node.PodCIDRs) > 1 {
		v6cidr = node.PodCIDRs[1]
	}
	ip4, ip6, err := addrsForPod(node.PodCIDRs[0], v6cidr, node.nextPod)
	if err != nil {
		return nil, fmt.Errorf("add pod %s/%s: %w", node.Name, name, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("add pod %s/%s: %w", node.Name, name, err)
	}
	p := &Pod{Name: name, Node: node, IPv4: ip4, IPv6: ip6}
	p.HostVeth = hostVethName(name, func(s string) bool {
		return slices.ContainsFunc(node.pods, func(q *Pod) bool { return q.HostVeth == s })
	})
	if err := t.buildPod(p); err != nil {
		err = fmt.Errorf("add pod %s/%s: %w", node.Name, name, err)
		if p.NS != nil {
			err = errors.Join(err, t.destroyPod(ctx, p))
		}
		return nil, err
	}
	node.nextPod++
	node.pods = append(node.pods, p)
	t.log.Debug("added pod", "node", node.Name, "pod", name, "netns", p.NS.Name, "ipv4", ip4, "ipv6", ip6, "iface", p.HostVeth)
	return p, nil
}

func (t *Topology) buildPod(p *Pod) error {
	ns, err := createNamedNS(fmt.Sprintf("%s-%s-%s", t.opts.Prefix, p.Node.Name, p.Name))
	if err != nil {
		return err
	}
	p.NS = ns
	if err := ns.setSysctls(
		"net.ipv4.conf.default.rp_filter", "0",
		"net.ipv4.conf.all.rp_filter", "0",
		"net.ipv6.conf.default.accept_dad", "0",
		"net.ipv6.conf.all.accept_dad", "0",
	); err != nil {
		return err
	}
	ph, err := ns.Handle()
	if err != nil {
		return err
	}
	defer ph.Close()
	if err := setLoopbackUp(ph); err != nil {
		return err
	}
	nh, err := p.Node.NS.Handle()
	if err != nil {
		return err
	}
	defer nh.Close()
	fd, err := netns.GetFromPath(ns.Path)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer fd.Close()
	mtu := t.opts.PodMTU
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: p.HostVeth, MTU: mtu},
		PeerName:      UnderlayIface,
		PeerMTU:       uint32(mtu),
		PeerNamespace: netlink.NsFd(fd),
	}
	if err := nh.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s/%s: %w", p.HostVeth, UnderlayIface, err)
	}
	host, err := nh.LinkByName(p.HostVeth)
	if err != nil {
		return fmt.Errorf("find %s: %w", p.HostVeth, err)
	}
	v6 := p.IPv6.IsValid()
	// Host side: the pods' gateway addresses, and routes to the pod.
	if err := nh.AddrAdd(host, nlAddr(netip.PrefixFrom(PodGatewayV4, 32))); err != nil {
		return fmt.Errorf("add address %s on %s: %w", PodGatewayV4, p.HostVeth, err)
	}
	if v6 {
		if err := nh.AddrAdd(host, nlAddr(netip.PrefixFrom(PodGatewayV6, 64))); err != nil {
			return fmt.Errorf("add address %s on %s: %w", PodGatewayV6, p.HostVeth, err)
		}
	}
	if err := nh.LinkSetUp(host); err != nil {
		return fmt.Errorf("set %s up: %w", p.HostVeth, err)
	}
	hostRoutes := []*netlink.Route{{LinkIndex: host.Attrs().Index, Dst: ipNet(netip.PrefixFrom(p.IPv4, 32)), Scope: netlink.SCOPE_LINK}}
	if v6 {
		hostRoutes = append(hostRoutes, &netlink.Route{LinkIndex: host.Attrs().Index, Dst: ipNet(netip.PrefixFrom(p.IPv6, 128))})
	}
	for _, r := range hostRoutes {
		if err := nh.RouteReplace(r); err != nil {
			return fmt.Errorf("add route %s dev %s: %w", r.Dst, p.HostVeth, err)
		}
	}
	// Pod side.
	eth0, err := ph.LinkByName(UnderlayIface)
	if err != nil {
		return fmt.Errorf("find pod %s: %w", UnderlayIface, err)
	}
	if err := ph.AddrAdd(eth0, nlAddr(netip.PrefixFrom(p.IPv4, 32))); err != nil {
		return fmt.Errorf("add address %s: %w", p.IPv4, err)
	}
	if v6 {
		if err := ph.AddrAdd(eth0, nlAddr(netip.PrefixFrom(p.IPv6, 128))); err != nil {
			return fmt.Errorf("add address %s: %w", p.IPv6, err)
		}
	}
	if err := ph.LinkSetUp(eth0); err != nil {
		return fmt.Errorf("set pod %s up: %w", UnderlayIface, err)
	}
	idx := eth0.Attrs().Index
	podRoutes := []*netlink.Route{
		{LinkIndex: idx, Dst: ipNet(netip.PrefixFrom(PodGatewayV4, 32)), Scope: netlink.SCOPE_LINK},
		{LinkIndex: idx, Dst: ipNet(netip.MustParsePrefix("0.0.0.0/0")), Gw: PodGatewayV4.AsSlice()},
	}
	if v6 {
		podRoutes = append(podRoutes, &netlink.Route{LinkIndex: idx, Dst: ipNet(netip.MustParsePrefix("::/0")), Gw: PodGatewayV6.AsSlice()})
	}
	for _, r := range podRoutes {
		if err := ph.RouteReplace(r); err != nil {
			return fmt.Errorf("add pod route %s via %s: %w", r.Dst, r.Gw, err)
		}
	}
	return nil
}

// RemovePod deletes pod: the processes in its namespace, its veth (and with it
// the node's routes to it) and its namespace. Its addresses are not reused.
func (t *Topology) RemovePod(ctx context.Context, pod *Pod) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return ErrClosed
	}
	n := pod.Node
	i := slices.Index(n.pods, pod)
	if i < 0 || t.nodes[n.Name] != n {
		return fmt.Errorf("remove pod %s/%s: not found", n.Name, pod.Name)
	}
	n.pods = slices.Delete(n.pods, i, i+1)
	if err := t.destroyPod(ctx, pod); err != nil {
		return fmt.Errorf("remove pod %s/%s: %w", n.Name, pod.Name, err)
	}
	t.log.Debug("removed pod", "node", n.Name, "pod", pod.Name)
	return nil
}

func (t *Topology) destroyPod(ctx context.Context, p *Pod) error {
	var errs []error
	p.NS.closeTracked()
	errs = append(errs, killIn(ctx, p.NS.Path))
	if nh, err := p.Node.NS.Handle(); err != nil {
		errs = append(errs, err)
	} else {
		if l, err := nh.LinkByName(p.HostVeth); err == nil {
			if err := nh.LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", p.HostVeth, err))
			}
		}
		nh.Close()
	}
	errs = append(errs, deleteNamedNS(p.NS.Name))
	return errors.Join(errs...)
}

// Close kills every process in every namespace of the topology (found by
// prefix, so also after a partial failure), closes the forwarders, deletes the
// namespaces and releases the prefix. It is idempotent; later calls to other
// methods return ErrClosed.
func (t *Topology) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	for _, n := range t.nodes {
		for _, p := range n.pods {
			p.NS.closeTracked()
		}
		n.NS.closeTracked()
	}
	if t.sw != nil {
		t.sw.closeTracked()
	}
	names, err := listNamedNS(t.opts.Prefix)
	if err != nil {
		return fmt.Errorf("close: %w", err)
	}
	paths := make([]string, len(names))
	for i, n := range names {
		paths[i] = filepath.Join(netnsDir, n)
	}
	var errs []error
	if err := killIn(ctx, paths...); err != nil {
		errs = append(errs, err)
	}
	// Longest names first: pods, then nodes, then the switch.
	slices.SortFunc(names, func(a, b string) int { return len(b) - len(a) })
	for _, n := range names {
		errs = append(errs, deleteNamedNS(n))
	}
	if errors.Join(errs...) == nil {
		if err := os.Remove(pidFile(t.opts.Prefix)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove pid file: %w", err))
		}
	}
	clear(t.nodes)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close topology %s: %w", t.opts.Prefix, err)
	}
	t.log.Debug("closed topology", "netns_deleted", len(names))
	return nil
}

// nlAddr converts a prefix to a netlink address; IPv6 addresses are added with
// nodad, so they are usable at once.
func nlAddr(p netip.Prefix) *netlink.Addr {
	a := &netlink.Addr{IPNet: ipNet(p)}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	return a
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
