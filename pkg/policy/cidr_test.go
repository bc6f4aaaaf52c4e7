package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

const (
	idHost       = uint32(identity.Host)
	idWorld      = uint32(identity.World)
	idRemoteNode = uint32(identity.RemoteNode)
)

// Identities of cluster 1 (and one of cluster 2) for the entity tests.
var (
	c1web   = ident(uint32(identity.New(1, 300)), "prod", "app", "web")
	c1db    = ident(uint32(identity.New(1, 301)), "prod", "app", "db")
	c1dev   = ident(uint32(identity.New(1, 400)), "dev", "app", "web")
	c2web   = ident(uint32(identity.New(2, 300)), "prod", "app", "web")
	c1world = Identity{ID: idWorld, Labels: map[string]string{"reserved": "world"}}
	c1all   = []Identity{c1web, c1db, c1dev, c2web, c1world}
)

func ipBlock(cidr string, except ...string) v1alpha1.PolicyPeer {
	return v1alpha1.PolicyPeer{IPBlock: &v1alpha1.IPBlock{CIDR: cidr, Except: except}}
}

func entities(e ...v1alpha1.Entity) v1alpha1.PolicyPeer {
	return v1alpha1.PolicyPeer{Entities: e}
}

// dbIngress is a policy on db with one ingress rule from peers on any port.
func dbIngress(name string, peers ...v1alpha1.PolicyPeer) v1alpha1.MeshPolicy {
	return pol("prod", name, v1alpha1.MeshPolicySpec{
		EndpointSelector: *sel("app", "db"),
		Ingress:          []v1alpha1.PolicyRule{{Peers: peers}},
	})
}

// peersOf lists the peers db's ingress allows, on any port: identities, and the prefixes of
// the CIDR identities.
func peersOf(r Result) ([]uint32, []netip.Prefix) {
	prefixOf := map[uint32]netip.Prefix{}
	for p, id := range r.CIDRs {
		prefixOf[id] = p
	}
	var ids []uint32
	var blocks []netip.Prefix
	for k := range r.Allow {
		if k.Subject != c1db.ID || k.Dir != Ingress {
			continue
		}
		if p, ok := prefixOf[k.Peer]; ok {
			blocks = append(blocks, p)
		} else {
			ids = append(ids, k.Peer)
		}
	}
	slices.Sort(ids)
	slices.SortFunc(blocks, comparePrefix)
	return ids, blocks
}

// prefixes parses prefixes, in prefix order.
func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	slices.SortFunc(out, comparePrefix)
	return out
}

func TestCompileEntitiesAndBlocks(t *testing.T) {
	tests := []struct {
		name       string
		pols       []v1alpha1.MeshPolicy
		hostAllow  bool
		wantPeers  []uint32       // identities other than CIDR ones
		wantBlocks []netip.Prefix // the prefixes of the CIDR identities among the peers
		wantCIDRs  []netip.Prefix // the prefixes given CIDR identities
	}{
		{
			name:      "host and remote-node are the reserved identities",
			pols:      []v1alpha1.MeshPolicy{dbIngress("a", entities(v1alpha1.EntityHost, v1alpha1.EntityRemoteNode))},
			wantPeers: []uint32{idHost, idRemoteNode},
		},
		{
			name:      "cluster is every pod identity of this cluster, not another cluster's, not reserved ones",
			pols:      []v1alpha1.MeshPolicy{dbIngress("a", entities(v1alpha1.EntityCluster))},
			wantPeers: []uint32{c1web.ID, c1db.ID, c1dev.ID},
		},
		{
			name:      "all is any peer",
			pols:      []v1alpha1.MeshPolicy{dbIngress("a", entities(v1alpha1.EntityAll), entities(v1alpha1.EntityHost))},
			wantPeers: []uint32{0},
		},
		{
			name: "an ipBlock covers its own identity and the more specific prefixes other policies name, not its exceptions",
			pols: []v1alpha1.MeshPolicy{
				dbIngress("a", ipBlock("10.0.0.0/8", "10.1.0.0/16")),
				dbIngress("b", ipBlock("10.1.2.0/24")),           // inside a's exception: only b allows it
				dbIngress("c", ipBlock("10.200.0.0/16")),         // inside a's block: a covers it too
				dbIngress("d", ipBlock("fd00::/8", "fd00::/16")), // IPv6
			},
			wantCIDRs:  prefixes("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.200.0.0/16", "fd00::/8", "fd00::/16"),
			wantBlocks: prefixes("10.0.0.0/8", "10.1.2.0/24", "10.200.0.0/16", "fd00::/8"),
		},
		{
			name:       "an IPv4-mapped IPv6 block is the IPv4 block; an IPv6 block never covers IPv4",
			pols:       []v1alpha1.MeshPolicy{dbIngress("a", ipBlock("::ffff:10.0.0.0/104")), dbIngress("b", ipBlock("10.0.0.0/8")), pol("prod", "c", v1alpha1.MeshPolicySpec{EndpointSelector: *sel("app", "web"), Ingress: []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{ipBlock("::/0")}}}})},
			wantCIDRs:  prefixes("10.0.0.0/8", "::/0"),
			wantBlocks: prefixes("10.0.0.0/8"),
		},
		{
			name: "world is world and every CIDR identity",
			pols: []v1alpha1.MeshPolicy{
				dbIngress("a", entities(v1alpha1.EntityWorld)),
				pol("prod", "b", v1alpha1.MeshPolicySpec{EndpointSelector: *sel("app", "web"), Ingress: []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{ipBlock("192.0.2.0/24", "192.0.2.128/25")}}}}),
			},
			wantCIDRs:  prefixes("192.0.2.0/24", "192.0.2.128/25"),
			wantPeers:  []uint32{idWorld},
			wantBlocks: prefixes("192.0.2.0/24", "192.0.2.128/25"),
		},
		{
			name:      "the host switch allows the host into every subject under ingress policy",
			pols:      []v1alpha1.MeshPolicy{dbIngress("a", v1alpha1.PolicyPeer{PodSelector: sel("app", "web")})},
			hostAllow: true,
			wantPeers: []uint32{idHost, c1web.ID, c2web.ID}, // a podSelector alone: any cluster
		},
		{
			name:      "the host switch off: the host only where a rule names it",
			pols:      []v1alpha1.MeshPolicy{dbIngress("a", v1alpha1.PolicyPeer{PodSelector: sel("app", "web")})},
			wantPeers: []uint32{c1web.ID, c2web.ID},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Compile(Input{Policies: tt.pols, Identities: c1all, NamespaceLabels: nsl, ClusterID: 1, AllowHostToLocalPods: tt.hostAllow})
			if len(r.Skipped) != 0 {
				t.Fatalf("skipped: %v", r.Skipped)
			}
			ids, blocks := peersOf(r)
			if d := cmp.Diff(tt.wantPeers, ids); d != "" {
				t.Errorf("db's ingress peers (-want +got):\n%s", d)
			}
			if d := cmp.Diff(tt.wantBlocks, blocks, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); d != "" {
				t.Errorf("db's ingress peers, CIDR identities by prefix (-want +got):\n%s", d)
			}
			var got []netip.Prefix
			for p, id := range r.CIDRs {
				if !identity.Identity(id).IsCIDR() {
					t.Errorf("%s: identity %d below MinCIDR", p, id)
				}
				got = append(got, p)
			}
			slices.SortFunc(got, comparePrefix)
			if d := cmp.Diff(tt.wantCIDRs, got, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); d != "" {
				t.Errorf("prefixes with a CIDR identity (-want +got):\n%s", d)
			}
		})
	}
}

func TestHostSwitch(t *testing.T) {
	pols := []v1alpha1.MeshPolicy{
		pol("prod", "deny-in", v1alpha1.MeshPolicySpec{EndpointSelector: *sel("app", "db"), PolicyTypes: []v1alpha1.PolicyType{v1alpha1.PolicyTypeIngress}}),
		pol("prod", "deny-out", v1alpha1.MeshPolicySpec{EndpointSelector: *sel("app", "web"), PolicyTypes: []v1alpha1.PolicyType{v1alpha1.PolicyTypeEgress}}),
	}
	r := Compile(Input{Policies: pols, Identities: c1all, NamespaceLabels: nsl, AllowHostToLocalPods: true})
	d := r.Decide(idHost, c1db.ID, ProtoTCP, 8080)
	if !d.Allowed() || r.Rules[d.Ingress.Rule-1].String() != HostToLocalPodsRule {
		t.Errorf("host -> db under default-deny ingress: %+v, want allowed by %q", d, HostToLocalPodsRule)
	}
	if d := r.Decide(idRemoteNode, c1db.ID, ProtoTCP, 8080); d.Allowed() {
		t.Errorf("remote-node -> db: allowed (%+v); the switch concerns this node only", d)
	}
	want := map[Key]Value{{Subject: c1db.ID, Peer: idHost, Dir: Ingress}: {Rule: 1}}
	if diff := cmp.Diff(want, r.Allow); diff != "" {
		t.Errorf("allow entries (-want +got); none for egress-only subjects:\n%s", diff)
	}
	// A rule naming the host keeps its own attribution.
	pols = append(pols, dbIngress("probes", entities(v1alpha1.EntityHost)))
	r = Compile(Input{Policies: pols, Identities: c1all, NamespaceLabels: nsl, AllowHostToLocalPods: true})
	if d := r.Decide(idHost, c1db.ID, ProtoTCP, 8080); r.Rules[d.Ingress.Rule-1].String() != "prod/probes ingress[0]" {
		t.Errorf("explained by %s, want the policy that names the host", r.Rules[d.Ingress.Rule-1])
	}
}

func TestBadBlocksAreSkipped(t *testing.T) {
	tests := []struct {
		name string
		peer v1alpha1.PolicyPeer
		want string
	}{
		{"not a CIDR", ipBlock("10.0.0.1"), `prod/a: ingress[0]: peers[0]: ipBlock.cidr: "10.0.0.1" is not a CIDR`},
		{"host bits", ipBlock("10.0.0.1/8"), `prod/a: ingress[0]: peers[0]: ipBlock.cidr: "10.0.0.1/8" has host bits set`},
		{"except outside", ipBlock("10.0.0.0/8", "11.0.0.0/16"), `prod/a: ingress[0]: peers[0]: ipBlock.except[0]: 11.0.0.0/16 is not strictly inside 10.0.0.0/8`},
		{"except the block itself", ipBlock("10.0.0.0/8", "10.0.0.0/8"), `prod/a: ingress[0]: peers[0]: ipBlock.except[0]: 10.0.0.0/8 is not strictly inside 10.0.0.0/8`},
		{"except other family", ipBlock("::/0", "10.0.0.0/8"), `prod/a: ingress[0]: peers[0]: ipBlock.except[0]: 10.0.0.0/8 is not strictly inside ::/0`},
		{"unknown entity", entities("moon"), `prod/a: ingress[0]: peers[0]: unknown entity "moon"`},
		{"two kinds", v1alpha1.PolicyPeer{PodSelector: sel(), Entities: []v1alpha1.Entity{v1alpha1.EntityHost}}, `prod/a: ingress[0]: peers[0]: a peer is exactly one of: podSelector and/or namespaceSelector, entities, ipBlock`},
		{"no kind", v1alpha1.PolicyPeer{}, `prod/a: ingress[0]: peers[0]: a peer is exactly one of: podSelector and/or namespaceSelector, entities, ipBlock`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Compile(Input{Policies: []v1alpha1.MeshPolicy{dbIngress("a", tt.peer)}, Identities: c1all})
			if d := cmp.Diff([]string{tt.want}, r.Skipped); d != "" {
				t.Errorf("skipped (-want +got):\n%s", d)
			}
			if len(r.Allow)+len(r.Enforce)+len(r.CIDRs) != 0 {
				t.Errorf("a skipped policy left %d allow, %d enforce, %d CIDR entries", len(r.Allow), len(r.Enforce), len(r.CIDRs))
			}
		})
	}
}

func TestLookup(t *testing.T) {
	p, a := netip.MustParsePrefix, netip.MustParseAddr
	const idCIDR = uint32(identity.MinCIDR)
	cidrs := map[netip.Prefix]uint32{p("10.0.0.0/8"): idCIDR, p("10.1.0.0/16"): idCIDR + 1, p("::/0"): idCIDR + 2}
	tests := []struct {
		addr netip.Addr
		want uint32
	}{
		{a("10.2.3.4"), idCIDR},
		{a("10.1.3.4"), idCIDR + 1},
		{a("::ffff:10.1.3.4"), idCIDR + 1},
		{a("11.0.0.1"), idWorld},
		{a("2001:db8::1"), idCIDR + 2},
	}
	for _, tt := range tests {
		if got := Lookup(cidrs, tt.addr); got != tt.want {
			t.Errorf("Lookup(%s) = %d, want %d", tt.addr, got, tt.want)
		}
	}
}

// TestBlocksAgainstModel compiles random ipBlock policies over a small address space and
// checks, for every address of it, that the classifier's view (the longest CIDR identity
// prefix, then the allow entries) agrees with NetworkPolicy's per-address reading: an address
// is allowed when some block of some rule holds it and none of that block's exceptions do.
func TestBlocksAgainstModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 3))
	// The space: 10.0.0.0/24 and 2001:db8::/120 (256 addresses each), plus addresses
	// outside both, which only world can allow.
	bases := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24"), netip.MustParsePrefix("2001:db8::/120")}
	// randPrefix is a random prefix inside within, whose host bits are all in the last byte.
	randPrefix := func(within netip.Prefix) netip.Prefix {
		hostBits := within.Addr().BitLen() - within.Bits()
		bits := within.Bits() + rng.IntN(hostBits+1)
		a := within.Addr().AsSlice()
		a[len(a)-1] |= byte(rng.IntN(1 << hostBits))
		addr, _ := netip.AddrFromSlice(a)
		pr, _ := addr.Prefix(bits)
		return pr
	}
	var space []netip.Addr
	for _, b := range bases {
		for i := range 256 {
			a := b.Addr().As16()
			a[15] = byte(i)
			addr := netip.AddrFrom16(a)
			if b.Addr().Is4() {
				addr = addr.Unmap()
			}
			space = append(space, addr)
		}
	}
	space = append(space, netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8:1::1"))
	for round := range 300 {
		var pols []v1alpha1.MeshPolicy
		type modelBlock struct {
			cidr   netip.Prefix
			except []netip.Prefix
		}
		var model []modelBlock // the blocks that allow into db
		world := rng.IntN(10) == 0
		for i := range 1 + rng.IntN(4) {
			base := bases[rng.IntN(len(bases))]
			c := randPrefix(base)
			mb := modelBlock{cidr: c}
			for range rng.IntN(3) {
				if c.Bits() == c.Addr().BitLen() {
					break
				}
				e := randPrefix(c)
				if e.Bits() == c.Bits() {
					continue
				}
				mb.except = append(mb.except, e)
			}
			var except []string
			for _, e := range mb.except {
				except = append(except, e.String())
			}
			peer := ipBlock(c.String(), except...)
			if rng.IntN(4) == 0 {
				// A block on another subject: its prefixes get identities, it allows nothing
				// into db.
				pols = append(pols, pol("prod", fmt.Sprintf("w%d", i), v1alpha1.MeshPolicySpec{
					EndpointSelector: *sel("app", "web"),
					Ingress:          []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{peer}}},
				}))
				continue
			}
			model = append(model, mb)
			pols = append(pols, dbIngress(fmt.Sprintf("d%d", i), peer))
		}
		if world {
			pols = append(pols, dbIngress("world", entities(v1alpha1.EntityWorld)))
		}
		pols = append(pols, pol("prod", "deny", v1alpha1.MeshPolicySpec{EndpointSelector: *sel("app", "db")}))
		r := Compile(Input{Policies: pols, Identities: c1all, NamespaceLabels: nsl})
		if len(r.Skipped) != 0 {
			t.Fatalf("round %d: skipped %v", round, r.Skipped)
		}
		for _, addr := range space {
			want := world
			for _, b := range model {
				in := b.cidr.Contains(addr)
				for _, e := range b.except {
					in = in && !e.Contains(addr)
				}
				want = want || in
			}
			src := Lookup(r.CIDRs, addr)
			got := r.Check(c1db.ID, src, ProtoTCP, 80, Ingress).Allowed
			if got != want {
				t.Fatalf("round %d: %s (identity %d) allowed=%v, model %v\npolicies: %+v\nCIDRs: %v", round, addr, src, got, want, model, r.CIDRs)
			}
		}
	}
}

// TestCIDRIdentitiesStable: the numbering depends on the set of prefixes, not on the policies'
// order or names.
func TestCIDRIdentitiesStable(t *testing.T) {
	a := dbIngress("a", ipBlock("10.0.0.0/8"))
	b := dbIngress("b", ipBlock("192.0.2.0/24", "192.0.2.0/25"))
	b.Namespace = "aaa"
	r1 := Compile(Input{Policies: []v1alpha1.MeshPolicy{a, b}, Identities: c1all})
	r2 := Compile(Input{Policies: []v1alpha1.MeshPolicy{b, a}, Identities: c1all})
	if d := cmp.Diff(r1.CIDRs, r2.CIDRs); d != "" {
		t.Errorf("(-first +second):\n%s", d)
	}
	// Another policy's prefixes do not renumber these.
	c := dbIngress("c", ipBlock("10.0.0.0/16"), ipBlock("0.0.0.0/0", "10.0.0.0/8"))
	r3 := Compile(Input{Policies: []v1alpha1.MeshPolicy{a, b, c}, Identities: c1all})
	for p, id := range r1.CIDRs {
		if r3.CIDRs[p] != id {
			t.Errorf("%s: identity %d, %d once another policy names more prefixes", p, id, r3.CIDRs[p])
		}
	}
}

// TestCIDRIdentitiesDistinct: many prefixes, each its own identity, all at or above MinCIDR.
func TestCIDRIdentitiesDistinct(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	set := map[netip.Prefix]bool{}
	for range 20000 {
		var a [16]byte
		for i := range a {
			a[i] = byte(rng.IntN(256))
		}
		addr := netip.AddrFrom16(a)
		if rng.IntN(2) == 0 {
			addr = netip.AddrFrom4([4]byte(a[:4]))
		}
		p, _ := addr.Prefix(rng.IntN(addr.BitLen() + 1))
		set[p] = true
	}
	ids := cidrIdentities(set)
	seen := map[uint32]netip.Prefix{}
	for p, id := range ids {
		if !identity.Identity(id).IsCIDR() {
			t.Fatalf("%s: identity %d below MinCIDR", p, id)
		}
		if q, dup := seen[id]; dup {
			t.Fatalf("%s and %s share identity %d", p, q, id)
		}
		seen[id] = p
	}
	if len(ids) != len(set) {
		t.Fatalf("%d identities for %d prefixes", len(ids), len(set))
	}
}
