package ipsec

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrNotSupported is wrapped by [Supported] and [XFRM.Apply] when the kernel
// cannot install the ESP states asked for: no ESP (CONFIG_INET_ESP or
// CONFIG_INET6_ESP unset: EPROTONOSUPPORT), no such algorithm (no GCM:
// ENOSYS, "function not implemented"), no such address family or no XFRM
// netlink at all. The agent then refuses the IPsec mode with a clear
// condition; it never falls back to clear text.
var ErrNotSupported = errors.New("IPsec ESP not supported by the kernel")

// ErrConflict is wrapped by [XFRM.Apply] when a desired state or policy
// would replace an XFRM entry this package does not own (another reqid):
// Apply changes nothing then.
var ErrConflict = errors.New("conflicts with an XFRM entry meshcrypt does not own")

// ErrKeyReuse is wrapped by [XFRM.Apply] when an outbound state would have
// to be re-created with the key it already has, which would restart its
// sequence numbers under an unchanged key. Keys change with boot IDs and
// underlay addresses ([DeriveKey]), so this means the state was modified
// behind Apply's back; Apply changes nothing then.
var ErrKeyReuse = errors.New("outbound state would be re-created with an unchanged key")

// Netlink is the part of *netlink.Handle that [XFRM] uses. The handle must
// be bound to the node's network namespace (netlink.NewHandleAt). Package
// ipsectest has an in-memory fake.
type Netlink interface {
	XfrmStateList(family int) ([]netlink.XfrmState, error)
	XfrmStateAdd(state *netlink.XfrmState) error
	XfrmStateDel(state *netlink.XfrmState) error
	XfrmPolicyList(family int) ([]netlink.XfrmPolicy, error)
	XfrmPolicyGet(policy *netlink.XfrmPolicy) (*netlink.XfrmPolicy, error)
	XfrmPolicyAdd(policy *netlink.XfrmPolicy) error
	XfrmPolicyUpdate(policy *netlink.XfrmPolicy) error
	XfrmPolicyDel(policy *netlink.XfrmPolicy) error
}

var _ Netlink = (*netlink.Handle)(nil)

// XFRMOptions configures [NewXFRM].
type XFRMOptions struct {
	// ReqID marks owned states and policies; 0 means DefaultReqID. It must
	// be the PlanOptions.ReqID of the Desired values applied.
	ReqID uint32
	// Logger receives one record per change; nil discards them.
	Logger *slog.Logger
}

// XFRM is the kernel edge: it makes a node's XFRM states and policies match
// a [Desired]. Its methods are safe for concurrent use. It holds no kernel
// resources of its own; the caller owns and closes the netlink handle.
type XFRM struct {
	nl    Netlink
	reqID uint32
	log   *slog.Logger

	mu     sync.Mutex
	probed map[probeKey]bool
	dirs   map[stateID]State // last applied states without keys, for Status
}

// NewXFRM returns an XFRM working through h. It does no I/O.
func NewXFRM(h Netlink, opts XFRMOptions) *XFRM {
	if opts.ReqID == 0 {
		opts.ReqID = DefaultReqID
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &XFRM{nl: h, reqID: opts.ReqID, log: log, probed: map[probeKey]bool{}, dirs: map[stateID]State{}}
}

// Stats counts what an Apply changed.
type Stats struct {
	StatesAdded, StatesReplaced, StatesRemoved      int
	PoliciesAdded, PoliciesUpdated, PoliciesRemoved int
}

// Changed reports whether anything changed.
func (s Stats) Changed() bool { return s != Stats{} }

// String formats s for logs.
func (s Stats) String() string {
	return fmt.Sprintf("states +%d ~%d -%d, policies +%d ~%d -%d", s.StatesAdded, s.StatesReplaced, s.StatesRemoved,
		s.PoliciesAdded, s.PoliciesUpdated, s.PoliciesRemoved)
}

// Log attribute keys.
const (
	logKeyNode = "node"
	logKeySPI  = "spi"
	logKeyDir  = "dir"
	logKeySel  = "selector"
)

// stateID is how the kernel identifies an ESP state.
type stateID struct {
	dst netip.Addr
	spi uint32
}

// Apply makes the kernel's owned XFRM states and policies exactly d: it
// adds what is missing, replaces or updates what differs, removes owned
// entries d lacks, and never touches an entry with another reqid. It is
// idempotent (a second Apply of the same d changes nothing) and returns
// what it changed, also on error. Apply(ctx, Desired{}) removes everything
// the package installed.
//
// Before changing anything Apply validates d, probes (once per algorithm,
// underlay family and pod family, then cached) that the kernel can install
// the ESP states d has (else an error wrapping [ErrNotSupported]), reads the
// current states and policies (dumps are retried when interrupted,
// netlink.ErrDumpInterrupted, and never trusted partially), and checks for
// [ErrConflict] and [ErrKeyReuse]. Then it changes the kernel in this order,
// so that matching traffic is never sent in clear and, except for a state
// whose key changes, never dropped:
//
//  1. add new states: a policy added or updated later finds its state;
//  2. replace states whose key changed (delete, then add: XFRM cannot
//     change a state's key in place; packets of that SA are dropped in the
//     gap, never sent in clear, since its policy stays);
//  3. add new policies and update changed ones in place
//     (XFRM_MSG_UPDPOLICY inserts the new policy before unlinking the old
//     one, atomically for packet lookups: no window without a policy);
//  4. delete stale policies: only selectors no longer desired (their
//     traffic is no longer encrypted: the caller stops routing it first,
//     e.g. for a node that left, or the datapath's strict mode drops it);
//  5. delete stale states, after the policies that used them.
//
// A block policy "in front" of a policy being replaced is not used: XFRM
// identifies a policy by direction, selector and mark, not priority, so a
// second policy with the same selector cannot coexist; the in-place update
// makes it unnecessary.
//
// A failed step stops Apply; the order above leaves a safe state after any
// prefix of the steps, and the next Apply finishes the work.
func (x *XFRM) Apply(ctx context.Context, d Desired) (Stats, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	var st Stats
	if err := x.validate(d); err != nil {
		return st, fmt.Errorf("apply XFRM: %w", err)
	}
	if err := x.probe(ctx, d.States); err != nil {
		return st, err
	}
	ops, err := x.diff(ctx, d)
	if err != nil {
		return st, fmt.Errorf("apply XFRM: %w", err)
	}
	for _, op := range ops {
		if err := ctx.Err(); err != nil {
			return st, fmt.Errorf("apply XFRM: %w", err)
		}
		if err := op.do(x.nl); err != nil {
			return st, fmt.Errorf("apply XFRM: %s: %w", op, err)
		}
		op.count(&st)
		x.log.Debug("XFRM "+op.String(), op.attrs()...)
	}
	clear(x.dirs)
	for _, s := range d.States {
		s.Key = nil // Status needs the node and direction, not the key
		x.dirs[stateID{netlinkForm(s.Dst), s.SPI}] = s
	}
	if st.Changed() {
		x.log.Info("applied XFRM states and policies", "changes", st.String(), "states", len(d.States), "policies", len(d.Policies))
	}
	return st, nil
}

// validate checks d against what Apply can install.
func (x *XFRM) validate(d Desired) error {
	var errs []error
	ids := map[stateID]bool{}
	for _, s := range d.States {
		if err := x.validateState(s); err != nil {
			errs = append(errs, fmt.Errorf("state %s: %w", s, err))
			continue
		}
		id := stateID{netlinkForm(s.Dst), s.SPI}
		if ids[id] {
			errs = append(errs, fmt.Errorf("state %s: duplicate (destination, SPI)", s))
		}
		ids[id] = true
	}
	type polID struct {
		dir      Dir
		src, dst netip.Prefix
	}
	pids := map[polID]bool{}
	for _, p := range d.Policies {
		if err := x.validatePolicy(p); err != nil {
			errs = append(errs, fmt.Errorf("policy %s: %w", p, err))
			continue
		}
		id := polID{p.Dir, p.Src.Masked(), p.Dst.Masked()}
		if pids[id] {
			errs = append(errs, fmt.Errorf("policy %s: duplicate (direction, selector)", p))
		}
		pids[id] = true
	}
	return errors.Join(errs...)
}

func (x *XFRM) validateState(s State) error {
	switch {
	case s.ReqID != x.reqID:
		return fmt.Errorf("reqid %#x is not the XFRM's %#x", s.ReqID, x.reqID)
	case s.Dir != DirIn && s.Dir != DirOut:
		return fmt.Errorf("direction %s", s.Dir)
	case !s.Src.IsValid() || !s.Dst.IsValid() || s.Src.Unmap().Is4() != s.Dst.Unmap().Is4():
		return errors.New("endpoints must be valid addresses of one family")
	case s.SPI < 0x100:
		return fmt.Errorf("SPI %#x in the reserved range", s.SPI)
	case s.ReplayWindow < 0 || s.ReplayWindow > 32:
		return fmt.Errorf("replay window %d, want 0-32", s.ReplayWindow)
	}
	if _, err := NewKey(MinSPI, s.Algorithm, s.Key, s.ICVBits); err != nil {
		return err
	}
	return nil
}

func (x *XFRM) validatePolicy(p Policy) error {
	switch {
	case p.ReqID != x.reqID:
		return fmt.Errorf("reqid %#x is not the XFRM's %#x", p.ReqID, x.reqID)
	case p.Dir != DirIn && p.Dir != DirOut && p.Dir != DirFwd:
		return fmt.Errorf("direction %s", p.Dir)
	case !p.Src.IsValid() || !p.Dst.IsValid() || p.Src.Addr().Is4() != p.Dst.Addr().Is4() || p.Src.Addr().Is4In6() || p.Dst.Addr().Is4In6():
		return errors.New("selector must be two valid prefixes of one family (no IPv4-mapped IPv6)")
	case !p.TmplSrc.IsValid() || !p.TmplDst.IsValid() || p.TmplSrc.Unmap().Is4() != p.TmplDst.Unmap().Is4():
		return errors.New("template endpoints must be valid addresses of one family")
	case p.Optional && p.Dir == DirOut:
		return errors.New("an outbound template cannot be optional")
	}
	return nil
}

// op is one kernel change.
type op struct {
	kind   opKind
	state  *netlink.XfrmState
	policy *netlink.XfrmPolicy
	desc   string // state or policy description, without keys
	node   string
}

type opKind int

const (
	opStateAdd opKind = iota
	opStateReplace
	opPolicyAdd
	opPolicyUpdate
	opPolicyDel
	opStateDel
)

func (o op) String() string {
	return [...]string{"add state", "replace state", "add policy", "update policy", "delete policy", "delete state"}[o.kind] + " " + o.desc
}

func (o op) attrs() []any {
	var a []any
	if o.node != "" {
		a = append(a, logKeyNode, o.node)
	}
	if o.state != nil {
		a = append(a, logKeySPI, fmt.Sprintf("%#x", uint32(o.state.Spi)))
	}
	if o.policy != nil {
		a = append(a, logKeyDir, o.policy.Dir.String(), logKeySel, fmt.Sprintf("%v->%v", o.policy.Src, o.policy.Dst))
	}
	return a
}

func (o op) do(h Netlink) error {
	switch o.kind {
	case opStateAdd:
		return h.XfrmStateAdd(o.state)
	case opStateReplace:
		if err := h.XfrmStateDel(o.state); err != nil && !errors.Is(err, unix.ESRCH) {
			return err
		}
		return h.XfrmStateAdd(o.state)
	case opPolicyAdd:
		return h.XfrmPolicyAdd(o.policy)
	case opPolicyUpdate:
		return h.XfrmPolicyUpdate(o.policy)
	case opPolicyDel:
		if err := h.XfrmPolicyDel(o.policy); err != nil && !errors.Is(err, unix.ENOENT) {
			return err
		}
		return nil
	case opStateDel:
		if err := h.XfrmStateDel(o.state); err != nil && !errors.Is(err, unix.ESRCH) {
			return err
		}
		return nil
	}
	return fmt.Errorf("unknown operation %d", o.kind)
}

func (o op) count(st *Stats) {
	switch o.kind {
	case opStateAdd:
		st.StatesAdded++
	case opStateReplace:
		st.StatesReplaced++
	case opPolicyAdd:
		st.PoliciesAdded++
	case opPolicyUpdate:
		st.PoliciesUpdated++
	case opPolicyDel:
		st.PoliciesRemoved++
	case opStateDel:
		st.StatesRemoved++
	}
}

// diff reads the kernel and returns the changes that turn it into d, in
// the order Apply documents. It changes nothing.
func (x *XFRM) diff(ctx context.Context, d Desired) ([]op, error) {
	var ops []op
	var errs []error

	// States.
	cur, err := dump(ctx, "XFRM states", func() ([]netlink.XfrmState, error) { return x.nl.XfrmStateList(netlink.FAMILY_ALL) })
	if err != nil {
		return nil, err
	}
	byID := make(map[stateID]int, len(cur)) // current ESP states without a mark
	for i, c := range cur {
		dst, ok := netip.AddrFromSlice(c.Dst)
		if ok && c.Proto == netlink.XFRM_PROTO_ESP && c.Mark == nil {
			byID[stateID{netlinkForm(dst), uint32(c.Spi)}] = i
		}
	}
	want := map[stateID]bool{}
	for _, s := range d.States {
		id := stateID{netlinkForm(s.Dst), s.SPI}
		want[id] = true
		ns := toNetlinkState(s)
		i, found := byID[id]
		switch {
		case !found:
			ops = append(ops, op{kind: opStateAdd, state: ns, desc: s.String(), node: s.Node})
		case uint32(cur[i].Reqid) != x.reqID:
			errs = append(errs, fmt.Errorf("state %s: existing state has reqid %#x: %w", s, cur[i].Reqid, ErrConflict))
		case stateEqual(&cur[i], s):
		case s.Dir == DirOut && sameKey(&cur[i], s):
			errs = append(errs, fmt.Errorf("state %s: %w", s, ErrKeyReuse))
		default:
			ops = append(ops, op{kind: opStateReplace, state: ns, desc: s.String(), node: s.Node})
		}
	}
	var staleStates []op
	for id, i := range byID {
		c := &cur[i]
		if uint32(c.Reqid) != x.reqID || want[id] {
			continue
		}
		staleStates = append(staleStates, op{kind: opStateDel, state: &netlink.XfrmState{Src: c.Src, Dst: c.Dst, Proto: c.Proto, Spi: c.Spi},
			desc: fmt.Sprintf("%s->%s spi=%#x", c.Src, c.Dst, uint32(c.Spi))})
	}
	slices.SortFunc(staleStates, func(a, b op) int {
		if c := compareIP(a.state.Dst, b.state.Dst); c != 0 {
			return c
		}
		return cmp.Compare(uint32(a.state.Spi), uint32(b.state.Spi))
	})

	// Policies: look each desired one up by its selector (the dump
	// misparses IPv6 selectors whose last 12 bytes are zero, so it is used
	// only to find stale owned policies, by index).
	keep := map[int]bool{} // index of owned policies that stay
	for _, p := range d.Policies {
		np := toNetlinkPolicy(p)
		got, err := x.nl.XfrmPolicyGet(&netlink.XfrmPolicy{Src: np.Src, Dst: np.Dst, Dir: np.Dir})
		switch {
		case errors.Is(err, unix.ENOENT):
			ops = append(ops, op{kind: opPolicyAdd, policy: np, desc: p.String(), node: p.Node})
		case err != nil:
			return nil, fmt.Errorf("get policy %s: %w", p, err)
		case !x.ownsPolicy(got):
			errs = append(errs, fmt.Errorf("policy %s: existing policy (index %d) has templates %v: %w", p, got.Index, got.Tmpls, ErrConflict))
		case policyEqual(got, p):
			keep[got.Index] = true
		default:
			keep[got.Index] = true
			ops = append(ops, op{kind: opPolicyUpdate, policy: np, desc: p.String(), node: p.Node})
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	var stalePolicies []op
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		pols, err := dump(ctx, "XFRM policies", func() ([]netlink.XfrmPolicy, error) { return x.nl.XfrmPolicyList(fam) })
		if err != nil {
			return nil, err
		}
		for i := range pols {
			p := &pols[i]
			if !x.ownsPolicy(p) || keep[p.Index] {
				continue
			}
			stalePolicies = append(stalePolicies, op{kind: opPolicyDel,
				policy: &netlink.XfrmPolicy{Index: p.Index, Dir: p.Dir, Mark: p.Mark, Ifid: p.Ifid},
				desc:   fmt.Sprintf("%s index %d tmpl %v", p.Dir, p.Index, p.Tmpls)})
		}
	}
	slices.SortFunc(stalePolicies, func(a, b op) int {
		if c := cmp.Compare(a.policy.Dir, b.policy.Dir); c != 0 {
			return c
		}
		return cmp.Compare(a.policy.Index, b.policy.Index)
	})
	// Order: state adds, state replacements, policy adds and updates (in
	// d's order: states by destination and SPI, policies by direction and
	// selector), policy deletes, state deletes.
	slices.SortStableFunc(ops, func(a, b op) int { return int(a.kind) - int(b.kind) })
	ops = append(ops, stalePolicies...)
	ops = append(ops, staleStates...)
	return ops, nil
}

// ownsPolicy reports whether p is one of ours: a template with our reqid.
func (x *XFRM) ownsPolicy(p *netlink.XfrmPolicy) bool {
	return slices.ContainsFunc(p.Tmpls, func(t netlink.XfrmPolicyTmpl) bool { return uint32(t.Reqid) == x.reqID })
}

// maxDumpAttempts bounds the retries of an interrupted dump.
const maxDumpAttempts = 10

// dump calls list until its result is not interrupted by a concurrent
// change (netlink.ErrDumpInterrupted), which would make it partial.
func dump[T any](ctx context.Context, what string, list func() ([]T, error)) ([]T, error) {
	for attempt := 1; ; attempt++ {
		v, err := list()
		if err == nil {
			return v, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return nil, fmt.Errorf("list %s: %w", what, err)
		}
		if attempt == maxDumpAttempts {
			return nil, fmt.Errorf("list %s: interrupted %d times: %w", what, attempt, err)
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("list %s: %w", what, err)
		}
	}
}

// Kernel algorithm names.
const (
	kernelCBC  = "cbc(aes)"
	kernelHMAC = "hmac(sha256)"
)

// Selectors of the states: everything of one inner family.
var (
	anyIPv4 = netip.MustParsePrefix("0.0.0.0/0")
	anyIPv6 = netip.MustParsePrefix("::/0")
)

// toNetlinkState converts a desired state: tunnel mode, a selector of its
// inner family's 0/0, Aead for AES-GCM or Crypt+Auth for AES-CBC/HMAC.
func toNetlinkState(s State) *netlink.XfrmState {
	sel := anyIPv4
	if s.IPv6 {
		sel = anyIPv6
	}
	ns := &netlink.XfrmState{
		Selector:     &netlink.XfrmPolicy{Src: ipNet(sel), Dst: ipNet(sel)},
		Src:          ipOf(s.Src),
		Dst:          ipOf(s.Dst),
		Proto:        netlink.XFRM_PROTO_ESP,
		Mode:         netlink.XFRM_MODE_TUNNEL,
		Spi:          int(s.SPI),
		Reqid:        int(s.ReqID),
		ReplayWindow: s.ReplayWindow,
	}
	switch s.Algorithm {
	case AESGCM:
		ns.Aead = &netlink.XfrmStateAlgo{Name: string(AESGCM), Key: bytes.Clone(s.Key), ICVLen: s.ICVBits}
	case AESCBCHMACSHA256:
		split := len(s.Key) - hmacKeyLen
		ns.Crypt = &netlink.XfrmStateAlgo{Name: kernelCBC, Key: bytes.Clone(s.Key[:split])}
		ns.Auth = &netlink.XfrmStateAlgo{Name: kernelHMAC, Key: bytes.Clone(s.Key[split:]), TruncateLen: hmacTruncat}
	}
	return ns
}

// sameKey reports whether the kernel state c has s's key material.
func sameKey(c *netlink.XfrmState, s State) bool {
	switch s.Algorithm {
	case AESGCM:
		return c.Aead != nil && bytes.Equal(c.Aead.Key, s.Key)
	case AESCBCHMACSHA256:
		split := len(s.Key) - hmacKeyLen
		return c.Crypt != nil && c.Auth != nil && bytes.Equal(c.Crypt.Key, s.Key[:split]) && bytes.Equal(c.Auth.Key, s.Key[split:])
	}
	return false
}

// stateEqual reports whether the kernel state c is s (same ID assumed).
func stateEqual(c *netlink.XfrmState, s State) bool {
	if !sameAddr(s.Src, c.Src) || c.Mode != netlink.XFRM_MODE_TUNNEL || uint32(c.Reqid) != s.ReqID ||
		c.ReplayWindow != s.ReplayWindow || c.Encap != nil || c.OutputMark != nil || c.Ifid != 0 || !sameKey(c, s) ||
		!selectsAll(c.Selector, s.IPv6) {
		return false
	}
	switch s.Algorithm {
	case AESGCM:
		return c.Crypt == nil && c.Auth == nil && c.Aead.Name == string(AESGCM) && c.Aead.ICVLen == s.ICVBits
	case AESCBCHMACSHA256:
		return c.Aead == nil && c.Crypt.Name == kernelCBC && c.Auth.Name == kernelHMAC && c.Auth.TruncateLen == hmacTruncat
	}
	return false
}

// selectsAll reports whether a state's selector, as netlink reads it back,
// is 0/0 of the given family, any protocol and port.
func selectsAll(sel *netlink.XfrmPolicy, ipv6 bool) bool {
	if sel == nil || sel.Src == nil || sel.Dst == nil || sel.Proto != 0 || sel.SrcPort != 0 || sel.DstPort != 0 || sel.Ifindex != 0 {
		return false
	}
	want := anyIPv4
	if ipv6 {
		want = anyIPv6
	}
	for _, n := range []*net.IPNet{sel.Src, sel.Dst} {
		ones, bits := n.Mask.Size()
		a, ok := netip.AddrFromSlice(n.IP)
		if !ok || ones != 0 || bits != want.Addr().BitLen() || !a.Unmap().IsUnspecified() || (a.Unmap().Is6() != ipv6) {
			return false
		}
	}
	return true
}

// toNetlinkPolicy converts a desired policy.
func toNetlinkPolicy(p Policy) *netlink.XfrmPolicy {
	dir := map[Dir]netlink.Dir{DirOut: netlink.XFRM_DIR_OUT, DirIn: netlink.XFRM_DIR_IN, DirFwd: netlink.XFRM_DIR_FWD}[p.Dir]
	opt := 0
	if p.Optional {
		opt = 1
	}
	return &netlink.XfrmPolicy{
		Src:      ipNet(p.Src),
		Dst:      ipNet(p.Dst),
		Dir:      dir,
		Priority: int(p.Priority),
		Action:   netlink.XFRM_POLICY_ALLOW,
		Tmpls: []netlink.XfrmPolicyTmpl{{
			Src:      ipOf(p.TmplSrc),
			Dst:      ipOf(p.TmplDst),
			Proto:    netlink.XFRM_PROTO_ESP,
			Mode:     netlink.XFRM_MODE_TUNNEL,
			Spi:      int(p.SPI),
			Reqid:    int(p.ReqID),
			Optional: opt,
		}},
	}
}

// policyEqual reports whether the kernel policy c (found by p's selector
// and direction) is p.
func policyEqual(c *netlink.XfrmPolicy, p Policy) bool {
	if c.Priority != int(p.Priority) || c.Action != netlink.XFRM_POLICY_ALLOW || len(c.Tmpls) != 1 || c.Ifid != 0 {
		return false
	}
	t := c.Tmpls[0]
	opt := 0
	if p.Optional {
		opt = 1
	}
	return sameAddr(p.TmplSrc, t.Src) && sameAddr(p.TmplDst, t.Dst) && t.Proto == netlink.XFRM_PROTO_ESP &&
		t.Mode == netlink.XFRM_MODE_TUNNEL && uint32(t.Spi) == p.SPI && uint32(t.Reqid) == p.ReqID && t.Optional == opt
}

// netlinkForm returns a as netlink reads it back from the kernel: an IPv6
// address whose last 12 bytes are zero comes back as IPv4 (netlink guesses
// the family from the bytes).
func netlinkForm(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		b := a.As16()
		if [12]byte(b[4:]) == [12]byte{} {
			return netip.AddrFrom4([4]byte(b[:4]))
		}
	}
	return a
}

// sameAddr compares an address with one read back through netlink, which
// turns IPv6 addresses whose last 12 bytes are zero into IPv4-mapped ones
// (it guesses the family from the bytes).
func sameAddr(want netip.Addr, got net.IP) bool {
	g, ok := netip.AddrFromSlice(got)
	if !ok {
		return false
	}
	return netlinkForm(want) == netlinkForm(g)
}

func compareIP(a, b net.IP) int {
	x, _ := netip.AddrFromSlice(a)
	y, _ := netip.AddrFromSlice(b)
	return x.Unmap().Compare(y.Unmap())
}

func ipOf(a netip.Addr) net.IP { return net.IP(a.Unmap().AsSlice()) }

func ipNet(p netip.Prefix) *net.IPNet {
	p = p.Masked()
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
