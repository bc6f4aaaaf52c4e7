package wireguard

// Per-packet overhead of WireGuard encapsulation, in bytes. A WireGuard data
// message adds a 16-byte header (type, receiver index, counter) and a 16-byte
// Poly1305 tag to the inner packet; its padding to a multiple of 16 never
// exceeds the tunnel MTU, so a full-size inner packet carries no padding.
const (
	// WireGuardOverhead is the WireGuard data message overhead.
	WireGuardOverhead = 32
	// UDPOverhead is the UDP header.
	UDPOverhead = 8
	// OverheadIPv4 is the encapsulation overhead over an IPv4 underlay.
	OverheadIPv4 = 20 + UDPOverhead + WireGuardOverhead
	// OverheadIPv6 is the encapsulation overhead over an IPv6 underlay.
	OverheadIPv6 = 40 + UDPOverhead + WireGuardOverhead
	// Overhead is the worst-case encapsulation overhead (IPv6 underlay),
	// which [TunnelMTU] subtracts so that one tunnel MTU serves every peer.
	Overhead = OverheadIPv6
)

// MinTunnelMTU is the smallest tunnel MTU [TunnelMTU] returns: IPv6's
// minimum link MTU.
const MinTunnelMTU = 1280

// DefaultTunnelMTU is the tunnel MTU for the common 1500-byte underlay.
const DefaultTunnelMTU = 1500 - Overhead

// TunnelMTU returns the MTU of the WireGuard device for an underlay of
// underlayMTU bytes: underlayMTU minus the worst-case [Overhead], so that an
// inner packet of the full tunnel MTU with DF set fits in one underlay
// packet over IPv4 or IPv6. It returns 0 when the result would be below
// [MinTunnelMTU]; callers must treat that as a configuration error.
func TunnelMTU(underlayMTU int) int {
	mtu := underlayMTU - Overhead
	if mtu < MinTunnelMTU {
		return 0
	}
	return mtu
}
