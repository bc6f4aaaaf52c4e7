package wireguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// ErrNotSupported is wrapped by [Ensure] when the requested backend is not
// available, in particular when [BackendKernel] is forced on a kernel
// without WireGuard (CONFIG_WIREGUARD unset).
var ErrNotSupported = errors.New("not supported")

// ErrBackendMismatch is wrapped by [Ensure] when a device with the requested
// name already exists with a different backend than the one forced. Switching
// backends requires [Device.Delete] first, which interrupts traffic.
var ErrBackendMismatch = errors.New("existing device has a different backend")

// ErrDeviceGone is wrapped by [Device] methods when the device no longer
// exists or does not answer (its link was deleted, its userspace process
// died). The caller should call [Ensure] again, which recreates it, and
// re-apply its configuration.
var ErrDeviceGone = errors.New("WireGuard device gone")

// Backend names a WireGuard device implementation.
type Backend string

// Backends. BackendAuto is only meaningful in [EnsureOptions]: a Device
// reports the backend actually in use.
const (
	// BackendAuto uses the kernel when it has WireGuard, else userspace.
	BackendAuto Backend = "auto"
	// BackendKernel is the Linux kernel's WireGuard (netlink + genetlink).
	BackendKernel Backend = "kernel"
	// BackendUserspace is wireguard-go on a TUN device, run by [RunDevice]
	// in its own process and configured through its UAPI socket.
	BackendUserspace Backend = "userspace"
)

// ParseBackend parses a backend flag value: "auto" (or ""), "kernel" or
// "userspace".
func ParseBackend(s string) (Backend, error) {
	switch b := Backend(s); b {
	case "", BackendAuto:
		return BackendAuto, nil
	case BackendKernel, BackendUserspace:
		return b, nil
	default:
		return "", fmt.Errorf("unknown WireGuard backend %q (want auto, kernel or userspace)", s)
	}
}

// String returns the backend's name.
func (b Backend) String() string { return string(b) }

// Device is a WireGuard device on this node, created or adopted by [Ensure].
// Its methods are safe for concurrent use.
type Device interface {
	// Name returns the interface name.
	Name() string
	// Backend returns the backend in use: BackendKernel or BackendUserspace.
	Backend() Backend
	// Apply makes the device match cfg, configuring only what differs from
	// its current state (see [Diff]) in one wgctrl call, or none when
	// nothing differs. It is idempotent and returns what it changed. If
	// the device has vanished the error wraps [ErrDeviceGone].
	//
	// The current state is read from the device, unless a Device call on
	// this handle read it less than [SnapshotMaxAge] ago and no
	// configuration call was made through the handle since: then Apply
	// plans against that read, so a caller that reads the device and then
	// applies (as the agent's reconcile does) pays for one read of every
	// peer, not two. A change made to the device by someone else within
	// that second is healed by the next Apply after it.
	Apply(ctx context.Context, cfg Config) (PlanStats, error)
	// Device returns the device's current state, including each peer's last
	// handshake time and byte counters. It changes nothing. If the device
	// has vanished the error wraps [ErrDeviceGone]. The result is shared
	// with Apply (see there): callers must not modify it.
	Device(ctx context.Context) (*wgtypes.Device, error)
	// Close releases this handle's resources (wgctrl client, owned netlink
	// handle). It never removes the link, its peers or the userspace
	// process: a later [Ensure] re-adopts the device. Idempotent.
	Close() error
	// Delete removes the link and, for the userspace backend, stops the
	// device process. Traffic through the device stops. Meant for turning
	// encryption off for good and for tests. Idempotent: deleting a device
	// that is already gone succeeds, and so does a second Delete. The
	// handle is closed afterwards; Delete on a handle closed by Close fails.
	Delete(ctx context.Context) error
}

// SnapshotMaxAge is how old a read of the device may be for [Device.Apply] to plan against it
// instead of reading the device again. Reading a userspace device is a text dump of every
// peer through its UAPI socket (tens of milliseconds at 5000 peers); the agent reads the
// device just before it applies, so that read serves both.
const SnapshotMaxAge = time.Second

// DefaultStartTimeout is how long [Ensure] waits for a userspace device
// process to answer on its UAPI socket.
const DefaultStartTimeout = 10 * time.Second

// EnsureOptions configures [Ensure].
type EnsureOptions struct {
	// Name is the interface name (1-15 bytes). The UAPI socket
	// /var/run/wireguard/<Name>.sock is global to the host, so devices in
	// different network namespaces on one host need different names.
	Name string
	// MTU is the device MTU (see [TunnelMTU]); 0 leaves it unchanged (a
	// new device then has its backend's default, 1420).
	MTU int
	// Backend selects the backend: BackendAuto (or ""), BackendKernel or
	// BackendUserspace. A forced backend never falls back.
	Backend Backend
	// Netlink is the rtnetlink handle of the node's network namespace, used
	// for link lookup, creation, MTU and up. Nil means a handle Ensure opens
	// in NetNS (or the calling thread's namespace) and the Device owns.
	Netlink *netlink.Handle
	// NetNS is the path of the node's network namespace (for example
	// /run/netns/<name> or /proc/<pid>/ns/net); "" means the calling
	// thread's namespace. The wgctrl client (kernel genetlink socket) is
	// opened and the userspace device process started in it. It must be the
	// namespace Netlink is bound to.
	NetNS string
	// DeviceCommand is the argv that starts the userspace device process,
	// whose body is [RunDevice] for the same name and MTU, for example
	// {"/proc/self/exe", "wireguard-device", "--iface", name, "--mtu", "1420"}.
	// The process is started detached (own session, stdin /dev/null,
	// stdout and stderr appended to LogPath, no parent-death signal) so it
	// outlives the caller. Required when the userspace backend is created.
	DeviceCommand []string
	// LogPath receives the userspace process's stdout and stderr (opened
	// O_APPEND|O_CREATE, mode 0640); "" discards them.
	LogPath string
	// StartTimeout bounds the wait for a new userspace device to answer;
	// 0 means DefaultStartTimeout.
	StartTimeout time.Duration
	// Logger receives progress and fallback messages; nil discards them.
	Logger *slog.Logger
}

// RunOptions configures [RunDevice].
type RunOptions struct {
	// Name is the interface name; its UAPI socket is [UAPISocketPath](Name).
	Name string
	// MTU is the TUN device's MTU; 0 means 1420.
	MTU int
	// Logger receives wireguard-go's messages (errors at Error, the rest
	// at Debug); nil discards them.
	Logger *slog.Logger
}

// UAPISocketPath returns the path of the UAPI socket of the userspace
// device name: /var/run/wireguard/<name>.sock.
func UAPISocketPath(name string) string {
	return "/var/run/wireguard/" + name + ".sock"
}

// Log attribute keys.
const (
	logKeyIface   = "iface"
	logKeyBackend = "backend"
	logKeyPID     = "pid"
)
