// Package wgtest holds test helpers for code that uses package wireguard: an
// in-memory [Model] of a WireGuard device that applies wgtypes.Config with
// WireGuard's semantics, a fake [Device] implementing wireguard.Device on top
// of it, and deterministic keys. It does no I/O.
package wgtest

import (
	"cmp"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// PrivateKey returns a deterministic, valid (clamped) private key for seed,
// so tests and golden files can name keys stably.
func PrivateKey(seed int) wgtypes.Key {
	k := wgtypes.Key(sha256.Sum256(fmt.Appendf(nil, "wgtest key %d", seed)))
	k[0] &= 248
	k[31] &= 127
	k[31] |= 64
	return k
}

// publicKeys caches PublicKey: curve25519 is slow enough to dominate
// randomized tests.
var publicKeys sync.Map // int -> wgtypes.Key

// PublicKey returns the public key of PrivateKey(seed).
func PublicKey(seed int) wgtypes.Key {
	if k, ok := publicKeys.Load(seed); ok {
		return k.(wgtypes.Key)
	}
	k := PrivateKey(seed).PublicKey()
	publicKeys.Store(seed, k)
	return k
}

// Model is an in-memory WireGuard device. Configure applies a
// wgtypes.Config the way the kernel and wireguard-go do (including an allowed
// IP moving from one peer to another), and Device reports the state like
// wgctrl. Its methods are safe for concurrent use.
type Model struct {
	// Rand, if set, makes Device report allowed IPs in random order and
	// IPv4 addresses randomly in 16-byte form, as a device may; nil reports
	// them sorted.
	Rand *rand.Rand

	mu         sync.Mutex
	name       string
	typ        wgtypes.DeviceType
	privateKey wgtypes.Key
	publicKey  wgtypes.Key // of privateKey, zero if privateKey is zero
	listenPort int
	fwmark     int
	peers      []*modelPeer // in creation order, as devices report them
	configs    []wgtypes.Config
	keepalives map[wgtypes.Key]int // keepalives sent when a configuration turned one on
}

type modelPeer struct {
	publicKey    wgtypes.Key
	presharedKey wgtypes.Key
	endpoint     netip.AddrPort
	keepalive    time.Duration
	allowedIPs   []netip.Prefix // masked, in insertion order
	handshake    time.Time
}

// NewModel returns an empty device called name that reports itself as typ.
func NewModel(name string, typ wgtypes.DeviceType) *Model {
	return &Model{name: name, typ: typ}
}

// Configure applies cfg. It fails only on inputs WireGuard rejects: a peer
// without public key, an allowed IP that is not an IPv4 or IPv6 prefix, a
// listen port out of range.
func (m *Model) Configure(cfg wgtypes.Config) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if cfg.ListenPort != nil && (*cfg.ListenPort < 0 || *cfg.ListenPort > 65535) {
		return fmt.Errorf("wgtest: listen port %d out of range", *cfg.ListenPort)
	}
	for _, pc := range cfg.Peers {
		if pc.PublicKey == (wgtypes.Key{}) {
			return fmt.Errorf("wgtest: peer without public key")
		}
		for _, n := range pc.AllowedIPs {
			if _, err := prefixOf(n); err != nil {
				return err
			}
		}
	}
	m.configs = append(m.configs, cloneConfig(cfg))

	if cfg.PrivateKey != nil {
		if m.privateKey != *cfg.PrivateKey {
			m.privateKey, m.publicKey = *cfg.PrivateKey, wgtypes.Key{}
			if m.privateKey != (wgtypes.Key{}) {
				m.publicKey = m.privateKey.PublicKey()
				// WireGuard drops a peer whose key is now the device's own.
				m.removePeer(m.publicKey)
			}
		}
	}
	if cfg.ListenPort != nil {
		m.listenPort = *cfg.ListenPort
	}
	if cfg.FirewallMark != nil {
		m.fwmark = *cfg.FirewallMark
	}
	if cfg.ReplacePeers {
		m.peers = nil
	}
	self := m.publicKey
	for _, pc := range cfg.Peers {
		if pc.Remove {
			m.removePeer(pc.PublicKey)
			continue
		}
		p := m.peer(pc.PublicKey)
		if p == nil {
			if pc.UpdateOnly || pc.PublicKey == self {
				continue
			}
			p = &modelPeer{publicKey: pc.PublicKey}
			m.peers = append(m.peers, p)
		}
		if pc.PresharedKey != nil {
			p.presharedKey = *pc.PresharedKey
		}
		if pc.Endpoint != nil {
			ap := pc.Endpoint.AddrPort()
			p.endpoint = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
		if pc.PersistentKeepaliveInterval != nil {
			ka := pc.PersistentKeepaliveInterval.Truncate(time.Second)
			if p.keepalive == 0 && ka != 0 {
				// WireGuard sends a keepalive at once (a handshake first, without a session).
				if m.keepalives == nil {
					m.keepalives = map[wgtypes.Key]int{}
				}
				m.keepalives[pc.PublicKey]++
			}
			p.keepalive = ka
		}
		if pc.ReplaceAllowedIPs {
			p.allowedIPs = nil
		}
		for _, n := range pc.AllowedIPs {
			pfx, _ := prefixOf(n)
			for _, other := range m.peers {
				other.allowedIPs = slices.DeleteFunc(other.allowedIPs, func(q netip.Prefix) bool { return q == pfx })
			}
			p.allowedIPs = append(p.allowedIPs, pfx)
		}
	}
	return nil
}

// Reset empties the device: no key, port or peers. The history of
// configurations is kept.
func (m *Model) Reset() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.privateKey, m.publicKey, m.listenPort, m.fwmark, m.peers = wgtypes.Key{}, wgtypes.Key{}, 0, 0, nil
}

// SetHandshake records a handshake with the peer pub at t, as if traffic
// had flowed; it reports whether the peer exists.
func (m *Model) SetHandshake(pub wgtypes.Key, t time.Time) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.peer(pub)
	if p != nil {
		p.handshake = t
	}
	return p != nil
}

// KeepalivesSent returns how many times a configuration turned the keepalive of
// the peer pub on (from 0), which makes WireGuard send a keepalive at once,
// and so start a handshake when it has no session with the peer. Reset keeps
// the count.
func (m *Model) KeepalivesSent(pub wgtypes.Key) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.keepalives[pub]
}

// Configs returns every configuration applied so far, oldest first.
func (m *Model) Configs() []wgtypes.Config {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]wgtypes.Config, len(m.configs))
	for i, c := range m.configs {
		out[i] = cloneConfig(c)
	}
	return out
}

func (m *Model) peer(pub wgtypes.Key) *modelPeer {
	for _, p := range m.peers {
		if p.publicKey == pub {
			return p
		}
	}
	return nil
}

func (m *Model) removePeer(pub wgtypes.Key) {
	m.peers = slices.DeleteFunc(m.peers, func(p *modelPeer) bool { return p.publicKey == pub })
}

// Device returns the current state as wgctrl would report it.
func (m *Model) Device() *wgtypes.Device {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := &wgtypes.Device{
		Name:         m.name,
		Type:         m.typ,
		PrivateKey:   m.privateKey,
		ListenPort:   m.listenPort,
		FirewallMark: m.fwmark,
		PublicKey:    m.publicKey,
	}
	for _, p := range m.peers {
		wp := wgtypes.Peer{
			PublicKey:                   p.publicKey,
			PresharedKey:                p.presharedKey,
			PersistentKeepaliveInterval: p.keepalive,
			LastHandshakeTime:           p.handshake,
			ProtocolVersion:             1,
		}
		if p.endpoint.IsValid() {
			wp.Endpoint = net.UDPAddrFromAddrPort(p.endpoint)
		}
		allowed := slices.Clone(p.allowedIPs)
		if m.Rand != nil {
			m.Rand.Shuffle(len(allowed), func(i, j int) { allowed[i], allowed[j] = allowed[j], allowed[i] })
		} else {
			slices.SortFunc(allowed, comparePrefix)
		}
		for _, pfx := range allowed {
			ip := net.IP(pfx.Addr().AsSlice())
			if m.Rand != nil && pfx.Addr().Is4() && m.Rand.IntN(2) == 0 {
				ip = ip.To16()
			}
			wp.AllowedIPs = append(wp.AllowedIPs, net.IPNet{IP: ip, Mask: net.CIDRMask(pfx.Bits(), pfx.Addr().BitLen())})
		}
		d.Peers = append(d.Peers, wp)
	}
	return d
}

// String prints the state sorted, one line for the device and one per
// peer, for golden comparison:
//
//	device wg0 public=<key> port=51820 fwmark=0
//	peer <key> endpoint=192.0.2.1:51820 keepalive=25s allowed=10.0.1.0/24,fd00:1::/64
func (m *Model) String() string {
	d := m.Device()
	var b strings.Builder
	pub := "none"
	if d.PrivateKey != (wgtypes.Key{}) {
		pub = d.PublicKey.String()
	}
	fmt.Fprintf(&b, "device %s public=%s port=%d fwmark=%d\n", d.Name, pub, d.ListenPort, d.FirewallMark)
	lines := make([]string, 0, len(d.Peers))
	for _, p := range d.Peers {
		ep := "none"
		if p.Endpoint != nil {
			ep = p.Endpoint.String()
		}
		var allowed []netip.Prefix
		for _, n := range p.AllowedIPs {
			pfx, _ := prefixOf(n)
			allowed = append(allowed, pfx)
		}
		slices.SortFunc(allowed, comparePrefix)
		as := make([]string, len(allowed))
		for i, a := range allowed {
			as[i] = a.String()
		}
		lines = append(lines, fmt.Sprintf("peer %s endpoint=%s keepalive=%s allowed=%s\n", p.PublicKey, ep, p.PersistentKeepaliveInterval, strings.Join(as, ",")))
	}
	slices.Sort(lines)
	for _, l := range lines {
		b.WriteString(l)
	}
	return b.String()
}

// prefixOf converts a wgctrl allowed IP to a masked prefix; the mask length
// decides the family.
func prefixOf(n net.IPNet) (netip.Prefix, error) {
	ones, bits := n.Mask.Size()
	var ip net.IP
	switch bits {
	case 32:
		ip = n.IP.To4()
	case 128:
		ip = n.IP.To16()
	}
	addr, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.Prefix{}, fmt.Errorf("wgtest: invalid allowed IP %v", n)
	}
	return netip.PrefixFrom(addr, ones).Masked(), nil
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

func cloneConfig(c wgtypes.Config) wgtypes.Config {
	c.Peers = slices.Clone(c.Peers)
	for i := range c.Peers {
		c.Peers[i].AllowedIPs = slices.Clone(c.Peers[i].AllowedIPs)
	}
	return c
}
