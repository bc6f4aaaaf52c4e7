package netenv

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math/big"
	"net/netip"
	"regexp"
	"strconv"
)

// Options configures a Topology. The zero value gives a dual-stack cluster with the
// defaults documented on each field.
type Options struct {
	// Prefix starts the name of every namespace of the topology. It must be
	// letters, digits and underscores (no '-'), at most 20 characters. Default:
	// "mc" followed by 5 random hex digits, unique per run.
	Prefix string
	// UnderlayV4 is the underlay IPv4 subnet; node i (from 1) gets host 10+i in
	// it. Default 10.77.0.0/24, so node 1 is 10.77.0.11.
	UnderlayV4 netip.Prefix
	// UnderlayV6 is the underlay IPv6 subnet; node i gets the host whose hex
	// digits read like the decimal 10+i, so node 1 is fd77::11 next to
	// 10.77.0.11. Default fd77::/64.
	UnderlayV6 netip.Prefix
	// PodCIDRV4 is the cluster's IPv4 pod range; node i gets its i-th /24.
	// Default 10.244.0.0/16, so node 1 has 10.244.1.0/24.
	PodCIDRV4 netip.Prefix
	// PodCIDRV6 is the cluster's IPv6 pod range; node i gets the /64 whose
	// fourth group reads like the decimal i. Default fd44::/48, so node 1 has
	// fd44:0:0:1::/64.
	PodCIDRV6 netip.Prefix
	// IPv4Only turns IPv6 off on the underlay and for pods: no IPv6 addresses
	// and no IPv6 routes (link-local addresses still exist).
	IPv4Only bool
	// UnderlayMTU is set on every node's eth0, the switch ports and br0.
	// Default 1500.
	UnderlayMTU int
	// PodMTU is set on both ends of every pod veth, as a CNI would set what
	// the agent computes. Default: UnderlayMTU.
	PodMTU int
	// Logger receives debug records of what is created and deleted. Nil
	// discards.
	Logger *slog.Logger
	// NoPodRoutes leaves routing of the nodes' pod CIDRs to the caller: AddNode
	// adds no host-gateway routes for Node.PodCIDRs (tests/k8s routes the pod
	// CIDRs the controller manager allocates). AddPod still works.
	NoPodRoutes bool
}

// Limits of the addressing scheme: host numbers 10+i must fit in an IPv4
// octet below the broadcast address.
const (
	maxNodes      = 244
	maxPodsByNode = 245
	nodeBitsV4    = 24
	nodeBitsV6    = 64
)

var (
	prefixRE = regexp.MustCompile(`^[A-Za-z0-9_]{1,20}$`)
	nameRE   = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$`)
)

// withDefaults fills the zero fields of o and validates the result.
func (o Options) withDefaults() (Options, error) {
	if o.Prefix == "" {
		var b [3]byte
		if _, err := rand.Read(b[:]); err != nil {
			return o, fmt.Errorf("random prefix: %w", err)
		}
		o.Prefix = "mc" + hex.EncodeToString(b[:])[:5]
	}
	if !prefixRE.MatchString(o.Prefix) {
		return o, fmt.Errorf("options: prefix %q: want 1-20 letters, digits or '_'", o.Prefix)
	}
	def := func(p *netip.Prefix, s string) {
		if !p.IsValid() {
			*p = netip.MustParsePrefix(s)
		}
	}
	def(&o.UnderlayV4, "10.77.0.0/24")
	def(&o.UnderlayV6, "fd77::/64")
	def(&o.PodCIDRV4, "10.244.0.0/16")
	def(&o.PodCIDRV6, "fd44::/48")
	o.UnderlayV4, o.UnderlayV6 = o.UnderlayV4.Masked(), o.UnderlayV6.Masked()
	o.PodCIDRV4, o.PodCIDRV6 = o.PodCIDRV4.Masked(), o.PodCIDRV6.Masked()
	switch {
	case !o.UnderlayV4.Addr().Is4() || o.UnderlayV4.Bits() > 24:
		return o, fmt.Errorf("options: underlay v4 %s: want an IPv4 prefix of /24 or shorter", o.UnderlayV4)
	case !o.UnderlayV6.Addr().Is6() || o.UnderlayV6.Addr().Is4In6() || o.UnderlayV6.Bits() > 112:
		return o, fmt.Errorf("options: underlay v6 %s: want an IPv6 prefix of /112 or shorter", o.UnderlayV6)
	case !o.PodCIDRV4.Addr().Is4() || o.PodCIDRV4.Bits() > 16:
		return o, fmt.Errorf("options: pod cidr v4 %s: want an IPv4 prefix of /16 or shorter", o.PodCIDRV4)
	case !o.PodCIDRV6.Addr().Is6() || o.PodCIDRV6.Addr().Is4In6() || o.PodCIDRV6.Bits() > 48:
		return o, fmt.Errorf("options: pod cidr v6 %s: want an IPv6 prefix of /48 or shorter", o.PodCIDRV6)
	}
	if o.UnderlayMTU == 0 {
		o.UnderlayMTU = 1500
	}
	if o.PodMTU == 0 {
		o.PodMTU = o.UnderlayMTU
	}
	if o.UnderlayMTU < 1280 || o.UnderlayMTU > 65535 || o.PodMTU < 1280 || o.PodMTU > 65535 {
		return o, fmt.Errorf("options: mtu underlay %d pod %d: want 1280-65535 (IPv6 minimum)", o.UnderlayMTU, o.PodMTU)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o, nil
}

// checkName validates a node or pod name: a DNS label of at most 40 characters.
func checkName(kind, name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%s name %q: want a DNS label of at most 40 characters", kind, name)
	}
	return nil
}

// nodeAddrs is the addressing of node i (from 1).
type nodeAddrs struct {
	underlayV4, underlayV6 netip.Addr
	podV4, podV6           netip.Prefix
}

// addrsForNode computes the addresses of node i. IPv6 fields are zero with
// IPv4Only.
func (o Options) addrsForNode(i int) (nodeAddrs, error) {
	if i < 1 || i > maxNodes {
		return nodeAddrs{}, fmt.Errorf("node index %d: want 1-%d", i, maxNodes)
	}
	var a nodeAddrs
	var err error
	if a.underlayV4, err = hostAddr(o.UnderlayV4, big.NewInt(int64(10+i))); err != nil {
		return a, err
	}
	if a.podV4, err = subnet(o.PodCIDRV4, nodeBitsV4, big.NewInt(int64(i))); err != nil {
		return a, err
	}
	if o.IPv4Only {
		return a, nil
	}
	if a.underlayV6, err = hostAddr(o.UnderlayV6, decimalAsHex(10+i)); err != nil {
		return a, err
	}
	if a.podV6, err = subnet(o.PodCIDRV6, nodeBitsV6, decimalAsHex(i)); err != nil {
		return a, err
	}
	return a, nil
}

// addrsForPod computes the addresses of the k-th pod (from 0) of a node with
// pod CIDRs v4 and v6 (v6 may be the zero Prefix).
func addrsForPod(v4, v6 netip.Prefix, k int) (netip.Addr, netip.Addr, error) {
	if k < 0 || k >= maxPodsByNode {
		return netip.Addr{}, netip.Addr{}, fmt.Errorf("pod index %d: at most %d pods per node", k, maxPodsByNode)
	}
	a4, err := hostAddr(v4, big.NewInt(int64(10+k)))
	if err != nil || !v6.IsValid() {
		return a4, netip.Addr{}, err
	}
	a6, err := hostAddr(v6, decimalAsHex(10+k))
	return a4, a6, err
}

// decimalAsHex returns the number whose hex digits are the decimal digits of n
// (11 -> 0x11), so IPv6 addresses read like their IPv4 twins.
func decimalAsHex(n int) *big.Int {
	v, _ := new(big.Int).SetString(strconv.Itoa(n), 16)
	return v
}

// hostAddr returns the address at offset off inside p.
func hostAddr(p netip.Prefix, off *big.Int) (netip.Addr, error) {
	size := new(big.Int).Lsh(big.NewInt(1), uint(p.Addr().BitLen()-p.Bits()))
	if off.Sign() < 0 || off.Cmp(size) >= 0 {
		return netip.Addr{}, fmt.Errorf("host %s does not fit in %s", off, p)
	}
	return addrFromInt(new(big.Int).Add(addrToInt(p.Masked().Addr()), off), p.Addr().Is4()), nil
}

// subnet returns the i-th subnet of length bits inside p.
func subnet(p netip.Prefix, bits int, i *big.Int) (netip.Prefix, error) {
	if bits < p.Bits() || i.Sign() < 0 || i.BitLen() > bits-p.Bits() {
		return netip.Prefix{}, fmt.Errorf("subnet %s of /%d does not fit in %s", i, bits, p)
	}
	off := new(big.Int).Lsh(i, uint(p.Addr().BitLen()-bits))
	a := addrFromInt(new(big.Int).Add(addrToInt(p.Masked().Addr()), off), p.Addr().Is4())
	return netip.PrefixFrom(a, bits), nil
}

func addrToInt(a netip.Addr) *big.Int {
	return new(big.Int).SetBytes(a.AsSlice())
}

func addrFromInt(v *big.Int, is4 bool) netip.Addr {
	if is4 {
		var b [4]byte
		v.FillBytes(b[:])
		return netip.AddrFrom4(b)
	}
	var b [16]byte
	v.FillBytes(b[:])
	return netip.AddrFrom16(b)
}

// ifName is a Linux interface name: at most 15 bytes.
const ifNameMax = 15

// hostVethName names the node-side veth of pod: "lxc<pod>" when it fits and is
// free, else a 10-byte stem and 5 hex digits of a hash, probing until free.
func hostVethName(pod string, taken func(string) bool) string {
	base := "lxc" + pod
	if len(base) <= ifNameMax && !taken(base) {
		return base
	}
	h := fnv.New32a()
	h.Write([]byte(pod))
	sum := h.Sum32()
	stem := base[:min(len(base), ifNameMax-5)]
	for i := uint32(0); ; i++ {
		name := fmt.Sprintf("%s%05x", stem, (sum+i)&0xfffff)
		if !taken(name) {
			return name
		}
	}
}

// portName names the switch port of node i: "p<i>-<node>" cut to 15 bytes,
// unique because "p<i>-" is.
func portName(i int, node string) string {
	n := fmt.Sprintf("p%d-%s", i, node)
	return n[:min(len(n), ifNameMax)]
}
