package policy

import (
	"cmp"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"

	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

// block is an ipBlock peer: the addresses inside cidr and inside none of except.
type block struct {
	cidr   netip.Prefix
	except []netip.Prefix
}

// parseCIDR parses a CIDR of an ipBlock in the form the ipcache stores it: IPv4 as IPv4 (an
// IPv4-mapped IPv6 block becomes the IPv4 block it maps), host bits clear (refused when set, as
// the API server refuses them).
func parseCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR", s)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("%q has host bits set", s)
	}
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p, nil
}

// parseBlock checks an ipBlock as the API server does: a CIDR, and every exception a CIDR
// strictly inside it.
func parseBlock(cidr string, except []string) (block, error) {
	c, err := parseCIDR(cidr)
	if err != nil {
		return block{}, fmt.Errorf("ipBlock.cidr: %w", err)
	}
	b := block{cidr: c}
	for i, s := range except {
		e, err := parseCIDR(s)
		if err != nil {
			return block{}, fmt.Errorf("ipBlock.except[%d]: %w", i, err)
		}
		if !Inside(e, c) || e.Bits() == c.Bits() {
			return block{}, fmt.Errorf("ipBlock.except[%d]: %s is not strictly inside %s", i, e, c)
		}
		b.except = append(b.except, e)
	}
	return b, nil
}

// Inside reports whether prefix p lies inside prefix c: same address family, at least as long,
// and c contains p's address. Every prefix is inside itself.
func Inside(p, c netip.Prefix) bool {
	return p.Addr().Is4() == c.Addr().Is4() && p.Bits() >= c.Bits() && c.Contains(p.Addr())
}

// covers reports whether the block selects the addresses of a CIDR identity's prefix p. It is
// exact for every p of the compiled set: the block's own cidr and exceptions are in that set,
// so an address's longest matching prefix lies inside the cidr exactly when the address does,
// and inside an exception exactly when the address is.
func (b block) covers(p netip.Prefix) bool {
	if !Inside(p, b.cidr) {
		return false
	}
	for _, e := range b.except {
		if Inside(p, e) {
			return false
		}
	}
	return true
}

// comparePrefix orders prefixes IPv4 first, then by address, then shorter first.
func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// cidrSpace is the number of CIDR identities: identity.MinCIDR up to the largest uint32.
const cidrSpace = 1<<32 - uint64(identity.MinCIDR)

// cidrIdentities gives each distinct prefix its CIDR identity: a hash of the prefix into
// identity.MinCIDR and up, probing upwards on a collision, prefixes taken in prefix order. The
// number depends on the set of prefixes only, and a prefix keeps its number when other
// prefixes come and go (unless they collide with it, a chance of about n/4e9 for n prefixes):
// a policy change elsewhere does not renumber a block, so its ipcache entry and its allow
// entries do not change under traffic, and the CLI computes the numbers the agents use.
func cidrIdentities(prefixes map[netip.Prefix]bool) map[netip.Prefix]uint32 {
	sorted := make([]netip.Prefix, 0, len(prefixes))
	for p := range prefixes {
		sorted = append(sorted, p)
	}
	slices.SortFunc(sorted, comparePrefix)
	out := make(map[netip.Prefix]uint32, len(sorted))
	used := make(map[uint32]bool, len(sorted))
	for _, p := range sorted {
		h := fnv.New64a()
		a := p.Addr().As16()
		h.Write(a[:])
		h.Write([]byte{byte(p.Bits()), b2u(p.Addr().Is4())})
		n := h.Sum64() % cidrSpace
		id := uint32(uint64(identity.MinCIDR) + n)
		for used[id] {
			n = (n + 1) % cidrSpace
			id = uint32(uint64(identity.MinCIDR) + n)
		}
		used[id] = true
		out[p] = id
	}
	return out
}

func b2u(b bool) byte {
	if b {
		return 1
	}
	return 0
}

// Lookup is the ipcache's view of the CIDR identities alone: the identity of the longest
// prefix containing addr, or world (2) when none does. Pod and node addresses, which the
// agent's ipcache maps more specifically, are not in cidrs; the CLI uses it to explain an
// address outside the cluster.
func Lookup(cidrs map[netip.Prefix]uint32, addr netip.Addr) uint32 {
	addr = addr.Unmap()
	for bits := addr.BitLen(); bits >= 0; bits-- {
		p, _ := addr.Prefix(bits)
		if id, ok := cidrs[p]; ok {
			return id
		}
	}
	return uint32(identity.World)
}
