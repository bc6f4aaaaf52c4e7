//go:build linux

package wireguard

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Compile-time checks that both backends implement Device.
var (
	_ Device = (*kernelDevice)(nil)
	_ Device = (*userspaceDevice)(nil)
)

// Ensure returns the WireGuard device opts.Name in the node's network
// namespace, creating it if needed, with opts.MTU set and the link up. It is
// idempotent and never disturbs a running device's keys or peers:
//
//  1. an existing kernel WireGuard link with the name is adopted;
//  2. else an existing userspace device (its UAPI socket answers and its TUN
//     link is in this namespace) is adopted, process and all;
//  3. else, for BackendAuto and BackendKernel, a kernel WireGuard link is
//     created; if the kernel lacks WireGuard, BackendKernel fails with an
//     error wrapping [ErrNotSupported] and BackendAuto falls back;
//  4. else the userspace device process is started with
//     opts.DeviceCommand and awaited until it answers.
//
// An existing device of the other backend than a forced one fails with
// [ErrBackendMismatch]. A UAPI socket that answers for a device whose link is
// not in this namespace (a name clash between namespaces) is an error.
// The returned Device must be closed; closing it leaves the device running.
func Ensure(ctx context.Context, opts EnsureOptions) (_ Device, err error) {
	if err := validateName(opts.Name); err != nil {
		return nil, err
	}
	backend, err := ParseBackend(string(opts.Backend))
	if err != nil {
		return nil, err
	}
	if opts.MTU != 0 && (opts.MTU < 576 || opts.MTU > 65535) {
		return nil, fmt.Errorf("ensure WireGuard device %s: MTU %d out of range", opts.Name, opts.MTU)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With(logKeyIface, opts.Name)

	base := &wgDevice{name: opts.Name, nl: opts.Netlink, log: log}
	if base.nl == nil {
		if base.nl, err = openHandle(opts.NetNS); err != nil {
			return nil, fmt.Errorf("ensure WireGuard device %s: %w", opts.Name, err)
		}
		base.ownNL = true
	}
	if err := inNetNS(opts.NetNS, func() (err error) {
		base.wg, err = wgctrl.New()
		return err
	}); err != nil {
		base.Close()
		return nil, fmt.Errorf("ensure WireGuard device %s: open wgctrl: %w", opts.Name, err)
	}
	defer func() {
		if err != nil {
			base.Close()
		}
	}()

	d, err := ensure(ctx, base, backend, opts)
	if err != nil {
		return nil, fmt.Errorf("ensure WireGuard device %s: %w", opts.Name, err)
	}
	if err := base.setLink(opts.MTU); err != nil {
		return nil, fmt.Errorf("ensure WireGuard device %s: %w", opts.Name, err)
	}
	return d, nil
}

// ensure is Ensure's adopt-or-create decision.
func ensure(ctx context.Context, base *wgDevice, backend Backend, opts EnsureOptions) (Device, error) {
	log := base.log
	link, err := base.link()
	if err != nil {
		return nil, err
	}
	if link != nil {
		switch link.Type() {
		case "wireguard":
			if backend == BackendUserspace {
				return nil, fmt.Errorf("%w: link is kernel WireGuard, userspace was requested", ErrBackendMismatch)
			}
			if _, err := base.wg.Device(base.name); err != nil {
				return nil, fmt.Errorf("adopt kernel device: wgctrl cannot see it (is NetNS the link's namespace?): %w", err)
			}
			log.Info("adopted existing WireGuard device", logKeyBackend, BackendKernel)
			return &kernelDevice{base}, nil
		case "tuntap":
			pid, ok, err := probeUAPI(base.name)
			if err != nil {
				return nil, err
			}
			if !ok {
				return nil, fmt.Errorf("link exists (type tuntap) but no WireGuard device answers on %s", UAPISocketPath(base.name))
			}
			if backend == BackendKernel {
				return nil, fmt.Errorf("%w: link is a userspace device (pid %d), kernel was requested", ErrBackendMismatch, pid)
			}
			if err := base.checkUserspace(); err != nil {
				return nil, fmt.Errorf("adopt userspace device: %w", err)
			}
			log.Info("adopted existing WireGuard device", logKeyBackend, BackendUserspace, logKeyPID, pid)
			return &userspaceDevice{base}, nil
		default:
			return nil, fmt.Errorf("link exists with type %q, not WireGuard", link.Type())
		}
	}
	if pid, ok, err := probeUAPI(base.name); err != nil {
		return nil, err
	} else if ok {
		return nil, fmt.Errorf("%s answers (pid %d) but there is no link %s in this network namespace: a device in another namespace uses the name, and UAPI sockets are global to the host, so choose a distinct interface name", UAPISocketPath(base.name), pid, base.name)
	}

	if backend != BackendUserspace {
		err := base.createKernel(opts.MTU)
		switch {
		case err == nil:
			log.Info("created WireGuard device", logKeyBackend, BackendKernel)
			return &kernelDevice{base}, nil
		case errors.Is(err, ErrNotSupported) && backend == BackendAuto:
			log.Info("kernel WireGuard not available, using the userspace device", "reason", err.Error())
		default:
			return nil, err
		}
	}
	pid, err := base.startUserspace(ctx, opts)
	if err != nil {
		return nil, err
	}
	log.Info("created WireGuard device", logKeyBackend, BackendUserspace, logKeyPID, pid)
	return &userspaceDevice{base}, nil
}

// validateName checks a Linux interface name.
func validateName(name string) error {
	if name == "" || len(name) > unix.IFNAMSIZ-1 {
		return fmt.Errorf("invalid interface name %q: want 1-%d bytes", name, unix.IFNAMSIZ-1)
	}
	if name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n\r\v\f") {
		return fmt.Errorf("invalid interface name %q", name)
	}
	return nil
}

// DevicePID returns the process ID of the userspace device process serving
// name's UAPI socket (the peer credentials of the socket). The error wraps
// fs.ErrNotExist when no process answers.
func DevicePID(name string) (int, error) {
	pid, ok, err := probeUAPI(name)
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("no WireGuard device answers on %s: %w", UAPISocketPath(name), fs.ErrNotExist)
	}
	return pid, nil
}

// probeUAPI connects to name's UAPI socket and reports whether a process
// listens on it and which. A missing or stale socket is not an error.
func probeUAPI(name string) (pid int, ok bool, err error) {
	c, err := net.DialTimeout("unix", UAPISocketPath(name), time.Second)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return 0, false, nil
		}
		return 0, false, fmt.Errorf("probe %s: %w", UAPISocketPath(name), err)
	}
	defer c.Close()
	rc, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0, false, fmt.Errorf("probe %s: %w", UAPISocketPath(name), err)
	}
	var (
		cred *unix.Ucred
		cerr error
	)
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, false, fmt.Errorf("probe %s: %w", UAPISocketPath(name), err)
	}
	if cerr != nil {
		return 0, false, fmt.Errorf("probe %s: peer credentials: %w", UAPISocketPath(name), cerr)
	}
	return int(cred.Pid), true, nil
}

// wgDevice is what both backends share: a netlink handle for the link and a
// wgctrl client for the WireGuard configuration.
type wgDevice struct {
	name  string
	nl    *netlink.Handle
	ownNL bool
	log   *slog.Logger

	mu      sync.Mutex // serialises Apply, Device, Close and Delete
	wg      *wgctrl.Client
	closed  bool
	deleted bool
	// snap is the device as the last read through this handle found it, while no
	// configuration call has been made through it since (nil otherwise), and snapAt when it
	// was read: Apply plans against a snapshot younger than SnapshotMaxAge instead of
	// reading the whole device again (see Device.Apply).
	snap   *wgtypes.Device
	snapAt time.Time
}

// Name implements Device.
func (d *wgDevice) Name() string { return d.name }

// Apply implements Device.
func (d *wgDevice) Apply(ctx context.Context, cfg Config) (PlanStats, error) {
	if err := cfg.Validate(); err != nil {
		return PlanStats{}, fmt.Errorf("apply WireGuard config to %s: %w", d.name, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usable(ctx); err != nil {
		return PlanStats{}, err
	}
	cur, at := d.snap, d.snapAt
	if cur == nil || time.Since(at) > SnapshotMaxAge {
		var err error
		if cur, err = d.read(); err != nil {
			return PlanStats{}, fmt.Errorf("apply WireGuard config to %s: read device: %w", d.name, err)
		}
	}
	wcfg, stats := Diff(cur, cfg)
	if !stats.Changed() {
		return stats, nil
	}
	// From here the device may differ from the snapshot, whatever the call's outcome.
	d.snap = nil
	if err := d.wg.ConfigureDevice(d.name, wcfg); err != nil {
		return PlanStats{}, fmt.Errorf("apply WireGuard config to %s (%s): %w", d.name, stats, gone(err))
	}
	d.log.Debug("applied WireGuard config", "added", stats.Added, "updated", stats.Updated, "removed", stats.Removed, "settings", stats.Settings)
	return stats, nil
}

// Device implements Device.
func (d *wgDevice) Device(ctx context.Context) (*wgtypes.Device, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usable(ctx); err != nil {
		return nil, err
	}
	dev, err := d.read()
	if err != nil {
		return nil, fmt.Errorf("read WireGuard device %s: %w", d.name, err)
	}
	return dev, nil
}

// read reads the whole device and keeps it as the snapshot Apply may plan against. d.mu must
// be held.
func (d *wgDevice) read() (*wgtypes.Device, error) {
	dev, err := d.wg.Device(d.name)
	if err != nil {
		d.snap = nil
		return nil, gone(err)
	}
	d.snap, d.snapAt = dev, time.Now()
	return dev, nil
}

// gone marks wgctrl errors that mean the device no longer exists: no such
// kernel device or UAPI socket, or a socket nobody listens on.
func gone(err error) error {
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%w: %w", ErrDeviceGone, err)
	}
	return err
}

// usable reports why d cannot be used. d.mu must be held.
func (d *wgDevice) usable(ctx context.Context) error {
	if d.closed {
		return fmt.Errorf("WireGuard device %s: handle closed", d.name)
	}
	return ctx.Err()
}

// Close implements Device.
func (d *wgDevice) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.closeLocked()
}

func (d *wgDevice) closeLocked() error {
	if d.closed {
		return nil
	}
	d.closed = true
	var err error
	if d.wg != nil {
		err = d.wg.Close()
	}
	if d.ownNL {
		d.nl.Close()
	}
	return err
}

// link returns the link named d.name, or nil if there is none.
func (d *wgDevice) link() (netlink.Link, error) {
	l, err := d.nl.LinkByName(d.name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, nil
		}
		return nil, fmt.Errorf("look up link %s: %w", d.name, err)
	}
	return l, nil
}

// setLink sets the MTU (if mtu != 0) and brings the link up, touching only
// what differs.
func (d *wgDevice) setLink(mtu int) error {
	l, err := d.link()
	if err != nil {
		return err
	}
	if l == nil {
		return fmt.Errorf("link %s vanished", d.name)
	}
	if mtu != 0 && l.Attrs().MTU != mtu {
		if err := d.nl.LinkSetMTU(l, mtu); err != nil {
			return fmt.Errorf("set MTU %d on %s: %w", mtu, d.name, err)
		}
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		if err := d.nl.LinkSetUp(l); err != nil {
			return fmt.Errorf("set %s up: %w", d.name, err)
		}
	}
	return nil
}

// createKernel creates a kernel WireGuard link. The error wraps
// ErrNotSupported when the kernel has no WireGuard.
func (d *wgDevice) createKernel(mtu int) error {
	attrs := netlink.NewLinkAttrs()
	attrs.Name = d.name
	attrs.MTU = mtu
	if err := d.nl.LinkAdd(&netlink.Wireguard{LinkAttrs: attrs}); err != nil {
		if isNotSupported(err) {
			return fmt.Errorf("create kernel WireGuard link: %w (%v)", ErrNotSupported, err)
		}
		return fmt.Errorf("create kernel WireGuard link: %w", err)
	}
	if _, err := d.wg.Device(d.name); err != nil {
		l, lerr := d.link()
		if lerr == nil && l != nil {
			lerr = d.nl.LinkDel(l)
		}
		return errors.Join(fmt.Errorf("kernel WireGuard link created but wgctrl cannot see it (is NetNS the link's namespace?): %w", err), lerr)
	}
	return nil
}

// isNotSupported reports whether a link creation error means the kernel has
// no such link type. rtnetlink answers EOPNOTSUPP for an unknown kind when it
// cannot load a module for it (iproute2 prints "Unknown device type").
func isNotSupported(err error) bool {
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPROTONOSUPPORT) {
		return true
	}
	msg := strings.ToLower(err.Error())
	return strings.Contains(msg, "not supported") || strings.Contains(msg, "unknown device type")
}

// kernelDevice is a kernel WireGuard link.
type kernelDevice struct{ *wgDevice }

// Backend implements Device.
func (d *kernelDevice) Backend() Backend { return BackendKernel }

// Delete implements Device.
func (d *kernelDevice) Delete(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.deleted {
		return nil
	}
	if err := d.usable(ctx); err != nil {
		return err
	}
	l, err := d.link()
	if err == nil && l != nil {
		if err = d.nl.LinkDel(l); err != nil {
			err = fmt.Errorf("delete link %s: %w", d.name, err)
		}
	}
	if err == nil {
		d.deleted = true
		d.log.Info("deleted WireGuard device", logKeyBackend, BackendKernel)
	}
	return errors.Join(err, d.closeLocked())
}
