package datapath

import (
	"github.com/meshcrypt/meshcrypt/internal/netnsutil"

	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// How the classifier is attached, and why it keeps classifying while the agent restarts:
//
//   - TCX (Linux 6.6+): a BPF link per interface and direction. A link lives as long as a
//     file descriptor or a bpffs pin refers to it. With ClassifierOptions.PinPath each link is
//     pinned at <PinPath>/links/tcx_<iface>_<program>; an exiting agent leaves it attached
//     (with the pinned maps it uses), and the next agent's Attach opens the pin and swaps in
//     its freshly loaded program atomically (BPF_LINK_UPDATE): no moment without a classifier,
//     and no second copy. Without a PinPath the links close with the Classifier: fine for
//     tests, wrong for an agent.
//   - tc (clsact + cls_bpf, direct action): filters live in the interface's qdisc, not in the
//     process, so they persist without a PinPath too. Attach replaces our filter (fixed
//     priority and handle) atomically, never adds a second one.
//
// The kernel resolves a TCX link's interface index in the network namespace of the thread
// that creates it, so TCX links are created from an OS thread switched into Netns.NS; tc
// filters only need the netlink handle.

// AttachMode says how the programs are attached.
type AttachMode int

// The attach modes.
const (
	// AttachAuto uses TCX where the kernel has it and falls back to tc.
	AttachAuto AttachMode = iota
	// AttachTCX uses TCX links only; on kernels before 6.6 Attach fails with ErrNotSupported.
	AttachTCX
	// AttachTC uses a clsact qdisc with cls_bpf filters in direct-action mode.
	AttachTC
)

// String returns "auto", "tcx" or "tc" (MeshNode.status reports the latter two).
func (m AttachMode) String() string {
	switch m {
	case AttachAuto:
		return "auto"
	case AttachTCX:
		return "tcx"
	case AttachTC:
		return "tc"
	}
	return fmt.Sprintf("AttachMode(%d)", int(m))
}

// Netns is the network namespace holding the interfaces to attach to: a netlink handle bound
// to it (interface lookups, tc qdiscs and filters) and the namespace itself (TCX links are
// created from a thread inside it). An agent running in the node's namespace passes
// netlink.NewHandle() and netns.Get().
type Netns struct {
	// Handle is a netlink handle bound to the namespace.
	Handle *netlink.Handle
	// NS is the namespace (an open file descriptor of it).
	NS netns.NsHandle
}

// The tc filter the classifier installs, in both directions: first in line (priority 1), with
// a handle of its own so that it replaces only itself.
const (
	tcPriority = 1
	tcHandle   = 0x6d63 // "mc"
)

type hook struct {
	prog     string // program name, also in pin and filter names
	tcx      ebpf.AttachType
	tcParent uint32
}

var hooks = [2]hook{
	{prog: "from_pod", tcx: ebpf.AttachTCXIngress, tcParent: netlink.HANDLE_MIN_INGRESS},
	{prog: "to_pod", tcx: ebpf.AttachTCXEgress, tcParent: netlink.HANDLE_MIN_EGRESS},
}

func (c *Classifier) program(h hook) *ebpf.Program {
	if h.prog == "from_pod" {
		return c.objs.FromPod
	}
	return c.objs.ToPod
}

// linkKey names a TCX link this process holds.
type linkKey struct {
	ns    string // netns.NsHandle.UniqueId()
	iface string
	prog  string
}

// Attach attaches from_pod at ingress and to_pod at egress of iface (a local pod's host-side
// interface) in ns, and returns the mode used. AttachAuto tries TCX and falls back to tc when
// the kernel lacks TCX. Attach is idempotent: attaching again replaces the programs in place
// (with this Classifier's, atomically), and switching modes removes the other mode's
// attachment after the new one is in place. When pods go away, call Prune to release the
// links of vanished interfaces. Safe for concurrent use.
func (c *Classifier) Attach(ns Netns, iface string, mode AttachMode) (AttachMode, error) {
	l, err := ns.Handle.LinkByName(iface)
	if err != nil {
		return mode, fmt.Errorf("find interface %s: %w", iface, err)
	}
	c.linksMu.Lock()
	defer c.linksMu.Unlock()
	if mode == AttachAuto && c.noTCX {
		mode = AttachTC
	}
	switch mode {
	case AttachAuto, AttachTCX:
		err := c.attachTCX(ns, iface, l.Attrs().Index)
		if err == nil {
			return AttachTCX, c.detachTC(ns.Handle, l)
		}
		if mode == AttachTCX || !errors.Is(err, ebpf.ErrNotSupported) {
			return AttachTCX, err
		}
		c.noTCX = true
		c.log.Info("kernel has no TCX, attaching with tc from now on", "iface", iface, "err", err)
		fallthrough
	case AttachTC:
		if err := c.attachTC(ns.Handle, l); err != nil {
			return AttachTC, err
		}
		return AttachTC, c.detachTCX(ns, iface)
	}
	return mode, fmt.Errorf("attach %s: unknown mode %s", iface, mode)
}

// Detach removes the classifier from iface in ns, in whichever mode it is attached (TCX links
// of this Classifier or pinned under its PinPath, and its tc filters). Detaching an interface
// that is gone or has nothing attached succeeds. Safe for concurrent use.
func (c *Classifier) Detach(ns Netns, iface string) error {
	c.linksMu.Lock()
	defer c.linksMu.Unlock()
	err := c.detachTCX(ns, iface)
	l, lerr := ns.Handle.LinkByName(iface)
	if lerr != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(lerr, &nf) {
			return err // the interface took its filters with it
		}
		return errors.Join(err, fmt.Errorf("find interface %s: %w", iface, lerr))
	}
	return errors.Join(err, c.detachTC(ns.Handle, l))
}

// Prune releases the TCX links whose interface is gone (its pod was deleted), with their
// pins, and returns how many it released. Such a link classifies nothing but holds kernel
// memory and, pinned, outlives every agent. Prune never touches a live attachment, so unlike
// Detach it is safe when a new pod already reuses the interface name. tc filters need no
// pruning: they go with their interface. Safe for concurrent use.
func (c *Classifier) Prune() (int, error) {
	c.linksMu.Lock()
	defer c.linksMu.Unlock()
	n := 0
	for k, l := range c.links {
		if tcxLinkDefunct(l) {
			c.dropLink(k, l)
			n++
		}
	}
	if c.pinPath == "" {
		return n, nil
	}
	dir := filepath.Join(c.pinPath, "links")
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return n, nil
	}
	if err != nil {
		return n, fmt.Errorf("list pinned links: %w", err)
	}
	var errs []error
	for _, e := range ents {
		path := filepath.Join(dir, e.Name())
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("open pinned link %s: %w", path, err))
			continue
		}
		if tcxLinkDefunct(l) {
			if err := l.Unpin(); err != nil {
				errs = append(errs, fmt.Errorf("unpin %s: %w", path, err))
			} else {
				n++
			}
		}
		l.Close()
	}
	return n, errors.Join(errs...)
}

// tcxLinkDefunct reports whether l is a TCX link whose interface is gone.
func tcxLinkDefunct(l link.Link) bool {
	info, err := l.Info()
	return err == nil && info.TCX() != nil && info.TCX().Ifindex == 0
}

func (c *Classifier) pinnedLinkPath(iface string, h hook) string {
	if c.pinPath == "" {
		return ""
	}
	return filepath.Join(c.pinPath, "links", "tcx_"+iface+"_"+h.prog)
}

func (c *Classifier) attachTCX(ns Netns, iface string, ifindex int) error {
	nsID := ns.NS.UniqueId()
	for _, h := range hooks {
		key := linkKey{ns: nsID, iface: iface, prog: h.prog}
		prog := c.program(h)
		pin := c.pinnedLinkPath(iface, h)

		l := c.links[key]
		if l == nil && pin != "" {
			pl, err := link.LoadPinnedLink(pin, nil)
			switch {
			case err == nil:
				l = pl
			case !errors.Is(err, os.ErrNotExist):
				return fmt.Errorf("open pinned link %s: %w", pin, err)
			}
		}
		if l != nil {
			// Reuse the link only while it is on this very interface: once the interface
			// is gone the link is defunct (ifindex 0), and a new pod may reuse the name.
			if tcxLinkOn(l, ifindex, h.tcx) {
				if err := l.Update(prog); err != nil {
					return fmt.Errorf("replace %s on %s: %w", h.prog, iface, err)
				}
				c.links[key] = l
				continue
			}
			c.dropLink(key, l)
		}

		var nl link.Link
		err := inNetns(ns.NS, func() error {
			var err error
			// First in line, as the tc filter is (priority 1): policy must not depend on
			// what programs attached before it decide.
			nl, err = link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: h.tcx, Anchor: link.Head()})
			return err
		})
		if err != nil {
			return fmt.Errorf("attach tcx %s on %s: %w", h.prog, iface, err)
		}
		if pin != "" {
			if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
				nl.Close()
				return fmt.Errorf("create link pin directory: %w", err)
			}
			if err := nl.Pin(pin); err != nil {
				nl.Close()
				return fmt.Errorf("pin tcx link %s: %w", pin, err)
			}
		}
		c.links[key] = nl
	}
	return nil
}

// tcxLinkOn reports whether l is a live TCX link on ifindex (in the caller's namespace) with
// the given attach type.
func tcxLinkOn(l link.Link, ifindex int, typ ebpf.AttachType) bool {
	info, err := l.Info()
	if err != nil || info.TCX() == nil {
		return false
	}
	return int(info.TCX().Ifindex) == ifindex && ebpf.AttachType(info.TCX().AttachType) == typ
}

// dropLink detaches a link: unpinned and closed, nothing refers to it any more.
func (c *Classifier) dropLink(key linkKey, l link.Link) {
	if err := l.Unpin(); err != nil {
		c.log.Warn("unpin tcx link", "iface", key.iface, "err", err)
	}
	l.Close()
	delete(c.links, key)
}

func (c *Classifier) detachTCX(ns Netns, iface string) error {
	nsID := ns.NS.UniqueId()
	for _, h := range hooks {
		key := linkKey{ns: nsID, iface: iface, prog: h.prog}
		if l := c.links[key]; l != nil {
			c.dropLink(key, l)
			continue
		}
		pin := c.pinnedLinkPath(iface, h)
		if pin == "" {
			continue
		}
		l, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("open pinned link %s: %w", pin, err)
		}
		c.dropLink(key, l)
	}
	return nil
}

func (c *Classifier) attachTC(h *netlink.Handle, l netlink.Link) error {
	name := l.Attrs().Name
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: l.Attrs().Index,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	if err := h.QdiscAdd(qdisc); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add clsact qdisc on %s: %w", name, err)
	}
	for _, hk := range hooks {
		f := tcFilter(l, hk)
		f.Fd = c.program(hk).FD()
		f.Name = "meshcrypt_" + hk.prog
		f.DirectAction = true
		if err := h.FilterReplace(f); err != nil {
			return fmt.Errorf("attach tc %s on %s: %w", hk.prog, name, err)
		}
	}
	return nil
}

func tcFilter(l netlink.Link, hk hook) *netlink.BpfFilter {
	return &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{
		LinkIndex: l.Attrs().Index,
		Parent:    hk.tcParent,
		Handle:    tcHandle,
		Priority:  tcPriority,
		Protocol:  unix.ETH_P_ALL,
	}}
}

// detachTC deletes our tc filters; the clsact qdisc stays (others may use it).
func (c *Classifier) detachTC(h *netlink.Handle, l netlink.Link) error {
	for _, hk := range hooks {
		err := h.FilterDel(tcFilter(l, hk))
		// ENOENT: no such filter; EINVAL: no clsact qdisc at all.
		if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("detach tc %s on %s: %w", hk.prog, l.Attrs().Name, err)
		}
	}
	return nil
}

// inNetns runs fn on an OS thread switched into ns (see netnsutil.Do: no setns when the
// thread is already there, so the agent in its node's namespace needs no CAP_SYS_ADMIN).
func inNetns(ns netns.NsHandle, fn func() error) error { return netnsutil.Do(ns, fn) }
