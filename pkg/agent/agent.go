package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	"k8s.io/client-go/kubernetes"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
	identitykube "github.com/meshcrypt/meshcrypt/pkg/identity/kube"
	"github.com/meshcrypt/meshcrypt/pkg/metrics"
)

// Log attribute keys.
const (
	logNode  = "node"
	logIface = "iface"
	logPeer  = "peer"
)

// KeyFileName is the private key's file name inside the state directory.
const KeyFileName = "wireguard.key"

// Options configure an Agent.
type Options struct {
	// NodeName is the Kubernetes node this agent runs on. Required.
	NodeName string
	// StateDir holds the private key and the userspace device's log. Required.
	StateDir string
	// RESTConfig reaches the API server. Required.
	RESTConfig *rest.Config
	// Netlink is bound to the node's network namespace; nil opens one for the current one.
	Netlink *netlink.Handle
	// WireGuard configures the device.
	WireGuard WireGuardOptions
	// UnderlayIPs overrides the underlay addresses taken from the Node's InternalIPs.
	UnderlayIPs []netip.Addr
	// BootIDPath is read for the boot ID; default /proc/sys/kernel/random/boot_id.
	BootIDPath string
	// RouteTable and RulePriority place the tunnel routes; zero means the datapath defaults.
	RouteTable, RulePriority int
	// FirewallMark is the mark of the WireGuard device's own packets, which the tunnel
	// table's rule skips; zero means datapath.DefaultFirewallMark.
	FirewallMark uint32
	// ResyncPeriod re-applies the desired state to heal drift; default 30 s.
	ResyncPeriod time.Duration
	// StatusPeriod refreshes peer handshakes in status; default 10 s.
	StatusPeriod time.Duration
	// ClusterName and ClusterID name this cluster in identities; default "default" and 1.
	ClusterName string
	ClusterID   uint8
	// AttachMode is how the classifier is attached to pod interfaces (auto: TCX, else tc).
	AttachMode datapath.AttachMode
	// BPFPinDir is a directory on a bpffs where the classifier's maps and links are pinned
	// (one subdirectory per node), so they outlive agent restarts; "" pins nothing.
	BPFPinDir string
	// Namespace is the agent's namespace: it holds the identity GC's lease and the IPsec
	// keyring Secret; default "meshcrypt".
	Namespace string
	// FIPSPath is read for the kernel's FIPS flag; default /proc/sys/crypto/fips_enabled.
	// In FIPS mode the agent refuses WireGuard and keyrings with unapproved algorithms.
	FIPSPath string
	// IdentityGCGrace is how long an identity stays unused before it is deleted (default
	// 10 min); IdentityGCInterval how often the collector looks (default 1 min).
	IdentityGCGrace, IdentityGCInterval time.Duration
	// Flows configure the flow events served on /flows (flows.go).
	Flows FlowOptions
	// ConntrackSize is the number of connections the policy classifier tracks (0: the
	// datapath's default).
	ConntrackSize int
	// NoHealthEndpoint leaves out the health endpoint (the highest address but one of each
	// pod CIDR, on lo), and with it `meshcrypt verify` (verify.go).
	NoHealthEndpoint bool
	// Logger receives the agent's logs; nil discards them.
	Logger *slog.Logger
}

// WireGuardOptions configure the node's WireGuard device.
type WireGuardOptions struct {
	// Iface is the device name; it must be unique on the host (UAPI sockets are global).
	Iface string
	// ListenPort is the UDP port; default 51871.
	ListenPort int
	// Backend is auto (the default), kernel or userspace.
	Backend wireguard.Backend
	// Executable runs the userspace device as `Executable wireguard-device ...`;
	// default: this program.
	Executable string
}

// DefaultListenPort is the WireGuard listen port unless configured.
const DefaultListenPort = 51871

// Agent reconciles one node. Create it with New and start it with Run.
type Agent struct {
	opts Options
	// host is node encryption's state: announced is what MeshNode spec.nodeEncryption says
	// (true only once applied), known whether it was read from the MeshNode an earlier run
	// published, optOutErr the last opt-out selector error reported.
	host struct {
		announced, known bool
		optOutErr        string
	}
	log     *slog.Logger
	scheme  *runtime.Scheme
	trigger chan struct{}
	rec     *metrics.Recorder
	ready   atomic.Bool
	// mu guards what metrics scrapes read while the loop changes it: dev, clf, nameByKey,
	// peers.
	mu sync.Mutex

	// Set up in Run.
	client        client.Client
	cache         cache.Cache
	recorder      record.EventRecorder
	key           wgtypes.Key
	bootID        string
	mtu           int
	nl            *netlink.Handle
	dev           wireguard.Device
	promptNext    bool                 // prompt handshakes on the next configuration with peers
	promptKeys    map[wgtypes.Key]bool // peers whose node rotated its key: prompt them too
	keyCreated    time.Time            // when the private key was generated (rotate.go)
	rotateAt      time.Time            // a reconcile is scheduled then for keyRotation.every
	routes        *datapath.Routes
	nameByKey     map[wgtypes.Key]string
	lastSkips     string
	lastErr       error
	applied       v1alpha1.EncryptionMode
	appliedStrict bool
	skips         []skip
	peers         []wireguard.Peer

	// What reconciles remember so as not to redo what did not change.
	routeState routeState       // the routes applyRoutes last applied (routes.go)
	nodeStore  toolscache.Store // the Node informer's objects
	podCIDRs   podCIDRCache     // the Nodes' pod CIDRs, from nodeStore (informers.go)
	// appliedView is, after a reconcile that applied WireGuard peers, the device as that
	// reconcile read it and the peers it applied, for the status published right after it.
	appliedView *deviceView

	// Identity and policy (policy.go).
	alloc         *identity.Allocator
	clf           *datapath.Classifier
	netns         datapath.Netns
	attached      map[attachedLink]datapath.AttachMode
	attachMode    datapath.AttachMode
	badPods       []string
	policySkipped []string
	flows         flowHub // flow events for /flows (flows.go)

	// IPsec (ipsec.go) and refused modes.
	ips         ipsecState
	refused     *refusal
	refusedMode v1alpha1.EncryptionMode
	underlayMTU int
	underlay6   bool

	// Cluster mesh (clustermesh.go).
	mesh         meshState
	endpoints    []v1alpha1.Endpoint            // published in spec.endpoints
	remoteStatus []v1alpha1.RemoteClusterStatus // published in status.remoteClusters

	// Verification (verify.go).
	underlay []netip.Addr
	health   []netip.Addr
	verify   verifier
}

// New checks opts and returns an Agent. It does no I/O.
func New(opts Options) (*Agent, error) {
	if opts.NodeName == "" {
		return nil, errors.New("node name is required")
	}
	if opts.StateDir == "" {
		return nil, errors.New("state dir is required")
	}
	if opts.RESTConfig == nil {
		return nil, errors.New("API server config is required")
	}
	if opts.WireGuard.Iface == "" {
		opts.WireGuard.Iface = "meshcrypt0"
	}
	if len(opts.WireGuard.Iface) > 15 {
		return nil, fmt.Errorf("interface name %q is longer than 15 characters", opts.WireGuard.Iface)
	}
	if opts.WireGuard.ListenPort == 0 {
		opts.WireGuard.ListenPort = DefaultListenPort
	}
	if opts.WireGuard.ListenPort < 1 || opts.WireGuard.ListenPort > 65535 {
		return nil, fmt.Errorf("listen port %d outside 1-65535", opts.WireGuard.ListenPort)
	}
	backend, err := wireguard.ParseBackend(string(opts.WireGuard.Backend))
	if err != nil {
		return nil, err
	}
	opts.WireGuard.Backend = backend
	if opts.BootIDPath == "" {
		opts.BootIDPath = "/proc/sys/kernel/random/boot_id"
	}
	if opts.ResyncPeriod == 0 {
		opts.ResyncPeriod = 30 * time.Second
	}
	if opts.StatusPeriod == 0 {
		opts.StatusPeriod = 10 * time.Second
	}
	if opts.ClusterName == "" {
		opts.ClusterName = "default"
	}
	if opts.ClusterID == 0 {
		opts.ClusterID = 1
	}
	if opts.Namespace == "" {
		opts.Namespace = "meshcrypt"
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	a := &Agent{
		opts:     opts,
		log:      log.With(logNode, opts.NodeName),
		scheme:   scheme,
		trigger:  make(chan struct{}, 1),
		attached: map[attachedLink]datapath.AttachMode{},
	}
	a.rec = metrics.New(metrics.Options{Source: a, XFRM: xfrmStats{}, Conntrack: a, Logger: a.log})
	return a, nil
}

// Run sets the node up and reconciles until ctx ends. On return the device, its peers and
// the routes stay in place, so an agent restart does not interrupt traffic.
func (a *Agent) Run(ctx context.Context) error {
	if fi, err := os.Stat(a.opts.StateDir); err == nil && fi.IsDir() && fi.Mode().Perm()&0o077 != 0 {
		// A kubelet-created hostPath directory is 0755: the key's directory is private.
		if err := os.Chmod(a.opts.StateDir, 0o700); err != nil {
			return fmt.Errorf("make state dir %s private: %w", a.opts.StateDir, err)
		}
	}
	key, created, err := wireguard.LoadOrCreateKey(filepath.Join(a.opts.StateDir, KeyFileName))
	if err != nil {
		return fmt.Errorf("load WireGuard key: %w", err)
	}
	a.key = key
	if a.keyCreated, err = wireguard.KeyCreated(filepath.Join(a.opts.StateDir, KeyFileName)); err != nil {
		return err
	}
	a.log.Info("WireGuard key loaded", "created", created, "fingerprint", wireguard.Fingerprint(key.PublicKey()), "age", time.Since(a.keyCreated).Round(time.Second))
	if b, err := os.ReadFile(a.opts.BootIDPath); err == nil {
		a.bootID = strings.TrimSpace(string(b))
	} else {
		a.log.Warn("no boot ID", "err", err)
	}

	h := a.opts.Netlink
	if h == nil {
		if h, err = netlink.NewHandle(); err != nil {
			return fmt.Errorf("open netlink: %w", err)
		}
		defer h.Close()
	}
	a.nl = h
	a.routes = datapath.NewRoutes(h)

	if a.client, err = client.New(a.opts.RESTConfig, client.Options{Scheme: a.scheme}); err != nil {
		return fmt.Errorf("create API client: %w", err)
	}
	core, err := typedcorev1.NewForConfig(a.opts.RESTConfig)
	if err != nil {
		return fmt.Errorf("create events client: %w", err)
	}
	bc := record.NewBroadcaster(record.WithContext(ctx))
	bc.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: core.Events("")})
	defer bc.Shutdown()
	a.recorder = bc.NewRecorder(a.scheme, corev1.EventSource{Component: "meshcrypt-agent", Host: a.opts.NodeName})

	node, err := a.waitForNode(ctx)
	if err != nil {
		return err
	}
	local, err := localFromNode(node, a.opts.UnderlayIPs)
	if err != nil {
		return err
	}
	underlayMTU, iface, err := underlayLinkMTU(h, local.Underlay)
	if err != nil {
		return err
	}
	a.underlayMTU, a.underlay6 = underlayMTU, local.Underlay[0].Is6()
	a.underlay = local.Underlay
	if !a.opts.NoHealthEndpoint {
		a.health = healthAddrs(local.PodCIDRs)
		if err := datapath.ApplyHealth(h, a.health); err != nil {
			return err
		}
	}
	a.ips.x = ipsec.NewXFRM(h, ipsec.XFRMOptions{Logger: a.log})
	a.mtu = wireguard.TunnelMTU(underlayMTU)
	if a.mtu == 0 {
		return fmt.Errorf("underlay %s has MTU %d: too small for a WireGuard tunnel", iface, underlayMTU)
	}
	if err := a.ensureDevice(ctx); err != nil {
		return err
	}
	defer func() { a.dev.Close() }()
	a.log.Info("underlay", "iface", iface, "mtu", underlayMTU)

	pin := ""
	if a.opts.BPFPinDir != "" {
		pin = filepath.Join(a.opts.BPFPinDir, a.opts.NodeName)
	}
	clf, err := datapath.LoadClassifier(datapath.ClassifierOptions{PinPath: pin, Logger: a.log, ConntrackSize: a.opts.ConntrackSize})
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.clf = clf
	a.mu.Unlock()
	defer a.clf.Close()
	ns, err := netns.Get()
	if err != nil {
		return fmt.Errorf("open own network namespace: %w", err)
	}
	defer ns.Close()
	a.netns = datapath.Netns{Handle: h, NS: ns}
	// A route deleted from the tunnel table behind the agent's back makes the next reconcile
	// apply the routes in full, and starts it (routeState).
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go func() {
		_ = datapath.WatchRouteDeletions(wctx, datapath.RouteWatchOptions{
			NS: ns, Table: a.opts.RouteTable, Logger: a.log,
			Deleted: func() {
				a.routeState.invalidate()
				a.kick()
			},
		})
	}()
	a.clusterFromConfig(ctx)
	a.alloc = identity.NewAllocator(identitykube.NewStore(a.client), identity.AllocatorOptions{
		Cluster: a.opts.ClusterID, Watched: true, Logger: a.log,
	})
	go a.runFlows(ctx, clf)

	if err := a.startCache(ctx); err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(a.opts.RESTConfig)
	if err != nil {
		return err
	}
	go a.runIdentityGC(ctx, cs)
	return a.loop(ctx)
}

// ensureDevice creates or adopts the WireGuard device (kernel, else the userspace device
// process, which it starts detached so it outlives this agent).
func (a *Agent) ensureDevice(ctx context.Context) error {
	exe := a.opts.WireGuard.Executable
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return fmt.Errorf("find own executable: %w", err)
		}
	}
	dev, err := wireguard.Ensure(ctx, wireguard.EnsureOptions{
		Name:    a.opts.WireGuard.Iface,
		MTU:     a.mtu,
		Backend: a.opts.WireGuard.Backend,
		Netlink: a.nl,
		DeviceCommand: []string{exe, "wireguard-device",
			"--iface", a.opts.WireGuard.Iface, "--mtu", strconv.Itoa(a.mtu)},
		LogPath: filepath.Join(a.opts.StateDir, "wireguard-device.log"),
		Logger:  a.log,
	})
	if err != nil {
		return fmt.Errorf("set up WireGuard device %s: %w", a.opts.WireGuard.Iface, err)
	}
	a.mu.Lock()
	a.dev = dev
	a.mu.Unlock()
	a.routeState.invalidate() // a new device has no routes through it yet
	if cur, err := dev.Device(ctx); err == nil && len(cur.Peers) == 0 {
		a.promptNext = true // a new (or empty) device: see applyPrompt
	}
	a.log.Info("WireGuard device ready", logIface, dev.Name(), "backend", dev.Backend(), "mtu", a.mtu)
	return nil
}

// deviceView is the device as read before an Apply, and the peers that Apply made it carry.
type deviceView struct {
	cur   *wgtypes.Device
	peers []wireguard.Peer
}

// readDeviceAsync reads the device on its own goroutine; the function it returns waits for
// the read. Both are called on the reconcile loop.
func (a *Agent) readDeviceAsync(ctx context.Context) func() (*wgtypes.Device, error) {
	type result struct {
		dev *wgtypes.Device
		err error
	}
	dev := a.dev
	ch := make(chan result, 1)
	go func() {
		d, err := dev.Device(ctx)
		ch <- result{d, err}
	}()
	return func() (*wgtypes.Device, error) {
		r := <-ch
		if r.err != nil && a.dev != dev {
			return a.dev.Device(ctx) // the device was recreated meanwhile (rotateIfDue)
		}
		return r.dev, r.err
	}
}

// applyDevice applies cfg; when the device has vanished (its userspace process died, its link
// was deleted) it recreates it and applies again.
func (a *Agent) applyDevice(ctx context.Context, cfg wireguard.Config) (wireguard.PlanStats, error) {
	st, err := a.applyPrompt(ctx, cfg)
	if !errors.Is(err, wireguard.ErrDeviceGone) {
		return st, err
	}
	a.log.Warn("WireGuard device gone; recreating it", logIface, a.dev.Name(), "err", err)
	a.dev.Close()
	if err := a.ensureDevice(ctx); err != nil {
		return st, err
	}
	return a.applyPrompt(ctx, cfg)
}

// applyPrompt applies cfg. On the first configuration of a device that came up empty (a
// reboot, a recreated device) while peers may still hold sessions with its predecessor, it
// prompts a handshake with every peer it adds; likewise with the new key of a node that
// rotated its key (rotatedPeers), so the rotated node's sessions start at once instead of
// when its retry timer fires (5 s). Not otherwise: prompting a peer that has not configured
// this node yet (everyone enabling at once) only gets the initiation dropped and retried
// seconds later, where a data packet would have started it in time.
//
// A prompt costs no call of its own: the device prompts in the same configuration call that
// adds the peer, and only peers it adds (wireguard.Peer.Prompt).
func (a *Agent) applyPrompt(ctx context.Context, cfg wireguard.Config) (wireguard.PlanStats, error) {
	if (a.promptNext || len(a.promptKeys) > 0) && len(cfg.Peers) > 0 {
		prompted := slices.Clone(cfg.Peers)
		for i := range prompted {
			prompted[i].Prompt = a.promptNext || a.promptKeys[prompted[i].PublicKey]
		}
		cfg.Peers = prompted
	}
	st, err := a.applyWireGuard(ctx, cfg)
	if err == nil {
		a.promptNext, a.promptKeys = false, nil
	}
	return st, err
}

// waitForNode reads this node's Kubernetes Node, retrying until it exists or ctx ends.
func (a *Agent) waitForNode(ctx context.Context) (*corev1.Node, error) {
	backoff := 200 * time.Millisecond
	for {
		var node corev1.Node
		err := a.client.Get(ctx, client.ObjectKey{Name: a.opts.NodeName}, &node)
		if err == nil {
			return &node, nil
		}
		a.log.Warn("waiting for Node", "err", err)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("get node %s: %w", a.opts.NodeName, err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// startCache starts the informers and waits for their first sync. The cache holds objects
// without their managed fields, which nothing in the agent reads (a MeshNode's status of
// thousands of peers has a managed fields entry per peer), and Nodes reduced to what the
// agent reads of them (slimNode). Updates that change nothing a reconcile reads trigger none
// (nodeChanged, meshNodeChanged).
func (a *Agent) startCache(ctx context.Context) error {
	c, err := cache.New(a.opts.RESTConfig, cache.Options{
		Scheme:           a.scheme,
		DefaultTransform: cache.TransformStripManagedFields(),
		ByObject: map[client.Object]cache.ByObject{
			// The IPsec keyring only: RBAC lets the agent read this one Secret.
			&corev1.Secret{}: {
				Namespaces: map[string]cache.Config{a.opts.Namespace: {}},
				Field:      fields.OneTermEqualSelector("metadata.name", ipsec.SecretName),
			},
			&corev1.Node{}: {Transform: slimNode},
		},
	})
	if err != nil {
		return fmt.Errorf("create informer cache: %w", err)
	}
	a.cache = c
	handler := func(changed func(oldObj, newObj any) bool) toolscache.ResourceEventHandlerFuncs {
		return toolscache.ResourceEventHandlerFuncs{
			AddFunc: func(any) { a.kick() },
			UpdateFunc: func(oldObj, newObj any) {
				if changed == nil || changed(oldObj, newObj) {
					a.kick()
				}
			},
			DeleteFunc: func(any) { a.kick() },
		}
	}
	idInf, err := c.GetInformer(ctx, &v1alpha1.MeshIdentity{})
	if err != nil {
		return fmt.Errorf("informer for MeshIdentities: %w", err)
	}
	if _, err := idInf.AddEventHandler(identitykube.EventHandler(a.alloc, a.log)); err != nil {
		return fmt.Errorf("watch MeshIdentities: %w", err)
	}
	for _, w := range []struct {
		obj     client.Object
		changed func(oldObj, newObj any) bool
	}{
		{&v1alpha1.MeshNode{}, meshNodeChanged}, {&v1alpha1.MeshConfig{}, nil}, {&corev1.Node{}, nodeChanged},
		{&corev1.Pod{}, nil}, {&corev1.Namespace{}, nil}, {&v1alpha1.MeshPolicy{}, nil}, {&v1alpha1.MeshIdentity{}, nil},
		{&corev1.Secret{}, nil},
	} {
		inf, err := c.GetInformer(ctx, w.obj)
		if err != nil {
			return fmt.Errorf("informer for %T: %w", w.obj, err)
		}
		if _, err := inf.AddEventHandler(handler(w.changed)); err != nil {
			return fmt.Errorf("watch %T: %w", w.obj, err)
		}
	}
	nodeInf, err := c.GetInformer(ctx, &corev1.Node{})
	if err != nil {
		return fmt.Errorf("informer for Nodes: %w", err)
	}
	si, ok := nodeInf.(toolscache.SharedIndexInformer)
	if !ok {
		return fmt.Errorf("informer for Nodes is a %T, not a SharedIndexInformer", nodeInf)
	}
	a.nodeStore = si.GetStore()
	vInf, err := c.GetInformer(ctx, &v1alpha1.MeshVerification{})
	if err != nil {
		return fmt.Errorf("informer for MeshVerifications: %w", err)
	}
	if _, err := vInf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { a.onVerification(ctx, obj) },
		UpdateFunc: func(_, obj any) { a.onVerification(ctx, obj) },
	}); err != nil {
		return fmt.Errorf("watch MeshVerifications: %w", err)
	}
	go func() {
		if err := c.Start(ctx); err != nil {
			a.log.Error("informer cache stopped", "err", err)
		}
	}()
	if !c.WaitForCacheSync(ctx) {
		return fmt.Errorf("informer cache did not sync: %w", ctx.Err())
	}
	return nil
}

func (a *Agent) kick() {
	select {
	case a.trigger <- struct{}{}:
	default:
	}
}

// loop runs reconcile on every change, on the resync period, and after errors with backoff;
// and refreshes status on the status period.
func (a *Agent) loop(ctx context.Context) error {
	resync := time.NewTicker(a.opts.ResyncPeriod)
	defer resync.Stop()
	status := time.NewTicker(a.opts.StatusPeriod)
	defer status.Stop()
	var retry <-chan time.Time
	backoff := 200 * time.Millisecond
	a.kick()
	for {
		select {
		case <-ctx.Done():
			a.log.Info("agent stopping; device, peers and routes stay in place")
			return nil
		case <-a.trigger:
		case <-resync.C:
			a.routeState.invalidate()
		case <-retry:
		case <-status.C:
			err := a.publishStatus(ctx)
			if err == nil {
				continue
			}
			a.log.Warn("publish status", "err", err)
			if !errors.Is(err, wireguard.ErrDeviceGone) {
				continue
			}
			// The status read found the device gone: reconcile now, which recreates it.
		}
		start := time.Now()
		err := a.reconcile(ctx)
		a.rec.ObserveReconcile(time.Since(start), err)
		a.rec.SetMode(string(a.applied))
		if err == nil {
			a.ready.Store(true)
		}
		a.lastErr = err
		if perr := a.publishStatus(ctx); perr != nil {
			a.log.Warn("publish status", "err", perr)
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			a.log.Error("reconcile failed", "err", err, "retryIn", backoff)
			retry = time.After(backoff)
			backoff = min(2*backoff, 30*time.Second)
			continue
		}
		retry, backoff = nil, 200*time.Millisecond
	}
}

// reconcile drives the device, XFRM and routes to the desired state and publishes this node's
// MeshNode spec.
func (a *Agent) reconcile(ctx context.Context) error {
	start := time.Now()
	a.appliedView = nil
	var node corev1.Node
	if err := a.cache.Get(ctx, client.ObjectKey{Name: a.opts.NodeName}, &node); err != nil {
		return fmt.Errorf("get node: %w", err)
	}
	local, err := localFromNode(&node, a.opts.UnderlayIPs)
	if err != nil {
		return err
	}

	mode := v1alpha1.ModeDisabled
	var mc v1alpha1.MeshConfig
	switch err := a.cache.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); {
	case err == nil:
		if mc.Spec.Encryption.Mode != "" {
			mode = mc.Spec.Encryption.Mode
		}
	case apierrors.IsNotFound(err):
	default:
		return fmt.Errorf("get MeshConfig: %w", err)
	}
	// WireGuard's device read starts now, on its own goroutine: reading a userspace device is a
	// text dump of every peer and its parse (tens of milliseconds at 5000 peers), which
	// overlaps so with listing and validating the MeshNodes below.
	var devRead func() (*wgtypes.Device, error)
	if mode == v1alpha1.ModeWireGuard {
		devRead = a.readDeviceAsync(ctx)
	}

	// The MeshNodes are read straight from the informer cache, not deep-copied (one copy of
	// every object per reconcile was a fifth of a reconcile's CPU at 5000 nodes): they are
	// read-only here and in everything they are passed to. The Nodes' pod CIDRs come from the
	// informer's own objects, parsed again only for the Nodes that changed (podCIDRCache).
	var list v1alpha1.MeshNodeList
	if err := a.cache.List(ctx, &list, client.UnsafeDisableDeepCopy); err != nil {
		return fmt.Errorf("list MeshNodes: %w", err)
	}
	if err := a.rotateIfDue(ctx, mc.Spec.KeyRotation); err != nil {
		return err
	}
	if len(mc.Spec.RemoteClusters) > 0 || len(a.mesh.remotes) > 0 {
		a.syncRemotes(ctx, &mc)
	}
	remote := a.remoteSnapshot(ctx)
	// This cluster's nodes and the remote clusters' (named cluster/node): peers, routes
	// and the ipcache take both; IPsec, the identity of this node and status take only
	// this cluster's.
	allNodes := append(slices.Clip(list.Items), remote.nodes...)
	hostOn := a.nodeEncryption(mc.Spec.Encryption, &node, list.Items)
	if err := a.publishSpec(ctx, &node, local, list.Items, mode == v1alpha1.ModeIPsec && a.refused == nil); err != nil {
		return err
	}
	assigned := a.podCIDRs.update(a.nodeStore.List()) // read only
	peers, skips := peersFromMeshNodes(a.opts.NodeName, local, allNodes, assigned)
	var peerNames []string
	if mode == v1alpha1.ModeWireGuard {
		for _, p := range peers {
			peerNames = append(peerNames, p.Name)
		}
	}
	a.remoteStatus = remoteStatuses(remote, peerNames, skips)
	if mode != v1alpha1.ModeWireGuard {
		skips = nil // WireGuard's refusals do not concern the other modes
	}
	a.reportSkips(&list, skips)
	a.skips = skips
	nameByKey := make(map[wgtypes.Key]string, len(peers))
	for _, p := range peers {
		nameByKey[p.PublicKey] = p.Name
	}
	a.mu.Lock()
	a.nameByKey = nameByKey
	a.mu.Unlock()
	a.promptKeys = rotatedPeers(a.peers, peers, a.promptKeys)

	cfg := wireguard.Config{PrivateKey: a.key, ListenPort: a.opts.WireGuard.ListenPort, FirewallMark: int(a.firewallMark())}
	route := a.routeConfig()
	plan, err := a.planPolicy(ctx, remote.identities, mc.Spec.Policy)
	if err != nil {
		return err
	}
	plan.assigned = assigned
	var eps []v1alpha1.Endpoint
	if len(mc.Spec.RemoteClusters) > 0 { // only other clusters read them
		eps = localEndpoints(a.opts.NodeName, plan.pods)
	}
	plan.pods = append(plan.pods, remote.pods...)
	if !equality.Semantic.DeepEqual(eps, a.endpoints) {
		a.endpoints = eps
		if err := a.publishSpec(ctx, &node, local, list.Items, mode == v1alpha1.ModeIPsec && a.refused == nil); err != nil {
			return err
		}
	}
	strict := mode != v1alpha1.ModeDisabled && mc.Spec.Encryption.Strict
	var refused *refusal
	if mode == v1alpha1.ModeWireGuard && a.fipsMode() {
		refused = &refusal{Reason: "FIPSRefusesWireGuard", Message: "the node runs in FIPS mode and WireGuard's " +
			"ChaCha20-Poly1305 and Curve25519 are not FIPS-approved: use mode IPsec, whose AES-GCM (rfc4106(gcm(aes))) is; " +
			"pod traffic to remote nodes is dropped, never sent in clear"}
	}
	// A node still refusing this mode stays strict until the mode applies, or a packet could
	// slip out in clear between two reconciles.
	stillRefused := a.refused != nil && a.refusedMode == mode
	if strict || refused != nil || stillRefused {
		// Strict first: from here on a remote pod without a ready tunnel is unreachable.
		if err := a.clf.SetStrict(true); err != nil {
			return err
		}
		if mode == v1alpha1.ModeWireGuard {
			route.Blocked = blockedExcept(a.opts.NodeName, assigned, nil)
		}
	} else if err := a.clf.SetStrict(false); err != nil {
		// Off before any tunnel stops being ready, or everything to remote pods would drop.
		return err
	}
	a.appliedStrict = strict
	var wst wireguard.PlanStats
	var rst datapath.RouteStats
	switch {
	case refused != nil:
	case mode == v1alpha1.ModeWireGuard:
		// The classifier first stops calling a changing tunnel ready, so traffic that must
		// be encrypted is dropped rather than sent while it changes; then peers before
		// routes, so a route never points at a device without its peer; then the new
		// tunnels are called ready.
		cur, err := devRead()
		if err != nil && !errors.Is(err, wireguard.ErrDeviceGone) {
			return fmt.Errorf("read WireGuard device: %w", err)
		}
		route.Prefixes = routePrefixes(peers)
		host := withNodeAddresses(peers, list.Items, local, hostOn)
		peers = host.peers
		route.Prefixes = append(route.Prefixes, host.routes...)
		route.Sources = host.sources
		if err := a.applyPolicy(ctx, plan, allNodes, stillReady(cur, peers)); err != nil {
			return err
		}
		cfg.Peers = peers
		// cur was read at the start of this reconcile: the device plans against that read
		// (wireguard.SnapshotMaxAge) instead of reading every peer again.
		dev := a.dev
		if wst, err = a.applyDevice(ctx, cfg); err != nil {
			return fmt.Errorf("configure WireGuard peers: %w", err)
		}
		if cur != nil && a.dev == dev { // not a recreated device
			a.appliedView = &deviceView{cur: cur, peers: peers}
		}
		if rst, err = a.applyRoutes(ctx, route); err != nil {
			return fmt.Errorf("configure tunnel routes: %w", err)
		}
		a.mu.Lock()
		a.peers = peers
		a.mu.Unlock()
		if err := a.applyPolicy(ctx, plan, allNodes, readyNodes(peers)); err != nil {
			return err
		}
		if err := a.teardownIPsec(ctx, local, list.Items, assigned); err != nil {
			return err
		}
		if hostOn && !a.host.announced {
			// Applied: the other nodes may now route this node's addresses into their tunnels.
			a.host.announced = true
			a.log.Info("node encryption applied: announcing it", "peers", len(peers))
			if err := a.publishSpec(ctx, &node, local, list.Items, false); err != nil {
				return err
			}
		}
	case mode == v1alpha1.ModeIPsec:
		grace := DefaultRotationGracePeriod
		if c := mc.Spec.Encryption.IPsec; c != nil && c.RotationGracePeriod != nil && c.RotationGracePeriod.Duration >= 0 {
			grace = c.RotationGracePeriod.Duration
		}
		err := a.reconcileIPsec(ctx, ipsecInput{local: local, nodes: list.Items, assigned: assigned, plan: plan, strict: strict, grace: grace})
		if !errors.As(err, &refused) {
			if err != nil {
				return fmt.Errorf("apply IPsec: %w", err)
			}
			// Announce the SPIs now installed, so peers can switch to them.
			if err := a.publishSpec(ctx, &node, local, list.Items, true); err != nil {
				return err
			}
		}
	default:
		// No tunnel is ready any more before any goes: then routes before peers, so
		// traffic leaves the tunnel for the underlay routes first.
		if err := a.applyPolicy(ctx, plan, allNodes, nil); err != nil {
			return err
		}
		if rst, err = a.applyRoutes(ctx, route); err != nil {
			return fmt.Errorf("remove tunnel routes: %w", err)
		}
		if wst, err = a.applyDevice(ctx, cfg); err != nil {
			return fmt.Errorf("remove WireGuard peers: %w", err)
		}
		a.mu.Lock()
		a.peers = nil
		a.mu.Unlock()
		if err := a.teardownIPsec(ctx, local, list.Items, assigned); err != nil {
			return err
		}
	}
	if refused != nil {
		if err := a.reconcileRefused(ctx, plan, list.Items, local, assigned); err != nil {
			return err
		}
		if a.refused == nil || a.refused.Message != refused.Message {
			a.log.Warn("encryption mode refused", "mode", mode, "reason", refused.Reason, "err", refused.Message)
			a.recorder.Eventf(a.meshNodeRef(), corev1.EventTypeWarning, refused.Reason, "node %s refuses mode %s: %s", a.opts.NodeName, mode, refused.Message)
		}
	}
	if refused == nil && stillRefused {
		a.kick() // the refusal is over: the next reconcile lifts the strict hold
	}
	a.refused, a.refusedMode = refused, mode
	if a.applied != mode {
		by, at := mc.Annotations[v1alpha1.AnnotationChangedBy], mc.Annotations[v1alpha1.AnnotationChangedAt]
		a.log.Info("encryption mode applied", "mode", mode, "was", a.applied, "peers", len(a.peers), "strict", strict, "changed_by", by, "changed_at", at)
		if a.applied != "" {
			who := ""
			if by != "" {
				who = fmt.Sprintf(", changed by %s at %s", by, at)
			}
			a.recorder.Eventf(a.meshNodeRef(), corev1.EventTypeNormal, "ModeApplied", "node %s applied encryption mode %s (was %s%s)", a.opts.NodeName, mode, a.applied, who)
		}
		a.applied = mode
	}
	if wst != (wireguard.PlanStats{}) || rst != (datapath.RouteStats{}) {
		a.log.Info("reconciled", "peers", fmt.Sprintf("%+v", wst), "routes", fmt.Sprintf("%+v", rst), "took", time.Since(start))
	}
	return nil
}

// reconcileRefused holds the node in the state of a refused mode: strict classifier with no
// tunnel ready, a blackhole in front of every remote pod CIDR, no WireGuard peer and no
// IPsec state. Nothing to remote pods leaves, encrypted or not.
func (a *Agent) reconcileRefused(ctx context.Context, plan *policyPlan, nodes []v1alpha1.MeshNode, local localNode, assigned map[string][]netip.Prefix) error {
	if err := a.clf.SetStrict(true); err != nil {
		return err
	}
	if err := a.applyPolicy(ctx, plan, nodes, nil); err != nil {
		return err
	}
	route := a.routeConfig()
	route.Blocked = blockedExcept(a.opts.NodeName, assigned, nil)
	if _, err := a.applyRoutes(ctx, route); err != nil {
		return fmt.Errorf("block remote pod CIDRs: %w", err)
	}
	if err := a.removeWireGuardPeers(ctx); err != nil {
		return err
	}
	return a.teardownIPsec(ctx, local, nil, assigned)
}

// removeWireGuardPeers removes every peer from the WireGuard device (after the routes through
// it are gone).
func (a *Agent) removeWireGuardPeers(ctx context.Context) error {
	if _, err := a.applyDevice(ctx, wireguard.Config{PrivateKey: a.key, ListenPort: a.opts.WireGuard.ListenPort}); err != nil {
		return fmt.Errorf("remove WireGuard peers: %w", err)
	}
	a.mu.Lock()
	a.peers = nil
	a.mu.Unlock()
	return nil
}

// meshNodeRef is this node's MeshNode as the object of Events.
func (a *Agent) meshNodeRef() *v1alpha1.MeshNode {
	mn := &v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: a.opts.NodeName}}
	mn.SetGroupVersionKind(v1alpha1.GroupVersion.WithKind("MeshNode"))
	return mn
}

// publishSpec creates or updates this node's MeshNode so it announces the current key,
// addresses and pod CIDRs. The MeshNode is owned by the Node, so it goes when the Node goes.
//
// With ipsecOn it announces the node's IPsec node ID (picked here, moving off a collision)
// and the keyring SPIs installed. After an agent restart under the same boot the kernel
// still holds the states the previous process installed, so their SPIs stay announced.
func (a *Agent) publishSpec(ctx context.Context, node *corev1.Node, local localNode, nodes []v1alpha1.MeshNode, ipsecOn bool) error {
	want := meshNodeSpec(local, a.key.PublicKey(), a.opts.WireGuard.ListenPort, a.bootID)
	want.Endpoints = a.endpoints
	want.NodeEncryption = a.host.announced
	for _, h := range a.health {
		want.HealthIPs = append(want.HealthIPs, v1alpha1.IP(h.String()))
	}
	if !a.keyCreated.IsZero() {
		created := metav1.NewMicroTime(a.keyCreated.Truncate(time.Microsecond))
		want.WireGuard.KeyCreated = &created
	}
	var mn v1alpha1.MeshNode
	err := a.cache.Get(ctx, client.ObjectKey{Name: a.opts.NodeName}, &mn)
	if err == nil && !a.ips.applied && mn.Spec.IPsec != nil && mn.Spec.BootID == a.bootID && a.bootID != "" {
		a.ips.installed = reportedSPIs(&mn)
	}
	if ipsecOn || a.ips.active {
		var current int32
		if mn.Spec.IPsec != nil {
			current = mn.Spec.IPsec.NodeID
		}
		id := ipsecNodeID(a.opts.NodeName, mn.CreationTimestamp.Time, current, nodes)
		if a.ips.nodeID != 0 && id != a.ips.nodeID {
			a.log.Warn("IPsec node ID collision: moving", "from", a.ips.nodeID, "to", id)
			a.ips.installed, a.ips.applied = nil, false // states keyed to the old ID are useless
		}
		a.ips.nodeID = id
	}
	want.IPsec = a.ipsecSpec(ipsecOn)
	if apierrors.IsNotFound(err) {
		mn = v1alpha1.MeshNode{
			ObjectMeta: metav1.ObjectMeta{
				Name: a.opts.NodeName,
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID,
				}},
			},
			Spec: want,
		}
		if err := a.client.Create(ctx, &mn); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create MeshNode: %w", err)
		}
		a.log.Info("MeshNode created", "fingerprint", wireguard.Fingerprint(a.key.PublicKey()))
		return nil
	}
	if err != nil {
		return fmt.Errorf("get MeshNode: %w", err)
	}
	if equality.Semantic.DeepEqual(mn.Spec, want) {
		return nil
	}
	patch := client.MergeFrom(mn.DeepCopy())
	mn.Spec = want
	if err := a.client.Patch(ctx, &mn, patch); err != nil {
		return fmt.Errorf("update MeshNode: %w", err)
	}
	a.log.Info("MeshNode updated", "fingerprint", wireguard.Fingerprint(a.key.PublicKey()))
	return nil
}

// reportSkips logs and records an Event for every refused MeshNode, once per change.
func (a *Agent) reportSkips(list *v1alpha1.MeshNodeList, skips []skip) {
	var b strings.Builder
	for _, s := range skips {
		fmt.Fprintf(&b, "%s: %s\n", s.Node, s.Reason)
	}
	if b.String() == a.lastSkips {
		return
	}
	a.lastSkips = b.String()
	byName := map[string]*v1alpha1.MeshNode{}
	for i := range list.Items {
		byName[list.Items[i].Name] = &list.Items[i]
	}
	for _, s := range skips {
		if s.Pending {
			a.log.Info("peer not ready", logPeer, s.Node, "reason", s.Reason)
			continue
		}
		a.log.Warn("peer refused", logPeer, s.Node, "reason", s.Reason)
		if mn := byName[s.Node]; mn != nil {
			a.recorder.Eventf(mn, corev1.EventTypeWarning, "PeerRefused", "node %s refused this MeshNode: %s", a.opts.NodeName, s.Reason)
		} else if isRemote(s.Node) {
			a.recorder.Eventf(a.meshNodeRef(), corev1.EventTypeWarning, "RemoteNodeRefused", "node %s refused remote node %s: %s", a.opts.NodeName, s.Node, s.Reason)
		}
	}
}

// publishStatus writes this node's MeshNode status when it changed.
//
// The cached MeshNode is read without a deep copy (its status lists every peer) and left
// unmodified: st is a copy of its status whose every field is replaced below, but for the
// conditions, which are cloned. The status is written whole, in one JSON patch that replaces
// it, instead of a merge patch computed from two encodings of the whole object, and the
// answer is not decoded.
func (a *Agent) publishStatus(ctx context.Context) error {
	var mn v1alpha1.MeshNode
	if err := a.cache.Get(ctx, client.ObjectKey{Name: a.opts.NodeName}, &mn, client.UnsafeDisableDeepCopy); err != nil {
		return fmt.Errorf("get MeshNode: %w", err)
	}
	stv := mn.Status
	st := &stv
	st.Conditions = slices.Clone(mn.Status.Conditions) // setConditions modifies them in place
	st.Mode = a.applied
	st.Strict = a.appliedStrict
	st.Backend = v1alpha1.WireGuardBackend(a.dev.Backend())
	st.TunnelMTU = int32(a.mtu)
	st.MonitorAddress = a.monitorAddress(mn.Spec.UnderlayIPs)
	st.IPsec = nil
	if a.attachMode != datapath.AttachAuto {
		st.AttachMode = a.attachMode.String()
	}
	st.RemoteClusters = a.remoteStatus
	st.Peers = nil
	st.PeersReady = 0
	view := a.appliedView
	a.appliedView = nil
	switch {
	case len(a.peers) > 0 && view != nil:
		// Right after a reconcile that read every peer and applied: no second read.
		st.Peers = peerStatusesAfter(view.cur, view.peers)
	case len(a.peers) > 0:
		dev, err := a.dev.Device(ctx)
		if err != nil {
			return fmt.Errorf("read WireGuard device: %w", err)
		}
		st.Peers = peerStatuses(dev, a.nameByKey)
	}
	if len(a.peers) > 0 {
		want := map[string]wireguard.Peer{}
		for _, p := range a.peers {
			want[p.Name] = p
		}
		for _, ps := range st.Peers {
			if p, ok := want[ps.Node]; ok && p.PublicKey.String() == ps.PublicKey {
				st.PeersReady++
			}
		}
	}
	peers := len(a.peers)
	if a.applied == v1alpha1.ModeIPsec && a.refused == nil && a.ips.active {
		ist, ps, err := a.ipsecStatus(ctx)
		if err != nil {
			return fmt.Errorf("read IPsec status: %w", err)
		}
		st.IPsec, st.Peers, st.PeersReady = ist, ps, int32(len(ps))
		peers = len(a.ips.remotes) - len(a.ips.skipped)
		if k, ok := a.ips.keyring.Key(a.ips.outbound); ok {
			st.TunnelMTU = int32(ipsec.TunnelMTU(a.underlayMTU, k, a.underlay6))
		}
	}
	setConditions(st, conditionInput{
		mode: a.applied, refused: a.refused, lastErr: a.lastErr, peers: peers, ready: int(st.PeersReady),
		skips: a.skips, ipsecSkipped: a.ips.skipped, badKeys: a.ips.badKeys, badPolicies: a.policySkipped, badPods: a.badPods,
	})
	if equality.Semantic.DeepEqual(&mn.Status, st) {
		return nil
	}
	patch, err := json.Marshal([]jsonPatchOp{{Op: "add", Path: "/status", Value: st}})
	if err != nil {
		return fmt.Errorf("encode MeshNode status: %w", err)
	}
	// The answer is the object's metadata only: the whole object would be as large as the
	// status just sent, for nothing (the informer brings it anyway).
	out := &metav1.PartialObjectMetadata{ObjectMeta: metav1.ObjectMeta{Name: mn.Name}}
	out.SetGroupVersionKind(v1alpha1.GroupVersion.WithKind("MeshNode"))
	if err := a.client.Status().Patch(ctx, out, client.RawPatch(types.JSONPatchType, patch)); err != nil {
		return fmt.Errorf("update MeshNode status: %w", err)
	}
	return nil
}

// jsonPatchOp is one operation of a JSON patch (RFC 6902). "add" on an object member that
// exists replaces it.
type jsonPatchOp struct {
	Op    string `json:"op"`
	Path  string `json:"path"`
	Value any    `json:"value"`
}

// conditionInput is what the MeshNode conditions are computed from.
type conditionInput struct {
	mode         v1alpha1.EncryptionMode
	refused      *refusal
	lastErr      error
	peers, ready int
	skips        []skip
	ipsecSkipped []ipsec.Skipped
	badKeys      string
	badPolicies  []string
	badPods      []string
}

// setConditions sets Ready, Encrypted and Degraded on st.
func setConditions(st *v1alpha1.MeshNodeStatus, in conditionInput) {
	cond := func(t string, ok bool, reason, msg string) {
		s := metav1.ConditionFalse
		if ok {
			s = metav1.ConditionTrue
		}
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: t, Status: s, Reason: reason, Message: msg})
	}
	switch {
	case in.lastErr != nil:
		cond(v1alpha1.ConditionReady, false, "ReconcileFailed", in.lastErr.Error())
	case in.refused != nil:
		cond(v1alpha1.ConditionReady, false, in.refused.Reason, fmt.Sprintf("mode %s refused: %s", in.mode, in.refused.Message))
	default:
		cond(v1alpha1.ConditionReady, true, "Reconciled", fmt.Sprintf("mode %s applied", in.mode))
	}
	switch {
	case in.mode == v1alpha1.ModeDisabled || in.mode == "":
		cond(v1alpha1.ConditionEncrypted, false, "EncryptionDisabled", "encryption mode is "+string(v1alpha1.ModeDisabled))
	case in.refused != nil:
		cond(v1alpha1.ConditionEncrypted, false, in.refused.Reason, in.refused.Message)
	case in.lastErr != nil:
		cond(v1alpha1.ConditionEncrypted, false, "ReconcileFailed", in.lastErr.Error())
	case in.ready < in.peers:
		cond(v1alpha1.ConditionEncrypted, false, "PeersPending", fmt.Sprintf("%d of %d peers configured", in.ready, in.peers))
	default:
		cond(v1alpha1.ConditionEncrypted, true, "AllPeersConfigured", fmt.Sprintf("%d peers configured", in.peers))
	}
	var refused []string
	for _, s := range in.skips {
		if !s.Pending {
			refused = append(refused, s.Node+": "+s.Reason)
		}
	}
	for _, s := range in.ipsecSkipped {
		refused = append(refused, s.Node+": "+s.Reason)
	}
	switch {
	case len(refused) > 0:
		cond(v1alpha1.ConditionDegraded, true, "PeersRefused", strings.Join(refused, "; "))
	case in.badKeys != "":
		cond(v1alpha1.ConditionDegraded, true, "KeyringRefused", in.badKeys+"; the last valid keyring stays in use")
	case len(in.badPolicies) > 0:
		cond(v1alpha1.ConditionDegraded, true, "PoliciesSkipped", strings.Join(in.badPolicies, "; "))
	case len(in.badPods) > 0:
		cond(v1alpha1.ConditionDegraded, true, "PodsWithoutIdentity", strings.Join(in.badPods, "; "))
	default:
		cond(v1alpha1.ConditionDegraded, false, "AsExpected", "no peer, key, policy or pod refused")
	}
}

// underlayLinkMTU finds the interface holding one of the underlay addresses (the first that
// one holds) and returns its MTU and name.
func underlayLinkMTU(h *netlink.Handle, underlay []netip.Addr) (int, string, error) {
	links, _, err := underlayLinks(h, underlay)
	if err != nil {
		return 0, "", err
	}
	if len(links) == 0 {
		return 0, "", fmt.Errorf("no interface holds an underlay address %v", underlay)
	}
	return links[0].Attrs().MTU, links[0].Attrs().Name, nil
}

// underlayLinks returns the interfaces holding the underlay addresses, in the addresses'
// order and each once, and the addresses no interface holds.
func underlayLinks(h *netlink.Handle, underlay []netip.Addr) (links []netlink.Link, missing []netip.Addr, err error) {
	addrs, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, nil, fmt.Errorf("list addresses: %w", err)
	}
	for _, want := range underlay {
		i := slices.IndexFunc(addrs, func(ad netlink.Addr) bool {
			ip, ok := netip.AddrFromSlice(ad.IP)
			return ok && ip.Unmap() == want
		})
		if i < 0 {
			missing = append(missing, want)
			continue
		}
		l, err := h.LinkByIndex(addrs[i].LinkIndex)
		if err != nil {
			return nil, nil, fmt.Errorf("link of underlay address %s: %w", want, err)
		}
		if !slices.ContainsFunc(links, func(o netlink.Link) bool { return o.Attrs().Index == l.Attrs().Index }) {
			links = append(links, l)
		}
	}
	return links, missing, nil
}
