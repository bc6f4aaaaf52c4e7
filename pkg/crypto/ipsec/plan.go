package ipsec

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Defaults of [PlanOptions] and [XFRMOptions].
const (
	// DefaultReqID marks the XFRM states and policies this package owns
	// ("mcry"). Nothing with another reqid is ever changed or deleted.
	DefaultReqID uint32 = 0x6d637279
	// DefaultPriority is the XFRM policy priority (lower values win). It
	// sits below the 0 that `ip xfrm policy` and most IKE daemons use, so a
	// hand-made or IKE policy for the same traffic takes precedence.
	DefaultPriority uint32 = 0x1000
	// ReplayWindow is the anti-replay window of inbound states, in packets:
	// the most the kernel's legacy (non-ESN) replay check supports.
	ReplayWindow = 32
)

// Node is one node of the mesh as IPsec sees it.
type Node struct {
	// Name identifies the node in logs, errors and [State.Node].
	Name string
	// ID is the node's IPsec node ID, 1-65535, unique among all nodes that
	// exchange IPsec traffic. It is part of the SPI ([SA.SPI]) and of the
	// key derivation ([DeriveKey]).
	ID uint16
	// BootID identifies the node's current boot (/proc/sys/kernel/random/boot_id).
	// It must change whenever the node's XFRM states may have been lost:
	// a reboot does that; an agent that finds its states gone under the
	// same boot ID must publish a new value (e.g. boot ID plus a
	// generation), or sequence numbers restart under unchanged keys.
	BootID string
	// Underlay is the node's address that ESP packets are sent from and
	// to (the tunnel endpoint). Local and remote underlays must be of the
	// same family.
	Underlay netip.Addr
	// PodCIDRs are the node's pod ranges, IPv4 and/or IPv6. They are
	// trusted: take them from the Kubernetes Node's spec.podCIDRs.
	PodCIDRs []netip.Prefix
	// InboundOnly, on a remote node, plans its states and its in and fwd
	// policies but no out policy: local pods' traffic to it is not
	// encrypted (and must be held back by the caller) until the remote
	// reports the inbound states for the outbound SPI, or while encryption
	// is being turned off and the remote may still send ESP.
	InboundOnly bool
}

// Dir is the direction of an XFRM state or policy, seen from the local
// node.
type Dir uint8

// Directions. States are DirOut (local encrypts, towards a remote) or DirIn
// (local decrypts, from a remote); policies are any of the three.
const (
	// DirOut encrypts traffic from local pods to a remote node's pods.
	DirOut Dir = iota + 1
	// DirIn checks traffic for local addresses: it must have been decrypted
	// by a state of the remote node that owns its source.
	DirIn
	// DirFwd is DirIn for traffic forwarded to local pods.
	DirFwd
)

// String returns "out", "in" or "fwd".
func (d Dir) String() string {
	switch d {
	case DirOut:
		return "out"
	case DirIn:
		return "in"
	case DirFwd:
		return "fwd"
	}
	return fmt.Sprintf("Dir(%d)", uint8(d))
}

// State is one desired ESP security association ([SA]): tunnel mode
// between underlay addresses, carrying the pod traffic of one inner family
// (its selector is that family's 0/0; the policies select the traffic).
type State struct {
	// Node is the remote node the state belongs to.
	Node string
	// Dir is DirOut (Src is the local underlay) or DirIn (Dst is).
	Dir Dir
	// Src and Dst are the tunnel endpoints.
	Src, Dst netip.Addr
	// IPv6 is the inner family: true for IPv6 pods, false for IPv4.
	IPv6 bool
	// SPI is the SA's SPI ([SA.SPI]); (Dst, SPI) identifies the state in
	// the kernel.
	SPI uint32
	// KeyringSPI is the keyring key the state's key is derived from.
	KeyringSPI uint8
	// Algorithm and ICVBits are the keyring key's.
	Algorithm Algorithm
	ICVBits   int
	// Key is the derived key material ([DeriveKey]); String never shows it.
	Key []byte
	// ReqID marks the state as owned by this package.
	ReqID uint32
	// ReplayWindow is the anti-replay window: [ReplayWindow] for inbound
	// states, 0 for outbound ones.
	ReplayWindow int
}

// String describes the state without its key, e.g.
// "out node-b 10.0.0.1->10.0.0.2 spi=0x10001002 key=1 rfc4106(gcm(aes)) icv=128".
func (s State) String() string {
	return fmt.Sprintf("%s %s %s %s->%s spi=%#08x key=%d %s icv=%d reqid=%#x replay=%d",
		s.Dir, s.Node, innerName(s.IPv6), s.Src, s.Dst, s.SPI, s.KeyringSPI, s.Algorithm, s.ICVBits, s.ReqID, s.ReplayWindow)
}

func innerName(ipv6 bool) string {
	if ipv6 {
		return "ipv6"
	}
	return "ipv4"
}

// GoString is String: %#v must not print the key either.
func (s State) GoString() string { return "ipsec.State{" + s.String() + "}" }

// Policy is one desired XFRM policy: traffic from Src to Dst (pod CIDRs of
// one family) goes through, or must come from, the ESP tunnel
// TmplSrc->TmplDst.
type Policy struct {
	// Node is the remote node the policy belongs to.
	Node string
	// Dir is the policy's direction.
	Dir Dir
	// Src and Dst are the selector: source and destination pod CIDRs.
	// (Dir, Src, Dst) identifies the policy in the kernel.
	Src, Dst netip.Prefix
	// TmplSrc and TmplDst are the tunnel endpoints of the template.
	TmplSrc, TmplDst netip.Addr
	// SPI pins the outbound state for DirOut (the wire SPI of
	// PlanOptions.OutboundSPI); 0 for DirIn and DirFwd, which accept any
	// state of the pair (every keyring SPI).
	SPI uint32
	// ReqID marks the policy as owned and must match the states' ReqID.
	ReqID uint32
	// Priority is the XFRM priority (lower wins).
	Priority uint32
	// Optional makes an inbound template optional: plaintext matching the
	// selector is accepted too ([PlanOptions.AcceptPlaintext]).
	Optional bool
}

// String describes the policy, e.g.
// "out node-b 10.244.1.0/24->10.244.2.0/24 tmpl 10.0.0.1->10.0.0.2 spi=0x10001002".
func (p Policy) String() string {
	s := fmt.Sprintf("%s %s %s->%s tmpl %s->%s spi=%#x reqid=%#x prio=%d", p.Dir, p.Node, p.Src, p.Dst, p.TmplSrc, p.TmplDst, p.SPI, p.ReqID, p.Priority)
	if p.Optional {
		s += " optional"
	}
	return s
}

// Skipped is a remote node left out of a plan, and why.
type Skipped struct {
	Node   string
	Reason string
}

// Desired is the complete XFRM configuration a node should have: states
// ordered by (Dst, SPI), policies by (Dir, Src, Dst).
type Desired struct {
	States   []State
	Policies []Policy
	// Skipped lists remote nodes that got no states or policies, ordered by
	// name. Traffic to their pod CIDRs matches no policy: the datapath's
	// strict mode must keep it from leaving in clear.
	Skipped []Skipped
}

// String lists the states (without keys), policies and skipped nodes, one
// per line.
func (d Desired) String() string {
	var b strings.Builder
	for _, s := range d.States {
		fmt.Fprintf(&b, "state %s\n", s)
	}
	for _, p := range d.Policies {
		fmt.Fprintf(&b, "policy %s\n", p)
	}
	for _, s := range d.Skipped {
		fmt.Fprintf(&b, "skipped %s: %s\n", s.Node, s.Reason)
	}
	return b.String()
}

// PlanOptions configures [Plan].
type PlanOptions struct {
	// OutboundSPI is the keyring SPI whose key local pods' traffic is
	// encrypted with; 0 means the keyring's current (highest) SPI. During
	// a rotation the agent keeps the old SPI here until every node reports
	// the new one installed.
	OutboundSPI uint8
	// ReqID marks the states and policies; 0 means DefaultReqID. It must
	// be the XFRM's ([XFRMOptions.ReqID]).
	ReqID uint32
	// Priority of the policies; 0 means DefaultPriority.
	Priority uint32
	// AcceptPlaintext makes the inbound (in and fwd) templates optional,
	// so remote pods' traffic is accepted in clear as well as decrypted.
	// Meant only for switching a running cluster to IPsec: without it a
	// node drops its peers' plaintext as soon as its own policies exist.
	AcceptPlaintext bool
}

// Plan returns the XFRM states and policies the local node needs to talk to
// remotes through tunnel-mode ESP. It is pure.
//
// For every valid remote node R, every inner family that the local node and
// R both have pod CIDRs of, and every key K of the keyring it plans an
// inbound state R->local and an outbound state local->R, each with its own
// derived key ([DeriveKey]) and SPI ([SA.SPI]). Inbound states for
// every keyring SPI let peers switch their outbound key at any time; the
// outbound states of SPIs other than OutboundSPI are standbys, never used
// until a policy names them, so switching the outbound key is one in-place
// policy update per pod CIDR pair with no state created or deleted.
//
// For every pair (local pod CIDR L, remote pod CIDR P) of the same family
// it plans an out policy L->P whose template is the tunnel local->R with
// the SPI of OutboundSPI's state, and in and fwd policies P->L whose template is
// the tunnel R->local with any SPI. IPv6 pod CIDRs over an IPv4 underlay
// (and the reverse) are fine in tunnel mode.
//
// Plan fails when the local node is invalid (ID 0, no boot ID, no
// underlay, an invalid pod CIDR), the keyring is empty, or OutboundSPI is
// not in it. A remote node that cannot be planned is left out and listed in
// Desired.Skipped: one with ID 0, the local ID, no boot ID, no underlay or
// one of another family than the local one, an invalid pod CIDR or one
// overlapping the local node's; and every remote of a group that shares a
// name, an ID, an underlay address or overlapping pod CIDRs, since it
// cannot be told which one is right.
func Plan(local Node, remotes []Node, keyring Keyring, opts PlanOptions) (Desired, error) {
	if opts.ReqID == 0 {
		opts.ReqID = DefaultReqID
	}
	if opts.Priority == 0 {
		opts.Priority = DefaultPriority
	}
	if keyring.Len() == 0 {
		return Desired{}, errors.New("plan: empty keyring")
	}
	if opts.OutboundSPI == 0 {
		cur, _ := keyring.Current()
		opts.OutboundSPI = cur.SPI()
	}
	if _, ok := keyring.Key(opts.OutboundSPI); !ok {
		return Desired{}, fmt.Errorf("plan: outbound SPI %d is not in the keyring (SPIs %v)", opts.OutboundSPI, keyring.SPIs())
	}
	local.Underlay = local.Underlay.Unmap()
	localCIDRs, err := normalizeCIDRs(local.PodCIDRs)
	if err != nil {
		return Desired{}, fmt.Errorf("plan: local node %s: %w", local.Name, err)
	}
	if local.ID == 0 || local.BootID == "" || len(local.BootID) > maxBootIDLen || !local.Underlay.IsValid() {
		return Desired{}, fmt.Errorf("plan: local node %s needs an IPsec node ID, a boot ID (1-%d bytes) and an underlay address (have %d, %q, %s)",
			local.Name, maxBootIDLen, local.ID, local.BootID, local.Underlay)
	}

	var d Desired
	skip := map[string]string{} // name -> reason
	type candidate struct {
		Node
		cidrs []netip.Prefix
	}
	var cands []candidate
	names := map[string]int{}
	for _, r := range remotes {
		names[r.Name]++
	}
	for _, r := range remotes {
		r.Underlay = r.Underlay.Unmap()
		reason := ""
		cidrs, err := normalizeCIDRs(r.PodCIDRs)
		switch {
		case r.Name == local.Name:
			reason = "has the local node's name"
		case names[r.Name] > 1:
			reason = "node name listed more than once"
		case r.ID == 0:
			reason = "no IPsec node ID"
		case r.ID == local.ID:
			reason = fmt.Sprintf("IPsec node ID %d is the local node's", r.ID)
		case r.BootID == "" || len(r.BootID) > maxBootIDLen:
			reason = fmt.Sprintf("boot ID of %d bytes, want 1-%d", len(r.BootID), maxBootIDLen)
		case !r.Underlay.IsValid():
			reason = "no underlay address"
		case r.Underlay.Is4() != local.Underlay.Is4():
			reason = fmt.Sprintf("underlay %s is not of the local underlay's family (%s)", r.Underlay, local.Underlay)
		case r.Underlay == local.Underlay:
			reason = fmt.Sprintf("underlay %s is the local node's", r.Underlay)
		case err != nil:
			reason = err.Error()
		default:
			for _, p := range cidrs {
				for _, l := range localCIDRs {
					if p.Overlaps(l) {
						reason = fmt.Sprintf("pod CIDR %s overlaps local pod CIDR %s", p, l)
					}
				}
			}
		}
		if reason != "" {
			if _, dup := skip[r.Name]; !dup {
				skip[r.Name] = reason
			}
			continue
		}
		cands = append(cands, candidate{Node: r, cidrs: cidrs})
	}
	// Conflicts between otherwise valid remotes: skip every party.
	for i := range cands {
		for j := range i {
			a, b := &cands[i], &cands[j]
			var why string
			switch {
			case a.ID == b.ID:
				why = fmt.Sprintf("IPsec node ID %d", a.ID)
			case a.Underlay == b.Underlay:
				why = fmt.Sprintf("underlay %s", a.Underlay)
			default:
				for _, p := range a.cidrs {
					for _, q := range b.cidrs {
						if p.Overlaps(q) && why == "" {
							why = fmt.Sprintf("overlapping pod CIDRs %s and %s", p, q)
						}
					}
				}
			}
			if why != "" {
				if _, ok := skip[a.Name]; !ok {
					skip[a.Name] = fmt.Sprintf("shares %s with node %s", why, b.Name)
				}
				if _, ok := skip[b.Name]; !ok {
					skip[b.Name] = fmt.Sprintf("shares %s with node %s", why, a.Name)
				}
			}
		}
	}

	for _, r := range cands {
		if _, skipped := skip[r.Name]; skipped {
			continue
		}
		families := map[bool]bool{} // IPv6 -> has a pair
		for _, l := range localCIDRs {
			for _, p := range r.cidrs {
				if l.Addr().Is4() != p.Addr().Is4() {
					continue
				}
				v6 := l.Addr().Is6()
				families[v6] = true
				if !r.InboundOnly {
					outSPI := SA{Src: local, Dst: r.Node, IPv6: v6}.SPI(opts.OutboundSPI)
					d.Policies = append(d.Policies, Policy{Node: r.Name, Dir: DirOut, Src: l, Dst: p,
						TmplSrc: local.Underlay, TmplDst: r.Underlay, SPI: outSPI, ReqID: opts.ReqID, Priority: opts.Priority})
				}
				d.Policies = append(d.Policies,
					Policy{Node: r.Name, Dir: DirIn, Src: p, Dst: l, TmplSrc: r.Underlay, TmplDst: local.Underlay,
						ReqID: opts.ReqID, Priority: opts.Priority, Optional: opts.AcceptPlaintext},
					Policy{Node: r.Name, Dir: DirFwd, Src: p, Dst: l, TmplSrc: r.Underlay, TmplDst: local.Underlay,
						ReqID: opts.ReqID, Priority: opts.Priority, Optional: opts.AcceptPlaintext},
				)
			}
		}
		for _, v6 := range []bool{false, true} {
			if !families[v6] {
				continue
			}
			states, err := planStates(local, r.Node, v6, keyring, opts)
			if err != nil { // not reached: inputs were validated
				return Desired{}, fmt.Errorf("plan: %w", err)
			}
			d.States = append(d.States, states...)
		}
	}
	for name, reason := range skip {
		d.Skipped = append(d.Skipped, Skipped{Node: name, Reason: reason})
	}
	slices.SortFunc(d.States, compareState)
	slices.SortFunc(d.Policies, comparePolicy)
	slices.SortFunc(d.Skipped, func(a, b Skipped) int { return cmp.Compare(a.Node, b.Node) })
	return d, nil
}

// planStates returns the inbound and outbound states between local and r
// for one inner family and every keyring key.
func planStates(local, r Node, v6 bool, keyring Keyring, opts PlanOptions) ([]State, error) {
	var out []State
	outSA, inSA := SA{Src: local, Dst: r, IPv6: v6}, SA{Src: r, Dst: local, IPv6: v6}
	for _, k := range keyring.keys {
		outKey, err := DeriveKey(k, outSA)
		if err != nil {
			return nil, err
		}
		inKey, err := DeriveKey(k, inSA)
		if err != nil {
			return nil, err
		}
		out = append(out,
			State{Node: r.Name, Dir: DirOut, Src: local.Underlay, Dst: r.Underlay, IPv6: v6, SPI: outSA.SPI(k.spi),
				KeyringSPI: k.spi, Algorithm: k.alg, ICVBits: k.icvBits, Key: outKey, ReqID: opts.ReqID},
			State{Node: r.Name, Dir: DirIn, Src: r.Underlay, Dst: local.Underlay, IPv6: v6, SPI: inSA.SPI(k.spi),
				KeyringSPI: k.spi, Algorithm: k.alg, ICVBits: k.icvBits, Key: inKey, ReqID: opts.ReqID, ReplayWindow: ReplayWindow},
		)
	}
	return out, nil
}

// normalizeCIDRs returns the masked, sorted, de-duplicated prefixes, or an
// error for an invalid or IPv4-mapped IPv6 prefix.
func normalizeCIDRs(in []netip.Prefix) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(in))
	for _, p := range in {
		if !p.IsValid() {
			return nil, fmt.Errorf("invalid pod CIDR %s", p)
		}
		if p.Addr().Is4In6() {
			return nil, fmt.Errorf("pod CIDR %s is IPv4-mapped IPv6; use the IPv4 form", p)
		}
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, comparePrefix)
	return slices.Compact(out), nil
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

func compareState(a, b State) int {
	if c := a.Dst.Compare(b.Dst); c != 0 {
		return c
	}
	return cmp.Compare(a.SPI, b.SPI)
}

func comparePolicy(a, b Policy) int {
	if c := cmp.Compare(a.Dir, b.Dir); c != 0 {
		return c
	}
	if c := comparePrefix(a.Src, b.Src); c != 0 {
		return c
	}
	return comparePrefix(a.Dst, b.Dst)
}
