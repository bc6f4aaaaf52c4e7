package policy

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

// Label keys every identity's canonical label set carries (pkg/identity sets them).
const (
	LabelNamespace = "meshcrypt.io/namespace"
	LabelCluster   = "meshcrypt.io/cluster"
)

// Direction is the direction of a check: egress (the subject sends) or ingress (it receives).
type Direction uint8

// The directions, numbered as in the BPF maps.
const (
	Egress  Direction = 0
	Ingress Direction = 1
)

func (d Direction) String() string {
	if d == Ingress {
		return "ingress"
	}
	return "egress"
}

// IP protocol numbers used in keys; 0 is any protocol.
const (
	ProtoAny    uint8 = 0
	ProtoICMP   uint8 = 1
	ProtoTCP    uint8 = 6
	ProtoUDP    uint8 = 17
	ProtoICMPv6 uint8 = 58
)

// Flags of an allow entry and of an enforce entry (docs/datapath.md).
const (
	// FlagEncrypt on an allow entry: traffic it allows must be encrypted cross-node.
	FlagEncrypt uint32 = 1 << 0
	// EnforceDeny: the identity is default-deny in the direction.
	EnforceDeny uint32 = 1 << 0
	// EnforceEncrypt: the identity's cross-node traffic in the direction must be encrypted.
	EnforceEncrypt uint32 = 1 << 1
)

// Key is an allow entry's key. Peer 0 is any identity; Proto 0 any protocol (Port then 0);
// Port 0 any port.
type Key struct {
	Subject uint32
	Peer    uint32
	Port    uint16
	Proto   uint8
	Dir     Direction
}

// Value is an allow entry: flags, and the rule that produced it (1-based index into
// Result.Rules).
type Value struct {
	Flags uint32
	Rule  uint32
}

// EnforceKey selects an identity in a direction.
type EnforceKey struct {
	Identity uint32
	Dir      Direction
}

// Identity is a numeric identity with its canonical labels.
type Identity struct {
	ID     uint32
	Labels map[string]string
}

// Rule names the policy rule behind an allow entry, for explanations.
type Rule struct {
	Namespace, Policy string
	Dir               Direction
	Index             int
	// Config, when set, names the configuration that allows instead of a policy rule (the
	// MeshConfig switch for host traffic to local pods).
	Config string
}

// HostToLocalPodsRule is the Config of the allow entries Input.AllowHostToLocalPods adds.
const HostToLocalPodsRule = "MeshConfig default spec.policy.allowHostToLocalPods"

func (r Rule) String() string {
	if r.Config != "" {
		return r.Config
	}
	return fmt.Sprintf("%s/%s %s[%d]", r.Namespace, r.Policy, r.Dir, r.Index)
}

// Result is a compiled policy set.
type Result struct {
	// Allow holds the allow entries.
	Allow map[Key]Value
	// Enforce holds the default-deny and encryption flags per identity and direction.
	Enforce map[EnforceKey]uint32
	// Rules are the rules referenced by Value.Rule (index Rule-1).
	Rules []Rule
	// Skipped lists policies that could not be compiled, with the reason; they allow
	// nothing and make nothing default-deny (the agent reports them).
	Skipped []string
	// CIDRs are the CIDR identities: every distinct cidr and except prefix of the compiled
	// policies' ipBlocks, numbered from identity.MinCIDR up by a hash of the prefix. The agent
	// puts them into the ipcache (pod and node entries, more specific, still win).
	CIDRs map[netip.Prefix]uint32
}

// Input is what Compile needs.
type Input struct {
	Policies   []v1alpha1.MeshPolicy
	Identities []Identity
	// NamespaceLabels are the labels of each namespace, for namespace selectors.
	NamespaceLabels map[string]map[string]string
	// ClusterID is this cluster's ID, for the entity cluster (0 means 1, the default).
	ClusterID uint8
	// AllowHostToLocalPods lets the host (this node) reach every pod under default-deny
	// ingress (MeshConfig spec.policy.allowHostToLocalPods): an allow entry from identity host
	// for every subject default-deny in ingress, named by HostToLocalPodsRule.
	AllowHostToLocalPods bool
}

// Compile turns policies into allow entries and enforce flags. It is deterministic: policies
// are taken in namespace/name order, and when two rules allow the same key the first names
// it (their flags are merged, so a Required rule is never weakened by an Optional one).
//
// It runs in two passes: every policy is checked and its peers resolved first (a broken policy
// adds nothing), then the CIDR identities are numbered from the ipBlocks of the policies that
// compiled, and the entries are written with ipBlock and world peers expanded over them.
func Compile(in Input) Result {
	res := Result{Allow: map[Key]Value{}, Enforce: map[EnforceKey]uint32{}}
	pols := slices.Clone(in.Policies)
	slices.SortFunc(pols, func(a, b v1alpha1.MeshPolicy) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	ids := slices.Clone(in.Identities)
	slices.SortFunc(ids, func(a, b Identity) int { return cmp.Compare(a.ID, b.ID) })
	cluster := in.ClusterID
	if cluster == 0 {
		cluster = 1
	}
	var compiled []compiledPolicy
	prefixes := map[netip.Prefix]bool{}
	for i := range pols {
		cp, err := compileOne(&pols[i], ids, in.NamespaceLabels, cluster)
		if err != nil {
			res.Skipped = append(res.Skipped, fmt.Sprintf("%s/%s: %v", pols[i].Namespace, pols[i].Name, err))
			continue
		}
		for _, rules := range cp.rules {
			for _, r := range rules {
				for _, b := range r.blocks {
					prefixes[b.cidr] = true
					for _, e := range b.except {
						prefixes[e] = true
					}
				}
			}
		}
		compiled = append(compiled, cp)
	}
	res.CIDRs = cidrIdentities(prefixes)
	for i := range compiled {
		res.add(&compiled[i])
	}
	if in.AllowHostToLocalPods {
		res.allowHost()
	}
	return res
}

// allowHost adds, for every subject default-deny in ingress, an allow entry from the host on
// every port and protocol, unless a rule already allows exactly that key.
func (res *Result) allowHost() {
	var subjects []uint32
	for k, f := range res.Enforce {
		if k.Dir == Ingress && f&EnforceDeny != 0 {
			subjects = append(subjects, k.Identity)
		}
	}
	if len(subjects) == 0 {
		return
	}
	res.Rules = append(res.Rules, Rule{Dir: Ingress, Config: HostToLocalPodsRule})
	ruleID := uint32(len(res.Rules))
	for _, s := range subjects {
		k := Key{Subject: s, Peer: uint32(identity.Host), Proto: ProtoAny, Dir: Ingress}
		if _, ok := res.Allow[k]; !ok {
			res.Allow[k] = Value{Rule: ruleID}
		}
	}
}

// compiledPolicy is one policy with its selectors resolved, checked before anything is added
// to the result so a broken policy adds nothing.
type compiledPolicy struct {
	p        *v1alpha1.MeshPolicy
	subjects []uint32
	types    []v1alpha1.PolicyType
	rules    map[Direction][]compiledRule
}

// compiledRule is a rule's peers and ports. The peers are identities, plus ipBlocks and the
// entity world, which Compile expands over the CIDR identities once all are known.
type compiledRule struct {
	any    bool // any peer: no peers, or the entity all
	peers  []uint32
	blocks []block
	world  bool
	ports  []portProto
}

type portProto struct {
	proto uint8
	port  uint16
}

func compileOne(p *v1alpha1.MeshPolicy, ids []Identity, nsLabels map[string]map[string]string, cluster uint8) (compiledPolicy, error) {
	sel, err := metav1.LabelSelectorAsSelector(&p.Spec.EndpointSelector)
	if err != nil {
		return compiledPolicy{}, fmt.Errorf("endpointSelector: %w", err)
	}
	var subjects []uint32
	for _, id := range ids {
		if id.Labels[LabelNamespace] == p.Namespace && sel.Matches(labels.Set(id.Labels)) {
			subjects = append(subjects, id.ID)
		}
	}
	types := p.Spec.PolicyTypes
	if len(types) == 0 {
		types = []v1alpha1.PolicyType{v1alpha1.PolicyTypeIngress}
		if len(p.Spec.Egress) > 0 {
			types = append(types, v1alpha1.PolicyTypeEgress)
		}
	}
	rules := map[Direction][]compiledRule{}
	for _, d := range []struct {
		dir   Direction
		rules []v1alpha1.PolicyRule
	}{{Ingress, p.Spec.Ingress}, {Egress, p.Spec.Egress}} {
		for j, r := range d.rules {
			cr, err := compileRule(p.Namespace, r, ids, nsLabels, cluster)
			if err != nil {
				return compiledPolicy{}, fmt.Errorf("%s[%d]: %w", d.dir, j, err)
			}
			rules[d.dir] = append(rules[d.dir], cr)
		}
	}
	return compiledPolicy{p: p, subjects: subjects, types: types, rules: rules}, nil
}

// add writes a compiled policy's enforce flags and allow entries.
func (res *Result) add(cp *compiledPolicy) {
	p, subjects, types, rules := cp.p, cp.subjects, cp.types, cp.rules
	encrypt := p.Spec.Encryption == v1alpha1.EncryptionRequired
	for _, t := range types {
		dir := Egress
		if t == v1alpha1.PolicyTypeIngress {
			dir = Ingress
		}
		for _, s := range subjects {
			f := EnforceDeny
			if encrypt {
				f |= EnforceEncrypt
			}
			res.Enforce[EnforceKey{s, dir}] |= f
		}
		for j, cr := range rules[dir] {
			res.Rules = append(res.Rules, Rule{Namespace: p.Namespace, Policy: p.Name, Dir: dir, Index: j})
			ruleID := uint32(len(res.Rules))
			var flags uint32
			if encrypt {
				flags = FlagEncrypt
			}
			peers := res.expand(cr)
			for _, s := range subjects {
				for _, peer := range peers {
					for _, pp := range cr.ports {
						k := Key{Subject: s, Peer: peer, Port: pp.port, Proto: pp.proto, Dir: dir}
						v, ok := res.Allow[k]
						if !ok {
							v.Rule = ruleID
						}
						v.Flags |= flags
						res.Allow[k] = v
					}
				}
			}
		}
	}
}

// expand is a rule's peer identities: 0 for any peer; else its identities, the CIDR
// identities its ipBlocks cover, and with world, world and every CIDR identity. Each once, in
// ascending order.
func (res *Result) expand(cr compiledRule) []uint32 {
	if cr.any {
		return []uint32{0}
	}
	peers := slices.Clone(cr.peers)
	if cr.world {
		peers = append(peers, uint32(identity.World))
	}
	for p, id := range res.CIDRs {
		if cr.world || slices.ContainsFunc(cr.blocks, func(b block) bool { return b.covers(p) }) {
			peers = append(peers, id)
		}
	}
	slices.Sort(peers)
	return slices.Compact(peers)
}

func compileRule(ns string, r v1alpha1.PolicyRule, ids []Identity, nsLabels map[string]map[string]string, cluster uint8) (compiledRule, error) {
	var cr compiledRule
	if len(r.Ports) == 0 {
		cr.ports = []portProto{{ProtoAny, 0}}
	}
	for _, pt := range r.Ports {
		var port uint16
		if pt.Port != nil {
			if *pt.Port < 1 || *pt.Port > 65535 {
				return cr, fmt.Errorf("port %d outside 1-65535", *pt.Port)
			}
			port = uint16(*pt.Port)
		}
		switch pt.Protocol {
		case v1alpha1.ProtocolTCP, "":
			cr.ports = append(cr.ports, portProto{ProtoTCP, port})
		case v1alpha1.ProtocolUDP:
			cr.ports = append(cr.ports, portProto{ProtoUDP, port})
		case v1alpha1.ProtocolICMP:
			if port != 0 {
				return cr, fmt.Errorf("ICMP has no ports")
			}
			cr.ports = append(cr.ports, portProto{ProtoICMP, 0}, portProto{ProtoICMPv6, 0})
		default:
			return cr, fmt.Errorf("unknown protocol %q", pt.Protocol)
		}
	}
	if len(r.Peers) == 0 {
		cr.any = true
		return cr, nil
	}
	seen := map[uint32]bool{}
	addID := func(id uint32) {
		if !seen[id] {
			seen[id] = true
			cr.peers = append(cr.peers, id)
		}
	}
	for k, peer := range r.Peers {
		kinds := 0
		for _, set := range []bool{peer.PodSelector != nil || peer.NamespaceSelector != nil, len(peer.Entities) > 0, peer.IPBlock != nil} {
			if set {
				kinds++
			}
		}
		if kinds != 1 {
			return cr, fmt.Errorf("peers[%d]: a peer is exactly one of: podSelector and/or namespaceSelector, entities, ipBlock", k)
		}
		switch {
		case peer.IPBlock != nil:
			b, err := parseBlock(peer.IPBlock.CIDR, peer.IPBlock.Except)
			if err != nil {
				return cr, fmt.Errorf("peers[%d]: %w", k, err)
			}
			cr.blocks = append(cr.blocks, b)
		case len(peer.Entities) > 0:
			for _, e := range peer.Entities {
				switch e {
				case v1alpha1.EntityHost:
					addID(uint32(identity.Host))
				case v1alpha1.EntityRemoteNode:
					addID(uint32(identity.RemoteNode))
				case v1alpha1.EntityWorld:
					cr.world = true
				case v1alpha1.EntityCluster:
					for _, id := range ids {
						if i := identity.Identity(id.ID); i.Cluster() == cluster && !i.IsReserved() && !i.IsCIDR() {
							addID(id.ID)
						}
					}
				case v1alpha1.EntityAll:
					cr.any = true
				default:
					return cr, fmt.Errorf("peers[%d]: unknown entity %q", k, e)
				}
			}
		default:
			match, err := peerMatcher(ns, peer, nsLabels)
			if err != nil {
				return cr, fmt.Errorf("peers[%d]: %w", k, err)
			}
			for _, id := range ids {
				if match(id) {
					addID(id.ID)
				}
			}
		}
	}
	return cr, nil
}

// peerMatcher returns whether an identity is selected by peer, following NetworkPolicy: a
// podSelector alone selects in the policy's namespace; a namespaceSelector selects namespaces
// by their labels (an empty one: all namespaces); both: pods matching in those namespaces.
func peerMatcher(ns string, peer v1alpha1.PolicyPeer, nsLabels map[string]map[string]string) (func(Identity) bool, error) {
	if peer.PodSelector == nil && peer.NamespaceSelector == nil {
		return nil, fmt.Errorf("needs a podSelector or a namespaceSelector")
	}
	podSel := labels.Everything()
	if peer.PodSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(peer.PodSelector)
		if err != nil {
			return nil, fmt.Errorf("podSelector: %w", err)
		}
		podSel = s
	}
	var nsSel labels.Selector
	if peer.NamespaceSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(peer.NamespaceSelector)
		if err != nil {
			return nil, fmt.Errorf("namespaceSelector: %w", err)
		}
		nsSel = s
	}
	return func(id Identity) bool {
		idNS, ok := id.Labels[LabelNamespace]
		if !ok {
			return false // reserved identities are not pods
		}
		if nsSel == nil {
			if idNS != ns {
				return false
			}
		} else if !nsSel.Matches(labels.Set(nsLabels[idNS])) {
			return false
		}
		return podSel.Matches(labels.Set(id.Labels))
	}, nil
}
