package wireguard

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Peer is the desired state of one WireGuard peer: one remote node.
type Peer struct {
	// Name identifies the peer in logs and errors (the node name); it is not
	// sent to the device.
	Name string
	// PublicKey is the peer's WireGuard public key; it identifies the peer
	// on the device and must be unique within a Config.
	PublicKey wgtypes.Key
	// Endpoint is the peer's underlay address and port. The zero value
	// leaves the device's endpoint alone (the peer's roaming address, if
	// any, is kept).
	Endpoint netip.AddrPort
	// AllowedIPs are exactly the prefixes whose traffic goes to and may come
	// from the peer (its pod CIDRs). Compared as a set; host bits are
	// ignored. IPv4-mapped IPv6 prefixes are rejected by [Config.Validate].
	AllowedIPs []netip.Prefix
	// PersistentKeepalive is the keepalive interval; 0 disables it. WireGuard
	// has one-second resolution: the value is truncated to whole seconds.
	PersistentKeepalive time.Duration
	// Prompt makes the device start a handshake with the peer as soon as it
	// is added, instead of when the first packet for it arrives; it has no
	// effect on a peer the device already has, and is not state: it never
	// makes a peer differ from the device. See [Diff] for how.
	Prompt bool
}

// promptKeepalive is the keepalive a prompted peer is added with (see [Diff]).
// Any non-zero interval does: WireGuard sends a keepalive as soon as a peer's
// keepalive is turned on, which needs a session and so starts a handshake at
// once; the value itself never applies, since the same call turns it off.
const promptKeepalive = 25 * time.Second

// Config is the desired state of a WireGuard device.
type Config struct {
	// PrivateKey is the device's private key; the zero key leaves the
	// device's key unchanged.
	PrivateKey wgtypes.Key
	// ListenPort is the device's UDP port; 0 leaves the port unchanged.
	ListenPort int
	// FirewallMark is the mark the device puts on the packets it sends (its encapsulated
	// UDP), so policy routing can keep them out of the tunnel when node addresses are
	// routed into it (node encryption); 0 leaves the device's mark unchanged.
	FirewallMark int
	// Peers is the complete desired peer set: peers on the device that are
	// not listed are removed.
	Peers []Peer
}

// PlanStats counts the work a plan does.
type PlanStats struct {
	// Added is the number of peers configured that the device did not have.
	Added int
	// Updated is the number of existing peers reconfigured.
	Updated int
	// Removed is the number of peers removed.
	Removed int
	// Settings is true when the private key, listen port or firewall mark changes.
	Settings bool
	// Rekeyed is the number of added peers that take over allowed IPs of a
	// removed peer: a node whose key changed, which WireGuard can only
	// configure as a remove and an add (it names peers by their keys). They
	// are counted in Added and Removed too.
	Rekeyed int
	// Prompted is the number of added peers prompted to handshake at once
	// (Peer.Prompt). They are counted in Added too.
	Prompted int
}

// Changed reports whether the plan changes anything.
func (s PlanStats) Changed() bool {
	return s.Added+s.Updated+s.Removed > 0 || s.Settings
}

// Nodes is the number of remote nodes whose peer the plan writes: every added,
// updated and removed peer, except that a rekeyed node's remove and add are
// one.
func (s PlanStats) Nodes() int {
	return s.Added + s.Updated + s.Removed - s.Rekeyed
}

// String formats s for logs, e.g. "added=1 updated=0 removed=1 rekeyed=1
// prompted=1 settings=false".
func (s PlanStats) String() string {
	return fmt.Sprintf("added=%d updated=%d removed=%d rekeyed=%d prompted=%d settings=%t",
		s.Added, s.Updated, s.Removed, s.Rekeyed, s.Prompted, s.Settings)
}

// maxKeepalive is the largest keepalive interval WireGuard accepts.
const maxKeepalive = 65535 * time.Second

// Validate checks that c can be applied: a valid listen port, unique non-zero
// peer public keys different from the device's own, valid endpoints with a
// port, valid allowed IPs that are not IPv4-mapped IPv6 and that no two
// peers share, and keepalives within WireGuard's range.
func (c Config) Validate() error {
	if c.ListenPort < 0 || c.ListenPort > 65535 {
		return fmt.Errorf("listen port %d out of range", c.ListenPort)
	}
	var self wgtypes.Key
	if c.PrivateKey != (wgtypes.Key{}) {
		self = c.PrivateKey.PublicKey()
	}
	keys := make(map[wgtypes.Key]string, len(c.Peers))
	owner := make(map[netip.Prefix]string)
	var errs []error
	for _, p := range c.Peers {
		name := p.Name
		if name == "" {
			name = Fingerprint(p.PublicKey)
		}
		if p.PublicKey == (wgtypes.Key{}) {
			errs = append(errs, fmt.Errorf("peer %s: zero public key", name))
			continue
		}
		if p.PublicKey == self {
			errs = append(errs, fmt.Errorf("peer %s: public key is the device's own", name))
		}
		if other, ok := keys[p.PublicKey]; ok {
			errs = append(errs, fmt.Errorf("peer %s: public key %s also used by peer %s", name, Fingerprint(p.PublicKey), other))
		}
		keys[p.PublicKey] = name
		if p.Endpoint != (netip.AddrPort{}) && (!p.Endpoint.IsValid() || p.Endpoint.Port() == 0) {
			errs = append(errs, fmt.Errorf("peer %s: invalid endpoint %s", name, p.Endpoint))
		}
		if p.PersistentKeepalive < 0 || p.PersistentKeepalive > maxKeepalive {
			errs = append(errs, fmt.Errorf("peer %s: keepalive %s out of range", name, p.PersistentKeepalive))
		}
		for _, pfx := range p.AllowedIPs {
			if !pfx.IsValid() {
				errs = append(errs, fmt.Errorf("peer %s: invalid allowed IP %s", name, pfx))
				continue
			}
			if pfx.Addr().Is4In6() {
				errs = append(errs, fmt.Errorf("peer %s: allowed IP %s is IPv4-mapped IPv6; use the IPv4 form", name, pfx))
				continue
			}
			m := pfx.Masked()
			if other, ok := owner[m]; ok && other != name {
				errs = append(errs, fmt.Errorf("peer %s: allowed IP %s also allowed for peer %s", name, m, other))
			}
			owner[m] = name
		}
	}
	return errors.Join(errs...)
}

// Plan returns the minimal device configuration that turns current into
// desired, and whether it changes anything. current may be nil (a device
// with nothing configured). Plan is pure; see [Diff] for the rules.
func Plan(current *wgtypes.Device, desired Config) (cfg wgtypes.Config, changed bool) {
	cfg, stats := Diff(current, desired)
	return cfg, stats.Changed()
}

// Diff is [Plan] that also counts the work. The returned configuration:
//   - sets PrivateKey, ListenPort and FirewallMark only when desired sets
//     them (non-zero) and they differ from current;
//   - never sets ReplacePeers;
//   - lists first every peer of current that desired lacks, with Remove set,
//     in public key order;
//   - then, in desired's order, every desired peer that is new or whose
//     endpoint (when desired sets one), keepalive or set of allowed IPs
//     differs, with ReplaceAllowedIPs, its full allowed IPs and keepalive;
//   - omits unchanged peers;
//   - prompts, in the same call, every new peer with Prompt set and no
//     keepalive: it is added with a keepalive, and an update-only entry at
//     the end of the configuration sets the keepalive back to 0. WireGuard
//     (the kernel and wireguard-go alike) sends a keepalive, and so starts a
//     handshake, when it turns a peer's keepalive on, as it applies that
//     peer's entry; the second entry leaves no keepalive behind. A new peer
//     with a keepalive of its own needs no prompt: turning it on sends one.
//
// Allowed IPs are compared as sets of masked prefixes, so the device's
// ordering and address representation do not matter. Endpoints are compared
// with IPv4-mapped addresses unmapped. desired is assumed to pass
// [Config.Validate]; of peers with the same public key, the last wins.
//
// PlanStats.Rekeyed pairs each added peer, in desired's order, with the
// removed peer that held the first of its allowed IPs (in the order given)
// held by a removed peer not paired yet, if any.
func Diff(current *wgtypes.Device, desired Config) (wgtypes.Config, PlanStats) {
	if current == nil {
		current = &wgtypes.Device{}
	}
	var (
		cfg   wgtypes.Config
		stats PlanStats
	)
	if desired.PrivateKey != (wgtypes.Key{}) && desired.PrivateKey != current.PrivateKey {
		cfg.PrivateKey = new(desired.PrivateKey)
		stats.Settings = true
	}
	if desired.ListenPort != 0 && desired.ListenPort != current.ListenPort {
		cfg.ListenPort = new(desired.ListenPort)
		stats.Settings = true
	}
	if desired.FirewallMark != 0 && desired.FirewallMark != current.FirewallMark {
		cfg.FirewallMark = new(desired.FirewallMark)
		stats.Settings = true
	}

	want := make(map[wgtypes.Key]int, len(desired.Peers)) // index of the last peer with the key
	for i, p := range desired.Peers {
		want[p.PublicKey] = i
	}
	have := make(map[wgtypes.Key]*wgtypes.Peer, len(current.Peers))
	var removed []wgtypes.Key
	for i := range current.Peers {
		p := &current.Peers[i]
		have[p.PublicKey] = p
		if _, ok := want[p.PublicKey]; !ok {
			removed = append(removed, p.PublicKey)
		}
	}
	slices.SortFunc(removed, func(a, b wgtypes.Key) int { return cmp.Compare(string(a[:]), string(b[:])) })
	removed = slices.Compact(removed)
	for _, k := range removed {
		cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: k, Remove: true})
		stats.Removed++
	}

	var (
		prompted []wgtypes.Key
		held     map[netip.Prefix]wgtypes.Key // allowed IPs of the removed peers (Rekeyed)
		paired   map[wgtypes.Key]bool         // removed peers paired with an added one
	)
	for i, p := range desired.Peers {
		if want[p.PublicKey] != i {
			continue // a later peer has the same key
		}
		cur, exists := have[p.PublicKey]
		if exists && peerEqual(cur, p) {
			continue
		}
		pc := peerConfig(p)
		if exists {
			stats.Updated++
			cfg.Peers = append(cfg.Peers, pc)
			continue
		}
		stats.Added++
		if p.Prompt && *pc.PersistentKeepaliveInterval == 0 {
			pc.PersistentKeepaliveInterval = new(promptKeepalive)
			prompted = append(prompted, p.PublicKey)
		}
		cfg.Peers = append(cfg.Peers, pc)
		if len(removed) > 0 {
			if held == nil {
				held, paired = heldBy(removed, have), make(map[wgtypes.Key]bool, len(removed))
			}
			for _, q := range p.AllowedIPs {
				if k, ok := held[q.Masked()]; ok && !paired[k] {
					paired[k] = true
					stats.Rekeyed++
					break
				}
			}
		}
	}
	for _, k := range prompted {
		cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: k, UpdateOnly: true, PersistentKeepaliveInterval: new(time.Duration(0))})
		stats.Prompted++
	}
	return cfg, stats
}

// heldBy maps every allowed IP of the removed peers to its peer (an allowed IP belongs to one
// peer on a device).
func heldBy(removed []wgtypes.Key, have map[wgtypes.Key]*wgtypes.Peer) map[netip.Prefix]wgtypes.Key {
	out := make(map[netip.Prefix]wgtypes.Key)
	for _, k := range removed {
		for _, n := range have[k].AllowedIPs {
			if pfx, ok := prefixFromIPNet(n); ok {
				out[pfx] = k
			}
		}
	}
	return out
}

// peerConfig is the full configuration of a new or changed peer.
func peerConfig(p Peer) wgtypes.PeerConfig {
	pc := wgtypes.PeerConfig{
		PublicKey:                   p.PublicKey,
		PersistentKeepaliveInterval: new(keepalive(p.PersistentKeepalive)),
		ReplaceAllowedIPs:           true,
		AllowedIPs:                  make([]net.IPNet, 0, len(p.AllowedIPs)),
	}
	if p.Endpoint.IsValid() {
		ap := unmapAddrPort(p.Endpoint)
		pc.Endpoint = net.UDPAddrFromAddrPort(ap)
	}
	for _, pfx := range normalizePrefixes(p.AllowedIPs) {
		pc.AllowedIPs = append(pc.AllowedIPs, net.IPNet{
			IP:   pfx.Addr().AsSlice(),
			Mask: net.CIDRMask(pfx.Bits(), pfx.Addr().BitLen()),
		})
	}
	return pc
}

// peerEqual reports whether the device's peer cur already matches p.
func peerEqual(cur *wgtypes.Peer, p Peer) bool {
	if cur.PersistentKeepaliveInterval != keepalive(p.PersistentKeepalive) {
		return false
	}
	if p.Endpoint.IsValid() {
		if cur.Endpoint == nil || unmapAddrPort(cur.Endpoint.AddrPort()) != unmapAddrPort(p.Endpoint) {
			return false
		}
	}
	got := make([]netip.Prefix, 0, len(cur.AllowedIPs))
	for _, n := range cur.AllowedIPs {
		pfx, ok := prefixFromIPNet(n)
		if !ok {
			return false // something we cannot represent: rewrite the peer
		}
		got = append(got, pfx)
	}
	return slices.Equal(normalizePrefixes(got), normalizePrefixes(p.AllowedIPs))
}

// keepalive truncates d to WireGuard's one-second resolution.
func keepalive(d time.Duration) time.Duration {
	return d.Truncate(time.Second)
}

func unmapAddrPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// prefixFromIPNet converts a device-reported allowed IP. The mask length
// decides the family: a 16-byte IP with a 4-byte mask is IPv4.
func prefixFromIPNet(n net.IPNet) (netip.Prefix, bool) {
	ones, bits := n.Mask.Size()
	var (
		addr netip.Addr
		ok   bool
	)
	switch bits {
	case 32:
		ip4 := n.IP.To4()
		if ip4 == nil {
			return netip.Prefix{}, false
		}
		addr, ok = netip.AddrFromSlice(ip4)
	case 128:
		addr, ok = netip.AddrFromSlice(n.IP.To16())
	default:
		return netip.Prefix{}, false
	}
	if !ok {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(addr, ones).Masked(), true
}

// normalizePrefixes returns the masked, sorted, de-duplicated prefixes.
func normalizePrefixes(in []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(in))
	for _, p := range in {
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, comparePrefix)
	return slices.Compact(out)
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}
