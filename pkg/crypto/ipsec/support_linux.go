package ipsec

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// probeSPI is the SPI of the throwaway state [Supported] installs: below
// every wire SPI (>= 0x10000000), above the reserved 1-255.
const probeSPI = 0x0ffffff0

// Probe addresses: documentation ranges (RFC 5737, RFC 3849), never routed.
var (
	probeSrc4 = netip.MustParseAddr("192.0.2.1")
	probeDst4 = netip.MustParseAddr("192.0.2.2")
	probeSrc6 = netip.MustParseAddr("2001:db8::1")
	probeDst6 = netip.MustParseAddr("2001:db8::2")
)

type probeKey struct {
	alg    Algorithm
	v6     bool // underlay family
	inner6 bool // inner (pod) family
}

// Supported returns nil when the kernel behind h can install a tunnel-mode
// ESP state with AES-GCM (rfc4106(gcm(aes)), the default algorithm) for
// IPv4 pods over an IPv4 underlay, and an error wrapping [ErrNotSupported] when it cannot. It
// finds out for real: it adds a throwaway state (SPI 0x0ffffff0 between
// 192.0.2.1 and 192.0.2.2, reqid DefaultReqID, so a leftover is cleaned up
// by the next Apply) in h's namespace and deletes it. Supported is safe to
// call at any time; it never touches other states.
//
// What the kernel answers without ESP support: EPROTONOSUPPORT ("protocol
// not supported", CONFIG_INET_ESP unset: no xfrm_type for ESP); without GCM
// (CONFIG_CRYPTO_GCM unset, or gcm/ghash/seqiv modules not loaded):
// ENOSYS ("function not implemented"), which the kernel checks first. Both
// wrap ErrNotSupported, as do EAFNOSUPPORT and EOPNOTSUPP; other errors
// (EPERM without CAP_NET_ADMIN, ...) are returned as they are.
func Supported(h Netlink) error {
	return probe(h, probeKey{alg: AESGCM}, DefaultReqID)
}

// probe installs and removes a throwaway state for k.
func probe(h Netlink, k probeKey, reqID uint32) error {
	src, dst := probeSrc4, probeDst4
	if k.v6 {
		src, dst = probeSrc6, probeDst6
	}
	var material []byte
	switch k.alg {
	case AESGCM:
		material = make([]byte, 16+gcmSaltLen)
	default:
		material = make([]byte, 16+hmacKeyLen)
	}
	for i := range material {
		material[i] = byte(i + 1)
	}
	s := toNetlinkState(State{Src: src, Dst: dst, IPv6: k.inner6, SPI: probeSPI, Algorithm: k.alg, ICVBits: defaultICV, Key: material, ReqID: reqID})
	family := "IPv4"
	if k.v6 {
		family = "IPv6"
	}
	family = innerName(k.inner6) + " over " + family
	err := h.XfrmStateAdd(s)
	switch {
	case err == nil:
		if err := h.XfrmStateDel(s); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("probe ESP: delete throwaway state: %w", err)
		}
		return nil
	case errors.Is(err, unix.EEXIST):
		// The kernel parsed and built the state before finding the ID
		// taken, so ESP works. The state there is left alone: a leftover
		// probe of ours (our reqid) goes with the next Apply's clean-up,
		// anything else is not ours to delete.
		return nil
	case errors.Is(err, unix.EPROTONOSUPPORT), errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EAFNOSUPPORT), errors.Is(err, unix.EOPNOTSUPP):
		return fmt.Errorf("probe ESP tunnel state with %s, %s: %w: %w", k.alg, family, ErrNotSupported, err)
	default:
		return fmt.Errorf("probe ESP tunnel state with %s, %s: %w", k.alg, family, err)
	}
}

// probe checks, once per algorithm and underlay family, that the states
// can be installed. Only successes are cached: a kernel module loaded
// later turns a failure into success.
func (x *XFRM) probe(ctx context.Context, states []State) error {
	for _, s := range states {
		k := probeKey{alg: s.Algorithm, v6: s.Dst.Unmap().Is6(), inner6: s.IPv6}
		if x.probed[k] {
			continue
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("apply XFRM: %w", err)
		}
		if err := probe(x.nl, k, x.reqID); err != nil {
			return fmt.Errorf("apply XFRM: %w", err)
		}
		x.probed[k] = true
	}
	return nil
}
