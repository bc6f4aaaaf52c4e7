package ipsectest

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

var _ ipsec.Netlink = (*Kernel)(nil)

// Kernel is a fake XFRM: states identified by (destination, SPI, protocol)
// and policies by (direction, selector), as the kernel identifies them
// (marks are not modelled). Its errors are the kernel's errnos: EEXIST,
// ESRCH for a missing state, ENOENT for a missing policy, EINVAL for what
// the kernel would reject, EPROTONOSUPPORT for ESP states when
// ESPUnsupported. Its methods are safe for concurrent use.
type Kernel struct {
	mu          sync.Mutex
	states      map[stateKey]netlink.XfrmState
	policies    map[policyKey]netlink.XfrmPolicy
	nextIndex   int
	ops         []string
	unsupported bool
	interrupts  int
	failNext    map[string]error
	onChange    func(op string)
}

type stateKey struct {
	dst   netip.Addr
	spi   uint32
	proto netlink.Proto
}

type policyKey struct {
	dir      netlink.Dir
	src, dst netip.Prefix
}

// NewKernel returns an empty fake.
func NewKernel() *Kernel {
	return &Kernel{states: map[stateKey]netlink.XfrmState{}, policies: map[policyKey]netlink.XfrmPolicy{}, failNext: map[string]error{}}
}

// SetESPUnsupported makes every later state add fail with EPROTONOSUPPORT,
// as on a kernel without CONFIG_INET_ESP (or succeed again with false).
func (k *Kernel) SetESPUnsupported(v bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.unsupported = v
}

// InterruptDumps makes the next n list calls return half their entries and
// netlink.ErrDumpInterrupted, as when the table changes during a dump.
func (k *Kernel) InterruptDumps(n int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.interrupts = n
}

// FailNext makes the next operation of the given kind fail with err
// without changing anything. Kinds are the first two words of an Ops
// entry: "state add", "state del", "policy add", "policy update",
// "policy del".
func (k *Kernel) FailNext(kind string, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.failNext[kind] = err
}

// OnChange registers fn to be called after every successful change, with
// the Ops entry, outside the fake's lock: fn may inspect the fake (String,
// States, Policies) to check invariants between operations.
func (k *Kernel) OnChange(fn func(op string)) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.onChange = fn
}

// Ops returns the successful changes so far, oldest first, e.g.
// "state add 10.0.0.2 spi=0x10001002" or
// "policy update out 10.244.1.0/24->10.244.2.0/24 spi=0x20001002".
func (k *Kernel) Ops() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.ops)
}

// ResetOps forgets the recorded operations.
func (k *Kernel) ResetOps() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.ops = nil
}

// States returns copies of the states, sorted by destination and SPI.
func (k *Kernel) States() []netlink.XfrmState {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.sortedStates()
}

// Policies returns copies of the policies, sorted by direction and selector.
func (k *Kernel) Policies() []netlink.XfrmPolicy {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.sortedPolicies()
}

// String prints the state sorted, one entry per line; keys appear as the
// first 4 bytes of their SHA-256, so a golden file shows a key change
// without holding keys.
func (k *Kernel) String() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var b strings.Builder
	for _, s := range k.sortedStates() {
		fmt.Fprintf(&b, "state %s->%s %s spi=%#x reqid=%#x %s replay=%d", s.Src, s.Dst, s.Proto, uint32(s.Spi), uint32(s.Reqid), s.Mode, s.ReplayWindow)
		if s.Selector != nil {
			fmt.Fprintf(&b, " sel %s->%s", prefixOf(s.Selector.Src), prefixOf(s.Selector.Dst))
		}
		for _, a := range []*netlink.XfrmStateAlgo{s.Aead, s.Crypt, s.Auth} {
			if a != nil {
				sum := sha256.Sum256(a.Key)
				fmt.Fprintf(&b, " %s key=%x", a.Name, sum[:4])
				if a.ICVLen != 0 {
					fmt.Fprintf(&b, " icv=%d", a.ICVLen)
				}
				if a.TruncateLen != 0 {
					fmt.Fprintf(&b, " trunc=%d", a.TruncateLen)
				}
			}
		}
		b.WriteByte('\n')
	}
	for _, p := range k.sortedPolicies() {
		fmt.Fprintf(&b, "policy %s %s->%s prio=%d %s", dirName(p.Dir), prefixOf(p.Src), prefixOf(p.Dst), p.Priority, p.Action)
		for _, t := range p.Tmpls {
			fmt.Fprintf(&b, " tmpl %s->%s %s %s spi=%#x reqid=%#x", t.Src, t.Dst, t.Proto, t.Mode, uint32(t.Spi), uint32(t.Reqid))
			if t.Optional != 0 {
				b.WriteString(" optional")
			}
		}
		b.WriteByte('\n')
	}
	return b.String()
}

func dirName(d netlink.Dir) string { return strings.TrimPrefix(d.String(), "dir ") }

func (k *Kernel) sortedStates() []netlink.XfrmState {
	keys := make([]stateKey, 0, len(k.states))
	for key := range k.states {
		keys = append(keys, key)
	}
	slices.SortFunc(keys, func(a, b stateKey) int {
		if c := a.dst.Compare(b.dst); c != 0 {
			return c
		}
		if c := cmp.Compare(a.spi, b.spi); c != 0 {
			return c
		}
		return cmp.Compare(a.proto, b.proto)
	})
	out := make([]netlink.XfrmState, len(keys))
	for i, key := range keys {
		out[i] = cloneState(k.states[key])
	}
	return out
}

func (k *Kernel) sortedPolicies() []netlink.XfrmPolicy {
	keys := make([]policyKey, 0, len(k.policies))
	for key := range k.policies {
		keys = append(keys, key)
	}
	slices.SortFunc(keys, func(a, b policyKey) int {
		if c := cmp.Compare(a.dir, b.dir); c != 0 {
			return c
		}
		if c := comparePrefix(a.src, b.src); c != 0 {
			return c
		}
		return comparePrefix(a.dst, b.dst)
	})
	out := make([]netlink.XfrmPolicy, len(keys))
	for i, key := range keys {
		out[i] = clonePolicy(k.policies[key])
	}
	return out
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

// change records a successful operation and returns the hook to call
// after unlocking.
func (k *Kernel) change(op string) func() {
	k.ops = append(k.ops, op)
	if fn := k.onChange; fn != nil {
		return func() { fn(op) }
	}
	return func() {}
}

// fail returns the injected error for kind, once.
func (k *Kernel) fail(kind string) error {
	if err, ok := k.failNext[kind]; ok {
		delete(k.failNext, kind)
		return err
	}
	return nil
}

func stateKeyOf(s *netlink.XfrmState) (stateKey, bool) {
	dst, ok := netip.AddrFromSlice(s.Dst)
	if !ok {
		return stateKey{}, false
	}
	return stateKey{dst: dst.Unmap(), spi: uint32(s.Spi), proto: s.Proto}, true
}

// XfrmStateList implements ipsec.Netlink.
func (k *Kernel) XfrmStateList(family int) ([]netlink.XfrmState, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []netlink.XfrmState
	for _, s := range k.sortedStates() {
		if family == netlink.FAMILY_ALL || familyOf(s.Dst) == family {
			out = append(out, s)
		}
	}
	if k.interrupts > 0 {
		k.interrupts--
		return out[:len(out)/2], netlink.ErrDumpInterrupted
	}
	return out, nil
}

// XfrmStateAdd implements ipsec.Netlink.
func (k *Kernel) XfrmStateAdd(s *netlink.XfrmState) error {
	k.mu.Lock()
	if err := k.fail("state add"); err != nil {
		k.mu.Unlock()
		return err
	}
	if k.unsupported && s.Proto == netlink.XFRM_PROTO_ESP {
		k.mu.Unlock()
		return unix.EPROTONOSUPPORT
	}
	key, ok := stateKeyOf(s)
	if !ok || s.Spi == 0 || !validAlgos(s) {
		k.mu.Unlock()
		return unix.EINVAL
	}
	if _, dup := k.states[key]; dup {
		k.mu.Unlock()
		return unix.EEXIST
	}
	c := cloneState(*s)
	if c.Replay == nil {
		c.Replay = &netlink.XfrmReplayState{}
	}
	k.states[key] = c
	hook := k.change(fmt.Sprintf("state add %s spi=%#x", key.dst, key.spi))
	k.mu.Unlock()
	hook()
	return nil
}

// validAlgos checks what the kernel would: AES-GCM (rfc4106) keys with
// their salt, AES-CBC keys, an HMAC with a truncation length.
func validAlgos(s *netlink.XfrmState) bool {
	aes := func(n int) bool { return n == 16 || n == 24 || n == 32 }
	switch {
	case s.Aead != nil:
		return s.Crypt == nil && s.Auth == nil && s.Aead.Name == "rfc4106(gcm(aes))" && aes(len(s.Aead.Key)-4) &&
			(s.Aead.ICVLen == 64 || s.Aead.ICVLen == 96 || s.Aead.ICVLen == 128)
	case s.Crypt != nil && s.Auth != nil:
		return s.Crypt.Name == "cbc(aes)" && aes(len(s.Crypt.Key)) && s.Auth.Name == "hmac(sha256)" && s.Auth.TruncateLen > 0
	}
	return false
}

// XfrmStateDel implements ipsec.Netlink.
func (k *Kernel) XfrmStateDel(s *netlink.XfrmState) error {
	k.mu.Lock()
	if err := k.fail("state del"); err != nil {
		k.mu.Unlock()
		return err
	}
	key, ok := stateKeyOf(s)
	if !ok {
		k.mu.Unlock()
		return unix.EINVAL
	}
	if _, found := k.states[key]; !found {
		k.mu.Unlock()
		return unix.ESRCH
	}
	delete(k.states, key)
	hook := k.change(fmt.Sprintf("state del %s spi=%#x", key.dst, key.spi))
	k.mu.Unlock()
	hook()
	return nil
}

// AddForeignState installs s directly, without recording an operation: an
// entry another program (another reqid) owns.
func (k *Kernel) AddForeignState(s netlink.XfrmState) {
	k.mu.Lock()
	defer k.mu.Unlock()
	key, _ := stateKeyOf(&s)
	k.states[key] = cloneState(s)
}

// AddForeignPolicy installs p directly, without recording an operation.
func (k *Kernel) AddForeignPolicy(p netlink.XfrmPolicy) {
	k.mu.Lock()
	defer k.mu.Unlock()
	key, _ := policyKeyOf(&p)
	k.nextIndex += 8
	p.Index = k.nextIndex | int(p.Dir)
	k.policies[key] = clonePolicy(p)
}

func policyKeyOf(p *netlink.XfrmPolicy) (policyKey, bool) {
	src, ok1 := prefixFromIPNet(p.Src)
	dst, ok2 := prefixFromIPNet(p.Dst)
	if !ok1 || !ok2 || src.Addr().Is4() != dst.Addr().Is4() {
		return policyKey{}, false
	}
	return policyKey{dir: p.Dir, src: src, dst: dst}, true
}

// XfrmPolicyList implements ipsec.Netlink.
func (k *Kernel) XfrmPolicyList(family int) ([]netlink.XfrmPolicy, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []netlink.XfrmPolicy
	for _, p := range k.sortedPolicies() {
		if family == netlink.FAMILY_ALL || familyOf(p.Dst.IP) == family {
			out = append(out, p)
		}
	}
	if k.interrupts > 0 {
		k.interrupts--
		return out[:len(out)/2], netlink.ErrDumpInterrupted
	}
	return out, nil
}

// lookupPolicy finds a policy by index (when set) or by direction and
// selector.
func (k *Kernel) lookupPolicy(p *netlink.XfrmPolicy) (policyKey, bool) {
	if p.Index != 0 {
		for key, q := range k.policies {
			if q.Index == p.Index && q.Dir == p.Dir {
				return key, true
			}
		}
		return policyKey{}, false
	}
	key, ok := policyKeyOf(p)
	if !ok {
		return policyKey{}, false
	}
	_, found := k.policies[key]
	return key, found
}

// XfrmPolicyGet implements ipsec.Netlink.
func (k *Kernel) XfrmPolicyGet(p *netlink.XfrmPolicy) (*netlink.XfrmPolicy, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	key, found := k.lookupPolicy(p)
	if !found {
		return nil, unix.ENOENT
	}
	c := clonePolicy(k.policies[key])
	return &c, nil
}

// XfrmPolicyAdd implements ipsec.Netlink.
func (k *Kernel) XfrmPolicyAdd(p *netlink.XfrmPolicy) error {
	return k.putPolicy(p, false)
}

// XfrmPolicyUpdate implements ipsec.Netlink: it replaces the policy with
// the same direction and selector in place (keeping its index), or adds it.
func (k *Kernel) XfrmPolicyUpdate(p *netlink.XfrmPolicy) error {
	return k.putPolicy(p, true)
}

func (k *Kernel) putPolicy(p *netlink.XfrmPolicy, update bool) error {
	kind := "policy add"
	if update {
		kind = "policy update"
	}
	k.mu.Lock()
	if err := k.fail(kind); err != nil {
		k.mu.Unlock()
		return err
	}
	key, ok := policyKeyOf(p)
	if !ok || p.Dir > netlink.XFRM_DIR_FWD {
		k.mu.Unlock()
		return unix.EINVAL
	}
	c := clonePolicy(*p)
	if old, exists := k.policies[key]; exists {
		if !update {
			k.mu.Unlock()
			return unix.EEXIST
		}
		c.Index = old.Index
	} else {
		k.nextIndex += 8
		c.Index = k.nextIndex | int(p.Dir)
	}
	k.policies[key] = c
	spi := 0
	if len(c.Tmpls) > 0 {
		spi = c.Tmpls[0].Spi
	}
	hook := k.change(fmt.Sprintf("%s %s %s->%s spi=%#x", kind, dirName(key.dir), key.src, key.dst, uint32(spi)))
	k.mu.Unlock()
	hook()
	return nil
}

// XfrmPolicyDel implements ipsec.Netlink, by index or by selector.
func (k *Kernel) XfrmPolicyDel(p *netlink.XfrmPolicy) error {
	k.mu.Lock()
	if err := k.fail("policy del"); err != nil {
		k.mu.Unlock()
		return err
	}
	key, found := k.lookupPolicy(p)
	if !found {
		k.mu.Unlock()
		return unix.ENOENT
	}
	delete(k.policies, key)
	hook := k.change(fmt.Sprintf("policy del %s %s->%s", dirName(key.dir), key.src, key.dst))
	k.mu.Unlock()
	hook()
	return nil
}

func familyOf(ip net.IP) int {
	if ip.To4() != nil {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

func prefixFromIPNet(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	ip := n.IP
	if bits == 32 {
		ip = ip.To4()
	}
	a, ok := netip.AddrFromSlice(ip)
	if !ok || a.BitLen() != bits {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones).Masked(), true
}

func prefixOf(n *net.IPNet) string {
	p, ok := prefixFromIPNet(n)
	if !ok {
		return fmt.Sprint(n)
	}
	return p.String()
}

func cloneAlgo(a *netlink.XfrmStateAlgo) *netlink.XfrmStateAlgo {
	if a == nil {
		return nil
	}
	c := *a
	c.Key = bytes.Clone(a.Key)
	return &c
}

func cloneState(s netlink.XfrmState) netlink.XfrmState {
	s.Src = slices.Clone(s.Src)
	s.Dst = slices.Clone(s.Dst)
	s.Aead, s.Crypt, s.Auth = cloneAlgo(s.Aead), cloneAlgo(s.Crypt), cloneAlgo(s.Auth)
	if s.Replay != nil {
		r := *s.Replay
		s.Replay = &r
	}
	if s.Mark != nil {
		m := *s.Mark
		s.Mark = &m
	}
	if s.Selector != nil {
		sel := clonePolicy(*s.Selector)
		s.Selector = &sel
	}
	return s
}

func clonePolicy(p netlink.XfrmPolicy) netlink.XfrmPolicy {
	if p.Src != nil {
		p.Src = &net.IPNet{IP: slices.Clone(p.Src.IP), Mask: slices.Clone(p.Src.Mask)}
	}
	if p.Dst != nil {
		p.Dst = &net.IPNet{IP: slices.Clone(p.Dst.IP), Mask: slices.Clone(p.Dst.Mask)}
	}
	p.Tmpls = slices.Clone(p.Tmpls)
	for i := range p.Tmpls {
		p.Tmpls[i].Src = slices.Clone(p.Tmpls[i].Src)
		p.Tmpls[i].Dst = slices.Clone(p.Tmpls[i].Dst)
	}
	if p.Mark != nil {
		m := *p.Mark
		p.Mark = &m
	}
	return p
}
