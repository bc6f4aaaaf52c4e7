package netenv

import (
	"github.com/meshcrypt/meshcrypt/internal/netnsutil"

	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where `ip netns` keeps named namespaces.
const netnsDir = "/run/netns"

// NS is a named network namespace of a Topology. Its methods are safe for
// concurrent use.
type NS struct {
	// Name is the namespace's name, as `ip netns list` shows it.
	Name string
	// Path is the bind mount that keeps the namespace alive: /run/netns/<Name>.
	Path string

	mu      sync.Mutex
	closers map[io.Closer]struct{} // forwarders, closed with the namespace
}

func newNS(name string) *NS {
	return &NS{Name: name, Path: filepath.Join(netnsDir, name), closers: map[io.Closer]struct{}{}}
}

// String returns the namespace's name.
func (ns *NS) String() string { return ns.Name }

// Do runs fn on a goroutine locked to an OS thread that is switched into the
// namespace, and returns fn's error. Sockets fn creates stay in the namespace
// after Do returns, so they may be used from any goroutine. Goroutines fn starts
// run in the caller's namespace, not in ns. The thread is switched back
// afterwards; if that fails it is discarded, never reused.
func (ns *NS) Do(fn func() error) error {
	target, err := netns.GetFromPath(ns.Path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", ns.Name, err)
	}
	defer target.Close()
	if err := netnsutil.Do(target, fn); err != nil {
		return fmt.Errorf("in netns %s: %w", ns.Name, err)
	}
	return nil
}

// Handle returns a netlink handle whose sockets live in the namespace. The
// caller closes it.
func (ns *NS) Handle() (*netlink.Handle, error) {
	var h *netlink.Handle
	err := ns.Do(func() error {
		var err error
		h, err = netlink.NewHandle()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netlink handle in %s: %w", ns.Name, err)
	}
	return h, nil
}

// Command returns a command that runs name inside the namespace through
// `ip netns exec`. The process is killed when ctx is done, and by
// Topology.Close at the latest.
func (ns *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, ipBinary(), append([]string{"netns", "exec", ns.Name, name}, args...)...)
}

// ipBinary finds iproute2's ip, also when PATH lacks the sbin directories.
func ipBinary() string {
	if p, err := exec.LookPath("ip"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "ip"
}

// parseAddrPort parses an IP literal with a port. Host names are refused: their
// resolution could open sockets on threads outside the namespace.
func parseAddrPort(addr string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return ap, fmt.Errorf("address %q: want ip:port with an IP literal: %w", addr, err)
	}
	return ap, nil
}

// ListenTCP listens on addr (an IP literal and port, "[::]:80" is dual-stack)
// inside the namespace.
func (ns *NS) ListenTCP(addr string) (*net.TCPListener, error) {
	ap, err := parseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	var ln *net.TCPListener
	err = ns.Do(func() error {
		ln, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen tcp %s in %s: %w", addr, ns.Name, err)
	}
	return ln, nil
}

// ListenUDP opens a UDP socket bound to addr inside the namespace.
func (ns *NS) ListenUDP(addr string) (*net.UDPConn, error) {
	ap, err := parseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	var c *net.UDPConn
	err = ns.Do(func() error {
		c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen udp %s in %s: %w", addr, ns.Name, err)
	}
	return c, nil
}

// DialTCP connects to addr from inside the namespace.
func (ns *NS) DialTCP(ctx context.Context, addr string) (*net.TCPConn, error) {
	ap, err := parseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	var c net.Conn
	err = ns.Do(func() error {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", ap.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial tcp %s from %s: %w", addr, ns.Name, err)
	}
	return c.(*net.TCPConn), nil
}

// DialUDP opens a UDP socket connected to addr inside the namespace.
func (ns *NS) DialUDP(addr string) (*net.UDPConn, error) {
	ap, err := parseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	var c *net.UDPConn
	err = ns.Do(func() error {
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(ap))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial udp %s from %s: %w", addr, ns.Name, err)
	}
	return c, nil
}

// track registers c to be closed with the namespace.
func (ns *NS) track(c io.Closer) {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	ns.closers[c] = struct{}{}
}

func (ns *NS) untrack(c io.Closer) {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	delete(ns.closers, c)
}

// closeTracked closes everything registered with track.
func (ns *NS) closeTracked() {
	ns.mu.Lock()
	cs := make([]io.Closer, 0, len(ns.closers))
	for c := range ns.closers {
		cs = append(cs, c)
	}
	clear(ns.closers)
	ns.mu.Unlock()
	for _, c := range cs {
		c.Close()
	}
}

// setSysctls writes sysctls ("net.ipv4.ip_forward" -> "1") inside the namespace,
// in the order given.
func (ns *NS) setSysctls(kv ...string) error {
	return ns.Do(func() error {
		for i := 0; i+1 < len(kv); i += 2 {
			p := "/proc/sys/" + strings.ReplaceAll(kv[i], ".", "/")
			if err := os.WriteFile(p, []byte(kv[i+1]), 0o644); err != nil {
				return fmt.Errorf("sysctl %s=%s in %s: %w", kv[i], kv[i+1], ns.Name, err)
			}
		}
		return nil
	})
}

// setLoopbackUp brings lo up inside the namespace.
func setLoopbackUp(h *netlink.Handle) error {
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("set lo up: %w", err)
	}
	return nil
}

// netnsDirMu serialises the one-time setup of /run/netns in this process.
var (
	netnsDirMu    sync.Mutex
	netnsDirReady bool
)

// prepareNetnsDir creates /run/netns and makes it a shared mount, as
// `ip netns add` does, so namespaces created later also appear inside the
// mount namespaces of running `ip netns exec` children.
func prepareNetnsDir() error {
	netnsDirMu.Lock()
	defer netnsDirMu.Unlock()
	if netnsDirReady {
		return nil
	}
	unlock, err := lockStateDir()
	if err != nil {
		return err
	}
	defer unlock()
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", netnsDir, err)
	}
	bound := false
	for {
		err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EINVAL) || bound {
			return fmt.Errorf("make %s a shared mount: %w", netnsDir, err)
		}
		// Not a mount point yet: bind it onto itself first.
		if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind mount %s: %w", netnsDir, err)
		}
		bound = true
	}
	netnsDirReady = true
	return nil
}

// createNamedNS creates a new network namespace bound at /run/netns/<name>.
// It fails if the name exists. The calling thread's namespace is unchanged.
func createNamedNS(name string) (*NS, error) {
	if err := prepareNetnsDir(); err != nil {
		return nil, err
	}
	ns := newNS(name)
	f, err := os.OpenFile(ns.Path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	f.Close()
	err = netnsutil.OnLockedThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare: %w", err)
		}
		self := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		if err := unix.Mount(self, ns.Path, "none", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind mount: %w", err)
		}
		return nil
	})
	if err != nil {
		os.Remove(ns.Path)
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	return ns, nil
}

// deleteNamedNS unmounts and removes /run/netns/<name>. The namespace itself
// goes away once no process, socket or open file refers to it. A missing or
// unmounted entry is not an error.
func deleteNamedNS(name string) error {
	p := filepath.Join(netnsDir, name)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", name, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", name, err)
	}
	return nil
}

// listNamedNS returns the names in /run/netns that belong to prefix: "<prefix>-…".
func listNamedNS(prefix string) ([]string, error) {
	ents, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", netnsDir, err)
	}
	var names []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			names = append(names, e.Name())
		}
	}
	return names, nil
}
