package datapath

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// This file holds the policy classifier's Go side: the contract of docs/datapath.md as Go
// types, loading the BPF object generated from bpf/classifier.c, and keeping its maps equal to
// desired state. classifier_attach.go attaches the programs to interfaces.

// Direction is the direction of a policy check: egress (the subject sends to the peer) or
// ingress (the subject receives from the peer). Values are those of the BPF maps.
type Direction uint8

// The directions.
const (
	Egress  Direction = 0
	Ingress Direction = 1
)

func (d Direction) String() string {
	switch d {
	case Egress:
		return "egress"
	case Ingress:
		return "ingress"
	}
	return fmt.Sprintf("Direction(%d)", uint8(d))
}

// IPCacheFlags describe an ipcache entry.
type IPCacheFlags uint32

// The ipcache flags.
const (
	// IPCacheLocalPod marks a pod of this node.
	IPCacheLocalPod IPCacheFlags = 1 << 0
	// IPCacheTunnelReady marks a remote pod CIDR whose tunnel peer is configured.
	IPCacheTunnelReady IPCacheFlags = 1 << 1
	// IPCacheRemotePod marks a pod (or pod CIDR) on another node.
	IPCacheRemotePod IPCacheFlags = 1 << 2
)

func (f IPCacheFlags) String() string {
	return flagString(uint32(f), []string{"local-pod", "tunnel-ready", "remote-pod"})
}

// PolicyFlags describe an allow entry.
type PolicyFlags uint32

// PolicyEncrypt on an allow entry: traffic it allows must be encrypted cross-node.
const PolicyEncrypt PolicyFlags = 1 << 0

func (f PolicyFlags) String() string { return flagString(uint32(f), []string{"encrypt"}) }

// EnforceFlags describe an identity in a direction.
type EnforceFlags uint32

// The enforce flags.
const (
	// EnforceDeny: some policy selects the identity in the direction, which is default-deny.
	EnforceDeny EnforceFlags = 1 << 0
	// EnforceEncrypt: the identity's cross-node traffic in the direction must be encrypted.
	EnforceEncrypt EnforceFlags = 1 << 1
)

func (f EnforceFlags) String() string { return flagString(uint32(f), []string{"deny", "encrypt"}) }

func flagString(f uint32, names []string) string {
	if f == 0 {
		return "0"
	}
	var parts []string
	for i, n := range names {
		if f&(1<<i) != 0 {
			parts = append(parts, n)
			f &^= 1 << i
		}
	}
	if f != 0 {
		parts = append(parts, fmt.Sprintf("%#x", f))
	}
	return strings.Join(parts, "|")
}

// Reason is why the classifier passed or dropped a packet; it indexes the counters.
type Reason uint32

// The reasons, numbered as in the metrics map.
const (
	// ReasonAllowed: allowed by policy entries (at least one side is default-deny).
	ReasonAllowed Reason = 0
	// ReasonDeniedEgress: dropped, the source's egress policy does not allow it.
	ReasonDeniedEgress Reason = 1
	// ReasonDeniedIngress: dropped, the destination's ingress policy does not allow it.
	ReasonDeniedIngress Reason = 2
	// ReasonDropNotEncrypted: dropped, it must be encrypted and the destination's tunnel is
	// not ready.
	ReasonDropNotEncrypted Reason = 3
	// ReasonDropMalformed: dropped, too short for the headers it claims.
	ReasonDropMalformed Reason = 4
	// ReasonPassNonIP: passed, not IPv4 or IPv6 (ARP and the like), or IPv6 neighbour
	// discovery (ICMPv6 types 133-137), which is IPv6's ARP.
	ReasonPassNonIP Reason = 5
	// ReasonAllowedNoPolicy: allowed because neither side is default-deny.
	ReasonAllowedNoPolicy Reason = 6
)

// NumReasons is the number of reasons the classifier counts.
const NumReasons = 7

var reasonNames = [NumReasons]string{
	"allowed", "denied_egress", "denied_ingress", "drop_not_encrypted", "drop_malformed",
	"pass_non_ip", "allowed_no_policy",
}

// String returns the reason in snake case, fit for a metric label.
func (r Reason) String() string {
	if r < NumReasons {
		return reasonNames[r]
	}
	return fmt.Sprintf("Reason(%d)", uint32(r))
}

// Dropped reports whether packets counted under r are dropped.
func (r Reason) Dropped() bool {
	switch r {
	case ReasonDeniedEgress, ReasonDeniedIngress, ReasonDropNotEncrypted, ReasonDropMalformed:
		return true
	}
	return false
}

// IPCacheEntry is what the ipcache says about a prefix.
type IPCacheEntry struct {
	Identity uint32
	Flags    IPCacheFlags
}

// PolicyKey is an allow entry's key. Peer 0 is any identity; Proto 0 any protocol (Port is
// then 0); Port 0 any port.
type PolicyKey struct {
	Subject uint32
	Peer    uint32
	Port    uint16
	Proto   uint8
	Dir     Direction
}

// PolicyValue is an allow entry's value. Rule is opaque to the datapath: the agent maps it
// back to the policy rule that produced the entry.
type PolicyValue struct {
	Flags PolicyFlags
	Rule  uint32
}

// EnforceKey selects an identity in a direction.
type EnforceKey struct {
	Identity uint32
	Dir      Direction
}

// EnforceValue says whether an identity is default-deny, and must encrypt, in a direction.
type EnforceValue struct {
	Flags EnforceFlags
}

// Counter is a packet and byte count.
type Counter struct {
	Packets, Bytes uint64
}

// Counters are the classifier's counters by reason, summed over CPUs.
type Counters map[Reason]Counter

// MapStats counts what one Apply changed in the maps. Unchanged entries cost no syscall, so
// Added+Updated+Removed is the work done.
type MapStats struct {
	Added, Updated, Removed, Unchanged int
}

func (s *MapStats) add(o MapStats) {
	s.Added += o.Added
	s.Updated += o.Updated
	s.Removed += o.Removed
	s.Unchanged += o.Unchanged
}

// Capacities of the maps (docs/datapath.md).
const (
	MaxIPCacheEntries = 1 << 17
	MaxPolicyEntries  = 1 << 18
	MaxEnforceEntries = 1 << 17
)

// ClassifierOptions configure LoadClassifier.
type ClassifierOptions struct {
	// PinPath is a directory on a bpffs (e.g. /sys/fs/bpf/meshcrypt/<node>) where the maps
	// and the TCX links are pinned, so a restarted agent finds them and traffic stays
	// classified meanwhile. One directory per node (network namespace). "" pins nothing.
	PinPath string
	// Logger receives the classifier's log lines; nil discards them.
	Logger *slog.Logger
	// ConntrackSize is the number of connections the connection table holds (an LRU: when
	// it is full the least recently used connection makes room, and that connection's next
	// packets are judged again as first packets). 0 means DefaultConntrackSize. The table is
	// preallocated: about ConntrackEntryBytes bytes each.
	ConntrackSize int
}

// DefaultConntrackSize is the connection table's size when ClassifierOptions leave it 0.
const DefaultConntrackSize = 1 << 18

// ConntrackEntryBytes is what one connection table entry costs in kernel memory, measured
// (docs/performance.md): key, value and the LRU hash element's own bookkeeping.
const ConntrackEntryBytes = 128

// Classifier is the loaded policy classifier: its programs, its maps, and the TCX links this
// process holds. Its methods are safe for concurrent use.
type Classifier struct {
	pinPath string
	log     *slog.Logger
	objs    classifierObjects

	mapsMu  sync.Mutex // serialises Apply*; guards the shadows
	ipcache mapState[netip.Prefix, IPCacheEntry, classifierIpcacheKey, classifierIpcacheVal]
	policy  mapState[PolicyKey, PolicyValue, classifierPolicyKey, classifierPolicyVal]
	enforce mapState[EnforceKey, EnforceValue, classifierEnforceKey, classifierEnforceVal]

	configMu sync.Mutex // serialises SetFlowEvents

	linksMu sync.Mutex
	links   map[linkKey]link.Link
	noTCX   bool // AttachAuto found no TCX: go straight to tc
}

// ErrNotSupported is wrapped by errors about kernel features this kernel lacks (such as TCX
// before Linux 6.6). It is cilium/ebpf's sentinel, so errors.Is works on errors from either.
var ErrNotSupported = ebpf.ErrNotSupported

// LoadClassifier loads the classifier's programs and maps into the kernel. With a PinPath
// the maps are pinned there by name, or reused when a previous agent pinned them: their
// content survives, and the first Apply only fixes what differs. A pinned map the new
// object cannot use (its definition changed) is replaced by an empty one, logged.
func LoadClassifier(opts ClassifierOptions) (*Classifier, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	spec, err := loadClassifier()
	if err != nil {
		return nil, err
	}
	collOpts := &ebpf.CollectionOptions{}
	if opts.PinPath != "" {
		if err := os.MkdirAll(opts.PinPath, 0o700); err != nil {
			return nil, fmt.Errorf("create pin directory: %w", err)
		}
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinByName
		}
		collOpts.Maps.PinPath = opts.PinPath
	}
	size := opts.ConntrackSize
	if size == 0 {
		size = DefaultConntrackSize
	}
	if size < 0 || size > 1<<24 {
		return nil, fmt.Errorf("connection table size %d: want 1 to %d", size, 1<<24)
	}
	spec.Maps["conntrack"].MaxEntries = uint32(size)
	c := &Classifier{pinPath: opts.PinPath, log: log, links: map[linkKey]link.Link{}}
	err = spec.LoadAndAssign(&c.objs, collOpts)
	if errors.Is(err, ebpf.ErrMapIncompatible) && opts.PinPath != "" {
		if rerr := removeIncompatiblePins(spec, opts.PinPath, log); rerr != nil {
			return nil, rerr
		}
		err = spec.LoadAndAssign(&c.objs, collOpts)
	}
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			// The full log is what one needs to fix a rejection on some kernel.
			log.Error("verifier rejected the classifier", "log", fmt.Sprintf("%+v", verr))
		}
		return nil, fmt.Errorf("load classifier: %w", err)
	}
	c.ipcache = mapState[netip.Prefix, IPCacheEntry, classifierIpcacheKey, classifierIpcacheVal]{
		m:   c.objs.Ipcache,
		key: ipcacheKey,
		val: func(e IPCacheEntry) classifierIpcacheVal {
			return classifierIpcacheVal{Identity: e.Identity, Flags: uint32(e.Flags)}
		},
		decode: func(k classifierIpcacheKey, v classifierIpcacheVal) (netip.Prefix, IPCacheEntry) {
			return ipcachePrefix(k), IPCacheEntry{Identity: v.Identity, Flags: IPCacheFlags(v.Flags)}
		},
	}
	c.policy = mapState[PolicyKey, PolicyValue, classifierPolicyKey, classifierPolicyVal]{
		m:     c.objs.Policy,
		batch: true,
		key: func(k PolicyKey) classifierPolicyKey {
			return classifierPolicyKey{Subject: k.Subject, Peer: k.Peer, Dport: k.Port, Proto: k.Proto, Dir: uint8(k.Dir)}
		},
		val: func(v PolicyValue) classifierPolicyVal {
			return classifierPolicyVal{Flags: uint32(v.Flags), Rule: v.Rule}
		},
		decode: func(k classifierPolicyKey, v classifierPolicyVal) (PolicyKey, PolicyValue) {
			return PolicyKey{Subject: k.Subject, Peer: k.Peer, Port: k.Dport, Proto: k.Proto, Dir: Direction(k.Dir)},
				PolicyValue{Flags: PolicyFlags(v.Flags), Rule: v.Rule}
		},
	}
	c.enforce = mapState[EnforceKey, EnforceValue, classifierEnforceKey, classifierEnforceVal]{
		m:     c.objs.Enforce,
		batch: true,
		key: func(k EnforceKey) classifierEnforceKey {
			return classifierEnforceKey{Identity: k.Identity, Dir: uint8(k.Dir)}
		},
		val: func(v EnforceValue) classifierEnforceVal { return classifierEnforceVal{Flags: uint32(v.Flags)} },
		decode: func(k classifierEnforceKey, v classifierEnforceVal) (EnforceKey, EnforceValue) {
			return EnforceKey{Identity: k.Identity, Dir: Direction(k.Dir)}, EnforceValue{Flags: EnforceFlags(v.Flags)}
		},
	}
	return c, nil
}

// removeIncompatiblePins unpins the maps under dir that spec cannot reuse (a new version
// changed their definition). Programs still attached keep their old maps until replaced.
func removeIncompatiblePins(spec *ebpf.CollectionSpec, dir string, log *slog.Logger) error {
	for name, ms := range spec.Maps {
		path := filepath.Join(dir, name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err == nil {
			err = ms.Compatible(m)
			m.Close()
		}
		if err == nil {
			continue
		}
		log.Warn("replacing pinned classifier map", "path", path, "err", err)
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("remove incompatible pinned map: %w", err)
		}
	}
	return nil
}

// Close releases the process's handles on the programs, maps and links. Attachments stay
// where they outlive the process by design (pinned TCX links, tc filters; see Attach), so an
// agent exiting does not stop classification. TCX links made without a PinPath go away.
func (c *Classifier) Close() error {
	c.linksMu.Lock()
	var errs []error
	for k, l := range c.links {
		errs = append(errs, l.Close())
		delete(c.links, k)
	}
	c.linksMu.Unlock()
	errs = append(errs, c.objs.Close())
	return errors.Join(errs...)
}

// ApplyIPCache makes the ipcache hold exactly desired: prefixes (IPv4 or IPv6; host bits are
// ignored) to identities. It is idempotent and touches only what differs: the first call
// reads the map (which may hold a previous agent's pinned entries), later calls diff against
// what the previous calls wrote, so an unchanged entry costs one Go map lookup and no
// syscall. After an error the next call reads the map again. desired is not retained.
//
// When anything changed, tracked connections are judged again at their next packet
// (docs/datapath.md, "Connections").
func (c *Classifier) ApplyIPCache(ctx context.Context, desired map[netip.Prefix]IPCacheEntry) (_ MapStats, err error) {
	desired, err = normalizeIPCache(desired)
	if err != nil {
		return MapStats{}, err
	}
	if len(desired) > MaxIPCacheEntries {
		return MapStats{}, fmt.Errorf("ipcache: %d entries, at most %d fit", len(desired), MaxIPCacheEntries)
	}
	c.mapsMu.Lock()
	defer c.mapsMu.Unlock()
	d, err := c.ipcache.diff(desired, nil)
	if err != nil {
		return MapStats{}, fmt.Errorf("read ipcache: %w", err)
	}
	defer c.bumpEpochIfChanged(d.stats, &err)
	if err := c.ipcache.upsert(ctx, d); err != nil {
		return d.stats, fmt.Errorf("update ipcache: %w", err)
	}
	if err := c.ipcache.remove(ctx, d); err != nil {
		return d.stats, fmt.Errorf("delete from ipcache: %w", err)
	}
	return d.stats, nil
}

// normalizeIPCache returns desired with every prefix in the form the ipcache stores (masked;
// IPv4-mapped IPv6 as IPv4), itself when it is already so (the common case, no copy).
func normalizeIPCache(desired map[netip.Prefix]IPCacheEntry) (map[netip.Prefix]IPCacheEntry, error) {
	clean := true
	for p := range desired {
		if !p.IsValid() {
			return nil, fmt.Errorf("ipcache: invalid prefix %s", p)
		}
		if normalPrefix(p) != p {
			clean = false
		}
	}
	if clean {
		return desired, nil
	}
	out := make(map[netip.Prefix]IPCacheEntry, len(desired))
	for p, e := range desired {
		n := normalPrefix(p)
		if prev, dup := out[n]; dup && prev != e {
			return nil, fmt.Errorf("ipcache: prefix %s given twice with different entries", n)
		}
		out[n] = e
	}
	return out, nil
}

func normalPrefix(p netip.Prefix) netip.Prefix {
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p.Masked()
}

// ApplyPolicy makes the policy and enforce maps hold exactly the given entries, touching only
// what differs (as ApplyIPCache does). The order of changes never denies, even for a moment,
// traffic that both the old and the new state allow: new allow entries first, then the
// enforce changes and removals, then the stale allow entries. The maps are not retained.
//
// When anything changed, tracked connections are judged again at their next packet, so a
// connection the new policy no longer allows stops at once.
func (c *Classifier) ApplyPolicy(ctx context.Context, allow map[PolicyKey]PolicyValue, enforce map[EnforceKey]EnforceValue) (_ MapStats, err error) {
	if len(allow) > MaxPolicyEntries {
		return MapStats{}, fmt.Errorf("policy: %d entries, at most %d fit", len(allow), MaxPolicyEntries)
	}
	if len(enforce) > MaxEnforceEntries {
		return MapStats{}, fmt.Errorf("enforce: %d entries, at most %d fit", len(enforce), MaxEnforceEntries)
	}
	c.mapsMu.Lock()
	defer c.mapsMu.Unlock()
	var st MapStats
	dp, err := c.policy.diff(allow, checkPolicyEntry)
	if err != nil {
		return st, fmt.Errorf("policy map: %w", err)
	}
	de, err := c.enforce.diff(enforce, checkEnforceEntry)
	if err != nil {
		return st, fmt.Errorf("enforce map: %w", err)
	}
	st.add(dp.stats)
	st.add(de.stats)
	defer c.bumpEpochIfChanged(st, &err)
	if err := c.policy.upsert(ctx, dp); err != nil {
		return st, fmt.Errorf("update policy map: %w", err)
	}
	if err := c.enforce.upsert(ctx, de); err != nil {
		return st, fmt.Errorf("update enforce map: %w", err)
	}
	if err := c.enforce.remove(ctx, de); err != nil {
		return st, fmt.Errorf("delete from enforce map: %w", err)
	}
	if err := c.policy.remove(ctx, dp); err != nil {
		return st, fmt.Errorf("delete from policy map: %w", err)
	}
	return st, nil
}

func checkPolicyEntry(k PolicyKey, _ PolicyValue) error {
	if k.Dir > Ingress {
		return fmt.Errorf("key %+v: bad direction", k)
	}
	if k.Proto == 0 && k.Port != 0 {
		return fmt.Errorf("key %+v: a port needs a protocol", k)
	}
	return nil
}

func checkEnforceEntry(k EnforceKey, _ EnforceValue) error {
	if k.Dir > Ingress {
		return fmt.Errorf("key %+v: bad direction", k)
	}
	return nil
}

// SetStrict sets strict mode: every packet from a local pod to a remote pod whose tunnel is
// not ready is dropped (and counted as ReasonDropNotEncrypted), policy or not. Idempotent,
// safe for concurrent use.
func (c *Classifier) SetStrict(strict bool) error {
	var flags uint32
	if strict {
		flags = configStrict
	}
	c.mapsMu.Lock()
	defer c.mapsMu.Unlock()
	var old uint32
	if err := c.objs.Config.Lookup(configFlags, &old); err != nil {
		return fmt.Errorf("read classifier strict mode: %w", err)
	}
	if old == flags {
		return nil
	}
	if err := c.objs.Config.Update(configFlags, flags, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set classifier strict mode: %w", err)
	}
	return c.bumpEpoch()
}

// bumpEpochIfChanged bumps the policy epoch when st counts a change, whether or not the apply
// that made it went on to fail (*err): a partly written map is a change too. A failed bump
// joins *err. Called with mapsMu held.
func (c *Classifier) bumpEpochIfChanged(st MapStats, err *error) {
	if st.Added+st.Updated+st.Removed == 0 {
		return
	}
	if berr := c.bumpEpoch(); berr != nil {
		*err = errors.Join(*err, berr)
	}
}

// bumpEpoch advances config[CONFIG_EPOCH], after the maps changed: every tracked connection
// is judged again at its next packet (docs/datapath.md, "Connections"). The programs read the
// epoch before they judge, so a judgement that raced the change is recorded at the old epoch
// and made again. Called with mapsMu held (the read-modify-write is not atomic).
func (c *Classifier) bumpEpoch() error {
	var epoch uint32
	if err := c.objs.Config.Lookup(configEpoch, &epoch); err != nil {
		return fmt.Errorf("read policy epoch: %w", err)
	}
	if err := c.objs.Config.Update(configEpoch, epoch+1, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("bump policy epoch: %w", err)
	}
	return nil
}

// Epoch returns the policy epoch: it changes whenever the classifier's maps or strict mode
// change.
func (c *Classifier) Epoch() (uint32, error) {
	var epoch uint32
	if err := c.objs.Config.Lookup(configEpoch, &epoch); err != nil {
		return 0, fmt.Errorf("read policy epoch: %w", err)
	}
	return epoch, nil
}

// configStrict is CONFIG_STRICT of bpf/include/datapath.h.
const configStrict uint32 = 1 << 0

// Counters returns the classifier's counters for every reason, summed over CPUs.
func (c *Classifier) Counters() (Counters, error) {
	out := make(Counters, NumReasons)
	var perCPU []classifierMetricsVal
	for r := range Reason(NumReasons) {
		if err := c.objs.Metrics.Lookup(uint32(r), &perCPU); err != nil {
			return nil, fmt.Errorf("read counter %s: %w", r, err)
		}
		var sum Counter
		for _, v := range perCPU {
			sum.Packets += v.Packets
			sum.Bytes += v.Bytes
		}
		out[r] = sum
	}
	return out, nil
}

// ipcacheKey encodes a normalized prefix as the LPM trie keys it: IPv4 as
// ::ffff:a.b.c.d/(96+bits).
func ipcacheKey(p netip.Prefix) classifierIpcacheKey {
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return classifierIpcacheKey{Prefixlen: uint32(bits), Addr: p.Addr().As16()}
}

// ipcachePrefix decodes an ipcache key.
func ipcachePrefix(k classifierIpcacheKey) netip.Prefix {
	a := netip.AddrFrom16(k.Addr)
	bits := int(k.Prefixlen)
	if a.Is4In6() && bits >= 96 {
		return netip.PrefixFrom(a.Unmap(), bits-96).Masked()
	}
	return netip.PrefixFrom(a, bits).Masked()
}
